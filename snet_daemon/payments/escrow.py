"""Escrow (pay-per-call) payments: check a payment, hold it, commit it.

A paid call carries a signed, cumulative amount on an MPE payment channel
(``snet-payment-channel-*`` metadata).  The daemon checks it exactly as the
Go daemon does (``snet-daemon.md`` §6.2: same order, gRPC codes and
messages, including code 1000 for a wrong nonce), then keeps the books
without the Go daemon's faults:

* **Charge on success only.**  :meth:`EscrowLedger.authorize` *holds* the
  payment before the call; :meth:`EscrowLedger.commit` records it after the
  service answered OK; :meth:`EscrowLedger.release` drops it otherwise.
* **No lock outlives its daemon.**  The hold is a storage key attached to
  this daemon instance's lease: if the daemon dies mid-call, the channel is
  free again within the lease TTL, with no manual unlock.
* **Two storage round trips per call** in steady state: the hold is one
  conditional transaction (the channel state is as we last saw it and no
  hold exists), the commit another (our hold is still there: write the new
  state, drop the hold).  The state we compare against is cached from our
  own last write; when another daemon changed it, the failed transaction
  returns the fresh value and we check again with it.
* **No Ethereum RPC per call**: the channel's chain side comes from the
  chain reader's cache, read afresh only when a check fails in a way a
  newer chain state could fix (unknown channel, nonce, funds, expiry).
* **Several daemons on one storage never accept more than was signed, nor
  one payment twice**: every state change is conditional on the revision it
  was computed from.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from twisted.logger import Logger

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.frontend.wire import Metadata
from snet_daemon.payments import signatures
from snet_daemon.payments.channel import ChannelState, CorruptValue, merge
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
_COMMIT_PATIENCE: Final = 3.0


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

    async def channel(self, channel_id: int, *, fresh: bool = False) -> ChainChannel | None:
        """The channel (None if it does not exist); ``fresh`` skips the cache."""


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
    """A payment checked and held for one call; commit or release it."""

    channel_id: int
    payment: EscrowPayment
    state_key: str
    hold_key: str
    state_entry: Entry | None
    hold_revision: int
    new_state: ChannelState
    sender: str


# -- metadata parsing ---------------------------------------------------------

_GO_INT: Final = re.compile(r"^[+]?(0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO]?[0-7_]*|[1-9][0-9_]*)$")


def parse_integer(key: str, value: str) -> int:
    """Parse an integer header as the Go daemon does (``big.Int``, base 0).

    Decimal, ``0x`` hex, ``0b`` binary and ``0``/``0o`` octal are accepted,
    with ``_`` between digits.  Negative values and values that do not fit
    in uint256 are refused.

    Raises:
        GrpcError: ``INVALID_ARGUMENT`` with Go's message.
    """
    text = value.strip()
    try:
        if not _GO_INT.match(text) or "__" in text or text.endswith("_"):
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
    """Checks, holds and records escrow payments.

    Args:
        storage: the shared payment storage.
        keys: key names for channel state and holds.
        chain: the chain reader (cached channel and block number).
        terms: returns the current payment terms (metadata may be reloaded).
        lease: this daemon instance's lease, to attach holds to.
        instance: a name for this daemon instance, stored in its holds.
        sleep: ``asyncio.sleep`` (injected for tests).
    """

    def __init__(
        self,
        storage: AtomicStorage,
        keys: ChannelKeys,
        chain: ChannelSource,
        terms: Callable[[], PaymentTerms],
        lease: LeaseSource,
        instance: str,
        sleep: Callable[[float], object] = asyncio.sleep,
    ) -> None:
        self._storage = storage
        self._keys = keys
        self._chain = chain
        self._terms = terms
        self._lease = lease
        self._instance = instance.encode("utf-8")
        self._sleep = sleep
        #: Last known state entry per channel (None: known absent).
        self._cache: dict[int, Entry | None] = {}
        #: Channels with a call in flight through this daemon.
        self._busy: set[int] = set()

    async def authorize(self, method: str, payment: EscrowPayment) -> Hold:
        """Check ``payment`` for a call to ``method`` and hold it.

        Raises:
            GrpcError: the Go daemon's status for each rejection (see the
                module docstring), ``FAILED_PRECONDITION`` when another call
                holds the channel, ``UNAVAILABLE`` when storage is down.
        """
        channel_id = payment.channel_id
        if channel_id in self._busy:
            raise _in_progress(channel_id)
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
        for _ in range(_MAX_ATTEMPTS):
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
            new_state = ChannelState(state.nonce, payment.amount, payment.signature, state.claimed_amount)
            self._busy.add(channel_id)
            try:
                lease = await self._lease.current()
                revision = await self._storage.transaction(
                    [Condition.unchanged(state_key, entry), Condition.absent(hold_key)],
                    [Put(hold_key, self._instance, lease=lease)],
                )
            except ConditionFailed as failed:
                self._busy.discard(channel_id)
                if failed.current.get(hold_key) is not None:
                    raise _in_progress(channel_id) from None
                entry = failed.current.get(state_key)
                entry_fresh = True
                self._remember(channel_id, entry)
                continue
            except LeaseNotFound as gone:
                self._busy.discard(channel_id)
                self._lease.lost(gone.lease_id)
                continue
            except StorageError as exc:
                self._busy.discard(channel_id)
                raise _storage_down(exc) from None
            except BaseException:
                self._busy.discard(channel_id)
                raise
            return Hold(channel_id, payment, state_key, hold_key, entry, revision, new_state, info.sender)
        raise GrpcError(Status.UNAVAILABLE, f"too much contention on channel {channel_label(channel_id)}; retry")

    async def commit(self, hold: Hold) -> None:
        """Record the held payment: the call succeeded.

        Storage that is briefly unavailable is retried for a few seconds; a
        timed-out write is checked by reading back.

        Raises:
            GrpcError: ``UNAVAILABLE`` if the payment could not be recorded
                (the client is then not charged: its next call may reuse the
                same amount).
        """
        value = hold.new_state.encode()
        conditions = [
            Condition(hold.hold_key, mod_revision=hold.hold_revision),
            Condition.unchanged(hold.state_key, hold.state_entry),
        ]
        ops: list[Put | Delete] = [Put(hold.state_key, value), Delete(hold.hold_key)]
        waited = 0.0
        delay = 0.05
        try:
            while True:
                try:
                    revision = await self._storage.transaction(conditions, ops)
                except ConditionFailed:
                    # Our hold vanished (lease lost) or the state moved: the
                    # payment was not recorded and must not be.
                    self._cache.pop(hold.channel_id, None)
                    raise GrpcError(
                        Status.UNAVAILABLE,
                        f"payment on channel {channel_label(hold.channel_id)} could not be recorded; retry the call",
                    ) from None
                except StorageTimeout:
                    if await self._applied(hold, value):
                        return
                except StorageError as exc:
                    if waited >= _COMMIT_PATIENCE:
                        self._cache.pop(hold.channel_id, None)
                        raise _storage_down(exc) from None
                else:
                    self._remember(hold.channel_id, Entry(hold.state_key, value, revision, revision, 1))
                    return
                await self._sleep(delay)  # type: ignore[misc]
                waited += delay
                delay = min(delay * 2, 1.0)
        finally:
            self._busy.discard(hold.channel_id)

    async def release(self, hold: Hold) -> None:
        """Drop the hold: the call failed, the client is not charged."""
        self._busy.discard(hold.channel_id)
        try:
            await self._storage.transaction(
                [Condition(hold.hold_key, mod_revision=hold.hold_revision)], [Delete(hold.hold_key)]
            )
        except ConditionFailed:
            pass
        except StorageError as exc:
            # The hold expires with our lease; log so operators can see why
            # a channel stays busy for a while.
            _log.warn(
                "could not release the hold on channel {channel}: {error}",
                channel=hold.channel_id,
                error=exc,
            )

    async def channel_state(self, channel_id: int) -> tuple[ChannelState, ChainChannel] | None:
        """The merged state of a channel (None if the chain does not know it).

        Reads the storage (no cache): for the channel state service.

        Raises:
            GrpcError: ``UNAVAILABLE`` when storage is down.
        """
        terms = self._terms()
        try:
            info = await self._channel_info(channel_id, terms)
        except GrpcError:
            return None
        try:
            entry = await self._storage.get(self._keys.channel_state(channel_id))
        except StorageError as exc:
            raise _storage_down(exc) from None
        self._remember(channel_id, entry)
        return merge(_decode(entry, channel_id), info.nonce), info

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
        try:
            info = await self._channel_info(channel_id, terms)
        except GrpcError as lookup:
            if lookup.status == Status.UNAUTHENTICATED:
                raise GrpcError(Status.UNKNOWN, f"channel is not found, channelId: {channel_id}") from None
            raise GrpcError(
                Status.UNKNOWN, f"error:{lookup.message} was seen on retrieving details of channelID:{channel_id}"
            ) from None
        chain_fresh = False
        read_keys = [state_key, hold_key, planned_key, *also_read]
        for _ in range(_MAX_ATTEMPTS):
            try:
                entries = await self._storage.get_many(read_keys)
            except StorageError as exc:
                raise _storage_down(exc) from None
            entry = entries[state_key]
            self._remember(channel_id, entry)
            state = merge(_decode(entry, channel_id), info.nonce)
            precheck(state, info)
            error = _check(payment, state, info, terms, None, self._block())
            if error is not None and error.refreshable and not chain_fresh:
                chain_fresh = True
                fresh = await self._channel_info(channel_id, terms, fresh=True)
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
            if entries[hold_key] is not None or channel_id in self._busy:
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
                raise _storage_down(exc) from None
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

    async def _channel_info(self, channel_id: int, terms: PaymentTerms, fresh: bool = False) -> ChainChannel:
        try:
            info = await self._chain.channel(channel_id, fresh=fresh)
            if info is None and not fresh:
                info = await self._chain.channel(channel_id, fresh=True)
        except Exception as exc:
            raise GrpcError(Status.INTERNAL, f"payment channel error: {exc}") from None
        if info is None:
            raise GrpcError(Status.UNAUTHENTICATED, f'payment channel "{channel_label(channel_id)}" not found')
        if signatures.address_bytes(info.recipient) != terms.payment_address:
            raise GrpcError(
                Status.INTERNAL,
                "payment channel error: recipient address from blockchain "
                f"{info.recipient} is not equal to the payment address of the group "
                f"{signatures.checksum(terms.payment_address)}",
            )
        if info.group_id != terms.group_id:
            raise GrpcError(
                Status.INTERNAL,
                "payment channel error: channel received belongs to another group of replicas, "
                "current group: " + terms.group_id.hex() + ", channel group: " + info.group_id.hex(),
            )
        return info

    async def _read_state(self, channel_id: int, state_key: str) -> Entry | None:
        try:
            entry = await self._storage.get(state_key)
        except StorageError as exc:
            raise _storage_down(exc) from None
        self._remember(channel_id, entry)
        return entry

    def _remember(self, channel_id: int, entry: Entry | None) -> None:
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[channel_id] = entry

    async def _applied(self, hold: Hold, value: bytes) -> bool:
        """After a timed-out commit: did it apply? (re-read, once)."""
        try:
            current = await self._storage.get(hold.state_key)
        except StorageError:
            return False
        if current is not None and current.value == value:
            self._remember(hold.channel_id, current)
            return True
        return False


_MISSING: Final = object()


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
    available = info.value - state.claimed_amount
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


def _in_progress(channel_id: int) -> GrpcError:
    return GrpcError(
        Status.FAILED_PRECONDITION,
        f"another transaction on channel: {channel_label(channel_id)} is in progress",
    )


def _storage_down(exc: Exception) -> GrpcError:
    return GrpcError(Status.UNAVAILABLE, f"payment storage is unavailable: {exc}")
