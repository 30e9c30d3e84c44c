"""The payment stack's life cycle around its storage (the rest is covered end to end)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed

from snet_daemon.ops.heartbeat import Heartbeat, HeartbeatIdentity
from snet_daemon.payments import signatures as sig
from snet_daemon.payments.freecall import FreeCall, FreeCallSettings, decode_count, encode_count
from snet_daemon.payments.prepaid import decode_amount, encode_amount
from snet_daemon.payments.stack import PaymentStack
from snet_daemon.payments.tokens import TokenSettings
from snet_daemon.storage.base import Condition, Op, StorageSetupError
from snet_daemon.storage.embedded import EmbeddedEtcdError, EmbeddedEtcdStartError
from snet_daemon.storage.keys import KeyLayout
from snet_daemon.storage.memory import MemoryStorage
from tests.support.aio import aio_test, wait_for
from tests.support.payments import GROUP, MPE, PROVIDER


class _Service:
    """A storage service (an embedded etcd, say) that starts at once and is never ready."""

    def __init__(self) -> None:
        self.running = False

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> Deferred[None]:
        self.running = False
        return succeed(None)


_CLIENT = SimpleNamespace(endpoints=(), connection_timeout="", request_timeout="")


def _stack(make_storage: Callable[[Any], Any], chain: Any = None, current: Any = None) -> PaymentStack:
    """A stack whose metadata (``current``, or only storage settings) is there from the start,
    building storage with ``make_storage``."""
    metadata: Any = SimpleNamespace(current=current or SimpleNamespace(storage_client=_CLIENT))
    metadata.subscribe = lambda callback: (callback(metadata.current), lambda: None)[1]
    return PaymentStack(
        upstream=None,  # type: ignore[arg-type]
        chain=chain,
        metadata=metadata,
        make_storage=make_storage,
        parse_duration=lambda _: 0.0,
        network="test",
        organization_id="org",
        instance="i",
        not_ready=lambda: (),
        service_id="svc",
        free_calls=FreeCallSettings(),
        tokens=TokenSettings(secret=b"s" * 32, expiry_minutes=1),
        clock=lambda: 0.0,
    )


async def _until(predicate: Callable[[], bool], within: float) -> None:
    """Poll ``predicate()`` until true (the stack retries on the real clock)."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@aio_test
async def test_an_embedded_etcd_that_did_not_start_is_started_again() -> None:
    """The embedded etcd's first start fails (its port was taken for a while): the stack tries
    again after its backoff and payments come up, without a restart of the daemon (they stayed
    off for good before)."""
    builds: list[_Service] = []

    def make_storage(_: object) -> Any:
        service = _Service()
        builds.append(service)
        attempt = len(builds)

        async def ready() -> None:
            if attempt == 1:
                raise EmbeddedEtcdStartError("the embedded etcd server did not start (exited with status 1)")

        return SimpleNamespace(service=service, ready=ready, mode="embedded-etcd", embedded=None)

    assert not issubclass(EmbeddedEtcdStartError, StorageSetupError)
    stack = _stack(make_storage, chain=SimpleNamespace(mpe_address=""))
    stack.start()
    await _until(lambda: len(builds) == 1 and not builds[0].running, within=2)
    assert any("did not start" in problem for problem in stack.problems())
    await _until(lambda: stack.storage_mode() is not None, within=5)
    assert len(builds) == 2
    assert builds[1].running
    assert not any(problem.startswith("storage:") for problem in stack.problems())
    await stack.stop()


@aio_test
async def test_an_embedded_etcd_in_trouble_after_starting_makes_the_heartbeat_offline() -> None:
    """The embedded etcd started, then crashed and is being restarted: the stack's problems, and so
    the heartbeat, say so (it stayed Online while every paid call failed); Go's fields are unchanged."""
    embedded = SimpleNamespace(trouble=None)
    setup = SimpleNamespace(service=_Service(), ready=_no_wait, mode="embedded-etcd", embedded=embedded)
    stack = _stack(lambda _: setup, chain=SimpleNamespace(mpe_address=""))
    stack.start()
    await _until(lambda: stack.storage_mode() is not None, within=2)

    async def serving() -> bool:
        return True

    identity = HeartbeatIdentity("org", "svc", "group", "0xregistry", "1.0", True, "sepolia")
    heartbeat = Heartbeat(lambda: identity, serving, lambda: 0.0, lambda: stack.problems(), cache_seconds=0)
    healthy = await heartbeat.report()
    embedded.trouble = "the embedded etcd server exited with status 2; restarting it"
    troubled = await heartbeat.report()
    assert troubled["status"] == "Offline"
    assert troubled["ready"] is False
    assert "storage: the embedded etcd server exited with status 2; restarting it" in troubled["problems"]  # type: ignore[operator]
    assert troubled.keys() == healthy.keys()
    embedded.trouble = None
    assert not any(problem.startswith("storage:") for problem in stack.problems())
    await stack.stop()


async def _no_wait() -> None:
    """A storage that is ready at once."""


@aio_test
async def test_a_misconfigured_embedded_etcd_is_not_retried() -> None:
    """No etcd program (a setup error) is reported and not retried: waiting cannot fix it."""
    builds: list[object] = []

    def make_storage(_: object) -> Any:
        builds.append(object())
        raise EmbeddedEtcdError("the 'etcd' program was not found")

    stack = _stack(make_storage)
    stack.start()
    await asyncio.sleep(1.5)  # longer than the first retry's backoff
    assert len(builds) == 1
    assert stack.problems() == ("storage: the 'etcd' program was not found",)
    await stack.stop()


@aio_test
async def test_stop_while_the_storage_starts_stops_the_storage() -> None:
    """The daemon stops before its embedded etcd became ready: the etcd is stopped too (it was
    left running, with its port and data directory)."""
    service = _Service()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def ready() -> None:
        await never

    setup = SimpleNamespace(service=service, ready=ready, mode="embedded etcd")
    stack = _stack(lambda _: setup)
    stack.start()
    for _ in range(5):
        await asyncio.sleep(0)
    assert service.running
    await stack.stop()
    assert not service.running


class _SlowWrites(MemoryStorage):
    """Storage whose writes take ``delay`` seconds to apply."""

    delay = 0.0

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        await asyncio.sleep(self.delay)
        return await super().transaction(conditions, ops)


async def _running_stack(storage: MemoryStorage, service: _Service, free_calls: int) -> PaymentStack:
    """A started stack on ``storage`` (closed by stopping ``service``), its ledgers built."""
    setup = SimpleNamespace(service=service, ready=_no_wait, mode="memory", storage=storage, lease_keeper=None)
    current = SimpleNamespace(
        storage_client=_CLIENT,
        group_id=GROUP,
        group_id_base64="AAEC",
        group_name="default_group",
        free_calls=free_calls,
        free_call_signer_address=None,
        payment_address=sig.checksum(PROVIDER),
        payment_expiration_threshold=100,
        price=lambda method: 10,
    )
    stack = _stack(lambda _: setup, SimpleNamespace(mpe_address=sig.checksum(MPE), token_balance=None), current)
    stack.start()
    await wait_for(lambda: stack._parts is not None)
    return stack


@pytest.mark.parametrize("reloaded", [False, True], ids=["current", "replaced-by-a-reload"])
@aio_test
async def test_stop_waits_for_free_call_give_backs_before_the_storage_closes(reloaded: bool) -> None:
    """A failed free call's give-back still under way when the daemon stops lands before the
    storage closes (the stop waited only for escrow refunds: the user lost a free call); also
    when it runs in ledgers a reload replaced (it moved the daemon to another payment group),
    for calls that started before the reload."""
    storage = _SlowWrites(lambda: 0.0)
    counted_at_close: list[int] = []

    class Service(_Service):
        def stopService(self) -> Deferred[None]:
            counted_at_close.append(decode_count(storage._data.get(key)))  # no await: the storage closes
            return super().stopService()

    key = "test/free-call-user/a"
    stack = await _running_stack(storage, Service(), free_calls=2)
    parts = stack._parts
    assert parts is not None
    await storage.put(key, encode_count(1))
    if reloaded:
        stack._apply(SimpleNamespace(**{**vars(stack._metadata.current), "group_id": b"\x09" * 32}))
        assert stack._parts is not parts
    storage.delay = 0.05
    # The gate's give-back of a call whose client went away, left to run in the background.
    background = asyncio.ensure_future(parts.free_calls.release(FreeCall(key, sig.checksum(PROVIDER))))
    await asyncio.sleep(0)
    await stack.stop()
    assert counted_at_close == [0]
    assert background.done()


class _GatedWrites(MemoryStorage):
    """Storage whose transactions, once ``tickets`` is set, each wait for a ticket."""

    tickets: asyncio.Semaphore | None = None
    entered = 0

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        if self.tickets is not None:
            self.entered += 1
            await self.tickets.acquire()
        return await super().transaction(conditions, ops)


@aio_test
async def test_stop_waits_for_prepaid_refunds_before_the_storage_closes() -> None:
    """A prepaid call cancelled while its charge was being written is refunded once the charge
    lands, in the background; that refund still under way when the daemon stops lands before the
    storage closes (the stop did not wait for it: the client stayed charged for a call never served)."""
    storage = _GatedWrites(lambda: 0.0)
    used_at_close: list[int] = []
    used_key = KeyLayout("test", "org", GROUP, sig.checksum(MPE)).prepaid(1, "U")

    class Service(_Service):
        def stopService(self) -> Deferred[None]:
            used_at_close.append(decode_amount(storage._data.get(used_key)))  # no await: the storage closes
            return super().stopService()

    stack = await _running_stack(storage, Service(), free_calls=0)
    assert stack._parts is not None
    await storage.put(KeyLayout("test", "org", GROUP, sig.checksum(MPE)).prepaid(1, "P"), encode_amount(100))
    storage.tickets = tickets = asyncio.Semaphore(0)
    charge = asyncio.ensure_future(stack._parts.prepaid.charge(1, 10))
    await wait_for(lambda: storage.entered == 1)
    charge.cancel()  # the client goes away while its charge is being written
    with contextlib.suppress(asyncio.CancelledError):
        await charge
    tickets.release()  # the charge lands: its refund follows
    await wait_for(lambda: storage.entered == 2)
    stopping = asyncio.ensure_future(stack.stop())
    await asyncio.sleep(0.05)
    tickets.release()  # the refund lands
    await stopping
    assert used_at_close == [0]
