"""The prepaid ledger's per-channel queue: refunds retried without holding it up, cancelled
charges dropped, a stop that answers everyone, storage errors that name nothing internal."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from twisted.logger import LogLevel, capturedLogs, formatEvent

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments.prepaid import PrepaidLedger
from snet_daemon.storage.base import Condition, Op, StorageTimeout, StorageUnavailable
from snet_daemon.storage.etcd import EtcdStorage
from tests.support.aio import aio_test, turns
from tests.support.payments import PRICE, CountingStorage, Keys
from tests.support.ports import free_port
from tests.test_prepaid import World

#: The ledger's sleep in some tests sleeps this many times less than it is asked.
SCALE = 100.0


async def refused(awaitable: Any) -> GrpcError:
    with pytest.raises(GrpcError) as info:
        await awaitable
    return info.value


@aio_test
async def test_a_refund_retried_in_the_background_holds_up_nothing_on_its_channel() -> None:
    """While storage is down, a failed call's refund is retried in the background; the channel's
    later refunds and charges get their own attempt at once, and the refunds all land once
    storage is back."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    storage = CountingStorage(world.memory)
    loop = asyncio.get_running_loop()

    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds / SCALE)

    def scaled_since(t0: float) -> float:
        return (loop.time() - t0) * SCALE

    ledger = PrepaidLedger(storage, world.a.keys.layout, sleep=sleep)
    await ledger.charge(1, PRICE)
    await ledger.charge(1, PRICE)
    storage.fail = StorageUnavailable("etcd down")
    await ledger.refund(1, PRICE)  # retried in the background

    t0 = loop.time()
    refund = asyncio.ensure_future(ledger.refund(1, PRICE))
    charge = asyncio.ensure_future(ledger.charge(1, PRICE))
    await asyncio.wait([refund, charge], timeout=5.0)
    assert refund.done()
    assert charge.done()
    assert scaled_since(t0) < 1.0  # not the ~11 s of the first refund's retries
    error = charge.exception()
    assert isinstance(error, GrpcError)
    assert error.status == Status.UNAVAILABLE

    storage.fail = None
    for _ in range(200):
        if await world.a.usage(1) == (4 * PRICE, 0):
            break
        await asyncio.sleep(0.01)
    assert await world.a.usage(1) == (4 * PRICE, 0)  # both refunds landed
    ledger.close()


@aio_test
async def test_a_refund_storage_keeps_refusing_is_given_up_and_logged() -> None:
    """Storage stays down: the refund is retried for a while, then given up with an error."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    storage = CountingStorage(world.memory)
    naps: list[float] = []

    async def sleep(seconds: float) -> None:
        naps.append(seconds)
        await asyncio.sleep(0)

    ledger = PrepaidLedger(storage, world.a.keys.layout, sleep=sleep)
    await ledger.charge(1, PRICE)
    storage.fail = StorageUnavailable("down")
    with capturedLogs() as events:
        await ledger.refund(1, PRICE)
        for _ in range(100):
            if not ledger._retriers:
                break
            await turns(5)
    assert not ledger._retriers
    assert 10.0 <= sum(naps) < 15.0
    (event,) = [e for e in events if e["log_level"] == LogLevel.error]
    assert "could not refund 10 to prepaid channel 1: storage unavailable" in formatEvent(event)
    storage.fail = None
    assert await world.a.usage(1) == (4 * PRICE, PRICE)
    ledger.close()


class BrokenOnRetry(CountingStorage):
    """Storage down for the first write, then a bug (not a storage error) on the next one."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.failures: list[Exception] = []

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        if self.failures:
            raise self.failures.pop(0)
        return await super().transaction(conditions, ops)


@aio_test
async def test_an_unexpected_error_while_retrying_a_refund_leaves_nobody_waiting() -> None:
    """A bug met while a refund is retried fails what it hits, logged, and the channel goes on:
    the requests queued on it are answered."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    storage = BrokenOnRetry(world.memory)
    release = asyncio.Event()

    async def sleep(seconds: float) -> None:
        await release.wait()

    ledger = PrepaidLedger(storage, world.a.keys.layout, sleep=sleep)
    await ledger.charge(1, PRICE)
    storage.failures = [StorageUnavailable("down"), RuntimeError("a bug")]
    with capturedLogs():
        await ledger.refund(1, PRICE)  # its retry will meet the bug
        await turns()
        charge = asyncio.ensure_future(ledger.charge(1, PRICE))
        release.set()
        await asyncio.wait([charge], timeout=2.0)
        assert charge.done()
        await asyncio.wait_for(ledger.charge(1, PRICE), 2.0)  # the channel still works
    ledger.close()


@aio_test
async def test_close_answers_requests_whose_worker_never_started() -> None:
    """close() right after a refund was queued, before its worker ran: the refund's caller is
    answered, the refund logged as lost, and later requests are refused at once."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    ledger = PrepaidLedger(world.memory, world.a.keys.layout)
    await ledger.charge(1, PRICE)

    with capturedLogs() as events:
        refund = asyncio.ensure_future(ledger.refund(1, PRICE))
        await asyncio.sleep(0)  # queued; its worker created, not started
        assert ledger._workers
        ledger.close()
        await turns()
        assert refund.done()
        assert refund.exception() is None
        error = await refused(asyncio.wait_for(ledger.charge(1, PRICE), 1.0))
        assert (error.status, error.message) == (Status.UNAVAILABLE, "the daemon is stopping")
        await asyncio.wait_for(ledger.refund(1, PRICE), 1.0)  # a failed call's, after the stop
    lost = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
    assert len(lost) == 2
    assert all("refund of 10 to prepaid channel 1 may be lost: the daemon stopped first" in text for text in lost)
    assert not ledger._workers or all(worker.done() for worker in ledger._workers)
    assert await world.a.usage(1) == (4 * PRICE, PRICE)


class GatedReads:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate: asyncio.Event | None = None
        self.reading = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get_many(self, keys: Any) -> Any:
        if self.gate is not None:
            self.reading.set()
            await self.gate.wait()
        return await self.inner.get_many(keys)


@aio_test
async def test_a_charge_cancelled_before_its_write_does_not_take_a_live_calls_slot() -> None:
    """Two charges wait while planned is read again (stale books said "used up"); one caller
    goes away meanwhile.  It is dropped, and the live call gets the one free slot."""
    world = World()
    await world.a.get_token(1, 1 * PRICE)
    storage = GatedReads(world.memory)
    ledger = PrepaidLedger(storage, world.a.keys.layout)
    await ledger.charge(1, PRICE)  # used = planned = P; our books cache planned = P
    await world.daemon().get_token(1, 2 * PRICE)  # another daemon: planned = 2P (one slot free)

    storage.gate = asyncio.Event()
    cancelled = asyncio.ensure_future(ledger.charge(1, PRICE))
    live = asyncio.ensure_future(ledger.charge(1, PRICE))
    await storage.reading.wait()  # both refused on the stale planned: planned is being re-read
    cancelled.cancel()
    await asyncio.sleep(0)
    storage.gate.set()
    results = await asyncio.gather(cancelled, live, return_exceptions=True)
    await turns()
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1] is None  # served
    assert await world.a.usage(1) == (2 * PRICE, 2 * PRICE)  # charged once, for the live call


@aio_test
async def test_storage_errors_tell_clients_only_their_kind() -> None:
    """A refusal for a storage outage names no endpoint and quotes no storage error; a timeout
    is still told apart."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    storage = CountingStorage(world.memory)
    ledger = PrepaidLedger(storage, world.a.keys.layout)
    storage.fail = StorageUnavailable("etcd at http://10.0.0.7:2379 is unavailable: Connection was refused")
    error = await refused(ledger.charge(1, PRICE))
    assert (error.status, error.message) == (Status.UNAVAILABLE, "payment storage is unavailable")
    error = await refused(ledger.usage(1))
    assert (error.status, error.message) == (Status.UNAVAILABLE, "payment storage is unavailable")
    storage.fail = StorageTimeout("etcd at http://10.0.0.7:2379 did not answer within 3s")
    error = await refused(ledger.charge(1, PRICE))
    assert (error.status, error.message) == (Status.UNAVAILABLE, "payment storage did not answer in time")
    ledger.close()


@aio_test
async def test_an_unreachable_etcd_is_not_named_to_clients_but_in_the_log() -> None:
    """The real etcd client, nothing listening: the client gets no address, the log has it."""
    url = f"http://127.0.0.1:{free_port()}"
    storage = EtcdStorage([url], request_timeout=0.5)
    try:
        ledger = PrepaidLedger(storage, Keys().layout)
        with capturedLogs() as events:
            error = await refused(ledger.charge(1, 10))
        ledger.close()
    finally:
        await storage.close()
    assert error.status == Status.UNAVAILABLE
    assert "127.0.0.1" not in error.message
    assert error.message in ("payment storage is unavailable", "payment storage did not answer in time")
    assert any(url in formatEvent(e) for e in events)
