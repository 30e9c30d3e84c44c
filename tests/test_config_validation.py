"""Every validation rule: each failure names the key path and the bad value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from snet_daemon.config import ConfigError, DaemonConfig, load_config

ADDRESS = "0x3Bb9b2499c283cec176e7C707Ecb495B7a961ebf"
PRIVATE_KEY = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"


def _load(tmp_path: Path, data: dict[str, Any]) -> DaemonConfig:
    path = tmp_path / "snetd.config.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return load_config(str(path), environ={}).config


def _error(tmp_path: Path, data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, data)
    return info.value


# Each case: (file content, key path, fragments the message must contain).
# The value fragment is how the message quotes the value: strings as 'text',
# everything else as JSON.
INVALID: list[tuple[dict[str, Any], str, tuple[str, ...]]] = [
    ({"daemon_type": "rest"}, "daemon_type", ("'rest'", "'grpc', 'http'")),
    ({"daemon_endpoint": "localhost"}, "daemon_endpoint", ("'localhost'", "host:port")),
    ({"daemon_endpoint": "localhost:99999"}, "daemon_endpoint", ("'localhost:99999'", "port")),
    ({"daemon_endpoint": "localhost:http"}, "daemon_endpoint", ("'localhost:http'", "port")),
    ({"daemon_endpoint": "::1:8080"}, "daemon_endpoint", ("'::1:8080'", "IPv6")),
    (
        {"daemon_endpoint": "127.0.0.1:5000", "service_endpoint": "http://127.0.0.1:5000"},
        "daemon_endpoint",
        ("'127.0.0.1:5000'", "'service_endpoint'", "http://127.0.0.1:5000"),
    ),
    (
        {"daemon_endpoint": "0.0.0.0:5000", "service_endpoint": "http://localhost:5000"},
        "daemon_endpoint",
        ("'0.0.0.0:5000'", "must differ"),
    ),
    (
        {"daemon_endpoint": "0.0.0.0:5000", "service_endpoint": "127.0.0.1:5000"},
        "daemon_endpoint",
        ("'0.0.0.0:5000'", "must differ"),
    ),
    (
        {"daemon_endpoint": "localhost:80", "service_endpoint": "http://localhost"},
        "daemon_endpoint",
        ("'localhost:80'", "must differ"),
    ),
    ({"service_endpoint": "http://"}, "service_endpoint", ("'http://'", "no host")),
    ({"service_endpoint": ""}, "service_endpoint", ("''", "no host")),
    ({"service_endpoint": "ftp://files:21"}, "service_endpoint", ("'ftp://files:21'", "scheme")),
    ({"service_endpoint": "http://h:70000"}, "service_endpoint", ("'http://h:70000'", "port")),
    ({"max_message_size_in_mb": 0}, "max_message_size_in_mb", ("0", "out of range (1..2048)")),
    ({"max_message_size_in_mb": 2049}, "max_message_size_in_mb", ("2049", "out of range (1..2048)")),
    ({"max_message_size_in_mb": -4}, "max_message_size_in_mb", ("-4", "out of range")),
    ({"ssl_cert": "/etc/cert.pem"}, "ssl_key", ("''", "'ssl_cert'", "both")),
    ({"ssl_key": "/etc/key.pem"}, "ssl_key", ("'/etc/key.pem'", "'ssl_cert' is empty")),
    ({"service_timeout": "10 seconds"}, "service_timeout", ("'10 seconds'", "Go duration")),
    ({"service_timeout": "30"}, "service_timeout", ("'30'", "missing unit", "nanoseconds")),
    ({"service_timeout": 30}, "service_timeout", ("'30'", "missing unit")),
    ({"service_timeout": "1d"}, "service_timeout", ("'1d'", "unknown unit")),
    ({"service_timeout": "-5s"}, "service_timeout", ("'-5s'", "negative")),
    (
        {"payment_channel_storage_client": {"connection_timeout": "5 s"}},
        "payment_channel_storage_client.connection_timeout",
        ("'5 s'", "Go duration"),
    ),
    (
        {"payment_channel_storage_client": {"request_timeout": "soon"}},
        "payment_channel_storage_client.request_timeout",
        ("'soon'",),
    ),
    (
        {"payment_channel_storage_server": {"startup_timeout": "1m30"}},
        "payment_channel_storage_server.startup_timeout",
        ("'1m30'", "missing unit"),
    ),
    ({"log": {"level": "loud"}}, "log.level", ("'loud'", "debug, info, warn, warning, error, fatal, panic")),
    ({"log": {"formatter": {"type": "xml"}}}, "log.formatter.type", ("'xml'", "'text', 'json'")),
    (
        {"log": {"output": {"type": ["file", "syslog"]}}},
        "log.output.type",
        ('["file", "syslog"]', "'syslog'"),
    ),
    ({"log": {"output": {"type": "syslog"}}}, "log.output.type", ("'syslog'",)),
    ({"log": {"output": {"type": []}}}, "log.output.type", ("[]", "at least one")),
    ({"log": {"hooks": ["mail"]}}, "log.hooks", ('["mail"]', "no 'log.mail' section")),
    (
        {"log": {"hooks": ["mail"], "mail": {"type": "sms", "levels": ["error"]}}},
        "log.mail.type",
        ("'sms'", "'email', 'telegram_bot'"),
    ),
    (
        {"log": {"hooks": ["mail"], "mail": {"type": "email", "levels": ["oops"]}}},
        "log.mail.levels",
        ('["oops"]', "unknown log level 'oops'"),
    ),
    ({"service_heartbeat_type": "icmp"}, "service_heartbeat_type", ("'icmp'", "'grpc', 'http', 'https'")),
    (
        {"service_heartbeat_type": "http", "heartbeat_endpoint": "localhost:5000/health"},
        "heartbeat_endpoint",
        ("'localhost:5000/health'", "http(s) URL", "'http'"),
    ),
    ({"service_heartbeat_type": "https"}, "heartbeat_endpoint", ("''", "http(s) URL")),
    (
        {"service_heartbeat_type": "grpc", "heartbeat_endpoint": "ftp://health:5001"},
        "heartbeat_endpoint",
        ("'ftp://health:5001'", "gRPC target", "https://host:port", "scheme"),
    ),
    (
        {"service_heartbeat_type": "grpc", "heartbeat_endpoint": "http://health:port"},
        "heartbeat_endpoint",
        ("'http://health:port'", "gRPC target", "port"),
    ),
    ({"allowed_user_flag": True}, "allowed_user_flag", ("true", "non-empty 'allowed_user_addresses'")),
    (
        {
            "allowed_user_flag": True,
            "allowed_user_addresses": [ADDRESS],
            "blockchain_network_selected": "main",
        },
        "allowed_user_flag",
        ("true", "'main'"),
    ),
    ({"allowed_user_addresses": [ADDRESS, "0x123"]}, "allowed_user_addresses[1]", ("'0x123'", "40 hex")),
    ({"authentication_addresses": [ADDRESS[2:]]}, "authentication_addresses[0]", (f"'{ADDRESS[2:]}'", "0x")),
    ({"trusted_free_call_signers": ["0xZZ" + "0" * 38]}, "trusted_free_call_signers[0]", ("'0xZZ",)),
    (
        {"free_calls_per_address": {"0xnothex": 3}},
        "free_calls_per_address.0xnothex",
        ("'0xnothex'", "address"),
    ),
    (
        {"free_calls_per_address": {ADDRESS: -1}},
        f"free_calls_per_address.{ADDRESS.lower()}",
        ("-1", "unlimited"),
    ),
    ({"free_calls_per_address": {ADDRESS: "lots"}}, f"free_calls_per_address.{ADDRESS.lower()}", ("'lots'",)),
    ({"free_calls_per_address": {ADDRESS: True}}, f"free_calls_per_address.{ADDRESS.lower()}", ("true",)),
    ({"free_calls_per_address": {ADDRESS: 2.5}}, f"free_calls_per_address.{ADDRESS.lower()}", ("2.5",)),
    ({"token_secret_key": "short"}, "token_secret_key", ("'***'", "5 bytes", "at least 32")),
    ({"metering_enabled": True, "private_key_for_metering": PRIVATE_KEY}, "metering_endpoint", ("''", "URL")),
    (
        {
            "metering_enabled": True,
            "metering_endpoint": "metering.example.org",
            "private_key_for_metering": PRIVATE_KEY,
        },
        "metering_endpoint",
        ("'metering.example.org'", "URL"),
    ),
    (
        {"metering_enabled": True, "metering_endpoint": "https://metering.example.org"},
        "private_key_for_metering",
        ("''", "requires it"),
    ),
    ({"private_key_for_metering": "1234"}, "private_key_for_metering", ("'***'", "64 hex")),
    ({"private_key_for_free_calls": "0x" + "g" * 64}, "private_key_for_free_calls", ("'***'", "64 hex")),
    (
        {"notification_endpoint": "notify.example.org"},
        "notification_endpoint",
        ("'notify.example.org'", "URL"),
    ),
    ({"alerts_email": "Ops@Example.com"}, "alerts_email", ("'Ops@Example.com'", "e-mail")),
    ({"alerts_email": "ops@example"}, "alerts_email", ("'ops@example'", "e-mail")),
    ({"alerts_email": "ops@example.museum"}, "alerts_email", ("'ops@example.museum'",)),
    (
        {"service_credentials": [{"key": "", "value": "v", "location": "header"}]},
        "service_credentials[0].key",
        ("''", "empty"),
    ),
    (
        {"service_credentials": [{"key": "k", "value": "v", "location": "cookie"}]},
        "service_credentials[0].location",
        ("'cookie'", "'query', 'header', 'body'"),
    ),
    ({"rate_limit_per_minute": -1}, "rate_limit_per_minute", ("-1", "negative")),
    ({"rate_limit_per_minute": "fast"}, "rate_limit_per_minute", ("'fast'", "not a number")),
    ({"burst_size": -3}, "burst_size", ("-3", "negative")),
    ({"burst_size": 1.5}, "burst_size", ("1.5", "whole number")),
    (
        {"cors_allowed_origins": ["https://example.com/app"]},
        "cors_allowed_origins[0]",
        ("'https://example.com/app'",),
    ),
    ({"cors_allowed_origins": ["*", "example.com"]}, "cors_allowed_origins[1]", ("'example.com'", "origin")),
    ({"cors_allowed_origins": ["https://example.com:99999"]}, "cors_allowed_origins[0]", ("99999",)),
    (
        {"cors_allowed_origins": ["https://example.com/"]},
        "cors_allowed_origins[0]",
        ("'https://example.com/'",),
    ),
    ({"cors_allowed_origins": ["https://u:p@example.com"]}, "cors_allowed_origins[0]", ("example.com",)),
    (
        {"experimental": {"traffic_split": {"grpc": 70000}}},
        "experimental.traffic_split.grpc",
        ("70000", "port"),
    ),
    ({"ipfs_timeout": "soon"}, "ipfs_timeout", ("'soon'", "whole number")),
    # A token that lives 0 minutes or less is expired when it is issued.
    ({"token_expiry_in_minutes": 0}, "token_expiry_in_minutes", ("0", "at least 1")),
    ({"token_expiry_in_minutes": -5}, "token_expiry_in_minutes", ("-5", "at least 1")),
    # NaN is not negative, so only refusing it outright keeps it out.
    ({"rate_limit_per_minute": float("nan")}, "rate_limit_per_minute", ("NaN", "not a finite number")),
    ({"rate_limit_per_minute": "inf"}, "rate_limit_per_minute", ("'inf'", "not a finite number")),
    ({"cors_allowed_origins": "https://a.example, example.com"}, "cors_allowed_origins[1]", ("'example.com'",)),
]


@pytest.mark.parametrize(
    ("data", "path", "fragments"),
    INVALID,
    ids=[f"{case[1]}-{index}" for index, case in enumerate(INVALID)],
)
def test_invalid_value_is_reported_with_path_and_value(
    tmp_path: Path, data: dict[str, Any], path: str, fragments: tuple[str, ...]
) -> None:
    """Each invalid value gives one ConfigError naming the key path and quoting the value."""
    error = _error(tmp_path, data)
    assert len(error.problems) == 1, str(error)
    message = str(error)
    assert message.startswith(f"configuration key '{path}': "), message
    assert error.path == path
    for fragment in fragments:
        assert fragment in message, message


VALID: list[dict[str, Any]] = [
    {"daemon_type": "http"},
    {"daemon_type": "GRPC"},
    {"daemon_endpoint": "0.0.0.0:7000"},
    {"daemon_endpoint": "[::1]:8080"},
    {"daemon_endpoint": ":7000"},
    {"daemon_endpoint": "127.0.0.1:0"},
    {"daemon_endpoint": "0.0.0.0:5000", "service_endpoint": "http://10.0.0.2:5000"},
    {"daemon_endpoint": "127.0.0.1:5000", "service_endpoint": "http://localhost:5001"},
    {"service_endpoint": "https://service.example.org"},
    {"service_endpoint": "grpc://localhost:50051"},
    {"service_endpoint": "localhost:50051"},
    {"max_message_size_in_mb": 1},
    {"max_message_size_in_mb": 2048},
    {"ssl_cert": "/etc/cert.pem", "ssl_key": "/etc/key.pem"},
    {"service_timeout": "1m30s"},
    {"service_timeout": "500ms"},
    {"service_timeout": "1h"},
    {"service_timeout": "0s"},
    {"service_timeout": "0"},
    {"service_timeout": 0},
    {"log": {"level": "WARNING"}},
    {"log": {"level": "panic"}},
    {"log": {"formatter": {"type": "JSON"}}},
    {"log": {"output": {"type": "stderr"}}},
    {"log": {"output": {"type": ["file", "stdout", "stderr"]}}},
    {"service_heartbeat_type": "none"},
    {"service_heartbeat_type": "grpc", "heartbeat_endpoint": "localhost:5001"},
    {"service_heartbeat_type": "grpc", "heartbeat_endpoint": "http://localhost:5001"},
    {"service_heartbeat_type": "grpc", "heartbeat_endpoint": "https://health.example.com"},
    {"service_heartbeat_type": "tcp", "heartbeat_endpoint": "not a URL: tcp never reads it"},
    {"service_heartbeat_type": "http", "heartbeat_endpoint": "http://localhost:5000/heartbeat"},
    {"service_heartbeat_type": "tcp"},
    {"allowed_user_flag": True, "allowed_user_addresses": [ADDRESS]},
    {"allowed_user_flag": False, "blockchain_network_selected": "main"},
    {"free_calls_per_address": {ADDRESS: 0, ADDRESS.lower().replace("3bb", "4bb"): "UNLIMITED"}},
    {"free_calls_per_address": {ADDRESS: "Infinity"}},
    {"free_calls_per_address": {ADDRESS: "15"}},
    {"private_key_for_free_calls": PRIVATE_KEY},
    {"private_key_for_free_calls": "0x" + PRIVATE_KEY.upper()},
    {"token_secret_key": "short", "blockchain_enabled": False},
    {"token_secret_key": "x" * 32},
    {
        "metering_enabled": True,
        "metering_endpoint": "https://m.example.org",
        "private_key_for_metering": PRIVATE_KEY,
    },
    {"metering_endpoint": "not checked while metering is off"},
    {
        "notification_endpoint": "https://notify.example.org/alerts",
        "alerts_email": "ops.team+snet@example.io",
    },
    {"service_credentials": [{"key": "X-Api-Key", "value": "s3cret", "location": "HEADER"}]},
    {"service_credentials": [{"key": "auth", "value": {"token": "t"}, "location": "body"}]},
    {"rate_limit_per_minute": 0, "burst_size": 0},
    {"rate_limit_per_minute": "", "burst_size": ""},
    {"rate_limit_per_minute": "12.5", "burst_size": "10"},
    {
        "cors_allowed_origins": [
            "*",
            "https://a.example.com",
            "http://localhost:3000",
            "chrome-extension://abc",
        ]
    },
    {"cors_allowed_origins": []},
    {"token_expiry_in_minutes": 1},
    {"experimental": {"traffic_split": {"grpc": 7001, "http": "7002"}}},
    {"blockchain_network_selected": "goerli"},
]


@pytest.mark.parametrize("data", VALID, ids=[json.dumps(case)[:60] for case in VALID])
def test_valid_value_is_accepted(tmp_path: Path, data: dict[str, Any]) -> None:
    """Values at the edge of each rule load without error."""
    _load(tmp_path, data)


def test_free_calls_unlimited_means_minus_one(tmp_path: Path) -> None:
    """'unlimited' and 'infinity' (any case) become -1; addresses are lower-cased."""
    other = "0x" + "ab" * 20
    config = _load(tmp_path, {"free_calls_per_address": {ADDRESS: "Unlimited", other: "INFINITY", "0x" + "cd" * 20: 7}})
    assert config.free_calls_per_address == {ADDRESS.lower(): -1, other: -1, "0x" + "cd" * 20: 7}


def test_normalised_values(tmp_path: Path) -> None:
    """Enumerated values are lower-cased; a string log output becomes a one-item list."""
    config = _load(
        tmp_path,
        {
            "daemon_type": "HTTP",
            "log": {"level": "Debug", "formatter": {"type": "Json"}, "output": {"type": "STDOUT"}},
            "service_heartbeat_type": "GRPC",
        },
    )
    assert config.daemon_type == "http"
    assert config.log.level == "debug"
    assert config.log.formatter.type == "json"
    assert config.log.output.type == ("stdout",)
    assert config.service_heartbeat_type == "grpc"


def test_string_lists_accept_comma_separated_strings(tmp_path: Path) -> None:
    """A comma-separated string works where a list of addresses is expected (Viper splits too)."""
    other = "0x" + "ab" * 20
    config = _load(tmp_path, {"trusted_free_call_signers": f"{ADDRESS}, {other}"})
    assert config.trusted_free_call_signers == (ADDRESS, other)


def test_every_list_key_accepts_a_comma_separated_string(tmp_path: Path) -> None:
    """As the documentation promises for every list key: CORS origins too, not only addresses."""
    config = _load(tmp_path, {"cors_allowed_origins": "https://a.example, https://b.example"})
    assert config.cors_allowed_origins == ("https://a.example", "https://b.example")
    assert config.frontend.cors_allowed_origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize(
    "credentials",
    [
        {"key": "api", "value": "SUPERSECRET", "location": "header"},  # an object where the list goes
        "api: SUPERSECRET",  # a string where the list goes
        ["SUPERSECRET"],  # a string where an item goes
        [{"key": "api", "value": {"nested": float("nan")}, "location": "body"}],  # bad inside a JSON value
    ],
)
def test_credential_values_never_appear_in_errors(tmp_path: Path, credentials: object) -> None:
    """A misshapen ``service_credentials`` is reported without quoting what may be its secret."""
    error = _error(tmp_path, {"service_credentials": credentials})
    message = str(error)
    assert "SUPERSECRET" not in message
    assert "NaN" not in message
    assert "'***'" in message
    assert str(error.path).startswith("service_credentials")
    assert {problem.value for problem in error.problems} == {"***"}


def test_secret_values_never_appear_in_errors(tmp_path: Path) -> None:
    """Invalid secrets are reported by key with the value masked."""
    bad_key = "0x" + "z" * 64
    error = _error(tmp_path, {"private_key_for_metering": bad_key, "token_secret_key": "tiny-secret"})
    message = str(error)
    assert bad_key not in message
    assert "tiny-secret" not in message
    assert {problem.value for problem in error.problems} == {"***"}


def test_url_passwords_never_appear_in_errors(tmp_path: Path) -> None:
    """A password embedded in an invalid URL value is masked in the message."""
    error = _error(tmp_path, {"service_endpoint": "ftp://user:hunter2@files.example.org"})
    assert "hunter2" not in str(error)
    assert "user:***@files.example.org" in str(error)


def test_metering_problems_are_all_reported(tmp_path: Path) -> None:
    """Enabling metering without endpoint and key reports both keys at once."""
    error = _error(tmp_path, {"metering_enabled": True})
    assert {problem.path for problem in error.problems} == {"metering_endpoint", "private_key_for_metering"}


def test_field_and_cross_field_problems_are_reported_together(tmp_path: Path) -> None:
    """A type error elsewhere does not hide a cross-field problem."""
    error = _error(tmp_path, {"ipfs_timeout": "soon", "ssl_cert": "c.pem", "log": {"level": "loud"}})
    assert {problem.path for problem in error.problems} == {"ipfs_timeout", "ssl_key", "log.level"}
