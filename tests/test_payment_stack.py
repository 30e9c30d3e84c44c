"""The payment stack's life cycle around its storage (the rest is covered end to end)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred, succeed

from snet_daemon.payments.stack import PaymentStack
from tests.support.aio import aio_test


class _Service:
    """A storage service (an embedded etcd, say) that starts at once and is never ready."""

    def __init__(self) -> None:
        self.running = False

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> Deferred[None]:
        self.running = False
        return succeed(None)


@aio_test
async def test_stop_while_the_storage_starts_stops_the_storage() -> None:
    """The daemon stops before its embedded etcd became ready: the etcd is stopped too (it was
    left running, with its port and data directory)."""
    service = _Service()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def ready() -> None:
        await never

    setup = SimpleNamespace(service=service, ready=ready, mode="embedded etcd")
    client = SimpleNamespace(endpoints=(), connection_timeout="", request_timeout="")
    metadata: Any = SimpleNamespace(current=SimpleNamespace(storage_client=client))
    metadata.subscribe = lambda callback: (callback(metadata.current), lambda: None)[1]
    stack = PaymentStack(
        upstream=None,  # type: ignore[arg-type]
        chain=None,  # type: ignore[arg-type]
        metadata=metadata,
        make_storage=lambda _: setup,  # type: ignore[arg-type,return-value]
        parse_duration=lambda _: 0.0,
        network="test",
        organization_id="org",
        instance="i",
        not_ready=lambda: (),
        service_id="svc",
        free_calls=None,  # type: ignore[arg-type]
        tokens=None,  # type: ignore[arg-type]
        clock=lambda: 0.0,
    )
    stack.start()
    for _ in range(5):
        await asyncio.sleep(0)
    assert service.running
    await stack.stop()
    assert not service.running
