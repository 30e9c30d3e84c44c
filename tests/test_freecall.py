"""Free calls without I/O: token issue, counting, every rejection (``snet-daemon.md`` §6.5).

In-memory storage and a fake chain; messages are signed here exactly as
snet-sdk signs them (checked against web3's ``solidity_keccak``).
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.logger import LogLevel, capturedLogs, formatEvent

from snet_daemon._proto.escrow import state_service_pb2 as pb
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments import counters
from snet_daemon.payments import signatures as sig
from snet_daemon.payments.balances import BalanceCache
from snet_daemon.payments.counters import GIVE_BACK_WITHIN, MAX_ATTEMPTS, RACE_BACKOFF
from snet_daemon.payments.escrow import metadata_values
from snet_daemon.payments.freecall import (
    TOKEN_LIFETIME,
    UNLIMITED,
    UNLIMITED_AVAILABLE,
    FreeCalls,
    FreeCallSettings,
    FreeCallTerms,
    decode_count,
    encode_count,
    parse_token,
)
from snet_daemon.storage.base import Condition, Entry, Op, StorageTimeout, StorageUnavailable
from snet_daemon.storage.keys import KeyLayout
from snet_daemon.storage.memory import MemoryStorage
from tests.support.aio import aio_test
from tests.support.payments import GROUP, MPE, CountingStorage

CALL: Any = None
ORG, SERVICE, GROUP_NAME = "test-org", "test-service", "default_group"
GROUP_B64 = base64.b64encode(GROUP).decode()
DAEMON_KEY = sig.keccak256(b"free-call-signer")
USER_KEY = sig.keccak256(b"free-call-user")
OTHER_KEY = sig.keccak256(b"another-user")
TRUSTED_KEY = sig.keccak256(b"marketplace")
USER = sig.checksum(sig.address_of(USER_KEY))
OTHER = sig.checksum(sig.address_of(OTHER_KEY))
TRUSTED = sig.checksum(sig.address_of(TRUSTED_KEY))
WHOLE = 10**18


@dataclass
class Chain:
    block: int = 5000
    balances: dict[str, int] = field(default_factory=dict)
    balance_error: Exception | None = None
    block_error: Exception | None = None

    def current_block(self) -> int:
        if self.block_error is not None:
            raise self.block_error
        return self.block

    async def token_balance(self, address: str) -> int:
        if self.balance_error is not None:
            raise self.balance_error
        return self.balances.get(address, 0)


def layout() -> KeyLayout:
    return KeyLayout(network="test", organization_id=ORG, group_id=GROUP, mpe_address=sig.checksum(MPE))


class World:
    def __init__(
        self,
        *,
        free_calls: int = 2,
        key: bytes | None = DAEMON_KEY,
        metadata_signer: bytes | None = None,
        per_address: dict[bytes, int] | None = None,
        min_balance: int = 10,
        storage: Any = None,
        **options: Any,
    ) -> None:
        self.chain = Chain(balances={USER: 10 * WHOLE, OTHER: 10 * WHOLE})
        self.storage = storage if storage is not None else CountingStorage(MemoryStorage(lambda: 0.0))
        self.terms = FreeCallTerms(
            organization_id=ORG,
            service_id=SERVICE,
            group_name=GROUP_NAME,
            group_id=GROUP_B64,
            free_calls=free_calls,
            signer_address=metadata_signer or sig.address_of(DAEMON_KEY),
        )
        self.settings = FreeCallSettings(
            signer_key=key,
            trusted_signers=frozenset({sig.address_of(TRUSTED_KEY)}),
            min_balance=min_balance,
            per_address=per_address or {},
        )
        self.free = FreeCalls(self.storage, layout(), self.chain, self.settings, lambda: self.terms, **options)

    def token_request(
        self,
        key: bytes = USER_KEY,
        address: str | None = None,
        user_id: str | None = None,
        block: int | None = None,
        lifetime: int | None = None,
    ) -> pb.GetFreeCallTokenRequest:
        address = address if address is not None else sig.checksum(sig.address_of(key))
        block = self.chain.block if block is None else block
        message = sig.free_call_token_request(address, user_id or "", ORG, SERVICE, GROUP_B64, block)
        request = pb.GetFreeCallTokenRequest(address=address, signature=sig.sign(message, key), current_block=block)
        if user_id is not None:
            request.user_id = user_id
        if lifetime is not None:
            request.token_lifetime_in_blocks = lifetime
        return request

    async def token(self, key: bytes = USER_KEY, **kwargs: Any) -> bytes:
        reply = await self.free.get_free_call_token(self.token_request(key, **kwargs), CALL)
        return bytes(reply.token)

    def headers(
        self,
        token: bytes,
        key: bytes = USER_KEY,
        address: str | None = None,
        user_id: str = "",
        block: int | None = None,
    ) -> dict[str, list[str | bytes]]:
        address = address if address is not None else sig.checksum(sig.address_of(key))
        block = self.chain.block if block is None else block
        signature = sig.sign(sig.free_call(address, user_id, ORG, SERVICE, GROUP_B64, block, token), key)
        metadata: list[tuple[str, str | bytes]] = [
            ("snet-free-call-auth-token-bin", token),
            ("snet-payment-type", "free-call"),
            ("snet-free-call-user-address", address),
            ("snet-current-block-number", str(block)),
            ("snet-payment-channel-signature-bin", signature),
        ]
        if user_id:
            metadata.append(("snet-free-call-user-id", user_id))
        return metadata_values(tuple(metadata))

    async def available(
        self, token: bytes, key: bytes = USER_KEY, address: str | None = None, user_id: str | None = None
    ) -> int:
        address = address if address is not None else sig.checksum(sig.address_of(key))
        block = self.chain.block
        message = sig.free_call(address, user_id or "", ORG, SERVICE, GROUP_B64, block, token)
        request = pb.FreeCallStateRequest(
            address=address, free_call_token=token, signature=sig.sign(message, key), current_block=block
        )
        if user_id is not None:
            request.user_id = user_id
        reply = await self.free.get_free_calls_available(request, CALL)
        return int(reply.free_calls_available)


class _FakeTime:
    """A monotonic clock that a sleep moves on (no real waiting)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def refused(awaitable: Any) -> GrpcError:
    with pytest.raises(GrpcError) as info:
        await awaitable
    return info.value


# -- messages and tokens ---------------------------------------------------------------


def test_messages_match_what_snet_sdk_signs() -> None:
    """The request and call messages hash as snet-sdk's solidity_keccak of the same fields."""
    from web3 import Web3

    token = b"\x01" * 65 + b"_12345"
    request = sig.free_call_token_request(USER, "", ORG, SERVICE, GROUP_B64, 77)
    sdk = Web3.solidity_keccak(
        ["string", "string", "string", "string", "string", "uint256"],
        ["__prefix_free_trial", USER, ORG, SERVICE, GROUP_B64, 77],
    )
    assert sig.keccak256(request) == bytes(sdk)
    call = sig.free_call(USER, "", ORG, SERVICE, GROUP_B64, 77, token)
    sdk = Web3.solidity_keccak(
        ["string", "string", "string", "string", "string", "uint256", "bytes32"],
        ["__prefix_free_trial", USER, ORG, SERVICE, GROUP_B64, 77, token],
    )
    assert sig.keccak256(call) == bytes(sdk)


@aio_test
async def test_token_is_go_shaped_and_signed_by_the_metadata_signer() -> None:
    """A token is the daemon's signature (v 0/1) ‖ "_" ‖ expiry, over org ‖ group name ‖ address ‖ user id ‖ expiry."""
    world = World()
    reply = await world.free.get_free_call_token(world.token_request(), CALL)
    token = bytes(reply.token)
    signature, expiry = parse_token(token)
    assert expiry == world.chain.block + TOKEN_LIFETIME == reply.token_expiration_block
    assert token == signature + b"_" + str(expiry).encode()
    assert reply.token_hex == token.hex()
    assert len(signature) == 65
    assert signature[64] in (0, 1)
    message = sig.free_call_token(ORG, GROUP_NAME, sig.address_of(USER_KEY), "", expiry)
    assert sig.recover(message, signature) == sig.address_of(DAEMON_KEY)


@pytest.mark.parametrize(
    ("asked", "lifetime"), [(100, 100), (0, 0), (TOKEN_LIFETIME, TOKEN_LIFETIME), (10**9, TOKEN_LIFETIME)]
)
@aio_test
async def test_token_lifetime_is_capped(asked: int, lifetime: int) -> None:
    """The requested lifetime is used up to 172800 blocks; longer requests get 172800."""
    world = World()
    reply = await world.free.get_free_call_token(world.token_request(lifetime=asked), CALL)
    assert reply.token_expiration_block == world.chain.block + lifetime


# -- counting ---------------------------------------------------------------------------


@aio_test
async def test_two_free_calls_then_the_limit() -> None:
    """With free_calls 2 in metadata, two calls pass, the third is refused; availability follows."""
    world = World()
    token = await world.token()
    assert await world.available(token) == 2
    for left in (1, 0):
        counted = await world.free.authorize(world.headers(token))
        assert counted.user_address == USER
        assert await world.available(token) == left
    error = await refused(world.free.authorize(world.headers(token)))
    assert error.status == Status.RESOURCE_EXHAUSTED
    assert error.message == "free call limit has been exceeded, calls made = 2, total free calls eligible = 2"


@aio_test
async def test_each_call_is_one_read_and_one_conditional_write() -> None:
    """Counting a free call costs two storage round trips."""
    world = World()
    token = await world.token()
    world.storage.calls.clear()
    await world.free.authorize(world.headers(token))
    assert world.storage.calls == ["get", "transaction"]


@aio_test
async def test_changing_the_address_case_does_not_reset_the_count() -> None:
    """The counter key uses the checksummed address (Go's bug: the text as sent)."""
    world = World()
    token = await world.token()
    await world.free.authorize(world.headers(token))
    await world.free.authorize(world.headers(token))
    lower = USER.lower()
    token_lower = await world.token(address=lower)
    assert await world.available(token_lower, address=lower) == 0
    error = await refused(world.free.authorize(world.headers(token_lower, address=lower)))
    assert error.status == Status.RESOURCE_EXHAUSTED


@aio_test
async def test_a_failed_call_stays_free() -> None:
    """Releasing a counted call gives it back."""
    world = World()
    token = await world.token()
    counted = await world.free.authorize(world.headers(token))
    await world.free.release(counted)
    assert await world.available(token) == 2


@aio_test
async def test_a_call_cancelled_while_being_counted_stays_free() -> None:
    """A call cancelled (client gone, deadline) while its count is being written is given back."""
    world = World()
    token = await world.token()
    world.storage.reply_after = reply = asyncio.Event()
    call = asyncio.ensure_future(world.free.authorize(world.headers(token)))
    await world.storage.applied.wait()
    assert await world.available(token) == 1  # counted ...
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    reply.set()
    for _ in range(100):
        if await world.available(token) == 2:
            break
        await asyncio.sleep(0.01)
    assert await world.available(token) == 2  # ... and given back


class _LosesReplies(CountingStorage):
    """Transactions whose replies are lost (StorageTimeout), applied or not."""

    def __init__(self) -> None:
        super().__init__(MemoryStorage(lambda: 0.0))
        #: What the next transactions do before their reply is lost: "apply"
        #: it, "drop" it, or let "another" write land first (and drop it).
        self.plan: list[str] = []
        self.other: tuple[str, bytes] | None = None
        #: Reads fail too (storage down while the outcome is looked for).
        self.fail_gets = False
        #: Reads start failing once a transaction was sent.
        self.fail_gets_on_write = False
        self.failed_gets = 0

    async def get(self, key: str) -> Entry | None:
        if self.fail_gets:
            self.failed_gets += 1
            raise StorageTimeout("no answer")
        return await super().get(key)

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        if self.fail_gets_on_write:
            self.fail_gets = True
        if not self.plan:
            return await super().transaction(conditions, ops)
        self.calls.append("transaction")
        step = self.plan.pop(0)
        if step == "apply":
            await self.inner.transaction(conditions, ops)
        elif step == "another":
            assert self.other is not None
            await self.inner.put(*self.other)
        raise StorageTimeout("reply lost")


@pytest.mark.parametrize(
    ("plan", "made"),
    [
        (["apply"], 1),  # it happened: the call is served, counted once
        (["drop"], 1),  # it did not: fenced off, written again, served
        (["drop", "apply"], 1),  # and so on, as long as the outcome is known
        (["another"], 2),  # another call of the user counted first: ours is counted after it
    ],
)
@aio_test
async def test_a_count_whose_reply_was_lost_is_settled_not_charged_for_nothing(plan: list[str], made: int) -> None:
    """A timed-out count may have been written or not; the history of writes in the counter
    tells which.  Refusing a call whose count landed cost the user one free call."""
    storage = _LosesReplies()
    world = World(free_calls=3, storage=storage)
    token = await world.token()
    key = world.free._counter_key(sig.address_of(USER_KEY), "")
    storage.other = (key, encode_count(1, [(b"another!", 0)]))  # another daemon's first count
    storage.plan = list(plan)
    counted = await world.free.authorize(world.headers(token))
    assert counted.key == key
    assert await world.available(token) == 3 - made


@aio_test
async def test_a_count_whose_outcome_cannot_be_told_is_refused() -> None:
    """The count was sent, its reply lost, and storage fails all through the settling:
    the call is refused as storage being down, never served uncounted."""
    storage = _LosesReplies()
    world = World(storage=storage, sleep=_FakeTime().sleep)
    token = await world.token()
    storage.plan = ["drop"]
    storage.fail_gets_on_write = True
    storage.calls.clear()
    with pytest.raises(GrpcError) as info:
        await world.free.authorize(world.headers(token))
    assert info.value.status == Status.UNAVAILABLE
    # The count went out and settling was tried: reads after the write.
    assert storage.calls[:2] == ["get", "transaction"]
    assert storage.failed_gets > 0
    world.free.close()  # the write stays unsettled: its background settler stops


def test_version_1_counters_are_read_and_rewritten_with_history() -> None:
    """Counters written before the history (version 1) still count."""
    assert decode_count(Entry("k", b"\x01" + (7).to_bytes(8, "big"), 1, 1, 1)) == 7
    value = encode_count(8, [(b"T" * 8, 5)])
    assert decode_count(Entry("k", value, 2, 2, 1)) == 8
    with pytest.raises(GrpcError, match="unreadable free-call counter"):
        decode_count(Entry("k", value + b"x", 2, 2, 1))


@aio_test
async def test_concurrent_calls_never_exceed_the_limit() -> None:
    """Ten simultaneous free calls of one user: exactly the allowed two pass."""
    world = World()
    token = await world.token()
    results = await asyncio.gather(
        *(world.free.authorize(world.headers(token)) for _ in range(10)), return_exceptions=True
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 2
    assert all(r.status == Status.RESOURCE_EXHAUSTED for r in results if isinstance(r, GrpcError))


@aio_test
async def test_daemons_sharing_storage_count_together() -> None:
    """Two daemons of a group on one storage share a user's count."""
    storage = MemoryStorage(lambda: 0.0)
    first, second = World(storage=storage), World(storage=storage)
    token = await first.token()
    await first.free.authorize(first.headers(token))
    await second.free.authorize(second.headers(token))
    assert await first.available(token) == 0
    error = await refused(second.free.authorize(second.headers(token)))
    assert error.status == Status.RESOURCE_EXHAUSTED


@aio_test
async def test_per_address_limits_and_unlimited() -> None:
    """free_calls_per_address overrides the metadata; unlimited answers 99999999 and never refuses."""
    world = World(per_address={sig.address_of(USER_KEY): UNLIMITED, sig.address_of(OTHER_KEY): 3})
    token = await world.token()
    for _ in range(5):
        await world.free.authorize(world.headers(token))
    assert await world.available(token) == UNLIMITED_AVAILABLE
    other = await world.token(OTHER_KEY)
    assert await world.available(other, OTHER_KEY) == 3


@aio_test
async def test_trusted_signer_binds_a_user_id() -> None:
    """A trusted backend gets a token for a user id without a balance; it counts per user id."""
    world = World()
    token = await world.token(TRUSTED_KEY, user_id="alice")
    assert await world.available(token, TRUSTED_KEY, user_id="alice") == 2
    await world.free.authorize(world.headers(token, TRUSTED_KEY, user_id="alice"))
    assert await world.available(token, TRUSTED_KEY, user_id="alice") == 1
    bob = await world.token(TRUSTED_KEY, user_id="bob")
    assert await world.available(bob, TRUSTED_KEY, user_id="bob") == 2
    # Alice's token does not work for Bob.
    error = await refused(world.free.authorize(world.headers(token, TRUSTED_KEY, user_id="bob")))
    assert (error.status, error.message) == (Status.UNAUTHENTICATED, "token sign is not valid")


@aio_test
async def test_the_service_receives_the_checksummed_address() -> None:
    """The counted call names the user by its checksummed address."""
    world = World()
    token = await world.token(address=USER.lower())
    counted = await world.free.authorize(world.headers(token, address=USER.lower()))
    assert counted.user_address == USER


# -- no key: answers snet-sdk survives ----------------------------------------------------


@aio_test
async def test_without_a_key_the_token_is_empty_and_no_free_calls_are_available() -> None:
    """No private_key_for_free_calls: an empty token, and 0 free calls for it (no errors)."""
    world = World(key=None)
    reply = await world.free.get_free_call_token(world.token_request(), CALL)
    assert (reply.token, reply.token_hex, reply.token_expiration_block) == (b"", "", 0)
    assert await world.available(b"") == 0
    assert world.free.key_problem() is None


@aio_test
async def test_a_key_that_is_not_the_metadata_signer_issues_nothing() -> None:
    """A key whose address is not free_call_signer_address issues no tokens, and says why."""
    world = World(metadata_signer=sig.address_of(OTHER_KEY))
    reply = await world.free.get_free_call_token(world.token_request(), CALL)
    assert reply.token == b""
    problem = world.free.key_problem()
    assert problem is not None
    assert OTHER in problem
    assert "no free-call tokens are issued" in problem


@aio_test
async def test_tokens_of_another_daemon_of_the_group_are_honoured_without_a_key() -> None:
    """Checking a token needs only the metadata's signer address, not the key."""
    issuer, checker = World(), World(key=None)
    token = await issuer.token()
    assert await checker.available(token) == 2
    await checker.free.authorize(checker.headers(token))


# -- rejections: the call path ---------------------------------------------------------


@aio_test
async def test_expired_token_is_refused() -> None:
    """A token past its expiry block: UNAUTHENTICATED, Go's text."""
    world = World()
    token = await world.token(lifetime=1)
    world.chain.block += 2
    error = await refused(world.free.authorize(world.headers(token)))
    assert error.status == Status.UNAUTHENTICATED
    assert error.message == "authentication failed as the Free Call Token passed has expired"


@aio_test
async def test_token_of_another_user_is_refused() -> None:
    """Another user signing a call with my token: the token does not name them."""
    world = World()
    token = await world.token()
    error = await refused(world.free.authorize(world.headers(token, OTHER_KEY)))
    assert (error.status, error.message) == (Status.UNAUTHENTICATED, "token sign is not valid")


@aio_test
async def test_call_signed_by_someone_else_is_refused() -> None:
    """The call's signer must be the address it names."""
    world = World()
    token = await world.token()
    error = await refused(world.free.authorize(world.headers(token, OTHER_KEY, address=USER)))
    assert error.status == Status.UNAUTHENTICATED
    assert error.message == (
        f"sign is not valid: unauthorized signer: {USER} not equal {OTHER}, maybe invalid signature struct"
    )


@aio_test
async def test_token_signed_by_a_wrong_signer_is_refused() -> None:
    """A token not signed by the metadata's free-call signer is refused."""
    world = World()
    expiry = world.chain.block + 100
    forged = sig.sign(sig.free_call_token(ORG, GROUP_NAME, sig.address_of(USER_KEY), "", expiry), OTHER_KEY)
    token = forged + b"_" + str(expiry).encode()
    error = await refused(world.free.authorize(world.headers(token)))
    assert (error.status, error.message) == (Status.UNAUTHENTICATED, "token sign is not valid")


@pytest.mark.parametrize("offset", [-6, 6])
@aio_test
async def test_stale_block_number_is_refused(offset: int) -> None:
    """A signature over a block more than 5 away from ours is refused."""
    world = World()
    token = await world.token()
    error = await refused(world.free.authorize(world.headers(token, block=world.chain.block + offset)))
    assert error.status == Status.UNAUTHENTICATED
    assert error.message == "authentication failed as the signature passed has expired"


@aio_test
async def test_block_within_five_is_accepted() -> None:
    """Five blocks either way is still fresh."""
    world = World()
    token = await world.token()
    await world.free.authorize(world.headers(token, block=world.chain.block - 5))


@pytest.mark.parametrize(
    ("token", "message"),
    [(b"no-underscore", "invalid token: no '_' found"), (b"sig_12a", "invalid token: invalid block number")],
)
@aio_test
async def test_malformed_token_is_an_invalid_argument(token: bytes, message: str) -> None:
    """A token that does not parse: INVALID_ARGUMENT, Go's text."""
    world = World()
    error = await refused(world.free.authorize(world.headers(token)))
    assert (error.status, error.message) == (Status.INVALID_ARGUMENT, message)


@pytest.mark.parametrize(
    "missing",
    [
        "snet-free-call-user-address",
        "snet-current-block-number",
        "snet-payment-channel-signature-bin",
        "snet-free-call-auth-token-bin",
    ],
)
@aio_test
async def test_missing_header_is_an_invalid_argument(missing: str) -> None:
    """Each required header, when missing, is named."""
    world = World()
    values = world.headers(await world.token())
    del values[missing]
    error = await refused(world.free.authorize(values))
    assert (error.status, error.message) == (Status.INVALID_ARGUMENT, f'missing "{missing}"')


@aio_test
async def test_garbage_signature_is_refused() -> None:
    """A signature that is not 65 bytes: UNAUTHENTICATED "sign is not valid"."""
    world = World()
    values = world.headers(await world.token())
    values["snet-payment-channel-signature-bin"] = [b"\x00" * 10]
    error = await refused(world.free.authorize(values))
    assert error.status == Status.UNAUTHENTICATED
    assert error.message.startswith("sign is not valid: incorrect signature length")


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (StorageUnavailable("etcd at http://10.9.8.7:2379 is unavailable: Connection was refused"), "is unavailable"),
        (StorageTimeout("etcd at http://10.9.8.7:2379 did not answer within 5 s"), "did not answer in time"),
    ],
)
@aio_test
async def test_storage_down_is_unavailable_and_keeps_storage_internals_from_the_client(
    failure: Exception, message: str
) -> None:
    """Counting needs the storage: UNAVAILABLE when it is down.  The client is told that
    payment storage failed, not where it lives nor what etcd said (they go to the debug log;
    the storage client logs outages itself)."""
    world = World()
    token = await world.token()
    world.storage.fail = failure
    with capturedLogs() as events:
        errors = [
            await refused(world.free.authorize(world.headers(token))),
            await refused(world.available(token)),
        ]
    for error in errors:
        assert (error.status, error.message) == (Status.UNAVAILABLE, f"payment storage {message}")
    assert not [event for event in events if event["log_level"] >= LogLevel.warn]
    assert any("10.9.8.7" in formatEvent(event) for event in events if event["log_level"] == LogLevel.debug)


# -- rejections: GetFreeCallToken and GetFreeCallsAvailable -----------------------------


@aio_test
async def test_token_request_signed_by_another_address_is_refused() -> None:
    """The request's signer must be the address it names (plain error, as Go)."""
    world = World()
    error = await refused(world.free.get_free_call_token(world.token_request(OTHER_KEY, address=USER), CALL))
    assert error.status == Status.UNKNOWN
    assert error.message == f"invalid signer, {USER} (from request) is not equal to {OTHER} (signer)"


@aio_test
async def test_token_request_with_a_stale_block_is_refused() -> None:
    """A token request over an old block is refused."""
    world = World()
    error = await refused(world.free.get_free_call_token(world.token_request(block=world.chain.block - 6), CALL))
    assert (error.status, error.message) == (
        Status.UNKNOWN,
        "authentication failed as the signature passed has expired",
    )


@aio_test
async def test_untrusted_address_may_not_name_a_user_id() -> None:
    """Only trusted signers may bind a user id."""
    world = World()
    error = await refused(world.free.get_free_call_token(world.token_request(user_id="alice"), CALL))
    assert (error.status, error.message) == (
        Status.UNKNOWN,
        "your address is not trusted by this service provider, the use of user_id is not allowed",
    )


@pytest.mark.parametrize(
    ("minimum", "balance", "ok"), [(10, 10 * WHOLE, True), (10, 10 * WHOLE - 1, False), (0, 0, True)]
)
@aio_test
async def test_balance_threshold_is_whole_tokens_times_ten_to_the_eighteen(
    minimum: int, balance: int, ok: bool
) -> None:
    """min_balance_for_free_call counts whole FET (18 decimals) of the token balance."""
    world = World(min_balance=minimum)
    world.chain.balances[USER] = balance
    reply = await world.free.get_free_call_token(world.token_request(), CALL)
    assert bool(reply.token) == ok


@aio_test
async def test_a_low_balance_gets_an_empty_token_and_is_logged_once() -> None:
    """Below the minimum the token is empty (snet-sdk then pays; Go's PERMISSION_DENIED failed
    every call of its default strategy), and the log says why, once per address."""
    world = World()
    world.chain.balances[USER] = 10 * WHOLE - 1
    with capturedLogs() as events:
        for _ in range(3):
            reply = await world.free.get_free_call_token(world.token_request(), CALL)
            assert (reply.token, reply.token_hex, reply.token_expiration_block) == (b"", "", 0)
    told = [formatEvent(event) for event in events if event.get("address") == USER]
    assert len(told) == 1
    assert "less than min_balance_for_free_call" in told[0]
    assert events[0]["log_level"] == LogLevel.info
    assert await world.available(b"") == 0


@aio_test
async def test_an_unreadable_balance_gets_an_empty_token_and_a_warning() -> None:
    """When the balance cannot be read the token is empty too (the SDK pays), with a
    warning at most once a minute."""
    world = World()
    world.chain.balance_error = ConnectionError("rpc down")
    with capturedLogs() as events:
        for _ in range(2):
            reply = await world.free.get_free_call_token(world.token_request(), CALL)
            assert reply.token == b""
    assert [event["log_level"] for event in events] == [LogLevel.warn]
    assert "cannot read its token balance" in formatEvent(events[0])
    assert "rpc down" in formatEvent(events[0])
    world.chain.balance_error = None
    assert (await world.free.get_free_call_token(world.token_request(), CALL)).token


@aio_test
async def test_availability_rejections_are_plain_errors() -> None:
    """GetFreeCallsAvailable refuses what the call path refuses, as UNKNOWN with the same text."""
    world = World()
    token = await world.token()
    error = await refused(world.available(token, OTHER_KEY))
    assert (error.status, error.message) == (Status.UNKNOWN, "token sign is not valid")
    error = await refused(world.available(b"garbage"))
    assert (error.status, error.message) == (Status.UNKNOWN, "no '_' found")
    world.chain.block += TOKEN_LIFETIME + 1
    error = await refused(world.available(token))
    assert error.message == "authentication failed as the Free Call Token passed has expired"


# -- many calls of one user at once ----------------------------------------------------


class _Slow:
    """A storage with a round trip of 0.5-1.5 ms (as etcd has), shared by several daemons."""

    def __init__(self, seed: int = 1) -> None:
        self.inner = MemoryStorage(lambda: 0.0)
        self._random = random.Random(seed)
        self.transactions = 0
        #: Round trips that fail (StorageUnavailable) before any succeeds.
        self.failures = 0

    async def _trip(self) -> None:
        await asyncio.sleep(self._random.uniform(0.0005, 0.0015))
        if self.failures:
            self.failures -= 1
            raise StorageUnavailable("etcd is down")

    async def get(self, key: str) -> Entry | None:
        await self._trip()
        return await self.inner.get(key)

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        self.transactions += 1
        await self._trip()
        return await self.inner.transaction(conditions, ops)


def _outcomes(results: Sequence[object]) -> tuple[int, dict[tuple[Status, str], int]]:
    """How many calls were served, and the refusals by status and message."""
    refusals: dict[tuple[Status, str], int] = {}
    for result in results:
        if isinstance(result, GrpcError):
            reason = (Status(result.status), result.message)
            refusals[reason] = refusals.get(reason, 0) + 1
        else:
            assert not isinstance(result, BaseException), result
    return sum(1 for result in results if not isinstance(result, BaseException)), refusals


@pytest.mark.parametrize("unlimited", [False, True])
@aio_test
async def test_sixty_four_calls_of_one_user_at_once_are_all_served(unlimited: bool) -> None:
    """64 simultaneous free calls of a user with calls left, on a storage with ~1 ms round trips:
    all are served and counted, in a few writes (they were refused "too much contention" from
    the ninth on, and cost O(N^2) transactions)."""
    storage = _Slow()
    per_address = {sig.address_of(USER_KEY): UNLIMITED} if unlimited else {}
    world = World(free_calls=100, storage=storage, per_address=per_address)
    token = await world.token()
    results = await asyncio.gather(
        *(world.free.authorize(world.headers(token)) for _ in range(64)), return_exceptions=True
    )
    assert _outcomes(results) == (64, {})
    key = world.free._counter_key(sig.address_of(USER_KEY), "")
    assert decode_count(await storage.get(key)) == 64
    assert storage.transactions <= 8


@aio_test
async def test_calls_past_the_limit_at_once_get_the_limit_answer() -> None:
    """64 simultaneous calls with 40 free calls left: 40 are served, the rest get the normal
    RESOURCE_EXHAUSTED answer (not UNAVAILABLE)."""
    world = World(free_calls=40, storage=_Slow())
    token = await world.token()
    results = await asyncio.gather(
        *(world.free.authorize(world.headers(token)) for _ in range(64)), return_exceptions=True
    )
    limit = "free call limit has been exceeded, calls made = 40, total free calls eligible = 40"
    assert _outcomes(results) == (40, {(Status.RESOURCE_EXHAUSTED, limit): 24})
    assert await world.available(token) == 0


@pytest.mark.parametrize(("limit", "served"), [(1000, 64), (50, 50)])
@aio_test
async def test_daemons_racing_on_one_storage_serve_all_and_never_exceed_the_limit(limit: int, served: int) -> None:
    """Four daemons, 16 simultaneous calls of one user each, one storage with ~1 ms round trips:
    with calls left all 64 are served; with 50 left exactly 50 are, whoever wins the races."""
    storage = _Slow(seed=7)
    daemons = [World(free_calls=limit, storage=storage) for _ in range(4)]
    token = await daemons[0].token()
    results = await asyncio.gather(
        *(daemon.free.authorize(daemon.headers(token)) for daemon in daemons for _ in range(16)),
        return_exceptions=True,
    )
    count, refusals = _outcomes(results)
    assert count == served
    assert all(status == Status.RESOURCE_EXHAUSTED for status, _ in refusals)
    key = daemons[0].free._counter_key(sig.address_of(USER_KEY), "")
    assert decode_count(await storage.get(key)) == served


class _Contended(CountingStorage):
    """Another daemon counts a call of the user just before each of our next ``races`` writes."""

    def __init__(self, races: int) -> None:
        super().__init__(MemoryStorage(lambda: 0.0))
        self.races = races

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        if self.races:
            self.races -= 1
            (condition,) = conditions
            entry = await self.inner.get(condition.key)
            await self.inner.put(condition.key, encode_count(decode_count(entry) + 1))
        return await super().transaction(conditions, ops)


@aio_test
async def test_races_lost_to_other_daemons_are_retried_after_jittered_pauses() -> None:
    """Twelve writes in a row lost to another daemon: the call is still served (it used to give up
    after eight; now after MAX_ATTEMPTS), after random pauses below an exponentially growing bound."""
    storage = _Contended(races=12)
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    world = World(free_calls=100, storage=storage, sleep=sleep)
    token = await world.token()
    await world.free.authorize(world.headers(token))
    assert await world.available(token) == 100 - 13
    assert len(pauses) == 12
    base, cap = RACE_BACKOFF
    for lost, pause in enumerate(pauses, 1):
        assert 0 <= pause <= min(cap, base * 2 ** (lost - 1))
    assert len(set(pauses)) == 12  # drawn at random: daemons do not retry in step


@aio_test
async def test_a_call_that_loses_every_race_is_unavailable() -> None:
    """Another daemon writing first every time: after MAX_ATTEMPTS tries, UNAVAILABLE (retry)."""
    storage = _Contended(races=10_000)

    async def sleep(seconds: float) -> None:
        pass

    world = World(free_calls=100_000, storage=storage, sleep=sleep)
    token = await world.token()
    error = await refused(world.free.authorize(world.headers(token)))
    assert (error.status, error.message) == (
        Status.UNAVAILABLE,
        "too much contention on this user's free calls; retry",
    )
    assert storage.calls.count("transaction") == MAX_ATTEMPTS


@pytest.mark.parametrize("plan", [["apply"], ["drop"], ["drop", "apply"]])
@aio_test
async def test_a_shared_count_whose_reply_was_lost_is_settled_once_for_all(plan: list[str]) -> None:
    """Five calls counted by one write whose reply was lost: settling tells whether that one
    write landed; all five are served and counted exactly once."""
    storage = _LosesReplies()
    world = World(free_calls=10, storage=storage)
    token = await world.token()
    storage.plan = list(plan)
    results = await asyncio.gather(*(world.free.authorize(world.headers(token)) for _ in range(5)))
    assert len(results) == 5
    assert await world.available(token) == 5


@aio_test
async def test_calls_cancelled_while_waiting_are_not_counted() -> None:
    """Calls cancelled while they wait for the write under way are never counted: no write
    follows the first one (not even a count given back at once)."""
    world = World(free_calls=10)
    token = await world.token()
    world.storage.reply_after = reply = asyncio.Event()
    first = asyncio.ensure_future(world.free.authorize(world.headers(token)))
    await world.storage.applied.wait()
    writes = world.storage.calls.count("transaction")
    waiting = [asyncio.ensure_future(world.free.authorize(world.headers(token))) for _ in range(3)]
    await asyncio.sleep(0)
    for call in waiting:
        call.cancel()
    reply.set()
    await first
    assert all(call.cancelled() for call in waiting)
    await world.free.settle(1.0)
    assert world.storage.calls.count("transaction") == writes
    assert await world.available(token) == 9


# -- give-backs ------------------------------------------------------------------------


@aio_test
async def test_failed_calls_given_back_at_once_are_all_given_back() -> None:
    """20 counted calls fail at once: all 20 are given back (10 were lost, silently), in a few writes."""
    storage = _Slow(seed=3)
    world = World(free_calls=100, storage=storage)
    token = await world.token()
    counted = [await world.free.authorize(world.headers(token)) for _ in range(20)]
    assert await world.available(token) == 80
    before = storage.transactions
    await asyncio.gather(*(world.free.release(call) for call in counted))
    assert await world.available(token) == 100
    assert storage.transactions - before <= 4


@aio_test
async def test_a_give_back_is_tried_again_while_storage_is_down() -> None:
    """Storage down for a while when a failed call is given back: it is tried again, with
    pauses, until it lands (it was dropped at the first failure)."""
    storage = _Slow()
    time = _FakeTime()
    world = World(storage=storage, sleep=time.sleep)
    token = await world.token()
    counted = await world.free.authorize(world.headers(token))
    storage.failures = 5
    await world.free.release(counted)  # returns at the first failure: the client need not wait
    assert storage.failures == 4
    await world.free.settle(5.0)
    assert storage.failures == 0
    assert len(time.pauses) >= 4
    assert await world.available(token) == 2


@aio_test
async def test_a_give_back_lost_past_its_deadline_is_logged() -> None:
    """Storage down past the give-back deadline: the loss is logged as a warning with the counter
    key and the reason (it vanished without a word), and release returns."""
    time = _FakeTime()
    world = World(clock=time.clock, sleep=time.sleep)
    token = await world.token()
    counted = await world.free.authorize(world.headers(token))
    world.storage.fail = StorageUnavailable("etcd is down")
    with capturedLogs() as events:
        await world.free.release(counted)
        await world.free.settle(5.0)
    assert time.now >= GIVE_BACK_WITHIN
    (event,) = [event for event in events if event["log_level"] == LogLevel.warn]
    assert event["key"] == counted.key
    assert "etcd is down" in formatEvent(event)
    assert "not given back" in formatEvent(event)
    world.storage.fail = None
    assert await world.available(token) == 1


@pytest.mark.parametrize("plan", [["apply"], ["drop"]])
@aio_test
async def test_a_give_back_whose_outcome_cannot_be_told_is_settled_later(plan: list[str]) -> None:
    """A give-back whose reply was lost while storage stayed down may have landed: it is not
    written again blindly (the user could exceed the limit), nor written off; once storage
    answers it is settled, and made again only if it never landed."""
    storage = _LosesReplies()
    world = World(storage=storage, sleep=_FakeTime().sleep)
    token = await world.token()
    counted = await world.free.authorize(world.headers(token))
    storage.plan = list(plan)
    storage.fail_gets_on_write = True
    await world.free.release(counted)
    storage.fail_gets = storage.fail_gets_on_write = False
    await world.free.settle(1.0)
    assert await world.available(token) == 2  # given back exactly once
    world.free.close()


# -- token balances ----------------------------------------------------------------------


class _CountingChain(Chain):
    """A chain that counts balance reads, each taking a turn of the event loop."""

    reads: int = 0

    async def token_balance(self, address: str) -> int:
        self.reads += 1
        await asyncio.sleep(0)
        return await super().token_balance(address)


@aio_test
async def test_token_requests_of_one_user_read_the_balance_once() -> None:
    """snet-sdk asks for a token before every call: five requests, one after another and five at
    once, read the balance from the chain once (it was read every time)."""
    world = World()
    world.chain = chain = _CountingChain(balances=dict(world.chain.balances))
    world.free = FreeCalls(world.storage, layout(), chain, world.settings, lambda: world.terms)
    for _ in range(5):
        assert (await world.free.get_free_call_token(world.token_request(), CALL)).token
    await asyncio.gather(*(world.free.get_free_call_token(world.token_request(), CALL) for _ in range(5)))
    assert chain.reads == 1


@pytest.mark.parametrize(("balance", "kept_for"), [(10 * WHOLE, 5 * 6.0), (WHOLE, 2 * 6.0)])
@aio_test
async def test_balances_are_kept_a_few_block_polls(balance: int, kept_for: float) -> None:
    """A balance high enough is kept five block-poll intervals, a low one two: a user who
    tops up waits less."""
    time = _FakeTime()
    world = World()
    world.chain = chain = _CountingChain(balances={USER: balance})
    world.free = FreeCalls(world.storage, layout(), chain, world.settings, lambda: world.terms, clock=time.clock)
    await world.free.get_free_call_token(world.token_request(), CALL)
    time.now = kept_for - 0.1
    await world.free.get_free_call_token(world.token_request(), CALL)
    assert chain.reads == 1
    time.now = kept_for
    await world.free.get_free_call_token(world.token_request(), CALL)
    assert chain.reads == 2


@aio_test
async def test_the_balance_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    """At most ``size`` addresses are kept; the one used least recently goes first."""
    reads: list[str] = []

    async def read(address: str) -> int:
        reads.append(address)
        return 1

    cache = BalanceCache(read, minimum=1, enough_for=60.0, short_for=10.0, now=lambda: 0.0, size=2)
    for address in ("a", "b", "a", "c", "a", "b"):
        await cache.balance(address)
    assert reads == ["a", "b", "c", "b"]


@aio_test
async def test_a_balance_read_survives_a_caller_going_away_and_failures_are_not_kept() -> None:
    """Callers share one read; one cancelled does not cancel it for the others; a failed read
    is not kept."""
    gate = asyncio.Event()
    answers: list[int | Exception] = [7, RuntimeError("node down"), 8]

    async def read(address: str) -> int:
        await gate.wait()
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    cache = BalanceCache(read, minimum=100, enough_for=60.0, short_for=0.0, now=lambda: 0.0)
    first = asyncio.ensure_future(cache.balance("a"))
    second = asyncio.ensure_future(cache.balance("a"))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await second == 7
    assert cache.reads == 1
    with pytest.raises(RuntimeError):
        await cache.balance("a")  # 7 was low: kept for 0 s
    assert await cache.balance("a") == 8


# -- status codes, tokens, user ids --------------------------------------------------------


@aio_test
async def test_an_unreadable_chain_is_unavailable_everywhere() -> None:
    """Block number unknown (RPC node down): GetFreeCallToken, GetFreeCallsAvailable and the call
    itself all answer UNAVAILABLE (they answered UNKNOWN, INTERNAL, INTERNAL)."""
    world = World()
    token = await world.token()
    request = world.token_request()
    world.chain.block_error = ConnectionError("rpc down")
    for attempt in (
        world.free.get_free_call_token(request, CALL),
        world.available(token),
        world.free.authorize(world.headers(token, block=5000)),
    ):
        error = await refused(attempt)
        assert (error.status, error.message) == (Status.UNAVAILABLE, "cannot determine current block")


@pytest.mark.parametrize("expiry", [b"123\n", b"123 ", b" 123", b"9" * 79, b"0x10"])
def test_token_expiry_must_be_only_a_number_of_at_most_78_digits(expiry: bytes) -> None:
    """A trailing newline (accepted by "$"), spaces, or more digits than any uint256 has: Go's
    "invalid block number" (not Python's int() limit text)."""
    with pytest.raises(ValueError, match=r"^invalid block number$"):
        parse_token(b"\x01" * 65 + b"_" + expiry)


def test_token_expiry_of_78_digits_and_a_sign_parse() -> None:
    """Go's big.Int reads a sign; 78 digits are still a number."""
    assert parse_token(b"s_" + b"9" * 78) == (b"s", int("9" * 78))
    assert parse_token(b"s_+12") == (b"s", 12)


@aio_test
async def test_a_token_with_a_newline_appended_is_refused() -> None:
    """The daemon's own token with "\\n" appended is not served (Go refuses it)."""
    world = World()
    token = await world.token() + b"\n"
    error = await refused(world.free.authorize(world.headers(token)))
    assert (error.status, error.message) == (Status.INVALID_ARGUMENT, "invalid token: invalid block number")


@aio_test
async def test_a_non_ascii_user_id_is_checked_on_its_raw_header_bytes() -> None:
    """A UTF-8 user id reaches the call path as the header's bytes (decoded as latin-1 by the front
    end): the signature is checked over those bytes, as Go does, and the call counts where
    GetFreeCallsAvailable looks."""
    world = World()
    user_id = "josé@example.org"
    token = await world.token(TRUSTED_KEY, user_id=user_id)
    assert await world.available(token, TRUSTED_KEY, user_id=user_id) == 2
    values = world.headers(token, TRUSTED_KEY, user_id=user_id)
    values["snet-free-call-user-id"] = [user_id.encode().decode("latin-1")]  # as the front end hands it over
    counted = await world.free.authorize(values)
    assert counted.user_address == TRUSTED
    assert await world.available(token, TRUSTED_KEY, user_id=user_id) == 1


@aio_test
async def test_a_call_cancelled_just_as_it_was_counted_is_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The count landed and the caller was cancelled before it could see it: the call is given
    back (nobody will make it)."""
    world = World()
    token = await world.token()
    call: asyncio.Future[Any] | None = None
    resolve = counters._resolve

    def resolve_then_cancel(done: asyncio.Future[None]) -> None:
        resolve(done)
        if call is not None and not call.done():
            call.cancel()  # before the caller resumes: it sees the cancellation, not the result

    monkeypatch.setattr(counters, "_resolve", resolve_then_cancel)
    call = asyncio.ensure_future(world.free.authorize(world.headers(token)))
    with pytest.raises(asyncio.CancelledError):
        await call
    await world.free.settle(1.0)
    assert await world.available(token) == 2
