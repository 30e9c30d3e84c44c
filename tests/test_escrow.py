"""The escrow ledger without I/O: in-memory storage, a fake chain, fixed keys.

Every rejection path of the Go daemon (order, code, message), and the
accounting guarantees: a failed call is refunded, holds die with their
daemon's lease, one round trip per call, no double acceptance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from snet_daemon.blockchain.errors import ChainUnavailable
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments.channel import ChannelState, merge, spendable
from snet_daemon.payments.escrow import EscrowLedger, Hold, metadata_values, parse_escrow
from snet_daemon.storage.base import Condition, ConditionFailed, Entry, Op, Put, StorageTimeout, StorageUnavailable
from snet_daemon.storage.memory import MemoryStorage
from tests.support.aio import aio_test
from tests.support.payments import (
    CLIENT_KEY,
    METHOD,
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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


_daemons = iter(range(1_000_000))


def make(
    storage: object | None = None,
    chain: FakeChain | None = None,
    linger: float = 0.02,
    foreign_wait: float = 0.1,
    late_write_grace: float = 2.0,
    **term_args: int,
) -> tuple[EscrowLedger, FakeChain, CountingStorage]:
    """A ledger (a daemon instance with a name of its own) on ``storage``."""
    chain = chain or FakeChain()
    counting = CountingStorage(storage or MemoryStorage(Clock()))  # type: ignore[arg-type]
    ledger = EscrowLedger(
        counting,
        Keys(),
        chain,
        lambda: terms(**term_args),
        StorageLease(counting),
        f"test-daemon-{next(_daemons)}",
        linger=linger,
        foreign_wait=foreign_wait,
        late_write_grace=late_write_grace,
    )
    return ledger, chain, counting


async def hold_of(storage: MemoryStorage | CountingStorage, channel_id: int) -> Entry | None:
    return await storage.get(Keys().channel_hold(channel_id))


async def hold_gone(
    storage: MemoryStorage | CountingStorage, channel_id: int, ledger: EscrowLedger | None = None, wait: float = 1.0
) -> bool:
    """Whether the channel's hold is gone (and ``ledger`` done with the channel) within ``wait`` seconds."""
    for _ in range(round(wait / 0.01)):
        if await hold_of(storage, channel_id) is None and (ledger is None or channel_id not in ledger._busy):
            return True
        await asyncio.sleep(0.01)
    return False


async def signed_amount(ledger: EscrowLedger, channel_id: int) -> int:
    """The amount recorded on the channel (0 when nothing is)."""
    state = await ledger.channel_state(channel_id)
    assert state is not None
    return state[0].authorized_amount


async def pay(ledger: EscrowLedger, channel_id: int, nonce: int, amount: int, key: bytes = CLIENT_KEY) -> Hold:
    payment = parse_escrow(metadata_values(payment_metadata(channel_id, nonce, amount, key)))
    return await ledger.authorize(METHOD, payment)


async def rejected(
    ledger: EscrowLedger, channel_id: int, nonce: int, amount: int, key: bytes = CLIENT_KEY
) -> GrpcError:
    with pytest.raises(GrpcError) as info:
        await pay(ledger, channel_id, nonce, amount, key)
    return info.value


@aio_test
async def test_pay_commit_and_pay_again() -> None:
    """A payment is held, committed, and the next call pays the next increment."""
    ledger, chain, _ = make()
    chain.open(1)
    hold = await pay(ledger, 1, 0, PRICE)
    assert hold.sender == chain.channels[1].sender
    ledger.commit(hold)
    state = await ledger.channel_state(1)
    assert state is not None
    assert state[0] == ChannelState(0, PRICE, hold.payment.signature)
    ledger.commit(await pay(ledger, 1, 0, 2 * PRICE))
    state = await ledger.channel_state(1)
    assert state is not None
    assert state[0].authorized_amount == 2 * PRICE


@aio_test
async def test_one_storage_round_trip_per_call_in_steady_state() -> None:
    """After the first call, each paid call is one transaction, which takes the last call's hold over."""
    ledger, chain, storage = make(linger=60)
    chain.open(1)
    ledger.commit(await pay(ledger, 1, 0, PRICE))
    storage.calls.clear()
    reads_before = chain.fresh_reads
    for i in range(2, 12):
        ledger.commit(await pay(ledger, 1, 0, i * PRICE))
    assert storage.calls == ["transaction"] * 10
    assert chain.fresh_reads == reads_before  # no chain RPC per call


@aio_test
async def test_payment_is_recorded_before_the_call() -> None:
    """Once authorized, the payment is in storage (nothing to lose), and the channel is held."""
    ledger, chain, storage = make()
    chain.open(1)
    hold = await pay(ledger, 1, 0, PRICE)
    state = await ledger.channel_state(1)
    assert state is not None
    assert state[0] == ChannelState(0, PRICE, hold.payment.signature)
    assert await hold_of(storage, 1) is not None
    ledger.commit(hold)


@aio_test
async def test_finished_call_hold_lingers_then_goes() -> None:
    """A finished call's hold is deleted in the background after the linger time."""
    ledger, chain, storage = make(linger=0.01)
    chain.open(1)
    ledger.commit(await pay(ledger, 1, 0, PRICE))
    assert await hold_of(storage, 1) is not None
    assert await hold_gone(storage, 1)
    state = await ledger.channel_state(1)
    assert state is not None
    assert state[0].authorized_amount == PRICE  # the payment stays


async def _settle(rounds: int = 10) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


@aio_test
async def test_each_lingering_hold_goes_when_its_own_time_is_up() -> None:
    """A hold lingers its full time even when another, older one is deleted meanwhile."""
    now = [0.0]

    async def sleep(delay: float) -> None:
        await asyncio.sleep(0)  # the test moves the clock

    chain = FakeChain()
    chain.open(1)
    chain.open(2)
    storage = CountingStorage(MemoryStorage(Clock()))
    ledger = EscrowLedger(
        storage, Keys(), chain, terms, StorageLease(storage), "d", sleep=sleep, clock=lambda: now[0], linger=0.02
    )
    ledger.commit(await pay(ledger, 1, 0, PRICE))
    now[0] = 0.015
    ledger.commit(await pay(ledger, 2, 0, PRICE))
    now[0] = 0.02
    await _settle()
    assert await hold_of(storage, 1) is None
    assert await hold_of(storage, 2) is not None  # due at 0.035
    now[0] = 0.035
    await _settle()
    assert await hold_of(storage, 2) is None


@aio_test
async def test_unused_lingering_hold_makes_the_next_holds_go_at_once() -> None:
    """A channel whose lingering hold went unused (its calls go elsewhere) drops its holds as its calls end,
    until a call comes back while that is under way; then its holds linger again."""
    ledger, chain, storage = make(linger=0.05)
    chain.open(1)
    ledger.commit(await pay(ledger, 1, 0, PRICE))
    assert await hold_gone(storage, 1)  # lingered, unused, deleted
    ledger.commit(await pay(ledger, 1, 0, 2 * PRICE))
    await _settle()
    assert await hold_of(storage, 1) is None  # deleted at once, not after 50 ms
    ledger.commit(await pay(ledger, 1, 0, 3 * PRICE))
    # The client is back before that deletion landed: its holds linger again.
    ledger.commit(await pay(ledger, 1, 0, 4 * PRICE))
    await _settle()
    assert await hold_of(storage, 1) is not None


@aio_test
async def test_failed_call_is_not_charged() -> None:
    """Releasing puts the channel back as it was; the same payment is then accepted."""
    ledger, chain, storage = make()
    chain.open(1)
    ledger.commit(await pay(ledger, 1, 0, PRICE))
    await ledger.release(await pay(ledger, 1, 0, 2 * PRICE))
    state = await ledger.channel_state(1)
    assert state is not None
    assert state[0].authorized_amount == PRICE
    assert await hold_of(storage, 1) is None
    ledger.commit(await pay(ledger, 1, 0, 2 * PRICE))


@aio_test
async def test_failed_first_call_leaves_no_state() -> None:
    """A channel's first call, failed, leaves no state behind."""
    ledger, chain, storage = make()
    chain.open(1)
    await ledger.release(await pay(ledger, 1, 0, PRICE))
    assert await storage.get(Keys().channel_state(1)) is None
    ledger.commit(await pay(ledger, 1, 0, PRICE))


@aio_test
async def test_replayed_payment_is_refused() -> None:
    """A committed payment sent again has zero income and is refused."""
    ledger, chain, _ = make()
    chain.open(1)
    ledger.commit(await pay(ledger, 1, 0, PRICE))
    error = await rejected(ledger, 1, 0, PRICE)
    assert (error.status, error.message) == (Status.UNAUTHENTICATED, f"income 0 does not equal to price {PRICE}")


@aio_test
async def test_wrong_increment_is_refused() -> None:
    """An amount that is not last + price is refused with Go's income message."""
    ledger, chain, _ = make()
    chain.open(1)
    error = await rejected(ledger, 1, 0, PRICE + 1)
    assert error.message == f"income {PRICE + 1} does not equal to price {PRICE}"


@aio_test
async def test_wrong_nonce_is_code_1000() -> None:
    """A payment under another nonce gets the Go daemon's code 1000."""
    ledger, chain, _ = make()
    chain.open(1, nonce=3)
    error = await rejected(ledger, 1, 2, PRICE)
    assert error.status == Status.INCORRECT_NONCE
    assert int(Status.INCORRECT_NONCE) == 1000
    assert error.message == "incorrect payment channel nonce, latest: 3, sent: 2"


@aio_test
async def test_nonce_from_a_claim_that_landed_is_picked_up() -> None:
    """When the chain's nonce moved on (claim landed), an authentic payment at the new nonce is accepted."""
    ledger, chain, _ = make()
    chain.open(1)
    ledger.commit(await pay(ledger, 1, 0, PRICE))
    chain.channels[1].nonce = 1  # claimed on chain; our cache still says 0
    chain.channels[1].value -= PRICE
    ledger.commit(await pay(ledger, 1, 1, PRICE))


@aio_test
async def test_bad_signature_and_wrong_signer() -> None:
    """Garbage signatures and signatures by others are UNAUTHENTICATED; the sender may sign."""
    ledger, chain, _ = make()
    chain.open(1)
    payment = parse_escrow(metadata_values(payment_metadata(1, 0, PRICE)))
    garbage = type(payment)(1, 0, PRICE, b"\x01" * 64)
    with pytest.raises(GrpcError) as info:
        await ledger.authorize(METHOD, garbage)
    assert (info.value.status, info.value.message) == (Status.UNAUTHENTICATED, "payment signature is not valid")
    error = await rejected(ledger, 1, 0, PRICE, key=PROVIDER_KEY)
    assert (error.status, error.message) == (Status.UNAUTHENTICATED, "payment is not signed by channel signer/sender")
    ledger.commit(await pay(ledger, 1, 0, PRICE, key=SENDER_KEY))


@aio_test
async def test_signature_for_another_mpe_is_refused() -> None:
    """A payment signed for another MPE contract does not recover to the signer."""
    ledger, chain, _ = make()
    chain.open(1)
    other_mpe = bytes(20)
    payment = parse_escrow(metadata_values(payment_metadata(1, 0, PRICE, mpe=other_mpe)))
    with pytest.raises(GrpcError) as info:
        await ledger.authorize(METHOD, payment)
    assert info.value.message == "payment is not signed by channel signer/sender"


@aio_test
async def test_insufficient_funds_then_topped_up() -> None:
    """Beyond the channel's value is refused; after funds are added on chain it is accepted."""
    ledger, chain, _ = make()
    chain.open(1, value=PRICE - 1)
    error = await rejected(ledger, 1, 0, PRICE)
    assert (
        error.message == f"not enough tokens on payment channel, channel amount: {PRICE - 1}, payment amount: {PRICE}"
    )
    chain.channels[1].value = 5 * PRICE
    ledger.commit(await pay(ledger, 1, 0, PRICE))


@aio_test
async def test_near_expiry_then_extended() -> None:
    """A channel expiring within the threshold is refused; once extended it is accepted."""
    ledger, chain, _ = make(threshold=100)
    chain.block = 1000
    chain.open(1, expiration=1100)
    error = await rejected(ledger, 1, 0, PRICE)
    assert error.status == Status.UNAUTHENTICATED
    assert error.message == (
        "payment channel is near to be expired, expiration time: 1100, current block: 1000, expiration threshold: 100"
    )
    chain.channels[1].expiration = 1101
    ledger.commit(await pay(ledger, 1, 0, PRICE))


@aio_test
async def test_unknown_channel_other_group_other_recipient() -> None:
    """Unknown channels, channels of another group or another recipient are refused."""
    ledger, chain, _ = make()
    error = await rejected(ledger, 9, 0, PRICE)
    assert (error.status, error.message) == (Status.UNAUTHENTICATED, 'payment channel "{ID: 9}" not found')
    chain.open(2, group_id=b"\xff" * 32)
    error = await rejected(ledger, 2, 0, PRICE)
    assert error.status == Status.INTERNAL
    assert "another group" in error.message
    chain.open(3, recipient="0x" + "11" * 20)
    error = await rejected(ledger, 3, 0, PRICE)
    assert error.status == Status.INTERNAL
    assert "recipient" in error.message


@aio_test
async def test_unknown_channel_costs_one_chain_read() -> None:
    """A payment on a channel the chain does not know reads the chain once, not twice: anybody
    can name made-up channels, before any authentication.  A channel opened since is found."""
    ledger, chain, _ = make()
    for k in range(1, 4):
        await rejected(ledger, 9, 0, PRICE)
        assert chain.fresh_reads == k
    chain.open(9)
    ledger.commit(await pay(ledger, 9, 0, PRICE))


@aio_test
async def test_chain_outage_is_not_an_unknown_channel() -> None:
    """With the Ethereum node down, a channel the chain reader has not cached is a chain error,
    never "no such channel": paid calls get Go's INTERNAL "payment channel error", the daemon's
    own services (``stored_channel``) UNAVAILABLE; None stays for channels the chain does not know."""
    ledger, chain, _ = make()
    chain.open(1)
    chain.channel_error = ChainUnavailable("connection refused")
    error = await rejected(ledger, 1, 0, PRICE)
    assert (error.status, error.message) == (Status.INTERNAL, "payment channel error: connection refused")
    with pytest.raises(GrpcError) as info:
        await ledger.stored_channel(1)
    assert (info.value.status, info.value.message) == (
        Status.UNAVAILABLE,
        "cannot read channel {ID: 1} from the Ethereum node: connection refused",
    )
    chain.channel_error = None
    assert await ledger.stored_channel(9) is None
    found = await ledger.stored_channel(1)
    assert found is not None
    assert found[0] == ChannelState(0)


@aio_test
async def test_stale_block_number() -> None:
    """Without a trustworthy block number, payments are refused (INTERNAL, as Go)."""
    ledger, chain, _ = make()
    chain.open(1)
    chain.block_error = RuntimeError("block number too old")
    error = await rejected(ledger, 1, 0, PRICE)
    assert (error.status, error.message) == (Status.INTERNAL, "cannot determine current block")


@aio_test
async def test_concurrent_call_on_a_channel_is_refused() -> None:
    """A second call while one is in flight on the channel is FAILED_PRECONDITION, here and on another daemon."""
    storage = MemoryStorage(Clock())
    chain = FakeChain()
    chain.open(1)
    ledger, _, _ = make(storage, chain)
    other, _, _ = make(storage, chain, foreign_wait=0.05)
    hold = await pay(ledger, 1, 0, PRICE)
    error = await rejected(ledger, 1, 0, PRICE)
    assert (error.status, error.message) == (
        Status.FAILED_PRECONDITION,
        "another transaction on channel: {ID: 1} is in progress",
    )
    error = await rejected(other, 1, 0, 2 * PRICE)
    assert error.status == Status.FAILED_PRECONDITION
    ledger.commit(hold)
    # The finished call's hold lingers for 20 ms; the other daemon waits for it.
    other.commit(await pay(other, 1, 0, 2 * PRICE))


@aio_test
async def test_call_waiting_for_another_daemons_hold_keeps_the_channel_busy_here() -> None:
    """While a call waits for another daemon's hold, a second call on the channel here is refused at once."""
    storage = MemoryStorage(Clock())
    chain = FakeChain()
    chain.open(1)
    a, _, _ = make(storage, chain, linger=0.01)
    b, _, _ = make(storage, chain, foreign_wait=1.0)
    in_flight = await pay(a, 1, 0, PRICE)
    waiting = asyncio.ensure_future(pay(b, 1, 0, 2 * PRICE))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    error = await rejected(b, 1, 0, 2 * PRICE)
    assert error.status == Status.FAILED_PRECONDITION
    a.commit(in_flight)
    b.commit(await waiting)  # a's hold lingered 10 ms, then went
    state = await b.channel_state(1)
    assert state is not None
    assert state[0].authorized_amount == 2 * PRICE


@aio_test
async def test_hold_of_a_dead_daemon_expires_with_its_lease() -> None:
    """A daemon killed mid-call frees the channel within its lease TTL; the payment it accepted stays."""
    clock = Clock()
    storage = MemoryStorage(clock)
    chain = FakeChain()
    chain.open(1)
    dead, _, _ = make(storage, chain)
    await pay(dead, 1, 0, PRICE)  # never finished: the daemon "dies"
    survivor, _, _ = make(storage, chain, foreign_wait=0.02)
    assert (await rejected(survivor, 1, 0, 2 * PRICE)).status == Status.FAILED_PRECONDITION
    clock.now += 11  # the dead daemon's 10 s lease runs out
    survivor.commit(await pay(survivor, 1, 0, 2 * PRICE))


@aio_test
async def test_two_daemons_never_accept_more_than_signed() -> None:
    """Two daemons racing with the same payments accept each payment at most once."""
    storage = MemoryStorage(Clock())
    chain = FakeChain()
    chain.open(1, value=10_000)
    a, _, _ = make(storage, chain, foreign_wait=0)
    b, _, _ = make(storage, chain, foreign_wait=0)
    accepted = 0
    for i in range(1, 21):
        results = await asyncio.gather(pay(a, 1, 0, i * PRICE), pay(b, 1, 0, i * PRICE), return_exceptions=True)
        holds = [r for r in results if isinstance(r, Hold)]
        assert len(holds) <= 1
        for hold, ledger in ((r, x) for r, x in zip(results, (a, b), strict=True) if isinstance(r, Hold)):
            ledger.commit(hold)
            await ledger.quiesce(1)
            accepted += 1
        if not holds:
            # Both lost the race to each other's hold; the next round retries.
            break
    assert accepted > 1
    state = await a.channel_state(1)
    assert state is not None
    assert state[0].authorized_amount == accepted * PRICE


@aio_test
async def test_stale_cache_on_another_daemon_costs_one_read() -> None:
    """A daemon whose cached state is stale reads it once and accepts the right payment."""
    storage = MemoryStorage(Clock())
    chain = FakeChain()
    chain.open(1)
    a, _, _ = make(storage, chain)
    b, _, counting_b = make(storage, chain)
    b.commit(await pay(b, 1, 0, PRICE))
    await b.quiesce(1)
    a.commit(await pay(a, 1, 0, 2 * PRICE))  # a's cache was empty: one failed write, then OK
    await a.quiesce(1)
    counting_b.calls.clear()
    b.commit(await pay(b, 1, 0, 3 * PRICE))  # b's cache is stale now
    assert counting_b.calls == ["get", "transaction"]


@aio_test
async def test_stale_cache_cannot_accept_a_replayed_payment() -> None:
    """A payment another daemon already accepted is refused even where the cache is stale."""
    storage = MemoryStorage(Clock())
    chain = FakeChain()
    chain.open(1)
    a, _, _ = make(storage, chain)
    b, _, _ = make(storage, chain)
    b.commit(await pay(b, 1, 0, PRICE))  # b caches authorized=10
    a.commit(await pay(a, 1, 0, 2 * PRICE))  # a accepts 20
    error = await rejected(b, 1, 0, 2 * PRICE)  # replay of a's payment at b: income looks right to b's cache
    assert error.message == f"income 0 does not equal to price {PRICE}"


@aio_test
async def test_storage_down_is_unavailable() -> None:
    """When storage is unreachable, paid calls are refused with UNAVAILABLE (what failed is the operator's to know)."""
    ledger, chain, storage = make()
    chain.open(1)
    storage.fail = StorageUnavailable("etcd at http://10.0.0.7:2379 is down")
    error = await rejected(ledger, 1, 0, PRICE)
    assert (error.status, error.message) == (Status.UNAVAILABLE, "payment storage is unavailable")
    storage.fail = None
    ledger.commit(await pay(ledger, 1, 0, PRICE))


@aio_test
async def test_refund_retries_briefly_then_leaves_the_payment() -> None:
    """A refund retries while storage is briefly down; if it stays down the payment stays, the hold goes later."""
    sleeps: list[float] = []

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)
        await asyncio.sleep(0)

    chain = FakeChain()
    chain.open(1)
    storage = CountingStorage(MemoryStorage(Clock()))
    ledger = EscrowLedger(storage, Keys(), chain, terms, StorageLease(storage), "d", sleep=fake_sleep)
    hold = await ledger.authorize(METHOD, parse_escrow(metadata_values(payment_metadata(1, 0, PRICE))))
    storage.fail = StorageUnavailable("down")
    await ledger.release(hold)  # does not raise: the call has failed already
    assert sum(sleeps) >= 3.0
    storage.fail = None
    assert await hold_gone(storage, 1)  # the lingering hold was deleted once storage was back
    ledger.commit(await ledger.authorize(METHOD, parse_escrow(metadata_values(payment_metadata(1, 0, 2 * PRICE)))))


@aio_test
async def test_timed_out_refund_that_applied_is_recognised() -> None:
    """A refund whose first attempt timed out but applied is not reported as lost."""
    ledger, chain, storage = make()
    chain.open(1)
    ledger.commit(await pay(ledger, 1, 0, PRICE))
    hold = await pay(ledger, 1, 0, 2 * PRICE)
    storage.timeout_after_apply = 1
    await ledger.release(hold)
    state = await ledger.channel_state(1)
    assert state is not None
    assert state[0].authorized_amount == PRICE
    ledger.commit(await pay(ledger, 1, 0, 2 * PRICE))


@aio_test
async def test_timed_out_write_that_applied_goes_on() -> None:
    """A payment write that timed out but applied is found by reading back: the call goes on."""
    ledger, chain, storage = make()
    chain.open(1)
    storage.timeout_after_apply = 1
    hold = await pay(ledger, 1, 0, PRICE)
    ledger.commit(hold)
    state = await ledger.channel_state(1)
    assert state is not None
    assert state[0].authorized_amount == PRICE
    ledger.commit(await pay(ledger, 1, 0, 2 * PRICE))


@aio_test
async def test_lingering_hold_lost_with_the_lease_is_not_taken_over() -> None:
    """A taken-over hold is not written again, so its lease must still be alive: when the lease
    expired (and the hold with it), the next call holds the channel anew under a new lease."""
    clock = Clock()
    storage = MemoryStorage(clock)
    chain = FakeChain()
    chain.open(1)
    ledger, _, counting = make(storage, chain, linger=60)
    first = await pay(ledger, 1, 0, PRICE)
    ledger.commit(first)
    taken = await pay(ledger, 1, 0, 2 * PRICE)
    assert taken.hold_revision == first.hold_revision < taken.revision  # taken over as it was
    ledger.commit(taken)
    clock.now += 11  # our 10 s lease runs out: the hold goes with it
    assert await hold_of(counting, 1) is None
    again = await pay(ledger, 1, 0, 3 * PRICE)
    held = await hold_of(counting, 1)
    assert held is not None
    assert held.mod_revision == again.hold_revision == again.revision
    assert held.lease != 0
    ledger.commit(again)


class _Unanswered(CountingStorage):
    """Once a transaction has lost its reply (``timeout_after_apply``), the next ``unanswered``
    transactions get no answer."""

    unanswered = 0

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        if self.unanswered and not self.timeout_after_apply:
            self.unanswered -= 1
            self.calls.append("transaction")
            raise StorageUnavailable("down")
        return await super().transaction(conditions, ops)


async def _refused_write_of_unknown_outcome(unanswered: int, linger: float = 0.01) -> tuple[EscrowLedger, _Unanswered]:
    """A ledger whose payment write (channel 1, nonce 0, PRICE) applied but lost its reply, and
    whose outcome could not be told (the next ``unanswered`` transactions get no answer): the
    call was refused."""
    chain = FakeChain()
    chain.open(1)
    storage = _Unanswered(MemoryStorage(Clock()))
    ledger = EscrowLedger(storage, Keys(), chain, terms, StorageLease(storage), "d", linger=linger)
    storage.timeout_after_apply = 1
    storage.unanswered = unanswered
    assert (await rejected(ledger, 1, 0, PRICE)).status == Status.UNAVAILABLE
    assert 1 in ledger._unsettled
    return ledger, storage


@aio_test
async def test_timed_out_write_whose_outcome_cannot_be_told_is_settled_later_and_refunded() -> None:
    """A write that timed out and whose outcome cannot be told yet refuses the call; once storage
    answers, the write is found applied and undone: the client, told the call failed, is not
    charged, and the hold goes."""
    ledger, storage = await _refused_write_of_unknown_outcome(unanswered=1)
    assert await hold_of(storage, 1) is not None  # it did apply
    assert await hold_gone(storage, 1, ledger)
    assert await signed_amount(ledger, 1) == 0  # given back
    ledger.commit(await pay(ledger, 1, 0, PRICE))  # the same payment again


@aio_test
async def test_call_cancelled_while_its_payment_is_written_is_refunded() -> None:
    """A call cancelled (client gone, deadline passed) while its payment write is on its way:
    the write, which applied, is undone once its reply comes, and the channel is free for
    every daemon (its hold would otherwise stay on our live lease)."""
    storage = MemoryStorage(Clock())
    chain = FakeChain()
    chain.open(1)
    ledger, _, counting = make(storage, chain, linger=0.01)
    other, _, _ = make(storage, chain, foreign_wait=0.05)
    ledger.commit(await pay(ledger, 1, 0, PRICE))
    await ledger.quiesce(1)
    counting.reply_after = reply = asyncio.Event()
    call = asyncio.ensure_future(pay(ledger, 1, 0, 2 * PRICE))
    await counting.applied.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # Until the write's outcome is known the channel stays busy here.
    assert (await rejected(ledger, 1, 0, 2 * PRICE)).status == Status.FAILED_PRECONDITION
    reply.set()
    assert await hold_gone(storage, 1, ledger)
    state = await ledger.channel_state(1)
    assert state is not None
    assert state[0].authorized_amount == PRICE  # the cancelled call's payment was given back
    other.commit(await pay(other, 1, 0, 2 * PRICE))  # another daemon takes the channel at once


@aio_test
async def test_call_cancelled_while_its_write_fails_frees_the_channel() -> None:
    """A cancelled call whose payment write then times out, with storage down, leaves nothing
    behind once storage is back: the write, which applied, is undone and its hold goes."""
    ledger, chain, counting = make(linger=0.01)
    chain.open(1)
    counting.reply_after = reply = asyncio.Event()
    call = asyncio.ensure_future(pay(ledger, 1, 0, PRICE))
    await counting.applied.wait()
    counting.timeout_after_apply = 1  # the reply that comes is a timeout ...
    counting.fail = StorageUnavailable("down")  # ... and the fence fails: outcome unknown
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    reply.set()
    await _settle()
    assert await counting.inner.get(Keys().channel_hold(1)) is not None  # the write applied
    counting.fail = None
    assert await hold_gone(counting, 1, ledger)
    assert await signed_amount(ledger, 1) == 0  # given back
    ledger.commit(await pay(ledger, 1, 0, PRICE))


class _LateWrites(CountingStorage):
    """The next ``late`` transactions time out at once and apply ``delay`` seconds later."""

    late = 0
    delay = 0.05

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        if not self.late:
            return await super().transaction(conditions, ops)
        self.late -= 1
        self.calls.append("transaction")

        async def land() -> None:
            await asyncio.sleep(self.delay)
            await self.inner.transaction(conditions, ops)

        self.landing = asyncio.ensure_future(land())
        raise StorageTimeout("no reply")


@pytest.mark.parametrize("previous", [False, True], ids=["fresh-channel", "paid-before"])
@aio_test
async def test_write_that_would_land_after_its_timeout_is_fenced_off(previous: bool) -> None:
    """A write that timed out and has not applied yet can never apply later (etcd may still apply
    a proposal long after its reply was due): the call is refused, the state stays as it was, no
    hold is left, and the same payment goes through on any daemon."""
    chain = FakeChain()
    chain.open(1)
    storage = _LateWrites(MemoryStorage(Clock()))
    ledger = EscrowLedger(storage, Keys(), chain, terms, StorageLease(storage), "d", linger=0.01)
    other, _, _ = make(storage.inner, chain, foreign_wait=0.01)
    amount = PRICE
    if previous:
        ledger.commit(await pay(ledger, 1, 0, PRICE))
        await ledger.quiesce(1)
        amount = 2 * PRICE
    before = await ledger.channel_state(1)
    storage.late = 1
    assert (await rejected(ledger, 1, 0, amount)).status == Status.UNAVAILABLE
    with pytest.raises(ConditionFailed):
        await storage.landing  # too late: fenced off
    assert await hold_of(storage, 1) is None
    after = await ledger.channel_state(1)
    assert after is not None
    assert after[0].authorized_amount == (0 if before is None else before[0].authorized_amount)
    other.commit(await pay(other, 1, 0, amount))


class _LateWritesSlowReads(_LateWrites):
    """Late writes, and state reads that wait for ``gate`` once it is set."""

    gate: asyncio.Event | None = None
    entered: asyncio.Event

    async def get(self, key: str) -> Entry | None:
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        return await self.inner.get(key)


@aio_test
async def test_write_of_unknown_outcome_is_settled_after_a_call_that_fails_before_writing() -> None:
    """A write whose outcome cannot be told (storage down) is settled later; a call of ours that is
    on the channel meanwhile and fails before writing anything (wrong nonce) does not stop that:
    the write, which landed late, is undone, and no hold of ours stays (other daemons would be
    refused on the channel for as long as this daemon lives)."""
    chain = FakeChain()
    chain.open(1)
    storage = _LateWritesSlowReads(MemoryStorage(Clock()))
    storage.entered = asyncio.Event()
    lease = StorageLease(storage)
    await lease.current()  # granted while storage answers
    ledger = EscrowLedger(storage, Keys(), chain, terms, lease, "d", linger=0.01)
    other, _, _ = make(storage.inner, chain, foreign_wait=0.05)
    storage.late = 1
    storage.fail = StorageUnavailable("down")  # the fence gets no answer either
    call = asyncio.ensure_future(rejected(ledger, 1, 0, PRICE))
    await asyncio.sleep(0.02)
    storage.fail = None
    assert (await call).status == Status.UNAVAILABLE
    await storage.landing  # the write lands after all
    assert await hold_of(storage, 1) is not None
    storage.gate = asyncio.Event()
    failing = asyncio.ensure_future(rejected(ledger, 1, 5, PRICE))
    await storage.entered.wait()
    await asyncio.sleep(0.7)  # the first look at the write (0.5 s) comes while that call is on the channel
    storage.gate.set()
    storage.gate = None
    assert (await failing).status == Status.INCORRECT_NONCE
    assert await hold_gone(storage, 1, ledger, wait=3.0)
    assert await signed_amount(ledger, 1) == 0  # given back
    other.commit(await pay(other, 1, 0, PRICE))


@aio_test
async def test_leftover_hold_met_while_a_call_is_on_the_channel_goes_after_it() -> None:
    """A hold of ours whose deletion comes due while a call of ours is on the channel (a hold of
    unknown origin: after a cancelled write) is looked at again after that call, even when the
    call fails before it meets the hold."""
    chain = FakeChain()
    chain.open(1)
    storage = _LateWritesSlowReads(MemoryStorage(Clock()))
    storage.entered = asyncio.Event()
    ledger = EscrowLedger(storage, Keys(), chain, terms, StorageLease(storage), "d", linger=0.01)
    lease = await StorageLease(storage.inner).current()
    await storage.inner.transaction([], [Put(Keys().channel_hold(1), b"d", lease=lease)])
    storage.gate = asyncio.Event()
    failing = asyncio.ensure_future(rejected(ledger, 1, 5, PRICE))
    await storage.entered.wait()
    ledger._linger(1, None, delay=0.01)
    await asyncio.sleep(0.1)  # due while the call is on the channel
    storage.gate.set()
    storage.gate = None
    assert (await failing).status == Status.INCORRECT_NONCE
    assert await hold_gone(storage, 1, ledger)


@aio_test
async def test_refund_gives_up_when_storage_times_out() -> None:
    """A refund whose tries all time out gives up after its patience, counting the time the tries
    took (the failed call's status waits for it); the payment stays recorded, the hold goes later."""
    clock = Clock()

    class _SlowTimeouts(CountingStorage):
        timing_out = False

        async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
            if self.timing_out:
                clock.now += 1.0  # each try takes a whole request timeout
                raise StorageTimeout("timed out")
            return await super().transaction(conditions, ops)

    chain = FakeChain()
    chain.open(1)
    storage = _SlowTimeouts(MemoryStorage(clock))
    sleeps: list[float] = []

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)
        await asyncio.sleep(0)

    ledger = EscrowLedger(storage, Keys(), chain, terms, StorageLease(storage), "d", sleep=fake_sleep, clock=clock)
    hold = await ledger.authorize(METHOD, parse_escrow(metadata_values(payment_metadata(1, 0, PRICE))))
    storage.timing_out = True
    await asyncio.wait_for(ledger.release(hold), 5)  # returns: it did not retry for ever
    # Gave up on the third try, three (request) seconds in; then only the sweeper's naps.
    assert sleeps[:2] == [0.05, 0.1]
    assert all(delay <= 0.02 for delay in sleeps[2:])
    assert 1 not in ledger._busy
    ledger.close()
    storage.timing_out = False
    state = await ledger.channel_state(1)
    assert state is not None
    assert state[0].authorized_amount == PRICE  # stays recorded


@aio_test
async def test_lingering_hold_due_before_a_retry_is_not_held_up_by_it() -> None:
    """A retried deletion (due later) at the head of the queue does not delay a hold lingering after it."""
    storage = MemoryStorage(Clock())
    chain = FakeChain()
    chain.open(1)
    chain.open(2)
    ledger, _, counting = make(storage, chain, linger=0.02)
    ledger._linger(2, None, delay=5.0)  # as after a failed deletion: tried again much later
    await asyncio.sleep(0)  # the sweeper sleeps now
    ledger.commit(await pay(ledger, 1, 0, PRICE))
    assert await hold_gone(counting, 1, wait=0.5)
    ledger.close()


@aio_test
async def test_daemon_whose_chain_view_predates_a_landed_claim_spends_only_what_is_left() -> None:
    """A claim of 60 on a channel of 100 landed (chain: nonce 1, value 40), and a daemon that saw
    it paid on the new nonce.  Another daemon, whose cached view is from before the claim
    (nonce 0, value 100), must still count the claimed 60 and stop at 40."""
    storage = MemoryStorage(Clock())
    chain = FakeChain()
    channel = chain.open(1, value=100)
    fresh, _, _ = make(storage, chain)
    stale_chain = FakeChain(channels=chain.channels)
    stale, _, _ = make(storage, stale_chain)
    await stale_chain.channel(1)  # cached: nonce 0, value 100
    for k in range(1, 7):
        fresh.commit(await pay(fresh, 1, 0, k * PRICE))
    await fresh.quiesce(1)
    state_key = Keys().channel_state(1)
    # A claim of 60 starts (what ProviderControl writes) and lands on chain.
    await storage.put(state_key, ChannelState(1, claimed_amount=6 * PRICE).encode())
    channel.nonce, channel.value = 1, 40
    fresh.forget(1)
    chain.cached.clear()
    fresh.commit(await pay(fresh, 1, 1, PRICE))  # the fresh daemon writes the nonce-1 state
    await fresh.quiesce(1)
    for k in range(2, 5):
        stale.commit(await pay(stale, 1, 1, k * PRICE))
    error = await rejected(stale, 1, 1, 5 * PRICE)
    assert error.status == Status.UNAUTHENTICATED
    assert error.message.startswith("not enough tokens on payment channel")


async def _claim_started_on_a_cached_channel() -> tuple[EscrowLedger, FakeChain]:
    """A ledger that took a payment of PRICE on channel 1 (so caches the channel at nonce 0, value
    1000), whose claim was then started (what ProviderControl writes)."""
    storage = MemoryStorage(Clock())
    ledger, chain, _ = make(storage)
    chain.open(1, value=1000)
    ledger.commit(await pay(ledger, 1, 0, PRICE))
    await ledger.quiesce(1)
    await storage.put(Keys().channel_state(1), ChannelState(1, claimed_amount=PRICE).encode())
    return ledger, chain


@aio_test
async def test_payments_are_refused_within_a_block_poll_of_a_sendback_claim_landing() -> None:
    """A claim with isSendback lands (MPE: nonce 1, value 0, expiration 0) after the chain view was
    cached.  Once the view is older than a block poll interval, a payment under the new nonce has
    it read again and is refused.  (It was checked against the old view, 990 left, for the whole
    channel TTL, 300 s: calls served unpaid.)"""
    ledger, chain = await _claim_started_on_a_cached_channel()
    chain.channels[1].nonce, chain.channels[1].value, chain.channels[1].expiration = 1, 0, 0
    chain.now = chain.recheck_after + 0.5
    error = await rejected(ledger, 1, 1, PRICE)
    assert error.status == Status.UNAUTHENTICATED
    assert error.message.startswith("payment channel is near to be expired, expiration time: 0,")


@aio_test
async def test_a_pending_claim_costs_one_chain_read_per_block_poll_interval() -> None:
    """While a claim is pending (stored nonce ahead of the cached chain view), payments read the
    chain only when the view is older than a block poll interval; the view read is cached again."""
    ledger, chain = await _claim_started_on_a_cached_channel()
    reads = chain.fresh_reads
    amount = 0
    for now, expected in ((1.0, 0), (6.0, 0), (6.5, 1), (12.0, 1), (12.6, 2)):
        chain.now = now
        amount += PRICE
        ledger.commit(await pay(ledger, 1, 1, amount))
        assert chain.fresh_reads == reads + expected, now


@aio_test
async def test_state_two_claims_ahead_of_the_chain_view_makes_it_read_the_chain() -> None:
    """Stored nonce 2 against a cached view at nonce 0: the first claim's amount is unknown, so
    the view is read afresh (nonce 2, value 40) before anything is accepted."""
    storage = MemoryStorage(Clock())
    chain = FakeChain()
    channel = chain.open(1, value=100)
    ledger, _, _ = make(storage, chain)
    await chain.channel(1)  # cached: nonce 0, value 100
    await storage.put(Keys().channel_state(1), ChannelState(2, claimed_amount=30).encode())
    channel.nonce, channel.value = 2, 40
    reads = chain.fresh_reads
    for k in range(1, 5):
        ledger.commit(await pay(ledger, 1, 2, k * PRICE))
    assert chain.fresh_reads == reads + 1
    error = await rejected(ledger, 1, 2, 5 * PRICE)
    assert error.message.startswith("not enough tokens on payment channel, channel amount: 40")


@aio_test
async def test_our_leftover_hold_is_taken_over() -> None:
    """A hold of ours that the ledger lost track of does not block the channel."""
    ledger, chain, storage = make(linger=60)
    chain.open(1)
    ledger.commit(await pay(ledger, 1, 0, PRICE))
    ledger._lingering.clear()  # as after a timed-out write that could not be read back
    hold = await pay(ledger, 1, 0, 2 * PRICE)
    held = await hold_of(storage, 1)
    assert held is not None
    assert held.mod_revision == hold.hold_revision
    ledger.commit(hold)


@aio_test
async def test_price_not_defined_is_internal() -> None:
    """A method without a price is INTERNAL "internal error: ...", as in Go."""

    def no_price(method: str) -> int:
        raise LookupError(f"price is not defined for the Method {method}")

    chain = FakeChain()
    chain.open(1)
    storage = MemoryStorage(Clock())
    base = terms()
    ledger = EscrowLedger(
        storage,
        Keys(),
        chain,
        lambda: type(base)(base.mpe_address, base.group_id, base.payment_address, 100, no_price),
        StorageLease(storage),
        "d",
    )
    with pytest.raises(GrpcError) as info:
        await ledger.authorize(METHOD, parse_escrow(metadata_values(payment_metadata(1, 0, PRICE))))
    assert info.value.status == Status.INTERNAL
    assert info.value.message.startswith("internal error: price is not defined")


def test_claimed_amount_counts_while_the_chain_view_is_behind() -> None:
    """The amount of the last claim is spent from the chain's value until the view shows it landed."""
    claimed = ChannelState(3, 10, b"s", claimed_amount=60)
    assert merge(claimed, 2) == claimed  # in progress (or our view is stale)
    assert merge(claimed, 3) == claimed  # landed: kept, for daemons whose view is older
    assert merge(claimed, 4) == ChannelState(4)  # another claim landed since
    assert merge(None, 5) == ChannelState(5)
    assert spendable(claimed, 2, 100) == 40
    assert spendable(claimed, 3, 40) == 40


def _md(**overrides: str | bytes | None) -> tuple[tuple[str, str | bytes], ...]:
    base = dict(payment_metadata(1, 0, PRICE))
    for key, value in overrides.items():
        name = "snet-payment-channel-" + key.replace("_", "-")
        if value is None:
            base.pop(name)
        else:
            base[name] = value
    return tuple(base.items())


@pytest.mark.parametrize("header", ["id", "nonce", "amount", "signature_bin"])
def test_missing_header_is_invalid_argument(header: str) -> None:
    """Each missing payment header is INVALID_ARGUMENT 'missing "<key>"'."""
    with pytest.raises(GrpcError) as info:
        parse_escrow(metadata_values(_md(**{header: None})))
    name = "snet-payment-channel-" + header.replace("_", "-")
    assert (info.value.status, info.value.message) == (Status.INVALID_ARGUMENT, f'missing "{name}"')


@pytest.mark.parametrize(
    "value",
    ["abc", "-5", "1.5", "", "0x", "1__0", str(2**256), "0x1" + "0" * 64, "08", " 1 2", "1" * 4301, "0" * 5000],
)
@pytest.mark.parametrize("header", ["id", "nonce", "amount"])
def test_malformed_integer_is_invalid_argument(header: str, value: str) -> None:
    """Malformed, negative or beyond-uint256 integers are INVALID_ARGUMENT 'incorrect format'
    (decimal text of over 4,300 digits too, which int() refuses with an error of its own)."""
    with pytest.raises(GrpcError) as info:
        parse_escrow(metadata_values(_md(**{header: value})))
    name = "snet-payment-channel-" + header
    assert info.value.status == Status.INVALID_ARGUMENT
    assert info.value.message == f'incorrect format "{name}": "{value}"'


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("42", 42),
        ("0x2a", 42),
        ("0b101010", 42),
        ("052", 42),
        ("0o52", 42),
        ("4_2", 42),
        ("+42", 42),
        ("0", 0),
        (str(2**256 - 1), 2**256 - 1),
    ],
)
def test_integers_parse_like_go_big_int(text: str, number: int) -> None:
    """Integer headers accept what Go's big.Int base-0 parser accepts."""
    assert parse_escrow(metadata_values(_md(amount=text))).amount == number


def test_repeated_header_is_invalid_argument() -> None:
    """A payment header sent twice is INVALID_ARGUMENT, as in Go."""
    metadata = (*_md(), ("snet-payment-channel-id", "2"))
    with pytest.raises(GrpcError) as info:
        parse_escrow(metadata_values(metadata))
    assert info.value.status == Status.INVALID_ARGUMENT
    assert "too many values" in info.value.message


@aio_test
async def test_settle_waits_for_the_refund_of_a_call_cancelled_during_its_write() -> None:
    """The stop (drain, then settle, then storage closes) ends a call while its payment is being
    written: settle waits for that write, then for the refund it leads to."""
    storage = MemoryStorage(Clock())
    chain = FakeChain()
    chain.open(1)
    ledger, _, counting = make(storage, chain, linger=0.01)
    counting.reply_after = reply = asyncio.Event()
    call = asyncio.ensure_future(pay(ledger, 1, 0, PRICE))
    await counting.applied.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    asyncio.get_running_loop().call_later(0.1, reply.set)  # the write's reply comes later
    await ledger.settle(3.0)
    assert await signed_amount(ledger, 1) == 0


@aio_test
async def test_settle_waits_for_a_refund_nobody_awaits() -> None:
    """A refund whose call ended meanwhile (its handler cancelled again while refunding) still
    lands before the stop goes on."""
    chain = FakeChain()
    chain.open(1)
    ledger, _, counting = make(chain=chain, linger=0.01)
    hold = await pay(ledger, 1, 0, PRICE)
    counting.reply_after = reply = asyncio.Event()
    ledger.release(hold)  # not awaited
    await counting.applied.wait()
    asyncio.get_running_loop().call_later(0.1, reply.set)
    await ledger.settle(3.0)
    assert 1 not in ledger._busy
    assert all(task.done() for task in ledger._background)


@aio_test
async def test_close_stops_settling_writes_of_unknown_outcome() -> None:
    """A write whose outcome storage never tells is looked at until the daemon stops, no longer."""
    ledger, _ = await _refused_write_of_unknown_outcome(unanswered=1_000_000)
    task = ledger._settlers[1]
    await ledger.settle(0.05)  # storage stays down: settle gives up after its time
    ledger.close()
    await asyncio.sleep(0)
    assert task.cancelled()
    assert not ledger._unsettled


@aio_test
async def test_retry_of_a_refused_payment_that_applied_is_served_once() -> None:
    """The client retries the refused call with the same payment while its write is unsettled
    (it applied): the retry settles it first (refunds it) and is then accepted, so the client
    pays once for the one call served (the retry used to meet the write's hold, take it for a
    finished call's, be refused as paying nothing new, and the write stayed charged)."""
    ledger, storage = await _refused_write_of_unknown_outcome(unanswered=1)
    assert await hold_of(storage, 1) is not None
    retry = await pay(ledger, 1, 0, PRICE)
    assert not ledger._unsettled
    ledger.commit(retry)
    assert await signed_amount(ledger, 1) == PRICE
    assert await hold_gone(storage, 1, ledger)
    await asyncio.sleep(0.6)  # past the settler's first look: nothing more happens
    assert await signed_amount(ledger, 1) == PRICE


@aio_test
async def test_retry_of_a_refused_payment_not_yet_applied_is_served_and_kept() -> None:
    """The same, when the unsettled write has not applied yet (it would land late): the retry's
    settling fences it off, the retry is served and its payment is never taken for the refused
    write's (same payment, same bytes) and refunded."""
    chain = FakeChain()
    chain.open(1)
    storage = _LateWrites(MemoryStorage(Clock()))
    storage.delay = 0.3
    lease = StorageLease(storage)
    await lease.current()
    ledger = EscrowLedger(storage, Keys(), chain, terms, lease, "d", linger=1.0)
    storage.late = 1
    storage.fail = StorageUnavailable("down")  # the fence gets no answer
    call = asyncio.ensure_future(rejected(ledger, 1, 0, PRICE))
    await asyncio.sleep(0.02)
    storage.fail = None
    assert (await call).status == Status.UNAVAILABLE
    retry = await pay(ledger, 1, 0, PRICE)
    ledger.commit(retry)
    with pytest.raises(ConditionFailed):
        await storage.landing
    await asyncio.sleep(0.6)
    assert not ledger._unsettled
    assert await signed_amount(ledger, 1) == PRICE


class _LoseNth(CountingStorage):
    """The ``lose``-th transaction from now is not applied, and loses its reply."""

    lose = 0

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        self.lose -= 1
        if self.lose == 0:
            self.calls.append("transaction")
            raise StorageTimeout("no reply")
        return await super().transaction(conditions, ops)


@aio_test
async def test_unsettled_write_waits_for_another_daemons_call_on_the_channel() -> None:
    """Our write, sent while another daemon's call held the channel, loses its reply: it did
    not apply, but could once that hold goes.  Nothing is written meanwhile (the fence would
    move the state's revision under that call, whose refund then failed: its client charged
    for a failed call, its hold left on its live lease); our next call on the channel is
    refused as in progress; once the other call is over, our write is settled."""
    chain = FakeChain()
    chain.open(1)
    inner = MemoryStorage(Clock())
    other, _, _ = make(inner, chain)
    storage = _LoseNth(inner)
    ledger = EscrowLedger(storage, Keys(), chain, terms, StorageLease(storage), "a", linger=0.01, foreign_wait=0.05)
    theirs = await pay(other, 1, 0, PRICE)
    storage.lose = 2  # ours: the first write fails on their hold, the second (after a wait) loses its reply
    assert (await rejected(ledger, 1, 0, 2 * PRICE)).status == Status.UNAVAILABLE
    assert 1 in ledger._unsettled
    assert (await rejected(ledger, 1, 0, 2 * PRICE)).status == Status.FAILED_PRECONDITION
    await other.release(theirs)  # their call failed: its client is not charged
    assert await signed_amount(other, 1) == 0
    assert await hold_gone(inner, 1, other)
    ledger.commit(await pay(ledger, 1, 0, PRICE))
    assert not ledger._unsettled


@aio_test
async def test_settle_at_stop_settles_unsettled_writes_at_once() -> None:
    """Storage answers again as the daemon stops: the stop settles an unsettled write (here it
    applied: refunded) without waiting for the settler's next look."""
    ledger, storage = await _refused_write_of_unknown_outcome(unanswered=1)
    await ledger.settle(0.2)  # the settler's first look would come at 0.5 s
    assert not ledger._unsettled
    assert await signed_amount(ledger, 1) == 0
    assert await hold_of(storage, 1) is None
    ledger.close()


class _Scripted(CountingStorage):
    """Transactions follow ``script`` (then apply normally): ``ok``, ``apply_timeout`` (applies,
    loses its reply), ``down`` (no answer); ``gate_`` before a step waits for ``gate`` first."""

    def __init__(self, inner: MemoryStorage) -> None:
        super().__init__(inner)
        self.script: list[str] = []
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        step = self.script.pop(0) if self.script else "ok"
        self.calls.append(f"transaction:{step}")
        if step.startswith("gate_"):
            self.entered.set()
            await self.gate.wait()
            step = step.removeprefix("gate_")
        if step == "down":
            raise StorageUnavailable("down")
        revision = await self.inner.transaction(conditions, ops)
        if step == "apply_timeout":
            raise StorageTimeout("reply lost")
        return revision


@aio_test
async def test_call_cancelled_while_it_refunds_an_unsettled_write_keeps_the_channel_busy() -> None:
    """A call that finds our earlier write applied refunds it before going on; cancelled during
    that refund, the channel stays busy until the refund is over, so no call of ours builds on
    the payment being refunded (which would fail the refund: the refused call stays charged)."""
    chain = FakeChain()
    chain.open(1)
    storage = _Scripted(MemoryStorage(Clock()))
    ledger = EscrowLedger(storage, Keys(), chain, terms, StorageLease(storage), "d", linger=0.01)
    storage.script = ["apply_timeout", "down"]  # the write applies, its fence gets no answer
    assert (await rejected(ledger, 1, 0, PRICE)).status == Status.UNAVAILABLE
    storage.script = ["ok", "gate_ok"]  # the next call's fence finds it applied; the refund waits
    first = asyncio.ensure_future(pay(ledger, 1, 0, PRICE))
    await storage.entered.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await rejected(ledger, 1, 0, 2 * PRICE)).status == Status.FAILED_PRECONDITION
    storage.gate.set()
    assert await hold_gone(storage, 1, ledger)
    assert await signed_amount(ledger, 1) == 0
    ledger.commit(await pay(ledger, 1, 0, PRICE))


@aio_test
async def test_write_unsettled_as_the_settler_leaves_gets_a_settler() -> None:
    """The background settler leaves (its write was settled by a call) in the same loop pass as
    that call's own write becomes unsettled: the new write still gets a settler."""
    chain = FakeChain()
    chain.open(1)
    storage = _Scripted(MemoryStorage(Clock()))
    first_look = asyncio.get_running_loop().create_future()
    looked: list[float] = []

    async def sleep(delay: float) -> None:
        if not looked:
            looked.append(delay)
            await first_look
        else:
            await asyncio.sleep(min(delay, 0.05))

    ledger = EscrowLedger(storage, Keys(), chain, terms, StorageLease(storage), "d", sleep=sleep, linger=0.01)
    storage.script = ["apply_timeout", "down"]
    assert (await rejected(ledger, 1, 0, PRICE)).status == Status.UNAVAILABLE
    settler = ledger._settlers[1]
    # The next call settles the write (applied: refunded), then its own write applies, loses its
    # reply, and its fence gets no answer, as the settler's look comes due.
    storage.script = ["ok", "ok", "apply_timeout", "gate_down"]
    call = asyncio.ensure_future(rejected(ledger, 1, 0, PRICE))
    await storage.entered.wait()
    first_look.set_result(None)
    storage.gate.set()
    assert (await call).status == Status.UNAVAILABLE
    await asyncio.sleep(0)
    assert settler.done()
    assert await hold_gone(storage, 1, ledger)  # the new write was settled: refunded
    assert not ledger._unsettled
    assert await signed_amount(ledger, 1) == 0
