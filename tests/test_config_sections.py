"""Section views (listen, frontend, upstream, heartbeat, identity, log) and Go durations."""

from __future__ import annotations

import dataclasses

import pytest

from snet_daemon.config import (
    DaemonConfig,
    DaemonIdentity,
    FrontendSettings,
    HeartbeatSettings,
    ListenSettings,
    LogSettings,
    UpstreamSettings,
    load_config,
)
from snet_daemon.config.durations import (
    DurationError,
    parse_duration,
    parse_duration_ns,
)
from snet_daemon.config.sections import parse_service_endpoint, split_host_port


def _config(**overrides: str) -> DaemonConfig:
    return load_config(None, environ={}, overrides=overrides).config


# ---------------------------------------------------------------------------
# listen


@pytest.mark.parametrize(
    ("endpoint", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("0.0.0.0:7000", "0.0.0.0", 7000),
        ("[::1]:8080", "::1", 8080),
        ("[::]:443", "::", 443),
        (":9000", "", 9000),
        ("daemon.example.org:7000", "daemon.example.org", 7000),
    ],
)
def test_listen_parses_daemon_endpoint(endpoint: str, host: str, port: int) -> None:
    """`listen` splits daemon_endpoint into host and integer port (IPv6 unbracketed)."""
    assert _config(daemon_endpoint=endpoint).listen == ListenSettings(host=host, port=port)


@pytest.mark.parametrize("text", ["localhost", "::1:80", "[::1]80", "[::1:80", "h:-1", "h:65536", "h:"])
def test_split_host_port_rejects_malformed_addresses(text: str) -> None:
    """Addresses without a valid numeric port, or with unbracketed IPv6, are refused."""
    with pytest.raises(ValueError, match=r"port|IPv6|\]"):
        split_host_port(text)


# ---------------------------------------------------------------------------
# upstream


@pytest.mark.parametrize(
    ("endpoint", "target", "tls"),
    [
        ("http://localhost:5000", "localhost:5000", False),
        ("http://localhost", "localhost:80", False),
        ("http://localhost:5000/api/v1", "localhost:5000", False),
        ("https://service.example.org", "service.example.org:443", True),
        ("https://service.example.org:8443/x?y=1", "service.example.org:8443", True),
        ("HTTPS://Service.example.org", "Service.example.org:443", True),
        ("grpc://localhost:50051", "localhost:50051", False),
        ("grpc://backend", "backend:80", False),
        ("localhost:50051", "localhost:50051", False),
        ("backend", "backend:80", False),
        ("http://[::1]:5000", "[::1]:5000", False),
        ("https://[2001:db8::1]", "[2001:db8::1]:443", True),
        ("http://user:pw@localhost:5000", "localhost:5000", False),
    ],
)
def test_upstream_parses_each_service_endpoint_form(endpoint: str, target: str, tls: bool) -> None:
    """`upstream.target` is host:port for dialing and `tls` is set only by https://."""
    upstream = _config(service_endpoint=endpoint, daemon_endpoint="127.0.0.1:7999").upstream
    assert (upstream.endpoint, upstream.target, upstream.tls) == (endpoint, target, tls)


def test_upstream_carries_call_settings() -> None:
    """`upstream` holds passthrough, timeout in seconds, size in bytes, executable and credentials."""
    config = load_config(
        None,
        environ={},
        overrides={
            "passthrough_enabled": "false",
            "service_timeout": "1m30s",
            "max_message_size_in_mb": "16",
            "executable_path": "/opt/service/run",
            "service_credentials": '[{"key": "X-Api-Key", "value": "s3cret", "location": "header"}]',
        },
    ).config
    upstream = config.upstream
    assert isinstance(upstream, UpstreamSettings)
    assert upstream.passthrough_enabled is False
    assert upstream.timeout == 90.0
    assert upstream.max_message_size == 16 * 1024 * 1024
    assert upstream.executable_path == "/opt/service/run"
    (credential,) = upstream.service_credentials
    assert (credential.key, credential.value, credential.location) == ("X-Api-Key", "s3cret", "header")
    assert "s3cret" not in repr(credential)


def test_parse_service_endpoint_reports_scheme_and_port() -> None:
    """The parsed address exposes scheme, host and port separately."""
    address = parse_service_endpoint("grpc://svc.internal:50051")
    assert (address.scheme, address.host, address.port, address.tls) == ("grpc", "svc.internal", 50051, False)


# ---------------------------------------------------------------------------
# frontend, heartbeat, identity, log


def test_frontend_settings() -> None:
    """`frontend` has the message size in bytes and the CORS origins."""
    config = _config(max_message_size_in_mb="8", cors_allowed_origins="https://app.example.com")
    assert config.frontend == FrontendSettings(
        max_message_size=8 * 1024 * 1024, cors_allowed_origins=("https://app.example.com",)
    )
    assert DaemonConfig().frontend.cors_allowed_origins == ("*",)


@pytest.mark.parametrize(
    ("probe", "expected"),
    [("", "tcp"), ("tcp", "tcp"), ("none", "none"), ("grpc", "grpc"), ("http", "http"), ("https", "https")],
)
def test_heartbeat_probe_type(probe: str, expected: str) -> None:
    """`heartbeat.probe_type` is the configured type, with Go's empty default reported as tcp."""
    endpoint = "https://localhost:5000/health" if probe.startswith("http") else ""
    config = _config(service_heartbeat_type=probe, heartbeat_endpoint=endpoint)
    assert config.heartbeat == HeartbeatSettings(probe_type=expected, endpoint=endpoint)


@pytest.mark.parametrize(
    ("endpoint", "host", "port", "tls"),
    [
        ("localhost:5001", "localhost", 5001, False),
        ("http://localhost:5001", "localhost", 5001, False),
        ("https://health.example.com", "health.example.com", 443, True),
        ("https://[::1]:5001", "::1", 5001, True),
    ],
)
def test_heartbeat_grpc_target(endpoint: str, host: str, port: int, tls: bool) -> None:
    """The grpc probe's target is heartbeat_endpoint parsed like service_endpoint: host:port
    or an http(s) URL (Go's validation wants URLs), https meaning TLS."""
    target = _config(service_heartbeat_type="grpc", heartbeat_endpoint=endpoint).heartbeat.grpc_target
    assert target is not None
    assert (target.host, target.port, target.tls) == (host, port, tls)


@pytest.mark.parametrize(("probe", "endpoint"), [("grpc", ""), ("tcp", "localhost:5001"), ("", "localhost:5001")])
def test_heartbeat_without_grpc_target(probe: str, endpoint: str) -> None:
    """No target: grpc without an endpoint asks the service itself; tcp never reads it."""
    assert _config(service_heartbeat_type=probe, heartbeat_endpoint=endpoint).heartbeat.grpc_target is None


def test_identity() -> None:
    """`identity` gathers organisation, service, group, blockchain switch and network."""
    config = _config(
        organization_id="snet",
        service_id="example-service",
        daemon_group_name="default_group",
        blockchain_enabled="false",
        blockchain_network_selected="main",
    )
    assert config.identity == DaemonIdentity(
        organization_id="snet",
        service_id="example-service",
        daemon_group_name="default_group",
        blockchain_enabled=False,
        network="main",
    )


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("debug", "debug"),
        ("info", "info"),
        ("warn", "warn"),
        ("warning", "warn"),
        ("error", "error"),
        ("fatal", "critical"),
        ("panic", "critical"),
        ("DEBUG", "debug"),
    ],
)
def test_log_settings_normalise_the_level(level: str, expected: str) -> None:
    """`log_settings.level` maps Go's level names onto debug/info/warn/error/critical."""
    assert _config(**{"log.level": level}).log_settings == LogSettings(level=expected, json=False)


def test_log_settings_json_follows_the_formatter() -> None:
    """`log_settings.json` is true exactly when the formatter type is json."""
    assert _config(**{"log.formatter.type": "json"}).log_settings.json is True
    assert DaemonConfig().log_settings.json is False


# ---------------------------------------------------------------------------
# View mechanics


def test_views_are_computed_once() -> None:
    """Each view is built once per configuration and then reused."""
    config = DaemonConfig()
    assert config.upstream is config.upstream
    assert config.listen is config.listen


def test_views_are_frozen_slotted_dataclasses() -> None:
    """Views are immutable value objects."""
    listen = DaemonConfig().listen
    assert dataclasses.is_dataclass(listen)
    assert not hasattr(listen, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        listen.port = 1  # type: ignore[misc]


def test_model_copy_recomputes_views() -> None:
    """A copy with updated fields does not keep the original's cached views."""
    config = DaemonConfig()
    assert config.listen.port == 8080
    copied = config.model_copy(update={"daemon_endpoint": "127.0.0.1:9000"})
    assert copied.listen.port == 9000
    assert config.listen.port == 8080


def test_equality_ignores_cached_views() -> None:
    """Computing a view does not make two equal configurations unequal."""
    first, second = DaemonConfig(), DaemonConfig()
    _ = first.upstream
    assert first == second


# ---------------------------------------------------------------------------
# Go durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("100s", 100.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1h", 3600.0),
        ("0s", 0.0),
        ("0", 0.0),
        ("-0", 0.0),
        ("1.5h", 5400.0),
        ("2h45m30.5s", 9930.5),
        ("300us", 0.0003),
        ("300\u00b5s", 0.0003),
        ("300\u03bcs", 0.0003),
        ("10ns", 1e-8),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("+5s", 5.0),
        ("-1m", -60.0),
    ],
)
def test_parse_go_durations(text: str, seconds: float) -> None:
    """Everything Go's time.ParseDuration accepts is parsed to the same length of time."""
    assert parse_duration(text) == pytest.approx(seconds)


def test_durations_are_exact_in_nanoseconds() -> None:
    """Nanosecond parsing is exact, so equal durations spelt differently compare equal."""
    assert parse_duration_ns("1.5h") == parse_duration_ns("90m") == 5_400_000_000_000
    assert parse_duration_ns("1ns") == 1


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "invalid duration"),
        ("s", "invalid duration"),
        ("10", "missing unit"),
        ("1m30", "missing unit"),
        ("1d", "unknown unit"),
        ("1 s", "unknown unit"),
        ("--1s", "invalid duration"),
        ("1.2.3s", "missing unit"),
        (".s", "invalid duration"),
        ("3000000h", "out of range"),
    ],
)
def test_invalid_go_durations(text: str, reason: str) -> None:
    """Strings Go rejects are rejected with Go's wording."""
    with pytest.raises(DurationError, match=reason):
        parse_duration(text)
