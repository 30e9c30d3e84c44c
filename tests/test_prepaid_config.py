"""The configuration of free calls and prepaid tokens: secrets, balances, wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snet_daemon.config import ConfigError, DaemonConfig, load_config
from snet_daemon.config.model import GO_DEFAULT_TOKEN_SECRET
from snet_daemon.payments import signatures as sig
from snet_daemon.tap import _free_call_settings, _token_settings, check_token_secret
from tests.support.daemon import run_twistd

KEY = "0x" + "4c" * 32


def _load(tmp_path: Path, config: dict[str, object]) -> DaemonConfig:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    return load_config(str(path)).config


def test_go_default_secret_is_refused_with_the_blockchain(tmp_path: Path) -> None:
    """Go's published token_secret_key stops a daemon that takes payments."""
    config = _load(tmp_path, {"blockchain_enabled": True})
    with pytest.raises(ConfigError) as info:
        check_token_secret(config)
    assert info.value.path == "token_secret_key"
    assert "published default" in str(info.value)
    assert GO_DEFAULT_TOKEN_SECRET not in str(info.value)


def test_go_default_secret_is_fine_without_the_blockchain(tmp_path: Path) -> None:
    """No payments, no prepaid tokens: the default does not matter."""
    check_token_secret(_load(tmp_path, {"blockchain_enabled": False}))


def test_own_secret_is_accepted_and_short_ones_are_not(tmp_path: Path) -> None:
    """A secret of 32 bytes or more passes; a shorter one is a validation error."""
    check_token_secret(_load(tmp_path, {"token_secret_key": "k" * 32}))
    with pytest.raises(ConfigError, match="at least 32"):
        _load(tmp_path, {"token_secret_key": "k" * 31})


def test_check_config_refuses_the_go_default(tmp_path: Path) -> None:
    """twistd snetd --check-config exits 1 and names the key."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"blockchain_enabled": True}))
    result = run_twistd(["snetd", f"--config={path}", "--check-config"], tmp_path)
    assert result.returncode == 1
    assert "token_secret_key" in result.stderr
    assert "published default" in result.stderr


@pytest.mark.parametrize("value", ["ten", "1.5", "-1"])
def test_min_balance_must_be_whole_tokens(tmp_path: Path, value: str) -> None:
    """min_balance_for_free_call is a whole number of tokens."""
    with pytest.raises(ConfigError, match="min_balance_for_free_call"):
        _load(tmp_path, {"blockchain_enabled": False, "min_balance_for_free_call": value})


def test_settings_handed_to_the_payment_code(tmp_path: Path) -> None:
    """The free-call and token keys arrive parsed: bytes, addresses, whole tokens, -1 for unlimited."""
    trusted = "0x3Bb9b2499c283cec176e7C707Ecb495B7a961ebf"
    config = _load(
        tmp_path,
        {
            "blockchain_enabled": False,
            "private_key_for_free_calls": KEY,
            "trusted_free_call_signers": [trusted],
            "min_balance_for_free_call": 3,
            "free_calls_per_address": {trusted.lower(): "unlimited", "0x" + "11" * 20: 5},
            "token_secret_key": "s" * 40,
            "token_expiry_in_minutes": 30,
        },
    )
    free = _free_call_settings(config)
    assert free.signer_key == bytes.fromhex("4c" * 32)
    assert free.trusted_signers == frozenset({sig.address_bytes(trusted)})
    assert free.min_balance == 3
    assert free.per_address == {sig.address_bytes(trusted): -1, bytes.fromhex("11" * 20): 5}
    assert "4c4c" not in repr(free)
    tokens = _token_settings(config)
    assert (tokens.secret, tokens.expiry_minutes) == (b"s" * 40, 30)


def test_example_placeholder_secret_is_refused(tmp_path: Path) -> None:
    """The example configuration's CHANGE-ME secret cannot go live: --check-config fails on it."""
    example = Path(__file__).resolve().parents[1] / "etc" / "snetd.config.example.json"
    result = run_twistd(["snetd", f"--config={example}", "--check-config"], tmp_path)
    assert result.returncode == 1
    assert "token_secret_key" in result.stderr
    assert "placeholder" in result.stderr
    assert "CHANGE-ME" not in result.stderr  # the secret itself is never printed
