"""LeaseKeeper: the daemon instance's lease, on MemoryStorage and a fake clock."""

from __future__ import annotations

import asyncio

import pytest
from twisted.internet.task import Clock

from snet_daemon.storage.base import Lease, LeaseNotFound, StorageUnavailable
from snet_daemon.storage.lease import LeaseKeeper
from snet_daemon.storage.memory import MemoryStorage
from tests.support.aio import aio_test


class FlakyStorage(MemoryStorage):
    """MemoryStorage whose lease calls fail while ``down`` (or raise ``bug``)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock.seconds)
        self.down = False
        self.bug = False
        self.keep_alives = 0

    async def keep_alive(self, lease_id: int) -> int:
        self.keep_alives += 1
        if self.bug:
            raise RuntimeError("a bug")
        if self.down:
            raise StorageUnavailable("etcd at http://x is unavailable")
        return await super().keep_alive(lease_id)

    async def grant_lease(self, ttl: int) -> Lease:
        if self.down:
            raise StorageUnavailable("etcd at http://x is unavailable")
        return await super().grant_lease(ttl)


async def settle() -> None:
    """Let the tasks started by clock ticks run to completion."""
    for _ in range(5):
        await asyncio.sleep(0)


async def advance(clock: Clock, seconds: float, step: float = 1.0) -> None:
    """Advance the fake clock in steps, letting each tick's task run."""
    remaining = seconds
    while remaining > 0:
        clock.advance(min(step, remaining))
        remaining -= step
        await settle()


@aio_test
async def test_start_grants_and_ticks_keep_the_lease_alive() -> None:
    """Starting grants a lease; refreshes every TTL/3 keep its keys alive far beyond the TTL."""
    clock = Clock()
    storage = FlakyStorage(clock)
    keeper = LeaseKeeper(storage, clock, ttl=9)
    keeper.startService()
    await settle()
    lease_id = keeper.lease_id
    assert lease_id is not None
    await storage.put("hold", b"me", lease=lease_id)
    await advance(clock, 60)
    assert storage.keep_alives == 20  # every 3 s
    assert await storage.get("hold") is not None
    await keeper.stopService().asFuture(asyncio.get_running_loop())


@aio_test
async def test_stop_revokes_the_lease_so_holds_vanish_at_once() -> None:
    """Stopping revokes the lease: the holds disappear immediately, not after the TTL; ticks stop."""
    clock = Clock()
    storage = FlakyStorage(clock)
    keeper = LeaseKeeper(storage, clock, ttl=10)
    keeper.startService()
    lease_id = await keeper.current()
    await storage.put("hold", b"me", lease=lease_id)
    await keeper.stopService().asFuture(asyncio.get_running_loop())
    assert await storage.get("hold") is None
    assert keeper.lease_id is None
    calls = storage.keep_alives
    await advance(clock, 30)
    assert storage.keep_alives == calls


@aio_test
async def test_failing_ticks_are_logged_and_the_keeper_keeps_going() -> None:
    """Refresh failures (storage down, or a bug) are counted and retried; the loop never dies."""
    clock = Clock()
    storage = FlakyStorage(clock)
    keeper = LeaseKeeper(storage, clock, ttl=30, interval=5)
    keeper.startService()
    await settle()
    lease_id = keeper.lease_id
    storage.down = True
    await advance(clock, 10)  # two failed refreshes; the lease has 20 s left
    storage.down = False
    storage.bug = True
    await advance(clock, 5)
    storage.bug = False
    assert keeper.failures == 3
    before = storage.keep_alives
    await advance(clock, 5)
    assert storage.keep_alives == before + 1
    assert keeper.lease_id == lease_id
    await keeper.stopService().asFuture(asyncio.get_running_loop())


@aio_test
async def test_expired_lease_is_replaced() -> None:
    """When the storage was unreachable for longer than the TTL, the next tick grants a new lease."""
    clock = Clock()
    storage = FlakyStorage(clock)
    keeper = LeaseKeeper(storage, clock, ttl=3)
    keeper.startService()
    await settle()
    old = keeper.lease_id
    assert old is not None
    await storage.put("hold", b"me", lease=old)
    storage.down = True
    await advance(clock, 5)
    storage.down = False
    await advance(clock, 1)
    assert keeper.lease_id not in (None, old)
    assert await storage.get("hold") is None
    with pytest.raises(LeaseNotFound):
        await storage.keep_alive(old)
    await keeper.stopService().asFuture(asyncio.get_running_loop())


@aio_test
async def test_current_shares_one_grant_and_lost_forces_a_new_one() -> None:
    """Concurrent current() calls share one grant; lost() of the current id makes the next call grant anew."""
    clock = Clock()
    storage = MemoryStorage(clock.seconds)
    keeper = LeaseKeeper(storage, clock, ttl=10)
    ids = await asyncio.gather(*(keeper.current() for _ in range(10)))
    assert len(set(ids)) == 1
    keeper.lost(ids[0] + 1)  # stale report: ignored
    assert await keeper.current() == ids[0]
    keeper.lost(ids[0])
    assert await keeper.current() != ids[0]


def test_ttl_must_be_positive() -> None:
    """A zero TTL is refused at construction."""
    with pytest.raises(ValueError):
        LeaseKeeper(MemoryStorage(lambda: 0.0), Clock(), ttl=0)
