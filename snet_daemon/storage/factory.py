"""From the configuration to a running storage: the one call the composition root makes.

The decision, from ``payment_channel_storage_*`` (and, as in Go, the
organisation metadata's ``payment_channel_storage_client`` for a group):

=====================================  =========================================
``payment_channel_storage_type``       result
=====================================  =========================================
anything but ``etcd`` (exactly)        :class:`~.memory.MemoryStorage` (state is
                                       lost on restart; one daemon only)
``etcd``, endpoints configured          :class:`~.etcd.EtcdStorage` on those
(config first, else metadata)          endpoints (an external cluster)
``etcd``, no endpoints anywhere         an :class:`~.embedded.EmbeddedEtcd` child
                                       process, and an ``EtcdStorage`` on it
=====================================  =========================================

``payment_channel_storage_server.enabled: true`` also starts the embedded
server when endpoints are configured (Go's meaning of the key: this daemon
hosts a member of the group's cluster); the client then uses the configured
endpoints.  ``enabled: false`` does not stop the embedded server when no
endpoints are configured anywhere.  :func:`embedded_etcd_need` is the
decision; ``snet_daemon.tap.check_config`` asks it too, to report a missing
etcd program before startup.

Timeouts: the configured value when non-zero, else the metadata's, else
:data:`~.etcd.DEFAULT_CONNECTION_TIMEOUT` / :data:`~.etcd.DEFAULT_REQUEST_TIMEOUT`.

The result bundles the storage with one Twisted service that starts the
pieces in order (embedded server, healthy; client connected; lease granted)
and stops them in reverse (lease revoked, client closed, server stopped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger

from snet_daemon.config.sections import StorageSettings
from snet_daemon.storage.base import AtomicStorage, StorageSetupError
from snet_daemon.storage.embedded import EXTERNAL_ALONE, EmbeddedEtcd, find_etcd
from snet_daemon.storage.etcd import (
    DEFAULT_CONNECTION_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    EtcdStorage,
    EtcdTls,
    parse_endpoint,
)
from snet_daemon.storage.lease import DEFAULT_LEASE_TTL, LeaseKeeper
from snet_daemon.storage.memory import MemoryStorage

__all__ = [
    "ETCD_PROGRAM",
    "EmbeddedEtcdNeed",
    "MetadataStorageClient",
    "StorageMode",
    "StorageService",
    "StorageSetup",
    "build_storage",
    "embedded_etcd_need",
]

_log = Logger(namespace="snetd.storage")

StorageMode = Literal["memory", "etcd", "embedded-etcd"]

#: The program the embedded etcd server runs, looked up on ``PATH``
#: (Debian's ``etcd-server`` package installs it).
ETCD_PROGRAM = "etcd"


@dataclass(frozen=True, slots=True)
class MetadataStorageClient:
    """The organisation metadata group's ``payment_channel_storage_client``.

    Used only where the configuration leaves a value unset, as in Go.

    Attributes:
        endpoints: etcd client URLs.
        connection_timeout: Seconds; 0 if not given.
        request_timeout: Seconds; 0 if not given.
    """

    endpoints: tuple[str, ...] = ()
    connection_timeout: float = 0.0
    request_timeout: float = 0.0


class StorageService(Service):
    """Starts and stops the storage pieces in order.

    Start: embedded etcd (if any) until healthy → client connected → lease
    keeper started.  Stop, in reverse: lease revoked → client closed →
    embedded etcd stopped.  A ``MultiService`` would stop them all at once,
    revoking the lease against an etcd that is already shutting down.
    """

    name = "storage"

    def __init__(
        self,
        storage: AtomicStorage,
        keeper: LeaseKeeper,
        embedded: EmbeddedEtcd | None,
        describe: str,
    ) -> None:
        self._storage = storage
        self._keeper = keeper
        self._embedded = embedded
        self._describe = describe
        self._starting: asyncio.Future[None] | None = None

    async def ready(self) -> None:
        """Complete when the storage is usable.

        Raises:
            EmbeddedEtcdStartError: The embedded server did not start (a
                :class:`StorageUnavailable`: worth retrying).
            StorageError: The etcd cluster could not be reached within the
                connection timeout.
        """
        if self._starting is None:
            raise StorageSetupError("the storage service has not been started")
        await asyncio.shield(self._starting)

    def startService(self) -> None:
        """Start everything; failures surface through :meth:`ready`.

        Raises:
            StorageSetupError: The embedded etcd binary is missing (raised
                synchronously so that twistd aborts startup).
        """
        if self._embedded is not None:
            self._embedded.startService()
        super().startService()  # type: ignore[no-untyped-call]
        starting = asyncio.ensure_future(self._start())
        # Callers who never await ready() must not get "exception never retrieved".
        starting.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._starting = starting

    async def _start(self) -> None:
        if self._embedded is not None:
            await self._embedded.ready()
        if isinstance(self._storage, EtcdStorage):
            version = await self._storage.open()
            _log.info("payment storage: {describe} (etcd {version})", describe=self._describe, version=version)
        else:
            _log.info("payment storage: {describe}", describe=self._describe)
        self._keeper.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromFuture(asyncio.ensure_future(self._stop()))

    async def _stop(self) -> None:
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done():
            starting.cancel()
        if self._keeper.running:
            await self._keeper.stopService().asFuture(asyncio.get_running_loop())
        await self._storage.close()
        if self._embedded is not None and self._embedded.running:
            await self._embedded.stopService().asFuture(asyncio.get_running_loop())


@dataclass(frozen=True, slots=True)
class StorageSetup:
    """What :func:`build_storage` returns.

    Attributes:
        storage: Give this to the payment code.
        service: Add to the daemon's service tree (stop it *after* calls
            have drained: in-flight payments commit through ``storage``).
        lease_keeper: The daemon instance's lease (for leased holds).
        mode: ``memory``, ``etcd`` (external) or ``embedded-etcd``.
        embedded: The embedded server, if one runs.
    """

    storage: AtomicStorage
    service: StorageService
    lease_keeper: LeaseKeeper
    mode: StorageMode
    embedded: EmbeddedEtcd | None = field(default=None)

    async def ready(self) -> None:
        """Complete when the storage is usable (see :meth:`StorageService.ready`)."""
        await self.service.ready()


@dataclass(frozen=True, slots=True)
class EmbeddedEtcdNeed:
    """Why the embedded etcd server runs, in the configuration's words.

    Attributes:
        why: The keys that make it run.
        otherwise: How to do without it (ends an error message that has
            already said how to install etcd).
        certain: False when it runs only if the organisation metadata,
            not loaded yet, names no etcd endpoints.
    """

    why: str
    otherwise: str
    certain: bool = True


def embedded_etcd_need(settings: StorageSettings, metadata_endpoints: Sequence[str] | None) -> EmbeddedEtcdNeed | None:
    """Whether :func:`build_storage` runs the embedded etcd server, and why.

    Args:
        settings: ``config.storage``.
        metadata_endpoints: The organisation metadata group's etcd
            endpoints, or None when the metadata is not loaded yet (as for
            ``--check-config``): then, with no endpoints in the
            configuration and ``payment_channel_storage_server.enabled``
            false, the answer is not certain.

    Returns:
        None when no embedded server runs: storage in memory, or endpoints
        known and ``payment_channel_storage_server.enabled`` false.
    """
    if not settings.uses_etcd:
        return None
    endpoints = settings.endpoints or metadata_endpoints
    if settings.server.enabled:
        if endpoints:
            return EmbeddedEtcdNeed(
                "payment_channel_storage_server.enabled is true, so snetd runs an etcd server of its own "
                "besides using the configured etcd endpoints",
                "or set payment_channel_storage_server.enabled to false to use only those endpoints",
            )
        return EmbeddedEtcdNeed(
            "payment_channel_storage_server.enabled is true, so snetd runs an etcd server of its own",
            EXTERNAL_ALONE,
        )
    if endpoints:
        return None
    otherwise = "or configure an external etcd cluster with payment_channel_storage_client.endpoints"
    if metadata_endpoints is None:
        return EmbeddedEtcdNeed(
            "payment_channel_storage_type is 'etcd' and payment_channel_storage_client.endpoints is empty, so "
            "snetd runs its own etcd server unless the organisation metadata names etcd endpoints",
            otherwise,
            certain=False,
        )
    return EmbeddedEtcdNeed(
        "payment_channel_storage_type is 'etcd' and no etcd endpoints are configured (neither "
        "payment_channel_storage_client.endpoints nor the organisation metadata names any), so snetd runs "
        "its own etcd server",
        otherwise,
    )


def _timeout(configured: float, metadata: float, default: float) -> float:
    for value in (configured, metadata):
        if value > 0:
            return value
    return default


def build_storage(
    settings: StorageSettings,
    *,
    process_reactor: IReactorProcess,
    clock: IReactorTime,
    workdir: Path | None = None,
    metadata: MetadataStorageClient | None = None,
    lease_ttl: int = DEFAULT_LEASE_TTL,
    etcd_binary: str = ETCD_PROGRAM,
) -> StorageSetup:
    """Build the configured storage (see the module docstring for the rules).

    Nothing is started: add ``setup.service`` to the service tree.

    Args:
        settings: ``config.storage``.
        process_reactor: Spawns the embedded etcd (the reactor).
        clock: Time for leases, memory expiry, timers (the reactor).
        workdir: Base of relative server paths; the current directory by
            default (as with the Go daemon).
        metadata: The organisation metadata's client settings, if known.
        lease_ttl: TTL of the daemon instance's lease, seconds.
        etcd_binary: The etcd program for the embedded server.

    Returns:
        The storage, its service and lease keeper.

    Raises:
        StorageSetupError: The embedded server is needed and the etcd binary
            is missing, an endpoint is malformed, or TLS files cannot be
            read.  The message says what to change.
    """
    metadata = metadata or MetadataStorageClient()
    if not settings.uses_etcd:
        memory = MemoryStorage(clock.seconds)
        keeper = LeaseKeeper(memory, clock, ttl=lease_ttl)
        describe = f"in memory (payment_channel_storage_type is {settings.type!r}; state is lost on restart)"
        return StorageSetup(memory, StorageService(memory, keeper, None, describe), keeper, "memory")

    external = tuple(settings.endpoints or metadata.endpoints)
    server = settings.server
    embedded: EmbeddedEtcd | None = None
    need = embedded_etcd_need(settings, metadata.endpoints)
    if need is not None:
        find_etcd(etcd_binary, why=need.why, otherwise=need.otherwise)
        embedded = EmbeddedEtcd(server, process_reactor, clock, workdir=workdir or Path.cwd(), binary=etcd_binary)
    if external:
        endpoints = external
    else:
        assert embedded is not None
        endpoints = (embedded.client_url,)
    try:
        for endpoint in endpoints:
            parse_endpoint(endpoint)
        tls = EtcdTls.from_paths(settings.ca_path, settings.cert_path, settings.key_path)
    except (ValueError, OSError) as error:
        raise StorageSetupError(f"payment channel storage: {error}") from None
    storage = EtcdStorage(
        endpoints,
        request_timeout=_timeout(settings.request_timeout, metadata.request_timeout, DEFAULT_REQUEST_TIMEOUT),
        connection_timeout=_timeout(
            settings.connection_timeout, metadata.connection_timeout, DEFAULT_CONNECTION_TIMEOUT
        ),
        tls=tls,
        ready=embedded.ready if embedded is not None else None,
        reactor=process_reactor,
    )
    keeper = LeaseKeeper(storage, clock, ttl=lease_ttl)
    mode: StorageMode = "etcd" if external else "embedded-etcd"
    if mode == "embedded-etcd":
        describe = f"embedded etcd at {endpoints[0]} (data in {server.data_dir})"
    else:
        describe = f"etcd at {', '.join(endpoints)}"
    service = StorageService(storage, keeper, embedded, describe)
    return StorageSetup(storage, service, keeper, mode, embedded)
