"""The storage contract: :class:`AtomicStorage`, its value types and errors.

Payment state is a handful of small values per channel that several daemons
of one payment group read and write concurrently.  Correctness rests on one
idea, etcd's: every key carries the *revision* of its last modification, and
a write can be made conditional on those revisions.  A payment is then

1. one read of the keys it depends on (:meth:`AtomicStorage.get_many`),
   remembering their revisions, and
2. one :meth:`AtomicStorage.transaction` whose conditions say "none of those
   keys changed since" (and "this hold key is still absent"), writing the
   new state only if they hold.

With the state cached from the caller's own last write, step 1 is skipped
in steady state (the escrow ledger makes one round trip per paid call), and
two daemons can never both accept a payment computed from the same state:
the second transaction fails with :class:`ConditionFailed`, which carries
the fresh values so the caller can re-check without a third read.

Leases make "held while this daemon is alive" possible: a key put with a
lease disappears when the lease expires, so an in-flight payment held by a
daemon that was killed frees its channel within the lease TTL.  One daemon
instance keeps one lease alive (:class:`~snet_daemon.storage.lease.LeaseKeeper`).

Keys are ``str`` (the Go daemon's keys are strings, see
:mod:`snet_daemon.storage.keys`); values are ``bytes`` whose encoding belongs
to the caller.  Both implementations (:mod:`.memory`, :mod:`.etcd`) pass the
same contract test suite.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol, runtime_checkable

__all__ = [
    "AtomicStorage",
    "Condition",
    "ConditionFailed",
    "Delete",
    "Entry",
    "Lease",
    "LeaseNotFound",
    "Op",
    "Put",
    "StorageError",
    "StorageSetupError",
    "StorageTimeout",
    "StorageUnavailable",
    "check_key",
    "check_transaction",
]


# ---------------------------------------------------------------------------
# Errors


class StorageSetupError(Exception):
    """Storage cannot be set up as configured (missing etcd binary, unreadable
    TLS files, bad endpoint...).  Fatal at startup; the message says what to
    change.  Not a :class:`StorageError`: nothing was attempted at run time."""


class StorageError(Exception):
    """Base of every storage failure; the message is safe to log."""


class ConditionFailed(StorageError):
    """A transaction's conditions did not hold, so nothing was written.

    This is the normal outcome of losing a race, not a fault.

    Attributes:
        current: For every key the transaction compared, its entry at the
            moment the conditions were evaluated (``None`` for an absent
            key).  It is read in the same round trip as the failed write, so
            a caller can decide whether to retry without reading again.
    """

    def __init__(self, current: Mapping[str, Entry | None]) -> None:
        super().__init__(f"transaction conditions failed on {len(current)} key(s)")
        self.current: Mapping[str, Entry | None] = MappingProxyType(dict(current))


class StorageUnavailable(StorageError):
    """The storage could not be reached or refused to serve the request.

    The request was not applied, as far as the client can tell (for etcd:
    the server was unreachable, had no leader, or is out of space).  It is
    safe to retry later.
    """


class StorageTimeout(StorageError):
    """The request did not complete within the request timeout.

    For a write the outcome is **unknown**: it may have been applied.  A
    caller that must know re-reads the keys it wrote (a conditional write
    that did apply shows up as the caller's own value).
    """


class LeaseNotFound(StorageError):
    """The lease does not exist: it expired, was revoked, or never existed.

    Raised by :meth:`AtomicStorage.keep_alive` and by any put that names the
    lease.  Whatever the lease held is gone; the holder must grant a new
    lease and re-establish what it held.
    """

    def __init__(self, lease_id: int) -> None:
        super().__init__(f"lease {lease_id:#x} not found (expired or revoked)")
        self.lease_id = lease_id


# ---------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class Entry:
    """One key as stored.

    Attributes:
        key: The key.
        value: The value.
        mod_revision: Store revision of the key's last modification; the
            token conditions compare against.  Always > 0 for a present key.
        create_revision: Store revision at which the key was (last) created.
        version: Number of modifications since creation (1 after the first
            put; a delete resets it).
        lease: Lease the key is attached to, 0 for none.
    """

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease.

    Attributes:
        id: The lease id, to pass as ``lease=`` when putting keys.
        ttl: Granted time to live in seconds (etcd may round a short request
            up to its minimum, about 2 s with default server settings).
    """

    id: int
    ttl: int


@dataclass(frozen=True, slots=True)
class Condition:
    """A precondition of :meth:`AtomicStorage.transaction` on one key.

    Exactly one of ``mod_revision`` and ``value`` is set.  Build conditions
    with the class methods rather than the constructor.

    Attributes:
        key: The key compared.
        mod_revision: The key's modification revision must equal this; 0
            means the key must be absent.
        value: The key must be present with exactly this value.
    """

    key: str
    mod_revision: int | None = None
    value: bytes | None = None

    def __post_init__(self) -> None:
        if (self.mod_revision is None) == (self.value is None):
            raise ValueError("a Condition compares either mod_revision or value, exactly one of them")
        if self.mod_revision is not None and self.mod_revision < 0:
            raise ValueError("mod_revision must be >= 0")
        check_key(self.key)

    @classmethod
    def absent(cls, key: str) -> Condition:
        """The key must not exist."""
        return cls(key, mod_revision=0)

    @classmethod
    def unchanged(cls, key: str, entry: Entry | None) -> Condition:
        """The key must still be as it was read: same revision, or still absent.

        Args:
            key: The key.
            entry: What a previous read returned for it (``None``: absent).
        """
        return cls(key, mod_revision=0 if entry is None else entry.mod_revision)

    @classmethod
    def has_value(cls, key: str, value: bytes) -> Condition:
        """The key must exist and hold exactly ``value``."""
        return cls(key, value=bytes(value))

    def holds_for(self, entry: Entry | None) -> bool:
        """Evaluate the condition against the key's current entry."""
        if self.value is not None:
            return entry is not None and entry.value == self.value
        return (0 if entry is None else entry.mod_revision) == self.mod_revision


@dataclass(frozen=True, slots=True)
class Put:
    """Transaction operation: set ``key`` to ``value``, attached to ``lease`` (0: none)."""

    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    """Transaction operation: delete ``key`` (no error if it is absent)."""

    key: str


#: An operation of a transaction's write set.
Op = Put | Delete


def check_key(key: str) -> None:
    """Reject keys etcd would reject, identically in every implementation.

    Raises:
        ValueError: The key is empty (etcd: "key is not provided").
        TypeError: The key is not a ``str``.
    """
    if not isinstance(key, str):
        raise TypeError(f"storage keys are str, not {type(key).__name__}")
    if not key:
        raise ValueError("storage key must not be empty")


def check_transaction(conditions: Sequence[Condition], ops: Sequence[Op]) -> None:
    """Validate a transaction the way etcd would, before sending it.

    Raises:
        ValueError: Two operations name the same key (etcd refuses a txn
            with "duplicate key given in txn request"), or a key is empty.
    """
    seen: set[str] = set()
    for op in ops:
        check_key(op.key)
        if op.key in seen:
            raise ValueError(f"key {op.key!r} appears twice in one transaction")
        seen.add(op.key)
    for condition in conditions:
        check_key(condition.key)


def unique_keys(conditions: Iterable[Condition]) -> list[str]:
    """The keys of ``conditions``, first occurrence order, no duplicates."""
    return list(dict.fromkeys(condition.key for condition in conditions))


# ---------------------------------------------------------------------------
# The protocol


@runtime_checkable
class AtomicStorage(Protocol):
    """A key-value store with revisions, conditional writes and leases.

    Every method is a coroutine run on the reactor's asyncio loop.  Besides
    the errors listed per method, any method may raise
    :class:`StorageUnavailable` (not applied) or :class:`StorageTimeout`
    (outcome unknown for writes), and ``ValueError`` / ``TypeError`` for an
    invalid argument (empty key, duplicate keys in one transaction).

    Revisions are store-wide and increasing: each applied write (put, delete
    of a present key, successful transaction with writes, lease expiry that
    removes keys) gets a revision above every earlier one, and every key it
    touches takes that revision as its ``mod_revision``.  Transactions that
    run concurrently may share one revision (etcd sends them together, see
    :mod:`snet_daemon.storage.batch`); they then touch disjoint keys, so a
    key's ``mod_revision`` still identifies its last write.
    """

    async def get(self, key: str) -> Entry | None:
        """Read one key.

        Returns:
            The entry, or ``None`` if the key is absent.
        """
        ...

    async def get_many(self, keys: Sequence[str]) -> dict[str, Entry | None]:
        """Read several keys in one round trip, as one consistent snapshot.

        Returns:
            Every requested key mapped to its entry, or ``None`` if absent.
        """
        ...

    async def get_prefix(self, prefix: str) -> list[Entry]:
        """Read every key starting with ``prefix`` (``""``: the whole store).

        Returns:
            The entries, sorted by key.
        """
        ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write ``value`` unconditionally.

        Args:
            key: The key.
            value: The value.
            lease: Lease to attach the key to (0: none).

        Returns:
            The store revision of the write (the key's new ``mod_revision``).

        Raises:
            LeaseNotFound: ``lease`` does not exist.
        """
        ...

    async def put_if_absent(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        """Write ``value`` only if ``key`` does not exist.

        Returns:
            True if written, False if the key already existed.

        Raises:
            LeaseNotFound: ``lease`` does not exist (and the key was absent).
        """
        ...

    async def compare_and_swap(self, key: str, expected: bytes, new: bytes, *, lease: int = 0) -> bool:
        """Replace the value with ``new`` only if it currently equals ``expected``.

        An absent key never matches.

        Returns:
            True if swapped, False if the current value differs or is absent.

        Raises:
            LeaseNotFound: ``lease`` does not exist (and the value matched).
        """
        ...

    async def delete(self, key: str) -> bool:
        """Delete ``key``.

        Returns:
            True if the key existed.
        """
        ...

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        """Apply ``ops`` atomically if every condition holds; else apply nothing.

        One round trip.  With no conditions the ops are applied
        unconditionally (still atomically).

        Args:
            conditions: Preconditions, all of which must hold.
            ops: Puts and deletes to apply; each key at most once.

        Returns:
            The store revision after the transaction (the ``mod_revision``
            every put key now has).

        Raises:
            ConditionFailed: A condition did not hold; nothing was written.
                ``current`` holds the compared keys' entries.
            LeaseNotFound: A put names a lease that does not exist (checked
                only when the conditions hold).
        """
        ...

    async def grant_lease(self, ttl: int) -> Lease:
        """Create a lease that expires ``ttl`` seconds from now unless kept alive.

        Keys attached to the lease are deleted when it expires or is revoked.
        """
        ...

    async def keep_alive(self, lease_id: int) -> int:
        """Restart a lease's countdown.

        Returns:
            The lease's TTL in seconds from now.

        Raises:
            LeaseNotFound: The lease expired or was revoked; its keys are gone.
        """
        ...

    async def revoke_lease(self, lease_id: int) -> None:
        """End a lease now, deleting its keys.  Revoking a lease that no
        longer exists is not an error (the outcome is the same)."""
        ...

    async def close(self) -> None:
        """Release connections.  The storage must not be used afterwards."""
        ...
