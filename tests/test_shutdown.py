"""Shutdown: calls still running after the grace period are ended, and refunded before storage closes.

The daemon's stop (tap.py) drains the gateway, then closes the service
adapters and the payment storage; a refund needs a storage round trip.
"""

from __future__ import annotations

import asyncio

from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.cors import CorsPolicy
from snet_daemon.frontend.gateway import Gateway, Limits, Router
from snet_daemon.payments.gate import PaymentGate
from tests.support.aio import aio_test
from tests.support.payments import RecordingLedger


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
