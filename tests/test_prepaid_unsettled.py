"""Prepaid writes of unknown outcome: settled later, before the channel's next write, in the
background, and at stop.

A charge or refund whose reply was lost while storage kept failing through
:func:`tagged.settle`'s reads (etcd electing a leader) cannot be told at once.  Its calls are
refused; once storage answers, the tag history tells: a charge that landed is refunded, a
refund that never will land is made again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import pytest
from twisted.logger import LogLevel, capturedLogs, formatEvent

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments.prepaid import PrepaidLedger
from snet_daemon.storage.base import Condition, ConditionFailed, Entry, Op, StorageTimeout, StorageUnavailable
from tests.support.aio import aio_test, turns
from tests.support.payments import PRICE, CountingStorage
from tests.test_prepaid import World


class Flaky(CountingStorage):
    """The next transaction (when armed) applies or not, then its reply is lost; the next
    ``bad_gets`` single-key reads then fail (the ones :func:`tagged.settle` makes)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.armed = False
        self.apply = True
        self.bad_gets = 0

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        if not self.armed:
            return await super().transaction(conditions, ops)
        self.armed = False
        self.calls.append("transaction")
        if self.apply:
            with contextlib.suppress(ConditionFailed):
                await self.inner.transaction(conditions, ops)
        raise StorageTimeout("etcd at http://10.0.0.7:2379: etcdserver: leader changed")

    async def get(self, key: str) -> Entry | None:
        if self.bad_gets:
            self.bad_gets -= 1
            self.calls.append("get")
            raise StorageUnavailable("etcd at http://10.0.0.7:2379: no leader")
        return await super().get(key)

    def lose_next_write(self, *, apply: bool = True, bad_gets: int = 4) -> None:
        self.armed, self.apply, self.bad_gets = True, apply, bad_gets


class Naps:
    """The ledger's sleep: :func:`tagged.settle`'s short pauses pass at once, the longer ones
    (the background retries) only when released."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[None]] = []

    async def __call__(self, seconds: float) -> None:
        if seconds < 0.2:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        await future

    async def release(self) -> None:
        """Let the paused retries go on, and give them time to finish."""
        await turns()  # a retry task just started pauses first
        waiting, self.waiting = self.waiting, []
        for future in waiting:
            if not future.done():
                future.set_result(None)
        await turns()


async def setup(planned_calls: int = 4) -> tuple[World, Flaky, Naps, PrepaidLedger]:
    world = World()
    await world.a.get_token(1, planned_calls * PRICE)
    storage = Flaky(world.memory)
    naps = Naps()
    ledger = PrepaidLedger(storage, world.a.keys.layout, sleep=naps)
    await ledger.charge(1, PRICE)  # one call served: used = P
    return world, storage, naps, ledger


async def refused(awaitable: Any) -> GrpcError:
    with pytest.raises(GrpcError) as info:
        await awaitable
    return info.value


@aio_test
async def test_a_lost_charge_that_landed_is_refunded_before_the_next_write() -> None:
    """The charge landed, its reply was lost and storage failed through the settle: the call is
    refused.  The channel's next charge settles it first: it landed, so it is given back."""
    world, storage, _, ledger = await setup()
    storage.lose_next_write()
    error = await refused(ledger.charge(1, PRICE))
    assert error.status == Status.UNAVAILABLE
    assert await world.a.usage(1) == (4 * PRICE, 2 * PRICE)  # charged for a refused call, for now

    await ledger.charge(1, PRICE)  # served, the refused call refunded first
    assert await world.a.usage(1) == (4 * PRICE, 2 * PRICE)
    await ledger.charge(1, PRICE)
    await ledger.refund(1, PRICE)
    assert await world.a.usage(1) == (4 * PRICE, 2 * PRICE)  # two calls served, nothing more
    ledger.close()


@aio_test
async def test_charges_are_refused_while_a_lost_write_cannot_be_settled() -> None:
    """Nothing is written on a channel, and no call served, while our write there is of unknown
    outcome; once storage answers, the channel works again, the refused call refunded."""
    world, storage, _, ledger = await setup()
    storage.lose_next_write(bad_gets=10)
    await refused(ledger.charge(1, PRICE))
    writes = storage.calls.count("transaction")
    error = await refused(ledger.charge(1, PRICE))
    assert error.status == Status.UNAVAILABLE
    assert storage.calls.count("transaction") == writes  # nothing written on an unknown state
    storage.bad_gets = 0
    await ledger.charge(1, PRICE)
    assert await world.a.usage(1) == (4 * PRICE, 2 * PRICE)
    ledger.close()


@aio_test
async def test_a_lost_charge_is_settled_in_the_background() -> None:
    """With no further call on the channel, the background retry settles the write and refunds."""
    world, storage, naps, ledger = await setup()
    storage.lose_next_write(bad_gets=8)
    await refused(ledger.charge(1, PRICE))
    await naps.release()  # the first retry: storage still fails
    assert await world.a.usage(1) == (4 * PRICE, 2 * PRICE)
    await naps.release()  # the next one settles it
    assert await world.a.usage(1) == (4 * PRICE, PRICE)
    await naps.release()
    assert not ledger._retriers  # nothing left to retry: the background task is gone
    ledger.close()


@aio_test
async def test_a_lost_refund_that_never_landed_is_made_again() -> None:
    """A refund whose write did not apply, its reply lost, storage failing through the settle:
    once storage answers, the write is fenced off for good and the refund made again."""
    world, storage, naps, ledger = await setup()
    await ledger.charge(1, PRICE)
    storage.lose_next_write(apply=False)
    await ledger.refund(1, PRICE)  # the caller is done with it either way
    assert await world.a.usage(1) == (4 * PRICE, 2 * PRICE)
    await naps.release()
    assert await world.a.usage(1) == (4 * PRICE, PRICE)
    ledger.close()


@aio_test
async def test_a_lost_refund_that_landed_is_not_made_twice() -> None:
    """The same, but the refund did land: it stays made once."""
    world, storage, naps, ledger = await setup()
    await ledger.charge(1, PRICE)
    storage.lose_next_write(apply=True)
    await ledger.refund(1, PRICE)
    await naps.release()
    await ledger.charge(1, PRICE)
    assert await world.a.usage(1) == (4 * PRICE, 2 * PRICE)
    ledger.close()


@aio_test
async def test_a_write_written_over_too_often_is_logged_and_the_channel_goes_on() -> None:
    """Other daemons wrote the channel more often than a used amount remembers before we could
    look: the write's outcome can never be told.  That is logged, and the channel is not left
    refusing calls for ever."""
    world, storage, naps, ledger = await setup(planned_calls=20)
    storage.lose_next_write(bad_gets=10)
    await refused(ledger.charge(1, PRICE))
    other = world.daemon()
    for _ in range(9):
        await other.prepaid.charge(1, PRICE)
    storage.bad_gets = 0
    with capturedLogs() as events:
        await ledger.charge(1, PRICE)
    (event,) = [e for e in events if e["log_level"] == LogLevel.error]
    assert "the outcome of a write to prepaid channel 1 can no longer be told" in formatEvent(event)
    assert await world.a.usage(1) == (20 * PRICE, 12 * PRICE)  # 1 + the lost one + 9 + 1
    await naps.release()
    ledger.close()


@aio_test
async def test_settle_at_stop_settles_a_lost_charge() -> None:
    """The daemon stops before the background retry is due: settle settles the write now."""
    world, storage, _, ledger = await setup()
    storage.lose_next_write()
    await refused(ledger.charge(1, PRICE))
    await asyncio.wait_for(ledger.settle(1.0), 5.0)
    assert await world.a.usage(1) == (4 * PRICE, PRICE)
    ledger.close()


@aio_test
async def test_close_logs_a_write_still_unsettled_and_stops_retrying() -> None:
    """Storage stays down through the stop: close cancels the retries and logs the write."""
    _, storage, _, ledger = await setup()
    storage.lose_next_write(bad_gets=1000)
    await refused(ledger.charge(1, PRICE))
    with capturedLogs() as events:
        await asyncio.wait_for(ledger.settle(0.05), 5.0)
        retriers = set(ledger._retriers)
        assert retriers
        ledger.close()
        await turns()
    assert all(task.done() for task in retriers)
    (event,) = [e for e in events if e["log_level"] == LogLevel.error]
    assert "a write to prepaid channel 1 is of unknown outcome as the daemon stops" in formatEvent(event)
    assert "the client paid 10 for refused calls" in formatEvent(event)


@aio_test
async def test_a_lost_charge_that_never_landed_is_settled_without_a_false_bug_report() -> None:
    """Settling left nothing owed and the books unread; the nudge that did it (background, or at
    stop) was then applied against unread books: an AttributeError logged as a prepaid bug."""
    for settle_at_stop in (False, True):
        world, storage, naps, ledger = await setup()
        storage.lose_next_write(apply=False, bad_gets=4)
        await refused(ledger.charge(1, 10))
        with capturedLogs() as events:
            if settle_at_stop:
                await asyncio.wait_for(ledger.settle(1.0), 5.0)
            else:
                await naps.release()
        errors = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.error]
        assert not errors, errors
        assert 1 not in ledger._books or ledger._books[1].unsettled is None
        assert await world.a.usage(1) == (40, 10)
        ledger.close()


@aio_test
async def test_close_logs_a_charge_whose_write_was_under_way() -> None:
    """A charge applied whose reply had not come back when the daemon closed the ledger: its call
    is refused as the daemon stops, and the possible charge is logged (it was silent)."""
    _, storage, _, ledger = await setup()
    storage.reply_after = asyncio.Event()
    task = asyncio.ensure_future(ledger.charge(1, PRICE))
    await storage.applied.wait()
    with capturedLogs() as events:
        ledger.close()
        await turns()
    error = await refused(task)
    assert error.message == "the daemon is stopping"
    texts = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.error]
    assert any(f"charges of {PRICE} on prepaid channel 1 were being written" in text for text in texts), texts
