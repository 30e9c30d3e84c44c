"""Which adapter serves the service: from its metadata, protos and configuration.

The service metadata says how the service is reached (``service_type``:
``grpc``, ``jsonrpc``, ``http`` or ``process``), what its messages are
(``encoding``: ``proto`` or ``json``) and where its ``.proto`` files are
(``service_api_source``, or the legacy ``model_ipfs_hash``).  The metadata
is loaded after the daemon starts (and may be reloaded), so the handler the
composition root installs is a :class:`ServiceUpstream`: it follows the
metadata source, builds the matching adapter (:func:`build_adapter`; protos
compiled once per change), and hands each call to it.

Composition root::

    upstream = ServiceUpstream(
        config.upstream,
        reactor=reactor,
        grpc=GrpcPassthrough(h2_upstream),     # the grpc service type
        metadata=chain.metadata,               # MetadataSource, or None
        process_limit=config.max_concurrent_processes,
    )
    router = Router(default=upstream)          # or PaymentGate(upstream, ...)
    # at start: upstream.start();  at stop (after the calls drained): await upstream.close()
    # heartbeat / readiness: upstream.status()

Without metadata (blockchain disabled and no ``service_metadata_uri``) the
service is ``grpc`` with ``proto`` encoding, as with the Go daemon.  With
``passthrough_enabled: false`` every call is echoed whatever the type.

Until the metadata is loaded, calls wait for it (up to ``first_load_wait``
seconds and their deadline); when it cannot be loaded, or names a type this
daemon cannot serve, or its protos do not compile, or ``executable_path`` is
not executable, calls fail with ``UNAVAILABLE`` and the reason, which is also
logged and reported by :meth:`ServiceUpstream.status`.  When new metadata
changes the type, encoding or proto source, the new adapter is built in the
background while the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger

from snet_daemon.config.sections import UpstreamSettings
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.frontend.wire import Metadata
from snet_daemon.upstream.echo import echo
from snet_daemon.upstream.http import HttpClient, HttpUpstream
from snet_daemon.upstream.jsonrpc import JsonRpcUpstream
from snet_daemon.upstream.process import (
    ProcessLimiter,
    ProcessUpstream,
    default_process_limit,
    find_executable,
)
from snet_daemon.upstream.protos import Fetcher, ProtoError, ServiceProtos, api_source_uri, load_protos

__all__ = [
    "SERVICE_TYPES",
    "MetadataSourceLike",
    "ServiceKind",
    "ServiceStatus",
    "ServiceUpstream",
    "Upstream",
    "build_adapter",
]

_log = Logger(namespace="snetd.upstream")

SERVICE_TYPES: Final = ("grpc", "jsonrpc", "http", "process")
ENCODINGS: Final = ("proto", "json")
#: Seconds before a failed build (bad protos, missing executable) is retried.
RETRY_AFTER: Final = 30.0


class Upstream(Protocol):
    """What every adapter is: the payment gate calls ``forward``, the router ``__call__``."""

    async def forward(self, call: ServerCall, metadata: Metadata) -> None:
        """Serve ``call``; ``metadata`` is what the service may be sent."""

    async def __call__(self, call: ServerCall) -> None:
        """Serve ``call`` with its own metadata."""


class ServiceDocument(Protocol):
    """The fields of the service metadata used here (``ServiceMetadata``)."""

    @property
    def service_type(self) -> str: ...
    @property
    def encoding(self) -> str: ...
    @property
    def service_api_source(self) -> str: ...
    @property
    def model_ipfs_hash(self) -> str: ...


class _Status(Protocol):
    @property
    def error(self) -> str | None: ...


class MetadataSourceLike(Protocol):
    """What is used of :class:`snet_daemon.blockchain.refresh.MetadataSource`."""

    @property
    def service(self) -> Any:
        """The current service document (a :class:`ServiceDocument`), or None before the first load."""

    @property
    def loader(self) -> Fetcher:
        """Fetches URIs (the proto archive)."""

    def status(self) -> _Status:
        """The last load error, if any."""

    async def wait_loaded(self) -> None:
        """Returns after the first successful load."""

    def subscribe(self, callback: Callable[[Any], object]) -> Callable[[], None]:
        """Be called with each newly loaded metadata."""


@dataclass(frozen=True, slots=True)
class ServiceKind:
    """How the service is reached, from its metadata.

    Attributes:
        service_type: ``grpc``, ``jsonrpc``, ``http`` or ``process``.
        encoding: ``proto`` or ``json``.
        api_source: URI of the proto archive, or ``""``.
    """

    service_type: str = "grpc"
    encoding: str = "proto"
    api_source: str = ""

    @classmethod
    def of(cls, service: ServiceDocument) -> ServiceKind:
        """The kind a service document describes (names are case-insensitive)."""
        return cls(
            service_type=service.service_type.strip().lower() or "grpc",
            encoding=service.encoding.strip().lower() or "proto",
            api_source=api_source_uri(service.service_api_source, service.model_ipfs_hash),
        )

    def check(self) -> None:
        """Raise ``ValueError`` naming the metadata field this daemon cannot serve."""
        if self.service_type not in SERVICE_TYPES:
            raise ValueError(
                f"service metadata service_type {self.service_type!r} is not one of {', '.join(SERVICE_TYPES)}"
            )
        if self.encoding not in ENCODINGS:
            raise ValueError(f"service metadata encoding {self.encoding!r} is not 'proto' or 'json'")


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """Readiness of the service-type adapter, for the heartbeat.

    Attributes:
        ready: an adapter is serving calls.
        service_type: the type being served (or being prepared).
        encoding: its encoding.
        methods: methods known from the protos (0 without protos).
        error: why not ready, or why the last rebuild failed; None if fine.
    """

    ready: bool
    service_type: str
    encoding: str
    methods: int
    error: str | None


class _Echo:
    """``passthrough_enabled: false``: every call is echoed."""

    async def forward(self, call: ServerCall, metadata: Metadata) -> None:
        await echo(call)

    async def __call__(self, call: ServerCall) -> None:
        await echo(call)


def build_adapter(
    kind: ServiceKind,
    protos: ServiceProtos | None,
    settings: UpstreamSettings,
    *,
    reactor: IReactorProcess,
    grpc: Upstream,
    http: Callable[[], HttpClient],
    limiter: ProcessLimiter,
    environ: Mapping[str, str],
) -> Upstream:
    """The adapter for ``kind``.

    Args:
        kind: from the service metadata.
        protos: the compiled protos, or None without ``service_api_source``.
        settings: ``config.upstream``.
        reactor: the reactor (processes; HTTP through ``http``).
        grpc: the passthrough, used for ``grpc`` services.
        http: returns the shared HTTP client (created on first use).
        limiter: the shared limit on running processes.
        environ: the environment processes start from.

    Raises:
        ValueError: an unknown type or encoding, or ``executable_path`` is
            not an executable file (for ``process``).
    """
    kind.check()
    if not settings.passthrough_enabled:
        return _Echo()
    if kind.service_type == "grpc":
        return grpc
    if kind.service_type == "jsonrpc":
        return JsonRpcUpstream(
            http(),
            settings.endpoint,
            protos=protos,
            encoding=kind.encoding,
            max_message_size=settings.max_message_size,
        )
    if kind.service_type == "http":
        return HttpUpstream(
            http(),
            settings.endpoint,
            protos=protos,
            encoding=kind.encoding,
            credentials=settings.service_credentials,
            max_message_size=settings.max_message_size,
        )
    return ProcessUpstream(
        reactor,
        find_executable(settings.executable_path),
        protos=protos,
        encoding=kind.encoding,
        limiter=limiter,
        environ=environ,
        max_message_size=settings.max_message_size,
    )


class ServiceUpstream:
    """The handler for every service call: the adapter for the current metadata.

    Args:
        settings: ``config.upstream``.
        reactor: the (asyncio) reactor: processes, TCP, time.
        grpc: the gRPC passthrough (:class:`~snet_daemon.upstream.grpc.GrpcPassthrough`).
        metadata: the metadata source, or None when there is no metadata
            (the service is then ``grpc``/``proto``).
        process_limit: ``max_concurrent_processes`` (0: twice the CPUs).
        environ: the environment executables start from (default: the
            daemon's; ``SNET_*`` variables are never passed on).
        first_load_wait: seconds a call waits for the first metadata load.
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        reactor: Any,
        grpc: Upstream,
        metadata: MetadataSourceLike | None,
        process_limit: int = 0,
        environ: Mapping[str, str] | None = None,
        first_load_wait: float = 10.0,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._grpc = grpc
        self._source = metadata
        self._environ = os.environ if environ is None else environ
        self._first_load_wait = first_load_wait
        self.limiter = ProcessLimiter(process_limit or default_process_limit())
        self._http: HttpClient | None = None
        self._adapter: Upstream | None = None
        self._adapter_kind: ServiceKind | None = None
        self._protos: ServiceProtos | None = None
        self._wanted: ServiceKind | None = None
        self._building: asyncio.Task[None] | None = None
        self._error: str | None = None
        self._failed_at: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self._closed = False
        #: The service document last compared with the adapter's kind.
        self._seen: object = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Prepare the adapter as soon as the metadata is there (call with the loop running)."""
        self._closed = False
        if self._source is not None:
            self._unsubscribe = self._source.subscribe(lambda _current: self._follow())
        self._spawn(self._prepare())

    async def close(self) -> None:
        """Stop following the metadata and close the HTTP connection pool."""
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    def status(self) -> ServiceStatus:
        """What is being served, and the last problem."""
        kind = self._adapter_kind or self._wanted or ServiceKind()
        return ServiceStatus(
            ready=self._adapter is not None,
            service_type=kind.service_type,
            encoding=kind.encoding,
            methods=len(self._protos.methods) if self._protos is not None and self._adapter is not None else 0,
            error=self._error,
        )

    async def ready(self) -> Upstream:
        """The adapter, once there is one (waiting for the metadata as a call would).

        Raises:
            GrpcError: ``UNAVAILABLE`` with the reason there is none.
        """
        return await self._current()

    # -- calls ---------------------------------------------------------------------

    async def __call__(self, call: ServerCall) -> None:
        """Serve ``call`` with its own metadata."""
        await self.forward(call, call.metadata)

    async def forward(self, call: ServerCall, metadata: Metadata) -> None:
        """Serve ``call`` with the current adapter."""
        adapter = self._adapter
        if adapter is None or (self._source is not None and self._source.service is not self._seen):
            # Not ready, or the metadata was reloaded since it was last looked at.
            adapter = await self._current()
        await adapter.forward(call, metadata)

    # -- internals -------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prepare(self) -> None:
        if self._source is not None:
            await self._source.wait_loaded()
        self._follow()

    def _kind(self) -> ServiceKind | None:
        """The kind the metadata asks for now, or None before it is loaded."""
        if self._source is None:
            return ServiceKind()
        service = self._source.service
        if service is None:
            return None
        self._seen = service
        return ServiceKind.of(service)

    def _follow(self) -> None:
        """Start building the adapter if the metadata asks for a different one."""
        kind = self._kind()
        if kind is None or self._closed:
            return
        retry = (
            kind == self._wanted
            and self._building is None
            and self._adapter_kind != kind
            and self._failed_at is not None
            and time.monotonic() - self._failed_at >= RETRY_AFTER
        )
        if kind == self._wanted and not retry:
            return
        self._wanted = kind
        if self._building is not None:
            self._building.cancel()
        self._building = asyncio.ensure_future(self._build(kind))
        self._tasks.add(self._building)
        self._building.add_done_callback(self._tasks.discard)

    async def _build(self, kind: ServiceKind) -> None:
        try:
            kind.check()
            protos = None
            if kind.service_type != "grpc" and self._settings.passthrough_enabled:
                if kind.api_source:
                    if self._source is None:  # pragma: no cover - no source, no api_source
                        raise ProtoError("service_api_source needs a metadata loader")
                    protos = await load_protos(kind.api_source, self._source.loader, self._reactor)
                else:
                    _log.warn(
                        "service metadata has no service_api_source: {service_type} calls must send JSON "
                        "messages, and streaming calls are served one message at a time",
                        service_type=kind.service_type,
                    )
            adapter = build_adapter(
                kind,
                protos,
                self._settings,
                reactor=self._reactor,
                grpc=self._grpc,
                http=self._http_client,
                limiter=self.limiter,
                environ=self._environ,
            )
        except Exception as exc:
            if not isinstance(exc, ProtoError | ValueError):
                _log.failure("unexpected error while preparing the service adapter")
            self._error = str(exc) if isinstance(exc, ProtoError | ValueError) else "internal error (see the log)"
            self._failed_at = time.monotonic()  # not the wall clock: it can step back
            if self._adapter is not None:
                _log.error(
                    "cannot switch to service type {service_type}; still serving as {current}: {error}",
                    service_type=kind.service_type,
                    current=self._adapter_kind.service_type if self._adapter_kind else "?",
                    error=self._error,
                )
            else:
                _log.error("cannot serve the service: {error}", error=self._error)
            return
        finally:
            if self._building is asyncio.current_task():
                self._building = None
        self._adapter, self._adapter_kind, self._protos = adapter, kind, protos
        self._error = self._failed_at = None
        _log.info(
            "service type {service_type} ready: encoding {encoding}, {methods} methods from {source}",
            service_type=kind.service_type,
            encoding=kind.encoding,
            methods=len(protos.methods) if protos is not None else 0,
            source=kind.api_source or "(no service_api_source)",
        )

    def _http_client(self) -> HttpClient:
        if self._http is None:
            self._http = HttpClient(self._reactor)
        return self._http

    async def _current(self) -> Upstream:
        self._follow()
        adapter = self._adapter
        if adapter is not None:
            return adapter
        if self._wanted is None and self._source is not None:
            error = self._source.status().error
            if error:
                raise GrpcError(Status.UNAVAILABLE, f"service metadata is not loaded: {error}")
            try:
                async with asyncio.timeout(self._first_load_wait):
                    await asyncio.shield(self._source.wait_loaded())
            except TimeoutError:
                raise GrpcError(Status.UNAVAILABLE, "service metadata is not loaded yet") from None
            self._follow()
        while (building := self._building) is not None and self._adapter is None:
            try:
                await asyncio.shield(building)
            except asyncio.CancelledError:
                if not building.cancelled():
                    raise  # this call was cancelled, not the build
        return self._adapter_or_error()

    def _adapter_or_error(self) -> Upstream:
        if self._adapter is None:
            raise GrpcError(Status.UNAVAILABLE, f"the service cannot be served: {self._error or 'not ready'}")
        return self._adapter
