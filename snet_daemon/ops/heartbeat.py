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
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol
from urllib.parse import urlsplit

from cryptography import x509
from hyperlink import EncodedURL
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, RedirectAgent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.varint import encode_varint

_log = Logger(namespace="snetd.heartbeat")

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"

#: ``storageClientCertDetails`` without a certificate to describe (Go's empty fields).
NO_STORAGE_CERT: Mapping[str, str] = MappingProxyType({"validFrom": "", "validTill": ""})


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
        monotonic: the clock of that period (the wall clock ``now`` only
            stamps reports: stepped back, it would keep one answer cached
            for as long as the step).
        storage_cert: ``storageClientCertDetails`` (see :func:`storage_cert_details`).
    """

    def __init__(
        self,
        identity: Callable[[], HeartbeatIdentity],
        probe: Probe,
        now: Callable[[], float],
        problems: Callable[[], tuple[str, ...]] = lambda: (),
        cache_seconds: float = 1.0,
        storage_cert: Mapping[str, str] = NO_STORAGE_CERT,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._identity = identity
        self._problems = problems
        self._probe = probe
        self._now = now
        self._monotonic = monotonic
        self._cache_seconds = cache_seconds
        self._storage_cert = dict(storage_cert)
        self._last: tuple[float, bool] | None = None
        self._running: asyncio.Future[bool] | None = None

    async def serving(self) -> bool:
        """Whether the service is serving, probing at most once per cache period."""
        now = self._monotonic()
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
        self._last = (self._monotonic(), ok)
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
            "storageClientCertDetails": dict(self._storage_cert),
        }


def storage_cert_details(path: str) -> Mapping[str, str]:
    """``storageClientCertDetails``: when the etcd client certificate is valid.

    Go's daemon fills it from ``payment_channel_cert_path``, in its own
    words: ``Valid Since: <not before> days`` and ``Valid Till: <not
    after> days``, each time as Go's ``time.Time.String()`` prints it
    (``2025-01-02 03:04:05 +0000 UTC``).  "days" after a date is odd, but
    monitoring that reads the field expects Go's text, so it is kept to
    the letter.

    Read once, when the daemon starts: that is the certificate the etcd
    client connects with (it does not reload it either), so a renewed file
    that still waits for a restart shows as such.

    Args:
        path: the certificate's PEM file; ``""`` when none is configured.

    Returns:
        The two fields; empty strings (as Go's) without a certificate, or
        when the file cannot be read as one (logged).
    """
    if not path:
        return NO_STORAGE_CERT
    try:
        certificate = x509.load_pem_x509_certificates(Path(path).read_bytes())[0]
    except (OSError, ValueError) as exc:
        _log.warn(
            "payment_channel_cert_path {path}: no certificate to report in the heartbeat: {error}",
            path=path,
            error=exc,
        )
        return NO_STORAGE_CERT
    return MappingProxyType(
        {
            "validFrom": f"Valid Since: {_go_time(certificate.not_valid_before_utc)} days",
            "validTill": f"Valid Till: {_go_time(certificate.not_valid_after_utc)} days",
        }
    )


def _go_time(moment: datetime) -> str:
    """A UTC time as Go's ``time.Time.String()`` prints it (no fraction when it is whole)."""
    text = f"{moment.year:04d}-{moment:%m-%d %H:%M:%S}"
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + " +0000 UTC"


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

    The check names ``service``, the daemon's ``service_id``, as Go's daemon
    does.  A health server that does not know that name answers
    ``NOT_FOUND``; the check is then asked again about ``""``, the whole
    server, the one name grpcio's ``HealthServicer`` and grpc-go's
    ``health.NewServer`` register by themselves: a service that never
    registered its id is not reported down for that.  Any other answer to
    the named check is final: a service whose own name is ``NOT_SERVING``
    is not serving, whatever the whole server says.

    The two tiny health messages are encoded by hand (field 1 in each), to
    avoid registering a second copy of the health proto in the process.

    Args:
        unary: makes a unary call to the health server: ``(method, request
            bytes, timeout) -> reply bytes``, raising on failure
            (:class:`GrpcError` for a gRPC status).
        service: the ``service`` field of the check ("" = the whole server).
        timeout: seconds each check may take.
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
        try:
            try:
                reply = await self._check(self._service)
            except GrpcError as exc:
                if not (self._service and exc.status == Status.NOT_FOUND):
                    raise
                reply = await self._check(b"")
        except Exception as exc:  # any failure means "not serving"
            _log.debug("gRPC health probe failed: {error}", error=exc)
            return False
        # HealthCheckResponse { ServingStatus status = 1; } SERVING = 1.
        return reply[:2] == b"\x08\x01"

    async def _check(self, service: bytes) -> bytes:
        # HealthCheckRequest { string service = 1; }, empty for "".
        request = b"\x0a" + encode_varint(len(service)) + service if service else b""
        return await self._unary(_HEALTH_CHECK, request, self._timeout)


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


#: Most bytes of a health answer read: enough to tell "empty" from "not".
HTTP_PROBE_BODY_LIMIT = 64 * 1024

#: The pool's connection factory, without the "Starting factory" log line
#: each probe's new connection would write.
_QUIET_FACTORY: Any = type("_QuietFactory", (HTTPConnectionPool._factory,), {"noisy": False})


class HttpGet:
    """``GET url`` for :class:`HttpProbe`: ``(status, body)``, bounded in time and size.

    Twisted's ``Agent`` on the injected reactor (the client the HTTP service
    type uses too), following redirects as Go's ``http.Get`` does.  Each
    probe opens a new connection: a kept-alive one would go on answering
    for a service that no longer accepts connections.

    Args:
        reactor: the reactor (TCP, TLS, time).
        timeout: seconds the whole exchange may take, body included; a
            health URL that hangs must not hang the heartbeat with it.
        body_limit: most bytes of the body read; the rest is not awaited.
    """

    def __init__(self, reactor: Any, timeout: float = 5.0, body_limit: int = HTTP_PROBE_BODY_LIMIT) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._body_limit = body_limit
        pool = HTTPConnectionPool(reactor, persistent=False)
        pool._factory = _QUIET_FACTORY
        self._agent: Any = _RedirectAgent(Agent(reactor, pool=pool), redirectLimit=10)

    async def __call__(self, url: str) -> tuple[int, bytes]:
        """Fetch ``url``.

        Returns:
            The status code and the start of the body (at most ``body_limit`` bytes).

        Raises:
            TimeoutError: no complete answer within ``timeout`` seconds.
            Exception: whatever the connection fails with (refused, TLS, reset).
        """
        # hyperlink (Twisted's URL library) percent-encodes what an HTTP request line cannot carry.
        target = EncodedURL.from_text(url).to_uri().to_text().encode("ascii")
        exchange = self._agent.request(b"GET", target, Headers({b"user-agent": [b"snetd-heartbeat"]}))
        exchange.addCallback(self._read)
        timer = self._reactor.callLater(self._timeout, exchange.cancel)
        try:
            result: tuple[int, bytes] = await exchange.asFuture(asyncio.get_running_loop())
        except Exception:
            # Cancelled before the answer's headers, the Agent reports
            # ResponseNeverReceived rather than CancelledError.
            if timer.active():
                raise
            raise TimeoutError(f"no complete answer in {self._timeout:g} s") from None
        finally:
            if timer.active():
                timer.cancel()
        return result

    def _read(self, response: Any) -> Deferred[tuple[int, bytes]]:
        reader = _BodyStart(self._body_limit)
        response.deliverBody(reader)
        return reader.done.addCallback(lambda body: (int(response.code), body))


class _RedirectAgent(RedirectAgent):
    """Twisted's ``RedirectAgent``, which also closes each redirect's connection.

    ``RedirectAgent`` never reads a redirect's body: Twisted buffers it
    without limit until it ends, and the connection stays open as long as
    the body goes on, past the probe's timeout (which cancels only the
    last request).  A redirect whose body never ends cost one connection
    and ever more memory per probe.  Its body is of no use: the connection
    is closed at once instead.
    """

    def _handleRedirect(
        self, response: Any, method: bytes, uri: bytes, headers: Headers | None, redirectCount: int
    ) -> Any:
        response.deliverBody(_Discard())
        return super()._handleRedirect(response, method, uri, headers, redirectCount)  # type: ignore[no-untyped-call]


class _Discard(protocol.Protocol):
    """A response body nobody reads: its connection is closed as soon as it is handed over."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class _BodyStart(protocol.Protocol):
    """Collects the first ``limit`` bytes of a response body, then stops reading."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        # Cancelling (the probe's timeout) closes the connection.
        self.done: Deferred[bytes] = Deferred(lambda _: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        room = self._limit - self._size
        self._chunks.append(data[:room])
        self._size += min(len(data), room)
        if self._size >= self._limit:
            self.done.callback(b"".join(self._chunks))
            self._stop()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def host_port(endpoint: str, default_port: int = 80) -> tuple[str, int]:
    """Split ``http://h:p``, ``grpc://h:p`` or ``h:p`` into host and port."""
    if "://" not in endpoint:
        endpoint = "tcp://" + endpoint
    parts = urlsplit(endpoint)
    port = parts.port
    if port is None:
        port = 443 if parts.scheme == "https" else default_port
    return parts.hostname or "127.0.0.1", port
