"""The daemon's current metadata: loaded at startup, refreshed without restart.

:class:`MetadataSource` is a Service that

* loads organisation and service metadata at startup (Registry URI, or the
  local ``*_metadata_uri`` override, through the
  :class:`~snet_daemon.blockchain.loader.MetadataLoader`) and resolves the
  daemon's group;
* when that fails, does **not** stop the daemon (the Go daemon dies, its
  issue #242): it reports not-ready with the reason and tries again with
  backoff (2 s doubling to 60 s);
* reloads when the Registry emits ``OrganizationModified`` or a
  service-metadata event for our organisation and service (found by
  polling ``eth_getLogs`` every ``metadata_refresh_interval``), and when
  :meth:`request_refresh` is called (the daemon's ``SIGHUP`` handler,
  :mod:`snet_daemon.ops.reload`, does);
* keeps the previous metadata when a refresh fails, logs why, and retries
  on the next poll;
* tells subscribers (:meth:`subscribe`) about every newly loaded metadata.

URIs are read from the Registry at a block number, never at ``latest``:
after a Registry event, at the last block the poll that found it scanned,
otherwise at the cached current block.  Behind a load-balanced provider the
node answering the ``eth_call`` may be a block or two behind the one that
returned the event; asked for ``latest`` it answers the old URI, the refresh
"succeeds" with the old document and the event is used up, so the new
metadata (a new price) would never be loaded.  Asked for a block it does not
have yet, a node answers an error instead, the refresh fails and is retried.
Retrying until the URI changes would not do: an event does not always change
it (``OrganizationModified`` is also emitted for member changes, a service
may be updated with the same document).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from snet_daemon.blockchain.blocks import BlockNumber
from snet_daemon.blockchain.errors import ChainError, MetadataError, StaleBlockNumber
from snet_daemon.blockchain.loader import MetadataLoader
from snet_daemon.blockchain.metadata import (
    DaemonMetadata,
    ServiceMetadata,
    parse_organization,
    parse_service,
    resolve,
)
from snet_daemon.blockchain.periodic import Periodic
from snet_daemon.blockchain.registry import RegistryReader

__all__ = ["MetadataSource", "MetadataStatus", "Subscriber"]

_log = Logger(namespace="snetd.metadata")

#: Called with each newly loaded metadata; exceptions are logged and ignored.
Subscriber = Callable[[DaemonMetadata], object]

_RETRY_FIRST = 2.0
_RETRY_MAX = 60.0
#: Blocks scanned again for Registry events on each poll (see _poll_events).
_RESCAN: Final = 12


@dataclass(frozen=True, slots=True)
class MetadataStatus:
    """Readiness of the metadata side, for the heartbeat.

    Attributes:
        ready: Metadata is loaded (possibly an older version, see
            ``last_error``).
        error: Why not ready, or why the last refresh failed; None if fine.
        loaded_at: Reactor time of the last successful load, or None.
        org_uri: Where organisation metadata was last loaded from.
        service_uri: Where service metadata was last loaded from.
        loads: Successful loads so far.
    """

    ready: bool
    error: str | None
    loaded_at: float | None
    org_uri: str
    service_uri: str
    loads: int


class MetadataSource(Service):
    """Holds the current metadata and keeps it up to date.

    Args:
        loader: Fetches and verifies documents.
        clock: The reactor clock: the (wall) time of
            :attr:`MetadataStatus.loaded_at`.  Retries and polls wait on
            the monotonic clock (:class:`~snet_daemon.blockchain.periodic.Periodic`).
        organization_id: ``organization_id``.
        service_id: ``service_id``.
        group_name: ``daemon_group_name``.
        registry: The Registry, or None (blockchain disabled, or a custom
            network without one): then both URIs must be configured.
        organization_uri: ``organization_metadata_uri`` (empty: Registry).
        service_uri: ``service_metadata_uri`` (empty: Registry).
        blocks: The block number cache: where Registry event polling
            starts and stops.
        event_interval: Seconds between Registry event polls; 0 disables them.
        require_organization: False when payments are off: only the service
            document is then needed (:attr:`service`), :attr:`current` stays
            None unless both URIs are configured.
        retry_interval: First delay before loading again after a failed
            load; it doubles up to 60 s.
    """

    name = "metadata"

    def __init__(
        self,
        *,
        loader: MetadataLoader,
        clock: IReactorTime,
        organization_id: str,
        service_id: str,
        group_name: str,
        registry: RegistryReader | None = None,
        organization_uri: str = "",
        service_uri: str = "",
        blocks: BlockNumber | None = None,
        event_interval: float = 30.0,
        require_organization: bool = True,
        retry_interval: float = _RETRY_FIRST,
    ) -> None:
        self.loader = loader
        self.registry = registry
        self.organization_id = organization_id
        self.service_id = service_id
        self.group_name = group_name
        self._org_override = organization_uri
        self._service_override = service_uri
        self._blocks = blocks
        self._clock = clock
        self._event_interval = event_interval
        self._require_org = require_organization
        self._subscribers: list[Subscriber] = []
        self._lock = asyncio.Lock()
        self._retry_first = retry_interval
        self._retry = retry_interval
        self._periodic = Periodic("metadata", self._tick, retry_interval)
        self._last_checked_block: int | None = None
        #: Registry events seen from block :attr:`_seen_from` on (see _poll_events).
        self._seen_events: set[tuple[str, str, int]] = set()
        self._seen_from = 0
        #: The block the startup load read its URIs at, until the first scan.
        self._loaded_through: int | None = None
        self._stale = False
        self._pending: set[asyncio.Task[bool]] = set()
        self._loaded = asyncio.Event()
        #: The resolved metadata for our group, or None before the first load.
        self.current: DaemonMetadata | None = None
        #: The service document, also when payments are off.
        self.service: ServiceMetadata | None = None
        self._error: str | None = None
        self._loaded_at: float | None = None
        self._loads = 0

    # -- public API --------------------------------------------------------------

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` with every newly loaded metadata (and now, if loaded).

        Returns:
            A function that unsubscribes.
        """
        self._subscribers.append(callback)
        if self.current is not None:
            self._notify(callback, self.current)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def status(self) -> MetadataStatus:
        """Readiness and the last error."""
        ready = self.current is not None if self._require_org or self._org_override else self.service is not None
        return MetadataStatus(
            ready=ready,
            error=self._error,
            loaded_at=self._loaded_at,
            org_uri=self.current.org_uri if self.current else "",
            service_uri=self.current.service_uri if self.current else "",
            loads=self._loads,
        )

    @property
    def ready(self) -> bool:
        """Metadata is loaded."""
        return self.status().ready

    async def wait_loaded(self) -> None:
        """Wait until the first successful load (tests, startup ordering)."""
        await self._loaded.wait()

    async def refresh(self, reason: str, *, at_block: int | None = None) -> bool:
        """Load both documents again and, if they are valid, make them current.

        Never raises for metadata or chain problems: a failed refresh keeps
        the previous metadata, logs why, returns False, and is tried again
        on the next tick.

        Args:
            reason: Why (for the log): ``startup``, ``SIGHUP``, an event name.
            at_block: Read the Registry's URIs at this block (one at least as
                new as the event that asks for the refresh); None: at the
                cached current block.

        Returns:
            True if new metadata is now current.
        """
        async with self._lock:
            try:
                service, daemon = await self._load(at_block)
            except (MetadataError, ChainError) as exc:
                self._stale = True  # try again on the next tick
                self._error = f"{type(exc).__name__}: {exc}" if isinstance(exc, ChainError) else str(exc)
                if self.current is None and self.service is None:
                    _log.error("metadata not loaded ({reason}): {error}", reason=reason, error=self._error)
                else:
                    _log.error(
                        "metadata refresh ({reason}) failed, keeping the previous metadata: {error}",
                        reason=reason,
                        error=self._error,
                    )
                return False
            except Exception as exc:  # a bug or an unforeseen library error: still never fatal
                self._stale = True
                self._error = f"unexpected {type(exc).__name__}: {exc}"
                _log.failure("metadata refresh ({reason}) failed unexpectedly", reason=reason)
                return False
            changed = daemon != self.current or service != self.service
            self.service = service
            self.current = daemon
            self._error = None
            self._stale = False
            self._loaded_at = self._clock.seconds()
            self._loads += 1
            self._loaded.set()
            if daemon is not None:
                _log.info(
                    "metadata loaded ({reason}): group {group} id {group_id}, payment address {payment}, "
                    "MPE {mpe}, pricing {pricing}; from {org_uri} and {service_uri}",
                    reason=reason,
                    group=daemon.group_name,
                    group_id=daemon.group_id_base64,
                    payment=daemon.payment_address,
                    mpe=daemon.mpe_address or "(none)",
                    pricing=daemon.pricing.model,
                    org_uri=daemon.org_uri,
                    service_uri=daemon.service_uri,
                )
            else:
                _log.info("service metadata loaded ({reason})", reason=reason)
            if changed and daemon is not None:
                for callback in list(self._subscribers):
                    self._notify(callback, daemon)
            return True

    # -- Service -----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._periodic.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromFuture(asyncio.ensure_future(self._stop()))

    async def _stop(self) -> None:
        await self._periodic.stop()
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        await self.loader.close()

    # -- internals -----------------------------------------------------------------

    def request_refresh(self, reason: str) -> None:
        """Start a refresh in the background (signal handlers, callbacks)."""
        task = asyncio.ensure_future(self.refresh(reason))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _notify(self, callback: Subscriber, metadata: DaemonMetadata) -> None:
        try:
            callback(metadata)
        except Exception:
            _log.failure("metadata subscriber {callback!r} failed", callback=callback)

    def _uris_from_registry(self) -> bool:
        """Whether a URI is read from the Registry (one is not configured)."""
        need_org = self._require_org or bool(self._org_override)
        return (need_org and not self._org_override) or not self._service_override

    async def _uris(self, block: int | None) -> tuple[str, str]:
        org_uri, service_uri = self._org_override, self._service_override
        need_org = self._require_org or bool(org_uri)
        if self._uris_from_registry():
            if self.registry is None:
                missing = [
                    key
                    for key, uri, needed in (
                        ("organization_metadata_uri", org_uri, need_org),
                        ("service_metadata_uri", service_uri, True),
                    )
                    if needed and not uri
                ]
                raise MetadataError(f"no Registry to read metadata URIs from: set {' and '.join(missing)}")
            if need_org and not org_uri:
                org_uri = await self.registry.organization_uri(self.organization_id, block=block)
            if not service_uri:
                service_uri = await self.registry.service_uri(self.organization_id, self.service_id, block=block)
        return org_uri, service_uri

    async def _load(self, at_block: int | None) -> tuple[ServiceMetadata, DaemonMetadata | None]:
        # The block the URIs are read at (see the module docstring): what is
        # loaded includes every Registry event up to it, so event polling
        # starts after it.
        start_block = at_block if at_block is not None else self._known_block()
        if start_block is None and self.registry is not None and self._uris_from_registry():
            start_block = await self.registry.latest_block()
        org_uri, service_uri = await self._uris(start_block)
        if org_uri:
            org_raw, service_raw = await asyncio.gather(self.loader.load(org_uri), self.loader.load(service_uri))
        else:
            org_raw, service_raw = b"", await self.loader.load(service_uri)
        service = parse_service(service_raw)
        daemon = None
        if org_uri:
            daemon = resolve(
                parse_organization(org_raw), service, self.group_name, org_uri=org_uri, service_uri=service_uri
            )
        if start_block is not None and self._last_checked_block is None:
            # Events from here on can change what was just loaded; those up
            # to it are in it (the first scan must not load them again).
            self._last_checked_block = start_block
            self._loaded_through = start_block
        return service, daemon

    def _known_block(self) -> int | None:
        if self._blocks is None:
            return None
        try:
            return self._blocks.current()
        except StaleBlockNumber:
            return None

    async def _tick(self) -> None:
        if self.status().ready and not self._stale:
            self._retry = self._retry_first
            self._periodic.interval = self._event_interval or _RETRY_MAX
            if self._event_interval:
                await self._poll_events()
            return
        reason = "retry" if self._loads or self._error else "startup"
        if await self.refresh(reason):
            self._periodic.interval = self._event_interval or _RETRY_MAX
        else:
            self._periodic.interval = self._retry
            self._retry = min(_RETRY_MAX, self._retry * 2)

    async def _poll_events(self) -> None:
        if self.registry is None or (self._org_override and self._service_override):
            return
        latest = self._known_block()
        if latest is None:
            return
        if self._last_checked_block is None:
            self._last_checked_block = latest
            return
        if latest == self._last_checked_block:
            return
        if latest < self._last_checked_block and latest < self._seen_from:
            # Further back than the events remembered: another chain.
            self._seen_from = 0
        # The last _RESCAN blocks already scanned are scanned again: a
        # reorganisation may have replaced them, or a node behind a load
        # balancer may not have had them yet.  When the chain went back
        # (a reorganisation, a test chain reverted, or a lagging node
        # answered eth_blockNumber), the _RESCAN blocks up to ``latest`` are
        # scanned now: they may be new ones.  Events seen before are skipped;
        # so a scan never starts below the first block from which every event
        # is remembered, or after the chain went back it would load events
        # applied long ago again.
        start = max(0, min(latest, self._last_checked_block) + 1 - _RESCAN, self._seen_from)
        try:
            events = await self.registry.changes(self.organization_id, self.service_id, start, latest)
        except ChainError as exc:
            _log.warn("cannot read Registry events: {error}", error=exc)
            return
        self._last_checked_block = latest
        seen = self._seen_events
        # The first scan after startup goes back _RESCAN blocks before the
        # block the URIs were read at: events up to that block are in what
        # was loaded (the organisation and service creations, typically).
        loaded_through, self._loaded_through = self._loaded_through, None
        new = [
            event
            for event in events
            if (event.transaction, event.name, event.block) not in seen
            and (loaded_through is None or event.block > loaded_through)
        ]
        self._seen_from = max(start, latest + 1 - _RESCAN)
        self._seen_events = {
            key for key in seen | {(e.transaction, e.name, e.block) for e in events} if key[2] >= self._seen_from
        }
        relevant = [
            event
            for event in new
            if not (self._org_override and event.name.startswith("Organization"))
            and not (self._service_override and event.name.startswith("Service"))
        ]
        if relevant:
            # Read at ``latest`` (the end of the scan), not at the node's
            # "latest", which may be older (see the module docstring); a
            # failure marks the metadata stale, so it is tried again.
            names = ", ".join(sorted({event.name for event in relevant}))
            await self.refresh(f"Registry {names} at block {relevant[-1].block}", at_block=latest)
