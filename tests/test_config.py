"""Loading configuration files: formats, Go compatibility, keys and warnings.

Companion modules: ``test_config_env.py`` (environment and overrides),
``test_config_validation.py`` (every validation rule),
``test_config_sections.py`` (section views, durations) and
``test_config_render.py`` (rendering, documentation, examples).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from snet_daemon.config import (
    ConfigError,
    ConfigProblem,
    DaemonConfig,
    LoadedConfig,
    load_config,
    support,
)

DATA = Path(__file__).parent / "data" / "config"
FULL_JSON = DATA / "snetd.config.full.json"
FULL_YAML = DATA / "snetd.config.full.yaml"
MINIMAL_JSON = DATA / "snetd.config.minimal.json"
LEGACY_JSON = DATA / "snetd.config.legacy.json"


def _unimplemented(key: str) -> str:
    return f"configuration key '{key}' is recognised but not implemented yet; it has no effect"


def _write(tmp_path: Path, data: Any, name: str = "snetd.config.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def _load(tmp_path: Path, data: Any, **kwargs: Any) -> LoadedConfig:
    return load_config(_write(tmp_path, data), environ={}, **kwargs)


def _error(tmp_path: Path, data: Any, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, data, **kwargs)
    return info.value


# ---------------------------------------------------------------------------
# Go configuration files.


def test_go_full_config_loads_unchanged() -> None:
    """A file shaped like `snetd init-full` output (hook and storage sections included) loads."""
    loaded = load_config(str(FULL_JSON), environ={})
    config = loaded.config
    assert config.daemon_endpoint == "127.0.0.1:8080"
    assert config.service_endpoint == "http://localhost:5000"
    assert config.log.hooks == ("send-mail",)
    hook = config.log.hook_sections["send-mail"]
    assert (hook.type, hook.host, hook.port, hook.from_) == (
        "email",
        "smtp.gmail.com",
        587,
        "from-user@gmail.com",
    )
    assert hook.levels == ("error", "warn", "fatal", "panic")
    assert config.payment_channel_storage_server.enabled is False
    assert config.min_balance_for_free_call == "10"


def test_go_full_config_warns_only_about_non_default_unimplemented_keys() -> None:
    """Restating Go's defaults is silent; only the (unimplemented) hook list is flagged."""
    loaded = load_config(str(FULL_JSON), environ={})
    assert loaded.warnings == (_unimplemented("log.hooks"),)


def test_go_minimal_init_config_loads() -> None:
    """The `snetd init` file loads, including its integer `min_balance_for_free_call`."""
    config = load_config(str(MINIMAL_JSON), environ={}).config
    assert config.service_endpoint == "YOUR_SERVICE_ENDPOINT"
    assert config.min_balance_for_free_call == "10"
    assert config.log.output.type == ("file", "stdout")
    assert config.upstream.target == "YOUR_SERVICE_ENDPOINT:80"


def test_yaml_equivalent_loads_to_the_same_config() -> None:
    """The YAML twin of the Go JSON file (unquoted hex addresses included) gives an equal DaemonConfig."""
    from_json = load_config(str(FULL_JSON), environ={})
    from_yaml = load_config(str(FULL_YAML), environ={})
    assert from_yaml.config == from_json.config
    assert from_yaml.warnings == from_json.warnings


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".JSON", ".Yml"])
def test_format_is_chosen_by_extension(tmp_path: Path, suffix: str) -> None:
    """`.json`, `.yaml` and `.yml` are read, case-insensitively (JSON is valid YAML)."""
    path = tmp_path / f"snetd{suffix}"
    path.write_text('{"daemon_endpoint": "127.0.0.1:9999"}', encoding="utf-8")
    assert load_config(str(path), environ={}).config.daemon_endpoint == "127.0.0.1:9999"


def test_no_path_means_defaults() -> None:
    """Without a file the configuration is Go's defaults (plus ours), with no warnings."""
    loaded = load_config(None, environ={})
    assert loaded.config == DaemonConfig()
    assert loaded.warnings == ()
    assert loaded.config.daemon_endpoint == "127.0.0.1:8080"
    assert loaded.config.cors_allowed_origins == ("*",)
    assert loaded.config.service_metadata_uri == ""
    assert loaded.config.organization_metadata_uri == ""


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    """An empty YAML file is an empty mapping, not an error."""
    path = tmp_path / "snetd.yaml"
    path.write_text("# nothing yet\n", encoding="utf-8")
    assert load_config(str(path), environ={}).config == DaemonConfig()


def test_keys_are_case_insensitive(tmp_path: Path) -> None:
    """Mixed-case keys work at every level, as with Viper."""
    config = _load(tmp_path, {"Daemon_Endpoint": "127.0.0.1:9000", "LOG": {"Level": "debug"}}).config
    assert config.daemon_endpoint == "127.0.0.1:9000"
    assert config.log.level == "debug"


def test_service_credential_keys_are_case_insensitive(tmp_path: Path) -> None:
    """`Key`/`VALUE`/`Location` work in service_credentials items (Go: mapstructure ignores case);
    the keys of a JSON value are sent as written."""
    items = [
        {"Key": "x-api-key", "Value": "s3cret", "Location": "Header"},
        {"KEY": "data", "VALUE": {"Token": "t"}, "LOCATION": "body"},
    ]
    config = _load(tmp_path, {"service_credentials": items}).config
    first, second = config.service_credentials
    assert (first.key, first.value, first.location) == ("x-api-key", "s3cret", "header")
    assert (second.key, second.value, second.location) == ("data", {"Token": "t"}, "body")
    from_env = load_config(None, environ={"SNET_SERVICE_CREDENTIALS": json.dumps(items)}).config
    assert from_env.service_credentials == config.service_credentials


def test_service_credential_key_given_twice_is_reported_without_the_secret(tmp_path: Path) -> None:
    """`Key` and `key` in one item: the extra spelling is an unknown key; the item's value is not shown."""
    error = _error(tmp_path, {"service_credentials": [{"Key": "a", "key": "b", "value": "s3cret", "location": "body"}]})
    assert "unknown configuration key 'service_credentials[0].Key'" in str(error)
    assert "s3cret" not in str(error)


def test_null_means_default(tmp_path: Path) -> None:
    """A `null` value leaves the key at its default (Viper treats it as unset)."""
    config = _load(tmp_path, {"max_message_size_in_mb": None, "rate_limit_per_minute": None}).config
    assert config.max_message_size_in_mb == 4
    assert config.rate_limit_per_minute is None


def test_lenient_scalar_coercion_like_viper(tmp_path: Path) -> None:
    """Strings for numbers and bools, and numbers for strings, are accepted."""
    config = _load(
        tmp_path,
        {
            "max_message_size_in_mb": "16",
            "passthrough_enabled": "false",
            "blockchain_enabled": "true",
            "rate_limit_per_minute": "60",
            "organization_id": 1234,
        },
    ).config
    assert config.max_message_size_in_mb == 16
    assert config.passthrough_enabled is False
    assert config.blockchain_enabled is True
    assert config.rate_limit_per_minute == 60.0
    assert config.organization_id == "1234"


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    """A file saved with a UTF-8 byte-order mark loads."""
    path = tmp_path / "snetd.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"service_id": "svc"}')
    assert load_config(str(path), environ={}).config.service_id == "svc"


# ---------------------------------------------------------------------------
# File errors.


def test_missing_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """A file that does not exist gives a ConfigError naming it, with no key path."""
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing), environ={})
    assert str(missing) in str(info.value)
    assert "No such file" in str(info.value)
    assert info.value.path is None


def test_unreadable_path_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """A directory given as the file is a ConfigError naming it."""
    directory = tmp_path / "conf.json"
    directory.mkdir()
    with pytest.raises(ConfigError, match="cannot read configuration file") as info:
        load_config(str(directory), environ={})
    assert str(directory) in str(info.value)


@pytest.mark.parametrize("name", ["snetd.config.toml", "snetd.conf", "snetd"])
def test_unsupported_extension_is_an_error(tmp_path: Path, name: str) -> None:
    """Extensions other than .json/.yaml/.yml are refused with the list of supported ones."""
    path = tmp_path / name
    path.write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    message = str(info.value)
    assert str(path) in message
    assert ".json, .yaml or .yml" in message


def test_json_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    """A JSON syntax error reports the file, line and column."""
    path = tmp_path / "snetd.json"
    path.write_text('{\n  "service_id": "a",\n  "daemon_type" "grpc"\n}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message
    assert "column" in message


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    """A YAML syntax error reports the file and line."""
    path = tmp_path / "snetd.yaml"
    path.write_text("service_id: a\nlog:\n  level: [info\n  timezone: UTC\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    message = str(info.value)
    assert str(path) in message
    assert "line 4" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    """A file holding a list is refused with a clear message."""
    with pytest.raises(ConfigError, match="must hold a mapping") as info:
        _load(tmp_path, ["daemon_endpoint"])
    assert "list" in str(info.value)


def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 give a ConfigError naming the file."""
    path = tmp_path / "snetd.json"
    path.write_bytes(b'{"service_id": "\xff"}')
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(str(path), environ={})
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("big.json", '{"ipfs_timeout": 1' + "0" * 5000 + "}", "4300 digits"),
        ("big.yaml", "ipfs_timeout: 1" + "0" * 5000 + "\n", "4300 digits"),
        ("deep.json", '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 200 levels"),
        ("deep.yaml", "x: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than 200 levels"),
        ("self.yaml", "log: &a {formatter: *a}\n", "a value contains itself"),
        ("selflist.yaml", "service_credentials: &a [*a]\n", "a value contains itself"),
    ],
)
def test_unreadable_values_are_an_error_naming_the_file(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    """Parsable text that cannot become configuration is a ConfigError naming the file, not a crash."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    message = str(info.value)
    assert message.startswith(f"cannot read configuration file '{path}': "), message
    assert fragment in message, message
    assert "sys.set_int_max_str_digits" not in message


def test_values_shared_through_yaml_aliases_load(tmp_path: Path) -> None:
    """An anchor used many times is no self-reference, and is measured once, not once per use."""
    path = tmp_path / "shared.yaml"
    aliases = "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 60))
    path.write_text("levels: &a0 [error]\n" + aliases, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    message = str(info.value)
    assert "cannot read" not in message
    assert "unknown configuration key 'a59'" in message


# ---------------------------------------------------------------------------
# Unknown, stale and deprecated keys.


def test_unknown_top_level_key_suggests_the_closest_key(tmp_path: Path) -> None:
    """A misspelt top-level key is an error with a difflib suggestion."""
    error = _error(tmp_path, {"daemon_endpont": "127.0.0.1:8080"})
    assert str(error) == "unknown configuration key 'daemon_endpont' (did you mean 'daemon_endpoint'?)"
    assert error.path == "daemon_endpont"


def test_unknown_nested_key_suggests_the_closest_key(tmp_path: Path) -> None:
    """A misspelt key inside a section is reported with its full path and a suggestion."""
    error = _error(tmp_path, {"log": {"formater": {"type": "json"}}})
    assert "unknown configuration key 'log.formater' (did you mean 'log.formatter'?)" in str(error)
    error = _error(tmp_path, {"payment_channel_storage_client": {"endpionts": []}})
    assert "'payment_channel_storage_client.endpionts' (did you mean 'payment_channel_storage_client.endpoints'?)" in (
        str(error)
    )


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path: Path) -> None:
    """Nothing is suggested when no known key is similar."""
    error = _error(tmp_path, {"zzzz": 1})
    assert str(error) == "unknown configuration key 'zzzz'"


def test_unknown_key_in_list_item_names_the_index(tmp_path: Path) -> None:
    """Unknown keys inside list items carry the item index in the path."""
    error = _error(tmp_path, {"service_credentials": [{"key": "k", "location": "header", "valeu": "v"}]})
    assert (
        "unknown configuration key 'service_credentials[0].valeu' (did you mean 'service_credentials[0].value'?)"
        in (str(error))
    )


def test_unknown_key_in_hook_section_suggests(tmp_path: Path) -> None:
    """A misspelt key inside a `log.<hook>` section is reported under the hook's path."""
    hook = {"type": "email", "levels": ["error"], "hots": "smtp.example.org"}
    error = _error(tmp_path, {"log": {"hooks": ["mail"], "mail": hook}})
    assert "unknown configuration key 'log.mail.hots' (did you mean 'log.mail.host'?)" in str(error)


def test_unlisted_hook_section_is_unknown(tmp_path: Path) -> None:
    """A `log.<name>` section not listed in `log.hooks` is an unknown key, with a hint."""
    error = _error(tmp_path, {"log": {"tg": {"type": "telegram_bot", "levels": ["fatal"]}}})
    assert "unknown configuration key 'log.tg'" in str(error)
    assert "must be listed in 'log.hooks'" in str(error)


def test_hook_names_are_case_insensitive(tmp_path: Path) -> None:
    """`log.hooks` entries match their sections case-insensitively."""
    hook = {"type": "telegram_bot", "levels": "fatal,panic", "telegram_api_key": "k", "telegram_chat_id": -42}
    config = _load(tmp_path, {"log": {"hooks": ["TG"], "Tg": hook}}).config
    assert config.log.hooks == ("tg",)
    assert config.log.hook_sections["tg"].telegram_chat_id == -42
    assert config.log.hook_sections["tg"].levels == ("fatal", "panic")


@pytest.mark.parametrize(
    "key",
    [
        "is_curation_in_progress",
        "curation_address_for_validation",
        "hdwallet_index",
        "hdwallet_mnemonic",
        "monitoring_enabled",
        "monitoring_svc_end_point",
    ],
)
def test_stale_readme_keys_are_accepted_with_a_warning(tmp_path: Path, key: str) -> None:
    """Keys the Go README lists but Go never read are ignored with one warning naming them."""
    loaded = _load(tmp_path, {key: "x"})
    assert loaded.config == DaemonConfig()
    assert len(loaded.warnings) == 1
    assert f"'{key}'" in loaded.warnings[0]
    assert "ignored" in loaded.warnings[0]


@pytest.mark.parametrize(
    ("old", "new", "value"),
    [
        ("daemon_end_point", "daemon_endpoint", "127.0.0.1:7001"),
        ("ipfs_end_point", "ipfs_endpoint", "http://ipfs.example.org:5001"),
        ("passthrough_endpoint", "service_endpoint", "http://localhost:5005"),
        ("metering_end_point", "metering_endpoint", "https://metering.example.org"),
        ("heartbeat_svc_end_point", "heartbeat_endpoint", "http://localhost:5000/health"),
        ("notification_svc_end_point", "notification_endpoint", "https://notify.example.org"),
        ("pvt_key_for_metering", "private_key_for_metering", "11" * 32),
        ("pvt_key_for_free_calls", "private_key_for_free_calls", "0x" + "22" * 32),
    ],
)
def test_deprecated_alias_is_copied_with_a_warning(tmp_path: Path, old: str, new: str, value: str) -> None:
    """Each deprecated Go key sets its new key, and the warning names both."""
    loaded = _load(tmp_path, {old: value})
    assert getattr(loaded.config, new) == value
    alias_warnings = [warning for warning in loaded.warnings if "deprecated" in warning]
    assert len(alias_warnings) == 1
    assert f"'{old}'" in alias_warnings[0]
    assert f"'{new}'" in alias_warnings[0]


def test_new_key_wins_over_its_deprecated_alias(tmp_path: Path) -> None:
    """With both spellings set, the new key wins and the warning says the old one was ignored."""
    loaded = _load(tmp_path, {"daemon_end_point": "127.0.0.1:7001", "daemon_endpoint": "127.0.0.1:7002"})
    assert loaded.config.daemon_endpoint == "127.0.0.1:7002"
    (warning,) = loaded.warnings
    assert "'daemon_end_point'" in warning
    assert "'daemon_endpoint'" in warning
    assert "ignored" in warning


def test_legacy_go_file_loads_with_alias_and_stale_warnings() -> None:
    """A pre-5.2 style file (old names, README keys, mixed case) loads with one warning per issue."""
    loaded = load_config(str(LEGACY_JSON), environ={})
    config = loaded.config
    assert config.daemon_endpoint == "0.0.0.0:7000"
    assert config.service_endpoint == "http://localhost:5001"
    assert config.ipfs_endpoint == "http://ipfs.example.org:5001"
    text = "\n".join(loaded.warnings)
    for key in ("daemon_end_point", "passthrough_endpoint", "ipfs_end_point", "pvt_key_for_free_calls"):
        assert f"'{key}' is deprecated" in text
    for key in ("hdwallet_index", "hdwallet_mnemonic", "is_curation_in_progress", "monitoring_svc_end_point"):
        assert f"'{key}' is ignored" in text
    # The mnemonic itself must never be echoed.
    assert "word word" not in text


# ---------------------------------------------------------------------------
# Go quirks kept on purpose.


def test_storage_server_section_without_enabled_means_enabled(tmp_path: Path) -> None:
    """Go quirk: a `payment_channel_storage_server` section without `enabled` enables the server."""
    config = _load(tmp_path, {"payment_channel_storage_server": {"data_dir": "/tmp/etcd"}}).config
    assert config.payment_channel_storage_server.enabled is True


def test_storage_server_enabled_false_is_respected(tmp_path: Path) -> None:
    """An explicit `enabled: false` keeps the embedded server off."""
    config = _load(tmp_path, {"payment_channel_storage_server": {"enabled": False}}).config
    assert config.payment_channel_storage_server.enabled is False


def test_storage_server_is_disabled_without_the_section(tmp_path: Path) -> None:
    """Without the section the embedded server is off (the default)."""
    assert _load(tmp_path, {"service_id": "x"}).config.payment_channel_storage_server.enabled is False


@pytest.mark.parametrize("storage_type", ["etcd", "memory", "in-memory", "anything"])
def test_any_storage_type_is_accepted(tmp_path: Path, storage_type: str) -> None:
    """Any `payment_channel_storage_type` string is accepted (non-etcd means in-memory, as in Go)."""
    config = _load(tmp_path, {"payment_channel_storage_type": storage_type}).config
    assert config.payment_channel_storage_type == storage_type


# ---------------------------------------------------------------------------
# Not-implemented warnings.


def test_unimplemented_key_set_away_from_default_warns_once(tmp_path: Path) -> None:
    """A recognised but unimplemented key set to a non-default value gives exactly one warning."""
    loaded = load_config(
        _write(tmp_path, {"rate_limit_per_minute": 60}),
        environ={"SNET_RATE_LIMIT_PER_MINUTE": "30"},
        overrides={"rate_limit_per_minute": "20"},
    )
    assert loaded.warnings == (_unimplemented("rate_limit_per_minute"),)


def test_unimplemented_nested_key_is_named_by_its_path(tmp_path: Path) -> None:
    """Nested unimplemented keys are named by their dotted path."""
    loaded = _load(tmp_path, {"log": {"output": {"type": "stdout"}, "timezone": "Europe/Berlin"}})
    assert loaded.warnings == (_unimplemented("log.output.type"), _unimplemented("log.timezone"))


def test_unimplemented_key_at_its_default_does_not_warn(tmp_path: Path) -> None:
    """Restating a default (even spelt differently) is silent."""
    loaded = _load(
        tmp_path,
        {
            "ipfs_timeout": "30",
            "payment_channel_storage_client": {"connection_timeout": "0", "request_timeout": "0ms"},
            "payment_channel_storage_server": {"enabled": False, "startup_timeout": "60s"},
            "log": {"output": {"type": ["file", "stdout"]}},
        },
    )
    assert loaded.warnings == ()


def test_implemented_keys_never_warn(tmp_path: Path) -> None:
    """Implemented keys set to non-default values are silent."""
    loaded = _load(
        tmp_path,
        {
            "blockchain_enabled": False,
            "blockchain_network_selected": "main",
            "daemon_endpoint": "0.0.0.0:7000",
            "daemon_type": "http",
            "daemon_group_name": "g",
            "organization_id": "o",
            "service_id": "s",
            "service_endpoint": "grpc://localhost:5001",
            "passthrough_enabled": False,
            "service_timeout": "5s",
            "max_message_size_in_mb": 8,
            "payment_channel_storage_type": "memory",
            "service_heartbeat_type": "http",
            "heartbeat_endpoint": "http://localhost:5001/health",
            "log": {"level": "debug", "formatter": {"type": "json"}},
            "cors_allowed_origins": ["https://example.com"],
        },
    )
    assert loaded.warnings == ()


def test_each_unimplemented_key_warns_separately(tmp_path: Path) -> None:
    """Several unimplemented keys give one warning each, sorted by key."""
    loaded = _load(tmp_path, {"ssl_cert": "c.pem", "ssl_key": "k.pem", "burst_size": 5})
    assert loaded.warnings == (
        _unimplemented("burst_size"),
        _unimplemented("ssl_cert"),
        _unimplemented("ssl_key"),
    )


def test_adding_a_key_to_implemented_keys_silences_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Implementing a feature only needs its key added to IMPLEMENTED_KEYS."""
    monkeypatch.setattr(support, "IMPLEMENTED_KEYS", support.IMPLEMENTED_KEYS | {"burst_size"})
    assert _load(tmp_path, {"burst_size": 5}).warnings == ()


def test_implemented_keys_are_real_keys() -> None:
    """Every name in IMPLEMENTED_KEYS is a documented key path."""
    from snet_daemon.config.keys import documented_keys

    paths = {doc.path for doc in documented_keys()}
    assert paths >= support.IMPLEMENTED_KEYS
    assert set(support.DEPRECATED_ALIASES.values()) <= paths


# ---------------------------------------------------------------------------
# ConfigError.


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    """All problems of one load are listed in a single ConfigError."""
    error = _error(
        tmp_path,
        {"daemon_type": "rest", "max_message_size_in_mb": 0, "log": {"level": "loud"}, "daemon_endpont": "x"},
    )
    message = str(error)
    assert message.startswith("4 configuration problems:")
    assert len(error.problems) == 4
    for fragment in ("'daemon_type'", "'max_message_size_in_mb': 0", "'log.level'", "'daemon_endpont'"):
        assert fragment in message
    assert all(isinstance(problem, ConfigProblem) for problem in error.problems)


def test_single_problem_message_is_one_line(tmp_path: Path) -> None:
    """One problem gives a one-line message with the path and value attributes set."""
    error = _error(tmp_path, {"max_message_size_in_mb": 0})
    assert str(error) == "configuration key 'max_message_size_in_mb': 0 is out of range (1..2048)"
    assert error.path == "max_message_size_in_mb"
    assert error.value == 0


def test_pydantic_wording_never_leaks(tmp_path: Path) -> None:
    """Messages are ours: no pydantic error URLs or 'Input should be' phrasing."""
    error = _error(
        tmp_path,
        {
            "max_message_size_in_mb": "lots",
            "passthrough_enabled": "maybe",
            "log": "loud",
            "allowed_user_addresses": 5,
            "free_calls_per_address": [],
            "service_credentials": [{"value": "v"}],
        },
    )
    message = str(error)
    assert "pydantic" not in message
    assert "Input should" not in message
    assert "'max_message_size_in_mb': 'lots' is not a whole number" in message
    assert "'passthrough_enabled': 'maybe' is not a boolean" in message
    # Not quoted: what stands where the log section goes may hold a hook's password.
    assert "'log': '***' is not a mapping" in message
    assert "'allowed_user_addresses': 5 is not a list" in message
    assert "'free_calls_per_address': [] is not a mapping" in message
    assert "'service_credentials[0].key' is required" in message
    assert "'service_credentials[0].location' is required" in message


def test_config_error_can_be_raised_with_a_message() -> None:
    """ConfigError built from a message exposes it as its only problem."""
    error = ConfigError("configuration key 'x': 1 is bad", path="x", value=1)
    assert str(error) == "configuration key 'x': 1 is bad"
    assert (error.path, error.value) == ("x", 1)
    assert len(error.problems) == 1


def test_daemon_config_is_frozen() -> None:
    """The configuration cannot be modified after loading."""
    config = DaemonConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.daemon_endpoint = "0.0.0.0:1"  # type: ignore[misc]
    with pytest.raises(ValueError, match="frozen"):
        config.log.level = "debug"  # type: ignore[misc]
