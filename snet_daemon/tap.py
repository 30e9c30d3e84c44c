"""``twistd snetd``: command-line options and the composition root.

This is the only module that names concrete classes and wires them
together.  ``Options.postOptions`` loads and validates the configuration and
installs the asyncio reactor, before twistd binds any port or imports the
reactor; :func:`makeService` builds the service tree from the validated
configuration.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import gc
import os
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorSocket
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from snet_daemon import __version__
from snet_daemon.config import (
    ConfigError,
    ConfigProblem,
    DaemonConfig,
    LoadedConfig,
    load_config,
    render_effective_config,
)
from snet_daemon.config.model import GO_DEFAULT_TOKEN_SECRET
from snet_daemon.lifecycle import OrderedMultiService

if TYPE_CHECKING:
    from snet_daemon.payments.freecall import FreeCallSettings
    from snet_daemon.payments.tokens import TokenSettings

_log = Logger(namespace="snetd")

#: The placeholder secret of etc/snetd.config.example.*: refused like Go's
#: published default, so a copied example cannot go live with it.
EXAMPLE_SECRET_PREFIX = "CHANGE-ME"

#: Seconds running calls get to finish when the daemon stops.
SHUTDOWN_GRACE = 10.0

#: Seconds an http/https heartbeat probe may take: /heartbeat waits for it.
HTTP_PROBE_TIMEOUT = 5.0

#: The file read from the working directory when ``--config`` is not given,
#: as Go's ``snetd serve`` does: a Go deployment that relies on it keeps its
#: configuration instead of silently running on the defaults.
DEFAULT_CONFIG_FILE = "snetd.config.json"


class Options(usage.Options):
    """Options of ``twistd snetd``.

    Besides ``--config`` and ``--check-config``, the Go daemon's ``serve``
    flags are accepted, and ``--set key=value`` reaches any key (nested keys
    with dots: ``--set log.level=debug``).  Flags beat environment variables,
    which beat the file, which beats the defaults.
    """

    synopsis = "[options]"
    longdesc = (
        "Run the SingularityNET daemon: a gRPC / gRPC-Web proxy in front of an "
        "AI service that checks each call's payment."
    )

    optParameters = [
        [
            "config",
            "c",
            None,
            f"Configuration file (.json, .yaml or .yml); default: ./{DEFAULT_CONFIG_FILE} if it exists.",
        ],
        ["type", "t", None, "Set daemon_type."],
        # TLS is not implemented yet: check_supported refuses the first three.
        ["ssl-cert", None, None, "Set ssl_cert (TLS: not implemented yet, refused)."],
        ["ssl-key", None, None, "Set ssl_key (TLS: not implemented yet, refused)."],
        ["auto-ssl-domain", None, None, "Set auto_ssl_domain (TLS: not implemented yet, refused)."],
        ["auto-ssl-cache", None, None, "Set auto_ssl_cache_dir."],
    ]
    optFlags = [
        # Go's bool flags; parseOptions also takes =true/=false after them.
        ["blockchain", "b", "Set blockchain_enabled: true, or --blockchain=false (-b=false)."],
        ["passthrough", None, "Set passthrough_enabled: true, or --passthrough=false."],
        [
            "check-config",
            None,
            "Validate the configuration, print it with secrets masked, and exit (status 0 when valid, 1 when not).",
        ],
    ]

    _flag_keys = {
        "type": "daemon_type",
        "ssl-cert": "ssl_cert",
        "ssl-key": "ssl_key",
        "auto-ssl-domain": "auto_ssl_domain",
        "auto-ssl-cache": "auto_ssl_cache_dir",
    }

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.overrides: dict[str, str] = {}
        self._bool_values: dict[str, str] = {}
        self.loaded: LoadedConfig | None = None
        #: Said at startup (and by --check-config) when the file was found
        #: in the working directory rather than given with --config.
        self.config_note: str | None = None
        self.stdout: TextIO = sys.stdout
        self.stderr: TextIO = sys.stderr

    #: Go's bool flags (pflag) by spelling: a bare flag means true, and
    #: ``--flag=value`` sets the value.
    _bool_flags = {
        "--blockchain": "blockchain_enabled",
        "-b": "blockchain_enabled",
        "--passthrough": "passthrough_enabled",
    }
    _bool_flag_names = {"blockchain": "blockchain_enabled", "passthrough": "passthrough_enabled"}

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Parse the options, Go's bool flags with their optional value included.

        pflag lets a bool flag stand alone (true) or carry ``=value``; getopt,
        under ``usage.Options``, has no optional values.  So ``--blockchain``,
        ``-b``, ``--passthrough`` and their ``=value`` forms are taken out
        here, in order (the last one wins), and the rest goes to getopt.  As
        in Go, ``--passthrough false`` is not a value: the stray ``false`` is
        a usage error.
        """
        args = list(sys.argv[1:] if options is None else options)
        rest: list[str] = []
        for index, arg in enumerate(args):
            if arg == "--":
                rest.extend(args[index:])
                break
            name, sep, value = arg.partition("=")
            key = self._bool_flags.get(name)
            if key is None:
                rest.append(arg)
            else:
                self._bool_values[key] = value if sep else "true"
        super().parseOptions(rest)  # type: ignore[no-untyped-call]

    def opt_set(self, value: str) -> None:
        """Set any configuration key: --set key=value (repeatable)."""
        key, sep, raw = value.partition("=")
        if not sep or not key.strip():
            raise usage.UsageError(f"--set needs key=value, got {value!r}")
        self.overrides[key.strip().lower()] = raw

    def postOptions(self) -> None:
        for flag, key in self._flag_keys.items():
            if self[flag] is not None:
                self.overrides[key] = self[flag]
        for flag, key in self._bool_flag_names.items():
            # Set here only when getopt saw the flag: an abbreviation (--pass).
            if self[flag] and key not in self._bool_values:
                self._bool_values[key] = "true"
        self.overrides.update(self._bool_values)
        path = self["config"]
        if path is None and Path(DEFAULT_CONFIG_FILE).exists():
            path = DEFAULT_CONFIG_FILE
            self.config_note = (
                f"no --config given: using {Path(DEFAULT_CONFIG_FILE).resolve()} from the working directory"
            )
        try:
            loaded = load_config(path, overrides=self.overrides)
            # Startup logs the warnings too, from build_daemon's run of the checks.
            check_warnings = check_config(loaded.config)
        except ConfigError as error:
            print(f"snetd: configuration error: {error}", file=self.stderr)
            raise SystemExit(1) from None
        if self["check-config"]:
            if self.config_note is not None:
                print(f"snetd: {self.config_note}", file=self.stderr)
            for warning in (*loaded.warnings, *check_warnings):
                print(f"snetd: warning: {warning}", file=self.stderr)
            print(render_effective_config(loaded.config), file=self.stdout)
            raise SystemExit(0)
        install_asyncio_reactor(self.stderr)
        self.loaded = loaded


def check_config(config: DaemonConfig) -> tuple[str, ...]:
    """Every check startup makes on a loaded configuration, short of connecting anywhere.

    ``--check-config`` (the systemd unit's ``ExecStartPre``) and startup
    (:meth:`Options.postOptions`, :func:`build_daemon`) both run exactly this,
    so a configuration reported valid cannot then be refused at startup for a
    reason that was visible in the file.

    Returns:
        Warnings about what may still go wrong once the organisation
        metadata is known (:func:`check_etcd_program`).

    Raises:
        ConfigError: listing every problem: settings not supported yet
            (:func:`check_supported`), chain settings no retry can fix
            (``snet_daemon.blockchain.build.plan_chain``), an unsafe
            ``token_secret_key`` (:func:`check_token_secret`), the etcd
            program missing where the embedded etcd will run
            (:func:`check_etcd_program`).
    """
    problems: list[ConfigProblem] = []
    for check in (check_supported, _check_chain, check_token_secret):
        try:
            check(config)
        except ConfigError as error:
            problems.extend(error.problems)
    warnings: tuple[str, ...] = ()
    try:
        warnings = check_etcd_program(config)
    except ConfigError as error:
        problems.extend(error.problems)
    if problems:
        raise ConfigError(problems=tuple(problems))
    return warnings


def check_etcd_program(config: DaemonConfig, program: str | None = None) -> tuple[str, ...]:
    """The etcd program is installed when payments will run the embedded etcd server.

    Payments build their storage only once the organisation metadata has
    loaded (``snet_daemon.payments.stack``); a missing program then leaves
    the daemon running with every paid call failing.  Whether the embedded
    server runs is clear from the configuration when
    ``payment_channel_storage_server.enabled`` is true (it always runs) or
    endpoints are configured (it does not run unless enabled); otherwise it
    runs only when the organisation metadata names no etcd endpoints either
    (``snet_daemon.storage.factory.embedded_etcd_need``).

    Args:
        config: The configuration.
        program: The etcd program, looked up on ``PATH``; by default the one
            the storage runs (``snet_daemon.storage.factory.ETCD_PROGRAM``).

    Returns:
        A warning when the program is missing and only the organisation
        metadata can tell whether it is needed.

    Raises:
        ConfigError: The program is missing and the embedded server will
            run whatever the metadata says.
    """
    if not config.blockchain_enabled:
        return ()  # no payments, no storage
    # Imported here: the storage modules are heavy, and --help needs none of them.
    from snet_daemon.storage.embedded import EmbeddedEtcdError, find_etcd
    from snet_daemon.storage.factory import ETCD_PROGRAM, embedded_etcd_need

    need = embedded_etcd_need(config.storage, None)
    if need is None:
        return ()
    try:
        find_etcd(program or ETCD_PROGRAM, why=need.why, otherwise=need.otherwise)
    except EmbeddedEtcdError as error:
        if not need.certain:
            return (str(error),)
        raise ConfigError(str(error), path="payment_channel_storage_server.enabled", value=True) from None
    return ()


def _check_chain(config: DaemonConfig) -> None:
    """The chain settings resolve (endpoint, Registry), as :func:`build_chain` will need."""
    if config.blockchain_enabled:
        # Imported here: the chain modules are heavy, and --help needs none of them.
        from snet_daemon.blockchain.build import plan_chain

        plan_chain(config.chain)


def check_supported(config: DaemonConfig) -> None:
    """Refuse settings this version cannot honour, rather than run unsafely.

    Most keys that are not implemented yet only earn a warning: ignoring
    them leaves the daemon doing less, not less safely.  Ignoring these
    would leave it less safe than its operator asked for -- serving
    plaintext where TLS was configured, serving every caller where an
    allow-list was -- so the daemon does not start until they are removed.

    Raises:
        ConfigError: listing each of ``daemon_type: http`` (the Go daemon's
            development proxy, not built here), ``ssl_cert``/``ssl_key``,
            ``auto_ssl_domain`` (TLS) and ``allowed_user_flag: true``.
    """
    problems: list[ConfigProblem] = []
    if config.daemon_type != "grpc":
        problems.append(
            ConfigProblem(
                f"configuration key 'daemon_type': {config.daemon_type!r} is not supported yet (only 'grpc')",
                "daemon_type",
                config.daemon_type,
            )
        )
    without_tls = "to serve without TLS (e.g. behind a proxy that terminates TLS)"
    if config.ssl_cert or config.ssl_key:
        problems.append(
            ConfigProblem(
                "configuration keys 'ssl_cert' and 'ssl_key': TLS is not implemented yet, and this daemon would "
                f"serve plaintext where TLS was asked for; remove both keys {without_tls}",
                "ssl_cert",
                config.ssl_cert,
            )
        )
    if config.auto_ssl_domain:
        problems.append(
            ConfigProblem(
                f"configuration key 'auto_ssl_domain': {config.auto_ssl_domain!r} asks for Let's Encrypt TLS, which "
                f"is not implemented yet; remove the key {without_tls}",
                "auto_ssl_domain",
                config.auto_ssl_domain,
            )
        )
    if config.allowed_user_flag:
        problems.append(
            ConfigProblem(
                "configuration key 'allowed_user_flag': true (serve only 'allowed_user_addresses') is not "
                "implemented yet, and this daemon would serve every caller; remove the key (or set it to false) "
                "to serve without the allow-list",
                "allowed_user_flag",
                True,
            )
        )
    if problems:
        raise ConfigError(problems=tuple(problems))


def check_token_secret(config: DaemonConfig) -> None:
    """Refuse a ``token_secret_key`` that others know, when prepaid tokens are in use.

    Anyone can sign prepaid-call tokens with a known key and spend other
    clients' prepaid calls.  Two are known to everyone: Go's published
    default, which Go accepts, and the ``CHANGE-ME`` placeholder of
    etc/snetd.config.example.*, so that a copied example cannot go live
    with it.  We refuse to start with either.

    Raises:
        ConfigError: blockchain enabled and the secret starts with
            :data:`EXAMPLE_SECRET_PREFIX` or is Go's default.
    """
    if config.blockchain_enabled and config.token_secret_key.startswith(EXAMPLE_SECRET_PREFIX):
        raise ConfigError(
            "configuration key 'token_secret_key': '***' is the placeholder of the example configuration; "
            "set it to a random string of at least 32 bytes (e.g. python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(48))')",
            path="token_secret_key",
            value="***",
        )
    if config.blockchain_enabled and config.token_secret_key == GO_DEFAULT_TOKEN_SECRET:
        raise ConfigError(
            "configuration key 'token_secret_key': '***' is the Go daemon's published default, so anyone could "
            "forge prepaid-call tokens; set it to a random string of at least 32 bytes",
            path="token_secret_key",
            value="***",
        )


def install_asyncio_reactor(stderr: TextIO) -> None:
    """Install Twisted's asyncio reactor, or exit if another one is in place.

    The daemon's components are asyncio coroutines and futures (the
    upstream HTTP/2 client, the etcd client, payments), and the chain
    reader and metadata loader use aiohttp; the asyncio reactor runs
    Twisted and asyncio on one loop.  twistd has imported no reactor yet
    when plugin options are parsed, unless ``--reactor`` forced one.
    """
    if "twisted.internet.reactor" in sys.modules:
        from twisted.internet import reactor
        from twisted.internet.asyncioreactor import AsyncioSelectorReactor

        if not isinstance(reactor, AsyncioSelectorReactor):
            print(
                "snetd: needs Twisted's asyncio reactor, but "
                f"{type(reactor).__module__}.{type(reactor).__name__} is already installed; "
                "drop --reactor or use --reactor=asyncio",
                file=stderr,
            )
            raise SystemExit(1)
        return
    from twisted.internet import asyncioreactor

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)


def makeService(options: Options) -> IService:
    """Build the daemon's service tree (called by twistd after ``postOptions``)."""
    from twisted.internet import reactor

    assert options.loaded is not None
    twistd_options = getattr(options, "parent", None)
    if options.config_note is not None:
        _log.info("{note}", note=options.config_note)
    from snet_daemon.frontend.admission import raise_open_file_limit

    raise_open_file_limit()
    try:
        daemon = build_daemon(options.loaded, reactor, twistd_options)
    except ConfigError as error:
        print(f"snetd: configuration error: {error}", file=options.stderr)
        raise SystemExit(1) from None
    except usage.UsageError as error:  # twistd log options snetd's observer cannot follow (oplog.destination)
        print(f"snetd: {error}", file=options.stderr)
        raise SystemExit(1) from None
    # Bound now, while a failure can still be one line on the terminal (see _PublicPort).
    port = daemon.getServiceNamed("listener")
    assert isinstance(port, _PublicPort)
    try:
        port.bind()
    except CannotListenError as error:
        reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
        print(f"snetd: cannot listen on {port.address}: {reason}", file=options.stderr)
        raise SystemExit(1) from None
    reactor.callWhenRunning(freeze_startup_heap)
    return daemon


def freeze_startup_heap() -> None:
    """Keep what is alive at startup out of the garbage collector's full passes.

    A full collection walks every tracked object.  With the ~130,000 that
    importing Twisted, web3, grpc and protobuf leaves, it stopped the event
    loop for 63-76 ms about every 30 s under load in ``benchmarks/paid.py``,
    and every call in flight waited.  What is alive once the reactor runs
    lives as long as the daemon, so it is frozen (``gc.freeze``): full
    collections then walk only what was made since, one or two thousand
    objects, and took 6-15 ms in the same benchmark.
    Only ``twistd snetd`` does this; tests that build daemons in-process
    leave their own heap alone.
    """
    gc.collect()
    gc.freeze()


class _Daemon(OrderedMultiService):
    """The root service; it also gives twistd the configured log observer.

    Its children stop one at a time, the last added first, which
    :func:`build_daemon` relies on: the port closes, then SIGHUP is
    ignored, then running calls drain and the payment storage closes, then
    the heartbeat's own connection to ``heartbeat_endpoint`` (if any)
    closes, then the chain services close what the calls used, and the
    SIGUSR1 log rotation handler (if any) goes last.
    """

    def __init__(self) -> None:
        super().__init__()
        self.log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> Any:
        # twistd asks the application for an ILogObserver after makeService
        # and before starting: this is where the configured one gets in.
        if (
            self.log_observer is not None
            and hasattr(parent, "setComponent")
            and parent.getComponent(ILogObserver, None) is None
        ):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)  # type: ignore[no-untyped-call]


class _AsyncService(Service):
    """A named service that calls ``start()`` when started and awaits ``stop()`` when stopped.

    ``stop`` returns an awaitable, run on the asyncio reactor's loop, so a
    stop made of ordered asynchronous steps is one service; the Deferred
    :meth:`stopService` returns makes twistd (and the root) wait for it.
    ``start`` is a plain function: nothing waits for a service's start.
    """

    def __init__(
        self,
        name: str,
        start: Callable[[], None] | None = None,
        stop: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.setName(name)  # type: ignore[no-untyped-call]
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._start is not None:
            self._start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._stop is None:
            return None
        return Deferred.fromFuture(asyncio.ensure_future(self._stop()))


def build_daemon(loaded: LoadedConfig, reactor: Any, twistd_options: Any = None) -> MultiService:
    """The composition root: every component, wired from the configuration.

    Args:
        loaded: the validated configuration and its warnings.
        reactor: the (asyncio) reactor.
        twistd_options: twistd's own options (for the log destination), or
            None when not run by twistd.

    Raises:
        ConfigError: what :func:`check_config` finds (e.g. a custom
            network without an endpoint).
    """
    # Imports here keep ``twistd --help`` fast and reactor-free.
    from twisted.python.logfile import LogFile

    from snet_daemon._proto.escrow import control_service_pb2 as cpb
    from snet_daemon._proto.escrow import state_service_pb2 as spb
    from snet_daemon._proto.escrow import token_service_pb2 as tpb
    from snet_daemon.blockchain.build import build_chain
    from snet_daemon.config.durations import parse_duration
    from snet_daemon.frontend.admission import connection_limit, open_file_limit
    from snet_daemon.frontend.cors import CorsPolicy
    from snet_daemon.frontend.gateway import Gateway, Limits, Router
    from snet_daemon.frontend.listener import OnePortFactory
    from snet_daemon.frontend.routes import DaemonRoutes
    from snet_daemon.frontend.services import unary
    from snet_daemon.ops import logging as oplog
    from snet_daemon.ops.heartbeat import (
        GrpcHealthProbe,
        Heartbeat,
        HeartbeatIdentity,
        HttpGet,
        HttpProbe,
        TcpProbe,
        host_port,
        storage_cert_details,
    )
    from snet_daemon.ops.reload import SighupReload
    from snet_daemon.payments.stack import (
        PaymentStack,
        disabled_free_call_service,
        empty_state_service,
        empty_token_service,
    )
    from snet_daemon.storage.factory import MetadataStorageClient, build_storage
    from snet_daemon.upstream.grpc import GrpcPassthrough
    from snet_daemon.upstream.h2client import H2Upstream
    from snet_daemon.upstream.select import ServiceUpstream

    config = loaded.config
    # Again (postOptions ran it), for callers that build without twistd.
    check_warnings = check_config(config)
    root = _Daemon()
    stream = oplog.destination(twistd_options)
    if stream is not None:
        root.log_observer = oplog.observer_for(config.log_settings.level, config.log_settings.json, stream)
    if isinstance(stream, LogFile):
        oplog.RotateOnSigusr1(reactor, stream).setServiceParent(root)  # type: ignore[no-untyped-call]
    for warning in (*loaded.warnings, *check_warnings):
        _log.warn("{warning}", warning=warning)

    loop = reactor._asyncioEventloop
    identity = config.identity

    # -- the chain and the metadata -------------------------------------------------
    # Added first, so stopped last: running calls use the chain until they have drained.
    chain = build_chain(config.chain, reactor)
    for child in chain.services:
        child.setServiceParent(root)
    # SIGHUP must never stop the daemon, whatever this configuration builds.
    reloads = []
    if chain.metadata is not None:
        metadata_source = chain.metadata
        reloads.append(("metadata", lambda: metadata_source.request_refresh("SIGHUP")))
    sighup = SighupReload(reactor, reloads)

    # -- the service behind the daemon ----------------------------------------------
    upstream_settings = config.upstream
    host, port = host_port(upstream_settings.target)
    grpc_client = H2Upstream(
        reactor,
        host,
        port,
        upstream_settings.endpoint,
        loop,
        tls=upstream_settings.tls,
        max_message_size=upstream_settings.max_message_size,
    )
    service = ServiceUpstream(
        upstream_settings,
        reactor=reactor,
        grpc=GrpcPassthrough(grpc_client),
        metadata=chain.metadata,
        process_limit=config.max_concurrent_processes,
    )

    # -- payments -------------------------------------------------------------------
    router: Router
    payments: PaymentStack | None = None
    if identity.blockchain_enabled:
        assert chain.reader is not None
        assert chain.metadata is not None
        reader, metadata = chain.reader, chain.metadata

        def make_storage(client: MetadataStorageClient) -> Any:
            return build_storage(
                config.storage, process_reactor=reactor, clock=reactor, workdir=Path.cwd(), metadata=client
            )

        payments = PaymentStack(
            upstream=service,
            chain=reader,
            metadata=metadata,
            make_storage=make_storage,
            parse_duration=parse_duration,
            network=identity.network,
            organization_id=identity.organization_id,
            instance=f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}",
            not_ready=lambda: _payment_blockers(reader, metadata),
            service_id=identity.service_id,
            free_calls=_free_call_settings(config),
            tokens=_token_settings(config),
            clock=reactor.seconds,
        )
        router = Router(default=payments.paid_call)
        router.add(
            "/escrow.PaymentChannelStateService/GetChannelState",
            unary(spb.ChannelStateRequest, payments.get_channel_state),
        )
        free_call = "/escrow.FreeCallStateService/"
        router.add(free_call + "GetFreeCallToken", unary(spb.GetFreeCallTokenRequest, payments.get_free_call_token))
        router.add(
            free_call + "GetFreeCallsAvailable", unary(spb.FreeCallStateRequest, payments.get_free_calls_available)
        )
        router.add("/escrow.TokenService/GetToken", unary(tpb.TokenRequest, payments.get_token))
        control = "/escrow.ProviderControlService/"
        router.add(control + "GetListUnclaimed", unary(cpb.GetPaymentsListRequest, payments.get_list_unclaimed))
        router.add(control + "GetListInProgress", unary(cpb.GetPaymentsListRequest, payments.get_list_in_progress))
        router.add(control + "StartClaim", unary(cpb.StartClaimRequest, payments.start_claim))
        router.add(
            control + "StartClaimForMultipleChannels",
            unary(cpb.StartMultipleClaimRequest, payments.start_claim_for_multiple_channels),
        )
    else:
        # No payments: calls are served free, as the Go daemon does with
        # blockchain_enabled false; the state service answers empty.
        router = Router(default=service)
        router.add(
            "/escrow.PaymentChannelStateService/GetChannelState", unary(spb.ChannelStateRequest, empty_state_service())
        )
        no_token, no_free_calls = disabled_free_call_service()
        router.add("/escrow.FreeCallStateService/GetFreeCallToken", unary(spb.GetFreeCallTokenRequest, no_token))
        router.add("/escrow.FreeCallStateService/GetFreeCallsAvailable", unary(spb.FreeCallStateRequest, no_free_calls))
        router.add("/escrow.TokenService/GetToken", unary(tpb.TokenRequest, empty_token_service()))

    # -- heartbeat ------------------------------------------------------------------
    heartbeat_settings = config.heartbeat
    probe: Any
    if heartbeat_settings.probe_type == "grpc":
        check = grpc_client.unary
        health_target = heartbeat_settings.grpc_target
        if health_target is not None:
            # As Go: the Check goes to heartbeat_endpoint, on a connection of
            # its own (the service's carries calls).  Made on the first probe
            # and kept for the next ones, so probes leave no connections
            # behind; one that times out is dropped (a silently dead peer
            # would fail every later probe too).  A service of its own closes
            # it when the daemon stops: it carries no calls to drain first.
            health_client = H2Upstream(
                reactor,
                health_target.host,
                health_target.port,
                heartbeat_settings.endpoint,
                loop,
                tls=health_target.tls,
            )
            check = functools.partial(health_client.unary, drop_on_timeout=True)
            _AsyncService("heartbeat", stop=health_client.close).setServiceParent(root)  # type: ignore[no-untyped-call]
        # Named service_id as Go names it; "" when the server does not know it.
        probe = GrpcHealthProbe(check, service=identity.service_id)
    elif heartbeat_settings.probe_type in ("http", "https"):
        # As Go: GET heartbeat_endpoint (an http(s) URL, checked at load),
        # serving when it answers 200 with a body.
        probe = HttpProbe(heartbeat_settings.endpoint, HttpGet(reactor, timeout=HTTP_PROBE_TIMEOUT))
    else:
        # tcp, none and "": as Go, a TCP connect to the service's own
        # host:port.  heartbeat_endpoint is not read: Go ignores it for these
        # types, and one left over in an old Go config must not make a
        # healthy service Offline.
        probe = _ServiceProbe(service, TcpProbe(host, port))

    def heartbeat_identity() -> HeartbeatIdentity:
        current = chain.metadata.current if chain.metadata is not None else None
        return HeartbeatIdentity(
            organization_id=identity.organization_id,
            service_id=identity.service_id,
            group_id=current.group_id_base64 if current is not None else "",
            registry_address=chain.registry_address,
            daemon_version=__version__,
            blockchain_enabled=identity.blockchain_enabled,
            network=identity.network,
        )

    def problems() -> tuple[str, ...]:
        found = list(chain.readiness().reasons)
        if payments is not None:
            found += [p for p in payments.problems() if p not in found]
        status = service.status()
        if not status.ready and status.error:
            found.append(f"service: {status.error}")
        return tuple(found)

    heartbeat = Heartbeat(
        heartbeat_identity,
        probe,
        reactor.seconds,
        problems,
        storage_cert=storage_cert_details(config.storage.cert_path),
    )

    # -- the public port ------------------------------------------------------------
    gateway = Gateway(
        router=router,
        routes=DaemonRoutes(heartbeat.report, encoding=lambda: service.status().encoding),
        cors=CorsPolicy(config.frontend.cors_allowed_origins),
        limits=Limits(
            max_message_size=config.frontend.max_message_size,
            default_timeout=upstream_settings.timeout,
        ),
        loop=loop,
    )

    def start() -> None:
        service.start()
        if upstream_settings.passthrough_enabled:
            grpc_client.open()
        if payments is not None:
            payments.start()

    async def stop() -> None:
        # In this order: running calls finish (or are ended after the grace
        # period) and commit their payments, then the service adapters and
        # the storage close.  The chain services stop after this one.
        await gateway.drain(SHUTDOWN_GRACE)
        await service.close()
        await grpc_client.close()
        if payments is not None:
            await payments.stop()

    _AsyncService("calls", start=start, stop=stop).setServiceParent(root)  # type: ignore[no-untyped-call]
    # Stopped before the calls drain: a SIGHUP during the drain is ignored (see SighupReload).
    sighup.setServiceParent(root)  # type: ignore[no-untyped-call]

    def announce(address: str) -> None:
        _log.info(
            "snetd {version} listening on {address}, forwarding to {service}{payments}",
            version=__version__,
            address=address,
            service=upstream_settings.endpoint if upstream_settings.passthrough_enabled else "(echo)",
            payments=", with payments" if payments is not None else ", without payments (blockchain disabled)",
        )

    max_connections, limit_warning = connection_limit(config.frontend.max_connections, open_file_limit())
    if limit_warning is not None:
        _log.warn("{warning}", warning=limit_warning)
    listen = config.listen
    factory = OnePortFactory(gateway, max_connections=max_connections)
    public_port = _PublicPort(reactor, listen.host, listen.port, factory, announce)
    public_port.setServiceParent(root)  # type: ignore[no-untyped-call]
    return root


def _address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _PublicPort(Service):
    """The daemon's one port: bound by :func:`makeService`, served once the service starts.

    Why bind that early: twistd calls ``makeService`` before it daemonizes,
    writes its pid file and starts logging.  A port that cannot be bound is
    then one line on the operator's terminal and exit status 1, with
    nothing left behind, instead of a traceback after a "listening" log
    line.  The bound socket survives twistd's fork; the reactor adopts it
    when the service starts.  Like ``privilegedStartService``, this binds
    before twistd sheds privileges (``--uid``), so ports below 1024 work.

    Args:
        reactor: adopts the bound socket (``IReactorSocket``).
        host: interface (``""``: all; IPv6 without brackets).
        port: TCP port (0: any free one; the log shows which).
        factory: the protocol factory of every connection.
        announce: called with ``host:port`` once the port is bound: the
            "listening" line is only ever logged when it is true.
    """

    name = "listener"

    #: Pending connections the kernel queues (Twisted's listenTCP default).
    BACKLOG = 50

    def __init__(
        self,
        reactor: IReactorSocket,
        host: str,
        port: int,
        factory: IProtocolFactory,
        announce: Callable[[str], None],
    ) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._factory = factory
        self._announce = announce
        self._socket: socket.socket | None = None
        self._listening: IListeningPort | None = None

    @property
    def address(self) -> str:
        """The configured ``host:port``, for messages."""
        return _address(self._host, self._port)

    def bind(self) -> None:
        """Bind and listen now, unless done already.

        Raises:
            CannotListenError: the address is in use, not local, or not
                allowed (``socketError`` says which).
        """
        if self._socket is not None or self._listening is not None:
            return
        try:
            sock = self._listen()
        except OSError as error:
            raise CannotListenError(self._host, self._port, error) from None
        self._socket = sock
        self._announce(_address(self._host, sock.getsockname()[1]))

    def _listen(self) -> socket.socket:
        """A listening socket on the configured address.

        An empty host means every interface, IPv6 as well as IPv4, as Go's
        ``:8080`` does: one socket on ``::`` with ``IPV6_V6ONLY`` off, which
        IPv4 clients reach too (as ``::ffff:a.b.c.d``).  A machine without
        IPv6 gets ``0.0.0.0``.
        """
        if not self._host:
            try:
                return _listening_socket(socket.AF_INET6, ("::", self._port), self.BACKLOG, dual_stack=True)
            except OSError as error:
                if error.errno not in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL):
                    raise
            return _listening_socket(socket.AF_INET, ("0.0.0.0", self._port), self.BACKLOG)
        if ":" in self._host:
            # Scope ids (fe80::1%eth0) need the resolved form, as in Twisted.
            sockaddr = socket.getaddrinfo(self._host, self._port, socket.AF_INET6, 0, 0, socket.AI_NUMERICHOST)[0][4]
            return _listening_socket(socket.AF_INET6, sockaddr, self.BACKLOG)
        return _listening_socket(socket.AF_INET, (self._host, self._port), self.BACKLOG)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.bind()  # when makeService did not (embedded use)
        sock, self._socket = self._socket, None
        assert sock is not None
        try:
            # Annotated as taking a ServerFactory; any IProtocolFactory works, as with endpoints.
            self._listening = self._reactor.adoptStreamPort(
                sock.fileno(),
                sock.family,
                self._factory,  # type: ignore[arg-type]
            )
        finally:
            sock.close()  # the reactor holds its own duplicate

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        listening, self._listening = self._listening, None
        if listening is None:
            return None
        stopped: Deferred[None] | None = listening.stopListening()
        return stopped


def _listening_socket(family: int, sockaddr: Any, backlog: int, *, dual_stack: bool = False) -> socket.socket:
    """A non-blocking socket of ``family`` bound to ``sockaddr`` and listening (closed if that fails).

    ``dual_stack``: an IPv6 socket that takes IPv4 clients too (``IPV6_V6ONLY``
    off; Linux's default, but a sysctl or another system may differ).
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # As Twisted's listenTCP: a restart must not wait for TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _free_call_settings(config: DaemonConfig) -> FreeCallSettings:
    """The free-call keys of the configuration, parsed for the payment code."""
    from snet_daemon.payments.freecall import FreeCallSettings
    from snet_daemon.payments.signatures import address_bytes

    key = config.private_key_for_free_calls
    return FreeCallSettings(
        signer_key=bytes.fromhex(key.removeprefix("0x").removeprefix("0X")) if key else None,
        trusted_signers=frozenset(address_bytes(a) for a in config.trusted_free_call_signers),
        min_balance=int(config.min_balance_for_free_call),
        per_address={address_bytes(a): n for a, n in config.free_calls_per_address.items()},
        block_interval=config.chain.block_poll_interval,
    )


def _token_settings(config: DaemonConfig) -> TokenSettings:
    """The prepaid-token keys of the configuration."""
    from snet_daemon.payments.tokens import TokenSettings

    return TokenSettings(secret=config.token_secret_key.encode(), expiry_minutes=config.token_expiry_in_minutes)


def _payment_blockers(reader: Any, metadata: Any) -> tuple[str, ...]:
    """What stops every payment (as opposed to the chain's overall health).

    An RPC endpoint that is down does not: known channels keep being served
    from the cache as long as the cached block number is fresh enough, a
    bound each payment checks itself.
    """
    reasons = []
    if reader.chain_id_error:
        reasons.append(f"chain: {reader.chain_id_error}")
    if metadata.current is None:
        reasons.append(f"metadata: {metadata.status().error or 'not loaded yet'}")
    return tuple(reasons)


class _ServiceProbe:
    """The heartbeat probe of the tcp, none and empty heartbeat types.

    Types with a network endpoint are probed with a TCP connect to the
    service (Go's default); an executable (``process``) has no address to
    connect to, so it is "serving" when it is ready to run.
    """

    def __init__(self, service: Any, tcp: Any) -> None:
        self._service = service
        self._tcp = tcp

    async def __call__(self) -> bool:
        status = self._service.status()
        if status.service_type == "process":
            return bool(status.ready)
        result: bool = await self._tcp()
        return result
