"""Shutdown: calls still running after the grace period are ended, and refunded before storage closes.

The daemon's stop (tap.py) drains the gateway, then closes the service
adapters and the payment storage; a refund needs a storage round trip.
Only then does the chain close its JSON-RPC pool and metadata loader.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher

from snet_daemon import tap
from snet_daemon.blockchain.loader import MetadataLoader
from snet_daemon.blockchain.rpc import JsonRpcClient
from snet_daemon.config import load_config
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.cors import CorsPolicy
from snet_daemon.frontend.gateway import Gateway, Limits, Router
from snet_daemon.lifecycle import OrderedMultiService
from snet_daemon.payments.gate import PaymentGate
from tests.support.aio import aio_test
from tests.support.payments import RecordingLedger
from tests.support.ports import free_port


class _HangingUpstream:
    async def forward(self, call: ServerCall, metadata: object) -> None:
        await asyncio.Event().wait()


class _Sink:
    def __init__(self) -> None:
        self.status: int | None = None

    def send_headers(self, metadata: object) -> None:
        pass

    def send_message(self, message: bytes) -> None:
        pass

    def send_trailers(self, status: int, message: str, metadata: object, trailers_only: bool) -> None:
        self.status = status

    def can_write(self) -> bool:
        return True

    def consumed(self, size: int) -> None:
        pass


@aio_test
async def test_drain_waits_for_refunds_of_cancelled_calls() -> None:
    """A paid call hanging at the service past the grace period is ended with UNAVAILABLE, and
    drain returns only once its refund is written (it returned one loop turn after ending it)."""
    loop = asyncio.get_running_loop()
    ledger = RecordingLedger()
    gate = PaymentGate(_HangingUpstream(), ledger)  # type: ignore[arg-type]

    async def routes(method: str, path: str) -> object:
        raise AssertionError

    gateway = Gateway(Router(default=gate), routes, CorsPolicy(), Limits(), loop)  # type: ignore[arg-type]
    sink = _Sink()
    call = ServerCall("/example_service.Echo/Slow", (), sink, loop)
    call.accept_headers(
        [
            ("snet-payment-type", "escrow"),
            ("snet-payment-channel-id", "1"),
            ("snet-payment-channel-nonce", "0"),
            ("snet-payment-channel-amount", "10"),
            ("snet-payment-channel-signature-bin", "AAAA"),
        ]
    )
    call.end_input()
    gateway.start(call)
    await asyncio.sleep(0.01)  # authorized, forwarded, hanging at the service

    await gateway.drain(0.1)
    # What tap.stop() does next is stop the storage: the refund must be done by now.
    assert ledger.released
    assert not ledger.committed
    assert sink.status == 14  # UNAVAILABLE
    assert not gateway.active


class _Step(Service):
    """A service whose stop takes a while, and may fail; it records when it stops."""

    def __init__(self, name: str, events: list[str], seconds: float = 0.0, fail: bool = False) -> None:
        self.setName(name)  # type: ignore[no-untyped-call]
        self._events = events
        self._seconds = seconds
        self._fail = fail

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromFuture(asyncio.ensure_future(self._stop()))

    async def _stop(self) -> None:
        self._events.append(f"{self.name} stopping")
        await asyncio.sleep(self._seconds)
        self._events.append(f"{self.name} stopped")
        if self._fail:
            raise RuntimeError(f"{self.name} broke")


@aio_test
async def test_ordered_services_stop_one_at_a_time_last_added_first() -> None:
    """Each child stops only once the one added after it has stopped (MultiService stops them all
    at once); a failing stop is logged and the others still stop."""
    events: list[str] = []
    root = OrderedMultiService("root")
    for step in (_Step("first", events), _Step("second", events, 0.05, fail=True), _Step("third", events, 0.05)):
        step.setServiceParent(root)  # type: ignore[no-untyped-call]
    root.startService()  # type: ignore[no-untyped-call]
    logged: list[str] = []
    observer: Any = lambda event: logged.append(formatEvent(event))  # noqa: E731 (an ILogObserver)
    globalLogPublisher.addObserver(observer)
    try:
        await root.stopService().asFuture(asyncio.get_running_loop())
    finally:
        globalLogPublisher.removeObserver(observer)
    assert events == [
        "third stopping",
        "third stopped",
        "second stopping",
        "second stopped",
        "first stopping",
        "first stopped",
    ]
    assert "stopping second failed" in logged
    assert not root.running


@aio_test
async def test_chain_closes_after_running_calls_have_drained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's stop: the chain's JSON-RPC pool and the metadata loader close only once running
    calls have drained, since validating a payment may still need them."""
    from twisted.internet import reactor

    events: list[str] = []
    drain, rpc_close, loader_close = Gateway.drain, JsonRpcClient.close, MetadataLoader.close

    async def slow_drain(self: Gateway, grace: float, *args: Any, **kwargs: Any) -> None:
        events.append("drain started")
        await asyncio.sleep(0.3)  # a call that takes a little longer to finish
        await drain(self, grace, *args, **kwargs)
        events.append("drain finished")

    async def close_rpc(self: JsonRpcClient) -> None:
        events.append("rpc pool closed")
        await rpc_close(self)

    async def close_loader(self: MetadataLoader) -> None:
        events.append("metadata loader closed")
        await loader_close(self)

    monkeypatch.setattr(Gateway, "drain", slow_drain)
    monkeypatch.setattr(JsonRpcClient, "close", close_rpc)
    monkeypatch.setattr(MetadataLoader, "close", close_loader)
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(
            {
                "daemon_endpoint": "127.0.0.1:0",
                "blockchain_enabled": True,
                "blockchain_network_selected": "sepolia",
                "ethereum_json_rpc_http_endpoint": f"http://127.0.0.1:{free_port()}",
                "token_secret_key": "x" * 40,
                "payment_channel_storage_type": "memory",
                "metadata_refresh_interval": "0s",
            }
        )
    )
    previous = signal.getsignal(signal.SIGHUP)
    root = tap.build_daemon(load_config(str(config), environ={}), reactor)
    try:
        root.startService()
        await asyncio.sleep(0.1)
        await root.stopService().asFuture(asyncio.get_running_loop())
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert events.index("drain finished") < events.index("rpc pool closed"), events
    assert events.index("drain finished") < events.index("metadata loader closed"), events
