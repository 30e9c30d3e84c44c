"""Prepaid tokens without I/O: GetToken, the planned/used books, the JWTs (``snet-daemon.md`` §6.6).

In-memory storage, a fake chain, the real escrow ledger: prepayments land
as claimable payments, calls are charged against planned − used with one
conditional write, never beyond planned, also across two daemons.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from twisted.logger import LogLevel, capturedLogs, formatEvent

from snet_daemon._proto.escrow import control_service_pb2 as cpb
from snet_daemon._proto.escrow import token_service_pb2 as pb
from snet_daemon.blockchain.errors import ChainUnavailable
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments import signatures as sig
from snet_daemon.payments.claims import ProviderControl
from snet_daemon.payments.escrow import EscrowLedger, PaymentTerms, metadata_values, parse_escrow
from snet_daemon.payments.prepaid import (
    NO_PLANNED_AMOUNT,
    PrepaidLedger,
    TokenService,
    decode_amount,
    encode_amount,
)
from snet_daemon.payments.tokens import PrepaidTokens, TokenError, TokenSettings
from snet_daemon.storage.base import Condition, ConditionFailed, Delete, Op, StorageTimeout, StorageUnavailable
from snet_daemon.storage.memory import MemoryStorage
from tests.support.aio import aio_test
from tests.support.payments import (
    CLIENT_KEY,
    GROUP,
    METHOD,
    MPE,
    PRICE,
    PROVIDER_KEY,
    SENDER_KEY,
    CountingStorage,
    FakeChain,
    Keys,
    StorageLease,
    payment_metadata,
    terms,
)

CALL: Any = None
SECRET = b"a-secret-for-tests-that-is-long-enough"
GROUP_B64 = base64.b64encode(GROUP).decode()
STRANGER_KEY = sig.keccak256(b"stranger")
CLIENT = sig.checksum(sig.address_of(CLIENT_KEY))


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Daemon:
    """One daemon's payment objects on a (possibly shared) storage and chain."""

    def __init__(self, storage: Any, chain: FakeChain, clock: Clock, mpe: bytes = MPE) -> None:
        self.storage = CountingStorage(storage)
        self.chain = chain
        self.mpe = mpe
        self.keys = Keys(mpe)
        self.terms = replace(terms(), mpe_address=mpe)
        self.ledger = EscrowLedger(self.storage, self.keys, chain, self._terms, StorageLease(self.storage), "d")
        self.prepaid = PrepaidLedger(self.storage, self.keys.layout)
        self.tokens = PrepaidTokens(TokenSettings(SECRET, 60), "test-org", lambda: GROUP_B64, sig.checksum(mpe), clock)
        self.service = TokenService(self.ledger, self.prepaid, self.keys.layout, self.tokens, chain, self._terms)
        self.control = ProviderControl(self.ledger, self.storage, self.keys, chain, self._terms)

    def _terms(self) -> PaymentTerms:
        return self.terms

    def request(
        self,
        channel_id: int,
        amount: int,
        nonce: int = 0,
        key: bytes = CLIENT_KEY,
        outer_key: bytes | None = None,
        block: int | None = None,
    ) -> pb.TokenRequest:
        block = self.chain.block if block is None else block
        claim = sig.sign(sig.mpe_claim(self.mpe, channel_id, nonce, amount), key)
        outer = sig.sign(sig.token_request(claim, block), outer_key or key)
        return pb.TokenRequest(
            channel_id=channel_id,
            current_nonce=nonce,
            signed_amount=amount,
            signature=outer,
            current_block=block,
            claim_signature=claim,
        )

    async def get_token(self, channel_id: int, amount: int, **kwargs: Any) -> pb.TokenReply:
        return await self.service.get_token(self.request(channel_id, amount, **kwargs), CALL)

    async def usage(self, channel_id: int) -> tuple[int | None, int]:
        return await self.prepaid.usage(channel_id)

    async def start_claim(self, channel_id: int, nonce: int) -> cpb.PaymentReply:
        """``StartClaim`` as the treasurer sends it."""
        request = cpb.StartClaimRequest(
            mpe_address=sig.checksum(self.mpe),
            channel_id=channel_id.to_bytes(32, "big"),
            signature=sig.sign(sig.start_claim(self.mpe, channel_id, nonce), PROVIDER_KEY),
        )
        return await self.control.start_claim(request, CALL)


class World:
    def __init__(self) -> None:
        self.memory = MemoryStorage(lambda: 0.0)
        self.chain = FakeChain()
        self.clock = Clock()
        self.chain.open(1)
        self.a = Daemon(self.memory, self.chain, self.clock)

    def daemon(self) -> Daemon:
        return Daemon(self.memory, self.chain, self.clock)


async def refused(awaitable: Any) -> GrpcError:
    with pytest.raises(GrpcError) as info:
        await awaitable
    return info.value


async def escrow_pay(daemon: Daemon, channel_id: int, nonce: int, amount: int) -> None:
    payment = parse_escrow(metadata_values(payment_metadata(channel_id, nonce, amount)))
    daemon.ledger.commit(await daemon.ledger.authorize(METHOD, payment))


# -- GetToken ----------------------------------------------------------------------------


@aio_test
async def test_prepayment_becomes_claimable_and_planned() -> None:
    """GetToken for 4 calls: planned 40, used 0, and the signed amount is the channel's claimable payment."""
    world = World()
    reply = await world.a.get_token(1, 4 * PRICE)
    assert (reply.channel_id, reply.planned_amount, reply.used_amount) == (1, 4 * PRICE, 0)
    assert world.a.tokens.verify(reply.token, 1) == CLIENT
    found = await world.a.ledger.channel_state(1)
    assert found is not None
    state, _ = found
    assert state.authorized_amount == 4 * PRICE
    assert sig.recover(sig.mpe_claim(MPE, 1, 0, 4 * PRICE), state.signature) == sig.address_of(CLIENT_KEY)


@aio_test
async def test_planned_and_used_past_uint64_are_reported_shifted_alike() -> None:
    """Planned and used add up over every nonce, and pass 2**64 after some 18.4 tokens of an
    18-decimal currency: the reply's uint64 fields get both shifted down alike, so what is
    left (planned - used) stays exact, and GetToken keeps working on the channel."""
    world = World()
    world.chain.open(1, value=2**66)
    assert (await world.a.get_token(1, 2**64 - 1)).planned_amount == 2**64 - 1
    # The provider claims it: the channel moves to nonce 1, and prepayments start again.
    world.chain.channels[1] = replace(world.chain.channels[1], nonce=1, value=2**65)
    world.chain.cached.pop(1, None)
    reply = await world.a.get_token(1, 10 * PRICE, nonce=1)
    assert world.a.tokens.verify(reply.token, 1) == CLIENT
    assert (reply.planned_amount, reply.used_amount) == (2**64 - 1, 0)
    assert await world.a.usage(1) == (2**64 - 1 + 10 * PRICE, 0)
    # Seven of the ten prepaid calls left: reported exactly.
    used_key = world.a.keys.layout.prepaid(1, "U")
    await world.memory.put(used_key, encode_amount(2**64 - 1 + 3 * PRICE))
    reply = await world.a.get_token(1, 10 * PRICE, nonce=1)
    assert (reply.planned_amount, reply.used_amount) == (2**64 - 1, 2**64 - 1 - 7 * PRICE)


@aio_test
async def test_asking_again_for_the_same_amount_changes_nothing() -> None:
    """Repeated (and concurrent) requests for one amount raise planned once."""
    world = World()
    replies = await asyncio.gather(*(world.a.get_token(1, 4 * PRICE) for _ in range(5)))
    assert {r.planned_amount for r in replies} == {4 * PRICE}
    assert await world.a.usage(1) == (4 * PRICE, 0)


@aio_test
async def test_never_prepaid_channel_answers_the_text_snet_sdk_swallows() -> None:
    """An escrow-paid channel asked for its last amount: exactly "Unable to retrieve planned Amount "."""
    world = World()
    await escrow_pay(world.a, 1, 0, PRICE)
    error = await refused(world.a.get_token(1, PRICE))
    assert (error.status, error.message) == (Status.UNKNOWN, "Unable to retrieve planned Amount ")
    assert NO_PLANNED_AMOUNT == "Unable to retrieve planned Amount "
    # snet-sdk then signs last + price × concurrent calls.
    reply = await world.a.get_token(1, PRICE + 3 * PRICE)
    assert (reply.planned_amount, reply.used_amount) == (3 * PRICE, 0)


@aio_test
async def test_larger_amount_raises_planned_by_the_difference() -> None:
    """Each larger prepayment adds its increase to planned."""
    world = World()
    await world.a.get_token(1, 2 * PRICE)
    reply = await world.a.get_token(1, 5 * PRICE)
    assert reply.planned_amount == 5 * PRICE


@aio_test
async def test_token_signed_by_the_sender_names_the_sender() -> None:
    """The outer signature may be the sender's; the token then names the sender."""
    world = World()
    reply = await world.a.get_token(1, PRICE, key=SENDER_KEY)
    assert world.a.tokens.verify(reply.token, 1) == sig.checksum(sig.address_of(SENDER_KEY))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"amount": 2000}, "signed amount for token request cannot be greater than full amount in channel"),
        ({"outer_key": STRANGER_KEY}, "only channel signer/sender/receiver can get a Valid Token"),
        ({"block": 1000 - 6}, "authentication failed as the signature passed has expired"),
        ({"nonce": 1}, "incorrect payment channel nonce, latest: 0, sent: 1"),
        ({"key": STRANGER_KEY, "outer_key": CLIENT_KEY}, "payment is not signed by channel signer/sender"),
        ({"channel_id": 9}, "channel is not found, channelId: 9"),
    ],
)
@aio_test
async def test_get_token_rejections(kwargs: dict[str, Any], message: str) -> None:
    """Each GetToken rejection: a plain error (UNKNOWN) with the Go daemon's text."""
    world = World()
    args = {"channel_id": 1, "amount": 4 * PRICE, **kwargs}
    error = await refused(world.a.get_token(args.pop("channel_id"), args.pop("amount"), **args))
    assert (error.status, error.message) == (Status.UNKNOWN, message)
    assert await world.a.usage(1) == (None, 0)


@aio_test
async def test_amount_below_the_last_one_is_refused() -> None:
    """A smaller amount than already signed: Go's text (JS clients look for it)."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    error = await refused(world.a.get_token(1, 3 * PRICE))
    assert error.message == "signed amount for token request needs to be greater than last signed amount"


@aio_test
async def test_garbage_outer_signature_is_refused() -> None:
    """An outer signature that does not recover: "incorrect signature"."""
    world = World()
    request = world.a.request(1, 4 * PRICE)
    request.signature = b"\x01" * 10
    error = await refused(world.a.service.get_token(request, CALL))
    assert error.message == "incorrect signature"


@aio_test
async def test_channel_near_expiry_is_refused() -> None:
    """The escrow checks apply: a channel about to expire takes no prepayment."""
    world = World()
    world.chain.open(2, expiration=1050)
    error = await refused(world.a.get_token(2, PRICE))
    assert error.message.startswith("payment channel is near to be expired")


@aio_test
async def test_prepayment_while_an_escrow_call_holds_the_channel_is_refused() -> None:
    """An escrow call in flight holds the channel: a larger prepayment waits for it."""
    world = World()
    payment = parse_escrow(metadata_values(payment_metadata(1, 0, PRICE)))
    hold = await world.a.ledger.authorize(METHOD, payment)
    other = world.daemon()
    error = await refused(other.get_token(1, 4 * PRICE))
    assert error.message == "another transaction on channel: {ID: 1} is in progress"
    await world.a.ledger.release(hold)
    await other.get_token(1, 4 * PRICE)


@aio_test
async def test_prepayment_right_after_an_escrow_call_elsewhere_waits_for_its_hold() -> None:
    """An escrow call that just finished on another daemon leaves its hold lingering: GetToken waits for it."""
    world = World()
    payment = parse_escrow(metadata_values(payment_metadata(1, 0, PRICE)))
    world.a.ledger.commit(await world.a.ledger.authorize(METHOD, payment))
    other = world.daemon()
    await other.get_token(1, 4 * PRICE)


@aio_test
async def test_storage_down_is_unavailable() -> None:
    """GetToken needs the storage."""
    world = World()
    world.a.storage.fail = StorageUnavailable("down")
    error = await refused(world.a.get_token(1, PRICE))
    assert error.status == Status.UNAVAILABLE


# -- charging ------------------------------------------------------------------------------


@aio_test
async def test_calls_are_charged_until_planned_is_used_up() -> None:
    """Four calls of a 4-call prepayment pass; the fifth: "Usage Exceeded on channel Id 1"."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    for _ in range(4):
        await world.a.prepaid.charge(1, PRICE)
    error = await refused(world.a.prepaid.charge(1, PRICE))
    assert (error.status, error.message) == (Status.RESOURCE_EXHAUSTED, "Usage Exceeded on channel Id 1")
    assert await world.a.usage(1) == (4 * PRICE, 4 * PRICE)
    reply = await world.a.get_token(1, 4 * PRICE)
    assert (reply.planned_amount, reply.used_amount) == (4 * PRICE, 4 * PRICE)


@aio_test
async def test_never_prepaid_channel_is_not_charged() -> None:
    """No planned amount at all: the call is refused."""
    world = World()
    error = await refused(world.a.prepaid.charge(1, PRICE))
    assert error.message == "Usage Exceeded on channel Id 1"


@aio_test
async def test_a_free_method_is_neither_charged_nor_refused() -> None:
    """A method priced 0 (metadata allows it) passes at once, even with nothing planned."""
    world = World()
    await asyncio.wait_for(world.a.prepaid.charge(1, 0), 1.0)
    await asyncio.wait_for(world.a.prepaid.refund(1, 0), 1.0)
    await world.a.get_token(1, 2 * PRICE)
    await asyncio.wait_for(world.a.prepaid.charge(1, 0), 1.0)
    assert await world.a.usage(1) == (2 * PRICE, 0)


@aio_test
async def test_refund_gives_the_charge_back() -> None:
    """A failed call's refund brings used back down."""
    world = World()
    await world.a.get_token(1, 2 * PRICE)
    await world.a.prepaid.charge(1, PRICE)
    await world.a.prepaid.refund(1, PRICE)
    assert await world.a.usage(1) == (2 * PRICE, 0)


@aio_test
async def test_a_steady_charge_is_one_conditional_write() -> None:
    """Once the books are known, each charge is one storage round trip."""
    world = World()
    await world.a.get_token(1, 10 * PRICE)
    await world.a.prepaid.charge(1, PRICE)
    world.a.storage.calls.clear()
    await world.a.prepaid.charge(1, PRICE)
    assert world.a.storage.calls == ["transaction"]


@aio_test
async def test_concurrent_charges_are_combined_and_never_exceed_planned() -> None:
    """64 calls at once on a 50-call prepayment: 50 pass, used is 500, in a few transactions."""
    world = World()
    await world.a.get_token(1, 50 * PRICE)
    world.a.storage.calls.clear()
    results = await asyncio.gather(*(world.a.prepaid.charge(1, PRICE) for _ in range(64)), return_exceptions=True)
    passed = [r for r in results if r is None]
    assert len(passed) == 50
    assert all(isinstance(r, GrpcError) and r.status == Status.RESOURCE_EXHAUSTED for r in results if r is not None)
    assert await world.a.usage(1) == (50 * PRICE, 50 * PRICE)
    assert world.a.storage.calls.count("transaction") <= 4


@aio_test
async def test_two_daemons_never_spend_more_than_planned_together() -> None:
    """64 calls split over two daemons sharing the storage: used == successes × price <= planned."""
    world = World()
    b = world.daemon()
    await world.a.get_token(1, 40 * PRICE)
    charges = [d.prepaid.charge(1, PRICE) for _ in range(32) for d in (world.a, b)]
    results = await asyncio.gather(*charges, return_exceptions=True)
    passed = sum(1 for r in results if r is None)
    assert passed == 40
    planned, used = await world.a.usage(1)
    assert used == passed * PRICE == planned


class _StalledDeletes(CountingStorage):
    """Deletions wait for ``go`` while ``stall`` is set (as behind an etcd request in flight)."""

    stall = False

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.go = asyncio.Event()

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        if self.stall and any(isinstance(op, Delete) for op in ops):
            await self.go.wait()
        return await super().transaction(conditions, ops)


@pytest.mark.parametrize("writer", ["get_token", "start_claim"])
@aio_test
async def test_writer_cancelled_while_our_lingering_hold_goes_leaves_no_hold(writer: str) -> None:
    """GetToken and StartClaim first delete our lingering hold; cancelled meanwhile (deadline),
    the deletion still happens, so no hold of ours is left blocking the channel."""
    world = World()
    storage = _StalledDeletes(world.memory)
    daemon = world.a
    daemon.ledger = EscrowLedger(storage, daemon.keys, world.chain, terms, StorageLease(storage), "a", linger=60)
    daemon.service = TokenService(daemon.ledger, daemon.prepaid, daemon.keys.layout, daemon.tokens, world.chain, terms)
    daemon.control = ProviderControl(daemon.ledger, storage, daemon.keys, world.chain, terms)
    await escrow_pay(daemon, 1, 0, PRICE)  # our hold lingers (a minute)
    hold_key = daemon.keys.channel_hold(1)
    storage.stall = True
    task: asyncio.Future[Any]
    if writer == "get_token":
        task = asyncio.ensure_future(daemon.get_token(1, 5 * PRICE))
    else:
        task = asyncio.ensure_future(daemon.start_claim(1, 0))
    for _ in range(20):
        await asyncio.sleep(0)
    task.cancel()  # the client's deadline passes while the deletion waits
    with pytest.raises(asyncio.CancelledError):
        await task
    storage.go.set()
    for _ in range(100):
        if await world.memory.get(hold_key) is None:
            break
        await asyncio.sleep(0.01)
    assert await world.memory.get(hold_key) is None
    await world.daemon().get_token(1, 5 * PRICE)  # another daemon prepays at once


@aio_test
async def test_prepayment_on_a_daemon_whose_chain_view_predates_a_landed_claim() -> None:
    """60 of a channel of 100 were claimed and the claim landed (value 40); a daemon that saw it
    paid on nonce 1.  A daemon whose cached view is from before (value 100) refuses a prepayment
    of 100 on nonce 1: the channel holds 40."""
    world = World()
    world.chain.channels[1].value = 100
    a = world.a
    stale = Daemon(world.memory, FakeChain(channels=world.chain.channels), world.clock)
    await a.get_token(1, 60)
    await stale.get_token(1, 60)  # its view: nonce 0, value 100
    await a.start_claim(1, 0)
    world.chain.channels[1].nonce, world.chain.channels[1].value = 1, 40  # the claim landed
    world.chain.cached.clear()
    await escrow_pay(a, 1, 1, PRICE)
    error = await refused(stale.get_token(1, 100, nonce=1))
    assert error.message == "signed amount for token request cannot be greater than full amount in channel"
    await stale.get_token(1, 40, nonce=1)  # what is left is fine


@aio_test
async def test_prepayment_after_a_sendback_claim_landed_is_refused() -> None:
    """A claim with isSendback lands (MPE: nonce 1, value 0, expiration 0) after the chain view was
    cached.  Once the view is older than a block poll interval, a prepayment under the new nonce
    has it read again and is refused (it was accepted against the old view for the channel TTL)."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    await world.a.start_claim(1, 0)
    channel = world.chain.channels[1]
    channel.nonce, channel.value, channel.expiration = 1, 0, 0
    world.chain.now = world.chain.recheck_after + 0.5
    error = await refused(world.a.get_token(1, PRICE, nonce=1))
    assert error.message == "signed amount for token request cannot be greater than full amount in channel"


@aio_test
async def test_a_node_down_fails_every_channel_read_of_get_token_alike() -> None:
    """GetToken answers a failed channel read in Go's words (UNKNOWN), whether it is the first
    read of an uncached channel or the recheck of a cached one while a claim is pending."""
    world = World()
    world.chain.channel_error = ChainUnavailable("node down")
    first = await refused(world.a.get_token(1, 4 * PRICE))

    world = World()
    await world.a.get_token(1, 4 * PRICE)
    await world.a.start_claim(1, 0)
    world.chain.now = world.chain.recheck_after + 0.5
    world.chain.channel_error = ChainUnavailable("node down")
    recheck = await refused(world.a.get_token(1, PRICE, nonce=1))

    for error in (first, recheck):
        assert error.status == Status.UNKNOWN
        assert error.message.startswith("error:")
        assert error.message.endswith("details of channelID:1")


@aio_test
async def test_prepayment_made_on_another_daemon_is_seen() -> None:
    """A daemon whose books say "used up" looks again before refusing."""
    world = World()
    b = world.daemon()
    await world.a.get_token(1, PRICE)
    await world.a.prepaid.charge(1, PRICE)
    await b.get_token(1, 3 * PRICE)
    await world.a.prepaid.charge(1, PRICE)
    assert await world.a.usage(1) == (3 * PRICE, 2 * PRICE)


@aio_test
async def test_storage_down_refuses_charges() -> None:
    """No storage, no charge: UNAVAILABLE."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    world.a.storage.fail = StorageUnavailable("down")
    error = await refused(world.a.prepaid.charge(1, PRICE))
    assert error.status == Status.UNAVAILABLE


@aio_test
async def test_cancelled_charge_is_refunded() -> None:
    """A call cancelled while its charge is in flight gets the charge back."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    task = asyncio.ensure_future(world.a.prepaid.charge(1, PRICE))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(10):
        await asyncio.sleep(0)
    assert await world.a.usage(1) == (4 * PRICE, 0)


@aio_test
async def test_stored_amount_encoding() -> None:
    """Planned and used are stored as 0x01 ‖ 32-byte big-endian amounts under Go's keys, moved under the contract."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    books = "test/test-org/" + GROUP_B64 + "/" + sig.checksum(MPE) + "//PrePaid/storage"
    entry = await world.memory.get(books + "/{ID:1/P}")
    assert entry is not None
    assert entry.value == b"\x01" + (4 * PRICE).to_bytes(32, "big")
    assert decode_amount(entry) == 4 * PRICE
    # Used: 0x02 ‖ amount ‖ (tag ‖ parent revision) of each write, newest first, at most 8.
    for _ in range(3):
        await world.a.prepaid.charge(1, PRICE)
    used = await world.memory.get(books + "/{ID:1/U}")
    assert used is not None
    assert used.value[:33] == b"\x02" + (3 * PRICE).to_bytes(32, "big")
    assert len(used.value) == 33 + 3 * 16
    parents = [int.from_bytes(used.value[i + 8 : i + 16], "big") for i in range(33, len(used.value), 16)]
    assert parents[-1] == 0  # the first write: the key was absent
    assert parents == sorted(parents, reverse=True)
    assert parents[0] < used.mod_revision
    assert decode_amount(used) == 3 * PRICE


# -- claims after prepaid use ---------------------------------------------------------------


@aio_test
async def test_prepaid_amounts_are_claimed_and_prepayment_continues_on_the_next_nonce() -> None:
    """The treasurer claims the GetToken signature; the next prepayment on nonce 1 adds to planned."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    for _ in range(4):
        await world.a.prepaid.charge(1, PRICE)
    claim = await world.a.start_claim(1, 0)
    assert int.from_bytes(claim.signed_amount, "big") == 4 * PRICE
    assert sig.recover(sig.mpe_claim(MPE, 1, 0, 4 * PRICE), claim.signature) == sig.address_of(CLIENT_KEY)
    # The claim lands on chain (nonce 1, value reduced).
    world.chain.channels[1].nonce = 1
    world.chain.channels[1].value -= 4 * PRICE
    world.chain.cached.clear()
    reply = await world.a.get_token(1, 2 * PRICE, nonce=1)
    assert (reply.planned_amount, reply.used_amount) == (6 * PRICE, 4 * PRICE)
    await world.a.prepaid.charge(1, PRICE)


# -- another MPE contract ----------------------------------------------------------------------

MPE2 = sig.address_bytes("0x" + "77" * 20)
NEWCOMER_KEY = sig.keccak256(b"newcomer on the new contract")


def _contract_switch() -> tuple[Daemon, Daemon]:
    """A daemon on the old contract, where the client prepaid 10 calls on channel 1 and made one,
    and a daemon after the metadata named a new contract (same storage, secret and group),
    whose channel 1 belongs to a newcomer who never paid anything."""
    world = World()
    new_chain = FakeChain()
    new_chain.open(1, signer=sig.checksum(sig.address_of(NEWCOMER_KEY)))
    return world.a, Daemon(world.memory, new_chain, world.clock, mpe=MPE2)


@aio_test
async def test_a_new_contracts_channel_does_not_inherit_the_old_ones_books() -> None:
    """Channel 1 of the new contract has never been prepaid: the newcomer signing amount 0 gets
    "Unable to retrieve planned Amount ", not the old channel 1's planned 100 / used 10."""
    old, new = _contract_switch()
    await old.get_token(1, 10 * PRICE)
    await old.prepaid.charge(1, PRICE)
    error = await refused(new.get_token(1, 0, key=NEWCOMER_KEY))
    assert (error.status, error.message) == (Status.UNKNOWN, NO_PLANNED_AMOUNT)
    assert await new.usage(1) == (None, 0)
    assert await old.usage(1) == (10 * PRICE, PRICE)  # the old books are still the old channel's


@aio_test
async def test_a_new_contracts_channel_is_not_served_on_the_old_prepayment() -> None:
    """A prepaid call on the new channel 1 is refused, and the old channel 1's token does not pass."""
    old, new = _contract_switch()
    reply = await old.get_token(1, 10 * PRICE)
    error = await refused(new.prepaid.charge(1, PRICE))
    assert error.message == "Usage Exceeded on channel Id 1"
    with pytest.raises(TokenError) as info:
        new.tokens.verify(reply.token, 1)
    assert str(info.value) == f"mpeAddress {sig.checksum(MPE)} is not associated with this Daemon"


# -- the JWTs ---------------------------------------------------------------------------------


def _tokens(
    clock: Clock, secret: bytes = SECRET, org: str = "test-org", group: str = GROUP_B64, mpe: bytes = MPE
) -> PrepaidTokens:
    return PrepaidTokens(TokenSettings(secret, 60), org, lambda: group, sig.checksum(mpe), clock)


def test_token_is_the_go_daemons_jwt() -> None:
    """HS256 JWT with Go's header and sorted claims: exp, groupId, mpeAddress (ours), orgId, payload, userAddress."""
    clock = Clock()
    token = _tokens(clock).create(5, CLIENT)
    header, body, signature = token.split(".")
    assert header == "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"  # {"alg":"HS256","typ":"JWT"}
    claims = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    expected = {
        "exp": int(clock.now) + 3600,
        "groupId": GROUP_B64,
        "mpeAddress": sig.checksum(MPE),
        "orgId": "test-org",
        "payload": "5",
        "userAddress": CLIENT,
    }
    assert claims == json.dumps(expected, separators=(",", ":"))
    mac = hmac.new(SECRET, f"{header}.{body}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64encode(mac).rstrip(b"=").decode() == signature


def _refusal(tokens: PrepaidTokens, token: str, channel_id: int = 5) -> str:
    with pytest.raises(TokenError) as info:
        tokens.verify(token, channel_id)
    return str(info.value)


def test_token_for_another_channel_is_refused() -> None:
    """A token names one channel."""
    tokens = _tokens(Clock())
    message = _refusal(tokens, tokens.create(6, CLIENT))
    assert message == "payload 6 used to generate the Token doesnt match expected values"


def test_expired_token_is_refused() -> None:
    """token_expiry_in_minutes later the token is refused."""
    clock = Clock()
    tokens = _tokens(clock)
    token = tokens.create(5, CLIENT)
    clock.now += 3599
    assert tokens.verify(token, 5) == CLIENT
    clock.now += 1
    assert _refusal(tokens, token) == "token has invalid claims: token is expired"


def test_token_of_another_secret_organisation_or_group_is_refused() -> None:
    """Signature, orgId and groupId are all checked."""
    clock = Clock()
    mine = _tokens(clock)
    assert _refusal(mine, _tokens(clock, secret=b"x" * 40).create(5, CLIENT)) == (
        "token signature is invalid: signature is invalid"
    )
    assert _refusal(mine, _tokens(clock, org="other-org").create(5, CLIENT)) == (
        "organization other-org is not associated with this Daemon"
    )
    assert _refusal(mine, _tokens(clock, group="b3RoZXI=").create(5, CLIENT)) == (
        "groupId b3RoZXI= is not associated with this Daemon"
    )


def test_token_of_another_contract_or_naming_none_is_refused() -> None:
    """mpeAddress (ours, not Go's) is checked: a token of another contract, or a Go daemon's
    token (signed with the same secret but naming no contract), is refused like any invalid token."""
    clock = Clock()
    mine = _tokens(clock)
    other = sig.checksum(sig.address_bytes("0x" + "77" * 20))
    assert _refusal(mine, _tokens(clock, mpe=sig.address_bytes(other)).create(5, CLIENT)) == (
        f"mpeAddress {other} is not associated with this Daemon"
    )
    claims = {"exp": int(clock.now) + 60, "groupId": GROUP_B64, "orgId": "test-org", "payload": "5"}
    claims["userAddress"] = CLIENT
    body = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).rstrip(b"=")
    signing_input = b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9." + body
    mac = base64.urlsafe_b64encode(hmac.new(SECRET, signing_input, hashlib.sha256).digest()).rstrip(b"=")
    go_token = (signing_input + b"." + mac).decode()
    assert _refusal(mine, go_token) == "mpeAddress <nil> is not associated with this Daemon"


def test_malformed_and_unsigned_tokens_are_refused() -> None:
    """Garbage and alg "none" tokens are refused with golang-jwt's texts."""
    tokens = _tokens(Clock())
    assert _refusal(tokens, "not-a-jwt") == "token is malformed: token contains an invalid number of segments"
    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    body = tokens.create(5, CLIENT).split(".")[1]
    assert _refusal(tokens, f"{none_header}.{body}.") == (
        "token is unverifiable: error while executing keyfunc: unexpected signing method: none"
    )
    assert _refusal(tokens, "e30.!!!.x").startswith("token is malformed")


def test_settings_repr_hides_the_secret() -> None:
    """The secret never reaches a log line through a repr."""
    assert "secret" not in repr(TokenSettings(SECRET, 5)).replace("secret=***", "")


# -- storage trouble ---------------------------------------------------------------------------


class TimesOutAfterWriting(CountingStorage):
    """A storage whose next transaction is applied but reported as timed out."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.time_out_next = False

    async def transaction(self, conditions: Any, ops: Any) -> int:
        revision = await super().transaction(conditions, ops)
        if self.time_out_next:
            self.time_out_next = False
            raise StorageTimeout("deadline exceeded")
        return revision


@aio_test
async def test_timed_out_charge_that_was_written_counts_as_done() -> None:
    """A charge whose write timed out but landed is not reported as failed (read back once)."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    storage = TimesOutAfterWriting(world.memory)
    ledger = PrepaidLedger(storage, world.a.keys.layout)
    await ledger.charge(1, PRICE)
    storage.time_out_next = True
    await ledger.charge(1, PRICE)
    assert await world.a.usage(1) == (4 * PRICE, 2 * PRICE)


class _LostReply(CountingStorage):
    """The next transaction's reply is lost (StorageTimeout).  Around it, as set: ``before`` runs
    first (another daemon's write), the transaction applies or not (``apply``), ``after`` runs
    (another daemon's write), or it lands only later, after whatever the caller does next (``late``)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.armed = False
        self.apply = True
        self.late = False
        self.before: Any = None
        self.after: Any = None
        self.landing: asyncio.Future[Any] | None = None

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        if not self.armed:
            return await super().transaction(conditions, ops)
        self.armed = False
        if self.before is not None:
            await self.before()
        if self.late:

            async def land() -> None:
                await asyncio.sleep(0.05)
                with contextlib.suppress(ConditionFailed):
                    await self.inner.transaction(conditions, ops)

            self.landing = asyncio.ensure_future(land())
        elif self.apply:
            with contextlib.suppress(ConditionFailed):
                await self.inner.transaction(conditions, ops)
        if self.after is not None:
            await self.after()
        raise StorageTimeout("deadline exceeded")


async def _lost_reply_world(planned_calls: int) -> tuple[World, Daemon, _LostReply, PrepaidLedger]:
    world = World()
    await world.a.get_token(1, planned_calls * PRICE)
    storage = _LostReply(world.memory)
    ledger = PrepaidLedger(storage, world.a.keys.layout, sleep=lambda _: asyncio.sleep(0))
    await ledger.charge(1, PRICE)  # our books are warm: one call used
    return world, world.daemon(), storage, ledger


@aio_test
async def test_lost_reply_of_a_charge_beaten_by_another_daemon_is_not_taken_as_ours() -> None:
    """Two calls planned, one used.  Our charge's reply is lost; it did not apply, because another
    daemon charged the last call first, leaving the very amount ours would have.  Ours is then
    tried again and refused: two calls served, not three."""
    world, other, storage, ledger = await _lost_reply_world(2)

    async def other_charges() -> None:
        await other.prepaid.charge(1, PRICE)

    storage.armed, storage.before = True, other_charges
    error = await refused(ledger.charge(1, PRICE))
    assert error.status == Status.RESOURCE_EXHAUSTED
    assert await world.a.usage(1) == (2 * PRICE, 2 * PRICE)


@aio_test
async def test_lost_reply_of_a_charge_written_over_by_another_daemon_counts_as_done() -> None:
    """Our charge applied, its reply was lost, and another daemon charged on top before we looked:
    ours is recognised as done (the call is served, and charged once)."""
    world, other, storage, ledger = await _lost_reply_world(4)

    async def other_charges() -> None:
        await other.prepaid.charge(1, PRICE)

    storage.armed, storage.after = True, other_charges
    await ledger.charge(1, PRICE)
    assert await world.a.usage(1) == (4 * PRICE, 3 * PRICE)


@aio_test
async def test_lost_reply_of_a_refund_written_over_by_another_daemon_is_not_given_twice() -> None:
    """Our refund applied, its reply was lost, another daemon charged on top: the refund is not
    tried again (it would give the call back twice)."""
    world, other, storage, ledger = await _lost_reply_world(4)
    await ledger.charge(1, PRICE)  # two used

    async def other_charges() -> None:
        await other.prepaid.charge(1, PRICE)

    storage.armed, storage.after = True, other_charges
    await ledger.refund(1, PRICE)
    for _ in range(20):
        await asyncio.sleep(0)
    assert await world.a.usage(1) == (4 * PRICE, 2 * PRICE)  # 2 - 1 + 1


@aio_test
async def test_lost_write_that_would_land_late_is_fenced_off() -> None:
    """Our charge's reply was lost and it had not applied yet: a write conditioned on the same
    revision makes sure it never does; the charge is then made again, once."""
    world, _, storage, ledger = await _lost_reply_world(4)
    storage.armed, storage.late = True, True
    await ledger.charge(1, PRICE)
    assert storage.landing is not None
    await storage.landing  # the late write comes, and finds the revision moved on
    assert await world.a.usage(1) == (4 * PRICE, 2 * PRICE)


@aio_test
async def test_lost_reply_beyond_the_history_refuses_the_call() -> None:
    """When more writes followed ours than a used amount remembers, its outcome cannot be told:
    the call is refused (it may have been charged), nothing is retried."""
    world, other, storage, ledger = await _lost_reply_world(20)

    async def others_charge() -> None:
        for _ in range(9):
            await other.prepaid.charge(1, PRICE)

    storage.armed, storage.after = True, others_charge
    error = await refused(ledger.charge(1, PRICE))
    assert error.status == Status.UNAVAILABLE
    assert await world.a.usage(1) == (20 * PRICE, 11 * PRICE)  # 1 + ours + 9: ours did apply


@aio_test
async def test_refund_during_a_storage_outage_lands_later() -> None:
    """A refund that cannot be written is retried in the background until storage is back."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    storage = CountingStorage(world.memory)
    naps: list[float] = []

    async def sleep(seconds: float) -> None:
        naps.append(seconds)
        storage.fail = None  # back after the first nap

    ledger = PrepaidLedger(storage, world.a.keys.layout, sleep=sleep)
    await ledger.charge(1, PRICE)
    storage.fail = StorageUnavailable("down")
    await ledger.refund(1, PRICE)  # returns without waiting for the outage to end
    for _ in range(10):
        await asyncio.sleep(0)
    assert naps
    assert await world.a.usage(1) == (4 * PRICE, 0)


@aio_test
async def test_settle_waits_for_the_refund_of_a_call_cancelled_while_charged() -> None:
    """The daemon stops while a cancelled call's charge is being written: settle waits for the
    charge to land and for its refund, which the storage closing next would cut off."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    storage = world.a.storage
    storage.reply_after = reply = asyncio.Event()
    charge = asyncio.ensure_future(world.a.prepaid.charge(1, PRICE))
    await storage.applied.wait()
    charge.cancel()
    with pytest.raises(asyncio.CancelledError):
        await charge
    settling = asyncio.ensure_future(world.a.prepaid.settle(5.0))
    await asyncio.sleep(0)
    assert not settling.done()
    reply.set()
    await settling
    assert await world.a.usage(1) == (4 * PRICE, 0)


@aio_test
async def test_a_refund_the_stop_cuts_off_is_logged() -> None:
    """A refund retried while storage is down when the daemon stops: settle waits only its
    deadline, and close gives the refund up with an error in the log (it vanished unsaid)."""
    world = World()
    await world.a.get_token(1, 4 * PRICE)
    storage = CountingStorage(world.memory)
    never = asyncio.Event()

    async def sleep(seconds: float) -> None:
        await never.wait()  # storage stays down longer than the stop waits

    ledger = PrepaidLedger(storage, world.a.keys.layout, sleep=sleep)
    await ledger.charge(1, PRICE)
    storage.fail = StorageUnavailable("down")
    await ledger.refund(1, PRICE)
    with capturedLogs() as events:
        await asyncio.wait_for(ledger.settle(0.05), 1.0)
        ledger.close()
        for _ in range(10):
            await asyncio.sleep(0)
    (event,) = [event for event in events if event["log_level"] == LogLevel.error]
    assert "refund of 10 to prepaid channel 1 may be lost: the daemon stopped first" in formatEvent(event)
    assert await world.a.usage(1) == (4 * PRICE, PRICE)


def test_a_known_token_is_not_verified_twice_but_its_claims_are() -> None:
    """The signature check is cached per token; expiry and channel are checked every time."""
    clock = Clock()
    tokens = _tokens(clock)
    token = tokens.create(5, CLIENT)
    assert tokens.verify(token, 5) == CLIENT
    assert tokens.verify(token, 5) == CLIENT
    assert _refusal(tokens, token, channel_id=6) == "payload 5 used to generate the Token doesnt match expected values"
    clock.now += 3600
    assert _refusal(tokens, token) == "token has invalid claims: token is expired"
