"""Signed messages of the SingularityNET protocol, and signer recovery.

Every signature in the protocol is the same primitive (reference
``snet-daemon.md`` §4.1, ``clients.md`` §3.2):

    M = the parts concatenated (Solidity ``abi.encodePacked``)
    digest = keccak256("\\x19Ethereum Signed Message:\\n32" ++ keccak256(M))
    signature = r (32) ++ s (32) ++ v (1), v in {0, 1, 27, 28}

Packing: strings as raw UTF-8, addresses as 20 bytes, integers as 32-byte
big-endian (``uint256``), byte strings raw.  This module builds each message
the daemon checks and recovers who signed it.  Pure code, no I/O: a payment
check is three keccaks and one ECDSA recovery, done with coincurve and a C
keccak directly (about 110 µs; eth_account's path takes about 300 µs).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import coincurve
import sha3  # type: ignore[import-untyped]
from eth_utils.address import to_checksum_address

_PREFIX: Final = b"\x19Ethereum Signed Message:\n32"
_UINT256_LIMIT: Final = 1 << 256
_HEX40: Final = re.compile("[0-9a-fA-F]{40}")

MPE_CLAIM: Final = b"__MPE_claim_message"
GET_CHANNEL_STATE: Final = b"__get_channel_state"
LIST_UNCLAIMED: Final = b"__list_unclaimed"
LIST_IN_PROGRESS: Final = b"__list_in_progress"
START_CLAIM: Final = b"__start_claim"
START_CLAIM_MULTIPLE: Final = b"__StartClaimForMultipleChannels_"
FREE_CALL: Final = b"__prefix_free_trial"


class SignatureError(ValueError):
    """A signature is malformed or does not recover to a public key."""


def keccak256(data: bytes) -> bytes:
    """Keccak-256 (Ethereum's hash, not the final SHA3-256)."""
    return sha3.keccak_256(data).digest()  # type: ignore[no-any-return]


def uint256(value: int) -> bytes:
    """``value`` as a Solidity uint256 (32 bytes, big-endian).

    Raises:
        ValueError: for negative values or values of 2**256 and more (the Go
            daemon silently truncates those; we refuse them).
    """
    if value < 0 or value >= _UINT256_LIMIT:
        raise ValueError(f"{value} does not fit in uint256")
    return value.to_bytes(32, "big")


def address_bytes(address: str | bytes) -> bytes:
    """A 20-byte address from ``0x``-hex text (any case) or raw bytes.

    Raises:
        ValueError: for anything that is not 20 bytes of hex.
    """
    if isinstance(address, bytes):
        if len(address) != 20:
            raise ValueError(f"an address is 20 bytes, got {len(address)}")
        return address
    text = address[2:] if address[:2] in ("0x", "0X") else address
    # fullmatch, not bytes.fromhex alone: it skips spaces, so 40 characters
    # with spaces in them would give fewer than 20 bytes.
    if _HEX40.fullmatch(text) is None:
        raise ValueError(f"malformed address {address!r}")
    return bytes.fromhex(text)


def checksum(address: bytes) -> str:
    """The EIP-55 checksummed text of a 20-byte address."""
    return to_checksum_address(address)


def message_digest(message: bytes) -> bytes:
    """The digest that is signed for ``message`` (EIP-191 over its keccak)."""
    return keccak256(_PREFIX + keccak256(message))


def recover(message: bytes, signature: bytes) -> bytes:
    """The 20-byte address that signed ``message``.

    Raises:
        SignatureError: for a signature that is not 65 bytes, has an invalid
            ``v``, or does not recover (the caller reports "signature is
            not valid"; a valid signature by someone else recovers to
            another address, which the caller compares).
    """
    if len(signature) != 65:
        raise SignatureError(f"incorrect signature length {len(signature)}, expected 65")
    v = signature[64]
    if v >= 27:
        v -= 27
    if v not in (0, 1):
        raise SignatureError(f"invalid signature recovery id {signature[64]}")
    try:
        public = coincurve.PublicKey.from_signature_and_message(
            signature[:64] + bytes((v,)), message_digest(message), hasher=None
        )
    except Exception as exc:  # coincurve raises plain Exception/ValueError
        raise SignatureError(f"signature does not recover: {exc}") from None
    return keccak256(public.format(compressed=False)[1:])[-20:]


def sign(message: bytes, private_key: bytes, *, v_offset: int = 27) -> bytes:
    """Sign ``message`` with ``private_key`` (32 bytes).

    ``v`` is 27 or 28 as wallets make it; with ``v_offset=0`` it is 0 or 1,
    as go-ethereum's ``crypto.Sign`` makes it (the Go daemon's free-call
    tokens).  The daemon signs free-call tokens; tests sign payments.
    """
    signature = coincurve.PrivateKey(private_key).sign_recoverable(message_digest(message), hasher=None)
    return signature[:64] + bytes((signature[64] + v_offset,))


def address_of(private_key: bytes) -> bytes:
    """The 20-byte address of ``private_key``."""
    public = coincurve.PrivateKey(private_key).public_key.format(compressed=False)
    return keccak256(public[1:])[-20:]


# -- the messages -----------------------------------------------------------


def mpe_claim(mpe: bytes, channel_id: int, nonce: int, amount: int) -> bytes:
    """A payment: the message the MPE contract checks when the provider claims.

    Signed by the channel's signer (or sender) for every paid call, with the
    cumulative amount authorised on this channel and nonce.
    """
    return MPE_CLAIM + mpe + uint256(channel_id) + uint256(nonce) + uint256(amount)


def channel_state_request(mpe: bytes, channel_id: int, current_block: int) -> bytes:
    """``GetChannelState`` authentication (signer, sender or recipient)."""
    return GET_CHANNEL_STATE + mpe + uint256(channel_id) + uint256(current_block)


def token_request(claim_signature: bytes, current_block: int) -> bytes:
    """``TokenService.GetToken`` outer signature over the claim signature."""
    return claim_signature + uint256(current_block)


def list_unclaimed(mpe: bytes, current_block: int) -> bytes:
    """``ProviderControlService.GetListUnclaimed`` (payment address)."""
    return LIST_UNCLAIMED + mpe + uint256(current_block)


def list_in_progress(mpe: bytes, current_block: int) -> bytes:
    """``ProviderControlService.GetListInProgress`` (payment address)."""
    return LIST_IN_PROGRESS + mpe + uint256(current_block)


def start_claim(mpe: bytes, channel_id: int, nonce: int) -> bytes:
    """``ProviderControlService.StartClaim`` (payment address; no block number)."""
    return START_CLAIM + mpe + uint256(channel_id) + uint256(nonce)


def start_claim_multiple(mpe: bytes, channel_ids: Iterable[int], current_block: int) -> bytes:
    """``StartClaimForMultipleChannels``: ids in ascending order, then the block."""
    ids = b"".join(uint256(i) for i in sorted(channel_ids))
    return START_CLAIM_MULTIPLE + mpe + ids + uint256(current_block)


def free_call_token_request(
    address: str, user_id: str | bytes, organization_id: str, service_id: str, group_id: str, current_block: int
) -> bytes:
    """``GetFreeCallToken``, signed by the user.

    ``address`` is the text exactly as the client sent it (snet-sdk sends
    its checksummed form) and ``group_id`` the group id in base64, as in
    the metadata: both are hashed as strings, not as bytes.  ``user_id``
    is hashed as its UTF-8, or as given when bytes (a header's raw bytes).
    """
    return b"".join(
        (
            FREE_CALL,
            address.encode(),
            _utf8(user_id),
            organization_id.encode(),
            service_id.encode(),
            group_id.encode(),
            uint256(current_block),
        )
    )


def free_call(
    address: str,
    user_id: str | bytes,
    organization_id: str,
    service_id: str,
    group_id: str,
    current_block: int,
    token: bytes,
) -> bytes:
    """A free call (and ``GetFreeCallsAvailable``): the token request plus the whole token."""
    return free_call_token_request(address, user_id, organization_id, service_id, group_id, current_block) + token


def free_call_token(
    organization_id: str, group_name: str, user: bytes, user_id: str | bytes, expiration_block: int
) -> bytes:
    """The part of a free-call token the daemon signs.

    ``group_name`` is the daemon's ``daemon_group_name`` (not the group
    id) and ``user`` the 20 bytes of the user's address, as in Go.
    """
    return organization_id.encode() + group_name.encode() + user + _utf8(user_id) + uint256(expiration_block)


def _utf8(text: str | bytes) -> bytes:
    """``text`` as Go's ``[]byte(s)`` sees it: UTF-8, or the bytes themselves."""
    return text if isinstance(text, bytes) else text.encode()
