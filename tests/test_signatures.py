"""Signed messages and signer recovery, against fixed vectors and eth_account."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from web3 import Web3

from snet_daemon.payments import signatures as s

# From the reference's client study: key = keccak("harness-client").
KEY = s.keccak256(b"harness-client")
ADDRESS = "0xE07f56752697aC108d9A51ec36D5acDE3c35d0f9"
MPE = s.address_bytes("0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512")
CLAIM_SIG = bytes.fromhex(
    "07aa2e3e364055bd6bb9a39ed14d048c150b9c2a9b10f3cdb70c7b5b6911adb8"
    "37919a29a3c690117788e1993a470147b7af41f125d7660f23ea4f9eb56e941d1b"
)


def test_address_of_key() -> None:
    """The vector key has the documented address."""
    assert s.checksum(s.address_of(KEY)) == ADDRESS


def test_claim_message_vector() -> None:
    """The MPE claim message for (ch 0, nonce 0, 1000) has the documented layout, hash and signature."""
    message = s.mpe_claim(MPE, 0, 0, 1000)
    assert len(message) == 135
    assert s.keccak256(message).hex().startswith("1279b0cc")
    assert s.keccak256(message).hex().endswith("a833")
    assert s.sign(message, KEY) == CLAIM_SIG
    assert s.recover(message, CLAIM_SIG) == s.address_bytes(ADDRESS)


def test_channel_state_vector() -> None:
    """The GetChannelState message for (ch 0, block 9) matches the documented vector."""
    message = s.channel_state_request(MPE, 0, 9)
    assert len(message) == 103
    assert s.keccak256(message).hex().startswith("bb437680")
    signature = s.sign(message, KEY)
    assert signature.hex().startswith("e234ac95")
    assert signature.hex().endswith("b86f1c")


def test_matches_web3_solidity_keccak_and_eth_account() -> None:
    """Our packing and signing agree with web3's solidity_keccak and eth_account (as snet-sdk signs)."""
    packed = Web3.solidity_keccak(
        ["string", "address", "uint256", "uint256", "uint256"],
        ["__MPE_claim_message", s.checksum(MPE), 12, 3, 10**20],
    )
    message = s.mpe_claim(MPE, 12, 3, 10**20)
    assert s.keccak256(message) == bytes(packed)
    theirs = Account.sign_message(encode_defunct(primitive=packed), KEY).signature
    assert s.sign(message, KEY) == bytes(theirs)


@pytest.mark.parametrize("v_offset", [0, 27])
def test_recovery_ids_0_1_27_28_are_accepted(v_offset: int) -> None:
    """v may be 0/1 (go-ethereum style) or 27/28 (personal_sign style)."""
    message = s.mpe_claim(MPE, 5, 0, 7)
    signature = s.sign(message, KEY)
    recid = signature[64] - 27
    assert s.recover(message, signature[:64] + bytes((recid + v_offset,))) == s.address_of(KEY)


@pytest.mark.parametrize("bad", [b"", b"\x00" * 64, b"\x00" * 66])
def test_wrong_length_is_rejected(bad: bytes) -> None:
    """Signatures that are not 65 bytes are refused."""
    with pytest.raises(s.SignatureError, match="length"):
        s.recover(b"m", bad)


def test_invalid_v_is_rejected() -> None:
    """A recovery id other than 0, 1, 27, 28 is refused."""
    with pytest.raises(s.SignatureError, match="recovery id"):
        s.recover(b"m", CLAIM_SIG[:64] + b"\x05")


def test_garbage_signature_does_not_recover_or_recovers_elsewhere() -> None:
    """A corrupted signature never recovers to the real signer."""
    corrupted = bytes([CLAIM_SIG[0] ^ 0xFF]) + CLAIM_SIG[1:]
    try:
        signer = s.recover(s.mpe_claim(MPE, 0, 0, 1000), corrupted)
    except s.SignatureError:
        return
    assert signer != s.address_bytes(ADDRESS)


def test_other_amount_recovers_other_address() -> None:
    """A signature over one amount does not authorise another."""
    assert s.recover(s.mpe_claim(MPE, 0, 0, 1001), CLAIM_SIG) != s.address_bytes(ADDRESS)


def test_uint256_bounds() -> None:
    """uint256 accepts 0..2**256-1 and refuses negatives and overflow."""
    assert s.uint256(0) == b"\x00" * 32
    assert s.uint256(2**256 - 1) == b"\xff" * 32
    for bad in (-1, 2**256):
        with pytest.raises(ValueError):
            s.uint256(bad)


def test_address_parsing() -> None:
    """Addresses parse from any-case hex with or without 0x; malformed ones fail."""
    assert s.address_bytes(ADDRESS.lower()) == s.address_bytes(ADDRESS[2:].upper())
    for bad in ("0x1234", "0x" + "zz" * 20, ""):
        with pytest.raises(ValueError):
            s.address_bytes(bad)


def test_control_messages_layout() -> None:
    """Control-service messages are the prefix, MPE, fields; multi-claim ids sorted."""
    assert s.list_unclaimed(MPE, 7) == b"__list_unclaimed" + MPE + s.uint256(7)
    assert s.list_in_progress(MPE, 7) == b"__list_in_progress" + MPE + s.uint256(7)
    assert s.start_claim(MPE, 3, 2) == b"__start_claim" + MPE + s.uint256(3) + s.uint256(2)
    assert s.start_claim_multiple(MPE, [9, 2, 5], 7) == (
        b"__StartClaimForMultipleChannels_" + MPE + s.uint256(2) + s.uint256(5) + s.uint256(9) + s.uint256(7)
    )
    assert s.token_request(CLAIM_SIG, 7) == CLAIM_SIG + s.uint256(7)
