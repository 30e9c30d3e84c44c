""":class:`~snet_daemon.storage.base.AtomicStorage` on an etcd v3 cluster.

The requests are etcd's own gRPC messages (the protobuf classes generated
in the ``aetcd`` package), sent over the daemon's own HTTP/2 gRPC client
(:mod:`snet_daemon.upstream.h2client`), the one that also reaches the AI
service.  Neither ``aetcd.Client`` nor grpc.aio is used: aetcd's client can
only open plaintext channels to a single ``host:port``, and grpc.aio cost
about 250 µs of the daemon's CPU per paid call (two etcd requests),
measured with ``benchmarks/paid.py``; it also brought gRPC core's threads
into the daemon, which make ``fork()`` unsafe.

Behaviour the daemon relies on:

* **Bounded waits.**  Every request carries the request timeout as its gRPC
  deadline, and requests fail fast while the channel cannot connect, so
  nothing hangs when etcd is down: callers get
  :class:`~snet_daemon.storage.base.StorageUnavailable` (not applied) or
  :class:`~snet_daemon.storage.base.StorageTimeout` (outcome unknown).
* **Recovery.**  A failed connection is retried on the next request, with
  a backoff capped at one second, so service resumes within about a second
  of etcd coming back.  A request that times out drops its connection (a
  silently dead peer would otherwise keep every request waiting).
* **Several endpoints.**  Requests go to one endpoint at a time; when it is
  unavailable, or does not answer within the request timeout (a member that
  is frozen, overloaded or cut off from its cluster still accepts
  connections), the next one is used for the following requests.  A failed
  request is not retried here: a retried conditional write that had in fact
  been applied would come back as a spurious condition failure.
* **Group commit.**  Transactions (and multi-key reads) that arrive while
  one is in flight are sent together as one etcd transaction of
  transactions (:mod:`snet_daemon.storage.batch`): under load a request
  carries many of them, so etcd and the daemon pay per-request costs once.
* **TLS.**  ``https://`` endpoints use TLS, with the configured CA bundle and
  client certificate/key (``payment_channel_ca_path``, ``_cert_path``,
  ``_key_path``) when given, else the system roots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aetcd import rpc  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.storage.base import (
    Condition,
    ConditionFailed,
    Entry,
    Lease,
    LeaseNotFound,
    Op,
    Put,
    StorageError,
    StorageTimeout,
    StorageUnavailable,
    check_key,
    check_transaction,
    unique_keys,
)
from snet_daemon.storage.batch import TxnBatcher
from snet_daemon.upstream.h2client import AnswerLost, H2Upstream

__all__ = [
    "DEFAULT_CONNECTION_TIMEOUT",
    "DEFAULT_REQUEST_TIMEOUT",
    "EtcdEndpoint",
    "EtcdStorage",
    "EtcdTls",
    "parse_endpoint",
    "prefix_range_end",
]

_log = Logger(namespace="snetd.storage.etcd")

#: Used when neither the configuration nor the organisation metadata gives
#: a timeout (the Go key's "0s" means "take it from the metadata").
DEFAULT_CONNECTION_TIMEOUT = 5.0
DEFAULT_REQUEST_TIMEOUT = 3.0

#: etcd's RPCs: path and reply type.
_RANGE = ("/etcdserverpb.KV/Range", rpc.RangeResponse)
_PUT = ("/etcdserverpb.KV/Put", rpc.PutResponse)
_DELETE = ("/etcdserverpb.KV/DeleteRange", rpc.DeleteRangeResponse)
_TXN = ("/etcdserverpb.KV/Txn", rpc.TxnResponse)
_LEASE_GRANT = ("/etcdserverpb.Lease/LeaseGrant", rpc.LeaseGrantResponse)
_LEASE_REVOKE = ("/etcdserverpb.Lease/LeaseRevoke", rpc.LeaseRevokeResponse)
# A bidi stream in etcd; sent as one request and a half-close, it answers
# once and ends the stream, so it travels like a unary call.
_LEASE_KEEP_ALIVE = ("/etcdserverpb.Lease/LeaseKeepAlive", rpc.LeaseKeepAliveResponse)
_STATUS = ("/etcdserverpb.Maintenance/Status", rpc.StatusResponse)
#: A prefix scan of many channels may be large.
_MAX_REPLY = 512 * 1024 * 1024

_LEASE_NOT_FOUND = "lease not found"
#: What etcd says of a request that failed after it was proposed to raft
#: (``etcdserver.processInternalRaftRequestOnce``): it may still be applied.
_PROPOSED: Final = ("timed out", "leader changed", "server stopped", "request cancelled")


@dataclass(frozen=True, slots=True)
class EtcdEndpoint:
    """One etcd client URL, parsed.

    Attributes:
        url: As configured (for messages).
        target: ``host:port`` for gRPC.
        tls: Connect with TLS (the URL was ``https://``).
    """

    url: str
    target: str
    tls: bool


def parse_endpoint(url: str) -> EtcdEndpoint:
    """Parse an etcd endpoint as the Go daemon accepts it.

    ``http://host:port``, ``https://host:port`` and bare ``host:port`` (plain)
    are accepted; a missing port means etcd's 2379.

    Raises:
        ValueError: Unknown scheme or no host.
    """
    text = url.strip()
    scheme, separator, rest = text.partition("://")
    if not separator:
        scheme, rest = "http", text
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"etcd endpoint {url!r}: scheme must be http:// or https://")
    authority = rest.split("/", 1)[0]
    if not authority:
        raise ValueError(f"etcd endpoint {url!r} has no host")
    has_port = ":" in authority.rpartition("]")[2] if authority.startswith("[") else ":" in authority
    target = authority if has_port else f"{authority}:2379"
    return EtcdEndpoint(url=text, target=target, tls=scheme == "https")


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """Client TLS material (PEM bytes); any part may be absent.

    Attributes:
        ca: CA bundle to verify the server; ``None``: system roots.
        cert: Client certificate chain, for mutual TLS.
        key: The client certificate's private key.
    """

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    def __repr__(self) -> str:
        # Never show key material in logs or tracebacks.
        return f"EtcdTls(ca={self.ca is not None}, cert={self.cert is not None}, key=***)"

    @classmethod
    def from_paths(cls, ca_path: str = "", cert_path: str = "", key_path: str = "") -> EtcdTls | None:
        """Read the configured files (``payment_channel_ca/cert/key_path``).

        Returns:
            The material, or ``None`` if no path is set.

        Raises:
            ValueError: Only one of cert and key is given, a file holds no
                PEM certificate or unencrypted PEM key, or the key is not
                the certificate's (the message names the file).
            OSError: A file cannot be read (the message names it).
        """
        if bool(cert_path) != bool(key_path):
            raise ValueError("payment_channel_cert_path and payment_channel_key_path must be set together")
        if not (ca_path or cert_path):
            return None

        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        tls = cls(ca=read(ca_path), cert=read(cert_path), key=read(key_path))
        # Checked here so that a wrong file stops startup with its name,
        # not the first connection with an OpenSSL error.
        if tls.ca is not None:
            _certificate(tls.ca, ca_path)
        if tls.cert is not None and tls.key is not None:
            public = _certificate(tls.cert, cert_path).public_key()
            if _private_key(tls.key, key_path).public_key() != public:
                raise ValueError(f"{key_path}: this key does not belong to the certificate in {cert_path}")
        return tls

    def client_options(self, host: str) -> Any:
        """Twisted TLS client options for this material (ALPN h2).

        The client certificate and key go to OpenSSL as ``cryptography``
        objects: Twisted's ``clientCertificate`` hands it pyOpenSSL ones,
        which pyOpenSSL has deprecated and will stop accepting.
        """
        kwargs: dict[str, Any] = {"acceptableProtocols": [b"h2"]}
        if self.ca:
            kwargs["trustRoot"] = Certificate.loadPEM(self.ca)
        if self.cert and self.key:
            kwargs["extraCertificateOptions"] = {
                "certificate": _certificate(self.cert, "client certificate"),
                "privateKey": _private_key(self.key, "client key"),
            }
        return optionsForClientTLS(host, **kwargs)


def _certificate(pem: bytes, name: str) -> x509.Certificate:
    """The first certificate in ``pem`` (``name`` says where it came from)."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ValueError(f"{name}: no PEM certificate in it") from None


def _private_key(pem: bytes, name: str) -> Any:
    """The unencrypted private key in ``pem`` (``name`` says where it came from)."""
    try:
        return load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:  # TypeError: the key is encrypted
        raise ValueError(f"{name}: no unencrypted PEM private key in it ({error})") from None


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's ``range_end`` selecting every key that starts with ``prefix``.

    The prefix with its last byte below 0xff incremented (and what follows
    dropped); ``b"\\0"`` (meaning "to the end of the keyspace") when there is
    no such byte, which includes the empty prefix.
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _key(key: str) -> bytes:
    # surrogateescape round-trips any bytes a key from etcd may contain.
    return key.encode("utf-8", "surrogateescape")


def _entry(kv: Any) -> Entry:
    return Entry(
        key=kv.key.decode("utf-8", "surrogateescape"),
        value=kv.value,
        mod_revision=kv.mod_revision,
        create_revision=kv.create_revision,
        version=kv.version,
        lease=kv.lease,
    )


def _txn_request(
    conditions: Sequence[Condition] = (),
    ops: Sequence[Op] = (),
    *,
    reads: Sequence[str] = (),
    failure_reads: Sequence[str] = (),
) -> Any:
    """A ``TxnRequest``: ``conditions``, then ``ops`` and range reads of
    ``reads`` on success, range reads of ``failure_reads`` on failure.

    Filled in place (``add()``): passing ready sub-messages to constructors
    copies each one (a paid call's transaction: 5.8 us this way, 9.6 us so).
    """
    request = rpc.TxnRequest()
    for condition in conditions:
        compare = request.compare.add()
        compare.key = _key(condition.key)
        compare.result = rpc.Compare.EQUAL
        if condition.value is not None:
            compare.target = rpc.Compare.VALUE
            compare.value = condition.value
        else:
            # MOD == 0 holds exactly for an absent key (etcd compares a
            # missing key as a zeroed KeyValue); the Go daemon uses
            # CREATE == 0, equivalent.
            compare.target = rpc.Compare.MOD
            compare.mod_revision = condition.mod_revision
    success = request.success
    for op in ops:
        if isinstance(op, Put):
            put = success.add().request_put
            put.key = _key(op.key)
            put.value = bytes(op.value)
            put.lease = op.lease
        else:
            success.add().request_delete_range.key = _key(op.key)
    for key in reads:
        success.add().request_range.key = _key(key)
    for key in failure_reads:
        request.failure.add().request_range.key = _key(key)
    return request


class _Connection:
    """The HTTP/2 client of one endpoint."""

    def __init__(self, endpoint: EtcdEndpoint, tls: EtcdTls | None, reactor: Any) -> None:
        self.endpoint = endpoint
        host, _, port = endpoint.target.rpartition(":")
        host = host.strip("[]")
        self.client = H2Upstream(
            reactor,
            host,
            int(port),
            endpoint.url,
            asyncio.get_event_loop(),
            tls=endpoint.tls,
            tls_options=tls.client_options(host) if (endpoint.tls and tls is not None) else None,
            max_message_size=_MAX_REPLY,
            max_backoff=1.0,
            # Its errors and logs say "etcd at ...": with "the service at
            # ... is unavailable" under snetd.upstream, an operator would
            # look at the AI service while the payment storage is down.
            peer="etcd",
            log=_log,
        )


class EtcdStorage:
    """etcd v3 as :class:`~snet_daemon.storage.base.AtomicStorage`.

    Construction does no I/O; the first request (or :meth:`open`) connects.

    Args:
        endpoints: Client URLs (``http://h:p``, ``https://h:p`` or ``h:p``).
        request_timeout: Deadline of each request, seconds.
        connection_timeout: How long :meth:`open` waits for a connection.
        tls: Client TLS material for ``https://`` endpoints.
        ready: Awaited (once, shared, bounded by the request timeout) before
            the first request: the embedded server's "healthy" signal, so
            requests made while it starts wait instead of failing.
        reactor: makes the connections (the global reactor when omitted).
        batch_limit: transaction requests in flight before further
            transactions queue and are sent together (:mod:`.batch`).  1
            is best measured: ``benchmarks/paid.py`` at 16 in flight gave
            0.50x of unpaid calls/s with 1, 0.48x with 2.

    Raises:
        ValueError: No endpoints, or one cannot be parsed.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        connection_timeout: float = DEFAULT_CONNECTION_TIMEOUT,
        tls: EtcdTls | None = None,
        ready: Callable[[], Awaitable[None]] | None = None,
        reactor: Any = None,
        batch_limit: int = 1,
    ) -> None:
        if not endpoints:
            raise ValueError("EtcdStorage needs at least one endpoint")
        if request_timeout <= 0 or connection_timeout <= 0:
            raise ValueError("etcd timeouts must be positive")
        self._endpoints = tuple(parse_endpoint(url) for url in endpoints)
        self._timeout = request_timeout
        self._connection_timeout = connection_timeout
        self._tls = tls
        self._ready = ready
        self._ready_future: asyncio.Future[None] | None = None
        self._index = 0
        self._conn: _Connection | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self._reactor = reactor
        #: Concurrent transactions share requests (see :mod:`.batch`).
        self._txns = TxnBatcher(self._send_txn, limit=batch_limit)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The configured endpoint URLs."""
        return tuple(endpoint.url for endpoint in self._endpoints)

    @property
    def request_timeout(self) -> float:
        """Deadline of each request, seconds."""
        return self._timeout

    # -- lifecycle --------------------------------------------------------------

    async def open(self) -> str:
        """Connect and check the server answers, trying each endpoint in turn.

        Returns:
            The etcd server version reported by the endpoint in use.

        Raises:
            StorageUnavailable: No endpoint answered within the connection
                timeout (the message lists each endpoint's failure).
        """
        await self._pass_ready_gate()
        failures: list[str] = []
        for _ in self._endpoints:
            conn = self._connection()
            try:
                async with asyncio.timeout(self._connection_timeout):
                    await self._connect(conn)
                return await self.server_version()
            except TimeoutError:
                failures.append(f"{conn.endpoint.url}: no connection within {self._connection_timeout:g}s")
            except StorageError as error:
                failures.append(f"{conn.endpoint.url}: {error}")
            self._rotate(conn, "unreachable")
        raise StorageUnavailable("cannot reach etcd: " + "; ".join(failures))

    @staticmethod
    async def _connect(conn: _Connection) -> None:
        """Connect, retrying through the client's short backoff."""
        while True:
            try:
                await conn.client.connect()
                return
            except GrpcError:
                await asyncio.sleep(0.1)

    async def server_version(self) -> str:
        """Ask the endpoint in use for its status (a health probe).

        Returns:
            The server's version string.
        """
        reply = await self._unary(_STATUS, rpc.StatusRequest())
        if reply.errors:
            raise StorageUnavailable(f"etcd reports errors: {', '.join(reply.errors)}")
        return str(reply.version)

    async def close(self) -> None:
        self._closed = True
        self._txns.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.client.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._ready_future is not None and not self._ready_future.done():
            self._ready_future.cancel()

    # -- reads ------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        check_key(key)
        reply = await self._unary(_RANGE, rpc.RangeRequest(key=_key(key)))
        return _entry(reply.kvs[0]) if reply.kvs else None

    async def get_many(self, keys: Sequence[str]) -> dict[str, Entry | None]:
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            check_key(key)
        if not wanted:
            return {}
        # A transaction without comparisons: all reads at one revision.
        request = _txn_request(reads=wanted)
        reply, _ = await self._txns.submit(request, reads=[_key(key) for key in wanted], writes=(), lease=0)
        return self._ranges(wanted, reply)

    async def get_prefix(self, prefix: str) -> list[Entry]:
        start = _key(prefix) or b"\0"
        request = rpc.RangeRequest(
            key=start,
            range_end=prefix_range_end(_key(prefix)),
            sort_order=rpc.RangeRequest.ASCEND,
            sort_target=rpc.RangeRequest.KEY,
        )
        reply = await self._unary(_RANGE, request)
        return [_entry(kv) for kv in reply.kvs]

    # -- writes -----------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        check_key(key)
        request = rpc.PutRequest(key=_key(key), value=bytes(value), lease=lease)
        reply = await self._unary(_PUT, request, lease=lease)
        return int(reply.header.revision)

    async def put_if_absent(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        check_key(key)
        request = _txn_request([Condition.absent(key)], [Put(key, value, lease)])
        reply = await self._unary(_TXN, request, lease=lease)
        return bool(reply.succeeded)

    async def compare_and_swap(self, key: str, expected: bytes, new: bytes, *, lease: int = 0) -> bool:
        check_key(key)
        request = _txn_request([Condition.has_value(key, expected)], [Put(key, new, lease)])
        reply = await self._unary(_TXN, request, lease=lease)
        return bool(reply.succeeded)

    async def delete(self, key: str) -> bool:
        check_key(key)
        reply = await self._unary(_DELETE, rpc.DeleteRangeRequest(key=_key(key)))
        return bool(reply.deleted)

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        check_transaction(conditions, ops)
        compared = unique_keys(conditions)
        # On failure, read the compared keys in the same round trip so the
        # caller can re-decide without another read.
        request = _txn_request(conditions, ops, failure_reads=compared)
        lease = next((op.lease for op in ops if isinstance(op, Put) and op.lease), 0)
        reply, revision = await self._txns.submit(
            request, reads=[_key(key) for key in compared], writes=[_key(op.key) for op in ops], lease=lease
        )
        if not reply.succeeded:
            raise ConditionFailed(self._ranges(compared, reply))
        return revision

    # -- leases -------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> Lease:
        if ttl <= 0:
            raise ValueError("lease TTL must be positive")
        reply = await self._unary(_LEASE_GRANT, rpc.LeaseGrantRequest(TTL=ttl))
        if reply.error:
            raise StorageError(f"etcd refused the lease: {reply.error}")
        return Lease(id=int(reply.ID), ttl=int(reply.TTL))

    async def keep_alive(self, lease_id: int) -> int:
        reply = await self._unary(_LEASE_KEEP_ALIVE, rpc.LeaseKeepAliveRequest(ID=lease_id), lease=lease_id)
        # etcd answers a keep-alive for an unknown lease with TTL 0.
        if reply.TTL <= 0:
            raise LeaseNotFound(lease_id)
        return int(reply.TTL)

    async def revoke_lease(self, lease_id: int) -> None:
        try:
            await self._unary(_LEASE_REVOKE, rpc.LeaseRevokeRequest(ID=lease_id), lease=lease_id)
        except LeaseNotFound:
            pass

    # -- internals ------------------------------------------------------------------

    def _send_txn(self, request: bytes, lease: int) -> Awaitable[Any]:
        return self._unary(_TXN, request, lease=lease)

    @staticmethod
    def _ranges(keys: Sequence[str], reply: Any) -> dict[str, Entry | None]:
        """Map the range responses of a txn (one per key, in order) to entries."""
        result: dict[str, Entry | None] = {}
        for key, response in zip(keys, reply.responses, strict=True):
            kvs = response.response_range.kvs
            result[key] = _entry(kvs[0]) if kvs else None
        return result

    def _connection(self) -> _Connection:
        if self._closed:
            raise StorageUnavailable("etcd storage is closed")
        conn = self._conn
        if conn is None:
            if self._reactor is None:
                from twisted.internet import reactor

                self._reactor = reactor
            conn = self._conn = _Connection(self._endpoints[self._index], self._tls, self._reactor)
        return conn

    async def _ready_connection(self) -> _Connection:
        if self._ready is not None:
            await self._pass_ready_gate()
        return self._connection()

    async def _pass_ready_gate(self) -> None:
        """Wait (bounded) for the ``ready`` signal the first time(s) through."""
        if self._ready is None:
            return
        if self._ready_future is None:
            self._ready_future = asyncio.ensure_future(self._ready())
        future = self._ready_future
        if future.done() and not future.cancelled() and future.exception() is None:
            # Passed for good: skip the check from now on.
            self._ready = None
            return
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.shield(future)
        except TimeoutError:
            raise StorageUnavailable(f"etcd is not ready yet (waited {self._timeout:g}s)") from None
        except asyncio.CancelledError:
            if future.cancelled():
                raise StorageUnavailable("etcd storage is closed") from None
            raise
        except Exception as error:
            raise StorageUnavailable(f"etcd did not start: {error}") from error
        self._ready = None

    async def _unary(self, method: tuple[str, Any], request: Any, *, lease: int = 0) -> Any:
        """Send one request (a message, or one already serialized) to the
        endpoint in use; translate failures."""
        # Hot path (every paid call): no extra coroutine once ready and connected.
        conn = self._conn
        if conn is None or self._ready is not None:
            conn = await self._ready_connection()
        path, reply_type = method
        try:
            # A silently dead peer would keep every request waiting: after a
            # timeout, the next one goes on a fresh connection.
            data = await conn.client.unary(
                path,
                request if isinstance(request, bytes) else request.SerializeToString(),
                self._timeout,
                drop_on_timeout=True,
            )
        except TimeoutError:
            # Its connection was dropped, but dialling the same endpoint
            # again would "succeed" (the kernel accepts for a frozen etcd):
            # the next request tries the next endpoint.
            self._rotate(conn, f"did not answer within {self._timeout:g}s")
            raise StorageTimeout(f"etcd at {conn.endpoint.url} did not answer within {self._timeout:g}s") from None
        except GrpcError as error:
            raise self._translate(error, conn, lease) from None
        return reply_type.FromString(data)

    def _translate(self, error: GrpcError, conn: _Connection, lease: int) -> Exception:
        """Map a gRPC failure to the storage error hierarchy."""
        code = error.status
        details = error.message or f"status {code}"
        url = conn.endpoint.url
        if code == Status.DEADLINE_EXCEEDED:
            self._rotate(conn, "timed out")
            return StorageTimeout(f"etcd at {url} did not answer within {self._timeout:g}s")
        if isinstance(error, AnswerLost):
            # Sent, and no answer: it may have been applied (a write's
            # outcome is unknown, as after a timeout).
            if code == Status.UNAVAILABLE:
                self._rotate(conn, "lost the connection")
            return StorageTimeout(f"etcd at {url} gave no answer: {details}")
        if code in (Status.UNAVAILABLE, Status.CANCELLED) and any(words in details for words in _PROPOSED):
            # etcd's own "request timed out", "leader changed", "server
            # stopped", "request cancelled": said after the request was
            # proposed, which may still be committed.  A member that says
            # so may be cut off from its cluster: try another.
            self._rotate(conn, details)
            return StorageTimeout(f"etcd at {url}: {details}")
        if code == Status.NOT_FOUND and _LEASE_NOT_FOUND in details:
            return LeaseNotFound(lease)
        if code == Status.INVALID_ARGUMENT:
            return ValueError(f"etcd rejected the request: {details}")
        if code in (Status.UNAVAILABLE, Status.CANCELLED):
            self._rotate(conn, "unavailable")
            if details.startswith(f"etcd at {url} "):
                return StorageUnavailable(details)  # the connection's own words name it already
            return StorageUnavailable(f"etcd at {url} is unavailable: {details}")
        if code == Status.RESOURCE_EXHAUSTED:
            # e.g. "mvcc: database space exceeded": nothing was written.
            return StorageUnavailable(f"etcd at {url} cannot accept the request: {details}")
        if code in (Status.UNAUTHENTICATED, Status.PERMISSION_DENIED):
            return StorageError(f"etcd at {url} refused access: {details}")
        return StorageError(f"etcd at {url} failed: {code}: {details}")

    def _rotate(self, failed: _Connection, why: str) -> None:
        """After ``failed`` proved unusable (``why``), use the next endpoint (if any).

        Only once per failed connection: the other requests that were in
        flight on it fail the same way, and must not skip the endpoint the
        first one moved to.
        """
        if len(self._endpoints) == 1 or self._conn is not failed:
            return
        self._index = (self._index + 1) % len(self._endpoints)
        self._conn = None
        _log.warn(
            "etcd endpoint {failed}: {why}; switching to {next}",
            failed=failed.endpoint.url,
            why=why,
            next=self._endpoints[self._index].url,
        )
        # Requests still in flight on the old connection fail over to the
        # next request; closing it now releases the socket.
        task = asyncio.ensure_future(failed.client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
