"""Channel state service and provider control service, on fakes (no I/O).

The claim cycle of the Go daemon (``snet-daemon.md`` §6.3, §6.4): payments
accumulate, the treasurer lists and starts claims, clients continue on the
next nonce, the state service shows the old payment until the claim lands.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from snet_daemon._proto.escrow import control_service_pb2 as cpb
from snet_daemon._proto.escrow import state_service_pb2 as spb
from snet_daemon.blockchain.blocks import BlockNumber
from snet_daemon.blockchain.chain import EthereumChainReader
from snet_daemon.blockchain.contracts import network_info
from snet_daemon.blockchain.errors import ChainUnavailable
from snet_daemon.blockchain.rpc import JsonRpcClient
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments import signatures as sig
from snet_daemon.payments.claims import ProviderControl
from snet_daemon.payments.escrow import EscrowLedger, metadata_values, parse_escrow
from snet_daemon.payments.state_service import ChannelStateService
from snet_daemon.storage.memory import MemoryStorage
from tests.support.aio import aio_test
from tests.support.payments import (
    CLIENT_KEY,
    METHOD,
    MPE,
    PRICE,
    PROVIDER_KEY,
    CountingStorage,
    FakeChain,
    Keys,
    StorageLease,
    payment_metadata,
    terms,
)

CALL: Any = None  # the services do not use the call object


_instances = itertools.count()


class World:
    """A daemon of the payment group on fakes.

    Args:
        group_of: another daemon of that one's group: same storage and
            chain, but a chain reader cache of its own.
    """

    def __init__(self, group_of: World | None = None) -> None:
        if group_of is None:
            self.storage = MemoryStorage(lambda: 0.0)
            self.chain = FakeChain()
        else:
            self.storage = group_of.storage
            self.chain = FakeChain(block=group_of.chain.block, channels=group_of.chain.channels)
        self.keys = Keys()
        lease = StorageLease(self.storage)
        self.ledger = EscrowLedger(self.storage, self.keys, self.chain, terms, lease, f"d{next(_instances)}")
        self.state = ChannelStateService(self.ledger, self.storage, self.keys, self.chain, terms)
        self.control = ProviderControl(self.ledger, self.storage, self.keys, self.chain, terms)

    async def pay(self, channel_id: int, nonce: int, amount: int) -> None:
        payment = parse_escrow(metadata_values(payment_metadata(channel_id, nonce, amount)))
        self.ledger.commit(await self.ledger.authorize(METHOD, payment))

    async def land_claim(self, channel_id: int, amount: int) -> None:
        """The claim started on the channel lands on chain; this daemon notices and forgets its record."""
        channel = self.chain.channels[channel_id]
        channel.nonce += 1
        channel.value -= amount
        assert list((await self.in_progress()).payments) == []

    async def get_state(
        self, channel_id: int, key: bytes = CLIENT_KEY, block: int | None = None, width: int = 0
    ) -> spb.ChannelStateReply:
        block = self.chain.block if block is None else block
        raw = (
            channel_id.to_bytes(width, "big") if width else (channel_id.to_bytes(32, "big").lstrip(b"\x00") or b"\x00")
        )
        signature = sig.sign(sig.channel_state_request(MPE, channel_id, block), key)
        request = spb.ChannelStateRequest(channel_id=raw, signature=signature, current_block=block)
        return await self.state.get_channel_state(request, CALL)

    def list_request(self, message: bytes, key: bytes = PROVIDER_KEY) -> cpb.GetPaymentsListRequest:
        return cpb.GetPaymentsListRequest(
            mpe_address=sig.checksum(MPE), current_block=self.chain.block, signature=sig.sign(message, key)
        )

    async def unclaimed(self) -> cpb.PaymentsListReply:
        return await self.control.get_list_unclaimed(self.list_request(sig.list_unclaimed(MPE, self.chain.block)), CALL)

    async def in_progress(self) -> cpb.PaymentsListReply:
        return await self.control.get_list_in_progress(
            self.list_request(sig.list_in_progress(MPE, self.chain.block)), CALL
        )

    async def start_claim(self, channel_id: int, nonce: int, key: bytes = PROVIDER_KEY) -> cpb.PaymentReply:
        request = cpb.StartClaimRequest(
            mpe_address=sig.checksum(MPE),
            channel_id=channel_id.to_bytes(32, "big"),
            signature=sig.sign(sig.start_claim(MPE, channel_id, nonce), key),
        )
        return await self.control.start_claim(request, CALL)


def n(value: bytes) -> int:
    return int.from_bytes(value, "big")


@aio_test
async def test_state_of_a_fresh_channel() -> None:
    """A channel without payments shows its chain nonce and no amount."""
    world = World()
    world.chain.open(4, nonce=2)
    reply = await world.get_state(4)
    assert n(reply.current_nonce) == 2
    assert reply.current_signed_amount == b""
    assert reply.current_signature == b""
    assert len(reply.current_nonce) == 32


@aio_test
async def test_state_after_payments_and_4_byte_ids() -> None:
    """After payments the state shows the last signed amount and signature; 4-byte ids (JS) work."""
    world = World()
    world.chain.open(7)
    await world.pay(7, 0, PRICE)
    await world.pay(7, 0, 2 * PRICE)
    reply = await world.get_state(7, width=4)
    assert n(reply.current_signed_amount) == 2 * PRICE
    assert sig.recover(sig.mpe_claim(MPE, 7, 0, 2 * PRICE), reply.current_signature) == sig.address_of(CLIENT_KEY)


@aio_test
async def test_state_for_recipient_but_not_strangers() -> None:
    """The recipient may read the state; anybody else gets Go's error."""
    world = World()
    world.chain.open(1)
    await world.get_state(1, key=PROVIDER_KEY)
    with pytest.raises(GrpcError) as info:
        await world.get_state(1, key=sig.keccak256(b"stranger"))
    assert info.value.message == "only channel signer/sender/receiver can get latest channel state"


@aio_test
async def test_state_errors() -> None:
    """Stale block, unknown channel and bad signatures get Go's messages."""
    world = World()
    world.chain.open(1)
    with pytest.raises(GrpcError) as info:
        await world.get_state(1, block=world.chain.block - 6)
    assert info.value.message == "authentication failed as the signature passed has expired"
    await world.get_state(1, block=world.chain.block - 5)
    with pytest.raises(GrpcError) as info:
        await world.get_state(99)
    assert info.value.message == "channel is not found, channelId: 99"
    request = spb.ChannelStateRequest(channel_id=b"\x01", signature=b"\x00" * 10, current_block=1)
    with pytest.raises(GrpcError) as info:
        await world.state.get_channel_state(request, CALL)
    assert (info.value.status, info.value.message) == (Status.UNKNOWN, "incorrect signature")


@aio_test
async def test_full_claim_cycle() -> None:
    """List unclaimed, start claim, pay on the next nonce, list in progress, claim lands, record is forgotten."""
    world = World()
    world.chain.open(1, value=1000)
    await world.pay(1, 0, PRICE)
    await world.pay(1, 0, 2 * PRICE)
    unclaimed = await world.unclaimed()
    assert [(n(p.channel_id), n(p.channel_nonce), n(p.signed_amount), p.signature) for p in unclaimed.payments] == [
        (1, 0, 2 * PRICE, b"")
    ]
    assert n(unclaimed.payments[0].channel_expiry) == world.chain.channels[1].expiration

    claim = await world.start_claim(1, 0)
    assert (n(claim.channel_nonce), n(claim.signed_amount)) == (0, 2 * PRICE)
    assert sig.recover(sig.mpe_claim(MPE, 1, 0, 2 * PRICE), claim.signature) == sig.address_of(CLIENT_KEY)

    # Clients now sign from zero on nonce 1; the state shows the old payment too.
    state = await world.get_state(1)
    assert n(state.current_nonce) == 1
    assert state.current_signed_amount == b""
    assert n(state.old_nonce_signed_amount) == 2 * PRICE
    await world.pay(1, 1, PRICE)
    assert [n(p.signed_amount) for p in (await world.in_progress()).payments] == [2 * PRICE]

    # The claim lands on chain: nonce 1, value reduced.
    world.chain.channels[1].nonce = 1
    world.chain.channels[1].value -= 2 * PRICE
    assert list((await world.in_progress()).payments) == []
    state = await world.get_state(1)
    assert n(state.current_nonce) == 1
    assert n(state.current_signed_amount) == PRICE
    assert state.old_nonce_signed_amount == b""


@aio_test
async def test_payments_after_start_claim_stay_within_funds() -> None:
    """While a claim is in flight, new payments may only spend what the claim leaves in the channel."""
    world = World()
    world.chain.open(1, value=5 * PRICE)
    for i in range(1, 5):
        await world.pay(1, 0, i * PRICE)
    await world.start_claim(1, 0)
    await world.pay(1, 1, PRICE)  # 4 claimed + 1 = 5: all the funds
    with pytest.raises(GrpcError) as info:
        await world.pay(1, 1, 2 * PRICE)
    assert "not enough tokens" in info.value.message


@aio_test
async def test_start_claim_refusals() -> None:
    """Only the payment address may start claims; empty, busy and already-claiming channels are refused."""
    world = World()
    world.chain.open(1)
    with pytest.raises(GrpcError) as info:
        await world.start_claim(1, 0)
    assert "no payment to claim" in info.value.message
    await world.pay(1, 0, PRICE)
    with pytest.raises(GrpcError) as info:
        await world.start_claim(1, 0, key=CLIENT_KEY)
    assert "payment address" in info.value.message
    hold = await world.ledger.authorize(METHOD, parse_escrow(metadata_values(payment_metadata(1, 0, 2 * PRICE))))
    with pytest.raises(GrpcError) as info:
        await world.start_claim(1, 0)
    assert info.value.status == Status.FAILED_PRECONDITION
    await world.ledger.release(hold)
    await world.start_claim(1, 0)
    await world.pay(1, 1, PRICE)
    with pytest.raises(GrpcError) as info:
        await world.start_claim(1, 1)
    assert info.value.status == Status.FAILED_PRECONDITION
    assert "already in progress" in info.value.message


@aio_test
async def test_start_claim_with_an_id_beyond_uint256_is_an_incorrect_signature() -> None:
    """StartClaim reads the channel before checking the signature (it is over the channel's nonce):
    an id of 33 bytes, from anyone, is refused as GetChannelState refuses it, before any storage
    or chain read.  It reached the real chain reader, whose ABI encoder raised: INTERNAL "internal
    error" and a traceback in the log for each such request."""
    storage = CountingStorage(MemoryStorage(lambda: 0.0))
    rpc = JsonRpcClient("http://127.0.0.1:9", now=time.monotonic, attempts=1, backoff=0.01, timeout=1.0)
    blocks = BlockNumber(60, now=time.monotonic)
    blocks.update(1000)
    chain = EthereumChainReader(
        rpc, blocks, now=time.monotonic, network=network_info("local"), mpe_address=sig.checksum(MPE)
    )
    keys = Keys()
    ledger = EscrowLedger(storage, keys, chain, terms, StorageLease(storage), "d")
    control = ProviderControl(ledger, storage, keys, chain, terms)
    request = cpb.StartClaimRequest(mpe_address=sig.checksum(MPE), channel_id=b"\x01" + bytes(32), signature=bytes(65))
    try:
        with pytest.raises(GrpcError) as info:
            await control.start_claim(request, CALL)
    finally:
        await rpc.close()
    assert (info.value.status, info.value.message) == (Status.UNKNOWN, "incorrect signature")
    assert storage.calls == []
    assert chain.cache_misses == 0
    # GetChannelState answers the same (its signature is checked first).
    world = World()
    state_request = spb.ChannelStateRequest(channel_id=b"\x01" + bytes(32), signature=bytes(65), current_block=1)
    with pytest.raises(GrpcError) as info:
        await world.state.get_channel_state(state_request, CALL)
    assert (info.value.status, info.value.message) == (Status.UNKNOWN, "incorrect signature")


@aio_test
async def test_list_requests_are_authenticated() -> None:
    """Lists need the payment address's signature, the right MPE and a fresh block."""
    world = World()
    with pytest.raises(GrpcError) as info:
        await world.control.get_list_unclaimed(
            world.list_request(sig.list_unclaimed(MPE, world.chain.block), key=CLIENT_KEY), CALL
        )
    assert "payment address" in info.value.message
    request = world.list_request(sig.list_unclaimed(MPE, world.chain.block))
    request.mpe_address = "0x" + "00" * 20
    with pytest.raises(GrpcError) as info:
        await world.control.get_list_unclaimed(request, CALL)
    assert "does not match" in info.value.message
    stale = world.chain.block - 10
    request = cpb.GetPaymentsListRequest(
        mpe_address=sig.checksum(MPE),
        current_block=stale,
        signature=sig.sign(sig.list_unclaimed(MPE, stale), PROVIDER_KEY),
    )
    with pytest.raises(GrpcError) as info:
        await world.control.get_list_unclaimed(request, CALL)
    assert "expired" in info.value.message


@aio_test
async def test_start_claim_waits_for_another_daemons_lingering_hold() -> None:
    """Right after a call through another daemon of the group (its hold lingers), a claim here goes through."""
    world = World()
    world.chain.open(1)
    other = EscrowLedger(world.storage, world.keys, world.chain, terms, StorageLease(world.storage), "other")
    payment = parse_escrow(metadata_values(payment_metadata(1, 0, PRICE)))
    other.commit(await other.authorize(METHOD, payment))
    assert await world.storage.get(world.keys.channel_hold(1)) is not None  # lingering at the other daemon
    reply = await world.start_claim(1, 0)
    assert int.from_bytes(reply.signed_amount, "big") == PRICE


@aio_test
async def test_payment_accepted_while_a_claim_starts_is_claimed_too() -> None:
    """Another daemon accepts a payment just after the claim read the channel: the claim's write,
    conditioned on what it read, fails and the claim is made again with that payment in it
    (a claim written from an older read would drop the accepted payment)."""
    world = World()
    world.chain.open(1, value=1000)
    await world.pay(1, 0, PRICE)
    other = EscrowLedger(world.storage, world.keys, world.chain, terms, StorageLease(world.storage), "other")
    state_key = world.keys.channel_state(1)
    storage = world.storage
    reads = 0

    class _PaymentAfterFirstRead:
        def __getattr__(self, name: str) -> Any:
            return getattr(storage, name)

        async def get(self, key: str) -> Any:
            nonlocal reads
            entry = await storage.get(key)
            if key == state_key:
                reads += 1
                if reads == 2:  # the claim's own read (the first is start_claim's signature check)
                    payment = parse_escrow(metadata_values(payment_metadata(1, 0, 2 * PRICE)))
                    other.commit(await other.authorize(METHOD, payment))
                    await other.quiesce(1)
            return entry

    hooked: Any = _PaymentAfterFirstRead()
    world.ledger = EscrowLedger(hooked, world.keys, world.chain, terms, StorageLease(storage), "d")
    world.control = ProviderControl(world.ledger, hooked, world.keys, world.chain, terms)
    reply = await world.start_claim(1, 0)
    assert reads >= 3  # the claim read again after its write failed
    assert n(reply.signed_amount) == 2 * PRICE
    state = await world.ledger.channel_state(1)
    assert state is not None
    assert (state[0].nonce, state[0].claimed_amount, state[0].authorized_amount) == (1, 2 * PRICE, 0)


@aio_test
async def test_start_claim_for_multiple_channels() -> None:
    """Several channels are claimed with one signature over the sorted ids."""
    world = World()
    for cid in (3, 1, 2):
        world.chain.open(cid)
        await world.pay(cid, 0, PRICE)
    ids = [3, 1]
    request = cpb.StartMultipleClaimRequest(
        mpe_address=sig.checksum(MPE),
        channel_ids=ids,
        current_block=world.chain.block,
        signature=sig.sign(sig.start_claim_multiple(MPE, ids, world.chain.block), PROVIDER_KEY),
    )
    reply = await world.control.start_claim_for_multiple_channels(request, CALL)
    assert [n(p.channel_id) for p in reply.payments] == [3, 1]
    assert sorted(n(p.channel_id) for p in (await world.in_progress()).payments) == [1, 3]
    assert [n(p.channel_id) for p in (await world.unclaimed()).payments] == [2]


NODE_DOWN = "eth_call: ConnectError: connection refused"


@aio_test
async def test_chain_outage_in_the_control_service_is_unavailable() -> None:
    """With the Ethereum node down, the control service answers UNAVAILABLE naming the node, and
    StartClaim does not call the channel unknown; the claim goes through once the node is back.

    (The chain reader's exception used to escape: INTERNAL "internal error" and a traceback in
    the log; StartClaim said "channel is not found".)"""
    world = World()
    world.chain.open(1)
    await world.pay(1, 0, PRICE)
    world.chain.cached.clear()  # not cached (TTL, or the channel was paid through another daemon)
    world.chain.channel_error = ChainUnavailable(NODE_DOWN)
    for request in (world.unclaimed, lambda: world.start_claim(1, 0)):
        with pytest.raises(GrpcError) as info:
            await request()
        assert (info.value.status, info.value.message) == (
            Status.UNAVAILABLE,
            f"cannot read channel {{ID: 1}} from the Ethereum node: {NODE_DOWN}",
        )
    world.chain.channel_error = None
    await world.start_claim(1, 0)
    # Whether the claim landed is read from the chain itself, cached channel or not.
    world.chain.channel_error = ChainUnavailable(NODE_DOWN)
    with pytest.raises(GrpcError) as info:
        await world.in_progress()
    assert info.value.status == Status.UNAVAILABLE
    assert "Ethereum node" in info.value.message
    world.chain.channel_error = None
    assert [n(p.signed_amount) for p in (await world.in_progress()).payments] == [PRICE]


@aio_test
async def test_channel_state_during_a_chain_outage_is_unavailable_not_not_found() -> None:
    """GetChannelState for a channel the chain reader has not cached, with the node down, is
    UNAVAILABLE "channel error: ..." naming the node, not "channel is not found" (snet-sdk
    reports that for an existing channel); a cached channel is still answered."""
    world = World()
    world.chain.open(1)
    world.chain.open(2)
    await world.pay(1, 0, PRICE)
    world.chain.channel_error = ChainUnavailable(NODE_DOWN)
    assert n((await world.get_state(1)).current_signed_amount) == PRICE
    with pytest.raises(GrpcError) as info:
        await world.get_state(2)
    assert (info.value.status, info.value.message) == (
        Status.UNAVAILABLE,
        f"channel error: cannot read channel {{ID: 2}} from the Ethereum node: {NODE_DOWN}",
    )


@aio_test
async def test_channel_of_another_group_or_recipient_is_refused_with_the_reason() -> None:
    """A channel paying another address, or of another group, is refused by GetChannelState and
    StartClaim with Go's reason as a plain error (it was "channel is not found")."""
    world = World()
    world.chain.open(2, group_id=b"\xff" * 32)
    world.chain.open(3, recipient="0x" + "11" * 20)
    for channel_id, reason in ((2, "channel received belongs to another group of replicas"), (3, "recipient address")):
        with pytest.raises(GrpcError) as info:
            await world.get_state(channel_id)
        assert info.value.status == Status.UNKNOWN
        assert info.value.message.startswith(f"channel error: {reason}"), info.value.message
        with pytest.raises(GrpcError) as info:
            await world.start_claim(channel_id, 0)
        assert info.value.status == Status.UNKNOWN
        assert info.value.message.startswith(reason), info.value.message


async def _claim_started_while_daemon_two_caches_nonce_0() -> tuple[World, World]:
    """Two daemons of a group on one storage: daemon 2 took a payment on channel 1 (so caches it
    at nonce 0), then a claim of it was started through daemon 1."""
    world = World()
    other = World(group_of=world)
    world.chain.open(1, value=1000)
    await other.pay(1, 0, PRICE)
    await other.ledger.quiesce(1)
    await world.start_claim(1, 0)
    return world, other


@aio_test
async def test_channel_state_on_another_daemon_after_a_claim_landed() -> None:
    """Daemon 2 of the group has the channel cached at nonce 0; a claim started through daemon 1
    lands and daemon 1 forgets its record.  Daemon 2 reads the chain once and answers the new
    nonce (it refused, "old payment is not found in storage", failing every snet-sdk call on the
    channel there until its cache expired).  A claim in progress costs it no chain read."""
    world, other = await _claim_started_while_daemon_two_caches_nonce_0()
    reads = other.chain.fresh_reads
    state = await other.get_state(1)
    assert (n(state.current_nonce), n(state.old_nonce_signed_amount)) == (1, PRICE)
    assert other.chain.fresh_reads == reads

    await world.land_claim(1, PRICE)
    state = await other.get_state(1)
    assert n(state.current_nonce) == 1
    assert state.current_signed_amount == b""
    assert state.old_nonce_signed_amount == b""
    assert other.chain.fresh_reads == reads + 1
    await other.get_state(1)
    assert other.chain.fresh_reads == reads + 1  # the fresh view is cached
    await other.pay(1, 1, PRICE)  # what snet-sdk sends next
    assert n((await other.get_state(1)).current_signed_amount) == PRICE


@aio_test
async def test_start_claim_on_another_daemon_after_a_claim_landed() -> None:
    """After a claim started through daemon 1 landed and was forgotten, the next claim reaches
    daemon 2, whose cached chain view is older: it reads the chain and starts the claim (it
    refused: "a claim ... is already in progress").  A claim that has not landed is still refused."""
    world, other = await _claim_started_while_daemon_two_caches_nonce_0()
    await world.land_claim(1, PRICE)
    await other.pay(1, 1, PRICE)  # on the new nonce, through daemon 2
    await other.ledger.quiesce(1)
    claim = await other.start_claim(1, 1)
    assert (n(claim.channel_nonce), n(claim.signed_amount)) == (1, PRICE)
    assert sig.recover(sig.mpe_claim(MPE, 1, 1, PRICE), claim.signature) == sig.address_of(CLIENT_KEY)

    await other.pay(1, 2, PRICE)
    await other.ledger.quiesce(1)
    with pytest.raises(GrpcError) as info:
        await other.start_claim(1, 2)
    assert info.value.status == Status.FAILED_PRECONDITION
    assert "already in progress" in info.value.message


@aio_test
async def test_channel_state_after_a_sendback_claim_landed() -> None:
    """A claim with isSendback lands (MPE: nonce 1, value 0, expiration 0); its record is still
    there (no GetListInProgress since).  Once the cached chain view is older than a block poll
    interval, GetChannelState reads it again and answers as Go does, the nonces agreeing: no
    old payment any more (it answered "claim in progress" for the whole channel TTL)."""
    world, other = await _claim_started_while_daemon_two_caches_nonce_0()
    channel = world.chain.channels[1]
    channel.nonce, channel.value, channel.expiration = 1, 0, 0
    for daemon in (world, other):
        reads = daemon.chain.fresh_reads
        assert n((await daemon.get_state(1)).old_nonce_signed_amount) == PRICE  # the view is recent
        daemon.chain.now = daemon.chain.recheck_after + 0.5
        state = await daemon.get_state(1)
        assert (n(state.current_nonce), state.current_signed_amount, state.old_nonce_signed_amount) == (1, b"", b"")
        assert daemon.chain.fresh_reads == reads + 1
