"""The AtomicStorage contract, run against memory and a real etcd alike.

Every test takes the parametrized ``backend`` fixture, so each runs twice:
on :class:`MemoryStorage` with a fake clock, and on :class:`EtcdStorage`
talking to a real etcd server (Debian's ``etcd-server``) on a loopback port.
Tests that share the module's etcd stay apart by using a unique key prefix.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from snet_daemon.storage.base import (
    AtomicStorage,
    Condition,
    ConditionFailed,
    Delete,
    Entry,
    LeaseNotFound,
    Put,
)
from snet_daemon.storage.etcd import EtcdStorage
from snet_daemon.storage.memory import MemoryStorage
from tests.support.aio import aio_fixture, aio_test
from tests.support.etcd import EtcdServer, etcd_server

__all__ = ["etcd_server"]  # the module-scoped fixture, imported for pytest

#: etcd's minimum lease TTL with default server timing is about 2 s.
TTL = 2


class FakeClock:
    """A settable clock for the memory backend."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """One storage under test, plus how to let time pass for it."""

    name: str
    storage: AtomicStorage
    prefix: str
    elapse: Callable[[float], Awaitable[None]]

    def key(self, name: str) -> str:
        """A key private to the running test."""
        return self.prefix + name


def present(entry: Entry | None) -> Entry:
    """The entry, which must exist."""
    assert entry is not None
    return entry


@pytest.fixture(params=["memory", "etcd"])
def backend_kind(request: pytest.FixtureRequest) -> str | None:
    """``None`` for memory, else the URL of the module's etcd."""
    if request.param == "memory":
        return None
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return server.url


@aio_fixture
async def backend(backend_kind: str | None) -> AsyncIterator[Backend]:
    """A storage on the parametrized backend, with a unique key prefix."""
    prefix = f"contract/{uuid.uuid4().hex}/"
    if backend_kind is None:
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.now += seconds

        yield Backend("memory", MemoryStorage(clock), prefix, advance)
        return
    storage = EtcdStorage([backend_kind], request_timeout=5.0)
    try:
        yield Backend("etcd", storage, prefix, asyncio.sleep)
    finally:
        await storage.close()


# ---------------------------------------------------------------------------
# get / put


@aio_test
async def test_get_absent_key_is_none(backend: Backend) -> None:
    """Reading a key that was never written gives None."""
    assert await backend.storage.get(backend.key("nothing")) is None


@aio_test
async def test_put_then_get_returns_value_and_revisions(backend: Backend) -> None:
    """A put is read back with its value, the put's revision, version 1 and no lease."""
    key = backend.key("a")
    revision = await backend.storage.put(key, b"one")
    entry = await backend.storage.get(key)
    assert entry is not None
    assert (entry.key, entry.value, entry.version, entry.lease) == (key, b"one", 1, 0)
    assert entry.mod_revision == entry.create_revision == revision > 0


@aio_test
async def test_second_put_bumps_mod_revision_and_version_only(backend: Backend) -> None:
    """Overwriting keeps the create revision and raises the mod revision and version."""
    key = backend.key("a")
    first = await backend.storage.put(key, b"one")
    second = await backend.storage.put(key, b"two")
    entry = await backend.storage.get(key)
    assert entry is not None
    assert second > first
    assert (entry.value, entry.create_revision, entry.mod_revision, entry.version) == (b"two", first, second, 2)


@aio_test
async def test_revisions_increase_across_keys(backend: Backend) -> None:
    """Revisions are store-wide: writes to different keys get increasing revisions."""
    revisions = [await backend.storage.put(backend.key(f"k{i}"), b"v") for i in range(5)]
    assert revisions == sorted(set(revisions))


@aio_test
async def test_values_are_arbitrary_bytes(backend: Backend) -> None:
    """Values round-trip byte for byte, including NULs, high bytes and the empty value."""
    for index, value in enumerate([b"", b"\x00\xff\x80gob\x00", bytes(range(256)) * 40]):
        key = backend.key(f"bin{index}")
        await backend.storage.put(key, value)
        entry = await backend.storage.get(key)
        assert entry is not None
        assert entry.value == value


@aio_test
async def test_keys_may_contain_any_text(backend: Backend) -> None:
    """Keys with spaces, braces, double slashes and non-ASCII round-trip (Go's layout needs the first three)."""
    key = backend.key("M//payment-channel/storage/{ID: 42}/é")
    await backend.storage.put(key, b"v")
    [entry] = await backend.storage.get_prefix(backend.key("M//"))
    assert entry.key == key


@aio_test
async def test_empty_key_is_rejected(backend: Backend) -> None:
    """An empty key is a ValueError on every backend (etcd refuses it too)."""
    with pytest.raises(ValueError):
        await backend.storage.put("", b"v")
    with pytest.raises(ValueError):
        await backend.storage.get("")


# ---------------------------------------------------------------------------
# get_many / get_prefix


@aio_test
async def test_get_many_returns_every_requested_key(backend: Backend) -> None:
    """get_many maps every requested key to its entry, absent ones to None."""
    a, b, missing = backend.key("a"), backend.key("b"), backend.key("missing")
    await backend.storage.put(a, b"1")
    await backend.storage.put(b, b"2")
    result = await backend.storage.get_many([a, missing, b])
    assert set(result) == {a, b, missing}
    assert result[missing] is None
    assert present(result[a]).value == b"1"
    assert present(result[b]).value == b"2"
    assert await backend.storage.get_many([]) == {}


@aio_test
async def test_get_prefix_returns_only_matching_keys_sorted(backend: Backend) -> None:
    """get_prefix returns the keys under the prefix, sorted, and nothing else."""
    for name in ["dir/c", "dir/a", "dir/b", "dirx", "other/a"]:
        await backend.storage.put(backend.key(name), name.encode())
    entries = await backend.storage.get_prefix(backend.key("dir/"))
    assert [entry.key for entry in entries] == [backend.key(n) for n in ["dir/a", "dir/b", "dir/c"]]
    assert [entry.value for entry in entries] == [b"dir/a", b"dir/b", b"dir/c"]
    assert await backend.storage.get_prefix(backend.key("none/")) == []


@aio_test
async def test_get_prefix_empty_means_whole_store(backend: Backend) -> None:
    """The empty prefix selects every key in the store (Go's GetByKeyPrefix(""))."""
    await backend.storage.put(backend.key("x"), b"1")
    await backend.storage.put(backend.key("y\U0010ffff"), b"2")
    keys = [entry.key for entry in await backend.storage.get_prefix("")]
    assert keys == sorted(keys, key=lambda key: key.encode())
    assert {backend.key("x"), backend.key("y\U0010ffff")} <= set(keys)


# ---------------------------------------------------------------------------
# put_if_absent / compare_and_swap / delete


@aio_test
async def test_put_if_absent_writes_only_once(backend: Backend) -> None:
    """put_if_absent succeeds on an absent key and leaves an existing one untouched."""
    key = backend.key("lock")
    assert await backend.storage.put_if_absent(key, b"first") is True
    assert await backend.storage.put_if_absent(key, b"second") is False
    entry = await backend.storage.get(key)
    assert entry is not None
    assert (entry.value, entry.version) == (b"first", 1)


@aio_test
async def test_compare_and_swap(backend: Backend) -> None:
    """CAS swaps only when the current value matches; an absent key never matches."""
    key = backend.key("state")
    assert await backend.storage.compare_and_swap(key, b"", b"x") is False
    assert await backend.storage.get(key) is None
    await backend.storage.put(key, b"unlocked")
    assert await backend.storage.compare_and_swap(key, b"locked", b"x") is False
    assert await backend.storage.compare_and_swap(key, b"unlocked", b"locked") is True
    entry = await backend.storage.get(key)
    assert entry is not None
    assert entry.value == b"locked"


@aio_test
async def test_delete(backend: Backend) -> None:
    """delete removes a key and says whether it existed; re-creating starts a new life."""
    key = backend.key("gone")
    first = await backend.storage.put(key, b"v")
    await backend.storage.put(key, b"w")
    assert await backend.storage.delete(key) is True
    assert await backend.storage.get(key) is None
    assert await backend.storage.delete(key) is False
    await backend.storage.put(key, b"again")
    entry = await backend.storage.get(key)
    assert entry is not None
    assert entry.version == 1
    assert entry.create_revision > first


# ---------------------------------------------------------------------------
# transactions


@aio_test
async def test_transaction_applies_when_reads_are_unchanged(backend: Backend) -> None:
    """The payment pattern: read N keys, write M keys if none changed and a hold is absent."""
    state, other, hold = backend.key("state"), backend.key("other"), backend.key("hold")
    await backend.storage.put(state, b"s1")
    await backend.storage.put(other, b"o1")
    seen = await backend.storage.get_many([state, other, hold])
    revision = await backend.storage.transaction(
        [Condition.unchanged(key, entry) for key, entry in seen.items()],
        [Put(state, b"s2"), Delete(other), Put(backend.key("new"), b"n")],
    )
    after = await backend.storage.get_many([state, other, backend.key("new")])
    assert after[other] is None
    assert (present(after[state]).value, present(after[state]).mod_revision) == (b"s2", revision)
    assert after[backend.key("new")] is not None


@aio_test
async def test_transaction_fails_on_changed_key_and_reports_current_state(backend: Backend) -> None:
    """A stale read makes the transaction fail, write nothing, and return the fresh entries."""
    state, hold, extra = backend.key("state"), backend.key("hold"), backend.key("extra")
    await backend.storage.put(state, b"s1")
    seen = await backend.storage.get(state)
    newer = await backend.storage.put(state, b"s1-by-someone-else")
    with pytest.raises(ConditionFailed) as failed:
        await backend.storage.transaction(
            [Condition.unchanged(state, seen), Condition.absent(hold)],
            [Put(state, b"mine"), Put(extra, b"x")],
        )
    current = failed.value.current
    assert set(current) == {state, hold}
    assert current[hold] is None
    fresh = present(current[state])
    assert (fresh.value, fresh.mod_revision) == (b"s1-by-someone-else", newer)
    assert await backend.storage.get(extra) is None
    entry = await backend.storage.get(state)
    assert entry is not None
    assert entry.value == b"s1-by-someone-else"


@aio_test
async def test_transaction_absent_condition_fails_when_key_exists(backend: Backend) -> None:
    """Condition.absent fails once the key exists (a hold taken by another daemon)."""
    hold = backend.key("hold")
    await backend.storage.put(hold, b"daemon-a")
    with pytest.raises(ConditionFailed) as failed:
        await backend.storage.transaction([Condition.absent(hold)], [Put(hold, b"daemon-b")])
    entry = failed.value.current[hold]
    assert entry is not None
    assert entry.value == b"daemon-a"


@aio_test
async def test_transaction_unchanged_absent_key_fails_once_created(backend: Backend) -> None:
    """Condition.unchanged on a key read as absent fails once someone creates it."""
    key = backend.key("k")
    seen = await backend.storage.get(key)
    await backend.storage.put(key, b"created")
    with pytest.raises(ConditionFailed):
        await backend.storage.transaction([Condition.unchanged(key, seen)], [Put(key, b"mine")])


@aio_test
async def test_transaction_value_condition(backend: Backend) -> None:
    """Condition.has_value holds only for a present key with exactly that value."""
    key = backend.key("k")
    with pytest.raises(ConditionFailed):
        await backend.storage.transaction([Condition.has_value(key, b"")], [Put(key, b"x")])
    await backend.storage.put(key, b"unlocked")
    with pytest.raises(ConditionFailed):
        await backend.storage.transaction([Condition.has_value(key, b"locked")], [Put(key, b"x")])
    await backend.storage.transaction([Condition.has_value(key, b"unlocked")], [Put(key, b"locked")])
    entry = await backend.storage.get(key)
    assert entry is not None
    assert entry.value == b"locked"


@aio_test
async def test_transaction_without_conditions_applies_atomically(backend: Backend) -> None:
    """With no conditions every op is applied, all at one revision."""
    a, b = backend.key("a"), backend.key("b")
    revision = await backend.storage.transaction([], [Put(a, b"1"), Put(b, b"2")])
    result = await backend.storage.get_many([a, b])
    assert [entry.mod_revision for entry in result.values() if entry is not None] == [revision, revision]


@aio_test
async def test_transaction_rejects_duplicate_keys(backend: Backend) -> None:
    """Two ops on one key are a ValueError (etcd refuses such a txn) and nothing is written."""
    key = backend.key("dup")
    with pytest.raises(ValueError):
        await backend.storage.transaction([], [Put(key, b"1"), Delete(key)])
    assert await backend.storage.get(key) is None


# ---------------------------------------------------------------------------
# contention


@aio_test
async def test_fifty_concurrent_conditional_writers_exactly_one_wins(backend: Backend) -> None:
    """50 writers read the same revision and race their transactions: one wins, 49 see ConditionFailed."""
    key = backend.key("channel")
    await backend.storage.put(key, b"0")
    reads = await asyncio.gather(*(backend.storage.get(key) for _ in range(50)))

    async def write(index: int) -> bool:
        try:
            await backend.storage.transaction(
                [Condition.unchanged(key, reads[index])], [Put(key, f"writer-{index}".encode())]
            )
        except ConditionFailed:
            return False
        return True

    results = await asyncio.gather(*(write(index) for index in range(50)))
    assert results.count(True) == 1
    entry = await backend.storage.get(key)
    assert entry is not None
    assert entry.value == f"writer-{results.index(True)}".encode()


@aio_test
async def test_fifty_concurrent_put_if_absent_exactly_one_wins(backend: Backend) -> None:
    """50 concurrent put_if_absent calls on one key: exactly one succeeds."""
    key = backend.key("lock")
    results = await asyncio.gather(*(backend.storage.put_if_absent(key, str(i).encode()) for i in range(50)))
    assert results.count(True) == 1
    entry = await backend.storage.get(key)
    assert entry is not None
    assert entry.value == str(results.index(True)).encode()


@aio_test
async def test_concurrent_increments_with_retry_lose_nothing(backend: Backend) -> None:
    """20 tasks each add 1 with read-CAS-retry; the counter ends at exactly 20."""
    key = backend.key("counter")
    await backend.storage.put(key, b"0")

    async def increment() -> None:
        entry = await backend.storage.get(key)
        while True:
            assert entry is not None
            try:
                await backend.storage.transaction(
                    [Condition.unchanged(key, entry)], [Put(key, str(int(entry.value) + 1).encode())]
                )
                return
            except ConditionFailed as failed:
                entry = failed.current[key]  # no extra read needed

    await asyncio.gather(*(increment() for _ in range(20)))
    entry = await backend.storage.get(key)
    assert entry is not None
    assert entry.value == b"20"


# ---------------------------------------------------------------------------
# leases


@aio_test
async def test_lease_attach_keep_alive_revoke(backend: Backend) -> None:
    """A leased key records its lease; revoking the lease deletes the key."""
    lease = await backend.storage.grant_lease(TTL)
    assert lease.id != 0
    assert lease.ttl >= TTL
    key = backend.key("held")
    await backend.storage.put(key, b"v", lease=lease.id)
    entry = await backend.storage.get(key)
    assert entry is not None
    assert entry.lease == lease.id
    assert await backend.storage.keep_alive(lease.id) >= TTL
    await backend.storage.revoke_lease(lease.id)
    assert await backend.storage.get(key) is None
    await backend.storage.revoke_lease(lease.id)  # already gone: not an error


@aio_test
async def test_dead_lease_is_reported(backend: Backend) -> None:
    """keep_alive and puts naming a revoked lease raise LeaseNotFound, and nothing is written."""
    lease = await backend.storage.grant_lease(TTL)
    await backend.storage.revoke_lease(lease.id)
    key = backend.key("k")
    with pytest.raises(LeaseNotFound) as failed:
        await backend.storage.keep_alive(lease.id)
    assert failed.value.lease_id == lease.id
    with pytest.raises(LeaseNotFound):
        await backend.storage.put(key, b"v", lease=lease.id)
    with pytest.raises(LeaseNotFound):
        await backend.storage.transaction([Condition.absent(key)], [Put(key, b"v", lease=lease.id)])
    with pytest.raises(LeaseNotFound):
        await backend.storage.put_if_absent(key, b"v", lease=lease.id)
    assert await backend.storage.get(key) is None


@aio_test
async def test_put_without_lease_detaches_key(backend: Backend) -> None:
    """Re-putting a leased key without a lease detaches it: it survives the lease."""
    lease = await backend.storage.grant_lease(TTL)
    key = backend.key("k")
    await backend.storage.put(key, b"held", lease=lease.id)
    await backend.storage.put(key, b"kept")
    await backend.storage.revoke_lease(lease.id)
    entry = await backend.storage.get(key)
    assert entry is not None
    assert (entry.value, entry.lease) == (b"kept", 0)


@aio_test
async def test_lease_expiry_removes_keys_unless_kept_alive(backend: Backend) -> None:
    """Keys of a kept-alive lease stay; once refreshes stop they vanish after the TTL."""
    lease = await backend.storage.grant_lease(TTL)
    hold, state = backend.key("hold"), backend.key("state")
    await backend.storage.transaction(
        [Condition.absent(hold)], [Put(hold, b"daemon-a", lease=lease.id), Put(state, b"s")]
    )
    for _ in range(6):  # 6 x 0.5 s > TTL: only the refreshes keep it
        await backend.elapse(0.5)
        await backend.storage.keep_alive(lease.id)
    assert await backend.storage.get(hold) is not None
    await backend.elapse(TTL + 2.0)  # etcd checks expiry every 500 ms
    assert await backend.storage.get(hold) is None
    assert await backend.storage.get(state) is not None  # unleased keys are not touched
    with pytest.raises(LeaseNotFound):
        await backend.storage.keep_alive(lease.id)
    # The channel is free again: another daemon can take the hold.
    assert await backend.storage.put_if_absent(hold, b"daemon-b") is True


@aio_test
async def test_leases_are_independent(backend: Backend) -> None:
    """Revoking one lease leaves another lease's keys alone."""
    one, two = await backend.storage.grant_lease(TTL), await backend.storage.grant_lease(TTL)
    assert one.id != two.id
    await backend.storage.put(backend.key("one"), b"1", lease=one.id)
    await backend.storage.put(backend.key("two"), b"2", lease=two.id)
    await backend.storage.revoke_lease(one.id)
    assert await backend.storage.get(backend.key("one")) is None
    assert await backend.storage.get(backend.key("two")) is not None
    await backend.storage.revoke_lease(two.id)


@aio_test
async def test_lease_ttl_must_be_positive(backend: Backend) -> None:
    """A zero TTL is a ValueError on every backend."""
    with pytest.raises(ValueError):
        await backend.storage.grant_lease(0)


def test_backends_satisfy_the_protocol() -> None:
    """Both implementations are AtomicStorage (structural check of every method)."""
    assert isinstance(MemoryStorage(lambda: 0.0), AtomicStorage)
    assert isinstance(EtcdStorage(["http://127.0.0.1:1"]), AtomicStorage)
