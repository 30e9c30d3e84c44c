"""``escrow.PaymentChannelStateService``: the channel state clients sign against.

Before each paid call, snet-sdk asks for the channel's current nonce and
the last amount it signed, then signs ``last + price``.  While a claim is
in progress (the daemon's nonce is one ahead of the chain) the reply also
carries the last payment under the old nonce, which snet-cli checks.  As
in the Go daemon (``snet-daemon.md`` §6.4), failures are plain errors
(status UNKNOWN) with the Go daemon's messages, except outages of the
payment storage or the Ethereum node: UNAVAILABLE, which tells the client
to retry (and is never "channel is not found").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from snet_daemon._proto.escrow import state_service_pb2 as pb
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments import signatures
from snet_daemon.payments.channel import ChannelState, ClaimedPayment, CorruptValue
from snet_daemon.payments.escrow import ChainChannel, ChannelSource, EscrowLedger, PaymentTerms, storage_down
from snet_daemon.storage.base import AtomicStorage, StorageError

#: How far the client's block number may be from ours (as in Go).
BLOCK_TOLERANCE: Final = 5


class PaymentKeys(Protocol):
    def payment(self, channel_id: int, nonce: int) -> str: ...


def uint256_bytes(value: int) -> bytes:
    """A uint256 as the daemon sends it: 32 bytes, big-endian."""
    return value.to_bytes(32, "big")


def channel_id_of(raw: bytes) -> int:
    """A channel id a client sent as big-endian bytes, refused unless it is a uint256.

    A larger id names no channel and cannot be signed over (the signed
    messages hold it as 32 bytes), so the request's signature cannot be
    right: refused as Go refuses it, before any storage or chain lookup
    (where the id would not fit either).

    Raises:
        GrpcError: ``UNKNOWN`` "incorrect signature".
    """
    channel_id = int.from_bytes(raw, "big")
    if channel_id >> 256:
        raise GrpcError(Status.UNKNOWN, "incorrect signature")
    return channel_id


def check_block(client_block: int, chain: ChannelSource) -> None:
    """Refuse signatures over a block number too far from the current one.

    Raises:
        GrpcError: ``UNKNOWN`` with Go's message (also when our own block
            number is not trustworthy right now).
    """
    try:
        latest = chain.current_block()
    except Exception:
        raise GrpcError(Status.UNKNOWN, "cannot determine current block") from None
    if abs(client_block - latest) > BLOCK_TOLERANCE:
        raise GrpcError(Status.UNKNOWN, "authentication failed as the signature passed has expired")


class ChannelStateService:
    """Answers ``GetChannelState``.

    Args:
        ledger: the escrow ledger (merged channel state).
        storage: for payment records of claims in progress.
        keys: where those records live.
        chain: the chain reader (block number).
        terms: the current payment terms (MPE address).
    """

    def __init__(
        self,
        ledger: EscrowLedger,
        storage: AtomicStorage,
        keys: PaymentKeys,
        chain: ChannelSource,
        terms: Callable[[], PaymentTerms],
    ) -> None:
        self._ledger = ledger
        self._storage = storage
        self._keys = keys
        self._chain = chain
        self._terms = terms

    async def get_channel_state(self, request: pb.ChannelStateRequest, call: ServerCall) -> pb.ChannelStateReply:
        """The state of ``request.channel_id`` for its signer, sender or recipient."""
        terms = self._terms()
        channel_id = channel_id_of(request.channel_id)
        try:
            signer = signatures.recover(
                signatures.channel_state_request(terms.mpe_address, channel_id, request.current_block),
                request.signature,
            )
        except (signatures.SignatureError, ValueError):
            raise GrpcError(Status.UNKNOWN, "incorrect signature") from None
        state, info = await self._channel(channel_id)
        allowed = {signatures.address_bytes(a) for a in (info.signer, info.sender, info.recipient)}
        if signer not in allowed:
            raise GrpcError(Status.UNKNOWN, "only channel signer/sender/receiver can get latest channel state")
        check_block(request.current_block, self._chain)
        old = None
        if state.nonce != info.nonce:
            state, info, old = await self._claim_in_progress(channel_id, state, info)
        reply = pb.ChannelStateReply(current_nonce=uint256_bytes(state.nonce))
        if state.signature:
            reply.current_signed_amount = uint256_bytes(state.authorized_amount)
            reply.current_signature = state.signature
        if old is not None:
            reply.old_nonce_signed_amount = uint256_bytes(old.amount)
            reply.old_nonce_signature = old.signature
        return reply

    async def _claim_in_progress(
        self, channel_id: int, state: ChannelState, info: ChainChannel
    ) -> tuple[ChannelState, ChainChannel, ClaimedPayment | None]:
        """The payment being claimed, for a stored nonce ahead of the chain's.

        The Go daemon reads the chain's nonce on every request; this one
        trusts the chain reader's cache, rechecked by the ledger once it is
        older than about one block poll interval while a claim is pending
        (so a claim that landed, with its record still there, is reported
        landed within that time).  The cache may still predate a claim that
        landed through another daemon of the group just now, and that
        daemon may have deleted its record of the claim since.  So a missing
        record makes the chain be read once before the request is refused:
        snet-sdk asks for the state before every paid call, and refusing
        would fail them all on this daemon until the cache is read again.
        A claim really in progress has its record and costs no RPC beyond
        the ledger's recheck.

        Returns:
            The state and chain view to answer with, and the claimed
            payment (None: the chain has caught up, the claim landed).

        Raises:
            GrpcError: Go's error when the nonces still differ and there is
                no record.
        """
        old = await self._old_payment(channel_id, state)
        if old is not None:
            return state, info, old
        state, info = await self._channel(channel_id, fresh_chain=True)
        if state.nonce == info.nonce:
            return state, info, None
        old = await self._old_payment(channel_id, state)
        if old is None:
            raise GrpcError(
                Status.UNKNOWN,
                "channel has different nonce in local storage and blockchain and old payment is not found in storage",
            )
        return state, info, old

    async def _channel(self, channel_id: int, *, fresh_chain: bool = False) -> tuple[ChannelState, ChainChannel]:
        """The merged channel, with Go's errors ("channel error: ...", "channel is not found")."""
        try:
            found = await self._ledger.channel_state(channel_id, fresh_chain=fresh_chain)
        except GrpcError as error:
            raise _channel_error(error) from None
        if found is None:
            raise GrpcError(Status.UNKNOWN, f"channel is not found, channelId: {channel_id}")
        return found

    async def _old_payment(self, channel_id: int, state: ChannelState) -> ClaimedPayment | None:
        """The payment of the claim that moved the channel to ``state.nonce`` (None: no record)."""
        try:
            entry = await self._storage.get(self._keys.payment(channel_id, state.nonce - 1))
        except StorageError as exc:
            raise storage_down(exc) from None
        if entry is None:
            return None
        try:
            return ClaimedPayment.decode(channel_id, entry.value)
        except CorruptValue as exc:
            raise GrpcError(Status.UNKNOWN, f"channel error: {exc}") from None


def _channel_error(error: GrpcError) -> GrpcError:
    """Go's "channel error: ..." for a channel that could not be read.

    An outage (storage or Ethereum node) keeps its ``UNAVAILABLE``; the
    rest (a channel of another group, unreadable stored state) are plain.
    """
    status = Status.UNAVAILABLE if error.status == Status.UNAVAILABLE else Status.UNKNOWN
    return GrpcError(status, f"channel error: {error.message}")
