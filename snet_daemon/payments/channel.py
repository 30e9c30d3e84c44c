"""What the daemon stores about a payment channel, and how it is encoded.

The chain knows a channel's funds, expiry, signer and the nonce of the last
*on-chain* claim.  Only the daemons know the last payment a client signed
(the cumulative amount and its signature) and whether a claim has started
(which advances the nonce before the chain does).  :class:`ChannelState` is
that part; it lives in the shared storage under the Go daemon's key layout.

Values are our own versioned binary encoding (not Go's gob), so a payment
group must run one kind of daemon; a value with an unknown version is an
error, never silently misread::

    version 1:  0x01 | nonce (32 bytes, big-endian) | amount (32 bytes)
                | claimed (32 bytes) | signature length (1 byte) | signature

The pending-claim records (:class:`ClaimedPayment`) use the same layout
(with claimed = 0) under their own keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

_VERSION_1: Final = 1
_HEADER: Final = 1 + 32 + 32 + 32 + 1


class CorruptValue(ValueError):
    """A stored value does not decode (unknown version or truncated)."""


@dataclass(frozen=True, slots=True)
class ChannelState:
    """The daemon's part of a channel's state.

    Attributes:
        nonce: The channel nonce payments must carry now.  Equal to the
            chain's nonce, or one more while a claim is in progress.
        authorized_amount: The last cumulative amount accepted under this
            nonce (0 when none yet).
        signature: The client's signature of that amount (empty when none).
        claimed_amount: The amount claimed when the channel moved to
            ``nonce`` (0 before any claim).  Until the claim lands, and for
            as long as a daemon's view of the chain is older than that, the
            chain's value still counts it: payments under the new nonce may
            only spend what is left (:func:`spendable`).  It is kept after
            the claim landed for those daemons' sake: one whose cached
            chain view predates the landing would otherwise see the whole
            old value as spendable.
    """

    nonce: int
    authorized_amount: int = 0
    signature: bytes = b""
    claimed_amount: int = 0

    def encode(self) -> bytes:
        """The stored bytes (version 1)."""
        return _encode(self.nonce, self.authorized_amount, self.signature, self.claimed_amount)

    @classmethod
    def decode(cls, data: bytes) -> ChannelState:
        """Parse stored bytes.

        Raises:
            CorruptValue: for an unknown version or truncated data.
        """
        nonce, amount, signature, claimed = _decode(data)
        return cls(nonce, amount, signature, claimed)


@dataclass(frozen=True, slots=True)
class ClaimedPayment:
    """A payment whose claim was started: the provider may now claim it on chain.

    Stored under ``payment/storage/<channel>/<nonce>`` until the chain's
    nonce passes ``nonce`` (the claim landed).
    """

    channel_id: int
    nonce: int
    amount: int
    signature: bytes

    def encode(self) -> bytes:
        return _encode(self.nonce, self.amount, self.signature, 0)

    @classmethod
    def decode(cls, channel_id: int, data: bytes) -> ClaimedPayment:
        """Parse stored bytes (the channel id comes from the key).

        Raises:
            CorruptValue: for an unknown version or truncated data.
        """
        nonce, amount, signature, _ = _decode(data)
        return cls(channel_id, nonce, amount, signature)


def merge(stored: ChannelState | None, chain_nonce: int) -> ChannelState:
    """The channel state to validate payments against.

    The rules of the Go daemon (``snet-daemon.md`` §6.2 step 3):

    * nothing stored: a fresh channel at the chain's nonce;
    * stored nonce ahead of the chain: a claim is in progress, the stored
      state (at the new nonce, with the amount being claimed) is current;
    * stored nonce behind the chain: the claim landed (or the channel was
      claimed by other means); payments restart from zero at the chain's
      nonce;
    * equal: the stored state (its claim, if any, landed: see
      :func:`spendable`).
    """
    if stored is None or stored.nonce < chain_nonce:
        return ChannelState(chain_nonce)
    return stored


def spendable(state: ChannelState, chain_nonce: int, chain_value: int) -> int:
    """What payments under ``state.nonce`` may add up to, given a view of the chain.

    While the chain's nonce is behind the state's, the chain's value still
    includes the amount claimed when the state moved on, whether that
    claim is in progress or landed after the view was taken.
    """
    if state.nonce > chain_nonce:
        return chain_value - state.claimed_amount
    return chain_value


def _encode(nonce: int, amount: int, signature: bytes, claimed: int) -> bytes:
    if len(signature) > 255:
        raise ValueError("signature too long to store")
    return (
        bytes((_VERSION_1,))
        + nonce.to_bytes(32, "big")
        + amount.to_bytes(32, "big")
        + claimed.to_bytes(32, "big")
        + bytes((len(signature),))
        + signature
    )


def _decode(data: bytes) -> tuple[int, int, bytes, int]:
    if not data or data[0] != _VERSION_1:
        raise CorruptValue(f"unknown channel state encoding (version byte {data[:1].hex() or 'none'})")
    if len(data) < _HEADER or len(data) != _HEADER + data[_HEADER - 1]:
        raise CorruptValue("truncated channel state value")
    nonce = int.from_bytes(data[1:33], "big")
    amount = int.from_bytes(data[33:65], "big")
    claimed = int.from_bytes(data[65:97], "big")
    return nonce, amount, bytes(data[_HEADER:]), claimed
