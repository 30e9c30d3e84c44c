"""Free-call counter writes of unknown outcome, settled later; and the stop (``settle``, ``close``).

A count (or give-back) whose reply was lost while storage kept failing all
through :func:`snet_daemon.payments.tagged.settle` is kept unsettled: its
calls are refused, and once storage answers the counter's history tells
whether it landed -- its refused calls are then given back -- or not -- the
give-backs it carried are then made again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from twisted.logger import LogLevel, capturedLogs, formatEvent

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments.counters import SETTLE_RETRY, Counters, decode_count, encode_count, history_of
from snet_daemon.storage.base import Condition, Entry, Op, Put, StorageTimeout, StorageUnavailable
from snet_daemon.storage.memory import MemoryStorage
from tests.support.aio import aio_test, turns

KEY = "free/user"


class Flaky:
    """A storage whose next transaction's reply is lost (applied or not), and that can go down."""

    def __init__(self) -> None:
        self.inner = MemoryStorage(lambda: 0.0)
        #: What the next transaction does before its reply is lost: "apply" or "drop" (None: normal).
        self.lose: str | None = None
        #: Reads and writes fail (etcd electing a leader, say).
        self.down = False
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get(self, key: str) -> Entry | None:
        self.calls.append("get")
        if self.down:
            raise StorageUnavailable("etcd at http://etcd:2379 is unavailable: no leader")
        return await self.inner.get(key)

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        self.calls.append("transaction")
        if self.down:
            raise StorageUnavailable("etcd at http://etcd:2379 is unavailable: no leader")
        lose, self.lose = self.lose, None
        if lose is None:
            return await self.inner.transaction(conditions, ops)
        if lose == "apply":
            await self.inner.transaction(conditions, ops)
        self.down = True  # and storage fails all through the settling
        raise StorageTimeout("etcd at http://etcd:2379: etcdserver: leader changed")

    async def count(self) -> int:
        return decode_count(await self.inner.get(KEY))


class Pauses:
    """Pauses pass at once, except the background settler's, which wait for :attr:`go`."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        if seconds >= SETTLE_RETRY[0]:
            await self.go.wait()
        await asyncio.sleep(0)


def counters(storage: Flaky, pauses: Pauses) -> Counters:
    return Counters(storage, sleep=pauses.sleep, jitter=lambda: 0.0)


async def refused(awaitable: Any) -> GrpcError:
    with pytest.raises(GrpcError) as info:
        await awaitable
    return info.value


def warnings(events: Sequence[dict[str, Any]]) -> list[str]:
    return [formatEvent(event) for event in events if event["log_level"] >= LogLevel.warn]


# -- fault: a count of unknown outcome was refused and never looked at again -------------


@aio_test
async def test_a_refused_count_that_landed_is_given_back_before_the_next_write() -> None:
    """The count landed, its reply was lost, and storage failed through the settling: the call is
    refused.  The user's next call settles it first: it landed, so it is given back, and the user
    still has both free calls (they lost one: 2 counted, 1 served)."""
    storage, pauses = Flaky(), Pauses()
    free = counters(storage, pauses)
    storage.lose = "apply"
    error = await refused(free.count(KEY, 2))
    assert error.status == Status.UNAVAILABLE
    assert await storage.count() == 1  # it landed
    storage.down = False
    storage.calls.clear()
    await free.count(KEY, 2)  # served, counted in the slot of the refused call
    assert storage.calls[0] == "get"  # settled before anything is written
    await free.count(KEY, 2)  # and the second free call too
    assert (await refused(free.count(KEY, 2))).status == Status.RESOURCE_EXHAUSTED
    assert await storage.count() == 2
    free.close()


@aio_test
async def test_a_refused_count_that_never_landed_costs_nothing() -> None:
    """The count did not land: settling fences it off; nothing is given back (nothing was taken)."""
    storage, pauses = Flaky(), Pauses()
    free = counters(storage, pauses)
    storage.lose = "drop"
    await refused(free.count(KEY, 2))
    storage.down = False
    await free.count(KEY, 2)
    await free.count(KEY, 2)
    assert (await refused(free.count(KEY, 2))).status == Status.RESOURCE_EXHAUSTED
    assert await storage.count() == 2
    free.close()


@aio_test
async def test_the_background_settler_gives_back_a_refused_count_that_landed() -> None:
    """Without another call of the user, the write is settled in the background once storage
    answers, and the refused call is given back."""
    storage, pauses = Flaky(), Pauses()
    free = counters(storage, pauses)
    storage.lose = "apply"
    await refused(free.count(KEY, 2))
    await turns()
    assert await storage.count() == 1  # nothing happens while the settler waits
    storage.down = False
    with capturedLogs() as events:
        pauses.go.set()
        for _ in range(100):
            if await storage.count() == 0:
                break
            await asyncio.sleep(0)
    assert await storage.count() == 0
    assert any("landed after its calls were refused" in formatEvent(event) for event in events)
    await turns()
    assert not free._settlers
    assert not free._unsettled
    assert not free._queues
    free.close()


@aio_test
async def test_calls_are_refused_while_an_earlier_write_cannot_be_settled() -> None:
    """Storage still failing: a new call tries once to settle the earlier write, and is refused
    (UNAVAILABLE) rather than served on a count not known; nothing is written over it."""
    storage, pauses = Flaky(), Pauses()
    free = counters(storage, pauses)
    storage.lose = "apply"
    await refused(free.count(KEY, 2))
    storage.calls.clear()
    error = await refused(free.count(KEY, 2))
    assert (error.status, error.message) == (Status.UNAVAILABLE, "payment storage is unavailable")
    assert "transaction" not in storage.calls
    assert KEY in free._unsettled
    free.close()


@aio_test
async def test_a_give_back_returns_while_an_earlier_write_cannot_be_settled() -> None:
    """The gate awaits a failed free call's give-back before answering its client: it must
    return after one try, not when the earlier write is finally settled or the give-back given
    up (a minute later), as it does when storage is simply down."""
    storage, pauses = Flaky(), Pauses()
    free = counters(storage, pauses)
    await free.count(KEY, 5)
    storage.lose = "drop"
    await refused(free.count(KEY, 5))
    give_back = asyncio.ensure_future(free.give_back(KEY))
    await turns()
    assert give_back.done()
    assert KEY in free._unsettled  # still not settled: the background settler waits
    storage.down = False
    pauses.go.set()
    await turns(200)
    assert KEY not in free._unsettled
    assert await storage.count() == 0  # the first call given back; the lost one never landed
    free.close()


@pytest.mark.parametrize(("lose", "reapplied"), [("apply", False), ("drop", True)])
@aio_test
async def test_a_give_back_of_unknown_outcome_is_made_again_only_if_it_never_landed(lose: str, reapplied: bool) -> None:
    """A give-back whose reply was lost while storage stayed down: settled later, it is made
    again if it never landed, and not if it did (the user would get a call too many)."""
    storage, pauses = Flaky(), Pauses()
    free = counters(storage, pauses)
    await free.count(KEY, 2)
    storage.lose = lose
    with capturedLogs() as events:
        await free.give_back(KEY)  # returns: the client need not wait
    assert not warnings(events)
    assert await storage.count() == (0 if lose == "apply" else 1)
    storage.down = False
    with capturedLogs() as events:
        await free.settle(1.0)
    assert await storage.count() == 0  # given back exactly once
    assert any("never landed" in formatEvent(event) for event in events) == reapplied
    assert not free._unsettled
    free.close()


@aio_test
async def test_settle_at_stop_settles_a_write_of_unknown_outcome() -> None:
    """The stop tries once more, without waiting for the settler's pause."""
    storage, pauses = Flaky(), Pauses()
    free = counters(storage, pauses)
    storage.lose = "apply"
    await refused(free.count(KEY, 2))
    storage.down = False
    await free.settle(1.0)
    assert await storage.count() == 0
    free.close()


@aio_test
async def test_a_write_pushed_out_of_the_history_is_logged_and_no_longer_blocks() -> None:
    """Other daemons wrote the counter more often than it remembers before ours could be
    settled: its outcome can never be told.  It is logged, and the user's calls go on."""
    storage, pauses = Flaky(), Pauses()
    free = counters(storage, pauses)
    storage.lose = "apply"
    await refused(free.count(KEY, 10))
    storage.down = False
    for n in range(9):  # another daemon's counts, each recorded in the counter's history
        current = await storage.inner.get(KEY)
        assert current is not None
        recorded = history_of(current)
        await storage.inner.transaction(
            [Condition.unchanged(KEY, current)],
            [Put(KEY, encode_count(decode_count(current) + 1, [(b"other%03d" % n, current.mod_revision), *recorded]))],
        )
    with capturedLogs() as events:
        await free.count(KEY, 20)
    assert any("can no longer be told" in text for text in warnings(events))
    assert await storage.count() == 11
    free.close()


@aio_test
async def test_close_cancels_the_settler_and_logs_what_stays_unsettled() -> None:
    storage, pauses = Flaky(), Pauses()
    free = counters(storage, pauses)
    storage.lose = "apply"
    await refused(free.count(KEY, 2))
    settler = free._settlers[KEY]
    with capturedLogs() as events:
        free.close()
        await turns()
    assert settler.cancelled()
    assert not free._settlers
    assert not free._unsettled
    (text,) = warnings(events)
    assert KEY in text
    assert "unknown outcome" in text
