"""``escrow.ProviderControlService``: how the provider gets paid.

The daemon never sends transactions.  The provider's treasurer (``snet
treasurer claim-all``) asks the daemon for the payments it holds, *starts*
a claim on each channel (the daemon moves the channel to the next nonce, so
clients sign new payments from zero, and keeps the claimed payment as "in
progress"), then claims on chain with the returned signatures.  The daemon
notices a claim has landed when the chain's nonce passes the claimed one,
and forgets the record.

Every request is signed by the payment group's payment address.  As in the
Go daemon (``snet-daemon.md`` §6.3), errors are plain (status UNKNOWN)
except where noted; outages of the payment storage or the Ethereum node are
UNAVAILABLE (the treasurer may retry), never "channel is not found".
Unlike the Go daemon, ``StartClaim`` refuses unknown channels before
anything else, and a second claim on a channel whose first claim has not
landed yet is refused (the amount still counted by the chain must be known
to keep clients within the channel's funds); whether it landed is read from
the chain itself before refusing, as another daemon of the group may have
started it, seen it land and forgotten it while our cached view is older.
``StartClaimForMultipleChannels`` takes at most
:data:`MAX_CLAIMS_PER_REQUEST` ids, each once (``INVALID_ARGUMENT``
otherwise, before the signature is checked).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from snet_daemon._proto.escrow import control_service_pb2 as pb
from snet_daemon.blockchain.errors import ChainError
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments import signatures
from snet_daemon.payments.channel import ChannelState, ClaimedPayment, CorruptValue
from snet_daemon.payments.escrow import (
    ChainChannel,
    ChannelSource,
    EscrowLedger,
    PaymentTerms,
    chain_down,
    channel_label,
    storage_down,
)
from snet_daemon.payments.keys import PaymentKeys, channel_id_of_state_key, payment_of_key
from snet_daemon.payments.state_service import channel_id_of, check_block, uint256_bytes
from snet_daemon.storage.base import AtomicStorage, Condition, ConditionFailed, Entry, Put, StorageError

#: Most channel ids in one ``StartClaimForMultipleChannels``: far more than
#: one ``multiChannelClaim`` transaction can carry within a block's gas.
MAX_CLAIMS_PER_REQUEST: Final = 1000
#: Channels read from the node at once for one request (the lists).
_CHAIN_READS: Final = 8


class ProviderControl:
    """Answers the four ``ProviderControlService`` methods.

    Args:
        ledger: the escrow ledger (merged channel state, cache).
        storage: the payment storage.
        keys: key names.
        chain: the chain reader.
        terms: the current payment terms.
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

    # -- the RPCs -----------------------------------------------------------------

    async def get_list_unclaimed(self, request: pb.GetPaymentsListRequest, call: ServerCall) -> pb.PaymentsListReply:
        """Channels with an accepted payment not yet claimed (without signatures)."""
        self._authenticate(
            request.mpe_address,
            request.signature,
            lambda mpe: signatures.list_unclaimed(mpe, request.current_block),
        )
        check_block(request.current_block, self._chain)
        reply = pb.PaymentsListReply()
        stored = await self._stored_channels()
        unclaimed = [(channel_id, state) for channel_id, state in stored if state.authorized_amount]
        expiries = await self._expiries([channel_id for channel_id, _ in unclaimed])
        for channel_id, state in unclaimed:
            reply.payments.append(
                pb.PaymentReply(
                    channel_id=uint256_bytes(channel_id),
                    channel_nonce=uint256_bytes(state.nonce),
                    signed_amount=uint256_bytes(state.authorized_amount),
                    channel_expiry=uint256_bytes(expiries[channel_id]),
                )
            )
        return reply

    async def get_list_in_progress(self, request: pb.GetPaymentsListRequest, call: ServerCall) -> pb.PaymentsListReply:
        """Payments whose claim was started and has not landed on chain yet."""
        self._authenticate(
            request.mpe_address,
            request.signature,
            lambda mpe: signatures.list_in_progress(mpe, request.current_block),
        )
        check_block(request.current_block, self._chain)
        reply = pb.PaymentsListReply()
        for payment in await self._pending_claims():
            if not payment.signature or payment.amount == 0:
                continue
            reply.payments.append(await self._payment_reply(payment))
        return reply

    async def start_claim(self, request: pb.StartClaimRequest, call: ServerCall) -> pb.PaymentReply:
        """Start claiming one channel: return its last payment, move it to the next nonce."""
        terms = self._check_mpe(request.mpe_address)
        # The signature is over the channel's nonce, so the channel is read
        # first: an id that fits no channel must not reach the reads.
        channel_id = channel_id_of(request.channel_id)
        state, _, _ = await self._stored_channel(channel_id)
        try:
            signer = signatures.recover(
                signatures.start_claim(terms.mpe_address, channel_id, state.nonce), request.signature
            )
        except (signatures.SignatureError, ValueError):
            raise GrpcError(Status.UNKNOWN, "incorrect signature") from None
        if signer != terms.payment_address:
            raise GrpcError(Status.UNKNOWN, "only the payment address of the group can start claims")
        # Unlike Go, no sweep of every claim in progress first (one chain
        # read each: claim-all's k-th StartClaim would read k-1 channels):
        # _start reads this channel's own claim from the chain, and
        # GetListInProgress forgets the claims that landed.
        return await self._payment_reply(await self._start(channel_id))

    async def start_claim_for_multiple_channels(
        self, request: pb.StartMultipleClaimRequest, call: ServerCall
    ) -> pb.PaymentsListReply:
        """Start claims on several channels (one signature over the sorted ids).

        At most :data:`MAX_CLAIMS_PER_REQUEST` ids, each once, checked before
        the signature: the signed message holds 32 bytes per id, so a 4 MiB
        request of one-byte ids made the daemon build and hash 128 MiB
        (780 MB of memory, the event loop stopped 1.2 s) for anyone, before
        any authentication.
        """
        ids = request.channel_ids
        if len(ids) > MAX_CLAIMS_PER_REQUEST:
            raise GrpcError(
                Status.INVALID_ARGUMENT,
                f"{len(ids)} channel ids: at most {MAX_CLAIMS_PER_REQUEST} per request; send them in several",
            )
        if len(set(ids)) != len(ids):
            # Go starts the first and fails on the second, leaving the
            # caller an error and a claim in progress.
            raise GrpcError(Status.INVALID_ARGUMENT, "a channel id is listed more than once")
        self._authenticate(
            request.mpe_address,
            request.signature,
            lambda mpe: signatures.start_claim_multiple(mpe, ids, request.current_block),
        )
        check_block(request.current_block, self._chain)
        reply = pb.PaymentsListReply()
        for channel_id in ids:
            # As in Go: stop at the first failure (claims already started stay
            # in progress and are listed by GetListInProgress).
            reply.payments.append(await self._payment_reply(await self._start(channel_id)))
        return reply

    # -- internals ----------------------------------------------------------------

    def _check_mpe(self, mpe_address: str) -> PaymentTerms:
        terms = self._terms()
        try:
            given = signatures.address_bytes(mpe_address)
        except ValueError:
            given = b""
        if given != terms.mpe_address:
            raise GrpcError(
                Status.UNKNOWN,
                f"the mpe address {mpe_address!r} passed does not match the one this daemon serves: "
                f"{signatures.checksum(terms.mpe_address)}",
            )
        return terms

    def _authenticate(self, mpe_address: str, signature: bytes, message: Callable[[bytes], bytes]) -> PaymentTerms:
        terms = self._check_mpe(mpe_address)
        try:
            signer = signatures.recover(message(terms.mpe_address), signature)
        except (signatures.SignatureError, ValueError):
            raise GrpcError(Status.UNKNOWN, "incorrect signature") from None
        if signer != terms.payment_address:
            raise GrpcError(Status.UNKNOWN, "only the payment address of the group can use this service")
        return terms

    async def _start(self, channel_id: int) -> ClaimedPayment:
        """Move the channel's last payment to "claim in progress" atomically."""
        keys = self._keys
        state_key = keys.channel_state(channel_id)
        hold_key = keys.channel_hold(channel_id)
        await self._ledger.quiesce(channel_id)
        waited = 0.0
        attempts = 0
        chain_read = False
        while attempts < 3:
            attempts += 1
            # State and write condition from one read: a payment accepted
            # after it makes the write fail, and is claimed on the next try.
            state, info, entry = await self._stored_channel(channel_id)
            if state.nonce != info.nonce and not chain_read:
                # The chain reader's cache may predate the landing of the
                # last claim (started through another daemon of the group,
                # which may have forgotten it since): read the chain once
                # before calling this one a second claim.
                chain_read = True
                state, info, entry = await self._stored_channel(channel_id, fresh_chain=True)
            if state.nonce != info.nonce:
                raise GrpcError(
                    Status.FAILED_PRECONDITION,
                    f"a claim on channel {channel_label(channel_id)} is already in progress; "
                    "claim it on chain first (GetListInProgress lists it)",
                )
            if state.authorized_amount == 0:
                raise GrpcError(Status.UNKNOWN, f"channel {channel_label(channel_id)} has no payment to claim")
            claimed = ClaimedPayment(channel_id, state.nonce, state.authorized_amount, state.signature)
            after = ChannelState(state.nonce + 1, claimed_amount=state.authorized_amount)
            try:
                await self._storage.transaction(
                    [Condition.unchanged(state_key, entry), Condition.absent(hold_key)],
                    [Put(state_key, after.encode()), Put(keys.payment(channel_id, state.nonce), claimed.encode())],
                )
            except ConditionFailed as failed:
                if failed.current.get(hold_key) is not None:
                    # A call holds the channel, or another daemon's hold is
                    # lingering: wait a little for it (then FAILED_PRECONDITION).
                    waited = await self._ledger.wait_for_hold(channel_id, waited)
                    attempts -= 1
                continue  # a payment landed meanwhile: claim it too
            except StorageError as exc:
                raise storage_down(exc) from None
            finally:
                self._ledger.forget(channel_id)
            return claimed
        raise GrpcError(Status.UNAVAILABLE, f"channel {channel_label(channel_id)} is too busy to claim; retry")

    async def _stored_channel(
        self, channel_id: int, *, fresh_chain: bool = False
    ) -> tuple[ChannelState, ChainChannel, Entry | None]:
        """The ledger's merged channel (see :meth:`EscrowLedger.stored_channel`), with this service's errors.

        Raises:
            GrpcError: ``UNAVAILABLE`` when storage or the Ethereum node is
                down; otherwise plain: "channel is not found" only when the
                chain does not know the channel, the ledger's message for a
                channel of another group.
        """
        try:
            found = await self._ledger.stored_channel(channel_id, fresh_chain=fresh_chain)
        except GrpcError as error:
            if error.status == Status.UNAVAILABLE:
                raise
            raise GrpcError(Status.UNKNOWN, error.message) from None
        if found is None:
            raise GrpcError(Status.UNKNOWN, f"channel is not found, channelId: {channel_id}")
        return found

    async def _chain_channel(self, channel_id: int, *, fresh: bool = False) -> ChainChannel | None:
        """The chain reader's channel; an unreachable node is ``UNAVAILABLE``.

        Without this the chain reader's exception would reach the front end
        as a bug: ``INTERNAL`` "internal error" and a traceback in the log.
        """
        try:
            return await self._chain.channel(channel_id, fresh=fresh)
        except ChainError as exc:
            raise chain_down(channel_id, exc) from None

    async def _stored_channels(self) -> list[tuple[int, ChannelState]]:
        out = []
        for entry in await self._prefix(self._keys.channel_state_prefix()):
            channel_id = channel_id_of_state_key(entry.key)
            if channel_id is None:
                continue
            try:
                out.append((channel_id, ChannelState.decode(entry.value)))
            except CorruptValue:
                continue
        return sorted(out)

    async def _pending_claims(self) -> list[ClaimedPayment]:
        """Payment records still in progress; records whose claim landed are deleted.

        Each record not seen landed is read from the node (the cache may
        predate the landing): :data:`_CHAIN_READS` at a time, as for
        :meth:`_expiries`.
        """
        records = []
        for entry in await self._prefix(self._keys.payment_prefix()):
            ids = payment_of_key(entry.key)
            if ids is None:
                continue
            try:
                records.append((entry.key, ClaimedPayment.decode(ids[0], entry.value)))
            except CorruptValue:
                continue
        places = asyncio.Semaphore(_CHAIN_READS)

        async def still_pending(key: str, payment: ClaimedPayment) -> bool:
            async with places:
                info = await self._chain_channel(payment.channel_id)
                if info is not None and info.nonce <= payment.nonce:
                    info = await self._chain_channel(payment.channel_id, fresh=True)
            if info is None or info.nonce <= payment.nonce:
                return True
            try:
                await self._storage.delete(key)
            except StorageError:
                pass
            return False

        found = await asyncio.gather(*(still_pending(key, payment) for key, payment in records))
        return [payment for (_, payment), pending in zip(records, found, strict=True) if pending]

    async def _payment_reply(self, payment: ClaimedPayment) -> pb.PaymentReply:
        return pb.PaymentReply(
            channel_id=uint256_bytes(payment.channel_id),
            channel_nonce=uint256_bytes(payment.nonce),
            signed_amount=uint256_bytes(payment.amount),
            signature=payment.signature,
            channel_expiry=uint256_bytes(await self._expiry(payment.channel_id)),
        )

    async def _expiry(self, channel_id: int) -> int:
        info = await self._chain_channel(channel_id)
        return 0 if info is None else info.expiration

    async def _expiries(self, channel_ids: list[int]) -> dict[int, int]:
        """Each channel's expiration, read :data:`_CHAIN_READS` at a time.

        The Go daemon answers from the expiration it stored with the
        channel's last payment; ours comes from the chain reader, whose cache
        has expired for channels not paid lately.  One after another, a list
        of a thousand such channels took a thousand node round trips.  Fewer
        at once than the reader reads (16), leaving room for paid calls.
        """
        places = asyncio.Semaphore(_CHAIN_READS)

        async def one(channel_id: int) -> int:
            async with places:
                return await self._expiry(channel_id)

        found = await asyncio.gather(*(one(channel_id) for channel_id in channel_ids))
        return dict(zip(channel_ids, found, strict=True))

    async def _get(self, key: str) -> Entry | None:
        try:
            return await self._storage.get(key)
        except StorageError as exc:
            raise storage_down(exc) from None

    async def _prefix(self, prefix: str) -> list[Entry]:
        try:
            return await self._storage.get_prefix(prefix)
        except StorageError as exc:
            raise storage_down(exc) from None
