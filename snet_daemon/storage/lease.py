"""The daemon instance's lease, kept alive by a Service.

Payment holds ("this daemon is serving a call paid on channel N") are keys
attached to one lease per daemon instance.  While the daemon runs,
:class:`LeaseKeeper` refreshes the lease every third of its TTL; when the
daemon dies, nobody refreshes it, etcd deletes the holds when the TTL runs
out, and other daemons can use the channels again.  That bound -- a dead
daemon blocks a channel for at most one TTL -- is the whole point, and is
what the Go daemon's lock keys (no lease) lack.

A failing refresh (etcd briefly unreachable) is logged and retried at the
next tick; it never stops the keeper.  If the lease is found gone (etcd was
unreachable for longer than the TTL, or it was revoked) a new one is
granted, and everything the old one held is already gone: code holding
keys must treat :class:`~snet_daemon.storage.base.LeaseNotFound` on its
writes as "my hold was lost".
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from snet_daemon.storage.base import AtomicStorage, Lease, LeaseNotFound, StorageError

__all__ = ["DEFAULT_LEASE_TTL", "LeaseKeeper"]

_log = Logger(namespace="snetd.storage.lease")

#: Seconds a dead daemon's holds outlive it (the Go daemon's etcd session
#: uses 10 s too).
DEFAULT_LEASE_TTL = 10


def _run(coro: Coroutine[Any, Any, Any]) -> Deferred[Any]:
    """Run a coroutine as an asyncio Task; a Deferred for Twisted's side."""
    return Deferred.fromFuture(asyncio.ensure_future(coro))


class LeaseKeeper(Service):
    """Grants, refreshes and finally revokes this daemon instance's lease.

    Args:
        storage: Where the lease lives.
        clock: Schedules the refresh ticks (the reactor; a ``Clock`` in tests).
        ttl: Lease TTL in seconds.
        interval: Seconds between refreshes; default a third of the TTL, so
            two refreshes in a row may fail before the lease is at risk.
        revoke_timeout: How long stopping waits for the revoke.
    """

    name = "storage-lease"

    def __init__(
        self,
        storage: AtomicStorage,
        clock: IReactorTime,
        *,
        ttl: int = DEFAULT_LEASE_TTL,
        interval: float | None = None,
        revoke_timeout: float = 2.0,
    ) -> None:
        if ttl <= 0:
            raise ValueError("lease TTL must be positive")
        self._storage = storage
        self._clock = clock
        self._ttl = ttl
        self._interval = interval if interval is not None else ttl / 3
        self._revoke_timeout = revoke_timeout
        self._lease: Lease | None = None
        self._granting: asyncio.Future[Lease] | None = None
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[Any] | None = None
        #: Failed ticks so far (for metrics and tests).
        self.failures = 0

    @property
    def lease_id(self) -> int | None:
        """The current lease id, or ``None`` before the first grant."""
        return self._lease.id if self._lease is not None else None

    async def current(self) -> int:
        """The current lease id, granting a lease first if there is none.

        Concurrent callers share one grant.

        Raises:
            StorageError: The grant failed (storage unavailable, ...).
        """
        if self._lease is not None:
            return self._lease.id
        if self._granting is None:
            self._granting = asyncio.ensure_future(self._storage.grant_lease(self._ttl))
        granting = self._granting
        try:
            lease = await asyncio.shield(granting)
        finally:
            if granting.done() and self._granting is granting:
                self._granting = None
        if self._lease is None:
            self._lease = lease
            _log.info("granted storage lease {lease_id:#x} (ttl {ttl}s)", lease_id=lease.id, ttl=lease.ttl)
        return self._lease.id

    def lost(self, lease_id: int) -> None:
        """Report that ``lease_id`` was found gone; the next :meth:`current` grants anew.

        Call it on :class:`~snet_daemon.storage.base.LeaseNotFound`.  A stale
        report (for a lease already replaced) is ignored.
        """
        if self._lease is not None and self._lease.id == lease_id:
            _log.warn("storage lease {lease_id:#x} lost; holds it had are gone", lease_id=lease_id)
            self._lease = None

    # -- Service ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        loop = LoopingCall(self._tick)
        loop.clock = self._clock
        self._loop = loop
        self._loop_done = loop.start(self._interval, now=True)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return _run(self._revoke())

    async def _revoke(self) -> None:
        """Revoke the lease so our holds vanish now rather than after the TTL."""
        lease, self._lease = self._lease, None
        if lease is None:
            return
        try:
            async with asyncio.timeout(self._revoke_timeout):
                await self._storage.revoke_lease(lease.id)
        except (StorageError, TimeoutError) as error:
            # Not fatal: the lease expires by itself within its TTL.
            _log.warn("could not revoke storage lease {lease_id:#x}: {error}", lease_id=lease.id, error=error)

    def _tick(self) -> Deferred[None]:
        return _run(self._refresh())

    async def _refresh(self) -> None:
        """One tick: grant if needed, else keep alive; never raises."""
        try:
            lease = self._lease
            if lease is None:
                if self.running:  # a tick still in flight at stop must not grant after the revoke
                    await self.current()
                return
            try:
                await self._storage.keep_alive(lease.id)
            except LeaseNotFound:
                self.lost(lease.id)
                await self.current()
        except StorageError as error:
            self.failures += 1
            _log.warn("storage lease refresh failed (will retry): {error}", error=error)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must not end the loop (a failing LoopingCall stops for good).
            self.failures += 1
            _log.failure("storage lease refresh failed unexpectedly")
