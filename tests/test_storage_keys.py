"""Storage keys: the Go daemon's layout, string for string."""

from __future__ import annotations

import base64

import pytest

from snet_daemon.storage.keys import KeyLayout

GROUP_ID = bytes(range(32))
GROUP_B64 = base64.b64encode(GROUP_ID).decode()  # "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
MPE = "0xe8D09a6C296aCdd4c01b21f407ac93fdfC63E78C".lower()
MPE_CHECKSUM = "0xE8D09a6C296aCdd4c01b21f407ac93fdfC63E78C"
P = f"sepolia/snet/{GROUP_B64}"
M = f"{P}/{MPE_CHECKSUM}"


@pytest.fixture
def layout() -> KeyLayout:
    """The keys of org ``snet``, a fixed group, on Sepolia."""
    return KeyLayout(network="sepolia", organization_id="snet", group_id=GROUP_ID, mpe_address=MPE)


def test_prefixes(layout: KeyLayout) -> None:
    """P is network/org/base64 group id; M appends the checksummed MPE address."""
    assert GROUP_B64 == "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    assert layout.base == P
    assert layout.mpe == M
    assert layout.mpe_address == MPE_CHECKSUM


def test_channel_keys(layout: KeyLayout) -> None:
    """Channel state and lock keys have the double slash and Go's '{ID: n}' (with a space)."""
    assert layout.channel_state(42) == f"{M}//payment-channel/storage/{{ID: 42}}"
    assert layout.channel_lock(42) == f"{M}//payment-channel/lock/{{ID: 42}}"
    assert layout.channel_state_prefix() == f"{M}//payment-channel/storage/"
    assert layout.channel_state(42).startswith(layout.channel_state_prefix())
    big = 2**200
    assert layout.channel_state(big) == f"{M}//payment-channel/storage/{{ID: {big}}}"


def test_payment_keys(layout: KeyLayout) -> None:
    """Payments being claimed are '<id>/<nonce>' under the payment storage."""
    assert layout.payment(7, 3) == f"{M}//payment/storage/7/3"
    assert layout.payment(7, 3).startswith(layout.payment_prefix())
    assert layout.payment_prefix() == f"{M}//payment/storage/"


def test_free_call_keys(layout: KeyLayout) -> None:
    """Free-call user and lock keys are '{ID:addr/user/org/svc/group}' (no space) under P."""
    args = ("0xAbC", "user-1", "snet", "example", GROUP_B64)
    assert layout.free_call_user(*args) == f"{P}//free-call-user/storage/{{ID:0xAbC/user-1/snet/example/{GROUP_B64}}}"
    assert layout.free_call_lock(*args) == f"{P}//freecall/lock/{{ID:0xAbC/user-1/snet/example/{GROUP_B64}}}"


def test_prepaid_keys(layout: KeyLayout) -> None:
    """Prepaid used/planned/refund amounts are '{ID:<id>/U|P|R}' under M (Go: P), like the
    channel state: channel ids are per contract, and prepaid books are a channel's."""
    assert layout.prepaid(9, "U") == f"{M}//PrePaid/storage/{{ID:9/U}}"
    assert layout.prepaid(9, "P") == f"{M}//PrePaid/storage/{{ID:9/P}}"
    assert layout.prepaid(9, "R") == f"{M}//PrePaid/storage/{{ID:9/R}}"


def test_training_keys(layout: KeyLayout) -> None:
    """Training keys join org, service, group (and model or address) with '|'; addresses lower-cased."""
    assert layout.model("snet", "svc", "g", "m1") == f"{P}//model-user/modelStorage/{{ID:snet|svc|g|m1}}"
    user_models = layout.user_models("snet", "svc", "g", "0xAbC")
    assert user_models == f"{P}//model-user/userModelStorage/{{ID:snet|svc|g|0xabc}}"
    assert layout.pending_models("snet", "svc", "g") == f"{P}//model-user/pendingModelStorage/{{ID:snet|svc|g}}"
    assert layout.public_models("snet", "svc", "g") == f"{P}//model-user/publicModelStorage/{{ID:snet|svc|g}}"


def test_groups_and_networks_do_not_overlap() -> None:
    """Different groups or networks never share a prefix, so their state cannot mix."""
    a = KeyLayout("sepolia", "snet", GROUP_ID, MPE)
    b = KeyLayout("sepolia", "snet", bytes(32), MPE)
    c = KeyLayout("main", "snet", GROUP_ID, MPE)
    assert not a.channel_state(1).startswith(b.base + "/")
    assert not a.channel_state(1).startswith(c.base + "/")


def test_invalid_mpe_address_is_rejected() -> None:
    """An MPE address that is not 20 hex bytes is refused at construction."""
    with pytest.raises(ValueError):
        KeyLayout("sepolia", "snet", GROUP_ID, "0x1234")
