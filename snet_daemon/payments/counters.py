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
  tried again together.  When settling cannot tell (storage keeps failing),
  the waiting calls are refused as storage being down, as a single call was.
* **A write of unknown outcome is settled later, not written off**: it is
  kept, with what it carried, until settling tells.  It is settled before
  the counter's next write (our own writes must not push it out of the
  counter's history, nor build on a count not known), in the background
  with growing pauses (:data:`SETTLE_RETRY`), and at stop
  (:meth:`Counters.settle`).  If it landed, the calls it counted -- all
  refused -- are given back; if it never will, the give-backs it carried
  are made again.  Until then the counter's calls are refused
  (``UNAVAILABLE``) after one try at settling it.  One that can never be
  told (the counter was written more often since than it remembers), or is
  still unsettled when the daemon stops, is logged as a warning.
* **A failed call is given back**: give-backs are tried again, with backoff,
  until :data:`GIVE_BACK_WITHIN` has passed.  One finally lost (storage down
  all that time, or the daemon stopping first) is logged as a warning
  naming the counter, because nothing else would show it.
* **The client learns that storage failed, not how**
  (:func:`snet_daemon.payments.escrow.storage_down`): the storage's
  messages (addresses, etcd's words) go to the debug log; the storage
  client logs outages itself.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from twisted.logger import Logger

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments.escrow import storage_down
from snet_daemon.payments.tagged import (
    HISTORY,
    RECORD,
    UNREAD,
    History,
    LostWrite,
    Tags,
    decode_history,
    encode_history,
    settle,
    write,
)
from snet_daemon.storage.base import AtomicStorage, Entry, StorageError

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
#: Pauses of the background settling of a write of unknown outcome: the
#: first, doubling up to the second.
SETTLE_RETRY: Final = (0.5, 8.0)

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


def _stopping() -> GrpcError:
    return GrpcError(Status.UNAVAILABLE, "the daemon is stopping")


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
    #: Calls counted and give-backs carried by the write under way (None
    #: when none is): close() names them, as of unknown outcome.
    writing: tuple[int, list[_GiveBack]] | None = None

    def waiting(self) -> bool:
        """Whether anything still waits (calls cancelled meanwhile do not)."""
        return bool(self.give_backs) or any(not increment.done.done() for increment in self.increments)


@dataclass(frozen=True, slots=True)
class _Unsettled:
    """Our write of a counter whose reply was lost and whose outcome settling could not tell."""

    #: The write's tag and the revision it was conditioned on (see ``tagged``).
    tag: bytes
    parent: int
    #: Calls it counted: all refused, so given back if it landed.
    counted: int
    #: Give-backs it carried: made again if it never lands.
    given_back: int


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
        #: Our writes of unknown outcome, by counter (see :meth:`_settle`).
        self._unsettled: dict[str, _Unsettled] = {}
        #: The background tasks settling them, by counter.
        self._settlers: dict[str, asyncio.Future[None]] = {}
        #: Set by :meth:`close`: nothing is written any more.
        self._closed = False

    async def count(self, key: str, allowed: int) -> None:
        """Count one call on ``key`` if fewer than ``allowed`` are counted (:data:`UNLIMITED`: always).

        If the caller is cancelled once the call was counted, it is given
        back: a call counted but never made costs the user nothing.

        Raises:
            GrpcError: ``RESOURCE_EXHAUSTED`` when the limit is reached,
                ``UNAVAILABLE`` when storage is down (or the outcome of this
                write, or of an earlier one on ``key``, cannot be told yet),
                when other daemons won every race for :data:`MAX_ATTEMPTS`
                writes, or when the daemon is stopping; ``INTERNAL`` for an
                unreadable counter.
        """
        if self._closed:
            raise _stopping()
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
        """Wait up to ``within`` seconds for the writes under way, and try
        once more to settle writes of unknown outcome (the daemon stops:
        storage closes next).

        The workers are collected again until none is left: a give-back
        queued meanwhile (a call cut short by the stop) is waited for too.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        tried: set[str] = set()
        while not self._closed:
            # A call cancelled just as it was counted queues its give-back
            # on a later turn of the loop.
            await asyncio.sleep(0)
            for key in [key for key in self._unsettled if key not in tried]:
                tried.add(key)
                self._queue(key)  # its worker settles it first
            workers = {queue.worker for queue in self._queues.values() if queue.worker is not None}
            left = deadline - loop.time()
            if not workers or left <= 0:
                return
            await asyncio.wait(workers, timeout=left)

    def close(self) -> None:
        """Stop writing: calls still waiting are refused, give-backs still
        waiting and writes still unsettled are logged, and later requests
        are refused as the daemon stopping."""
        self._closed = True
        for settler in list(self._settlers.values()):
            settler.cancel()
        self._settlers.clear()
        # Done here, not left to the workers: one cancelled before it ever
        # ran never runs its own cleanup.
        queues, self._queues = self._queues, {}
        for key, queue in queues.items():
            if queue.worker is not None:
                queue.worker.cancel()
            if queue.writing is not None:
                counted, carried = queue.writing
                _log.warn(
                    "a write of free-call counter {key} was under way as the daemon stopped: if it landed, "
                    "{counted} refused call(s) stay counted; if not, {given_back} failed call(s) were not "
                    "given back",
                    key=key,
                    counted=counted,
                    given_back=len(carried),
                )
                queue.give_backs = [give_back for give_back in queue.give_backs if give_back not in carried]
                for give_back in carried:
                    _resolve(give_back.done)
            self._drop(key, queue, "the daemon stopped first")
        for key, unsettled in self._unsettled.items():
            _log.warn(
                "a write of free-call counter {key} is of unknown outcome as the daemon stops: if it landed, "
                "{counted} refused call(s) stay counted; if not, {given_back} failed call(s) were not given back",
                key=key,
                counted=unsettled.counted,
                given_back=unsettled.given_back,
            )
        self._unsettled.clear()

    # -- internals ------------------------------------------------------------------

    def _queue(self, key: str) -> _Queue:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
            queue.worker = asyncio.ensure_future(self._work(key, queue))
        return queue

    def _give_back(self, key: str) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        give_back = _GiveBack(self._clock() + self._give_back_within, done)
        if self._closed:
            self._lost(key, [give_back], "the daemon stopped first")
        else:
            self._queue(key).give_backs.append(give_back)
        return done

    async def _work(self, key: str, queue: _Queue) -> None:
        """Write ``key`` until nothing waits for it (settling our write of
        unknown outcome on it first, if there is one).

        The entry last known (read, or written by us) is kept between
        writes: a busy counter costs one round trip per write.
        """
        entry: object = UNREAD
        races = failures = 0
        reason = "the daemon stopped first"
        # Started to settle (by the settler, or at stop), even with nothing waiting.
        settling = key in self._unsettled
        try:
            while queue.waiting() or settling:
                settling = False
                failure = None
                if key in self._unsettled:
                    entry, failure = await self._settle(key, queue)
                if failure is None:
                    if not queue.waiting():
                        continue
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
            self._drop(key, queue, reason)
            if self._queues.get(key) is queue:
                del self._queues[key]

    async def _round(self, key: str, queue: _Queue, entry: object) -> tuple[object, str | None]:
        """One write covering everything waiting for ``key`` now.

        Returns:
            The entry last known (:data:`UNREAD` if none), and why the round
            failed: None when the write landed (or none was needed);
            :data:`_RACE` when another daemon wrote first (everything still
            waits); else what storage failed with (the calls were refused,
            the give-backs still wait, or go with a write left unsettled).
        """
        queue.increments = [increment for increment in queue.increments if not increment.done.done()]
        increments = list(queue.increments)
        give_backs = list(queue.give_backs)
        admitted: set[_Increment] = set()
        try:
            current = await self._storage.get(key) if entry is UNREAD else _entry(entry)
            made = decode_count(current)
            count = max(0, made - len(give_backs))
            for increment in increments:
                if increment.allowed == UNLIMITED or count < increment.allowed:
                    admitted.add(increment)
                    count += 1
            # Nothing to write when as many calls are admitted as are given
            # back: each takes the slot of a failed call, already counted.
            after: object = current
            if count != made:
                queue.writing = (len(admitted), give_backs)
                try:
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
                finally:
                    queue.writing = None
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
            return UNREAD, self._failed(key, queue, (increments, give_backs), exc, len(admitted))
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

    def _failed(
        self,
        key: str,
        queue: _Queue,
        taken: tuple[list[_Increment], list[_GiveBack]],
        exc: StorageError | GrpcError,
        admitted: int,
    ) -> str:
        """A round that storage (or an unreadable counter) failed: refuse its
        calls, and keep its give-backs for later or with its write if that
        may have landed.  Returns the reason, for the log."""
        increments, give_backs = taken
        _taken(queue, increments, give_backs)
        error = exc if isinstance(exc, GrpcError) else storage_down(exc)
        for increment in increments:
            # One exception each: a shared one would collect every caller's traceback.
            _reject(increment.done, GrpcError(error.status, error.message))
        if isinstance(exc, LostWrite):
            # The write may have landed (or land later): settled before the
            # counter's next write, its calls and give-backs with it.
            self._unsettle(key, _Unsettled(exc.tag, exc.parent, admitted, len(give_backs)))
        elif isinstance(exc, GrpcError):
            self._lost(key, give_backs, error.message)
            return error.message
        else:
            # Tried again in the background.
            queue.give_backs[:0] = give_backs
        # The failed calls' clients need not wait for storage to come back.
        for give_back in give_backs:
            _resolve(give_back.done)
        return str(exc)

    def _unsettle(self, key: str, unsettled: _Unsettled) -> None:
        """Keep ``unsettled`` until :meth:`_settle` tells its outcome, trying in the background."""
        self._unsettled[key] = unsettled
        settler = self._settlers.get(key)
        if settler is None or settler.done():  # done: it left as this write came
            settler = self._settlers[key] = asyncio.ensure_future(self._keep_settling(key))
            settler.add_done_callback(functools.partial(self._settler_done, key))

    def _settler_done(self, key: str, settler: asyncio.Future[None]) -> None:
        if self._settlers.get(key) is settler:
            del self._settlers[key]

    async def _keep_settling(self, key: str) -> None:
        """Have our write of unknown outcome on ``key`` settled in the
        background, pausing longer each time: a worker settles it (only
        workers write a counter, one at a time)."""
        delay, longest = SETTLE_RETRY
        while key in self._unsettled and not self._closed:
            await self._sleep(delay)
            delay = min(delay * 2, longest)
            if key in self._unsettled and not self._closed:
                self._queue(key)  # a worker already there settles it before its next write

    async def _settle(self, key: str, queue: _Queue) -> tuple[object, str | None]:
        """Try once to settle our write of unknown outcome on ``key``; then
        give back the calls it counted if it landed, or make again the
        give-backs it carried if it never will.

        Done before any other write of ours to ``key``: a write on top would
        build on a count not known, and push ours out of the counter's
        history, so that it could never be told.

        Returns:
            The entry last known and None once settled (what it owed is then
            queued); else :data:`UNREAD` and why not (the calls waiting are
            refused, as storage being down).
        """
        unsettled = self._unsettled[key]
        waiting = [increment for increment in queue.increments if not increment.done.done()]

        def fence(found: Entry | None) -> bytes:
            return encode_count(decode_count(found), [(self._tags.next(), unsettled.parent), *history_of(found)])

        try:
            landed, entry = await settle(
                self._storage,
                key,
                unsettled.tag,
                unsettled.parent,
                history=history_of,
                fence=fence,
                sleep=self._sleep,
            )
        except GrpcError as error:  # an unreadable counter (the fence reads it)
            for increment in waiting:
                _reject(increment.done, GrpcError(error.status, error.message))
            return UNREAD, error.message
        if landed is None and (entry is UNREAD or _revision(_entry(entry)) == unsettled.parent):
            for increment in waiting:
                _reject(increment.done, GrpcError(Status.UNAVAILABLE, "payment storage is unavailable"))
            # The give-backs stay queued, but their failed calls' clients
            # need not wait for storage to come back (as in _failed).
            for give_back in queue.give_backs:
                _resolve(give_back.done)
            return UNREAD, "an earlier write's outcome is not known yet (storage failing)"
        del self._unsettled[key]
        if landed is None:
            # Written since more often than the counter remembers: never told.
            _log.warn(
                "the outcome of a write of free-call counter {key} can no longer be told (written more often "
                "since than it remembers): if it landed, {counted} refused call(s) stay counted; if not, "
                "{given_back} failed call(s) were not given back",
                key=key,
                counted=unsettled.counted,
                given_back=unsettled.given_back,
            )
            return entry, None
        owed = unsettled.counted if landed else unsettled.given_back
        if owed:
            _log.info(
                "a write of free-call counter {key} of unknown outcome {outcome}: giving back {owed} call(s)",
                key=key,
                outcome="landed after its calls were refused" if landed else "never landed",
                owed=owed,
            )
            loop = asyncio.get_running_loop()
            due = self._clock() + self._give_back_within
            queue.give_backs[:0] = [_GiveBack(due, loop.create_future()) for _ in range(owed)]
        return entry, None

    def _overdue(self, key: str, queue: _Queue, reason: str) -> None:
        """Give up the give-backs past their deadline."""
        now = self._clock()
        late = [give_back for give_back in queue.give_backs if give_back.due <= now]
        if late:
            queue.give_backs = [give_back for give_back in queue.give_backs if give_back.due > now]
            self._lost(key, late, reason)

    def _drop(self, key: str, queue: _Queue, reason: str) -> None:
        """Empty ``queue``: its give-backs logged as lost, its calls refused as the daemon stopping."""
        give_backs, increments = queue.give_backs, queue.increments
        queue.increments, queue.give_backs = [], []
        self._lost(key, give_backs, reason)
        for increment in increments:
            _reject(increment.done, _stopping())

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


def _revision(entry: Entry | None) -> int:
    """The revision of an entry as a write's parent names it (0: absent)."""
    return 0 if entry is None else entry.mod_revision


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
    "SETTLE_RETRY",
    "UNLIMITED",
    "Counters",
    "backoff",
    "decode_count",
    "encode_count",
    "history_of",
    "limit_reached",
)
