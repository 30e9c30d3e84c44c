"""Tagged writes: telling whether a conditional write whose reply was lost happened.

A write to storage can time out after it was applied (etcd committed it, the
answer never came back).  For a payment that is not a detail: refusing the
call while the write landed charges a client for nothing, and serving it
while the write did not land serves it unpaid.

So values written this way carry the last few writes that made them, newest
first, each as an 8-byte tag unique to the write and the 8-byte revision the
write was conditioned on (0: the key was absent)::

    ... value ... | (tag (8) | parent revision (8)) x up to HISTORY

Each write is conditioned on the revision it read, so the first write after
revision R is the only one that can have been ours.  If it is ours the write
happened; if another's (another daemon, or our own next write), ours never
will; and if nothing was written since R, a no-op write conditioned on R
(the *fence*) makes sure ours never lands.  The value alone cannot tell:
another writer may have written the same value.

:func:`write` makes such a write and settles it when its reply is lost.
Settling is about one write, whatever it stands for: a free-call counter
write may count several calls and give others back at once
(:mod:`snet_daemon.payments.counters`), and they all share its outcome.  It
needs a fresh tag for every write, retries included.  A write it cannot
settle yet (storage keeps failing) raises :class:`LostWrite`, which names
the write, so that its writer can :func:`settle` it later; until then it
must not write the key again (its own writes would push ours out of the
history).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Final

from snet_daemon.storage.base import (
    AtomicStorage,
    Condition,
    ConditionFailed,
    Entry,
    Put,
    StorageError,
    StorageTimeout,
)

#: Writes remembered in a value.
HISTORY: Final = 8
#: Bytes of one remembered write.
RECORD: Final = 16
#: Reads (and fencing writes) spent settling one write.
SETTLE_TRIES: Final = 4

History = list[tuple[bytes, int]]


def encode_history(history: Sequence[tuple[bytes, int]]) -> bytes:
    """The newest :data:`HISTORY` writes of ``history`` (newest first), encoded."""
    return b"".join(tag + parent.to_bytes(8, "big") for tag, parent in history[:HISTORY])


def decode_history(data: bytes) -> History:
    """The writes encoded by :func:`encode_history` (``data`` is a multiple of 16 bytes)."""
    return [(data[i : i + 8], int.from_bytes(data[i + 8 : i + RECORD], "big")) for i in range(0, len(data), RECORD)]


class Tags:
    """Tags for one writer's writes: a random start, then one more per write."""

    def __init__(self) -> None:
        self._last = int.from_bytes(os.urandom(8), "big")

    def next(self) -> bytes:
        self._last = (self._last + 1) & 0xFFFF_FFFF_FFFF_FFFF
        return self._last.to_bytes(8, "big")


class LostWrite(StorageTimeout):
    """A tagged write whose reply was lost and whose outcome could not be told yet.

    Attributes:
        tag: the write's tag, and
        parent: the revision it was conditioned on: :func:`settle`'s arguments.
    """

    def __init__(self, message: str, tag: bytes, parent: int) -> None:
        super().__init__(message)
        self.tag = tag
        self.parent = parent


#: Returned as the entry last read when no read succeeded.
UNREAD: Final = object()


async def settle(
    storage: AtomicStorage,
    key: str,
    tag: bytes,
    parent: int,
    *,
    history: Callable[[Entry | None], History],
    fence: Callable[[Entry | None], bytes],
    sleep: Callable[[float], object],
) -> tuple[bool | None, object]:
    """Whether our write ``tag`` to ``key`` (conditioned on revision
    ``parent``) happened, after its reply was lost.

    Args:
        history: The writes recorded in an entry's value (newest first).
        fence: The value to write when nothing was written since
            ``parent``: the entry's own value with one more write recorded
            (a fresh tag, conditioned on ``parent``).
        sleep: Waits between tries (injected: tests run on a fake clock).

    Returns:
        True (it did), False (it did not and never will), or None (could
        not tell: storage kept failing, or more writes since than a value
        remembers), and the entry last read (:data:`UNREAD` if none; after
        a fence, also :data:`UNREAD`: its revision is not known).
    """
    current: object = UNREAD
    for attempt in range(SETTLE_TRIES):
        if attempt:
            await sleep(0.05 * attempt)  # type: ignore[misc]
        try:
            entry = await storage.get(key)
        except StorageError:
            continue
        current = entry
        revision = 0 if entry is None else entry.mod_revision
        if revision != parent:
            # Written since: by us if ours is the first write after parent.
            for written_tag, written_parent in history(entry):
                if written_parent == parent:
                    return written_tag == tag, entry
            return None, entry
        # Nothing written since: a write conditioned on ``parent`` too makes
        # sure ours never lands.
        try:
            await storage.transaction([Condition.unchanged(key, entry)], [Put(key, fence(entry))])
        except ConditionFailed:
            continue  # something landed meanwhile (ours, perhaps): look again
        except StorageError:
            continue
        return False, UNREAD
    return None, current


async def write(
    storage: AtomicStorage,
    key: str,
    entry: Entry | None,
    amount: int,
    *,
    tags: Tags,
    encode: Callable[[int, Sequence[tuple[bytes, int]]], bytes],
    decode: Callable[[Entry | None], int],
    history: Callable[[Entry | None], History],
    sleep: Callable[[float], object],
) -> tuple[bool, object, bool]:
    """Write ``amount`` to ``key`` if it still is ``entry``, as a tagged write; settle a lost reply.

    Args:
        encode: a value of an amount and the writes that made it (newest first).
        decode: the amount of an entry.
        history: the writes recorded in an entry (newest first).

    Returns:
        Whether it was written, the entry last known (the one now stored
        when written, the one found when not; :data:`UNREAD` when not
        known), and whether the reply was lost and the outcome settled.

    Raises:
        LostWrite: the reply was lost and whether the write happened
            cannot be told (yet, or ever: more writes since than a value
            remembers).
        StorageError: storage failed (nothing was written).
    """
    tag = tags.next()
    parent = 0 if entry is None else entry.mod_revision
    value = encode(amount, [(tag, parent), *history(entry)])

    def fence(found: Entry | None) -> bytes:
        return encode(decode(found), [(tags.next(), parent), *history(found)])

    try:
        revision = await storage.transaction([Condition.unchanged(key, entry)], [Put(key, value)])
    except ConditionFailed as failed:
        return False, failed.current.get(key), False
    except StorageTimeout as lost:
        written, after = await settle(storage, key, tag, parent, history=history, fence=fence, sleep=sleep)
        if written is None:
            raise LostWrite(str(lost), tag, parent) from lost
        return written, after, True
    if entry is None:
        return True, Entry(key, value, revision, revision, 1), False
    return True, Entry(key, value, revision, entry.create_revision, entry.version + 1), False


__all__: Sequence[str] = (
    "HISTORY",
    "RECORD",
    "UNREAD",
    "History",
    "LostWrite",
    "Tags",
    "decode_history",
    "encode_history",
    "settle",
    "write",
)
