"""The daemon's heartbeat: is the service behind it answering?

``GET /heartbeat`` returns the same JSON as the Go daemon (clients and the
SingularityNET marketplace read it).  The service is probed the way
``service_heartbeat_type`` says: a gRPC health ``Check``, an HTTP ``GET``,
or a TCP connect.  Probe results are cached briefly and concurrent requests
share one probe, so a flood of heartbeat requests cannot become a flood of
probes against the service.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from twisted.logger import Logger

from snet_daemon.varint import encode_varint

_log = Logger(namespace="snetd.heartbeat")

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class Probe(Protocol):
    """Checks the service once; True means it is serving."""

    async def __call__(self) -> bool:
        """Probe the service; never raises (failures are False)."""


@dataclass(frozen=True, slots=True)
class HeartbeatIdentity:
    """The fixed fields of the heartbeat JSON."""

    organization_id: str
    service_id: str
    group_id: str
    registry_address: str
    daemon_version: str
    blockchain_enabled: bool
    network: str

    @property
    def daemon_id(self) -> str:
        """The Go daemon's id: SHA-256 of org, service, group id and Registry address."""
        text = self.organization_id + self.service_id + self.group_id + self.registry_address
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Heartbeat:
    """Builds the heartbeat JSON from a (cached) probe of the service.

    Args:
        identity: returns the identity fields (the group id is only known
            once the metadata has loaded).
        probe: checks the service.
        now: returns the current time in seconds (the reactor's clock).
        problems: returns why the daemon cannot serve paid calls now
            (chain, metadata, storage); any problem makes it Offline.
        cache_seconds: how long a probe result is reused.
    """

    def __init__(
        self,
        identity: Callable[[], HeartbeatIdentity],
        probe: Probe,
        now: Callable[[], float],
        problems: Callable[[], tuple[str, ...]] = lambda: (),
        cache_seconds: float = 1.0,
    ) -> None:
        self._identity = identity
        self._problems = problems
        self._probe = probe
        self._now = now
        self._cache_seconds = cache_seconds
        self._last: tuple[float, bool] | None = None
        self._running: asyncio.Future[bool] | None = None

    async def serving(self) -> bool:
        """Whether the service is serving, probing at most once per cache period."""
        now = self._now()
        if self._last is not None and now - self._last[0] < self._cache_seconds:
            return self._last[1]
        if self._running is None:
            self._running = asyncio.ensure_future(self._probe())
        running = self._running
        try:
            ok = await asyncio.shield(running)
        finally:
            if running.done() and self._running is running:
                self._running = None
        self._last = (self._now(), ok)
        return ok

    async def report(self) -> dict[str, object]:
        """The heartbeat JSON object, as the Go daemon shapes it.

        Beyond Go's fields: ``ready`` and ``problems`` say why a daemon
        whose service answers is still Offline (it cannot take payments).
        """
        ok = await self.serving()
        ident = self._identity()
        problems = list(self._problems())
        if not ok:
            problems.insert(0, "service: not serving")
        return {
            "daemonID": ident.daemon_id,
            "timestamp": str(int(self._now())),
            "status": "Online" if not problems else "Offline",
            "ready": not problems,
            "problems": problems,
            # A JSON *string*, as in Go, not a nested object.
            "serviceheartbeat": json.dumps(
                {"serviceID": ident.service_id, "status": "SERVING" if ok else "NOT_SERVING"},
                separators=(",", ":"),
            ),
            "daemonVersion": ident.daemon_version,
            "blockchainEnabled": ident.blockchain_enabled,
            "blockchainNetwork": ident.network,
            "storageClientCertDetails": {"validFrom": "", "validTill": ""},
        }


class TcpProbe:
    """Serving when a TCP connection to ``host:port`` opens (Go's default probe)."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self._host = host
        self._port = port
        self._timeout = timeout

    async def __call__(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                _, writer = await asyncio.open_connection(self._host, self._port)
        except (TimeoutError, OSError):
            return False
        writer.close()
        return True


class GrpcHealthProbe:
    """Serving when ``grpc.health.v1.Health/Check`` answers ``SERVING``.

    The two tiny health messages are encoded by hand (field 1 in each), to
    avoid registering a second copy of the health proto in the process.

    Args:
        unary: makes a unary call to the service: ``(method, request bytes,
            timeout) -> reply bytes``, raising on failure.
        service: the ``service`` field of the check ("" = the whole server).
        timeout: seconds the check may take.
    """

    def __init__(
        self,
        unary: Callable[[str, bytes, float], Awaitable[bytes]],
        service: str = "",
        timeout: float = 2.0,
    ) -> None:
        self._unary = unary
        self._service = service.encode("utf-8")
        self._timeout = timeout

    async def __call__(self) -> bool:
        request = b""
        if self._service:
            request = b"\x0a" + encode_varint(len(self._service)) + self._service
        try:
            reply = await self._unary(_HEALTH_CHECK, request, self._timeout)
        except Exception as exc:  # any failure means "not serving"
            _log.debug("gRPC health probe failed: {error}", error=exc)
            return False
        # HealthCheckResponse { ServingStatus status = 1; } SERVING = 1.
        return reply[:2] == b"\x08\x01"


class HttpProbe:
    """Serving when ``GET url`` answers 200 with a non-empty body (as Go checks)."""

    def __init__(self, url: str, get: Callable[[str], Awaitable[tuple[int, bytes]]]) -> None:
        self._url = url
        self._get = get

    async def __call__(self) -> bool:
        try:
            status, body = await self._get(self._url)
        except Exception as exc:  # any transport failure means "not serving"
            _log.debug("heartbeat probe of {url} failed: {error}", url=self._url, error=exc)
            return False
        return status == 200 and bool(body)


def host_port(endpoint: str, default_port: int = 80) -> tuple[str, int]:
    """Split ``http://h:p``, ``grpc://h:p`` or ``h:p`` into host and port."""
    if "://" not in endpoint:
        endpoint = "tcp://" + endpoint
    parts = urlsplit(endpoint)
    port = parts.port
    if port is None:
        port = 443 if parts.scheme == "https" else default_port
    return parts.hostname or "127.0.0.1", port
