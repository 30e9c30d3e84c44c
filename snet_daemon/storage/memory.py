"""In-process :class:`~snet_daemon.storage.base.AtomicStorage`.

Two uses: the store behind ``payment_channel_storage_type`` values other than
``etcd`` (a single daemon whose payment state need not survive a restart),
and the fake every payment test runs on.  For the second use it must behave
like etcd in everything the contract promises -- store-wide revisions,
conditions, leases whose keys vanish on expiry -- so that code tested here
behaves the same against etcd; the contract suite checks both.

Time comes from an injected ``now`` (the reactor's ``seconds`` in the daemon,
a settable fake in tests).  Lease expiry is evaluated lazily at the start of
every operation, so nothing is scheduled and advancing a fake clock is all a
test needs to do.

Every method runs to completion without awaiting, so each operation is atomic
with respect to other tasks on the loop, as one etcd request is.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from snet_daemon.storage.base import (
    Condition,
    ConditionFailed,
    Delete,
    Entry,
    Lease,
    LeaseNotFound,
    Op,
    Put,
    check_key,
    check_transaction,
    unique_keys,
)

__all__ = ["MemoryStorage"]


@dataclass(slots=True)
class _Lease:
    ttl: int
    expires_at: float
    keys: set[str] = field(default_factory=set)


class MemoryStorage:
    """A dict with revisions and leases.

    Args:
        now: Returns the current time in seconds (monotonic is best).
    """

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._data: dict[str, Entry] = {}
        self._leases: dict[int, _Lease] = {}
        # etcd's first write gets revision 2 (revision 1 is the empty store);
        # starting at 1 here keeps "0 means absent" and "> 0 means present".
        self._revision = 1
        # Lease ids look like etcd's (large, non-sequential-looking) only to
        # catch code that assumes small ids; they are still unique.
        self._lease_ids = itertools.count(0x5E7D_0000_0001)

    @property
    def revision(self) -> int:
        """The store's current revision (for tests and diagnostics)."""
        self._expire()
        return self._revision

    # -- reads ------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        check_key(key)
        self._expire()
        return self._data.get(key)

    async def get_many(self, keys: Sequence[str]) -> dict[str, Entry | None]:
        for key in keys:
            check_key(key)
        self._expire()
        return {key: self._data.get(key) for key in keys}

    async def get_prefix(self, prefix: str) -> list[Entry]:
        self._expire()
        return [self._data[key] for key in sorted(self._data) if key.startswith(prefix)]

    # -- writes -----------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        check_key(key)
        self._expire()
        self._require_lease(lease)
        self._revision += 1
        self._write(key, value, lease)
        return self._revision

    async def put_if_absent(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        check_key(key)
        self._expire()
        if key in self._data:
            return False
        self._require_lease(lease)
        self._revision += 1
        self._write(key, value, lease)
        return True

    async def compare_and_swap(self, key: str, expected: bytes, new: bytes, *, lease: int = 0) -> bool:
        check_key(key)
        self._expire()
        current = self._data.get(key)
        if current is None or current.value != expected:
            return False
        self._require_lease(lease)
        self._revision += 1
        self._write(key, new, lease)
        return True

    async def delete(self, key: str) -> bool:
        check_key(key)
        self._expire()
        if key not in self._data:
            return False
        self._revision += 1
        self._remove(key)
        return True

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        check_transaction(conditions, ops)
        self._expire()
        if not all(condition.holds_for(self._data.get(condition.key)) for condition in conditions):
            raise ConditionFailed({key: self._data.get(key) for key in unique_keys(conditions)})
        for op in ops:
            if isinstance(op, Put):
                self._require_lease(op.lease)
        # etcd gives a transaction one new revision if it changes anything.
        if any(isinstance(op, Put) or op.key in self._data for op in ops):
            self._revision += 1
        for op in ops:
            if isinstance(op, Put):
                self._write(op.key, op.value, op.lease)
            elif isinstance(op, Delete):
                self._remove(op.key)
        return self._revision

    # -- leases -------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> Lease:
        if ttl <= 0:
            raise ValueError("lease TTL must be positive")
        self._expire()
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(ttl=ttl, expires_at=self._now() + ttl)
        return Lease(id=lease_id, ttl=ttl)

    async def keep_alive(self, lease_id: int) -> int:
        self._expire()
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(lease_id)
        lease.expires_at = self._now() + lease.ttl
        return lease.ttl

    async def revoke_lease(self, lease_id: int) -> None:
        self._expire()
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            self._drop_keys(lease)

    async def close(self) -> None:
        """Nothing to release; the data stays readable (handy in tests)."""

    # -- internals ------------------------------------------------------------------

    def _require_lease(self, lease_id: int) -> None:
        if lease_id and lease_id not in self._leases:
            raise LeaseNotFound(lease_id)

    def _write(self, key: str, value: bytes, lease_id: int) -> None:
        """Store one key at the current revision (the caller has bumped it)."""
        old = self._data.get(key)
        if old is not None and old.lease and old.lease != lease_id and old.lease in self._leases:
            # A put moves the key to the new lease (or to none), as in etcd.
            self._leases[old.lease].keys.discard(key)
        if lease_id:
            self._leases[lease_id].keys.add(key)
        self._data[key] = Entry(
            key=key,
            value=bytes(value),
            mod_revision=self._revision,
            create_revision=self._revision if old is None else old.create_revision,
            version=1 if old is None else old.version + 1,
            lease=lease_id,
        )

    def _remove(self, key: str) -> None:
        old = self._data.pop(key)
        if old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)

    def _drop_keys(self, lease: _Lease) -> None:
        """Delete a dead lease's keys in one revision, as etcd's revoke does."""
        if lease.keys:
            self._revision += 1
            for key in lease.keys:
                self._data.pop(key, None)
            lease.keys.clear()

    def _expire(self) -> None:
        """Remove leases whose time is up, and their keys."""
        if not self._leases:
            return
        now = self._now()
        expired = [lease_id for lease_id, lease in self._leases.items() if lease.expires_at <= now]
        for lease_id in expired:
            self._drop_keys(self._leases.pop(lease_id))
