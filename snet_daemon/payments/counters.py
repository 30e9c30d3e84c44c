"""Free-call counters: one conditional write for every call of a user waiting to be counted.

Each user's free calls are counted in one stored counter (:func:`encode_count`).
A call is counted before it is served and given back if it fails, each time
with a write conditioned on the revision read, so daemons sharing the storage
count together and never exceed the limit.

Why a queue per counter: a write per call makes the calls of one user race
each other.  N calls at once let one write through per round, cost O(N^2)
transactions, and with a fixed number of tries the ninth call of a busy
marketplace backend used to give up with ``UNAVAILABLE`` although the user
had calls left.  Here the writes of one counter by this daemon take turns:
calls (and give-backs) that arrive while a write is under way wait for the
next one, which covers them all -- ``count + admitted - given back`` --
admitting calls in their order of arrival until the limit, and refusing the
rest as a full counter refuses them.  Races remain only between daemons;
a lost race (``ConditionFailed``) is tried again on the fresh value after a
pause drawn at random below an exponentially growing bound ("full jitter"),
so that daemons which collided do not collide again in step.

What does not change:

* **Never more than the limit**, in one daemon or several: a write admits
  calls only up to the limit of the count it is conditioned on.
* **No call served whose count is unknown**: a call is served only once the
  write that counts it is known to have landed.  A write whose reply was lost
  is settled by :func:`snet_daemon.payments.tagged.settle`; it tells whether
  *one write* (one tag, conditioned on one revision) landed, which is exactly
  what a write covering several calls is, so they are served, refused or
  tried again together.  When settling cannot tell, the waiting calls are
  refused as storage being down, as a single call was.
* **A failed call is given back**: give-backs are tried again, with backoff,
  until :data:`GIVE_BACK_WITHIN` has passed.  One finally lost (storage down
  all that time, a write whose outcome cannot be told -- writing again might
  give it back twice, and exceeding the limit is worse than charging one free
  call -- or the daemon stopping first) is logged as a warning naming the
  counter, because nothing else would show it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from twisted.logger import Logger

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments.tagged import (
    HISTORY,
    RECORD,
    UNREAD,
    History,
    Tags,
    decode_history,
    encode_history,
    write,
)
from snet_daemon.storage.base import AtomicStorage, Entry, StorageError, StorageTimeout

_log = Logger(namespace="snetd.payments.freecall")

#: ``free_calls_per_address`` value meaning "no limit".
UNLIMITED: Final = -1
#: Lost races (writes of other daemons first) a call waits through before
#: it is refused as ``UNAVAILABLE``; with the pauses below, about a second.
MAX_ATTEMPTS: Final = 32
#: Seconds a give-back is tried for before it is logged as lost.
GIVE_BACK_WITHIN: Final = 60.0
#: Pause after the n-th lost race in a row: up to ``base * 2**(n-1)``, at most ``cap``.
RACE_BACKOFF: Final = (0.001, 0.05)
#: The same after the n-th storage failure in a row (give-backs only: the
#: calls waiting are refused at once, as storage being down).
FAILURE_BACKOFF: Final = (0.05, 1.0)

_VERSION_1: Final = 1
_VERSION_2: Final = 2


def encode_count(count: int, history: Sequence[tuple[bytes, int]] = ()) -> bytes:
    """A stored free-call counter, with the writes that made it (newest first).

    Version 2: ``0x02 | count (8) | (tag (8) | parent revision (8)) x up to
    8``, the history settling a count whose write timed out (see
    :mod:`snet_daemon.payments.tagged`).  Version 1 (``0x01 | count``) is
    read as well.
    """
    return bytes((_VERSION_2,)) + count.to_bytes(8, "big") + encode_history(history)


def history_of(entry: Entry | None) -> History:
    """The writes recorded in a counter (none for version 1 or absent)."""
    if entry is None or entry.value[:1] != bytes((_VERSION_2,)):
        return []
    return decode_history(entry.value[9:])


def decode_count(entry: Entry | None) -> int:
    """The count in a stored counter (0 when absent).

    Raises:
        GrpcError: ``INTERNAL`` for an unreadable value.
    """
    if entry is None:
        return 0
    data = entry.value
    size = len(data)
    if not (
        (size == 9 and data[0] == _VERSION_1)
        or (
            data[:1] == bytes((_VERSION_2,)) and size >= 9 and (size - 9) % RECORD == 0 and size <= 9 + RECORD * HISTORY
        )
    ):
        raise GrpcError(Status.INTERNAL, f"internal error: unreadable free-call counter at {entry.key}")
    return int.from_bytes(data[1:9], "big")


def backoff(failures: int, bounds: tuple[float, float], jitter: Callable[[], float]) -> float:
    """The pause after ``failures`` failures in a row: "full jitter" below an exponential bound.

    Args:
        failures: 1 for the first failure.
        bounds: ``(base, cap)``: the bound is ``base * 2**(failures-1)``, at most ``cap``.
        jitter: a random number in [0, 1) (injected: tests draw their own).
    """
    base, cap = bounds
    return jitter() * min(cap, base * 2.0 ** min(failures - 1, 32))


def limit_reached(made: int, allowed: int) -> GrpcError:
    """The refusal of a call whose user has no free calls left (Go's text)."""
    return GrpcError(
        Status.RESOURCE_EXHAUSTED,
        f"free call limit has been exceeded, calls made = {made}, total free calls eligible = {allowed}",
    )


def storage_down(exc: Exception) -> GrpcError:
    """The refusal of a call that could not be counted because storage failed."""
    return GrpcError(Status.UNAVAILABLE, f"payment storage is unavailable: {exc}")


@dataclass(eq=False, slots=True)
class _Increment:
    """A call waiting to be counted: resolved when counted, failed with its refusal."""

    allowed: int
    done: asyncio.Future[None]
    #: Writes lost to other daemons while it waited.
    tries: int = 0


@dataclass(eq=False, slots=True)
class _GiveBack:
    """A failed call waiting to be given back: resolved once given back, failed once, or lost."""

    due: float
    done: asyncio.Future[None]


@dataclass(eq=False, slots=True)
class _Queue:
    """What waits for one counter, oldest first, and the task writing it."""

    increments: list[_Increment] = field(default_factory=list)
    give_backs: list[_GiveBack] = field(default_factory=list)
    worker: asyncio.Future[None] | None = None

    def waiting(self) -> bool:
        """Whether anything still waits (calls cancelled meanwhile do not)."""
        return bool(self.give_backs) or any(not increment.done.done() for increment in self.increments)


class Counters:
    """Counts free calls and gives them back, one write per counter at a time.

    Args:
        storage: the shared payment storage.
        sleep: waits between tries (``asyncio.sleep``; tests pass a fake).
        clock: the monotonic time ``sleep`` sleeps by (give-back deadlines).
        jitter: random numbers in [0, 1) for the pauses between tries.
        give_back_within: seconds a give-back is tried for.
    """

    def __init__(
        self,
        storage: AtomicStorage,
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        give_back_within: float = GIVE_BACK_WITHIN,
    ) -> None:
        self._storage = storage
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        self._give_back_within = give_back_within
        #: Tags of our counter writes (see ``tagged``).
        self._tags = Tags()
        #: Counters with calls or give-backs waiting (a worker each).
        self._queues: dict[str, _Queue] = {}

    async def count(self, key: str, allowed: int) -> None:
        """Count one call on ``key`` if fewer than ``allowed`` are counted (:data:`UNLIMITED`: always).

        If the caller is cancelled once the call was counted, it is given
        back: a call counted but never made costs the user nothing.

        Raises:
            GrpcError: ``RESOURCE_EXHAUSTED`` when the limit is reached,
                ``UNAVAILABLE`` when storage is down (or the outcome of the
                write cannot be told) or when other daemons won every race
                for :data:`MAX_ATTEMPTS` writes, ``INTERNAL`` for an
                unreadable counter.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue(key).increments.append(_Increment(allowed, done))
        try:
            await done
        except asyncio.CancelledError:
            # Counted just before the cancellation reached us: nobody will
            # make the call.  (Cancelled earlier, the worker gives it back.)
            if done.done() and not done.cancelled() and done.exception() is None:
                self._give_back(key)
            raise

    async def give_back(self, key: str) -> None:
        """Give back a call counted on ``key`` (best effort: a loss is logged, never raised).

        Returns once the give-back landed, or failed once (storage down: it
        is then tried again in the background until :data:`GIVE_BACK_WITHIN`
        has passed); cancelling the caller does not cancel the give-back.
        """
        await self._give_back(key)

    async def settle(self, within: float) -> None:
        """Wait up to ``within`` seconds for the writes under way (the daemon
        stops: storage closes next)."""
        workers = [queue.worker for queue in self._queues.values() if queue.worker is not None]
        if workers:
            await asyncio.wait(workers, timeout=within)

    def close(self) -> None:
        """Stop writing; give-backs still waiting are logged as lost."""
        for queue in list(self._queues.values()):
            if queue.worker is not None:
                queue.worker.cancel()

    # -- internals ------------------------------------------------------------------

    def _queue(self, key: str) -> _Queue:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
            queue.worker = asyncio.ensure_future(self._work(key, queue))
        return queue

    def _give_back(self, key: str) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue(key).give_backs.append(_GiveBack(self._clock() + self._give_back_within, done))
        return done

    async def _work(self, key: str, queue: _Queue) -> None:
        """Write ``key`` until nothing waits for it.

        The entry last known (read, or written by us) is kept between
        writes: a busy counter costs one round trip per write.
        """
        entry: object = UNREAD
        races = failures = 0
        reason = "the daemon stopped first"
        try:
            while queue.waiting():
                entry, failure = await self._round(key, queue, entry)
                if failure is None:
                    races = failures = 0
                    continue
                lost_race = failure == _RACE
                races, failures = (races + 1, 0) if lost_race else (0, failures + 1)
                self._overdue(key, queue, failure)
                if not lost_race and any(not increment.done.done() for increment in queue.increments):
                    continue  # calls that came meanwhile get their own try at once
                if queue.waiting():
                    pause = backoff(races, RACE_BACKOFF, self._jitter) if lost_race else None
                    await self._sleep(pause if pause is not None else backoff(failures, FAILURE_BACKOFF, self._jitter))
        except Exception:
            _log.failure("free-call counter {key}: unexpected error", key=key)
            reason = "internal error"
        finally:
            # Normally empty; otherwise the daemon stops (or a bug): nothing
            # may wait for ever.
            self._lost(key, queue.give_backs, reason)
            for increment in queue.increments:
                _reject(increment.done, GrpcError(Status.UNAVAILABLE, "the daemon is stopping"))
            queue.increments, queue.give_backs = [], []
            if self._queues.get(key) is queue:
                del self._queues[key]

    async def _round(self, key: str, queue: _Queue, entry: object) -> tuple[object, str | None]:
        """One write covering everything waiting for ``key`` now.

        Returns:
            The entry last known (:data:`UNREAD` if none), and why the round
            failed: None when the write landed (or none was needed);
            :data:`_RACE` when another daemon wrote first (everything still
            waits); else what storage failed with (the calls were refused,
            the give-backs still wait unless the write's outcome is unknown).
        """
        queue.increments = [increment for increment in queue.increments if not increment.done.done()]
        increments = list(queue.increments)
        give_backs = list(queue.give_backs)
        wrote = False
        try:
            current = await self._storage.get(key) if entry is UNREAD else _entry(entry)
            made = decode_count(current)
            count = max(0, made - len(give_backs))
            admitted: set[_Increment] = set()
            for increment in increments:
                if increment.allowed == UNLIMITED or count < increment.allowed:
                    admitted.add(increment)
                    count += 1
            # Nothing to write when as many calls are admitted as are given
            # back: each takes the slot of a failed call, already counted.
            after: object = current
            if count != made:
                wrote = True
                written, after, _ = await write(
                    self._storage,
                    key,
                    current,
                    count,
                    tags=self._tags,
                    encode=encode_count,
                    decode=decode_count,
                    history=history_of,
                    sleep=self._sleep,
                )
                if not written:
                    for increment in increments:
                        increment.tries += 1
                        if increment.tries >= MAX_ATTEMPTS:
                            _reject(
                                increment.done,
                                GrpcError(Status.UNAVAILABLE, "too much contention on this user's free calls; retry"),
                            )
                    return after, _RACE
        except (StorageError, GrpcError) as exc:
            _taken(queue, increments, give_backs)
            error = exc if isinstance(exc, GrpcError) else storage_down(exc)
            for increment in increments:
                # One exception each: a shared one would collect every caller's traceback.
                _reject(increment.done, GrpcError(error.status, error.message))
            if isinstance(exc, GrpcError) or (wrote and isinstance(exc, StorageTimeout)):
                # An unreadable counter, or a write that may have landed:
                # writing again might give the calls back twice.
                self._lost(key, give_backs, f"outcome unknown: {exc}" if wrote else error.message)
            else:
                # Tried again in the background; the failed call's client
                # need not wait for storage to come back.
                queue.give_backs[:0] = give_backs
                for give_back in give_backs:
                    _resolve(give_back.done)
            return UNREAD, error.message
        _taken(queue, increments, give_backs)
        for give_back in give_backs:
            _resolve(give_back.done)
        for increment in increments:
            if increment not in admitted:
                _reject(increment.done, limit_reached(count, increment.allowed))
            elif increment.done.cancelled():
                self._give_back(key)  # counted for a call nobody will make
            else:
                _resolve(increment.done)
        return after, None

    def _overdue(self, key: str, queue: _Queue, reason: str) -> None:
        """Give up the give-backs past their deadline."""
        now = self._clock()
        late = [give_back for give_back in queue.give_backs if give_back.due <= now]
        if late:
            queue.give_backs = [give_back for give_back in queue.give_backs if give_back.due > now]
            self._lost(key, late, reason)

    @staticmethod
    def _lost(key: str, give_backs: list[_GiveBack], reason: str) -> None:
        """Log ``give_backs`` (no longer queued) as lost, and let their callers go."""
        if not give_backs:
            return
        _log.warn(
            "{count} failed free call(s) not given back on {key}: {reason}; the user was charged for them",
            count=len(give_backs),
            key=key,
            reason=reason,
        )
        for give_back in give_backs:
            _resolve(give_back.done)


#: How the reason of a round lost to another daemon starts.
_RACE: Final = "other daemons kept writing the counter first"


def _entry(value: object) -> Entry | None:
    """An entry known (never :data:`UNREAD`)."""
    assert value is None or isinstance(value, Entry)
    return value


def _taken(queue: _Queue, increments: list[_Increment], give_backs: list[_GiveBack]) -> None:
    """Remove a round's calls and give-backs from the queue (new ones came after them)."""
    del queue.increments[: len(increments)]
    del queue.give_backs[: len(give_backs)]


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _reject(done: asyncio.Future[None], error: Exception) -> None:
    if not done.done():
        done.set_exception(error)


__all__: Sequence[str] = (
    "FAILURE_BACKOFF",
    "GIVE_BACK_WITHIN",
    "MAX_ATTEMPTS",
    "RACE_BACKOFF",
    "UNLIMITED",
    "Counters",
    "backoff",
    "decode_count",
    "encode_count",
    "history_of",
    "limit_reached",
    "storage_down",
)
