"""The configuration models: the one list of every key, its type and default.

Every key of the Go daemon's ``snetd.config.json`` is a field here, under its
Go name and with Go's default, so an existing file loads unchanged.  Values
are coerced leniently, as Viper does (``"4"`` for an int, ``"true"`` for a
bool, ``10`` for a string such as ``min_balance_for_free_call``), because real
Go configurations rely on it.  Everything else is strict: unknown keys are
errors, and every rule Go checks at startup is a validator here.

Rules that involve two keys (``ssl_cert``/``ssl_key``, ``daemon_endpoint``
versus ``service_endpoint``, ...) are field validators that read the
already-validated earlier field from ``info.data``, rather than model
validators.  That is deliberate: pydantic runs a model validator only when
every field is valid and stops at its first error, whereas field validators
all run, so one load reports every problem at once.  The price is that field
order matters -- a field that checks another is declared after it, and a
comment says so.

Fields carry :class:`KeyFlag` markers in their ``Annotated`` metadata for the
few facts the loader and renderer need beyond the type (secret, Go duration,
``log.<hook>`` sections).  Descriptions are the text of
``docs/configuration.md``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from functools import cached_property
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from snet_daemon.config.durations import DurationError, parse_duration_ns
from snet_daemon.config.sections import (
    LOG_LEVELS,
    MIB,
    ChainSettings,
    DaemonIdentity,
    FrontendSettings,
    HeartbeatSettings,
    ListenSettings,
    LogSettings,
    ServiceCredential,
    StorageServerSettings,
    StorageSettings,
    UpstreamSettings,
    parse_service_endpoint,
    split_host_port,
)

__all__ = [
    "GO_DEFAULT_TOKEN_SECRET",
    "HOOK_SECTIONS_ALIAS",
    "UNLIMITED_FREE_CALLS",
    "DaemonConfig",
    "ExperimentalConfig",
    "KeyFlag",
    "LogConfig",
    "LogFormatterConfig",
    "LogHookConfig",
    "LogOutputConfig",
    "ServiceCredentialConfig",
    "StorageClientConfig",
    "StorageServerConfig",
    "TrafficSplitConfig",
]


class KeyFlag(enum.Enum):
    """Markers placed in a field's ``Annotated`` metadata."""

    #: The value is a secret: masked as ``"***"`` in rendered config and errors.
    SECRET = "secret"
    #: A Go duration string: two spellings of one duration are the same value.
    DURATION = "duration"
    #: A dict whose entries appear in the file as sibling keys (``log.<hook>``).
    HOOK_SECTIONS = "hook_sections"


#: Internal key under which ``log.<hook>`` sections are collected.  It
#: contains characters no Go key can (Viper uses ``.`` as its separator and
#: never sees ``<``), so it cannot collide with anything in a real file.
HOOK_SECTIONS_ALIAS = "<log hook sections>"

#: ``free_calls_per_address`` value meaning "no limit" (Go's ``-1``).
UNLIMITED_FREE_CALLS = -1

#: The Go daemon's default ``token_secret_key``: public, so the daemon
#: refuses to start with it when the blockchain (and with it prepaid
#: tokens) is enabled.
GO_DEFAULT_TOKEN_SECRET = "test-secret-key-at-least-32-bytes-long"


# --------------------------------------------------------------------------
# Reusable checks.  Each raises a PydanticCustomError whose text reads after
# the offending value: "configuration key 'k': <value> <reason>".


def _fail(reason: str) -> PydanticCustomError:
    """Build a validation error carrying ``reason`` verbatim.

    The reason goes through the context rather than the template so that
    braces in user values are never interpreted as format fields.
    """
    return PydanticCustomError("snet_config", "{reason}", {"reason": reason})


def _lower(value: str) -> str:
    """Enumerated values are matched case-insensitively (``"JSON"`` works)."""
    return value.lower()


def _choice(*choices: str) -> AfterValidator:
    """An after-validator accepting exactly ``choices`` (after lower-casing)."""
    allowed = ", ".join(repr(choice) for choice in choices)

    def check(value: str) -> str:
        if value not in choices:
            raise _fail(f"is not one of {allowed}")
        return value

    return AfterValidator(check)


def _split_list(value: object) -> object:
    """Accept ``"a,b"`` where a list is expected.

    Environment variables and flags can only carry strings, and Viper's
    ``GetStringSlice`` splits a plain string too, so ``"file"`` for
    ``log.output.type`` works in Go.
    """
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _blank_to_none(value: object) -> object:
    """Treat ``""`` as "unset" for optional numbers (Go writes them as strings)."""
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _non_negative(value: float | None) -> float | None:
    """Rates and bucket sizes cannot be negative; ``None`` (unset) passes.

    Also used for ints: the int is passed through unchanged.
    """
    if value is not None and value < 0:
        raise _fail("must not be negative")
    return value


def _at_least_one(value: int) -> int:
    """A lifetime of 0 or less would make every token expired as it is issued."""
    if value < 1:
        raise _fail("must be at least 1")
    return value


def _non_empty(value: str) -> str:
    """Reject blank strings where Go would fail later (a credential without a name)."""
    if not value.strip():
        raise _fail("must not be empty")
    return value


def _check_duration(value: str) -> str:
    """Accept a non-negative Go duration; keep the text, so rendering shows what was written."""
    try:
        nanoseconds = parse_duration_ns(value.strip())
    except DurationError as exc:
        hint = ""
        if "missing unit" in str(exc):
            # Viper reads a bare number as nanoseconds, which is never meant.
            hint = "; a bare number would mean nanoseconds in Go"
        raise _fail(f"is not a Go duration such as '100s', '1m30s' or '500ms' ({exc}{hint})") from None
    if nanoseconds < 0:
        raise _fail("must not be negative")
    return value.strip()


_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_PRIVATE_KEY = re.compile(r"(0x)?[0-9a-fA-F]{64}")
# Go's ValidateEmail, verbatim (lower-case only, 2..4 letter TLD).
_EMAIL = re.compile(r"^[a-z0-9._%+\-]+@[a-z0-9.\-]+\.[a-z]{2,4}$")
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.\-]*")


def _check_address(value: str) -> str:
    """Require ``0x`` + 40 hex digits (Go also takes bare hex; the prefix avoids mistaking other hex strings)."""
    if not _ADDRESS.fullmatch(value):
        raise _fail("is not an Ethereum address (0x followed by 40 hex digits)")
    return value


def _check_private_key(value: str) -> str:
    """Accept ``""`` (feature off) or a hex secp256k1 key, as Go's ``crypto.HexToECDSA`` would."""
    if value and not _PRIVATE_KEY.fullmatch(value):
        raise _fail("is not a private key (64 hex digits, optionally prefixed by 0x)")
    return value


def _is_http_url(value: str) -> bool:
    """True for ``http(s)://host[:port][/...]`` with a valid port."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - evaluated for its ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def _check_origin(value: str) -> str:
    """Accept ``*`` or a browser origin: ``scheme://host[:port]``, nothing more."""
    if value == "*":
        return value
    reason = "is not '*' or an origin such as 'https://example.com' (scheme://host[:port], no path)"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - evaluated for its ValueError on a bad port
    except ValueError:
        raise _fail(reason) from None
    if (
        not _SCHEME.fullmatch(parts.scheme)
        or not parts.hostname
        or parts.path
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
        or value.endswith(("?", "#"))
    ):
        raise _fail(reason)
    return value


def _check_log_level(value: str) -> str:
    """Accept the zap level names Go accepts, including the ``warning`` spelling."""
    if value not in LOG_LEVELS:
        raise _fail(f"is not a log level ({', '.join(LOG_LEVELS)})")
    return value


def _check_log_levels(values: tuple[str, ...]) -> tuple[str, ...]:
    """Hook levels: Go refuses a hook with no levels, or with one it cannot parse."""
    if not values:
        raise _fail("must list at least one log level")
    levels = tuple(level.lower() for level in values)
    for level in levels:
        if level not in LOG_LEVELS:
            raise _fail(f"names an unknown log level {level!r} (use {', '.join(LOG_LEVELS)})")
    return levels


def _check_log_outputs(values: tuple[str, ...]) -> tuple[str, ...]:
    """``log.output.type``: the three outputs Go's logger knows, at least one."""
    outputs = tuple(value.lower() for value in values)
    if not outputs:
        raise _fail("must name at least one output (file, stdout, stderr)")
    for output in outputs:
        if output not in ("file", "stdout", "stderr"):
            raise _fail(f"names an unknown output {output!r} (use file, stdout or stderr)")
    return outputs


def _check_optional_port(value: int | None) -> int | None:
    """An unset port is fine; a set one must be bindable."""
    if value is not None and not 1 <= value <= 65535:
        raise _fail("is not a TCP port (1..65535)")
    return value


def _check_message_size(value: int) -> int:
    """Go's limit: positive, and at most 2 GiB (gRPC's own maximum)."""
    if not 1 <= value <= 2048:
        raise _fail("is out of range (1..2048)")
    return value


def _parse_free_calls(value: object) -> object:
    """Read a ``free_calls_per_address`` value: a count, or unlimited (-1)."""
    reason = "is not a number of free calls (a whole number >= 0, 'unlimited' or 'infinity')"
    if isinstance(value, bool):
        raise _fail(reason)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("unlimited", "infinity"):
            return UNLIMITED_FREE_CALLS
        try:
            value = int(text)
        except ValueError:
            raise _fail(reason) from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise _fail(reason)
    return value


def _render_free_calls(value: int) -> int | str:
    # Render "unlimited" rather than -1: -1 is not a valid input value.
    return "unlimited" if value == UNLIMITED_FREE_CALLS else value


def _other(info: ValidationInfo, name: str) -> Any:
    """The validated value of an earlier field, or None if it failed.

    A field that failed validation is absent from ``info.data``; the
    cross-field check is then skipped, since that field's own error is
    already being reported.
    """
    return info.data.get(name)


_LOWER = AfterValidator(_lower)

GoDuration = Annotated[str, AfterValidator(_check_duration), KeyFlag.DURATION]
Address = Annotated[str, AfterValidator(_check_address)]
AddressKey = Annotated[str, AfterValidator(_check_address), _LOWER]
AddressList = Annotated[tuple[Address, ...], BeforeValidator(_split_list)]
StrList = Annotated[tuple[str, ...], BeforeValidator(_split_list)]
Secret = Annotated[str, KeyFlag.SECRET]
PrivateKey = Annotated[str, AfterValidator(_check_private_key), KeyFlag.SECRET]
Origin = Annotated[str, AfterValidator(_check_origin)]
FreeCalls = Annotated[
    int,
    BeforeValidator(_parse_free_calls),
    PlainSerializer(_render_free_calls, return_type=int | str),
]
OptionalPort = Annotated[int | None, BeforeValidator(_blank_to_none), AfterValidator(_check_optional_port)]


class Section(BaseModel):
    """Base of every configuration model: frozen, closed, Viper-lenient.

    * ``frozen``: configuration is read once; nobody may patch it later.
    * ``extra="forbid"``: a misspelt key is an error, not a silent default.
    * ``coerce_numbers_to_str``: Go files hold numbers where strings are
      meant (``"min_balance_for_free_call": 10``).
    * ``validate_default``: cross-field checks must also see defaults (an
      ``ssl_cert`` with the default empty ``ssl_key`` is an error).
    * ``allow_inf_nan=False``: ``NaN`` passes every ``<`` check (a rate of
      ``NaN`` is not negative) and ``inf`` is no rate either.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        coerce_numbers_to_str=True,
        validate_default=True,
        allow_inf_nan=False,
    )


# --------------------------------------------------------------------------
# Nested sections.


class LogFormatterConfig(Section):
    """``log.formatter``: how log lines look."""

    type: Annotated[str, _LOWER, _choice("text", "json")] = Field(
        "text", description="Log line format: `text` (console) or `json`."
    )
    timestamp_format: str = Field(
        "2006-01-02T15:04:05.999Z07:00", description="Timestamp layout, in Go's reference-time notation."
    )


class LogOutputConfig(Section):
    """``log.output``: where log lines go and how files rotate."""

    type: Annotated[tuple[str, ...], BeforeValidator(_split_list), AfterValidator(_check_log_outputs)] = Field(
        ("file", "stdout"), description="Outputs: `file`, `stdout`, `stderr`; a string or a list."
    )
    file_pattern: str = Field(
        "./snet-daemon.%Y%m%d.log",
        description="Log file name; `%Y %m %d %H %M %S` are expanded once at start.",
    )
    current_link: str = Field("./snet-daemon.log", description="Symlink pointing at the current log file.")
    max_size_in_mb: int = Field(10, description="Rotate the log file when it reaches this size.")
    max_age_in_days: int = Field(7, description="Delete rotated files older than this.")
    rotation_count: int = Field(0, description="Rotated files to keep (0: keep all).")


class LogHookConfig(Section):
    """``log.<name>``: one log hook, listed by name in ``log.hooks``."""

    type: Annotated[str, _LOWER, _choice("email", "telegram_bot")] = Field(
        description="Hook kind: `email` or `telegram_bot` (required)."
    )
    levels: Annotated[tuple[str, ...], BeforeValidator(_split_list), AfterValidator(_check_log_levels)] = Field(
        description="Log levels that trigger the hook (required)."
    )
    application_name: str = Field("", description="email: SMTP auth identity.")
    host: str = Field("", description="email: SMTP server host.")
    port: int = Field(0, description="email: SMTP server port.")
    from_: str = Field("", alias="from", description="email: sender address.")
    to: str = Field("", description="email: recipient address.")
    username: str = Field("", description="email: SMTP user (Go uses `from` when empty).")
    password: Secret = Field("", description="email: SMTP password.")
    telegram_api_key: Secret = Field("", description="telegram_bot: bot API key.")
    telegram_chat_id: int = Field(0, description="telegram_bot: chat to post to.")
    telegram_disable_notifications: bool = Field(False, description="telegram_bot: send silently.")
    disable_notification: bool = Field(
        False,
        description="Spelling from the Go README; Go ignores it (use `telegram_disable_notifications`).",
    )


def _hook_names(value: object) -> set[str]:
    """The hook names a raw ``log.hooks`` value lists, lower-cased."""
    items = _split_list(value)
    if isinstance(items, list | tuple):
        return {str(item).lower() for item in items}
    return set()


class LogConfig(Section):
    """``log``: the logger, as configured for the Go daemon's zap setup."""

    level: Annotated[str, _LOWER, AfterValidator(_check_log_level)] = Field(
        "info", description="debug, info, warn/warning, error, fatal or panic."
    )
    timezone: str = Field("UTC", description="Time zone of timestamps and log file names.")
    formatter: LogFormatterConfig = Field(default_factory=LogFormatterConfig)
    output: LogOutputConfig = Field(default_factory=LogOutputConfig)
    # Declared before ``hooks`` so that the hooks check can see it.
    hook_sections: Annotated[dict[str, LogHookConfig], KeyFlag.HOOK_SECTIONS] = Field(
        default_factory=dict, alias=HOOK_SECTIONS_ALIAS
    )
    hooks: Annotated[tuple[str, ...], BeforeValidator(_split_list)] = Field(
        (), description="Names of hook sections `log.<name>` to enable."
    )

    @model_validator(mode="before")
    @classmethod
    def _collect_hook_sections(cls, data: object) -> object:
        """Move ``log.<name>`` sections of listed hooks into ``hook_sections``.

        In the file, a hook's settings sit beside ``level`` and ``output``
        under a user-chosen name; anything there that is neither a field nor
        a listed hook stays put and is rejected as an unknown key.
        """
        if not isinstance(data, Mapping):
            return data
        names = _hook_names(data.get("hooks")) - set(cls.model_fields)
        sections = {key: value for key, value in data.items() if str(key).lower() in names}
        if not sections:
            return data
        rest = {key: value for key, value in data.items() if key not in sections}
        rest[HOOK_SECTIONS_ALIAS] = {str(key).lower(): value for key, value in sections.items()}
        return rest

    @field_validator("hooks")
    @classmethod
    def _hooks_have_sections(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        """Go fails at logger start-up on a hook without a section; we fail at load."""
        names = tuple(name.lower() for name in value)
        sections = _other(info, "hook_sections")
        if isinstance(sections, dict):
            for name in names:
                if name not in sections:
                    raise _fail(f"names hook {name!r}, but there is no 'log.{name}' section")
        return names


class StorageClientConfig(Section):
    """``payment_channel_storage_client``: the etcd client."""

    connection_timeout: GoDuration = Field("0s", description="etcd dial timeout; 0s uses the organisation metadata.")
    request_timeout: GoDuration = Field("0s", description="etcd request timeout; 0s uses the organisation metadata.")
    endpoints: StrList = Field((), description="etcd endpoints; overrides the organisation metadata when non-empty.")
    hot_reload: bool = Field(False, description="Follow Registry `OrganizationModified` events to reload endpoints.")


class StorageServerConfig(Section):
    """``payment_channel_storage_server``: the embedded etcd server.

    Go quirk kept on purpose: when this section appears in the file without
    ``enabled``, the server is enabled (the loader inserts ``enabled: true``).
    Whether the server runs also depends on the endpoints
    (``snet_daemon.storage.factory.embedded_etcd_need``).
    """

    id: str = Field("storage-1", description="Embedded etcd member name.")
    scheme: str = Field("http", description="Scheme of the listen/advertise URLs.")
    host: str = Field("127.0.0.1", description="Host of the listen/advertise URLs.")
    client_port: int = Field(2379, description="etcd client port.")
    peer_port: int = Field(2380, description="etcd peer port.")
    token: str = Field("unique-token", description="Initial cluster token.")
    cluster: str = Field("storage-1=http://127.0.0.1:2380", description="Initial cluster.")
    startup_timeout: GoDuration = Field("1m", description="How long to wait for the server to start.")
    data_dir: str = Field("storage-data-dir-1.etcd", description="etcd data directory.")
    log_level: str = Field("info", description="etcd server log level.")
    log_outputs: StrList = Field(("./etcd-server.log",), description="etcd server log outputs.")
    enabled: bool = Field(
        False,
        description=(
            "Also run the embedded etcd when etcd endpoints are configured (this daemon hosts a member of the "
            "group's cluster; the client uses the endpoints). With no endpoints in the configuration or the "
            "organisation metadata, the embedded etcd runs whatever this says. True when the section is in "
            "the file without `enabled`."
        ),
    )


class TrafficSplitConfig(Section):
    """``experimental.traffic_split``: serve gRPC and HTTP on separate ports."""

    grpc: OptionalPort = Field(None, description="Port for native gRPC (two-port mode).")
    http: OptionalPort = Field(None, description="Port for HTTP / gRPC-Web / heartbeat (two-port mode).")


class ExperimentalConfig(Section):
    """``experimental``: Go's switches for listener multiplexing."""

    split_grpc_web: bool = Field(False, description="Separate matcher for gRPC-Web requests.")
    use_original_cmux: bool = Field(False, description="Use soheilhy/cmux instead of the fork.")
    traffic_split: TrafficSplitConfig = Field(default_factory=TrafficSplitConfig)


class ServiceCredentialConfig(Section):
    """One ``service_credentials`` item (HTTP services only)."""

    key: Annotated[str, AfterValidator(_non_empty)] = Field(description="Parameter, header or field name.")
    value: Annotated[JsonValue, KeyFlag.SECRET] = Field("", description="Value to send.")
    location: Annotated[str, _LOWER, _choice("query", "header", "body")] = Field(
        description="Where to put it: `query`, `header` or `body`."
    )

    @model_validator(mode="before")
    @classmethod
    def _lower_case_item_keys(cls, data: object) -> object:
        """``"Key"``, ``"VALUE"``... work, as in Go.

        Viper lower-cases map keys but not the keys of maps inside lists, and
        Go reads this list with mapstructure, whose field names match case-
        insensitively.  Only the item's own keys are lower-cased: a JSON
        ``value`` is sent as written.  A key given twice in different cases
        keeps its spelling and is reported as unknown (naming the key, never
        the item, whose value is a secret).
        """
        if not isinstance(data, Mapping):
            return data
        names = [str(key).lower() for key in data]
        return {
            (name if names.count(name) == 1 or key == name else key): value
            for (key, value), name in zip(data.items(), names, strict=True)
        }


# Names of the cached section views; model_copy must forget them.
_VIEWS = ("listen", "frontend", "upstream", "heartbeat", "identity", "log_settings", "storage", "chain")

_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _same_socket(daemon_host: str, daemon_port: int, service_host: str, service_port: int) -> bool:
    """Would connecting to the service reach the daemon's own listener?

    Go compares the two literally and special-cases 0.0.0.0 against
    127.0.0.1/localhost; we also treat ``::``/``""`` as wildcards and the
    loopback names as one host, which catches the same mistake spelt
    differently.
    """
    if daemon_port != service_port:
        return False
    daemon_host, service_host = daemon_host.lower(), service_host.lower()
    if daemon_host == service_host:
        return True
    if daemon_host in _WILDCARD_HOSTS:
        return service_host in _LOOPBACK_HOSTS | _WILDCARD_HOSTS
    return daemon_host in _LOOPBACK_HOSTS and service_host in _LOOPBACK_HOSTS


class DaemonConfig(Section):
    """The whole daemon configuration, one field per Go key.

    Components should not read this object: :mod:`snet_daemon.tap` hands each
    one its view (:attr:`listen`, :attr:`upstream`, ...), computed once.

    Field order matters where a validator reads an earlier field; those
    places are marked "declared after ... for its check".
    """

    # -- blockchain -----------------------------------------------------------
    blockchain_enabled: bool = Field(True, description="false: no payments; calls are passed through free.")
    blockchain_network_selected: str = Field(
        "sepolia", description="Network name from Go's network list: `main` or `sepolia`."
    )
    ethereum_json_rpc_http_endpoint: str = Field(
        "", description="Ethereum JSON-RPC HTTP URL; empty uses the network's default."
    )
    ethereum_json_rpc_ws_endpoint: str = Field(
        "", description="Ethereum JSON-RPC WebSocket URL (hot reload only); empty uses the network's default."
    )
    registry_address_key: str = Field("", description="Registry contract address; empty uses the network's default.")
    blockchain_provider_api_key: Secret = Field("", description="API key sent to the JSON-RPC provider.")

    # -- chain reader and metadata refresh (not in Go; snet_daemon.blockchain) --
    block_poll_interval: GoDuration = Field(
        "6s",
        description=(
            "(not in Go) How often the current block number is fetched from the JSON-RPC endpoint.  Also how old "
            "the cached chain view of a channel with a claim pending may get (a landed claim is noticed within "
            "it), and the longest a channel id found absent on chain is taken as absent (never past the block)."
        ),
    )
    block_max_age: GoDuration = Field(
        "60s",
        description=(
            "(not in Go) Oldest cached block number payments may use; older means the chain is unavailable.  "
            "A node that keeps answering one number for 10 minutes is warned of in the log."
        ),
    )
    metadata_refresh_interval: GoDuration = Field(
        "30s",
        description=(
            "(not in Go) How often Registry events are checked to reload changed metadata; `0s`: SIGHUP only.  "
            "Events are read with `eth_getLogs` in ranges the provider accepts (QuickNode's free plans: 5 blocks)."
        ),
    )
    mpe_contract_address: str = Field(
        "", description="(not in Go) MultiPartyEscrow address; empty uses the service metadata's `mpe_address`."
    )

    @field_validator("mpe_contract_address")
    @classmethod
    def _mpe_contract_address(cls, value: str) -> str:
        """Empty, or an address: a typo must not become a silent read of the wrong contract."""
        return _check_address(value) if value else value

    @field_validator("block_poll_interval", "block_max_age")
    @classmethod
    def _positive_chain_duration(cls, value: str) -> str:
        """A zero poll interval would spin; a zero age bound would refuse every payment."""
        if parse_duration_ns(value) <= 0:
            raise _fail("must be longer than 0s")
        return value

    # -- end of chain reader keys ---------------------------------------------

    # -- the service and the daemon's own endpoint ----------------------------
    service_endpoint: str = Field(
        "http://localhost:5000",
        description="The AI service: `http://h:p`, `https://h` (TLS), `grpc://h:p` or `h:p`.",
    )
    # Declared after service_endpoint for its check.
    daemon_endpoint: str = Field(
        "127.0.0.1:8080",
        description="`host:port` the daemon listens on; must differ from the service's address.",
    )
    daemon_type: Annotated[str, _LOWER, _choice("grpc", "http")] = Field(
        "grpc", description="`grpc` (the daemon). `http` (Go's development-only HTTP proxy) is refused at startup."
    )
    daemon_group_name: str = Field("default_group", description="Payment group this daemon serves.")
    organization_id: str = Field("YOUR_ORG_ID", description="Registry organisation id.")
    service_id: str = Field("YOUR_SERVICE_ID", description="Registry service id.")
    executable_path: str = Field("", description="Program run per call for `process` services.")

    # -- service types (not in Go; snet_daemon.upstream.process) ---------------
    max_concurrent_processes: Annotated[int, AfterValidator(_non_negative)] = Field(
        0,
        description="(not in Go) Most `process` executables running at once; more calls wait. 0: twice the CPUs.",
    )
    # -- end of service type keys ----------------------------------------------

    passthrough_enabled: bool = Field(True, description="false: echo requests instead of calling the service.")
    service_timeout: GoDuration = Field("100s", description="Deadline of a service call when the client sets none.")
    service_credentials: tuple[ServiceCredentialConfig, ...] = Field(
        (), description="`{key, value, location}` items injected into calls to HTTP services."
    )
    max_message_size_in_mb: Annotated[int, AfterValidator(_check_message_size)] = Field(
        4, description="Largest message in MiB (1..2048), both directions."
    )
    max_connections: Annotated[int, AfterValidator(_non_negative)] = Field(
        0,
        description="(not in Go) Most client connections open at once; at the limit one without a call in "
        "progress is closed to make room (first those that made no call since they came, then the longest idle), "
        "or the new one is refused. 0: 10000, fewer if the open-file limit is low.",
    )
    cors_allowed_origins: Annotated[tuple[Origin, ...], BeforeValidator(_split_list)] = Field(
        ("*",), description="(not in Go) Origins allowed by CORS: `*` or `scheme://host[:port]` items."
    )
    service_metadata_uri: str = Field(
        "", description="(not in Go) Service metadata URI to use instead of the Registry's."
    )
    organization_metadata_uri: str = Field(
        "", description="(not in Go) Organisation metadata URI to use instead of the Registry's."
    )

    # -- metadata storage -------------------------------------------------------
    ipfs_endpoint: str = Field("https://ipfs.singularitynet.io:443", description="IPFS (Kubo RPC API) base URL.")
    lighthouse_endpoint: str = Field(
        "https://gateway.lighthouse.storage/ipfs/", description="Gateway for `filecoin://` metadata URIs."
    )
    ipfs_timeout: int = Field(30, description="IPFS request timeout, seconds.")

    # -- payment channel storage ------------------------------------------------
    payment_channel_storage_type: str = Field(
        "etcd", description="`etcd`; any other value keeps channel state in memory."
    )
    payment_channel_storage_client: StorageClientConfig = Field(default_factory=StorageClientConfig)
    payment_channel_storage_server: StorageServerConfig = Field(default_factory=StorageServerConfig)
    payment_channel_cert_path: str = Field("", description="Client certificate for etcd over https.")
    payment_channel_key_path: str = Field("", description="Client key for etcd over https.")
    payment_channel_ca_path: str = Field("", description="CA bundle for etcd over https.")

    # -- TLS --------------------------------------------------------------------
    ssl_cert: str = Field(
        "", description="TLS certificate file (with `ssl_key`). Not implemented yet: setting it stops startup."
    )
    # Declared after ssl_cert for its check.
    ssl_key: str = Field(
        "", description="TLS private key file (with `ssl_cert`). Not implemented yet: setting it stops startup."
    )
    auto_ssl_domain: str = Field(
        "",
        description="Domain for a Let's Encrypt certificate (binds port 80). "
        "Not implemented yet: setting it stops startup.",
    )
    auto_ssl_cache_dir: str = Field(".certs", description="Let's Encrypt certificate cache directory.")

    # -- access control -----------------------------------------------------------
    allowed_user_addresses: AddressList = Field((), description="Callers allowed when `allowed_user_flag` is true.")
    # Declared after allowed_user_addresses and blockchain_network_selected for its check.
    allowed_user_flag: bool = Field(
        False,
        description="Only `allowed_user_addresses` may call (not allowed on `main`). "
        "Not implemented yet: `true` stops startup.",
    )
    authentication_addresses: AddressList = Field((), description="Signers allowed to use the ConfigurationService.")

    # -- free calls ---------------------------------------------------------------
    private_key_for_free_calls: PrivateKey = Field("", description="Key that signs free-call tokens (hex).")
    trusted_free_call_signers: AddressList = Field(
        ("0x3Bb9b2499c283cec176e7C707Ecb495B7a961ebf", "0x7DF35C98f41F3Af0df1dc4c7F7D4C19a71Dd059F"),
        description="Marketplace backends allowed to request free-call tokens for a `user_id`.",
    )
    min_balance_for_free_call: str = Field("10", description="Whole FET a Web3 caller must hold to get free calls.")
    free_calls_per_address: dict[AddressKey, FreeCalls] = Field(
        default_factory=dict,
        description="Address -> free calls allowed (a number, `unlimited` or `infinity`).",
    )

    # -- metering -------------------------------------------------------------------
    metering_enabled: bool = Field(False, description="Send per-call usage to `metering_endpoint`.")
    # Declared after metering_enabled for its check.
    metering_endpoint: str = Field("", description="Metering service base URL (required when metering is on).")
    # Declared after metering_enabled for its check.
    private_key_for_metering: PrivateKey = Field(
        "", description="Key that signs metering requests (required when metering is on)."
    )

    # -- alerts and heartbeat ---------------------------------------------------------
    alerts_email: str = Field("", description="Address notified when the heartbeat fails.")
    notification_endpoint: str = Field("", description="Notification service URL used for alerts.")
    service_heartbeat_type: Annotated[str, _LOWER, _choice("grpc", "http", "https", "tcp", "none", "")] = Field(
        "", description="How to probe the service: grpc, http, https, tcp, none or empty (tcp)."
    )
    # Declared after service_heartbeat_type for its check.
    heartbeat_endpoint: str = Field(
        "",
        description="Probe URL (http/https types), or where the grpc type's health Check goes "
        "(host:port or http(s) URL, https meaning TLS; empty: the service). Not read by tcp/none/empty.",
    )

    # -- rate limiting ------------------------------------------------------------------
    rate_limit_per_minute: Annotated[float | None, BeforeValidator(_blank_to_none), AfterValidator(_non_negative)] = (
        Field(None, description="Calls per minute across all callers; unset means unlimited.")
    )
    burst_size: Annotated[int | None, BeforeValidator(_blank_to_none), AfterValidator(_non_negative)] = Field(
        None, description="Token-bucket size; unset means unlimited."
    )

    # -- prepaid tokens -------------------------------------------------------------------
    token_expiry_in_minutes: Annotated[int, AfterValidator(_at_least_one)] = Field(
        1440, description="Lifetime of prepaid-call JWTs, in minutes (>= 1)."
    )
    # Declared after blockchain_enabled for its check.
    token_secret_key: Secret = Field(
        GO_DEFAULT_TOKEN_SECRET,
        description=(
            "HS256 key of prepaid-call JWTs: >= 32 bytes, and not this published default, when the blockchain is on."
        ),
    )

    # -- pricing and training ---------------------------------------------------------------
    enable_dynamic_pricing: bool = Field(False, description="Ask the service to price each call.")
    model_training_enabled: bool = Field(False, description="Serve the training.Daemon API.")
    model_maintenance_endpoint: str = Field(
        "",
        description="gRPC endpoint of the provider's training.Model service (default: `service_endpoint`).",
    )

    # -- nested sections ----------------------------------------------------------------------
    log: LogConfig = Field(default_factory=LogConfig)
    experimental: ExperimentalConfig = Field(default_factory=ExperimentalConfig)

    # ---------------------------------------------------------------------------------------
    # Validators that read another field.

    @field_validator("service_endpoint")
    @classmethod
    def _service_endpoint_has_host(cls, value: str) -> str:
        """Go: the service URL (``http://`` assumed) must have a host."""
        try:
            parse_service_endpoint(value)
        except ValueError as exc:
            raise _fail(f"is not a valid service endpoint: {exc}") from None
        return value

    @field_validator("daemon_endpoint")
    @classmethod
    def _daemon_endpoint_is_host_port(cls, value: str, info: ValidationInfo) -> str:
        """Go: host:port, and not the service's own address (which would loop)."""
        try:
            host, port = split_host_port(value)
        except ValueError as exc:
            raise _fail(f"is not host:port: {exc}") from None
        service = _other(info, "service_endpoint")
        if isinstance(service, str):
            address = parse_service_endpoint(service)
            if _same_socket(host, port, address.host, address.port):
                raise _fail(
                    f"must differ from 'service_endpoint' ({service!r}): the daemon would forward calls to itself"
                )
        return value

    @field_validator("ssl_key")
    @classmethod
    def _ssl_pair(cls, value: str, info: ValidationInfo) -> str:
        """Go: TLS needs both files; one alone is a mistake, not "TLS off"."""
        cert = _other(info, "ssl_cert")
        if isinstance(cert, str) and bool(cert) != bool(value):
            if cert:
                raise _fail("is empty but 'ssl_cert' is set; TLS needs both 'ssl_cert' and 'ssl_key', or neither")
            raise _fail("is set but 'ssl_cert' is empty; TLS needs both 'ssl_cert' and 'ssl_key', or neither")
        return value

    @field_validator("allowed_user_flag")
    @classmethod
    def _allowed_users(cls, value: bool, info: ValidationInfo) -> bool:
        """Go: curation mode needs a list of callers and is refused on mainnet."""
        if not value:
            return value
        if _other(info, "blockchain_network_selected") == "main":
            raise _fail(
                "is not allowed when 'blockchain_network_selected' is 'main' (restricting callers is for test networks)"
            )
        if _other(info, "allowed_user_addresses") == ():
            raise _fail("requires a non-empty 'allowed_user_addresses'")
        return value

    @field_validator("metering_endpoint")
    @classmethod
    def _metering_endpoint(cls, value: str, info: ValidationInfo) -> str:
        """Go: metering needs a URL to send usage to."""
        if _other(info, "metering_enabled") and not _is_http_url(value):
            raise _fail("is not an http(s) URL, which 'metering_enabled': true requires")
        return value

    @field_validator("private_key_for_metering")
    @classmethod
    def _metering_key(cls, value: str, info: ValidationInfo) -> str:
        """Metering requests are signed; without a key every push would fail."""
        if _other(info, "metering_enabled") and not value:
            raise _fail("is empty, but 'metering_enabled': true requires it")
        return value

    @field_validator("notification_endpoint")
    @classmethod
    def _notification_endpoint(cls, value: str) -> str:
        """Go validates the alert URL before using it; we do so at startup."""
        if value and not _is_http_url(value):
            raise _fail("is not an http(s) URL")
        return value

    @field_validator("alerts_email")
    @classmethod
    def _alerts_email(cls, value: str) -> str:
        """Go's e-mail pattern, verbatim, so the two daemons accept the same addresses."""
        if value and not _EMAIL.match(value):
            raise _fail("is not an e-mail address (Go's pattern: lower-case, name@domain.tld)")
        return value

    @field_validator("heartbeat_endpoint")
    @classmethod
    def _heartbeat_endpoint(cls, value: str, info: ValidationInfo) -> str:
        """Go: an http(s) probe needs an http(s) URL to probe.

        The grpc type dials it: ``host:port`` or, since Go's own validation
        insists on URLs, ``http://host:port`` (plaintext) or
        ``https://host:port`` (TLS), as ``service_endpoint`` is written.
        """
        probe = _other(info, "service_heartbeat_type")
        if probe in ("http", "https") and not _is_http_url(value):
            raise _fail(f"is not an http(s) URL, which 'service_heartbeat_type': {probe!r} requires")
        if probe == "grpc" and value:
            try:
                parse_service_endpoint(value)
            except ValueError as exc:
                raise _fail(
                    f"is not a gRPC target for 'service_heartbeat_type': 'grpc' "
                    f"(host:port, http://host:port or https://host:port): {exc}"
                ) from None
        return value

    @field_validator("token_secret_key")
    @classmethod
    def _token_secret_length(cls, value: str, info: ValidationInfo) -> str:
        """Go: an HS256 key shorter than 32 bytes is refused when tokens are in use.

        (Go's published default is refused too, but when the daemon starts
        with the blockchain enabled -- ``snet_daemon.tap.check_token_secret``
        -- so that a file that leaves it out still loads, as Go's does.)
        """
        size = len(value.encode())
        if _other(info, "blockchain_enabled") and size < 32:
            raise _fail(f"is {size} bytes long; 'blockchain_enabled': true requires at least 32")
        return value

    @field_validator("min_balance_for_free_call")
    @classmethod
    def _min_balance(cls, value: str) -> str:
        """Whole tokens (Go reads a big integer); the daemon multiplies by 10^18."""
        if not value.strip().isdigit():
            raise _fail("is not a whole number of tokens (>= 0)")
        return value.strip()

    # ---------------------------------------------------------------------------------------
    # Section views, computed once per (immutable) instance.

    @cached_property
    def listen(self) -> ListenSettings:
        """Where the daemon listens (``daemon_endpoint``)."""
        return ListenSettings.from_endpoint(self.daemon_endpoint)

    @cached_property
    def frontend(self) -> FrontendSettings:
        """Settings of the gRPC / gRPC-Web front ends."""
        return FrontendSettings(
            max_message_size=self.max_message_size_in_mb * MIB,
            cors_allowed_origins=self.cors_allowed_origins,
            max_connections=self.max_connections,
        )

    @cached_property
    def upstream(self) -> UpstreamSettings:
        """How to call the AI service."""
        address = parse_service_endpoint(self.service_endpoint)
        return UpstreamSettings(
            endpoint=self.service_endpoint,
            target=address.target,
            tls=address.tls,
            passthrough_enabled=self.passthrough_enabled,
            timeout=parse_duration_ns(self.service_timeout) / 1e9,
            max_message_size=self.max_message_size_in_mb * MIB,
            executable_path=self.executable_path,
            service_credentials=tuple(
                ServiceCredential(key=item.key, value=item.value, location=item.location)
                for item in self.service_credentials
            ),
        )

    @cached_property
    def heartbeat(self) -> HeartbeatSettings:
        """How the heartbeat probes the service."""
        probe_type = self.service_heartbeat_type or "tcp"
        grpc_target = None
        if probe_type == "grpc" and self.heartbeat_endpoint:
            grpc_target = parse_service_endpoint(self.heartbeat_endpoint)
        return HeartbeatSettings(probe_type=probe_type, endpoint=self.heartbeat_endpoint, grpc_target=grpc_target)

    @cached_property
    def identity(self) -> DaemonIdentity:
        """Which organisation, service and group this daemon serves."""
        return DaemonIdentity(
            organization_id=self.organization_id,
            service_id=self.service_id,
            daemon_group_name=self.daemon_group_name,
            blockchain_enabled=self.blockchain_enabled,
            network=self.blockchain_network_selected,
        )

    @cached_property
    def log_settings(self) -> LogSettings:
        """Logging level (normalised) and format."""
        return LogSettings(level=LOG_LEVELS[self.log.level], json=self.log.formatter.type == "json")

    @cached_property
    def storage(self) -> StorageSettings:
        """Where payment-channel state is kept (etcd client, embedded server, or memory)."""
        client = self.payment_channel_storage_client
        server = self.payment_channel_storage_server
        return StorageSettings(
            type=self.payment_channel_storage_type,
            endpoints=client.endpoints,
            connection_timeout=parse_duration_ns(client.connection_timeout) / 1e9,
            request_timeout=parse_duration_ns(client.request_timeout) / 1e9,
            hot_reload=client.hot_reload,
            cert_path=self.payment_channel_cert_path,
            key_path=self.payment_channel_key_path,
            ca_path=self.payment_channel_ca_path,
            server=StorageServerSettings(
                name=server.id,
                scheme=server.scheme,
                host=server.host,
                client_port=server.client_port,
                peer_port=server.peer_port,
                token=server.token,
                cluster=server.cluster,
                startup_timeout=parse_duration_ns(server.startup_timeout) / 1e9,
                data_dir=server.data_dir,
                log_level=server.log_level,
                log_outputs=server.log_outputs,
                enabled=server.enabled,
            ),
        )

    @cached_property
    def chain(self) -> ChainSettings:
        """How to read the chain and the service's metadata (``snet_daemon.blockchain``)."""
        return ChainSettings(
            enabled=self.blockchain_enabled,
            network=self.blockchain_network_selected,
            http_endpoint=self.ethereum_json_rpc_http_endpoint,
            ws_endpoint=self.ethereum_json_rpc_ws_endpoint,
            registry_address=self.registry_address_key,
            api_key=self.blockchain_provider_api_key,
            mpe_address=self.mpe_contract_address,
            organization_id=self.organization_id,
            service_id=self.service_id,
            group_name=self.daemon_group_name,
            ipfs_endpoint=self.ipfs_endpoint,
            lighthouse_endpoint=self.lighthouse_endpoint,
            ipfs_timeout=float(self.ipfs_timeout),
            organization_metadata_uri=self.organization_metadata_uri,
            service_metadata_uri=self.service_metadata_uri,
            block_poll_interval=parse_duration_ns(self.block_poll_interval) / 1e9,
            block_max_age=parse_duration_ns(self.block_max_age) / 1e9,
            metadata_refresh_interval=parse_duration_ns(self.metadata_refresh_interval) / 1e9,
        )

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """Copy the model, dropping cached views so they follow ``update``.

        pydantic copies ``__dict__`` wholesale, cached properties included;
        without this, ``config.model_copy(update={"daemon_endpoint": ...})``
        would keep the old :attr:`listen`.  Note that ``update`` bypasses
        validation, as in pydantic; tests are its only intended users.
        """
        copied = super().model_copy(update=update, deep=deep)
        for name in _VIEWS:
            copied.__dict__.pop(name, None)
        return copied
