"""render_effective_config, and the documentation and example files kept in sync with the models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from snet_daemon.config import DaemonConfig, load_config, render_effective_config
from snet_daemon.config.keys import documented_keys
from snet_daemon.config.render import mask_url_password, render_key_reference

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs" / "configuration.md"
EXAMPLE_JSON = ROOT / "etc" / "snetd.config.example.json"
EXAMPLE_YAML = ROOT / "etc" / "snetd.config.example.yaml"
FULL_JSON = Path(__file__).parent / "data" / "config" / "snetd.config.full.json"

ADDRESS = "0x3Bb9b2499c283cec176e7C707Ecb495B7a961ebf"
FREE_CALL_KEY = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
METERING_KEY = "0x" + "7e" * 32

SECRETS = {
    "private_key_for_free_calls": FREE_CALL_KEY,
    "private_key_for_metering": METERING_KEY,
    "token_secret_key": "a-token-secret-that-is-long-enough-0123456789",
    "blockchain_provider_api_key": "provider-api-key-0123",
}


def _secret_config(tmp_path: Path) -> DaemonConfig:
    data: dict[str, Any] = {
        **SECRETS,
        "metering_enabled": True,
        "metering_endpoint": "https://metering.example.org",
        "ethereum_json_rpc_http_endpoint": "https://rpcuser:rpc-password-1@rpc.example.org/v3",
        "payment_channel_storage_client": {"endpoints": ["https://etcd:etcd-password-2@etcd.example.org:2379"]},
        "service_credentials": [
            {"key": "X-Api-Key", "value": "credential-value-3", "location": "header"},
            {"key": "auth", "value": {"token": "credential-value-4"}, "location": "body"},
        ],
        "free_calls_per_address": {ADDRESS: "unlimited"},
        "log": {
            "hooks": ["mail", "tg"],
            "mail": {
                "type": "email",
                "levels": ["error"],
                "host": "smtp.example.org",
                "password": "hook-password-5",
            },
            "tg": {"type": "telegram_bot", "levels": ["fatal"], "telegram_api_key": "hook-api-key-6"},
        },
    }
    path = tmp_path / "snetd.config.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return load_config(str(path), environ={}).config


def _leaf_paths(tree: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "free_calls_per_address":
            paths |= _leaf_paths(value, f"{prefix}{key}.")
        else:
            paths.add(f"{prefix}{key}")
    return paths


def test_render_is_json_with_every_key() -> None:
    """The rendering is valid JSON holding every documented key under its Go name."""
    rendered = json.loads(render_effective_config(DaemonConfig()))
    documented = {doc.path for doc in documented_keys() if "<hook>" not in doc.path}
    assert _leaf_paths(rendered) == documented


def test_render_masks_every_secret(tmp_path: Path) -> None:
    """Private keys, token secret, API key, credential values, hook secrets and URL passwords are masked."""
    text = render_effective_config(_secret_config(tmp_path))
    for secret in [
        *SECRETS.values(),
        "rpc-password-1",
        "etcd-password-2",
        "credential-value-3",
        "credential-value-4",
        "hook-password-5",
        "hook-api-key-6",
    ]:
        assert secret not in text
    rendered = json.loads(text)
    for key in SECRETS:
        assert rendered[key] == "***"
    assert [item["value"] for item in rendered["service_credentials"]] == ["***", "***"]
    assert rendered["service_credentials"][0]["key"] == "X-Api-Key"
    assert rendered["log"]["mail"]["password"] == "***"
    assert rendered["log"]["tg"]["telegram_api_key"] == "***"
    assert rendered["ethereum_json_rpc_http_endpoint"] == "https://rpcuser:***@rpc.example.org/v3"
    assert rendered["payment_channel_storage_client"]["endpoints"] == ["https://etcd:***@etcd.example.org:2379"]


def test_render_uses_go_shapes(tmp_path: Path) -> None:
    """Hook sections sit under `log.<name>`, `from` keeps its name and unlimited free calls read 'unlimited'."""
    rendered = json.loads(render_effective_config(_secret_config(tmp_path)))
    assert rendered["log"]["hooks"] == ["mail", "tg"]
    assert rendered["log"]["mail"]["host"] == "smtp.example.org"
    assert "from" in rendered["log"]["mail"]
    assert rendered["free_calls_per_address"] == {ADDRESS.lower(): "unlimited"}
    assert not any(key.startswith("<") for key in rendered["log"])


def test_render_leaves_empty_secrets_visible() -> None:
    """An unset secret renders as an empty string, so operators can see it is unset."""
    rendered = json.loads(render_effective_config(DaemonConfig()))
    assert rendered["private_key_for_free_calls"] == ""
    assert rendered["token_secret_key"] == "***"


def test_render_of_go_file_round_trips_without_secrets() -> None:
    """Loading a rendering (with its masked hook password restored) gives the same configuration."""
    config = load_config(str(FULL_JSON), environ={}).config
    rendered = json.loads(render_effective_config(config))
    rendered["token_secret_key"] = config.token_secret_key
    rendered["log"]["send-mail"]["password"] = config.log.hook_sections["send-mail"].password
    assert DaemonConfig.model_validate(rendered) == config


def test_mask_url_password_leaves_other_strings_alone() -> None:
    """Only a URL's password is replaced; user names, hosts and plain strings are kept."""
    assert mask_url_password("https://u:p@h:1/x?y") == "https://u:***@h:1/x?y"
    assert mask_url_password("https://u@h/x") == "https://u@h/x"
    assert mask_url_password("user@example.org") == "user@example.org"
    assert mask_url_password("http://[::1") == "http://[::1"


def test_docs_key_reference_matches_the_models() -> None:
    """docs/configuration.md carries the key table generated from the models, unchanged."""
    text = DOCS.read_text(encoding="utf-8")
    begin = text.index("<!-- BEGIN KEY REFERENCE")
    start = text.index("\n", begin) + 1
    end = text.index("<!-- END KEY REFERENCE -->")
    assert text[start:end].strip() == render_key_reference(), (
        "regenerate the table with snet_daemon.config.render.render_key_reference()"
    )


def test_docs_describe_environment_names_and_precedence() -> None:
    """The documentation explains precedence and the `__` environment naming."""
    text = DOCS.read_text(encoding="utf-8")
    assert "SNET_LOG__LEVEL" in text
    assert "Sources and precedence" in text


def test_example_files_load_and_agree() -> None:
    """The JSON and YAML examples in etc/ load without errors and describe the same configuration."""
    from_json = load_config(str(EXAMPLE_JSON), environ={})
    from_yaml = load_config(str(EXAMPLE_YAML), environ={})
    assert from_json.config == from_yaml.config
    assert from_json.config.listen.port == 7000
    assert from_json.config.blockchain_network_selected == "main"


def test_example_files_ask_for_nothing_that_is_ignored() -> None:
    """The examples set no key the daemon warns it ignores (such as log files): what they say happens.
    Their logs go to stdout, the journal under etc/snetd.service, and so does the embedded etcd's."""
    for path in (EXAMPLE_JSON, EXAMPLE_YAML):
        loaded = load_config(str(path), environ={})
        assert not loaded.warnings, path
        assert loaded.config.payment_channel_storage_server.log_outputs == ("stderr",)
