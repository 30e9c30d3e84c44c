"""Storage keys, laid out exactly as the Go daemon lays them out.

Daemons of one payment group share one etcd; keeping the Go daemon's key
strings means a Python daemon finds the state a Go daemon left (and vice
versa, as far as value encodings allow), and an operator's existing
``etcdctl get --prefix`` habits keep working.

How the Go daemon builds them (``snetd/cmd/components.go``): storages are
wrapped in "prefix decorators", each joining its prefix and the inner key
with ``/``.  The outermost prefix is

    P = <blockchain_network_selected>/<organization_id>/<group id, base64>

and channel-related data sits under the MPE contract's checksummed address,

    M = P/<MPE address>

Data storages then add prefixes that themselves begin with ``/``, which is
why every key has a double slash:

=========================  ==================================================
channel state              ``M//payment-channel/storage/{ID: <id>}``
channel lock               ``M//payment-channel/lock/{ID: <id>}``
payments being claimed     ``M//payment/storage/<id>/<nonce>``
free-call user             ``P//free-call-user/storage/{ID:<addr>/<user>/<org>/<svc>/<group>}``
free-call lock             ``P//freecall/lock/{ID:<addr>/<user>/<org>/<svc>/<group>}``
prepaid used/planned/ref.  ``M//PrePaid/storage/{ID:<id>/U}`` (``/P``, ``/R``)
training model             ``P//model-user/modelStorage/{ID:<org>|<svc>|<group>|<model>}``
user's models              ``P//model-user/userModelStorage/{ID:<org>|<svc>|<group>|<addr>}``
pending models             ``P//model-user/pendingModelStorage/{ID:<org>|<svc>|<group>}``
public models              ``P//model-user/publicModelStorage/{ID:<org>|<svc>|<group>}``
=========================  ==================================================

(Note the space in the channel keys' ``{ID: <id>}`` and its absence
elsewhere: that is Go's ``fmt`` formatting of each key type, kept as is.)

Prepaid amounts are the one departure: Go keeps them under ``P``, but they
belong to a channel, and channel ids are per contract.  Under ``P``, a
metadata change to another MPE contract would hand the new contract's
channel N the planned and used amounts of the old contract's channel N
(calls served that nobody paid for), so they sit under ``M`` like the
channel state.  (Their values are our own encoding anyway, so a Go daemon
could not read them under either key.)

The channel lock key is named here for completeness but not used: this
daemon holds a channel with a key of its own, attached to its lease
(:mod:`snet_daemon.payments.keys`), since Go leaves ``locked``/``unlocked``
values in its lock key forever while a hold must vanish with its daemon.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Literal

from eth_utils.address import to_checksum_address

__all__ = ["KeyLayout", "PrepaidUsage"]

#: Which prepaid amount: used, planned, refund.
PrepaidUsage = Literal["U", "P", "R"]

# The data storages' prefixes, as in the Go daemon (each starts with "/").
_CHANNEL_STORAGE = "/payment-channel/storage"
_CHANNEL_LOCK = "/payment-channel/lock"
_PAYMENT_STORAGE = "/payment/storage"
_FREE_CALL_USER = "/free-call-user/storage"
_FREE_CALL_LOCK = "/freecall/lock"
_PREPAID = "/PrePaid/storage"
_MODEL = "/model-user/modelStorage"
_USER_MODELS = "/model-user/userModelStorage"
_PENDING_MODELS = "/model-user/pendingModelStorage"
_PUBLIC_MODELS = "/model-user/publicModelStorage"


def _join(*parts: str) -> str:
    """Go's ``PrefixedAtomicStorage``: prefix + "/" + key, nested."""
    return "/".join(parts)


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """The keys of one daemon's payment group.

    Args:
        network: ``blockchain_network_selected`` (``main``, ``sepolia``...).
        organization_id: The organisation id.
        group_id: The payment group's 32-byte id (from the organisation
            metadata; it appears base64-encoded in keys, as in Go).
        mpe_address: The MultiPartyEscrow contract address from the service
            metadata, in any case; keys use its EIP-55 checksummed form, as
            Go's ``common.Address.Hex()`` does.
    """

    network: str
    organization_id: str
    group_id: bytes
    mpe_address: str

    def __post_init__(self) -> None:
        # Normalise once; frozen dataclasses set attributes this way.
        object.__setattr__(self, "mpe_address", to_checksum_address(self.mpe_address))

    @property
    def group_id_text(self) -> str:
        """The group id as it appears in keys (standard base64, padded)."""
        return base64.b64encode(self.group_id).decode("ascii")

    @property
    def base(self) -> str:
        """``P``: everything of this network, organisation and group."""
        return _join(self.network, self.organization_id, self.group_id_text)

    @property
    def mpe(self) -> str:
        """``M``: everything tied to this MPE contract."""
        return _join(self.base, self.mpe_address)

    # -- escrow channels (under M) --------------------------------------------------

    def channel_state(self, channel_id: int) -> str:
        """The channel's state (nonce, authorised amount, signature...)."""
        return _join(self.mpe, _CHANNEL_STORAGE, f"{{ID: {channel_id}}}")

    def channel_state_prefix(self) -> str:
        """Prefix of every channel's state (to list channels)."""
        return _join(self.mpe, _CHANNEL_STORAGE, "")

    def channel_lock(self, channel_id: int) -> str:
        """The Go daemon's channel lock (``locked``/``unlocked``; not used here)."""
        return _join(self.mpe, _CHANNEL_LOCK, f"{{ID: {channel_id}}}")

    def payment(self, channel_id: int, nonce: int) -> str:
        """A payment being claimed: the channel's last payment at ``nonce``."""
        return _join(self.mpe, _PAYMENT_STORAGE, f"{channel_id}/{nonce}")

    def payment_prefix(self) -> str:
        """Prefix of every payment being claimed."""
        return _join(self.mpe, _PAYMENT_STORAGE, "")

    def prepaid(self, channel_id: int, usage: PrepaidUsage) -> str:
        """A prepaid channel's used (``U``), planned (``P``) or refund (``R``) amount.

        Under ``M`` (Go: ``P``): amounts prepaid on one contract's channel
        must not be spent on the same id of another contract.
        """
        return _join(self.mpe, _PREPAID, f"{{ID:{channel_id}/{usage}}}")

    # -- free calls, training (under P) ------------------------------------------------

    @staticmethod
    def _free_call_id(address: str, user_id: str, organization_id: str, service_id: str, group_id: str) -> str:
        return f"{{ID:{address}/{user_id}/{organization_id}/{service_id}/{group_id}}}"

    def free_call_user(self, address: str, user_id: str, organization_id: str, service_id: str, group_id: str) -> str:
        """A user's free-call counter (``address`` and ids exactly as Go formats them)."""
        user = self._free_call_id(address, user_id, organization_id, service_id, group_id)
        return _join(self.base, _FREE_CALL_USER, user)

    def free_call_lock(self, address: str, user_id: str, organization_id: str, service_id: str, group_id: str) -> str:
        """The lock of a user's free-call counter."""
        user = self._free_call_id(address, user_id, organization_id, service_id, group_id)
        return _join(self.base, _FREE_CALL_LOCK, user)

    def model(self, organization_id: str, service_id: str, group_id: str, model_id: str) -> str:
        """A training model's record."""
        return _join(self.base, _MODEL, f"{{ID:{organization_id}|{service_id}|{group_id}|{model_id}}}")

    def user_models(self, organization_id: str, service_id: str, group_id: str, address: str) -> str:
        """The models of one user (``address`` lower-cased, as Go does)."""
        return _join(self.base, _USER_MODELS, f"{{ID:{organization_id}|{service_id}|{group_id}|{address.lower()}}}")

    def pending_models(self, organization_id: str, service_id: str, group_id: str) -> str:
        """Models being trained or validated."""
        return _join(self.base, _PENDING_MODELS, f"{{ID:{organization_id}|{service_id}|{group_id}}}")

    def public_models(self, organization_id: str, service_id: str, group_id: str) -> str:
        """Models marked public."""
        return _join(self.base, _PUBLIC_MODELS, f"{{ID:{organization_id}|{service_id}|{group_id}}}")
