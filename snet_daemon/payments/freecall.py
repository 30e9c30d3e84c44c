"""Free calls: ``escrow.FreeCallStateService`` and the ``free-call`` payment type.

The Go daemon's protocol (``snet-daemon.md`` §4.2, §6.5), byte for byte:

1. A user asks ``GetFreeCallToken``, signing ``"__prefix_free_trial" ‖
   address ‖ user_id ‖ org ‖ service ‖ group id (base64) ‖ block`` (the
   address as the text it sends).  The daemon checks the signer, the block
   (±5), and -- unless the signer is a trusted marketplace backend
   (``trusted_free_call_signers``, who alone may name a ``user_id``) -- that
   the address holds at least ``min_balance_for_free_call`` whole tokens.
   It answers ``signature ‖ "_" ‖ expiry block``: its own signature (key
   ``private_key_for_free_calls``, whose address must be the metadata's
   ``free_call_signer_address``) over ``org ‖ daemon_group_name ‖ address
   (20 bytes) ‖ user_id ‖ expiry``, valid for the requested number of
   blocks, at most 172800.
2. Each free call carries the token, the address, the user id, a block
   number and the user's signature of the request message followed by the
   whole token.  The daemon checks both signatures, the token's expiry and
   the block, then the user's count against the limit:
   ``free_calls_per_address`` (``unlimited`` = no limit) or else the
   metadata group's ``free_calls``.

What differs from Go, on purpose:

* **The counter key is normalised**: ``{ID:<checksummed address>/...}``.
  Go uses the address text as sent, so changing the case of a hex letter
  gave a user a fresh set of free calls.
* **No lock; the user's waiting calls are counted together**: the counter
  is incremented before the call if it is below the limit, with a write
  conditioned on its revision, so daemons sharing the storage count
  together and never exceed the limit; a call that fails (or is cancelled)
  is given back.  The calls of one user that wait at once in this daemon
  share one write, which admits as many as the limit allows; races
  between daemons are tried again after a random pause
  (:mod:`snet_daemon.payments.counters`).  A write whose reply was lost is
  settled by the writes the counter records: its calls are served if it
  landed, written again if it did not; when storage cannot tell yet, they
  are refused and the write is settled later (before the counter's next
  write), its calls then given back if it landed.  Give-backs are tried
  again until a deadline; one finally lost is logged.  Go locks the user
  for the whole call (a second call at once fails) and counts afterwards.
* **Storage failures do not leak**: a call refused because storage failed
  is told so (``UNAVAILABLE``), without the storage's address or words.
* **Without a key to issue tokens** (none configured, or not the
  metadata's signer), ``GetFreeCallToken`` answers an *empty* token and
  ``GetFreeCallsAvailable`` answers 0 for an empty token, where Go answers
  errors.  snet-sdk's default strategy asks for a token before every call
  and fails the call when that errors (``clients.md`` §10.7); with an empty
  token it sees 0 free calls and pays instead.  Tokens issued by another
  daemon of the group (with the key) are still honoured: checking them
  needs only the metadata's signer address.
* **A balance below ``min_balance_for_free_call``, or one that cannot be
  read**, gets an empty token too, for the same reason (snet-sdk 6.0.0's
  ``FreeCallPaymentStrategy.get_free_calls_available`` calls
  ``GetFreeCallToken`` outside its ``try``: Go's ``PERMISSION_DENIED``
  made every call of a default-strategy user with less than the minimum
  fail, paid ones included).  The reason is logged (once per address for a
  low balance, at most once a minute for an unreadable one).  A client
  asking for free calls explicitly learns only that it has none.
  Balances are cached for a few block-poll intervals
  (:mod:`snet_daemon.payments.balances`): the SDK asks before every call,
  and anyone can ask at no cost.
* **An unreadable chain is ``UNAVAILABLE``** ("cannot determine current
  block"), from ``GetFreeCallToken``, ``GetFreeCallsAvailable`` and the
  call path alike.  Go's answers there are accidents of plain errors
  (``UNKNOWN`` from the service methods, ``INTERNAL "internal error: …"``
  on the call path, with the RPC error's text); no client tells them
  apart, and ``UNAVAILABLE`` says a retry may work.  (The escrow path
  keeps Go's ``INTERNAL``: there Go answers it on purpose.)
* Call-path rejections that Go reports as ``INTERNAL`` because they happen
  to be plain errors get the code that says what happened, with Go's text:
  an expired token or a stale block number is ``UNAUTHENTICATED``, the
  limit reached is ``RESOURCE_EXHAUSTED``.  The service methods answer as
  Go does (plain errors, ``UNKNOWN``), and ``UNAVAILABLE`` when the chain
  or storage cannot be read.
* The user id on the call path is hashed as the header's raw bytes, as
  Go does, and a token's expiry is a decimal number of at most 78 digits
  with nothing after it (Go's ``big.Int`` also refuses a trailing newline).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from twisted.logger import Logger

from snet_daemon._proto.escrow import state_service_pb2 as pb
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments import signatures
from snet_daemon.payments.balances import BalanceCache
from snet_daemon.payments.counters import UNLIMITED, Counters, decode_count, encode_count
from snet_daemon.payments.escrow import SIGNATURE, parse_integer, single, storage_down
from snet_daemon.payments.state_service import BLOCK_TOLERANCE
from snet_daemon.storage.base import AtomicStorage, Entry, StorageError

_log = Logger(namespace="snetd.payments.freecall")

USER_ID: Final = "snet-free-call-user-id"
USER_ADDRESS: Final = "snet-free-call-user-address"
CURRENT_BLOCK: Final = "snet-current-block-number"
AUTH_TOKEN: Final = "snet-free-call-auth-token-bin"

#: Longest token lifetime, in blocks (about 24 days at 12 s).
TOKEN_LIFETIME: Final = 172_800
#: What ``GetFreeCallsAvailable`` answers for an unlimited user (Go's number).
UNLIMITED_AVAILABLE: Final = 99_999_999
#: FET / ASI have 18 decimals; ``min_balance_for_free_call`` is in whole tokens.
TOKEN_DECIMALS: Final = 18

#: A token's expiry: a decimal number, as Go's ``big.Int.SetString(s, 10)``
#: reads it, of at most 78 digits (2**256 has 78: no uint256 is longer, and
#: Python's ``int()`` refuses more than 4300 with its own words).
_EXPIRY: Final = re.compile(rb"[+-]?[0-9]{1,78}")
#: How long a token balance is kept, in block-poll intervals (see ``balances``).
_ENOUGH_FOR_POLLS: Final = 5
_SHORT_FOR_POLLS: Final = 2
#: Seconds between warnings that balances cannot be read.
_WARN_EVERY: Final = 60.0
#: Addresses told once (in the log) that their balance is too low.
_TOLD: Final = 10_000


@dataclass(frozen=True, slots=True)
class FreeCallSettings:
    """The daemon's free-call configuration.

    Attributes:
        signer_key: ``private_key_for_free_calls`` (32 bytes), or None.
        trusted_signers: ``trusted_free_call_signers`` (20-byte addresses).
        min_balance: ``min_balance_for_free_call``, in whole tokens.
        per_address: ``free_calls_per_address`` by 20-byte address; -1 is
            unlimited, 0 means "the metadata's number".
        block_interval: ``block_poll_interval``, in seconds: the chain
            cannot be seen to move sooner, so token balances are kept for a
            few of these.
    """

    signer_key: bytes | None = None
    trusted_signers: frozenset[bytes] = frozenset()
    min_balance: int = 10
    per_address: Mapping[bytes, int] = field(default_factory=dict)
    block_interval: float = 6.0

    def __repr__(self) -> str:
        key = "***" if self.signer_key else None
        return (
            f"FreeCallSettings(signer_key={key}, trusted_signers={len(self.trusted_signers)}, "
            f"min_balance={self.min_balance}, per_address={len(self.per_address)})"
        )


@dataclass(frozen=True, slots=True)
class FreeCallTerms:
    """What free calls need from the configuration and metadata of the moment.

    Attributes:
        organization_id: ``organization_id``.
        service_id: ``service_id``.
        group_name: ``daemon_group_name`` (signed into tokens).
        group_id: the group id in base64, as the metadata writes it.
        free_calls: the metadata group's ``free_calls``.
        signer_address: the metadata's ``free_call_signer_address`` (20
            bytes), or None.
    """

    organization_id: str
    service_id: str
    group_name: str
    group_id: str
    free_calls: int
    signer_address: bytes | None


class FreeCallChain(Protocol):
    """What free calls read from the chain reader."""

    def current_block(self) -> int: ...

    async def token_balance(self, address: str) -> int: ...


class FreeCallKeys(Protocol):
    """``snet_daemon.storage.keys.KeyLayout`` as far as free calls go."""

    def free_call_user(
        self, address: str, user_id: str, organization_id: str, service_id: str, group_id: str
    ) -> str: ...


@dataclass(frozen=True, slots=True)
class FreeCall:
    """A free call counted before it is made; give it back if it fails."""

    key: str
    user_address: str


@dataclass(frozen=True, slots=True)
class _Request:
    """A free call's (or ``GetFreeCallsAvailable``'s) fields.

    ``user_id`` is the bytes the client signed: the header's raw bytes on
    the call path (Go hashes those; re-encoding the text the front end
    decoded as latin-1 would change a non-ASCII id), the UTF-8 of the
    protobuf string in ``GetFreeCallsAvailable``.
    """

    address: str
    user_id: bytes
    block: int
    signature: bytes
    token: bytes

    @property
    def user_text(self) -> str:
        """The user id as text, as ``GetFreeCallToken`` and ``GetFreeCallsAvailable``
        receive it: the counter key is the same for all three.  (Bytes that
        are not UTF-8 never got a token: protobuf strings are UTF-8.)"""
        return self.user_id.decode("utf-8", errors="replace")


def parse_token(token: bytes) -> tuple[bytes, int]:
    """Split a free-call token at its last ``_``: ``(signature, expiry block)``.

    Raises:
        ValueError: Go's messages, "no '_' found" / "invalid block number".
    """
    cut = token.rfind(b"_")
    if cut < 0:
        raise ValueError("no '_' found")
    expiry = token[cut + 1 :]
    # fullmatch: "$" would let a trailing newline through, which Go refuses.
    if not _EXPIRY.fullmatch(expiry):
        raise ValueError("invalid block number")
    return token[:cut], int(expiry)


class FreeCalls:
    """Issues free-call tokens, counts free calls, answers how many are left.

    Args:
        storage: the shared payment storage (counters).
        keys: where the counters live.
        chain: block number and token balances.
        settings: the free-call configuration.
        terms: returns the current :class:`FreeCallTerms`.
        sleep: waits between storage tries (``asyncio.sleep``; tests pass a fake).
        clock: the monotonic time ``sleep`` sleeps by (balance ages,
            give-back deadlines, log rate limits).
        jitter: random numbers in [0, 1) for the pauses between tries.
    """

    def __init__(
        self,
        storage: AtomicStorage,
        keys: FreeCallKeys,
        chain: FreeCallChain,
        settings: FreeCallSettings,
        terms: Callable[[], FreeCallTerms],
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._counters = Counters(storage, sleep=sleep, clock=clock, jitter=jitter)
        self._keys = keys
        self._chain = chain
        self._settings = settings
        self._terms = terms
        self._key_address = None if settings.signer_key is None else signatures.address_of(settings.signer_key)
        #: ``min_balance_for_free_call`` in cogs.
        self._min_cogs = settings.min_balance * 10**TOKEN_DECIMALS
        self._balances = BalanceCache(
            chain.token_balance,
            minimum=self._min_cogs,
            enough_for=_ENOUGH_FOR_POLLS * settings.block_interval,
            short_for=_SHORT_FOR_POLLS * settings.block_interval,
            now=clock,
        )
        #: Addresses told in the log that their balance is too low (once
        #: each; least recently told first).
        self._told: OrderedDict[str, None] = OrderedDict()
        #: When an unreadable balance was last logged (None: never).
        self._warned_at: float | None = None

    def issuing_key(self) -> bytes | None:
        """The key tokens are signed with, if it is the metadata's free-call signer."""
        terms = self._terms()
        if self._settings.signer_key is None or self._key_address != terms.signer_address:
            return None
        return self._settings.signer_key

    def key_problem(self) -> str | None:
        """Why this daemon issues no tokens although a key is configured (for the log)."""
        if self._settings.signer_key is None or self.issuing_key() is not None:
            return None
        signer = self._terms().signer_address
        return (
            f"private_key_for_free_calls belongs to {signatures.checksum(self._key_address or b'')}, but the "
            "service metadata's free_call_signer_address is "
            + (signatures.checksum(signer) if signer else "not set")
            + ": no free-call tokens are issued"
        )

    # -- escrow.FreeCallStateService -------------------------------------------------

    async def get_free_call_token(self, request: pb.GetFreeCallTokenRequest, call: ServerCall) -> pb.FreeCallToken:
        """A token for ``request.address``.

        An empty one when this daemon issues none, and when the address
        holds less than ``min_balance_for_free_call`` or its balance cannot
        be read (see the module docstring: Go answers errors there).

        Raises:
            GrpcError: ``UNKNOWN`` with Go's text for a bad signature, a
                stale block number, or a user id from an untrusted address;
                ``UNAVAILABLE`` when the current block cannot be read.
        """
        key = self.issuing_key()
        if key is None:
            return pb.FreeCallToken()
        terms = self._terms()
        user_id = request.user_id
        message = signatures.free_call_token_request(
            request.address, user_id, terms.organization_id, terms.service_id, terms.group_id, request.current_block
        )
        try:
            signer = signatures.recover(message, request.signature)
        except (signatures.SignatureError, ValueError) as exc:
            raise GrpcError(Status.UNKNOWN, str(exc)) from None
        if _address(request.address) != signer:
            raise GrpcError(
                Status.UNKNOWN,
                f"invalid signer, {request.address} (from request) is not equal to "
                f"{signatures.checksum(signer)} (signer)",
            )
        current = self._current_block()
        if abs(request.current_block - current) > BLOCK_TOLERANCE:
            raise GrpcError(Status.UNKNOWN, "authentication failed as the signature passed has expired")
        if signer not in self._settings.trusted_signers:
            if user_id:
                raise GrpcError(
                    Status.UNKNOWN,
                    "your address is not trusted by this service provider, the use of user_id is not allowed",
                )
            if not await self._eligible(signer):
                # An empty token, as without a key: snet-sdk's default
                # strategy then pays, where an error fails the call.
                return pb.FreeCallToken()
        lifetime = TOKEN_LIFETIME
        if request.HasField("token_lifetime_in_blocks") and request.token_lifetime_in_blocks <= TOKEN_LIFETIME:
            lifetime = request.token_lifetime_in_blocks
        expiry = current + lifetime
        signed = signatures.sign(
            signatures.free_call_token(terms.organization_id, terms.group_name, signer, user_id, expiry),
            key,
            v_offset=0,
        )
        token = signed + b"_" + str(expiry).encode()
        return pb.FreeCallToken(token=token, token_hex=token.hex(), token_expiration_block=expiry)

    async def get_free_calls_available(
        self, request: pb.FreeCallStateRequest, call: ServerCall
    ) -> pb.FreeCallStateReply:
        """How many free calls the token's holder has left (0 for no token).

        Raises:
            GrpcError: ``UNKNOWN`` with the call path's text for what the
                call path refuses; ``UNAVAILABLE`` when storage or the
                current block cannot be read; ``INTERNAL`` for an unreadable
                counter.
        """
        if not request.free_call_token:
            return pb.FreeCallStateReply(free_calls_available=0)
        try:
            parsed = _Request(
                request.address,
                request.user_id.encode(),
                request.current_block,
                request.signature,
                request.free_call_token,
            )
            signer = self._validate(parsed)
            key = self._counter_key(signer, parsed.user_text)
            entry = await self._read(key)
        except GrpcError as error:
            raise _plain(error) from None
        allowed = self._allowed(signer)
        if allowed == UNLIMITED:
            return pb.FreeCallStateReply(free_calls_available=UNLIMITED_AVAILABLE)
        return pb.FreeCallStateReply(free_calls_available=max(0, allowed - decode_count(entry)))

    # -- the free-call payment type --------------------------------------------------

    async def authorize(self, values: dict[str, list[str | bytes]]) -> FreeCall:
        """Check a free call's metadata and count the call.

        The count is written together with those of the user's other calls
        waiting (see :mod:`snet_daemon.payments.counters`).  If the caller is
        cancelled once the call was counted, the call is given back.

        Raises:
            GrpcError: ``INVALID_ARGUMENT`` for missing or malformed headers,
                ``UNAUTHENTICATED`` for a bad signature or token, an expired
                token or a stale block number, ``RESOURCE_EXHAUSTED`` when the
                user's free calls are used up, ``UNAVAILABLE`` when storage
                is down, the current block cannot be read, or other daemons
                kept counting the user's calls first, ``INTERNAL`` for an
                unreadable counter.
        """
        request = _parse(values)
        signer = self._validate(request)
        key = self._counter_key(signer, request.user_text)
        await self._counters.count(key, self._allowed(signer))
        return FreeCall(key, signatures.checksum(signer))

    async def release(self, free_call: FreeCall) -> None:
        """Give back a counted call that failed.

        Returns once it landed or failed once; storage that is down is then
        tried again in the background until a deadline passes.  One finally
        lost is logged (never raised): it costs the user one free call.
        """
        await self._counters.give_back(free_call.key)

    async def settle(self, within: float) -> None:
        """Wait up to ``within`` seconds for give-backs (and counts) under
        way in the background, and try once more to settle counter writes
        of unknown outcome (the daemon stops: storage closes next)."""
        await self._counters.settle(within)

    def close(self) -> None:
        """Stop writing counters; give-backs still waiting and writes still
        unsettled are logged, later calls refused (``UNAVAILABLE``)."""
        self._counters.close()

    # -- internals ------------------------------------------------------------------

    def _validate(self, request: _Request) -> bytes:
        """Go's ``FreeCallPaymentValidator.Validate``; returns the user's address (20 bytes)."""
        terms = self._terms()
        try:
            token_signature, expiry = parse_token(request.token)
        except ValueError as exc:
            raise GrpcError(Status.INVALID_ARGUMENT, f"invalid token: {exc}") from None
        try:
            signer = signatures.recover(
                signatures.free_call(
                    request.address,
                    request.user_id,
                    terms.organization_id,
                    terms.service_id,
                    terms.group_id,
                    request.block,
                    request.token,
                ),
                request.signature,
            )
        except (signatures.SignatureError, ValueError) as exc:
            raise GrpcError(Status.UNAUTHENTICATED, f"sign is not valid: {exc}") from None
        if _address(request.address) != signer:
            raise GrpcError(
                Status.UNAUTHENTICATED,
                f"sign is not valid: unauthorized signer: {request.address} not equal "
                f"{signatures.checksum(signer)}, maybe invalid signature struct",
            )
        try:
            token_signer = signatures.recover(
                signatures.free_call_token(terms.organization_id, terms.group_name, signer, request.user_id, expiry),
                token_signature,
            )
        except (signatures.SignatureError, ValueError) as exc:
            raise GrpcError(Status.UNAUTHENTICATED, f"sign is not valid: {exc}") from None
        if terms.signer_address is None or token_signer != terms.signer_address:
            raise GrpcError(Status.UNAUTHENTICATED, "token sign is not valid")
        current = self._current_block()
        if expiry < current:
            raise GrpcError(Status.UNAUTHENTICATED, "authentication failed as the Free Call Token passed has expired")
        if abs(request.block - current) > BLOCK_TOLERANCE:
            raise GrpcError(Status.UNAUTHENTICATED, "authentication failed as the signature passed has expired")
        return signer

    def _allowed(self, address: bytes) -> int:
        configured = self._settings.per_address.get(address, 0)
        return configured if configured != 0 else self._terms().free_calls

    def _counter_key(self, address: bytes, user_id: str) -> str:
        terms = self._terms()
        return self._keys.free_call_user(
            signatures.checksum(address), user_id, terms.organization_id, terms.service_id, terms.group_id
        )

    def _current_block(self) -> int:
        """The current block number.

        Raises:
            GrpcError: ``UNAVAILABLE`` (Go's text) when it cannot be read,
                for the service methods and the call path alike: the chain
                node is down or behind, a retry may succeed.
        """
        try:
            return self._chain.current_block()
        except Exception:
            raise GrpcError(Status.UNAVAILABLE, "cannot determine current block") from None

    async def _read(self, key: str) -> Entry | None:
        try:
            return await self._storage.get(key)
        except StorageError as exc:
            raise storage_down(exc) from None

    async def _eligible(self, address: bytes) -> bool:
        """Whether ``address`` holds ``min_balance_for_free_call`` whole tokens (logged when not)."""
        text = signatures.checksum(address)
        try:
            balance = await self._balances.balance(text)
        except Exception as exc:
            now = self._clock()
            if self._warned_at is None or now - self._warned_at >= _WARN_EVERY:
                self._warned_at = now
                _log.warn(
                    "no free-call token for {address}: cannot read its token balance ({error}); "
                    "such requests get an empty token (logged at most once a minute)",
                    address=text,
                    error=exc,
                )
            return False
        if balance >= self._min_cogs:
            return True
        if text not in self._told:
            self._told[text] = None
            if len(self._told) > _TOLD:
                self._told.popitem(last=False)
            _log.info(
                "no free-call token for {address}: it holds less than min_balance_for_free_call "
                "({minimum} FET/ASI); it gets an empty token (logged once per address)",
                address=text,
                minimum=self._settings.min_balance,
            )
        return False


def _parse(values: dict[str, list[str | bytes]]) -> _Request:
    """The free-call headers, as Go reads them (a repeated user id counts as none)."""
    try:
        raw_user = single(values, USER_ID)
    except GrpcError:
        raw_user = None
    address = _required(values, USER_ADDRESS)
    block = parse_integer(CURRENT_BLOCK, _text(_required(values, CURRENT_BLOCK)))
    signature = _required(values, SIGNATURE)
    token = _required(values, AUTH_TOKEN)
    return _Request(
        address=_text(address),
        user_id=b"" if raw_user is None else _bytes(raw_user),
        block=block,
        signature=_bytes(signature),
        token=_bytes(token),
    )


def _required(values: dict[str, list[str | bytes]], key: str) -> str | bytes:
    value = single(values, key)
    if value is None:
        raise GrpcError(Status.INVALID_ARGUMENT, f'missing "{key}"')
    return value


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _bytes(value: str | bytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


def _address(text: str) -> bytes | None:
    try:
        return signatures.address_bytes(text)
    except ValueError:
        return None


def _plain(error: GrpcError) -> GrpcError:
    """A call-path rejection as the service methods report it (Go: plain errors, UNKNOWN)."""
    if error.status in (Status.UNAVAILABLE, Status.INTERNAL):
        return error
    message = error.message
    if error.status == Status.INVALID_ARGUMENT:
        message = message.removeprefix("invalid token: ")
    return GrpcError(Status.UNKNOWN, message)


__all__ = (
    "AUTH_TOKEN",
    "CURRENT_BLOCK",
    "TOKEN_DECIMALS",
    "TOKEN_LIFETIME",
    "UNLIMITED",
    "UNLIMITED_AVAILABLE",
    "USER_ADDRESS",
    "USER_ID",
    "FreeCall",
    "FreeCallChain",
    "FreeCallKeys",
    "FreeCallSettings",
    "FreeCallTerms",
    "FreeCalls",
    "decode_count",
    "encode_count",
    "parse_token",
)
