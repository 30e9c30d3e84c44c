"""``SNET_*`` environment variables, command-line overrides, and precedence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from snet_daemon.config import ConfigError, DaemonConfig, LoadedConfig, load_config
from snet_daemon.config.env import environment_keys

ADDRESS = "0x3Bb9b2499c283cec176e7C707Ecb495B7a961ebf"


def _env(environ: dict[str, str], **kwargs: Any) -> LoadedConfig:
    return load_config(None, environ=environ, **kwargs)


def _env_error(environ: dict[str, str], **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _env(environ, **kwargs)
    return info.value


def _file(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "snetd.config.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------
# Names.


def test_top_level_keys_use_go_variable_names() -> None:
    """`SNET_<KEY>` sets a top-level key, exactly as in the Go daemon."""
    config = _env({"SNET_SERVICE_ENDPOINT": "http://localhost:6000", "SNET_MAX_MESSAGE_SIZE_IN_MB": "16"}).config
    assert config.service_endpoint == "http://localhost:6000"
    assert config.max_message_size_in_mb == 16


def test_double_underscore_reaches_nested_keys() -> None:
    """`__` separates nesting levels: SNET_LOG__LEVEL, SNET_LOG__OUTPUT__TYPE, storage client keys."""
    config = _env(
        {
            "SNET_LOG__LEVEL": "debug",
            "SNET_LOG__OUTPUT__TYPE": "stdout",
            "SNET_LOG__FORMATTER__TYPE": "json",
            "SNET_PAYMENT_CHANNEL_STORAGE_CLIENT__ENDPOINTS": "http://etcd-1:2379,http://etcd-2:2379",
            "SNET_EXPERIMENTAL__TRAFFIC_SPLIT__GRPC": "7001",
        }
    ).config
    assert config.log.level == "debug"
    assert config.log.output.type == ("stdout",)
    assert config.log_settings.json is True
    assert config.payment_channel_storage_client.endpoints == ("http://etcd-1:2379", "http://etcd-2:2379")
    assert config.experimental.traffic_split.grpc == 7001


def test_unknown_snet_variables_are_ignored_silently() -> None:
    """Variables of snet-cli/snet-sdk and other SNET_* noise neither fail nor warn."""
    loaded = _env(
        {
            "SNET_PRIVATE_KEY": "not-a-key",
            "SNET_NETWORK": "sepolia",
            "SNET_CLI_CONFIG": "/home/u/.snet",
            "SNET_LOG__NOPE": "x",
            "SNET_LOG__MAIL__TYPE": "email",
            "SNET_DAEMON_ENDPOINT__PORT": "1",
            "SNET_": "x",
            "SNET___LOG": "x",
            "snet_daemon_endpoint": "lower-case names are not ours",
            "PATH": "/usr/bin",
        }
    )
    assert loaded.config == DaemonConfig()
    assert loaded.warnings == ()


def test_environment_keys_lists_only_known_keys() -> None:
    """Only variables that resolve to keys are reported, sorted by name."""
    found = list(environment_keys({"SNET_LOG__LEVEL": "x", "SNET_PRIVATE_KEY": "k", "SNET_LOG": "{}"}))
    assert [(name, path) for name, path, _ in found] == [
        ("SNET_LOG", ("log",)),
        ("SNET_LOG__LEVEL", ("log", "level")),
    ]


def test_os_environ_is_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no `environ` argument the process environment is read."""
    monkeypatch.setenv("SNET_SERVICE_ID", "from-os-environ")
    assert load_config(None).config.service_id == "from-os-environ"


def test_deprecated_alias_works_from_the_environment() -> None:
    """SNET_DAEMON_END_POINT sets daemon_endpoint with a warning naming the variable and both keys."""
    loaded = _env({"SNET_DAEMON_END_POINT": "0.0.0.0:7000"})
    assert loaded.config.daemon_endpoint == "0.0.0.0:7000"
    (warning,) = loaded.warnings
    assert "SNET_DAEMON_END_POINT" in warning
    assert "'daemon_end_point'" in warning
    assert "'daemon_endpoint'" in warning


def test_stale_key_from_the_environment_warns() -> None:
    """A README-only key set in the environment is ignored with a warning."""
    loaded = _env({"SNET_HDWALLET_MNEMONIC": "abandon abandon"})
    assert loaded.config == DaemonConfig()
    (warning,) = loaded.warnings
    assert "hdwallet_mnemonic" in warning
    assert "abandon" not in warning


# ---------------------------------------------------------------------------
# Coercion.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("false", False),
        ("1", True),
        ("0", False),
        ("yes", True),
        ("no", False),
        ("TRUE", True),
        ("False", False),
    ],
)
def test_boolean_strings(text: str, expected: bool) -> None:
    """Booleans accept true/false, 1/0 and yes/no, in any case."""
    config = _env({"SNET_PASSTHROUGH_ENABLED": text, "SNET_LOG__OUTPUT__TYPE": "stdout"}).config
    assert config.passthrough_enabled is expected


def test_integer_and_float_strings() -> None:
    """Integers and floats are parsed from their decimal strings."""
    config = _env({"SNET_IPFS_TIMEOUT": "45", "SNET_RATE_LIMIT_PER_MINUTE": "2.5", "SNET_BURST_SIZE": " 10 "}).config
    assert config.ipfs_timeout == 45
    assert config.rate_limit_per_minute == 2.5
    assert config.burst_size == 10


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://a.example.com,https://b.example.com", ("https://a.example.com", "https://b.example.com")),
        (
            " https://a.example.com , https://b.example.com ",
            ("https://a.example.com", "https://b.example.com"),
        ),
        (
            '["https://a.example.com", "https://b.example.com"]',
            ("https://a.example.com", "https://b.example.com"),
        ),
        ("*", ("*",)),
        ("[]", ()),
        (" ", ()),
    ],
)
def test_list_strings(text: str, expected: tuple[str, ...]) -> None:
    """Lists come from a JSON array or comma-separated items; `[]` (or blanks) is the empty list."""
    assert _env({"SNET_CORS_ALLOWED_ORIGINS": text}).config.cors_allowed_origins == expected


def test_empty_variables_are_ignored_like_viper(tmp_path: Path) -> None:
    """A set-but-empty SNET_* variable leaves the file's value (Viper's AllowEmptyEnv is off in Go)."""
    key = "0x" + "11" * 32
    path = _file(
        tmp_path,
        {
            "private_key_for_free_calls": key,
            "daemon_endpoint": "127.0.0.1:9000",
            "cors_allowed_origins": ["https://a.example.com"],
            "log": {"level": "debug"},
        },
    )
    environ = {
        "SNET_PRIVATE_KEY_FOR_FREE_CALLS": "",
        "SNET_DAEMON_ENDPOINT": "",
        "SNET_PASSTHROUGH_ENABLED": "",
        "SNET_CORS_ALLOWED_ORIGINS": "",
        "SNET_LOG": "",
        "SNET_FREE_CALLS_PER_ADDRESS": "",
    }
    loaded = load_config(path, environ=environ)
    config = loaded.config
    assert config.private_key_for_free_calls == key
    assert config.daemon_endpoint == "127.0.0.1:9000"
    assert config.passthrough_enabled is True
    assert config.cors_allowed_origins == ("https://a.example.com",)
    assert config.log.level == "debug"
    assert loaded.warnings == ()


def test_empty_override_is_not_ignored(tmp_path: Path) -> None:
    """An empty command-line override is explicit: it sets the empty list."""
    path = _file(tmp_path, {"cors_allowed_origins": ["https://a.example.com"]})
    assert load_config(path, environ={}, overrides={"cors_allowed_origins": ""}).config.cors_allowed_origins == ()


def test_map_strings_are_json_objects() -> None:
    """Maps come from a JSON object; map keys are lower-cased like file keys."""
    other = "0x" + "ab" * 20
    config = _env({"SNET_FREE_CALLS_PER_ADDRESS": json.dumps({ADDRESS: 5, other: "unlimited"})}).config
    assert config.free_calls_per_address == {ADDRESS.lower(): 5, other: -1}


def test_list_of_objects_from_json() -> None:
    """A list of sections (service_credentials) is given as a JSON array of objects."""
    value = json.dumps([{"key": "X-Api-Key", "value": "s3cret", "location": "header"}])
    config = _env({"SNET_SERVICE_CREDENTIALS": value}).config
    assert config.service_credentials[0].key == "X-Api-Key"
    assert config.upstream.service_credentials[0].value == "s3cret"


def test_whole_section_from_json_is_refined_by_nested_variables() -> None:
    """SNET_LOG holds a JSON object; SNET_LOG__LEVEL, more specific, wins over its `level`."""
    config = _env({"SNET_LOG": '{"level": "error", "formatter": {"type": "json"}}', "SNET_LOG__LEVEL": "debug"}).config
    assert config.log.level == "debug"
    assert config.log.formatter.type == "json"


def test_duration_from_the_environment() -> None:
    """Go durations are plain strings in the environment."""
    assert _env({"SNET_SERVICE_TIMEOUT": "1m30s"}).config.upstream.timeout == 90.0


# ---------------------------------------------------------------------------
# Bad values.


@pytest.mark.parametrize(
    ("name", "text", "key", "fragment"),
    [
        ("SNET_MAX_MESSAGE_SIZE_IN_MB", "lots", "max_message_size_in_mb", "'lots' is not a whole number"),
        ("SNET_MAX_MESSAGE_SIZE_IN_MB", "0", "max_message_size_in_mb", "'0' is out of range (1..2048)"),
        ("SNET_BLOCKCHAIN_ENABLED", "maybe", "blockchain_enabled", "'maybe' is not a boolean"),
        ("SNET_RATE_LIMIT_PER_MINUTE", "fast", "rate_limit_per_minute", "'fast' is not a number"),
        ("SNET_LOG__LEVEL", "loud", "log.level", "'loud' is not a log level"),
        ("SNET_SERVICE_TIMEOUT", "100", "service_timeout", "missing unit"),
        ("SNET_FREE_CALLS_PER_ADDRESS", "{bad", "free_calls_per_address", "is not a valid JSON object"),
        ("SNET_FREE_CALLS_PER_ADDRESS", "[1, 2]", "free_calls_per_address", "is not a JSON object"),
        ("SNET_CORS_ALLOWED_ORIGINS", "[oops", "cors_allowed_origins", "is not a valid JSON array"),
        ("SNET_CORS_ALLOWED_ORIGINS", "example.com", "cors_allowed_origins[0]", "'example.com' is not '*'"),
        ("SNET_SERVICE_CREDENTIALS", "key=value", "service_credentials[0]", "is not a mapping"),
        ("SNET_LOG", "debug", "log", "is not a valid JSON object"),
    ],
)
def test_bad_environment_value_names_variable_and_key(name: str, text: str, key: str, fragment: str) -> None:
    """A bad value is a ConfigError naming the variable, the key path and the value."""
    error = _env_error({name: text})
    message = str(error)
    assert f"configuration key '{key}' (from environment variable {name})" in message, message
    assert fragment in message, message
    assert error.path == key


@pytest.mark.parametrize(
    ("environ", "overrides", "fragment"),
    [
        # Bad JSON: the message would quote the raw text, secret and all.
        (
            {"SNET_SERVICE_CREDENTIALS": '[{"key":"api","value":"SUPERSECRET","location":"header"'},
            {},
            "is not a valid JSON array",
        ),
        # A JSON object where the list goes, from either source: one error, not one per comma-split piece.
        (
            {"SNET_SERVICE_CREDENTIALS": '{"key":"api","value":"SUPERSECRET","location":"header"}'},
            {},
            "is a JSON object, not a JSON array",
        ),
        (
            {},
            {"service_credentials": '{"key":"api","value":"SUPERSECRET","location":"header"}'},
            "is a JSON object, not a JSON array",
        ),
        # A section whose hook sections hold passwords.
        ({}, {"log": '{"hooks": ["m"], "m": {"type": "email", "password": "SUPERSECRET"'}, "is not a valid JSON"),
    ],
)
def test_bad_text_for_a_key_holding_secrets_is_masked(
    environ: dict[str, str], overrides: dict[str, str], fragment: str
) -> None:
    """Text that cannot become a value of a key holding secrets is shown as ``***``, never quoted."""
    error = _env_error(environ, overrides=overrides)
    message = str(error)
    assert len(error.problems) == 1, message
    assert "SUPERSECRET" not in message
    assert f"'***' {fragment}" in message, message
    assert error.value == "***"


def test_bad_secret_from_the_environment_is_masked() -> None:
    """An invalid private key from the environment is reported without its value."""
    error = _env_error({"SNET_PRIVATE_KEY_FOR_FREE_CALLS": "0xnot-a-key"})
    assert "SNET_PRIVATE_KEY_FOR_FREE_CALLS" in str(error)
    assert "not-a-key" not in str(error)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[" * 100_000, "JSON nested deeper than 200 levels"),
        (f'{{"{ADDRESS}": 1{"0" * 5000}}}', "4300 digits"),
    ],
)
def test_unusable_json_from_the_environment_is_a_config_error(text: str, fragment: str) -> None:
    """JSON too deep or with a number too long to read is a problem with the variable, not a crash."""
    error = _env_error({"SNET_FREE_CALLS_PER_ADDRESS": text})
    assert "SNET_FREE_CALLS_PER_ADDRESS" in str(error)
    assert fragment in str(error)
    assert "sys.set_int_max_str_digits" not in str(error)


def test_bad_environment_values_are_reported_together() -> None:
    """Problems from several variables and the file arrive in one error."""
    error = _env_error({"SNET_MAX_MESSAGE_SIZE_IN_MB": "x", "SNET_FREE_CALLS_PER_ADDRESS": "{", "SNET_LOG__LEVEL": "?"})
    assert len(error.problems) == 3


# ---------------------------------------------------------------------------
# Overrides (command-line flags).


def test_overrides_use_dotted_paths_and_env_coercion() -> None:
    """Overrides are strings by dotted path, coerced exactly like environment values."""
    config = _env(
        {},
        overrides={
            "log.level": "debug",
            "max_message_size_in_mb": "8",
            "blockchain_enabled": "no",
            "cors_allowed_origins": "https://a.example.com,https://b.example.com",
            "payment_channel_storage_client.endpoints": '["http://etcd:2379"]',
            "Daemon_Endpoint": "0.0.0.0:7000",
        },
    ).config
    assert config.log.level == "debug"
    assert config.max_message_size_in_mb == 8
    assert config.blockchain_enabled is False
    assert config.cors_allowed_origins == ("https://a.example.com", "https://b.example.com")
    assert config.payment_channel_storage_client.endpoints == ("http://etcd:2379",)
    assert config.daemon_endpoint == "0.0.0.0:7000"


def test_override_can_reach_a_hook_section() -> None:
    """A flag may set a key of a listed `log.<hook>` section (the environment cannot)."""
    config = _env(
        {},
        overrides={
            "log.hooks": "tg",
            "log.tg.type": "telegram_bot",
            "log.tg.levels": "fatal",
            "log.tg.telegram_api_key": "k",
        },
    ).config
    assert config.log.hook_sections["tg"].telegram_api_key == "k"


def test_unknown_override_is_an_error_with_suggestion() -> None:
    """Unlike an environment variable, an override naming no key is an error."""
    error = _env_error({}, overrides={"daemon_endpont": "0.0.0.0:7000", "log.levle": "debug"})
    message = str(error)
    assert "unknown configuration key 'daemon_endpont' (from command-line override 'daemon_endpont')" in message
    assert "(did you mean 'daemon_endpoint'?)" in message
    assert "'log.levle'" in message
    assert "(did you mean 'log.level'?)" in message


def test_bad_override_value_names_the_override() -> None:
    """A bad override value names the flag's key path and the value."""
    error = _env_error({}, overrides={"max_message_size_in_mb": "4096"})
    assert str(error) == (
        "configuration key 'max_message_size_in_mb' (from command-line override 'max_message_size_in_mb'): "
        "'4096' is out of range (1..2048)"
    )


# ---------------------------------------------------------------------------
# Precedence.


def test_precedence_overrides_then_environment_then_file_then_defaults(tmp_path: Path) -> None:
    """Each source beats the ones below it: overrides > environment > file > defaults."""
    path = _file(tmp_path, {"log": {"level": "warn"}, "service_id": "from-file"})
    environ = {"SNET_LOG__LEVEL": "error", "SNET_SERVICE_ID": "from-env"}
    overrides = {"log.level": "debug"}

    config = load_config(path, environ=environ, overrides=overrides).config
    assert (config.log.level, config.service_id) == ("debug", "from-env")
    config = load_config(path, environ=environ).config
    assert (config.log.level, config.service_id) == ("error", "from-env")
    config = load_config(path, environ={}).config
    assert (config.log.level, config.service_id) == ("warn", "from-file")
    config = load_config(None, environ={}).config
    assert (config.log.level, config.service_id) == ("info", "YOUR_SERVICE_ID")


def test_nested_override_keeps_sibling_keys_from_lower_sources(tmp_path: Path) -> None:
    """Setting one nested key from the environment keeps the file's other keys of that section."""
    path = _file(tmp_path, {"log": {"level": "warn", "formatter": {"type": "json"}, "timezone": "UTC"}})
    config = load_config(path, environ={"SNET_LOG__LEVEL": "error"}).config
    assert config.log.level == "error"
    assert config.log.formatter.type == "json"


def test_a_map_value_is_replaced_whole_by_a_higher_source(tmp_path: Path) -> None:
    """A map-valued key is one value, as a list is: ``{}`` empties the file's map, a new map replaces it."""
    other = "0x" + "ab" * 20
    path = _file(tmp_path, {"free_calls_per_address": {ADDRESS: 5}, "log": {"level": "warn"}})
    assert load_config(path, environ={"SNET_FREE_CALLS_PER_ADDRESS": "{}"}).config.free_calls_per_address == {}
    config = load_config(path, environ={"SNET_FREE_CALLS_PER_ADDRESS": json.dumps({other: 3})}).config
    assert config.free_calls_per_address == {other: 3}
    config = load_config(path, environ={}, overrides={"free_calls_per_address": ""}).config
    assert config.free_calls_per_address == {}
    # Sections still merge key by key.
    assert load_config(path, environ={"SNET_LOG": '{"timezone": "CET"}'}).config.log.level == "warn"


def test_hook_section_merges_key_by_key(tmp_path: Path) -> None:
    """A ``log.<hook>`` section is a section: a flag for one of its keys keeps the file's others."""
    hook = {"type": "email", "levels": ["error"], "host": "smtp.example.org"}
    path = _file(tmp_path, {"log": {"hooks": ["mail"], "mail": hook}})
    config = load_config(path, environ={}, overrides={"log.mail.password": "pw"}).config
    assert (config.log.hook_sections["mail"].host, config.log.hook_sections["mail"].password) == (
        "smtp.example.org",
        "pw",
    )


def test_alias_in_a_higher_source_beats_new_name_in_a_lower_one(tmp_path: Path) -> None:
    """Aliases are resolved per source, so precedence between sources still holds."""
    path = _file(tmp_path, {"daemon_endpoint": "127.0.0.1:7001"})
    config = load_config(path, environ={"SNET_DAEMON_END_POINT": "127.0.0.1:7002"}).config
    assert config.daemon_endpoint == "127.0.0.1:7002"


def test_environment_can_fix_an_invalid_file_value(tmp_path: Path) -> None:
    """Validation runs on the merged result, so a higher source can replace a bad value."""
    path = _file(tmp_path, {"max_message_size_in_mb": 0})
    assert load_config(path, environ={"SNET_MAX_MESSAGE_SIZE_IN_MB": "4"}).config.max_message_size_in_mb == 4


def test_storage_server_quirk_applies_to_the_file_only(tmp_path: Path) -> None:
    """An environment variable for a server key does not switch the embedded server on."""
    config = load_config(None, environ={"SNET_PAYMENT_CHANNEL_STORAGE_SERVER__DATA_DIR": "/var/etcd"}).config
    assert config.payment_channel_storage_server.enabled is False
    path = _file(tmp_path, {"payment_channel_storage_server": {"data_dir": "/var/etcd"}})
    environ = {"SNET_PAYMENT_CHANNEL_STORAGE_SERVER__ENABLED": "false"}
    assert load_config(path, environ=environ).config.payment_channel_storage_server.enabled is False
