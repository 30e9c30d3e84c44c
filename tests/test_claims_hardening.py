"""The provider control service against oversized requests and needless chain reads,
and ledgers rebuilt by metadata reloads keeping apart (on fakes, no I/O)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from snet_daemon._proto.escrow import control_service_pb2 as cpb
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments import signatures as sig
from snet_daemon.payments.claims import MAX_CLAIMS_PER_REQUEST
from snet_daemon.payments.escrow import EscrowLedger, metadata_values, parse_escrow
from snet_daemon.storage.memory import MemoryStorage
from tests.support.aio import aio_test
from tests.support.payments import (
    METHOD,
    MPE,
    PRICE,
    PROVIDER_KEY,
    Channel,
    FakeChain,
    StorageLease,
    payment_metadata,
    terms,
)
from tests.test_payment_services import CALL, World
from tests.test_payment_stack import _running_stack, _Service


def _multiple(world: World, ids: list[int], signature: bytes | None = None) -> cpb.StartMultipleClaimRequest:
    block = world.chain.block
    if signature is None:
        signature = sig.sign(sig.start_claim_multiple(MPE, ids, block), PROVIDER_KEY)
    return cpb.StartMultipleClaimRequest(
        mpe_address=sig.checksum(MPE), channel_ids=ids, current_block=block, signature=signature
    )


@aio_test
async def test_a_huge_multiple_claim_is_refused_before_its_message_is_built() -> None:
    """4 MiB of one-byte ids made anyone's request build and hash 128 MiB before the signature
    was checked (780 MB, the event loop stopped 1.2 s); now it is refused at once."""
    world = World()
    request = _multiple(world, [i % 128 for i in range(4 * 1024 * 1024 - 200)], signature=bytes(65))
    started = time.process_time()
    with pytest.raises(GrpcError) as raised:
        await world.control.start_claim_for_multiple_channels(request, CALL)
    assert raised.value.status == Status.INVALID_ARGUMENT
    assert f"at most {MAX_CLAIMS_PER_REQUEST} per request" in raised.value.message
    # Building the message took over a second of CPU; the refusal takes a length check.
    assert time.process_time() - started < 0.5


@aio_test
async def test_a_multiple_claim_at_the_limit_is_served() -> None:
    world = World()
    ids = list(range(MAX_CLAIMS_PER_REQUEST))
    for cid in ids[:3]:
        world.chain.open(cid)
        await world.pay(cid, 0, PRICE)
    # The ids are signed and checked; the first channel without a payment stops the batch, as in Go.
    with pytest.raises(GrpcError) as raised:
        await world.control.start_claim_for_multiple_channels(_multiple(world, ids), CALL)
    assert "channel is not found, channelId: 3" in raised.value.message
    assert sorted(int.from_bytes(p.channel_id, "big") for p in (await world.in_progress()).payments) == [0, 1, 2]


@aio_test
async def test_a_channel_listed_twice_is_refused_before_any_claim_starts() -> None:
    """Go started the first and failed on the second, leaving an error and a claim in progress."""
    world = World()
    for cid in (1, 2):
        world.chain.open(cid)
        await world.pay(cid, 0, PRICE)
    with pytest.raises(GrpcError) as raised:
        await world.control.start_claim_for_multiple_channels(_multiple(world, [1, 1, 2]), CALL)
    assert raised.value.status == Status.INVALID_ARGUMENT
    assert "more than once" in raised.value.message
    assert list((await world.in_progress()).payments) == []
    assert sorted(int.from_bytes(p.channel_id, "big") for p in (await world.unclaimed()).payments) == [1, 2]


@aio_test
async def test_start_claim_reads_only_its_own_channel_from_the_node() -> None:
    """snet-cli's claim-all starts every claim before claiming any on chain: the k-th StartClaim
    read all k-1 claims in progress from the node (N²/2 reads for N channels)."""
    world = World()
    count = 20
    for cid in range(count):
        world.chain.open(cid)
        await world.pay(cid, 0, PRICE)
        await world.ledger.quiesce(cid)
    reads = []
    for cid in range(count):
        before = world.chain.fresh_reads
        await world.start_claim(cid, 0)
        reads.append(world.chain.fresh_reads - before)
    assert max(reads) <= 1, reads
    # The claims that land are still forgotten, by GetListInProgress.
    for cid in range(count):
        world.chain.channels[cid].nonce += 1
    assert list((await world.in_progress()).payments) == []


@dataclass
class _SlowChain(FakeChain):
    """A node that takes a while per read, counting reads under way at once."""

    delay: float = 0.01
    reading: int = 0
    most: int = 0

    async def channel(self, channel_id: int, *, fresh: bool = False, recheck: bool = False) -> Channel | None:
        if fresh or channel_id not in self.cached:
            self.reading += 1
            self.most = max(self.most, self.reading)
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.reading -= 1
        return await super().channel(channel_id, fresh=fresh, recheck=recheck)


def _slow_world() -> tuple[World, _SlowChain]:
    """A daemon of the group whose node answers slowly."""
    world = World()
    chain = _SlowChain()
    world.chain = chain
    world.ledger._chain = chain
    world.control._chain = chain
    return world, chain


@aio_test
async def test_list_unclaimed_reads_expirations_several_at_a_time() -> None:
    """Channels not paid lately are out of the reader's cache: one read each, but no longer one
    after another (a thousand channels were a thousand node round trips in a row)."""
    world, chain = _slow_world()
    count = 24
    for cid in range(count):
        chain.open(cid, expiration=5000 + cid)
        await world.pay(cid, 0, PRICE)
    chain.cached.clear()
    reply = await world.unclaimed()
    assert [int.from_bytes(p.channel_expiry, "big") for p in reply.payments] == [5000 + cid for cid in range(count)]
    assert 1 < chain.most <= 8


@aio_test
async def test_ledgers_rebuilt_for_the_same_group_do_not_share_a_name() -> None:
    """A reload A → B → A built a second ledger for A with the name of the first, which still
    ran calls: it took their holds for leftovers of its own and ran a second call on the channel."""
    stack = await _running_stack(MemoryStorage(lambda: 0.0), _Service(), free_calls=0)
    first = stack._parts
    assert first is not None
    current = stack._metadata.current
    stack._apply(SimpleNamespace(**{**vars(current), "group_id": b"\x09" * 32}))
    stack._apply(current)
    again = stack._parts
    assert again is not None
    assert again is not first
    assert again.ledger._instance != first.ledger._instance
    await stack.stop()


@aio_test
async def test_a_second_ledger_waits_for_the_hold_of_a_call_running_in_the_first() -> None:
    """What the distinct names buy: a call through the rebuilt ledger is refused while the
    retired one's call holds the channel, and that call's refund then applies."""
    storage = MemoryStorage(lambda: 0.0)
    chain = FakeChain()
    chain.open(1)
    world = World()
    keys = world.keys
    old = EscrowLedger(storage, keys, chain, terms, StorageLease(storage), "host/1/x#1")
    new = EscrowLedger(storage, keys, chain, terms, StorageLease(storage), "host/1/x#3")
    running = await old.authorize(METHOD, parse_escrow(metadata_values(payment_metadata(1, 0, PRICE))))
    with pytest.raises(GrpcError) as raised:
        await new.authorize(METHOD, parse_escrow(metadata_values(payment_metadata(1, 0, 2 * PRICE))))
    assert raised.value.status == Status.FAILED_PRECONDITION
    await old.release(running)  # the call failed: refunded
    found = await new.channel_state(1)
    assert found is not None
    assert found[0].authorized_amount == 0


def test_an_address_with_spaces_is_malformed() -> None:
    """bytes.fromhex skips spaces: 40 characters with spaces in them gave fewer than 20 bytes."""
    with pytest.raises(ValueError, match="malformed address"):
        sig.address_bytes("0x" + "ab " * 13 + " ")
    assert sig.address_bytes("0x" + "Ab" * 20) == b"\xab" * 20


@aio_test
async def test_list_in_progress_reads_claims_several_at_a_time_and_forgets_landed_ones() -> None:
    """Every claim in progress is read from the node (has it landed?): no longer one after another."""
    world, chain = _slow_world()
    count = 24
    for cid in range(count):
        chain.open(cid)
        await world.pay(cid, 0, PRICE)
        await world.ledger.quiesce(cid)
        await world.start_claim(cid, 0)
    for cid in range(0, count, 2):  # half of them landed
        chain.channels[cid].nonce += 1
    chain.most = 0
    reply = await world.in_progress()
    assert sorted(int.from_bytes(p.channel_id, "big") for p in reply.payments) == list(range(1, count, 2))
    assert 1 < chain.most <= 8
    # The landed ones were forgotten: the next list reads only what is left.
    assert len((await world.in_progress()).payments) == count // 2
