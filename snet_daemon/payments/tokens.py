"""Prepaid-call tokens: the Go daemon's HS256 JSON Web Tokens, with the stdlib.

``TokenService/GetToken`` hands a client a token for one channel after the
client has prepaid (signed a larger amount); the client then sends it with
each ``prepaid-call`` (``snet-prepaid-auth-token-bin``).  The token only
says *who may spend this channel's prepaid amount*: what is left to spend
is in the shared storage, so a token is not money and several concurrent
calls may carry the same one.

Tokens are the Go daemon's (``token/jwt.go``, golang-jwt v5) with one
claim more: header ``{"alg":"HS256","typ":"JWT"}``, claims ``{"exp",
"groupId", "mpeAddress", "orgId", "payload", "userAddress"}`` (``payload``
is the channel id in decimal, ``groupId`` the group id in base64,
``mpeAddress`` the MPE contract's checksummed address), keys sorted as Go's
``encoding/json`` writes a map, base64url without padding.  Verification
accepts the HMAC family (HS256/384/512, as golang-jwt's ``SigningMethodHMAC``
check does), requires an unexpired ``exp`` when present, and compares
``payload``, ``orgId``, ``groupId`` and ``mpeAddress``; the error texts are
golang-jwt's and the Go daemon's.

``mpeAddress`` is ours: a channel id means a channel only within one
contract, and the metadata may switch to another contract (the secret stays
the same).  Without it, a token for channel N of the old contract would
spend on channel N of the new one; a token without it (issued by Go, or
before) is refused like a token of another group, and clients ask for a new
one.

Pure code: the caller passes the clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from eth_utils.address import to_checksum_address

from snet_daemon import jsontext

_HEADER: Final = b'{"alg":"HS256","typ":"JWT"}'
_HMAC: Final = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
_VERIFIED_LIMIT: Final = 10_000


class TokenError(ValueError):
    """A token was refused; the message says why (golang-jwt's and Go's wording)."""


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """``token_secret_key`` and ``token_expiry_in_minutes``.

    Attributes:
        secret: the HMAC key (at least 32 bytes; the configuration refuses
            Go's published default).
        expiry_minutes: lifetime of a new token.
    """

    secret: bytes
    expiry_minutes: int

    def __repr__(self) -> str:
        return f"TokenSettings(secret=***, expiry_minutes={self.expiry_minutes})"


class PrepaidTokens:
    """Issues and checks prepaid-call tokens of one payment group.

    Args:
        settings: the secret and the lifetime.
        organization_id: the ``orgId`` claim.
        group_id: returns the ``groupId`` claim (base64 group id; the
            metadata may be reloaded).
        mpe_address: the ``mpeAddress`` claim: the MPE contract whose
            channels the tokens spend on (any case; checksummed).
        clock: seconds since the epoch (``IReactorTime.seconds``).
    """

    def __init__(
        self,
        settings: TokenSettings,
        organization_id: str,
        group_id: Callable[[], str],
        mpe_address: str,
        clock: Callable[[], float],
    ) -> None:
        self._secret = settings.secret
        self._lifetime = settings.expiry_minutes * 60
        self._organization_id = organization_id
        self._group_id = group_id
        self._mpe_address = to_checksum_address(mpe_address)
        self._clock = clock
        #: Tokens whose signature checked out (signature checks are skipped
        #: for them; claims are checked every time).
        self._verified: dict[bytes, _Claims] = {}

    def create(self, channel_id: int, user_address: str) -> str:
        """A token for ``channel_id``, naming ``user_address`` (checksummed) as its holder."""
        claims = {
            "exp": int(self._clock()) + self._lifetime,
            "groupId": self._group_id(),
            "mpeAddress": self._mpe_address,
            "orgId": self._organization_id,
            "payload": str(channel_id),
            "userAddress": user_address,
        }
        body = json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        signing_input = _b64(_HEADER) + b"." + _b64(body)
        signature = hmac.new(self._secret, signing_input, hashlib.sha256).digest()
        return (signing_input + b"." + _b64(signature)).decode("ascii")

    def verify(self, token: str | bytes, channel_id: int) -> str:
        """Check ``token`` for a call on ``channel_id``.

        A token whose signature was checked before is not checked again
        (its claims still are): clients send the same token with every call.

        Returns:
            The holder's address from the token, checksummed as Go forwards
            it (``"unknown"`` when it has none, as in Go).

        Raises:
            TokenError: malformed, wrong algorithm or signature, expired,
                or issued for another channel, organisation, group or MPE
                contract (or naming none: Go's tokens).
        """
        raw = token.encode("latin-1") if isinstance(token, str) else bytes(token)
        claims = self._verified.get(raw)
        if claims is None:
            claims = self._check_signature(raw)
            if len(self._verified) >= _VERIFIED_LIMIT:
                self._verified.clear()
            self._verified[raw] = claims
        return self._check_claims(claims, channel_id)

    def _check_signature(self, raw: bytes) -> _Claims:
        parts = raw.split(b".")
        if len(parts) != 3:
            raise TokenError("token is malformed: token contains an invalid number of segments")
        header = _json_part(parts[0], "header")
        claims = _json_part(parts[1], "claims")
        algorithm = header.get("alg")
        digest = _HMAC.get(algorithm) if isinstance(algorithm, str) else None
        if digest is None:
            raise TokenError(
                f"token is unverifiable: error while executing keyfunc: unexpected signing method: {algorithm}"
            )
        try:
            signature = _unb64(parts[2])
        except ValueError:
            raise TokenError("token is malformed: could not base64 decode signature") from None
        expected = hmac.new(self._secret, parts[0] + b"." + parts[1], digest).digest()
        if not hmac.compare_digest(signature, expected):
            raise TokenError("token signature is invalid: signature is invalid")
        expiry = claims.get("exp")
        if expiry is not None and (isinstance(expiry, bool) or not isinstance(expiry, int | float)):
            raise TokenError("token has invalid claims: token contains an invalid number: exp is invalid")
        holder = claims.get("userAddress")
        holder = holder if isinstance(holder, str) and holder else "unknown"
        try:
            holder = to_checksum_address(holder)
        except ValueError:
            pass
        return _Claims(
            expiry=expiry,
            payload=_go_text(claims.get("payload")),
            organization=_go_text(claims.get("orgId")),
            group=_go_text(claims.get("groupId")),
            contract=_go_text(claims.get("mpeAddress")),
            holder=holder,
        )

    def _check_claims(self, claims: _Claims, channel_id: int) -> str:
        if claims.expiry is not None and not self._clock() < claims.expiry:
            raise TokenError("token has invalid claims: token is expired")
        if claims.payload != str(channel_id):
            raise TokenError(f"payload {claims.payload} used to generate the Token doesnt match expected values")
        if claims.organization != self._organization_id:
            raise TokenError(f"organization {claims.organization} is not associated with this Daemon")
        if claims.group != self._group_id():
            raise TokenError(f"groupId {claims.group} is not associated with this Daemon")
        if claims.contract != self._mpe_address:
            raise TokenError(f"mpeAddress {claims.contract} is not associated with this Daemon")
        return claims.holder


@dataclass(frozen=True, slots=True)
class _Claims:
    """A signature-checked token's claims, as compared."""

    expiry: int | float | None
    payload: str
    organization: str
    group: str
    contract: str
    holder: str


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    if b"=" in data:
        raise ValueError("padded")
    try:
        return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def _json_part(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = jsontext.loads(_unb64(data))
    except ValueError:
        raise TokenError(f"token is malformed: could not JSON decode {what}") from None
    if not isinstance(value, dict):
        raise TokenError(f"token is malformed: could not JSON decode {what}")
    return value


def _go_text(value: object) -> str:
    """A claim as Go's ``fmt.Sprintf("%v", ...)`` prints it (enough for the comparisons)."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}" if abs(value) < 1e21 else repr(value)
    return str(value)
