"""Escrow (pay-per-call) payments: check a payment, record it, refund it if the call fails.

A paid call carries a signed, cumulative amount on an MPE payment channel
(``snet-payment-channel-*`` metadata).  The daemon checks it exactly as the
Go daemon does (``snet-daemon.md`` §6.2: same order, gRPC codes and
messages, including code 1000 for a wrong nonce), then keeps the books
without the Go daemon's faults:

* **Recorded before the call, refunded if it fails.**
  :meth:`EscrowLedger.authorize` writes the new channel state *and* a hold
  on the channel in one conditional transaction, before the call goes to
  the service: an accepted payment is durable before anything is served,
  so none can be lost.  :meth:`EscrowLedger.commit` (the service answered
  OK) writes nothing; :meth:`EscrowLedger.release` (the call failed, was
  cancelled or timed out) puts the previous state back, so a failed call
  costs the client nothing.  A call cancelled while its payment is being
  written is refunded the same way once the write's reply comes.  A call
  cut short by the daemon's own death is the one case left charged: the
  payment was accepted and the service may have done the work.
* **A write of unknown outcome is settled, not guessed.**  When the reply
  to a payment write is lost (a timeout, a dropped connection), etcd may
  have applied it, or may still apply it later.  A second write under the
  same condition (:meth:`EscrowLedger._fence`) tells which and rules out
  the later one: the call goes on if the payment was recorded, and is
  refused (UNAVAILABLE) if not.  When storage does not answer that either,
  or another daemon's call holds the channel (the write could apply once
  that hold goes), the call is refused and the write stays unsettled: it
  is settled in the background, and by the channel's next call through
  this daemon before anything else, and a payment it recorded is then
  refunded.
* **No lock outlives its daemon.**  The hold is a storage key attached to
  this daemon instance's lease: if the daemon dies mid-call, the channel is
  free again within the lease TTL, with no manual unlock.  A hold is also
  what makes a second call on a busy channel fail with
  ``FAILED_PRECONDITION``: at once on this daemon, after a short wait (see
  below) on the others of the group.
* **One storage round trip per call** in steady state, on the call's path:
  the conditional write above (the state is as we last saw it and the
  channel is not held, or only by our own finished call).  The state we compare against is cached from our
  own last write; when another daemon changed it, the failed transaction
  returns the fresh value and we check again with it.  A finished call's
  hold lingers for :data:`_LINGER` before it is deleted in the background,
  and the channel's next call through this daemon within that time takes
  the hold over in its own write, so a client paying call after call costs
  one write per call.  Another daemon that meets a lingering hold waits up
  to :data:`_FOREIGN_WAIT` for it to go before refusing the call.  A
  channel whose lingering hold went unused (its calls go elsewhere, as
  behind a load balancer, or come seldom) has its next holds deleted as
  soon as their calls end, until a call comes back while that deletion is
  under way.
* **No Ethereum RPC per call**: the channel's chain side comes from the
  chain reader's cache.  It is read afresh when a check fails in a way a
  newer chain state could fix (nonce, funds, expiry), and, while a claim is
  pending as far as the stored state tells (its nonce is ahead of the
  cached chain view), once the cached view is older than about one block
  poll interval: the claim may land any block, and a claim with
  ``isSendback`` empties the channel (value and expiration 0) while every
  check still passes against the old view.  So after a claim lands,
  payments are checked against it within about one block poll interval,
  at the cost of an RPC per channel and interval only while claims are
  pending.
* **Several daemons on one storage never accept more than was signed, nor
  one payment twice**: every state change is conditional on the revision it
  was computed from.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from twisted.logger import Logger

from snet_daemon.blockchain.errors import ChainError
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.frontend.wire import Metadata
from snet_daemon.payments import signatures
from snet_daemon.payments.channel import ChannelState, CorruptValue, merge, spendable
from snet_daemon.storage.base import (
    AtomicStorage,
    Condition,
    ConditionFailed,
    Delete,
    Entry,
    LeaseNotFound,
    Put,
    StorageError,
    StorageTimeout,
)

_log = Logger(namespace="snetd.payments.escrow")

CHANNEL_ID: Final = "snet-payment-channel-id"
NONCE: Final = "snet-payment-channel-nonce"
AMOUNT: Final = "snet-payment-channel-amount"
SIGNATURE: Final = "snet-payment-channel-signature-bin"
USER_ADDRESS: Final = "snet-user-address"

#: Channel states kept in memory (the cache is only an optimisation: a miss
#: costs one failed transaction, which returns the fresh value).
_CACHE_LIMIT: Final = 100_000
_MAX_ATTEMPTS: Final = 4
#: How long a refund keeps retrying while storage is unavailable.
_REFUND_PATIENCE: Final = 3.0
#: How long a finished call's hold stays before it is deleted (see the
#: module docstring).  Longer saves more deletions; shorter makes another
#: daemon of the group, called next on the same channel, wait less (and a
#: channel whose lingering hold went unused has its holds deleted at once).
#: With ``benchmarks/paid.py`` (16 channels, one call after another on
#: each): 0.48x of unpaid calls/s at 20 ms, against 0.43x at 5 ms and 0.50x
#: at 50 ms.
_LINGER: Final = 0.02
#: How long a call waits for another daemon's hold to go before it is
#: refused (that daemon's call may have just finished), and the first pause
#: between looks (doubling, up to ``_LINGER``).
_FOREIGN_WAIT: Final = 0.1
_FOREIGN_POLL: Final = 0.002
#: When deleting a hold failed (storage unavailable), the next try.
_RELEASE_RETRY: Final = 0.5
#: How long a hold of ours that a payment write ended by something other
#: than a storage answer (an unexpected error: storage timeouts are settled
#: by the fence) may have left is given before it is deleted.
_LATE_WRITE_GRACE: Final = 2.0
#: Longest pause between looks at a payment write of unknown outcome.
_SETTLE_RETRY_MAX: Final = 8.0

_T = TypeVar("_T")


class _Pending:
    """A write of unknown outcome that has not applied, and still may (see :meth:`EscrowLedger._fence`)."""


_PENDING: Final = _Pending()


class ChainChannel(Protocol):
    """The chain side of a channel (``snet_daemon.blockchain.chain.ChannelInfo``)."""

    @property
    def nonce(self) -> int: ...
    @property
    def sender(self) -> str: ...
    @property
    def signer(self) -> str: ...
    @property
    def recipient(self) -> str: ...
    @property
    def group_id(self) -> bytes: ...
    @property
    def value(self) -> int: ...
    @property
    def expiration(self) -> int: ...


class ChannelSource(Protocol):
    """What the ledger needs from the chain reader."""

    def current_block(self) -> int:
        """The cached block number; raises when it is too old to trust."""

    async def channel(self, channel_id: int, *, fresh: bool = False, recheck: bool = False) -> ChainChannel | None:
        """The channel (None if it does not exist); ``fresh`` skips the cache,
        ``recheck`` skips an entry older than about one block poll interval.

        Raises:
            ChainError: the Ethereum node could not be read (a cached
                channel is still served without it).
        """


class LeaseSource(Protocol):
    """This daemon instance's storage lease (``LeaseKeeper``)."""

    async def current(self) -> int:
        """The lease id to attach holds to."""

    def lost(self, lease_id: int) -> None:
        """Report the lease gone; the next :meth:`current` grants a new one."""


class ChannelKeys(Protocol):
    """Where channel state and holds live in the storage."""

    def channel_state(self, channel_id: int) -> str: ...

    def channel_hold(self, channel_id: int) -> str: ...


@dataclass(frozen=True, slots=True)
class PaymentTerms:
    """The payment group's terms, from the organization and service metadata.

    Attributes:
        mpe_address: the MultiPartyEscrow contract (20 bytes).
        group_id: the payment group served (32 bytes).
        payment_address: where this group is paid (20 bytes).
        expiration_threshold: blocks a channel must stay open beyond now.
        price: the price of a call to a method, in cogs.
    """

    mpe_address: bytes
    group_id: bytes
    payment_address: bytes
    expiration_threshold: int
    price: Callable[[str], int]


@dataclass(frozen=True, slots=True)
class EscrowPayment:
    """The payment metadata of one call."""

    channel_id: int
    nonce: int
    amount: int
    signature: bytes


@dataclass(frozen=True, slots=True)
class Hold:
    """A payment checked and recorded for one call; commit or release it.

    Attributes:
        previous: the channel state entry before this payment (what
            :meth:`EscrowLedger.release` puts back; None: there was none).
        revision: the revision at which the new state was written.
        hold_revision: the hold's (``revision``, or that of the earlier
            call's hold this call took over).
        value: the new state, encoded.
        sender: the channel's sender (forwarded as ``snet-user-address``).
    """

    channel_id: int
    payment: EscrowPayment
    state_key: str
    hold_key: str
    previous: Entry | None
    revision: int
    hold_revision: int
    value: bytes
    sender: str


@dataclass(frozen=True, slots=True)
class _Write:
    """A payment write: what it is conditioned on and what it puts, kept
    to settle it if its reply is lost (see :meth:`EscrowLedger._fence`).

    Attributes:
        previous: the state entry the write is conditioned on (None: absent).
        value: the new state, encoded.
        fence: ``previous``'s value, or the state of a fresh channel when
            there was none: what the fence puts back.
    """

    payment: EscrowPayment
    state_key: str
    hold_key: str
    previous: Entry | None
    value: bytes
    fence: bytes
    sender: str

    def hold(self, revision: int, hold_revision: int) -> Hold:
        return Hold(
            self.payment.channel_id,
            self.payment,
            self.state_key,
            self.hold_key,
            self.previous,
            revision,
            hold_revision,
            self.value,
            self.sender,
        )


# -- metadata parsing ---------------------------------------------------------

#: Longest integer header text looked at: far more than any uint256 takes
#: (256 binary digits with separators), far less than costs anything.
_MAX_INTEGER_TEXT: Final = 1024
_GO_INT: Final = re.compile(r"^[+]?(0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO]?[0-7_]*|[1-9][0-9_]*)$")


def parse_integer(key: str, value: str) -> int:
    """Parse an integer header as the Go daemon does (``big.Int``, base 0).

    Decimal, ``0x`` hex, ``0b`` binary and ``0``/``0o`` octal are accepted,
    with ``_`` between digits.  Negative values and values that do not fit
    in uint256 are refused.

    Raises:
        GrpcError: ``INVALID_ARGUMENT`` with Go's message.
    """
    if len(value) <= 78 and value.isascii() and value.isdigit() and (value[0] != "0" or len(value) == 1):
        # Plain decimal, what every client sends: no need for the pattern
        # (2**256 has 78 digits; longer text goes the careful way, as int()
        # refuses decimal text of over 4,300 digits with its own error).
        number = int(value)
        if number < 1 << 256:
            return number
    text = value.strip()
    try:
        if len(text) > _MAX_INTEGER_TEXT or not _GO_INT.match(text) or "__" in text or text.endswith("_"):
            raise ValueError(text)
        body = text.lstrip("+")
        if len(body) > 1 and body[0] == "0" and body[1] not in "xXbBoO":
            number = int(body[1:].replace("_", "") or "0", 8)
        else:
            number = int(body, 0)
        if number >= 1 << 256:
            raise ValueError(text)
    except ValueError:
        raise GrpcError(Status.INVALID_ARGUMENT, f'incorrect format "{key}": "{value}"') from None
    return number


def metadata_values(metadata: Metadata) -> dict[str, list[str | bytes]]:
    """Metadata as a dict of value lists (keys are already lower case)."""
    values: dict[str, list[str | bytes]] = {}
    for key, value in metadata:
        values.setdefault(key, []).append(value)
    return values


def single(values: dict[str, list[str | bytes]], key: str) -> str | bytes | None:
    """The one value of ``key``, or None.

    Raises:
        GrpcError: ``INVALID_ARGUMENT`` when the key appears more than once.
    """
    found = values.get(key)
    if not found:
        return None
    if len(found) > 1:
        raise GrpcError(Status.INVALID_ARGUMENT, f'too many values for key "{key}": {len(found)}')
    return found[0]


def _required_text(values: dict[str, list[str | bytes]], key: str) -> str:
    value = single(values, key)
    if value is None:
        raise GrpcError(Status.INVALID_ARGUMENT, f'missing "{key}"')
    return value.decode("latin-1") if isinstance(value, bytes) else value


def parse_escrow(values: dict[str, list[str | bytes]]) -> EscrowPayment:
    """The escrow payment in a call's metadata.

    Raises:
        GrpcError: ``INVALID_ARGUMENT`` for a missing, repeated or malformed
            header.
    """
    channel_id = parse_integer(CHANNEL_ID, _required_text(values, CHANNEL_ID))
    nonce = parse_integer(NONCE, _required_text(values, NONCE))
    amount = parse_integer(AMOUNT, _required_text(values, AMOUNT))
    signature = single(values, SIGNATURE)
    if signature is None:
        raise GrpcError(Status.INVALID_ARGUMENT, f'missing "{SIGNATURE}"')
    if isinstance(signature, str):
        signature = signature.encode("latin-1")
    return EscrowPayment(channel_id, nonce, amount, signature)


def channel_label(channel_id: int) -> str:
    """How the Go daemon names a channel in messages: ``{ID: 7}``."""
    return f"{{ID: {channel_id}}}"


# -- the ledger ---------------------------------------------------------------


class EscrowLedger:
    """Checks and records escrow payments, holding each channel for its call.

    Args:
        storage: the shared payment storage.
        keys: key names for channel state and holds.
        chain: the chain reader (cached channel and block number).
        terms: returns the current payment terms (metadata may be reloaded).
        lease: this daemon instance's lease, to attach holds to.
        instance: a name for this daemon instance, unique to the process,
            stored in its holds (a hold with our name and no call of ours in
            flight on its channel is a leftover of ours, safe to take over).
        sleep: ``asyncio.sleep`` (injected for tests).
        clock: the time ``sleep`` sleeps by (``time.monotonic``, the event
            loop's clock).
        linger: how long a finished call's hold stays (:data:`_LINGER`).
        foreign_wait: how long a call waits for another daemon's hold to go
            (:data:`_FOREIGN_WAIT`).
        late_write_grace: how long a write ended by an unexpected error is
            given before a hold of ours it may have left is deleted
            (:data:`_LATE_WRITE_GRACE`).
    """

    def __init__(
        self,
        storage: AtomicStorage,
        keys: ChannelKeys,
        chain: ChannelSource,
        terms: Callable[[], PaymentTerms],
        lease: LeaseSource,
        instance: str,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        linger: float = _LINGER,
        foreign_wait: float = _FOREIGN_WAIT,
        late_write_grace: float = _LATE_WRITE_GRACE,
    ) -> None:
        self._storage = storage
        self._keys = keys
        self._chain = chain
        self._terms = terms
        self._lease = lease
        self._instance = instance.encode("utf-8")
        self._sleep = sleep
        self._clock = clock
        self._linger_time = linger
        self._foreign_wait = foreign_wait
        self._late_write_grace = late_write_grace
        #: Last known state entry per channel (None: known absent).
        self._cache: dict[int, Entry | None] = {}
        #: Channels with a call in flight through this daemon.
        self._busy: set[int] = set()
        #: Our holds whose call is over, by channel: their revision (None:
        #: not known, after a write that timed out) and when they are due
        #: for deletion (``clock`` time).
        self._lingering: dict[int, tuple[int | None, float]] = {}
        #: The same entries as ``(due, channel, revision)``, earliest first;
        #: one no longer in ``_lingering`` (taken over) is skipped when due.
        self._due: list[tuple[float, int, int | None]] = []
        #: Deletions of our holds under way, by channel.
        self._releasing: dict[int, asyncio.Future[None]] = {}
        #: Channels whose holds are deleted as soon as their calls end.
        self._hasty: set[int] = set()
        #: Channels whose call was cancelled while its payment was being
        #: recorded (see :meth:`_abandon`), or while it refunded an earlier
        #: write of unknown outcome (see :meth:`_settle`): busy until that
        #: write or refund is over.
        self._abandoned: set[int] = set()
        #: Background refunds and hold deletions under way (asyncio keeps
        #: only weak references to tasks).
        self._background: set[asyncio.Future[Any]] = set()
        #: Our payment writes of unknown outcome, by channel, with the
        #: revision of the hold they took over (see :meth:`_settle`).
        self._unsettled: dict[int, tuple[_Write, int | None]] = {}
        #: The background tasks settling them, by channel.
        self._settlers: dict[int, asyncio.Future[None]] = {}
        #: The background task deleting lingering holds (None: idle).
        self._sweeper: asyncio.Future[None] | None = None

    async def authorize(self, method: str, payment: EscrowPayment) -> Hold:
        """Check ``payment`` for a call to ``method``; record it and hold the channel.

        Raises:
            GrpcError: the Go daemon's status for each rejection (see the
                module docstring), ``FAILED_PRECONDITION`` when another call
                holds the channel, ``UNAVAILABLE`` when storage is down.
        """
        channel_id = payment.channel_id
        if channel_id in self._busy:
            raise _in_progress(channel_id)
        # Busy from here on, so that no other call on the channel through
        # this daemon starts meanwhile (nor takes our hold for a leftover).
        self._busy.add(channel_id)
        try:
            if channel_id in self._unsettled:
                await self._settle_first(channel_id)
            return await self._authorize(method, payment)
        except BaseException:
            self._free(channel_id)
            raise

    def _free(self, channel_id: int) -> None:
        """The call on the channel is over: free it, unless a write or refund it started goes on."""
        if channel_id not in self._abandoned:
            self._busy.discard(channel_id)

    async def _settle_first(self, channel_id: int) -> None:
        """Settle our earlier write of unknown outcome on the channel before
        this call goes on (see :meth:`_settle`).

        Raises:
            GrpcError: ``UNAVAILABLE`` when storage does not answer,
                ``FAILED_PRECONDITION`` when another daemon's call holds the
                channel (the earlier write can only be settled after it).
        """
        try:
            await self._settle(channel_id)
        except StorageError as exc:
            raise storage_down(exc) from None
        if channel_id in self._unsettled:
            raise _in_progress(channel_id)

    def _abandon(self, write: _Write, record: asyncio.Future[tuple[int, int]]) -> None:
        """The call was cancelled while its payment was being recorded; the write is now over.

        A payment recorded for a call that will not be served is refunded,
        exactly as a failed call's (:meth:`release`, which also frees the
        channel); a hold of ours the write may have left is deleted.
        Without this, a cancelled call would keep the client's payment and
        leave its hold on our live lease, blocking the channel (for other
        daemons and for claims) until this daemon stopped.
        """
        channel_id = write.payment.channel_id
        self._abandoned.discard(channel_id)
        error = None if record.cancelled() else record.exception()
        if record.cancelled() or error is not None:
            self._busy.discard(channel_id)
            if isinstance(error, ConditionFailed):
                self._cache.pop(channel_id, None)
                held = error.current.get(write.hold_key)
                if held is not None and held.value == self._instance:
                    self._linger(channel_id, held.mod_revision)
            elif not isinstance(error, StorageError):
                # Outcome unknown (not a storage answer: _record settles
                # those, see _fence): a hold of ours may be left.
                self._linger(channel_id, None, delay=self._late_write_grace)
            return
        revision, hold_revision = record.result()
        self._remember(channel_id, Entry(write.state_key, write.value, revision, revision, 1))
        self.release(write.hold(revision, hold_revision))

    async def _authorize(self, method: str, payment: EscrowPayment) -> Hold:
        channel_id = payment.channel_id
        terms = self._terms()
        try:
            price = terms.price(method)
        except Exception as exc:
            raise GrpcError(Status.INTERNAL, f"internal error: {exc}") from None
        info = await self._channel_info(channel_id, terms)
        keys = self._keys
        state_key = keys.channel_state(channel_id)
        hold_key = keys.channel_hold(channel_id)
        cached = self._cache.get(channel_id, _MISSING)
        entry: Entry | None = None if cached is _MISSING else cached  # type: ignore[assignment]
        # Whether ``entry`` was read from storage during this call (a cached
        # entry may be stale if another daemon changed the channel).
        entry_fresh = False
        chain_fresh = False
        waited = 0.0
        attempts = 0
        rechecked = False
        while attempts < _MAX_ATTEMPTS:
            attempts += 1
            state = merge(_decode(entry, channel_id), info.nonce)
            if state.nonce > info.nonce and not rechecked:
                # A claim is pending as far as we know: our view of the
                # chain may predate its landing (see the module docstring).
                rechecked = True
                info = await self._channel_info(channel_id, terms, recheck=True)
                state = merge(_decode(entry, channel_id), info.nonce)
            error = _check(payment, state, info, terms, price, self._block())
            if error is not None and error.state_dependent and not entry_fresh:
                # Our idea of the stored state may be out of date: read it.
                entry = await self._read_state(channel_id, state_key)
                entry_fresh = True
                continue
            if error is not None and error.refreshable and not chain_fresh:
                # A newer chain state could make this payment valid (claim
                # landed, funds added, channel extended): look once.
                chain_fresh = True
                fresh = await self._channel_info(channel_id, terms, fresh=True)
                if fresh != info:
                    info = fresh
                    continue
            if error is not None:
                raise error.grpc
            value = ChannelState(state.nonce, payment.amount, payment.signature, state.claimed_amount).encode()
            fence = state.encode() if entry is None else entry.value
            write = _Write(payment, state_key, hold_key, entry, value, fence, info.sender)
            # The write is carried to its end even if the call is cancelled
            # meanwhile (the client went away, its deadline passed): its
            # outcome decides what there is to undo (see :meth:`_abandon`).
            record = asyncio.ensure_future(self._record(write))
            try:
                revision, hold_revision = await asyncio.shield(record)
            except asyncio.CancelledError:
                if not record.cancelled():
                    self._abandoned.add(channel_id)  # busy until _abandon is done
                    self._track(record)  # the stop waits for it, then for the refund
                    record.add_done_callback(functools.partial(self._abandon, write))
                raise
            except ConditionFailed as failed:
                entry = failed.current.get(state_key)
                entry_fresh = True
                self._remember(channel_id, entry)
                held = failed.current.get(hold_key)
                if held is not None and held.value == self._instance:
                    # A hold of ours whose call is over (its deletion not
                    # known here yet): take it over.
                    self._linger(channel_id, held.mod_revision)
                elif held is not None:
                    # Another daemon's call, in flight or just finished.
                    waited = await self.wait_for_hold(channel_id, waited)
                    attempts -= 1  # waiting is not contention
                continue
            except LeaseNotFound as gone:
                # Our lease expired, and with it every hold we had.
                self._lease.lost(gone.lease_id)
                continue
            except StorageError as exc:
                raise storage_down(exc) from None
            self._remember(channel_id, Entry(state_key, value, revision, revision, 1))
            return write.hold(revision, hold_revision)
        raise GrpcError(Status.UNAVAILABLE, f"too much contention on channel {channel_label(channel_id)}; retry")

    def commit(self, hold: Hold) -> None:
        """The call succeeded: its payment stays as recorded.

        Nothing is written: the hold lingers, then is deleted in the
        background unless the channel's next call takes it over (or, for a
        channel whose last lingering hold went unused, is deleted now).
        """
        channel_id = hold.channel_id
        self._busy.discard(channel_id)
        if channel_id in self._hasty:
            self._release_now(channel_id, hold.hold_revision)
        else:
            self._linger(channel_id, hold.hold_revision)

    def release(self, hold: Hold) -> asyncio.Future[None]:
        """The call failed: put the channel state back as it was, drop the hold.

        Returns the refund, under way; :meth:`settle` waits for it too, so
        a refund whose call ended meanwhile (cancelled twice) still lands
        before the daemon stops.  Storage that is briefly unavailable is
        retried for a few seconds.  The refund never fails (the call has
        failed already): if the state cannot be put back, because storage
        stays down or because the state moved on after our lease, and with
        it our hold, was lost, the payment stays recorded and a warning
        says so.
        """
        return self._track(asyncio.ensure_future(self._refund(hold)))

    def _track(self, task: asyncio.Future[_T]) -> asyncio.Future[_T]:
        """Keep ``task`` until it is done, for :meth:`settle` (and because
        asyncio keeps only weak references to tasks)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _refund(self, hold: Hold) -> None:
        try:
            await self._put_back(hold)
        finally:
            self._busy.discard(hold.channel_id)

    async def _put_back(self, hold: Hold) -> None:
        """Put the state back as it was before ``hold``'s payment and delete the hold (see :meth:`release`)."""
        channel_id = hold.channel_id
        previous = hold.previous
        restore: Put | Delete = Delete(hold.state_key) if previous is None else Put(hold.state_key, previous.value)
        conditions = [Condition(hold.state_key, mod_revision=hold.revision)]
        ops: list[Put | Delete] = [restore, Delete(hold.hold_key)]
        waited = 0.0
        delay = 0.05
        started = self._clock()
        while True:
            try:
                revision = await self._storage.transaction(conditions, ops)
            except ConditionFailed as failed:
                current = failed.current.get(hold.state_key)
                if _value(current) == _value(previous):
                    # An earlier attempt that timed out did apply.
                    self._remember(channel_id, current)
                    return
                self._cache.pop(channel_id, None)
                _log.warn(
                    "the payment for a failed call on channel {channel} stays recorded: "
                    "the channel changed while our hold was lost",
                    channel=channel_id,
                )
                return
            except StorageError as exc:
                # A timeout's outcome is unknown: trying again tells (see
                # ConditionFailed).  Patience counts the time the tries
                # took too: each timeout takes the whole request timeout,
                # and the failed call's status waits for this refund.
                if max(waited, self._clock() - started) >= _REFUND_PATIENCE:
                    self._cache.pop(channel_id, None)
                    # Our hold is still there: delete it when storage is back.
                    self._linger(channel_id, hold.hold_revision)
                    _log.warn(
                        "the payment for a failed call on channel {channel} stays recorded: "
                        "storage unavailable ({error})",
                        channel=channel_id,
                        error=exc,
                    )
                    return
            else:
                self._remember(
                    channel_id,
                    None if previous is None else Entry(hold.state_key, previous.value, revision, revision, 1),
                )
                return
            await self._sleep(delay)
            waited += delay
            delay = min(delay * 2, 1.0)

    async def wait_for_hold(self, channel_id: int, waited: float) -> float:
        """Pause before looking again at a channel another daemon holds.

        Its call may have just finished, its hold lingering.  Pauses start
        at :data:`_FOREIGN_POLL` and double, up to the linger time.

        Args:
            waited: how long the caller has waited so far.

        Returns:
            How long it has waited now.

        Raises:
            GrpcError: ``FAILED_PRECONDITION`` once ``foreign_wait`` has
                passed: the hold belongs to a call in flight.
        """
        if waited >= self._foreign_wait:
            raise _in_progress(channel_id) from None
        pause = max(_FOREIGN_POLL, min(waited, self._linger_time, self._foreign_wait - waited))
        await self._sleep(pause)
        return waited + pause

    async def quiesce(self, channel_id: int) -> None:
        """Delete our lingering hold on the channel now, if there is one.

        For the rare writers that need the channel free of holds (claims,
        prepayments): afterwards a hold found there belongs to a call in
        flight.  Storage failures are left to the caller's own write.
        """
        if channel_id in self._unsettled:
            await self._settle_idle(channel_id)  # a hold it left is then ours to delete, or refunded
        releasing = self._releasing.get(channel_id)
        if releasing is not None:
            await asyncio.shield(releasing)
        lingering = self._lingering.pop(channel_id, None)
        if lingering is not None:
            # Carried to its end if the caller is cancelled meanwhile: the
            # sweeper no longer knows of this hold.
            await asyncio.shield(self._release_now(channel_id, lingering[0]))

    async def settle(self, within: float) -> None:
        """Wait up to ``within`` seconds for what runs in the background:
        refunds, hold deletions, payment writes of cancelled calls (and the
        refunds they lead to), writes of unknown outcome being settled (the
        daemon stops: storage closes next)."""

        async def drain() -> None:
            tried: set[int] = set()
            while True:
                # Unsettled writes now, not after the settler's pause (also
                # those of calls whose writes ended meanwhile).
                for channel_id in [channel for channel in self._unsettled if channel not in tried]:
                    tried.add(channel_id)
                    await self._settle_idle(channel_id)
                pending = {task for task in self._background if not task.done()}
                if not pending:
                    return
                await asyncio.wait(pending)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drain(), within)

    def close(self) -> None:
        """Stop deleting lingering holds (the daemon stops; its lease goes
        with them) and settling writes of unknown outcome."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for settler in list(self._settlers.values()):
            settler.cancel()
        for channel_id in self._unsettled:
            _log.warn(
                "the payment write of a refused call on channel {channel} is of unknown outcome as the daemon "
                "stops: if it applied, the payment stays recorded",
                channel=channel_id,
            )
        self._unsettled.clear()

    async def channel_state(
        self, channel_id: int, *, fresh_chain: bool = False
    ) -> tuple[ChannelState, ChainChannel] | None:
        """The merged state of a channel (None if the chain does not know it).

        Reads the storage (no cache): for the channel state service.  See
        :meth:`stored_channel` for ``fresh_chain`` and the errors.
        """
        found = await self.stored_channel(channel_id, fresh_chain=fresh_chain)
        return None if found is None else (found[0], found[1])

    async def stored_channel(
        self, channel_id: int, *, fresh_chain: bool = False
    ) -> tuple[ChannelState, ChainChannel, Entry | None] | None:
        """:meth:`channel_state`, with the stored entry it was merged from.

        For writers that change the state: a write conditioned on this
        entry is sure to change the state they computed from.

        Args:
            fresh_chain: read the channel from the chain itself, not from the
                chain reader's cache.  For answers that depend on whether a
                claim has landed, once the cached nonce disagrees with the
                stored one: the cache may predate a claim that landed through
                another daemon of the group.  Without it, a stored nonce
                ahead of the cached one (a claim pending as far as we know)
                still makes a cached view older than about one block poll
                interval be read again, as for a paid call.

        Returns:
            None only when the chain does not know the channel.

        Raises:
            GrpcError: ``UNAVAILABLE`` when storage or the Ethereum node is
                down (the caller must not take that for "no such channel");
                ``INTERNAL`` with the reason when the channel pays another
                address or belongs to another group, or its stored state is
                unreadable.
        """
        terms = self._terms()
        info = await self._chain_view(channel_id, fresh=fresh_chain)
        if info is None:
            return None
        reason = _not_ours(info, terms)
        if reason is not None:
            raise GrpcError(Status.INTERNAL, reason)
        try:
            entry = await self._storage.get(self._keys.channel_state(channel_id))
        except StorageError as exc:
            raise storage_down(exc) from None
        self._remember(channel_id, entry)
        state = merge(_decode(entry, channel_id), info.nonce)
        if state.nonce > info.nonce and not fresh_chain:
            info = await self._chain_view(channel_id, recheck=True)
            if info is None:
                return None
            state = merge(_decode(entry, channel_id), info.nonce)
        return state, info, entry

    async def _chain_view(self, channel_id: int, *, fresh: bool = False, recheck: bool = False) -> ChainChannel | None:
        """The chain reader's channel for the daemon's own services (see :meth:`stored_channel`).

        Raises:
            GrpcError: ``UNAVAILABLE`` when the Ethereum node is down.
        """
        try:
            return await self._read_channel(channel_id, fresh, recheck)
        except ChainError as exc:
            raise chain_down(channel_id, exc) from None

    async def prepay(
        self,
        payment: EscrowPayment,
        planned_key: str,
        add_planned: Callable[[Entry | None, int], bytes],
        precheck: Callable[[ChannelState, ChainChannel], None],
        also_read: Sequence[str] = (),
    ) -> dict[str, bytes | None]:
        """Accept a signed amount paid in advance (``TokenService/GetToken``).

        The payment is checked as an escrow payment except for the income:
        any amount not below the last one accepted will do.  A larger amount
        becomes the channel's claimable payment and raises the planned
        amount at ``planned_key`` by the difference, in **one** conditional
        transaction (channel state and planned amount as read, no escrow
        call holding the channel); an equal amount changes nothing, so
        clients asking again for the same amount (snet-sdk does, from
        several threads) all get the same answer.

        Args:
            payment: the signed amount (``claim_signature`` of the request).
            planned_key: where the planned amount lives.
            add_planned: ``(current planned entry, increase) -> new value``.
            precheck: the token service's own checks on the merged state,
                run before the payment checks (raises ``GrpcError``).
            also_read: more keys to read with the state (used amount).

        Returns:
            The values of ``planned_key`` and ``also_read`` once the amount
            is accepted (None for absent keys).

        Raises:
            GrpcError: ``UNKNOWN`` with the Go daemon's message for every
                rejection (its token service returns plain errors),
                ``UNAVAILABLE`` when storage is down or too busy.
        """
        channel_id = payment.channel_id
        terms = self._terms()
        keys = self._keys
        state_key = keys.channel_state(channel_id)
        hold_key = keys.channel_hold(channel_id)

        async def lookup(*, fresh: bool = False, recheck: bool = False) -> ChainChannel:
            # Every read of the channel fails in Go's words for GetToken,
            # whichever of the three it is (first, recheck, fresh).
            try:
                return await self._channel_info(channel_id, terms, fresh=fresh, recheck=recheck)
            except GrpcError as failed:
                if failed.status == Status.UNAUTHENTICATED:
                    raise GrpcError(Status.UNKNOWN, f"channel is not found, channelId: {channel_id}") from None
                raise GrpcError(
                    Status.UNKNOWN, f"error:{failed.message} was seen on retrieving details of channelID:{channel_id}"
                ) from None

        info = await lookup()
        chain_fresh = rechecked = False
        await self.quiesce(channel_id)
        read_keys = [state_key, hold_key, planned_key, *also_read]
        waited = 0.0
        attempts = 0
        while attempts < _MAX_ATTEMPTS:
            attempts += 1
            try:
                entries = await self._storage.get_many(read_keys)
            except StorageError as exc:
                raise storage_down(exc) from None
            entry = entries[state_key]
            self._remember(channel_id, entry)
            state = merge(_decode(entry, channel_id), info.nonce)
            if state.nonce > info.nonce and not rechecked:
                rechecked = True  # as for a paid call (see _authorize)
                info = await lookup(recheck=True)
                state = merge(_decode(entry, channel_id), info.nonce)
            precheck(state, info)
            error = _check(payment, state, info, terms, None, self._block())
            if error is not None and error.refreshable and not chain_fresh:
                chain_fresh = True
                fresh = await lookup(fresh=True)
                if fresh != info:
                    info = fresh
                    continue
            if error is not None:
                code = Status.INTERNAL if error.grpc.message == "cannot determine current block" else Status.UNKNOWN
                raise GrpcError(code, error.grpc.message)
            values = {key: _value(entries[key]) for key in (planned_key, *also_read)}
            increase = payment.amount - state.authorized_amount
            if increase == 0:
                return values
            if entries[hold_key] is not None and channel_id not in self._busy:
                # Another daemon's call, or its hold lingering: wait a little.
                try:
                    waited = await self.wait_for_hold(channel_id, waited)
                except GrpcError as busy:
                    raise GrpcError(Status.UNKNOWN, busy.message) from None
                attempts -= 1
                continue
            if channel_id in self._busy:
                raise GrpcError(
                    Status.UNKNOWN, f"another transaction on channel: {channel_label(channel_id)} is in progress"
                )
            new_state = ChannelState(state.nonce, payment.amount, payment.signature, state.claimed_amount).encode()
            planned = add_planned(entries[planned_key], increase)
            try:
                revision = await self._storage.transaction(
                    [
                        Condition.unchanged(state_key, entry),
                        Condition.absent(hold_key),
                        Condition.unchanged(planned_key, entries[planned_key]),
                    ],
                    [Put(state_key, new_state), Put(planned_key, planned)],
                )
            except ConditionFailed:
                continue  # a payment or another prepayment landed meanwhile: look again
            except StorageError as exc:
                self._cache.pop(channel_id, None)
                raise storage_down(exc) from None
            self._remember(channel_id, Entry(state_key, new_state, revision, revision, 1))
            values[planned_key] = planned
            return values
        raise GrpcError(Status.UNAVAILABLE, f"too much contention on channel {channel_label(channel_id)}; retry")

    def forget(self, channel_id: int) -> None:
        """Drop the cached state of a channel (after a change made elsewhere)."""
        self._cache.pop(channel_id, None)

    # -- internals ------------------------------------------------------------

    def _block(self) -> int | GrpcError:
        try:
            return self._chain.current_block()
        except Exception:
            return GrpcError(Status.INTERNAL, "cannot determine current block")

    async def _channel_info(
        self, channel_id: int, terms: PaymentTerms, fresh: bool = False, recheck: bool = False
    ) -> ChainChannel:
        """The chain side of a channel of our group, for a payment
        (``fresh``, ``recheck``: see :meth:`ChannelSource.channel`).

        Raises:
            GrpcError: the Go daemon's statuses for a paid call (§6.2):
                ``INTERNAL`` "payment channel error: ..." when the chain
                cannot be read or the channel is not the group's,
                ``UNAUTHENTICATED`` when the chain does not know it.
        """
        try:
            info = await self._read_channel(channel_id, fresh, recheck)
        except Exception as exc:
            raise GrpcError(Status.INTERNAL, f"payment channel error: {exc}") from None
        if info is None:
            raise GrpcError(Status.UNAUTHENTICATED, f'payment channel "{channel_label(channel_id)}" not found')
        reason = _not_ours(info, terms)
        if reason is not None:
            raise GrpcError(Status.INTERNAL, f"payment channel error: {reason}")
        return info

    async def _read_channel(self, channel_id: int, fresh: bool, recheck: bool = False) -> ChainChannel | None:
        """The channel from the chain reader.

        A channel its cache does not know is read from the chain already,
        and a channel opened since it was found absent is found within one
        block poll interval (the reader keeps "not found" no longer): a second,
        fresh read would only double the RPCs that anybody can cause by
        naming made-up channel ids, before any authentication.

        Raises:
            ChainError: from the chain reader.
        """
        return await self._chain.channel(channel_id, fresh=fresh, recheck=recheck)

    async def _read_state(self, channel_id: int, state_key: str) -> Entry | None:
        try:
            entry = await self._storage.get(state_key)
        except StorageError as exc:
            raise storage_down(exc) from None
        self._remember(channel_id, entry)
        return entry

    def _remember(self, channel_id: int, entry: Entry | None) -> None:
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[channel_id] = entry

    async def _record(self, write: _Write) -> tuple[int, int]:
        """Write the new state and hold the channel in one transaction.

        Conditions: the state is still ``write.previous``, and the channel
        is free, or held by our lingering hold, which is then taken over as
        it is (it already names us and our lease; if the lease was lost, the
        hold went with it and the condition fails).

        Returns:
            The transaction's revision and the hold's.

        Raises:
            ConditionFailed, LeaseNotFound, StorageError: from the storage.
                A StorageTimeout is raised only when the write did not
                apply, or when that could not be told yet (it is then
                settled in the background: see :meth:`_fence`).
        """
        channel_id = write.payment.channel_id
        state_key, hold_key = write.state_key, write.hold_key
        releasing = self._releasing.get(channel_id)
        if releasing is not None:
            # Our hold is being deleted: let that land first.  The client
            # came back before it did: let the channel's holds linger again.
            self._hasty.discard(channel_id)
            await asyncio.shield(releasing)
        taken = self._lingering.pop(channel_id, None)
        lingering = None if taken is None else taken[0]
        try:
            if lingering is not None:
                revision = await self._storage.transaction(
                    [Condition.unchanged(state_key, write.previous), Condition(hold_key, mod_revision=lingering)],
                    [Put(state_key, write.value)],
                )
                return revision, lingering
            lease = await self._lease.current()
            revision = await self._storage.transaction(
                [Condition.unchanged(state_key, write.previous), Condition.absent(hold_key)],
                [Put(state_key, write.value), Put(hold_key, self._instance, lease=lease)],
            )
            return revision, revision
        except StorageTimeout:
            # The write may have applied, or may still apply: settle it.
            # If it applied, the payment is ours and the call goes on; if
            # not, or if that cannot be told yet, the call is refused.
            try:
                outcome = await self._fence(write, lingering)
            except StorageError:
                outcome = _PENDING
            if taken is not None and lingering is None:
                # A hold of ours that may be there (see _linger): still to go.
                self._linger(channel_id, None, delay=self._linger_time)
            if isinstance(outcome, _Pending):
                # A hold this write took over stays as it is until then: if
                # it went first, a payment the write recorded could no
                # longer be told from another daemon's.
                self._unsettle(write, lingering)
                raise
            if outcome is None:
                raise
            return outcome
        except (ConditionFailed, LeaseNotFound):
            raise  # the caller learns from it whether a hold is still there
        except BaseException:
            if taken is not None:
                self._linger(channel_id, taken[0])
            raise

    async def _fence(self, write: _Write, lingering: int | None) -> tuple[int, int] | _Pending | None:
        """Tell whether ``write``, whose reply was lost, applied, and make
        sure it never applies later.

        A write of unknown outcome may still be applied by etcd long after
        its reply was due (a proposal has no expiry), leaving a payment the
        client was told failed and a hold that nothing of ours knows about.
        The fence is a second write under the write's own conditions that
        puts the state back as it was.  If it applies, the state's revision
        has moved and the lost write can never apply.  If it does not, the
        state and hold it was compared against tell why:

        * the state moved on: the lost write can no longer apply either; it
          applied if the state is its value and the hold is the one it put
          (or took over), at the same revision;
        * the state is as it was, so the lost write has not applied: it can
          never apply if the hold it took over is gone; if it was to put a
          hold of its own, a hold there (another daemon's call) keeps it
          from applying only while it stays.  Nothing is written then (the
          fence would move the revision under that call's feet, failing
          its refund); the write is still unsettled.

        No call of ours writes the channel while one of our writes is
        unsettled (:meth:`_settle`), so a state and hold of ours that match
        can only be this write's.

        Args:
            lingering: the revision of our lingering hold the write took
                over (None: the write put a hold of its own).

        Returns:
            The write's revision and its hold's if it applied; None if it
            did not and never will; :data:`_PENDING` if it has not yet.

        Raises:
            StorageError: no answer either.
        """
        channel_id = write.payment.channel_id
        if lingering is None:
            as_written = Condition.absent(write.hold_key)
        else:
            as_written = Condition(write.hold_key, mod_revision=lingering)
        try:
            revision = await self._storage.transaction(
                [Condition.unchanged(write.state_key, write.previous), as_written], [Put(write.state_key, write.fence)]
            )
        except ConditionFailed as failed:
            state, held = failed.current.get(write.state_key), failed.current.get(write.hold_key)
            if _revision(state) == _revision(write.previous):
                return _PENDING if lingering is None else None
            ours = held if held is not None and held.value == self._instance else None
            if (
                ours is not None
                and state is not None
                and state.value == write.value
                and ours.mod_revision == (state.mod_revision if lingering is None else lingering)
            ):
                return state.mod_revision, ours.mod_revision
            self._remember(channel_id, state)
            if ours is not None:
                self._linger(channel_id, ours.mod_revision)  # a leftover of ours: let it go
            return None
        self._remember(channel_id, Entry(write.state_key, write.fence, revision, revision, 1))
        if lingering is not None:
            self._linger(channel_id, lingering)  # the takeover wrote no hold: ours is as it was
        return None

    def _unsettle(self, write: _Write, lingering: int | None) -> None:
        """Leave ``write`` to :meth:`_settle` (its outcome could not be told)."""
        channel_id = write.payment.channel_id
        self._unsettled[channel_id] = (write, lingering)
        settler = self._settlers.get(channel_id)
        if settler is None or settler.done():  # done: it left as this write came
            settler = asyncio.ensure_future(self._keep_settling(channel_id))
            self._settlers[channel_id] = settler
            settler.add_done_callback(functools.partial(self._settler_done, channel_id))

    def _settler_done(self, channel_id: int, settler: asyncio.Future[None]) -> None:
        if self._settlers.get(channel_id) is settler:
            del self._settlers[channel_id]

    async def _settle(self, channel_id: int) -> None:
        """Try once to settle our unsettled write on the channel (the caller
        holds the channel busy); refund it if it applied.

        Its call was refused (UNAVAILABLE), so a payment it recorded is
        given back, as a failed call's.  Every call of ours on the channel
        settles first (:meth:`authorize`): none can build on the write's
        payment, or take its hold over, before it is refunded.

        Raises:
            StorageError: storage did not answer.
        """
        unsettled = self._unsettled.get(channel_id)
        if unsettled is None:
            return
        write, lingering = unsettled
        outcome = await self._fence(write, lingering)
        if isinstance(outcome, _Pending):
            return
        del self._unsettled[channel_id]
        if outcome is None:
            return
        _log.info(
            "a payment write on channel {channel} applied after its call was refused: refunding it",
            channel=channel_id,
        )
        refund = self._track(asyncio.ensure_future(self._put_back(write.hold(*outcome))))
        try:
            await asyncio.shield(refund)
        except asyncio.CancelledError:
            # Carried to its end, the channel busy until then: no call of
            # ours may build on the payment, or take its hold, meanwhile.
            self._abandoned.add(channel_id)
            refund.add_done_callback(functools.partial(self._refunded, channel_id))
            raise

    def _refunded(self, channel_id: int, _: asyncio.Future[None]) -> None:
        self._abandoned.discard(channel_id)
        self._busy.discard(channel_id)

    async def _settle_idle(self, channel_id: int) -> None:
        """:meth:`_settle`, unless a call of ours is on the channel (it settles first)."""
        if channel_id in self._busy:
            return
        self._busy.add(channel_id)
        try:
            await self._settle(channel_id)
        except StorageError as exc:
            _log.debug("payment write on channel {channel} not settled yet: {error}", channel=channel_id, error=exc)
        finally:
            self._free(channel_id)

    async def _keep_settling(self, channel_id: int) -> None:
        """Settle our unsettled write on the channel in the background, pausing longer each time."""
        delay = _RELEASE_RETRY
        try:
            while channel_id in self._unsettled:
                await self._sleep(delay)
                delay = min(delay * 2, _SETTLE_RETRY_MAX)
                await self._settle_idle(channel_id)
        except Exception:
            self._unsettled.pop(channel_id, None)
            _log.failure("settling a payment write on channel {channel} failed", channel=channel_id)

    def _linger(self, channel_id: int, revision: int | None, delay: float | None = None) -> None:
        """Let our hold at ``revision`` linger, then delete it in the background.

        ``revision`` None: a hold of ours may be there (a write timed out);
        it is deleted if it names us and no call of ours holds the channel.
        """
        due = self._clock() + (self._linger_time if delay is None else delay)
        self._lingering[channel_id] = (revision, due)
        heapq.heappush(self._due, (due, channel_id, revision))
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        """Delete each lingering hold when it is due, while there are any."""
        lingering, queue = self._lingering, self._due
        try:
            while queue:
                now = self._clock()
                if queue[0][0] > now:
                    # A hold lingering anew is due one linger time from now,
                    # which may be sooner than a retry or a grace at the head
                    # of the queue: never sleep longer than that.
                    await self._sleep(min(queue[0][0] - now, self._linger_time))
                    continue
                due: dict[int, int | None] = {}
                while queue and queue[0][0] <= now:
                    at, channel_id, revision = heapq.heappop(queue)
                    if lingering.get(channel_id) == (revision, at):  # not taken over or lingering anew
                        del lingering[channel_id]
                        due[channel_id] = revision
                if len(self._hasty) + len(due) > _CACHE_LIMIT:
                    self._hasty.clear()
                self._hasty.update(due)  # nobody took these holds over
                # Not waited for: a deletion held up by slow storage must not
                # hold up the next ones that come due.
                for channel_id, revision in due.items():
                    self._release_now(channel_id, revision)
        finally:
            self._sweeper = None

    def _release_now(self, channel_id: int, revision: int | None) -> asyncio.Future[None]:
        """Start deleting our hold at ``revision`` (see :meth:`_release`)."""
        release = self._track(asyncio.ensure_future(self._release(channel_id, revision)))
        self._releasing[channel_id] = release
        release.add_done_callback(functools.partial(self._released, channel_id))
        return release

    def _released(self, channel_id: int, release: asyncio.Future[None]) -> None:
        if self._releasing.get(channel_id) is release:
            del self._releasing[channel_id]

    async def _release(self, channel_id: int, revision: int | None) -> None:
        """Delete our hold at ``revision`` (see :meth:`_linger`); storage
        failures are tried again later."""
        hold_key = self._keys.channel_hold(channel_id)
        if revision is None:
            if channel_id in self._busy:
                # A call of ours is on the channel: a hold there may be its
                # own.  Look again after it (it may fail before meeting the
                # hold, which would then stay on our live lease).
                self._linger(channel_id, None, delay=self._linger_time)
                return
            ours = Condition.has_value(hold_key, self._instance)
        else:
            ours = Condition(hold_key, mod_revision=revision)
        try:
            await self._storage.transaction([ours], [Delete(hold_key)])
        except ConditionFailed:
            pass  # gone already (our lease was lost), or not ours
        except StorageError as exc:
            self._linger(channel_id, revision, delay=_RELEASE_RETRY)
            _log.debug("could not delete the hold on channel {channel} yet: {error}", channel=channel_id, error=exc)


_MISSING: Final = object()


def _revision(entry: Entry | None) -> int:
    return 0 if entry is None else entry.mod_revision


def _value(entry: Entry | None) -> bytes | None:
    return None if entry is None else entry.value


@dataclass(frozen=True, slots=True)
class _Rejection:
    grpc: GrpcError
    #: A fresher chain state could fix it (worth one chain re-read).
    refreshable: bool = False
    #: It depends on the stored channel state (worth one storage re-read
    #: when that state came from the cache).
    state_dependent: bool = False


def _check(
    payment: EscrowPayment,
    state: ChannelState,
    info: ChainChannel,
    terms: PaymentTerms,
    price: int | None,
    block: int | GrpcError,
) -> _Rejection | None:
    """The Go daemon's checks, in its order; the first failure wins.

    Only failures of an authentic payment are marked refreshable, so that
    garbage cannot make the daemon read the chain afresh on every call.
    With ``price`` None (a prepayment) the income is not checked.
    """
    try:
        signer: bytes | None = signatures.recover(
            signatures.mpe_claim(terms.mpe_address, payment.channel_id, payment.nonce, payment.amount),
            payment.signature,
        )
    except (signatures.SignatureError, ValueError):
        signer = None
    authentic = signer is not None and signer in (
        signatures.address_bytes(info.signer),
        signatures.address_bytes(info.sender),
    )
    if payment.nonce != state.nonce:
        return _Rejection(
            GrpcError(
                Status.INCORRECT_NONCE,
                f"incorrect payment channel nonce, latest: {state.nonce}, sent: {payment.nonce}",
            ),
            # A claim may have landed on chain since we last looked, or
            # another daemon started one.
            refreshable=authentic and payment.nonce > state.nonce,
            state_dependent=authentic,
        )
    if signer is None:
        return _Rejection(GrpcError(Status.UNAUTHENTICATED, "payment signature is not valid"))
    if not authentic:
        return _Rejection(GrpcError(Status.UNAUTHENTICATED, "payment is not signed by channel signer/sender"))
    if isinstance(block, GrpcError):
        return _Rejection(block)
    if block + terms.expiration_threshold >= info.expiration:
        return _Rejection(
            GrpcError(
                Status.UNAUTHENTICATED,
                f"payment channel is near to be expired, expiration time: {info.expiration}, "
                f"current block: {block}, expiration threshold: {terms.expiration_threshold}",
            ),
            refreshable=True,
        )
    if state.nonce > info.nonce + 1:
        # Two claims ahead of our view of the chain: the earlier claim's
        # amount is not in the state any more.  Only a fresher view helps.
        label = channel_label(payment.channel_id)
        return _Rejection(GrpcError(Status.UNAVAILABLE, f"payment channel {label} is being claimed; retry"), True)
    available = spendable(state, info.nonce, info.value)
    if available < payment.amount:
        return _Rejection(
            GrpcError(
                Status.UNAUTHENTICATED,
                f"not enough tokens on payment channel, channel amount: {available}, payment amount: {payment.amount}",
            ),
            refreshable=True,
        )
    income = payment.amount - state.authorized_amount
    if price is not None and income != price:
        return _Rejection(
            GrpcError(Status.UNAUTHENTICATED, f"income {income} does not equal to price {price}"),
            state_dependent=True,
        )
    return None


def _decode(entry: Entry | None, channel_id: int) -> ChannelState | None:
    if entry is None:
        return None
    try:
        return ChannelState.decode(entry.value)
    except CorruptValue as exc:
        raise GrpcError(
            Status.INTERNAL, f"payment channel error: stored state of channel {channel_id} is unreadable: {exc}"
        ) from None


def _not_ours(info: ChainChannel, terms: PaymentTerms) -> str | None:
    """Why the channel is not one this payment group may be paid on (None: it is).

    The Go daemon's reasons: the channel pays another address, or belongs
    to another group.
    """
    if signatures.address_bytes(info.recipient) != terms.payment_address:
        return (
            f"recipient address from blockchain {info.recipient} is not equal to the payment address "
            f"of the group {signatures.checksum(terms.payment_address)}"
        )
    if info.group_id != terms.group_id:
        return (
            "channel received belongs to another group of replicas, "
            f"current group: {terms.group_id.hex()}, channel group: {info.group_id.hex()}"
        )
    return None


def chain_down(channel_id: int, exc: ChainError) -> GrpcError:
    """The error of the daemon's own services when the Ethereum node cannot be read.

    ``UNAVAILABLE``, as for storage outages (:func:`storage_down`): the
    request may succeed when retried, and it is not the client's fault.
    Paid calls keep the Go daemon's ``INTERNAL`` "payment channel error"
    instead (see :meth:`EscrowLedger._channel_info`).
    """
    label = channel_label(channel_id)
    return GrpcError(Status.UNAVAILABLE, f"cannot read channel {label} from the Ethereum node: {exc}")


def _in_progress(channel_id: int) -> GrpcError:
    return GrpcError(
        Status.FAILED_PRECONDITION,
        f"another transaction on channel: {channel_label(channel_id)} is in progress",
    )


def storage_down(exc: Exception) -> GrpcError:
    """A client's error for a storage failure: its kind, not its details.

    Used by every payment service, so a client never sees etcd's endpoints.

    The details (endpoints, etcd's own words) are for the operator: logged
    here at debug level, as etcd's client already logs outages; a warning
    per refused call would flood the log for the length of one.
    """
    _log.debug("payment storage failed: {error}", error=exc)
    if isinstance(exc, StorageTimeout):
        return GrpcError(Status.UNAVAILABLE, "payment storage did not answer in time")
    return GrpcError(Status.UNAVAILABLE, "payment storage is unavailable")
