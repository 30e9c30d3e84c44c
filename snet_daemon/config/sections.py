"""Per-component views of the configuration.

Components receive their section, never the whole file (style guide §8.7):
the listener gets a :class:`ListenSettings`, the upstream client an
:class:`UpstreamSettings`, and so on.  Each view is a frozen, slotted
dataclass holding values already parsed into the form the component uses
(a port as an ``int``, a timeout in seconds, a message size in bytes), so no
component re-parses ``"host:port"`` strings or Go durations on its own.

The endpoint parsers live here too, because the model validates with exactly
the functions the views use: a value that passes validation is, by
construction, one the view can parse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from pydantic import JsonValue

__all__ = [
    "LOG_LEVELS",
    "MIB",
    "ChainSettings",
    "DaemonIdentity",
    "FrontendSettings",
    "HeartbeatSettings",
    "ListenSettings",
    "LogSettings",
    "ServiceAddress",
    "ServiceCredential",
    "StorageServerSettings",
    "StorageSettings",
    "UpstreamSettings",
    "parse_service_endpoint",
    "split_host_port",
]

#: Bytes per ``max_message_size_in_mb`` unit; Go multiplies by 1024 * 1024.
MIB = 1024 * 1024

#: Go/zap log level names (lower-case) -> the five levels we log at.  zap's
#: ``fatal`` and ``panic`` both end the process after logging; the closest
#: Python level for "the daemon is about to die" is ``critical``.
LOG_LEVELS: Mapping[str, str] = MappingProxyType(
    {
        "debug": "debug",
        "info": "info",
        "warn": "warn",
        "warning": "warn",
        "error": "error",
        "fatal": "critical",
        "panic": "critical",
    }
)

# Schemes a service endpoint may use.  "" is the bare "host:port" form, which
# the Go daemon treats as http:// for validation and dials in plaintext.
_SERVICE_SCHEMES = frozenset({"", "http", "https", "grpc"})

_PORT = re.compile(r"[0-9]{1,5}")


def _parse_port(text: str) -> int:
    """Parse a decimal TCP port (0 is allowed: "any free port", handy in tests)."""
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ValueError(f"port {text!r} is not a number in 0..65535")
    return int(text)


def split_host_port(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` the way Go's ``net.SplitHostPort`` does.

    IPv6 hosts must be bracketed (``"[::1]:8080"``); the brackets are removed
    from the returned host.  An empty host (``":8080"``) means "all
    interfaces", as in Go.  Unlike Go, the port must be numeric: a service
    name such as ``http`` would only fail later, at bind time.

    Args:
        text: The address to split.

    Returns:
        ``(host, port)``.

    Raises:
        ValueError: The text is not ``host:port`` or the port is invalid.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("missing ']' after the IPv6 host")
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError("missing ':port' (expected host:port)")
        return host, _parse_port(rest[1:])
    host, separator, port = text.rpartition(":")
    if not separator:
        raise ValueError("missing ':port' (expected host:port)")
    if ":" in host:
        raise ValueError("too many colons (write an IPv6 host as [addr]:port)")
    return host, _parse_port(port)


@dataclass(frozen=True, slots=True)
class ServiceAddress:
    """Where the AI service listens, parsed from ``service_endpoint``.

    Attributes:
        scheme: ``"http"``, ``"https"``, ``"grpc"`` or ``""`` (bare host:port).
        host: Host name or address, IPv6 without brackets.
        port: Explicit port, or the scheme's default (443 for https, else 80).
        tls: Whether to dial with TLS; as in Go, only ``https://`` does.
    """

    scheme: str
    host: str
    port: int
    tls: bool

    @property
    def target(self) -> str:
        """The ``host:port`` string gRPC dials (IPv6 hosts re-bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_service_endpoint(endpoint: str) -> ServiceAddress:
    """Parse the forms ``service_endpoint`` takes in real Go configurations.

    Accepted: ``http://h[:p][/path]`` (plaintext, port 80 by default),
    ``https://h[:p]`` (TLS, port 443), ``grpc://h[:p]`` (plaintext) and
    ``h:p`` without a scheme (plaintext).  User info (``user:pw@``) is skipped
    when finding the host; a path is kept in the configured string only (HTTP
    services POST to ``endpoint + "/" + method``).

    Args:
        endpoint: The configured value.

    Returns:
        The parsed address.

    Raises:
        ValueError: The scheme is unknown, there is no host, or the port is
            invalid.
    """
    scheme, separator, rest = endpoint.strip().partition("://")
    if not separator:
        scheme, rest = "", endpoint.strip()
    scheme = scheme.lower()
    if scheme not in _SERVICE_SCHEMES:
        raise ValueError(f"unsupported scheme '{scheme}://' (use http://, https://, grpc:// or host:port)")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[2]
    default_port = 443 if scheme == "https" else 80
    if authority.startswith("["):
        # "[::1]" alone gets the default port; "[::1]:5000" keeps its own.
        has_port = ":" in authority.rpartition("]")[2]
        host, port = split_host_port(authority if has_port else f"{authority}:{default_port}")
    elif authority.count(":") > 1:
        raise ValueError("IPv6 host without brackets (write [addr]:port)")
    elif ":" in authority:
        host, port = split_host_port(authority)
    else:
        host, port = authority, default_port
    if not host:
        raise ValueError("no host")
    return ServiceAddress(scheme=scheme, host=host, port=port, tls=scheme == "https")


@dataclass(frozen=True, slots=True)
class ListenSettings:
    """The daemon's own listening address, from ``daemon_endpoint``.

    Attributes:
        host: Interface to bind; ``""`` means all interfaces.
        port: TCP port (0 asks the OS for a free one).
    """

    host: str
    port: int

    @classmethod
    def from_endpoint(cls, endpoint: str) -> ListenSettings:
        """Parse ``daemon_endpoint`` (already validated by the model)."""
        host, port = split_host_port(endpoint)
        return cls(host=host, port=port)


@dataclass(frozen=True, slots=True)
class FrontendSettings:
    """What the gRPC / gRPC-Web front ends need.

    Attributes:
        max_message_size: Largest request message accepted, in bytes.
        cors_allowed_origins: Origins allowed by CORS; ``("*",)`` allows any.
        max_connections: Most client connections open at once (0: automatic,
            see :func:`snet_daemon.frontend.admission.connection_limit`).
    """

    max_message_size: int
    cors_allowed_origins: tuple[str, ...]
    max_connections: int = 0


@dataclass(frozen=True, slots=True)
class ServiceCredential:
    """A credential injected into requests to an HTTP service.

    Attributes:
        key: Query parameter, header or body field name.
        value: The value to send (any JSON value for ``body``).
        location: ``"query"``, ``"header"`` or ``"body"``.
    """

    key: str
    value: JsonValue
    location: str

    def __repr__(self) -> str:
        # Never let a credential reach a log line through a repr.
        return f"ServiceCredential(key={self.key!r}, value='***', location={self.location!r})"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """How to reach the AI service behind the daemon.

    Attributes:
        endpoint: ``service_endpoint`` exactly as configured.
        target: ``"host:port"`` to dial.
        tls: Dial with TLS (the endpoint used ``https://``).
        passthrough_enabled: False makes the daemon echo requests instead.
        timeout: Default per-call deadline in seconds (``service_timeout``).
        max_message_size: Largest message sent to / received from the
            service, in bytes (Go uses the front-end limit for both).
        executable_path: Program run per call for ``process`` services.
        service_credentials: Credentials injected into HTTP-service calls.
    """

    endpoint: str
    target: str
    tls: bool
    passthrough_enabled: bool
    timeout: float
    max_message_size: int
    executable_path: str
    service_credentials: tuple[ServiceCredential, ...]


@dataclass(frozen=True, slots=True)
class HeartbeatSettings:
    """How to probe the service for the daemon's heartbeat.

    Attributes:
        probe_type: ``grpc``, ``http``, ``https``, ``tcp`` or ``none``; the
            Go default ``""`` is reported as ``tcp`` (what Go does with it).
        endpoint: ``heartbeat_endpoint`` as configured: the URL of the
            http/https probe, or the dial target of the grpc probe.  The
            tcp and none types never read it (as Go).
        grpc_target: where the grpc probe's health ``Check`` goes, parsed
            from ``endpoint`` (``https://`` means TLS); None for the other
            types, and for grpc without an endpoint: the service itself is
            asked then.
    """

    probe_type: str
    endpoint: str
    grpc_target: ServiceAddress | None = None


@dataclass(frozen=True, slots=True)
class DaemonIdentity:
    """Which service of which organisation this daemon serves.

    Attributes:
        organization_id: Registry organisation id.
        service_id: Registry service id.
        daemon_group_name: Payment group served.
        blockchain_enabled: False disables payments entirely.
        network: ``blockchain_network_selected`` (``main``, ``sepolia``, ...).
    """

    organization_id: str
    service_id: str
    daemon_group_name: str
    blockchain_enabled: bool
    network: str


@dataclass(frozen=True, slots=True)
class LogSettings:
    """Logging choices the Twisted log observer needs.

    Attributes:
        level: One of ``debug``, ``info``, ``warn``, ``error``, ``critical``
            (Go's ``warning`` becomes ``warn``; ``fatal``/``panic`` become
            ``critical``).
        json: Emit JSON lines (``log.formatter.type == "json"``).
    """

    level: str
    json: bool


@dataclass(frozen=True, slots=True)
class StorageServerSettings:
    """The embedded etcd server, from ``payment_channel_storage_server``.

    Attributes:
        name: etcd member name (``id``).
        scheme: Scheme of the listen/advertise URLs (only ``http`` can be
            served: Go's configuration has no server certificate keys).
        host: Host of the listen/advertise URLs.
        client_port: Client port.
        peer_port: Peer port.
        token: Initial cluster token.
        cluster: Initial cluster (``name=peer_url,...``); empty means this
            member alone.
        startup_timeout: Seconds to wait for the server to become healthy.
        data_dir: Data directory as configured (relative paths are relative
            to the daemon's working directory).
        log_level: etcd's ``--log-level``.
        log_outputs: etcd's ``--log-outputs`` (``stdout``, ``stderr`` or
            file paths, relative to the working directory).
        enabled: Start the server even when client endpoints are configured
            (Go's meaning of the key).
    """

    name: str
    scheme: str
    host: str
    client_port: int
    peer_port: int
    token: str
    cluster: str
    startup_timeout: float
    data_dir: str
    log_level: str
    log_outputs: tuple[str, ...]
    enabled: bool

    def _url(self, host: str, port: int) -> str:
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{port}"

    @property
    def client_url(self) -> str:
        """The URL etcd listens on for (and advertises to) clients."""
        return self._url(self.host, self.client_port)

    @property
    def peer_url(self) -> str:
        """The URL etcd listens on for (and advertises to) peers."""
        return self._url(self.host, self.peer_port)

    @property
    def local_client_url(self) -> str:
        """Where this daemon reaches the server: the client URL, with a
        wildcard host (``0.0.0.0``, ``::``, empty) replaced by loopback."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return self._url(host, self.client_port)


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """Where payment-channel state is kept (``payment_channel_storage_*``).

    Attributes:
        type: ``payment_channel_storage_type``; only ``etcd`` (exactly, as in
            Go) selects etcd, anything else keeps state in memory.
        endpoints: etcd client URLs from the configuration (empty: take them
            from the organisation metadata, else run the embedded server).
        connection_timeout: etcd dial timeout in seconds; 0 means not
            configured (take it from the metadata, else a default).
        request_timeout: etcd request timeout in seconds; 0 as above.
        hot_reload: Follow Registry events to reload endpoints.
        cert_path: Client certificate for ``https://`` endpoints.
        key_path: Its private key.
        ca_path: CA bundle to verify the etcd servers.
        server: The embedded server's settings.
    """

    type: str
    endpoints: tuple[str, ...]
    connection_timeout: float
    request_timeout: float
    hot_reload: bool
    cert_path: str
    key_path: str
    ca_path: str
    server: StorageServerSettings

    @property
    def uses_etcd(self) -> bool:
        """Whether state goes to etcd (else to memory)."""
        return self.type == "etcd"


@dataclass(frozen=True, slots=True)
class ChainSettings:
    """How to read the chain and the metadata (``snet_daemon.blockchain``).

    Attributes:
        enabled: ``blockchain_enabled``; false means no chain reads at all
            (local metadata URIs are still loaded).
        network: ``blockchain_network_selected``: ``main``, ``sepolia``, or a
            custom network whose addresses come only from configuration.
        http_endpoint: JSON-RPC HTTP URL; empty uses the network's default.
        ws_endpoint: JSON-RPC WebSocket URL; set, it is used for ``newHeads``.
        registry_address: ``registry_address_key``; empty uses the network's.
        api_key: ``blockchain_provider_api_key`` (secret).
        mpe_address: ``mpe_contract_address``; empty uses service metadata.
        organization_id: Registry organisation id.
        service_id: Registry service id.
        group_name: ``daemon_group_name``.
        ipfs_endpoint: Kubo RPC API base URL.
        lighthouse_endpoint: Gateway prefix for ``filecoin://`` URIs.
        ipfs_timeout: Seconds per IPFS / gateway request.
        organization_metadata_uri: Local override of the Registry's URI.
        service_metadata_uri: Local override of the Registry's URI.
        block_poll_interval: Seconds between ``eth_blockNumber`` polls.
        block_max_age: Oldest usable cached block number, in seconds.
        metadata_refresh_interval: Seconds between Registry event polls (0: off).
    """

    enabled: bool
    network: str
    http_endpoint: str
    ws_endpoint: str
    registry_address: str
    api_key: str
    mpe_address: str
    organization_id: str
    service_id: str
    group_name: str
    ipfs_endpoint: str
    lighthouse_endpoint: str
    ipfs_timeout: float
    organization_metadata_uri: str
    service_metadata_uri: str
    block_poll_interval: float
    block_max_age: float
    metadata_refresh_interval: float

    def __repr__(self) -> str:
        # The API key must never reach a log line through a repr.
        return f"ChainSettings(network={self.network!r}, http_endpoint=..., api_key='***', ...)"
