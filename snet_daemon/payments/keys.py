"""Storage keys of the payment code, on top of the Go daemon's layout.

:class:`~snet_daemon.storage.keys.KeyLayout` names every key as the Go
daemon does.  The payment code adds one key of its own, the *hold* of a
channel while a paid call is in flight (and briefly after it, see
:mod:`snet_daemon.payments.escrow`).  It is deliberately not Go's lock
key: the Go daemon leaves ``locked``/``unlocked`` values there forever, and
ours must be absent when free (a hold is attached to a lease and vanishes
with it).
"""

from __future__ import annotations

import re
from typing import Final

from snet_daemon.storage.keys import KeyLayout

_HOLD: Final = "/payment-channel/hold"
_STATE_ID: Final = re.compile(r"\{ID: (\d+)\}$")
_PAYMENT_ID: Final = re.compile(r"/(\d+)/(\d+)$")


class PaymentKeys:
    """The keys of one payment group's channels.

    Args:
        layout: the group's Go key layout.
    """

    def __init__(self, layout: KeyLayout) -> None:
        self.layout = layout

    def channel_state(self, channel_id: int) -> str:
        return self.layout.channel_state(channel_id)

    def channel_state_prefix(self) -> str:
        return self.layout.channel_state_prefix()

    def channel_hold(self, channel_id: int) -> str:
        return "/".join((self.layout.mpe, _HOLD, f"{{ID: {channel_id}}}"))

    def payment(self, channel_id: int, nonce: int) -> str:
        return self.layout.payment(channel_id, nonce)

    def payment_prefix(self) -> str:
        return self.layout.payment_prefix()


def channel_id_of_state_key(key: str) -> int | None:
    """The channel id in a channel-state key (None for other keys)."""
    match = _STATE_ID.search(key)
    return int(match.group(1)) if match else None


def payment_of_key(key: str) -> tuple[int, int] | None:
    """``(channel id, nonce)`` of a payment-record key (None for other keys)."""
    match = _PAYMENT_ID.search(key)
    return (int(match.group(1)), int(match.group(2))) if match else None
