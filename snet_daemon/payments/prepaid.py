"""Prepaid (concurrency-token) payments: ``TokenService/GetToken`` and ``prepaid-call``.

An escrow payment holds its channel for the whole call, so one channel
carries one call at a time.  Prepaid calls lift that: the client signs a
larger amount once (``GetToken``: the last amount plus the price of N
calls), the daemon accepts it as the channel's claimable payment and adds
the difference to the channel's *planned* amount, and the client then makes
calls with the returned token (``snet-payment-type: prepaid-call``), each
charged against *planned − used*, with no channel lock, concurrently
(``snet-daemon.md`` §6.6).

The books, per channel, in the shared storage under the Go daemon's keys
but under the MPE contract, like the channel state
(``M//PrePaid/storage/{ID:<channel>/P}`` planned, ``.../U}`` used; Go's
``P//...`` would let channel N of a new contract spend what was prepaid on
channel N of the old one, see :mod:`snet_daemon.storage.keys`):

* ``GetToken`` raises planned in the same conditional transaction that
  records the signed amount (:meth:`EscrowLedger.prepay`), so the planned
  amount is always backed by a claimable signature; the treasurer claims it
  like any escrow payment.
* A prepaid call is charged with **one** conditional transaction on the
  used amount: ``used + price <= planned`` or the call is refused ("Usage
  Exceeded on channel Id N").  The transaction is conditional on the used
  amount's revision, so daemons sharing the storage never spend more than
  was planned between them.
* A call that fails is refunded (used − price), so used is always the price
  of the successful calls.  (Go keeps refunds in a third key, ``R``, and
  its ``GetToken`` reports used including refunded calls; here ``R`` is not
  used and the reported used amount is the real one.)

Charges of one channel are combined: while this daemon's transaction on a
channel is in flight, new charges and refunds queue, and the next
transaction applies all of them at once.  Many concurrent calls on one
channel thus cost a handful of transactions rather than a storm of failed
compare-and-swaps; contention remains only between daemons.  A refund
storage refuses is put back on the queue later by a background task, so
that neither its caller nor the channel's other requests wait for the
outage to end; one refused for long is given up, and logged.

Values are our own encoding (like the channel state: a payment group runs
one kind of daemon).  Planned amounts are ``0x01`` followed by the amount as
32 bytes big-endian.  Used amounts are version 2: ``0x02``, the amount, then
the last writes that made it (see :mod:`snet_daemon.payments.tagged`)::

    0x02 | amount (32) | (tag (8) | parent revision (8)) x up to 8

That history settles a write whose reply was lost (timed out).  A value's
amount alone cannot tell (another daemon may have written the same amount,
or more after ours).  Version 1 used amounts (no history) are read as well.
When storage keeps failing while the write is settled, its charges' calls
are refused (``UNAVAILABLE``) and the write stays unsettled: it is settled
before anything else is written on the channel (until it can be, charges
there are refused too) and in the background.  If it landed, the refused
calls' charges are refunded; if it never will, the refunds it carried are
made again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from twisted.logger import Logger

from snet_daemon._proto.escrow import token_service_pb2 as pb
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments import signatures
from snet_daemon.payments.channel import ChannelState, CorruptValue, spendable
from snet_daemon.payments.escrow import (
    ChainChannel,
    ChannelSource,
    EscrowLedger,
    EscrowPayment,
    PaymentTerms,
    storage_down,
)
from snet_daemon.payments.state_service import check_block
from snet_daemon.payments.tagged import (
    HISTORY,
    RECORD,
    UNREAD,
    LostWrite,
    Tags,
    decode_history,
    encode_history,
    settle,
    write,
)
from snet_daemon.payments.tokens import PrepaidTokens
from snet_daemon.storage.base import (
    AtomicStorage,
    Entry,
    StorageError,
    StorageUnavailable,
)
from snet_daemon.storage.keys import PrepaidUsage

_log = Logger(namespace="snetd.payments.prepaid")

PREPAID_TOKEN: Final = "snet-prepaid-auth-token-bin"
#: The text snet-sdk 6.0.0's concurrency manager looks for (exactly: it
#: compares ``details()``) before signing a larger amount.
NO_PLANNED_AMOUNT: Final = "Unable to retrieve planned Amount "

_VERSION_1: Final = 1
_VERSION_2: Final = 2
_MAX_ATTEMPTS: Final = 16
#: How long refunds storage keeps refusing are tried again before they are
#: given up (logged).
_REFUND_PATIENCE: Final = 10.0
#: The first pause before trying again what storage refused (doubling up to
#: ``_RETRY_MAX``): longer than :func:`tagged.settle`'s own pauses.
_RETRY_FIRST: Final = 0.25
_RETRY_MAX: Final = 2.0
_IDLE_LIMIT: Final = 100_000


class PrepaidKeys(Protocol):
    """``snet_daemon.storage.keys.KeyLayout`` as far as prepaid amounts go."""

    def prepaid(self, channel_id: int, usage: PrepaidUsage) -> str: ...


def encode_amount(amount: int) -> bytes:
    """A stored planned/used amount."""
    return bytes((_VERSION_1,)) + amount.to_bytes(32, "big")


def decode_amount(entry: Entry | None) -> int:
    """The amount in a stored entry (0 when absent).

    Raises:
        CorruptValue: unknown version or wrong length.
    """
    if entry is None:
        return 0
    data = entry.value
    size = len(data)
    if not (
        (data[:1] == b"\x01" and size == 33)
        or (data[:1] == b"\x02" and size >= 33 and (size - 33) % RECORD == 0 and size <= 33 + RECORD * HISTORY)
    ):
        raise CorruptValue(f"unreadable prepaid amount at {entry.key}")
    return int.from_bytes(data[1:33], "big")


def encode_used(amount: int, history: Sequence[tuple[bytes, int]]) -> bytes:
    """A stored used amount, with the writes that made it (newest first)."""
    return bytes((_VERSION_2,)) + amount.to_bytes(32, "big") + encode_history(history)


def _history(entry: Entry | None) -> list[tuple[bytes, int]]:
    """The writes recorded in a used amount (none for version 1 or absent)."""
    if entry is None or entry.value[:1] != b"\x02":
        return []
    return decode_history(entry.value[33:])


def usage_exceeded(channel_id: int) -> GrpcError:
    """A prepaid call beyond what was planned (Go's text; JS clients look for it).

    Go answers it ``INTERNAL``; this is ``RESOURCE_EXHAUSTED``, as the
    client has used up what it paid for: ``INTERNAL`` says the server is
    at fault, which clients and monitoring take for a daemon bug.
    """
    return GrpcError(Status.RESOURCE_EXHAUSTED, f"Usage Exceeded on channel Id {channel_id}")


# -- the used amount ----------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    amount: int  # > 0 a charge, < 0 a refund, 0 only a nudge (see _keep_trying)
    future: asyncio.Future[None] | None
    #: Put on the queue by the retrier (see _keep_trying): a refund not
    #: written then fails its future instead of settling it.
    retry: bool = False
    #: The charge's caller went away: it is dropped unless its write is
    #: already under way (see charge()).
    cancelled: bool = False


@dataclass(frozen=True)
class _Unsettled:
    """Our write of a channel's used amount whose reply was lost, and what it carried."""

    tag: bytes
    parent: int
    #: Its charges (their calls were refused): given back if it landed.
    charged: int
    #: Its refunds (their callers were told they were done): made again if it never lands.
    refunded: int


_UNREAD: Final = UNREAD


@dataclass(eq=False)
class _Books:
    """This daemon's view of one channel's prepaid amounts, and its queue."""

    pending: list[_Request] = field(default_factory=list)
    #: The requests the worker is applying.
    batch: list[_Request] = field(default_factory=list)
    running: bool = False
    used: object = _UNREAD  # Entry | None once read
    planned: object = _UNREAD
    #: Refunds storage refused, waiting to be tried again (their total).
    retrying: int = 0
    #: Our last write, when its outcome could not be told yet.
    unsettled: _Unsettled | None = None
    #: The background task trying those again (see _keep_trying).
    retrier: asyncio.Future[None] | None = None

    def idle(self) -> bool:
        """Whether nothing is under way or owed on the channel (its books may be dropped)."""
        retrying = self.retrier is not None and not self.retrier.done()
        return not (self.running or self.pending or self.retrying or self.unsettled is not None or retrying)


class PrepaidLedger:
    """Charges and refunds prepaid calls against a channel's planned amount.

    Args:
        storage: the shared payment storage.
        keys: where the amounts live.
        sleep: ``asyncio.sleep`` (injected for tests).
    """

    def __init__(
        self,
        storage: AtomicStorage,
        keys: PrepaidKeys,
        sleep: Callable[[float], object] = asyncio.sleep,
    ) -> None:
        self._storage = storage
        self._keys = keys
        self._sleep = sleep
        self._books: dict[int, _Books] = {}
        self._workers: set[asyncio.Future[None]] = set()
        self._retriers: set[asyncio.Future[None]] = set()
        self._tags = Tags()
        self._closed = False

    async def charge(self, channel_id: int, price: int) -> None:
        """Charge one call of ``price``; returns once it is recorded.

        If the caller is cancelled, the charge is dropped, or, if it was
        already being written, refunded as soon as it lands.

        Raises:
            GrpcError: ``RESOURCE_EXHAUSTED`` "Usage Exceeded on channel Id
                N" when the planned amount does not cover it,
                ``UNAVAILABLE`` when storage is down or too busy (or when
                an earlier write on the channel is of unknown outcome: see
                the module docstring), or the daemon is stopping,
                ``INTERNAL`` for unreadable stored amounts.
        """
        if price == 0:
            return  # a free method (metadata allows price 0): nothing to charge or to refuse
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        request = _Request(price, future)
        books = self._enqueue(channel_id, request)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            if request in books.pending:
                books.pending.remove(request)
            else:
                # In the worker's batch: dropped before its next write
                # (see _live); one under way is refunded once it lands.
                request.cancelled = True
                future.add_done_callback(lambda done: self._refund_if_charged(channel_id, price, done))
            raise

    async def refund(self, channel_id: int, price: int) -> None:
        """Give back the charge of a call that failed.

        Returns once recorded, or once the first attempt failed: storage
        that is down is then retried in the background (without holding up
        the channel's other charges and refunds) for a while, and a refund
        that still cannot be written is logged (the client then paid for a
        failed call, never the other way round).
        """
        if price == 0:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(channel_id, _Request(-price, future))
        await future

    async def settle(self, within: float) -> None:
        """Wait up to ``within`` seconds for the writes under way (the daemon
        stops: storage closes next).

        Refunds run in the background: of a call cancelled while its charge
        was being written (refunded once it lands), of failed calls while
        storage is down (retried), and of calls refused while their charges
        were written with an outcome not known yet (refunded once known to
        have landed).  Those waiting for a retry are tried once more now.
        Cut off by the storage closing, the client would stay charged for a
        call it was never served.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        tried: set[int] = set()
        while True:
            # A charge that just landed refunds its cancelled call from a
            # done-callback, which runs on the next turn of the loop.
            await asyncio.sleep(0)
            for channel_id, books in list(self._books.items()):
                if channel_id not in tried and (books.retrying or books.unsettled):
                    tried.add(channel_id)
                    self._enqueue(channel_id, _retry(books, None))
            left = deadline - loop.time()
            if not self._workers or left <= 0:
                return
            await asyncio.wait(set(self._workers), timeout=left)

    def close(self) -> None:
        """Stop writing: whoever waits is answered, what is left undone is logged.

        Done here rather than by the cancelled tasks: a task cancelled
        before it started never runs its handlers.  Requests made from now
        on are refused (charges) or logged as lost (refunds).
        """
        self._closed = True
        for task in [*self._workers, *self._retriers]:
            task.cancel()
        for channel_id, books in self._books.items():
            requests = books.batch + books.pending
            writing = sum(
                r.amount for r in books.batch if r.amount > 0 and r.future is not None and not r.future.done()
            )
            if writing:
                _log.error(
                    "charges of {amount} on prepaid channel {channel} were being written as the daemon stopped: "
                    "their calls were refused, and the client may have been charged for them",
                    amount=writing,
                    channel=channel_id,
                )
            for request in requests:
                _settle(request, _STOPPING if request.amount > 0 else None)
            _log_lost(channel_id, books.retrying - sum(r.amount for r in requests if r.amount < 0))
            if books.unsettled is not None:
                _log.error(
                    "a write to prepaid channel {channel} is of unknown outcome as the daemon stops: if it "
                    "applied, the client paid {charged} for refused calls; if not, a refund of {refunded} is lost",
                    channel=channel_id,
                    charged=books.unsettled.charged,
                    refunded=books.unsettled.refunded,
                )
            books.pending, books.batch, books.retrying, books.unsettled = [], [], 0, None
            books.running, books.retrier = False, None
        self._books.clear()

    async def usage(self, channel_id: int) -> tuple[int | None, int]:
        """``(planned, used)`` read now (planned None if never set).

        Raises:
            GrpcError: ``UNAVAILABLE`` when storage is down.
        """
        planned_key, used_key = self._keys.prepaid(channel_id, "P"), self._keys.prepaid(channel_id, "U")
        try:
            entries = await self._storage.get_many([planned_key, used_key])
        except StorageError as exc:
            raise storage_down(exc) from None
        planned = entries[planned_key]
        return (None if planned is None else _amount(planned)), _amount(entries[used_key])

    # -- internals ---------------------------------------------------------------

    def _enqueue(self, channel_id: int, request: _Request) -> _Books:
        if self._closed:
            _settle(request, _STOPPING if request.amount > 0 else None)
            _log_lost(channel_id, -min(request.amount, 0))
            return _Books()
        books = self._books.get(channel_id)
        if books is None:
            if len(self._books) >= _IDLE_LIMIT:
                self._books = {k: v for k, v in self._books.items() if not v.idle()}
            books = self._books[channel_id] = _Books()
        books.pending.append(request)
        if not books.running:
            books.running = True
            self._workers.add(worker := asyncio.ensure_future(self._run(channel_id, books)))
            worker.add_done_callback(self._workers.discard)
        return books

    def _refund_if_charged(self, channel_id: int, price: int, done: asyncio.Future[None]) -> None:
        if not done.cancelled() and done.exception() is None:
            self._enqueue(channel_id, _Request(-price, None))

    async def _run(self, channel_id: int, books: _Books) -> None:
        """Apply queued requests, one transaction at a time, until none are left.

        Cancelled by :meth:`close`, which answers the requests itself.
        """
        try:
            while books.pending:
                batch = books.batch = books.pending
                books.pending = []
                try:
                    leftover = await self._apply(channel_id, books, batch)
                except GrpcError as failed:
                    leftover = [r for r in batch if r.amount < 0]
                    for request in batch:
                        if request.amount >= 0:
                            _settle(request, failed)
                except Exception as exc:  # a bug: fail the batch, keep the loop alive
                    _log.failure("prepaid accounting failed on channel {channel}", channel=channel_id)
                    bug = GrpcError(Status.INTERNAL, f"internal error: {exc}")
                    for request in batch:
                        _settle(request, bug)
                    leftover = []
                books.batch = []
                if leftover:
                    self._retry_later(channel_id, books, leftover)
        finally:
            books.running = False

    def _retry_later(self, channel_id: int, books: _Books, refunds: list[_Request]) -> None:
        """Refunds that could not be written yet: their callers need not wait,
        nor the channel's other requests; the retrier tries them again."""
        for request in refunds:
            books.retrying -= request.amount
            _settle(request, _NOT_WRITTEN if request.retry else None)
        self._start_retrier(channel_id, books)

    def _start_retrier(self, channel_id: int, books: _Books) -> None:
        if books.retrier is None or books.retrier.done():  # done: it left as this came
            books.retrier = retrier = asyncio.ensure_future(self._keep_trying(channel_id, books))
            self._retriers.add(retrier)
            retrier.add_done_callback(self._retriers.discard)

    async def _keep_trying(self, channel_id: int, books: _Books) -> None:
        """Put back on the channel's queue, pausing longer each time, what
        storage refused there: refunds not written, and our write of unknown
        outcome to settle (the worker settles it before anything else).

        Once storage has refused the retries for :data:`_REFUND_PATIENCE`,
        the refunds waiting are given up (logged); a write of unknown outcome
        is tried until the daemon stops.
        """
        loop = asyncio.get_running_loop()
        delay = _RETRY_FIRST
        failing = 0.0
        try:
            while books.retrying or books.unsettled:
                await self._sleep(delay)  # type: ignore[misc]
                failing += delay
                delay = min(delay * 2, _RETRY_MAX)
                if not (books.retrying or books.unsettled):
                    return  # done meanwhile, by the channel's own requests
                future: asyncio.Future[None] = loop.create_future()
                self._enqueue(channel_id, _retry(books, future))
                try:
                    await future
                except GrpcError:
                    if failing >= _REFUND_PATIENCE and books.retrying:
                        _log.error(
                            "could not refund {amount} to prepaid channel {channel}: storage unavailable; "
                            "the client paid for failed calls",
                            amount=books.retrying,
                            channel=channel_id,
                        )
                        books.retrying = 0
                else:
                    delay, failing = _RETRY_FIRST, 0.0  # storage answers again
        except Exception:  # a bug: log it, leave nothing waiting on a dead task
            _log.failure("retrying prepaid accounting failed on channel {channel}", channel=channel_id)

    async def _apply(self, channel_id: int, books: _Books, batch: list[_Request]) -> list[_Request]:
        """One transaction for ``batch``; returns the refunds left unwritten.

        Our earlier write of unknown outcome on the channel is settled
        first, and what it leaves owed joins ``batch``.

        Raises:
            GrpcError: nothing could be written.
        """
        used_key = self._keys.prepaid(channel_id, "U")
        planned_key = self._keys.prepaid(channel_id, "P")
        if books.unsettled is not None:
            await self._settle_lost(channel_id, books, books.unsettled, batch)
        refunds = [r for r in batch if r.amount < 0]
        charges = _live([r for r in batch if r.amount > 0])
        if not charges and not refunds:
            # Only nudges (and cancelled charges): nothing to write, nor to
            # read (settling may have left the books unread).
            for request in batch:
                _settle(request, None)
            return []
        planned_fresh = False
        if books.used is _UNREAD or books.planned is _UNREAD:
            await self._read(books, used_key, planned_key)
            planned_fresh = True
        for _ in range(_MAX_ATTEMPTS):
            charges = _live(charges)
            used_entry: Entry | None = books.used  # type: ignore[assignment]
            used = _amount(used_entry)
            planned = _amount(books.planned)  # type: ignore[arg-type]
            total = max(0, used + sum(r.amount for r in refunds))
            admitted, refused = [], []
            for request in charges:
                if total + request.amount <= planned:
                    total += request.amount
                    admitted.append(request)
                else:
                    refused.append(request)
            if refused and not planned_fresh:
                # Another daemon's GetToken may have raised planned: look.
                await self._read(books, used_key, planned_key)
                planned_fresh = True
                continue
            if admitted or refunds:
                try:
                    written, books.used, settled = await write(
                        self._storage,
                        used_key,
                        used_entry,
                        total,
                        tags=self._tags,
                        encode=encode_used,
                        decode=_amount,
                        history=_history,
                        sleep=self._sleep,
                    )
                except LostWrite as lost:
                    books.used = books.planned = _UNREAD
                    self._unsettle(channel_id, books, lost, admitted, refunds)
                    for request in refused:
                        _settle(request, usage_exceeded(channel_id))
                    return []
                except StorageError as exc:
                    raise storage_down(exc) from None
                if settled:
                    books.planned = _UNREAD  # storage was flaky: read planned again too
                if not written:
                    if settled:
                        # It did not happen, and now never will: try again.
                        await self._read(books, used_key, planned_key)
                        planned_fresh = True
                    continue
            for request in refused:
                _settle(request, usage_exceeded(channel_id))
            for request in batch:  # admitted, refunds, nudges
                _settle(request, None)
            return []
        busy = GrpcError(Status.UNAVAILABLE, f"too much contention on prepaid channel {channel_id}; retry")
        for request in batch:
            if request.amount >= 0:
                _settle(request, busy)
        return refunds

    def _unsettle(
        self, channel_id: int, books: _Books, lost: LostWrite, admitted: list[_Request], refunds: list[_Request]
    ) -> None:
        """A write whose outcome could not be told yet: it is settled before
        the channel's next write, or in the background (:meth:`_settle_lost`).

        The charges' calls are refused (their clients may have been charged:
        the same as a timed-out escrow write) and the refunds' callers are
        done; what the write turns out to have done decides what is owed.
        """
        books.unsettled = _Unsettled(
            lost.tag, lost.parent, sum(r.amount for r in admitted), -sum(r.amount for r in refunds)
        )
        for request in admitted:
            _settle(request, storage_down(lost))
        for request in refunds:
            _settle(request, None)
        self._start_retrier(channel_id, books)

    async def _settle_lost(self, channel_id: int, books: _Books, lost: _Unsettled, batch: list[_Request]) -> None:
        """Settle our earlier write of unknown outcome on the channel, before
        anything else is written there.

        Before, because each write of ours would push it further back in the
        history a used amount keeps, and because what it did decides what is
        owed: if it landed, the charges it carried were for refused calls and
        are refunded; if it never will, the refunds it carried are made
        again.  That refund joins ``batch``.

        Raises:
            GrpcError: ``UNAVAILABLE`` while it cannot be told (storage keeps
                failing): nothing may be written on the channel until it can.
        """
        used_key = self._keys.prepaid(channel_id, "U")

        def fence(found: Entry | None) -> bytes:
            return encode_used(_amount(found), [(self._tags.next(), lost.parent), *_history(found)])

        landed, found = await settle(
            self._storage, used_key, lost.tag, lost.parent, history=_history, fence=fence, sleep=self._sleep
        )
        books.used = books.planned = _UNREAD
        if landed is None and not _written_over(found, lost.parent):
            _log.debug("prepaid write on channel {channel} not settled yet", channel=channel_id)
            raise storage_down(StorageUnavailable("a write's outcome is not known yet"))
        books.unsettled = None
        if landed is None:
            _log.error(
                "the outcome of a write to prepaid channel {channel} can no longer be told (written over too often "
                "since): if it applied, the client paid {charged} for refused calls; if not, a refund of "
                "{refunded} is lost",
                channel=channel_id,
                charged=lost.charged,
                refunded=lost.refunded,
            )
            return
        owed = lost.charged if landed else lost.refunded
        if owed:
            _log.info(
                "a write to prepaid channel {channel} of unknown outcome {outcome}: refunding {amount}",
                channel=channel_id,
                outcome="applied after its calls were refused" if landed else "never applied",
                amount=owed,
            )
            batch.append(_Request(-owed, None))

    async def _read(self, books: _Books, used_key: str, planned_key: str) -> None:
        try:
            entries = await self._storage.get_many([used_key, planned_key])
        except StorageError as exc:
            books.used = books.planned = _UNREAD
            raise storage_down(exc) from None
        books.used, books.planned = entries[used_key], entries[planned_key]


_STOPPING: Final = GrpcError(Status.UNAVAILABLE, "the daemon is stopping")
#: Fails a retried refund's future (only the retrier sees it).
_NOT_WRITTEN: Final = GrpcError(Status.UNAVAILABLE, "refund not written")


def _retry(books: _Books, future: asyncio.Future[None] | None) -> _Request:
    """The channel's refunds waiting for a retry, as one request (a nudge if none)."""
    amount, books.retrying = books.retrying, 0
    return _Request(-amount, future, retry=True)


def _live(charges: list[_Request]) -> list[_Request]:
    """``charges`` but those whose callers went away (nothing written for
    them: their futures are cancelled, so nothing is refunded either)."""
    live = []
    for request in charges:
        if request.cancelled and request.future is not None:
            request.future.cancel()
        else:
            live.append(request)
    return live


def _written_over(found: object, parent: int) -> bool:
    """Whether ``found`` (the entry :func:`settle` read last) was written since revision ``parent``."""
    if found is UNREAD:
        return False
    return (found.mod_revision if isinstance(found, Entry) else 0) != parent


def _amount(entry: Entry | None) -> int:
    try:
        return decode_amount(entry)
    except CorruptValue as exc:
        raise GrpcError(Status.INTERNAL, f"internal error: {exc}") from None


def _log_lost(channel_id: int, amount: int) -> None:
    """Log refunds of ``amount`` that the daemon's stop cut off (one cut off
    while being written may have landed)."""
    if amount:
        _log.error(
            "refund of {amount} to prepaid channel {channel} may be lost: the daemon stopped first; "
            "the client paid for failed calls",
            amount=amount,
            channel=channel_id,
        )


def _value_amount(key: str, value: bytes | None) -> int:
    return _amount(None if value is None else Entry(key, value, 1, 1, 1))


def _settle(request: _Request, error: GrpcError | None) -> None:
    future = request.future
    if future is None or future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


# -- TokenService --------------------------------------------------------------------


class TokenService:
    """Answers ``TokenService/GetToken``.

    As in the Go daemon, failures are plain errors (status ``UNKNOWN``)
    with Go's messages, which clients match on: snet-sdk on
    ``"Unable to retrieve planned Amount "`` (a channel never prepaid:
    it then signs a larger amount), the JS examples on "signed amount for
    token request ...".

    Args:
        ledger: the escrow ledger (channel state, claimable payments).
        prepaid: where the planned and used amounts are.
        keys: their storage keys.
        tokens: issues the JWTs.
        chain: the block number.
        terms: the current payment terms.
    """

    def __init__(
        self,
        ledger: EscrowLedger,
        prepaid: PrepaidLedger,
        keys: PrepaidKeys,
        tokens: PrepaidTokens,
        chain: ChannelSource,
        terms: Callable[[], PaymentTerms],
    ) -> None:
        self._ledger = ledger
        self._prepaid = prepaid
        self._keys = keys
        self._tokens = tokens
        self._chain = chain
        self._terms = terms

    async def get_token(self, request: pb.TokenRequest, call: ServerCall) -> pb.TokenReply:
        """Accept ``request``'s signed amount and return a token for the channel."""
        channel_id = request.channel_id
        amount = request.signed_amount
        signer: list[bytes] = []

        def precheck(state: ChannelState, info: ChainChannel) -> None:
            # The Go token service's own checks, in its order.
            if state.authorized_amount > amount:
                raise GrpcError(
                    Status.UNKNOWN, "signed amount for token request needs to be greater than last signed amount"
                )
            if spendable(state, info.nonce, info.value) < amount:
                raise GrpcError(
                    Status.UNKNOWN, "signed amount for token request cannot be greater than full amount in channel"
                )
            try:
                who = signatures.recover(
                    signatures.token_request(request.claim_signature, request.current_block), request.signature
                )
            except (signatures.SignatureError, ValueError):
                raise GrpcError(Status.UNKNOWN, "incorrect signature") from None
            allowed = {signatures.address_bytes(a) for a in (info.signer, info.sender, info.recipient)}
            if who not in allowed:
                raise GrpcError(Status.UNKNOWN, "only channel signer/sender/receiver can get a Valid Token")
            check_block(request.current_block, self._chain)
            signer[:] = [who]

        payment = EscrowPayment(channel_id, request.current_nonce, amount, bytes(request.claim_signature))
        planned_key = self._keys.prepaid(channel_id, "P")
        used_key = self._keys.prepaid(channel_id, "U")
        values = await self._ledger.prepay(payment, planned_key, _add_planned, precheck, also_read=(used_key,))
        if values[planned_key] is None:
            # Never prepaid (e.g. only escrow calls so far): snet-sdk then
            # signs a larger amount.
            raise GrpcError(Status.UNKNOWN, NO_PLANNED_AMOUNT)
        planned = _value_amount(planned_key, values[planned_key])
        used = _value_amount(used_key, values[used_key])
        token = self._tokens.create(channel_id, signatures.checksum(signer[0]))
        planned, used = _as_uint64(planned, used)
        return pb.TokenReply(channel_id=channel_id, token=token, planned_amount=planned, used_amount=used)


_UINT64_MAX: Final = 2**64 - 1


def _as_uint64(planned: int, used: int) -> tuple[int, int]:
    """``planned`` and ``used`` shifted down alike to fit the reply's uint64 fields.

    Both add up over the channel's whole life (every nonce), so with an
    18-decimal token they pass 2**64 after some 18.4 tokens of prepaid
    calls; the reply could then not be built at all, after the prepayment
    was taken.  Clients compare the two (what is left is ``planned - used``),
    and that difference is kept exact whenever it fits.
    """
    excess = max(0, planned - _UINT64_MAX)
    return planned - excess, min(_UINT64_MAX, max(0, used - excess))


def _add_planned(entry: Entry | None, increase: int) -> bytes:
    return encode_amount(_amount(entry) + increase)


__all__: Sequence[str] = (
    "NO_PLANNED_AMOUNT",
    "PREPAID_TOKEN",
    "PrepaidLedger",
    "TokenService",
    "decode_amount",
    "encode_amount",
    "usage_exceeded",
)
