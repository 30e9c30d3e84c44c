""":class:`~snet_daemon.storage.base.AtomicStorage` on an etcd v3 cluster.

The requests are etcd's own gRPC messages, sent with the stubs generated in
the ``aetcd`` package over a ``grpc.aio`` channel that lives on the reactor's
asyncio loop.  ``aetcd.Client`` itself is not used: it can only open
plaintext channels to a single ``host:port`` (no client TLS, no list of
endpoints), and going through the stubs directly saves its per-call wrapping
on the hot path (one CAS transaction per paid call).

Behaviour the daemon relies on:

* **Bounded waits.**  Every request carries the request timeout as its gRPC
  deadline, and requests fail fast while the channel cannot connect, so
  nothing hangs when etcd is down: callers get
  :class:`~snet_daemon.storage.base.StorageUnavailable` (not applied) or
  :class:`~snet_daemon.storage.base.StorageTimeout` (outcome unknown).
* **Recovery.**  The channel reconnects by itself; its reconnect backoff is
  capped at one second (gRPC's default cap is two minutes), so service
  resumes within about a second of etcd coming back.
* **Several endpoints.**  Requests go to one endpoint at a time; when it is
  unavailable the next one is used for the following requests.  A failed
  request is not retried here: a retried conditional write that had in fact
  been applied would come back as a spurious condition failure.
* **TLS.**  ``https://`` endpoints use TLS, with the configured CA bundle and
  client certificate/key (``payment_channel_ca_path``, ``_cert_path``,
  ``_key_path``) when given, else the system roots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from aetcd import rpc  # type: ignore[import-untyped]
from twisted.logger import Logger

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

_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Reconnect quickly after an etcd restart (gRPC's default backoff grows
    # to 120 s, which would keep payments failing long after etcd is back).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Detect a dead connection like the Go daemon's client (10 s / 3 s).
    # etcd rejects pings more often than every 5 s, and pings without an
    # active call, so neither is enabled.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    # A prefix scan of many channels may exceed gRPC's 4 MiB default.
    ("grpc.max_receive_message_length", -1),
    # etcd is infrastructure next to the daemon; an HTTP proxy from the
    # environment (http_proxy) would only break it.
    ("grpc.enable_http_proxy", 0),
)

_LEASE_NOT_FOUND = "lease not found"


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
            ValueError: Only one of cert and key is given.
            OSError: A file cannot be read (the message names it).
        """
        if bool(cert_path) != bool(key_path):
            raise ValueError("payment_channel_cert_path and payment_channel_key_path must be set together")
        if not (ca_path or cert_path):
            return None

        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return cls(ca=read(ca_path), cert=read(cert_path), key=read(key_path))

    def credentials(self) -> Any:
        """gRPC channel credentials for this material."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


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


def _compare(condition: Condition) -> Any:
    if condition.value is not None:
        return rpc.Compare(
            key=_key(condition.key), target=rpc.Compare.VALUE, result=rpc.Compare.EQUAL, value=condition.value
        )
    # MOD == 0 holds exactly for an absent key (etcd compares a missing key
    # as a zeroed KeyValue); the Go daemon uses CREATE == 0, equivalent.
    return rpc.Compare(
        key=_key(condition.key),
        target=rpc.Compare.MOD,
        result=rpc.Compare.EQUAL,
        mod_revision=condition.mod_revision,
    )


def _request_op(op: Op) -> Any:
    if isinstance(op, Put):
        return rpc.RequestOp(request_put=rpc.PutRequest(key=_key(op.key), value=bytes(op.value), lease=op.lease))
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=_key(op.key)))


def _range_op(key: str) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=_key(key)))


class _Connection:
    """One channel to one endpoint, with its stubs."""

    def __init__(self, endpoint: EtcdEndpoint, tls: EtcdTls | None) -> None:
        self.endpoint = endpoint
        if endpoint.tls:
            credentials = (tls or EtcdTls()).credentials()
            self.channel = grpc.aio.secure_channel(endpoint.target, credentials, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(endpoint.target, options=_CHANNEL_OPTIONS)
        self.kv = rpc.KVStub(self.channel)
        self.lease = rpc.LeaseStub(self.channel)
        self.maintenance = rpc.MaintenanceStub(self.channel)


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
                await asyncio.wait_for(conn.channel.channel_ready(), self._connection_timeout)
                return await self.server_version()
            except TimeoutError:
                failures.append(f"{conn.endpoint.url}: no connection within {self._connection_timeout:g}s")
            except StorageError as error:
                failures.append(f"{conn.endpoint.url}: {error}")
            self._rotate(conn)
        raise StorageUnavailable("cannot reach etcd: " + "; ".join(failures))

    async def server_version(self) -> str:
        """Ask the endpoint in use for its status (a health probe).

        Returns:
            The server's version string.
        """
        reply = await self._unary(lambda conn: conn.maintenance.Status, rpc.StatusRequest())
        if reply.errors:
            raise StorageUnavailable(f"etcd reports errors: {', '.join(reply.errors)}")
        return str(reply.version)

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._ready_future is not None and not self._ready_future.done():
            self._ready_future.cancel()

    # -- reads ------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        check_key(key)
        reply = await self._unary(lambda conn: conn.kv.Range, rpc.RangeRequest(key=_key(key)))
        return _entry(reply.kvs[0]) if reply.kvs else None

    async def get_many(self, keys: Sequence[str]) -> dict[str, Entry | None]:
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            check_key(key)
        if not wanted:
            return {}
        # A transaction without comparisons: all reads at one revision.
        request = rpc.TxnRequest(success=[_range_op(key) for key in wanted])
        reply = await self._unary(lambda conn: conn.kv.Txn, request)
        return self._ranges(wanted, reply)

    async def get_prefix(self, prefix: str) -> list[Entry]:
        start = _key(prefix) or b"\0"
        request = rpc.RangeRequest(
            key=start,
            range_end=prefix_range_end(_key(prefix)),
            sort_order=rpc.RangeRequest.ASCEND,
            sort_target=rpc.RangeRequest.KEY,
        )
        reply = await self._unary(lambda conn: conn.kv.Range, request)
        return [_entry(kv) for kv in reply.kvs]

    # -- writes -----------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        check_key(key)
        request = rpc.PutRequest(key=_key(key), value=bytes(value), lease=lease)
        reply = await self._unary(lambda conn: conn.kv.Put, request, lease=lease)
        return int(reply.header.revision)

    async def put_if_absent(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        check_key(key)
        request = rpc.TxnRequest(
            compare=[_compare(Condition.absent(key))],
            success=[_request_op(Put(key, value, lease))],
        )
        reply = await self._unary(lambda conn: conn.kv.Txn, request, lease=lease)
        return bool(reply.succeeded)

    async def compare_and_swap(self, key: str, expected: bytes, new: bytes, *, lease: int = 0) -> bool:
        check_key(key)
        request = rpc.TxnRequest(
            compare=[_compare(Condition.has_value(key, expected))],
            success=[_request_op(Put(key, new, lease))],
        )
        reply = await self._unary(lambda conn: conn.kv.Txn, request, lease=lease)
        return bool(reply.succeeded)

    async def delete(self, key: str) -> bool:
        check_key(key)
        reply = await self._unary(lambda conn: conn.kv.DeleteRange, rpc.DeleteRangeRequest(key=_key(key)))
        return bool(reply.deleted)

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        check_transaction(conditions, ops)
        compared = unique_keys(conditions)
        request = rpc.TxnRequest(
            compare=[_compare(condition) for condition in conditions],
            success=[_request_op(op) for op in ops],
            # On failure, read the compared keys in the same round trip so
            # the caller can re-decide without another read.
            failure=[_range_op(key) for key in compared],
        )
        lease = next((op.lease for op in ops if isinstance(op, Put) and op.lease), 0)
        reply = await self._unary(lambda conn: conn.kv.Txn, request, lease=lease)
        if not reply.succeeded:
            raise ConditionFailed(self._ranges(compared, reply))
        return int(reply.header.revision)

    # -- leases -------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> Lease:
        if ttl <= 0:
            raise ValueError("lease TTL must be positive")
        reply = await self._unary(lambda conn: conn.lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl))
        if reply.error:
            raise StorageError(f"etcd refused the lease: {reply.error}")
        return Lease(id=int(reply.ID), ttl=int(reply.TTL))

    async def keep_alive(self, lease_id: int) -> int:
        conn = await self._ready_connection()
        call = conn.lease.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=self._timeout)
        try:
            reply = await call.read()
        except grpc.aio.AioRpcError as error:
            raise self._translate(error, conn, lease_id) from None
        finally:
            call.cancel()
        if reply is grpc.aio.EOF:
            raise StorageUnavailable(f"etcd at {conn.endpoint.url} closed the keep-alive stream")
        # etcd answers a keep-alive for an unknown lease with TTL 0.
        if reply.TTL <= 0:
            raise LeaseNotFound(lease_id)
        return int(reply.TTL)

    async def revoke_lease(self, lease_id: int) -> None:
        try:
            await self._unary(lambda conn: conn.lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease_id), lease=lease_id)
        except LeaseNotFound:
            pass

    # -- internals ------------------------------------------------------------------

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
            conn = self._conn = _Connection(self._endpoints[self._index], self._tls)
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
            await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except TimeoutError:
            raise StorageUnavailable(f"etcd is not ready yet (waited {self._timeout:g}s)") from None
        except asyncio.CancelledError:
            if future.cancelled():
                raise StorageUnavailable("etcd storage is closed") from None
            raise
        except Exception as error:
            raise StorageUnavailable(f"etcd did not start: {error}") from error
        self._ready = None

    async def _unary(self, method: Callable[[_Connection], Any], request: Any, *, lease: int = 0) -> Any:
        """Send one unary request to the endpoint in use; translate failures."""
        # Hot path (every paid call): no extra coroutine once ready and connected.
        conn = self._conn
        if conn is None or self._ready is not None:
            conn = await self._ready_connection()
        try:
            return await method(conn)(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise self._translate(error, conn, lease) from None

    def _translate(self, error: Any, conn: _Connection, lease: int) -> Exception:
        """Map a gRPC failure to the storage error hierarchy."""
        code = error.code()
        details = error.details() or code.name
        url = conn.endpoint.url
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return StorageTimeout(f"etcd at {url} did not answer within {self._timeout:g}s")
        if code == grpc.StatusCode.NOT_FOUND and _LEASE_NOT_FOUND in details:
            return LeaseNotFound(lease)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ValueError(f"etcd rejected the request: {details}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            self._rotate(conn)
            return StorageUnavailable(f"etcd at {url} is unavailable: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # e.g. "mvcc: database space exceeded": nothing was written.
            return StorageUnavailable(f"etcd at {url} cannot accept the request: {details}")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return StorageError(f"etcd at {url} refused access: {details}")
        return StorageError(f"etcd at {url} failed: {code.name}: {details}")

    def _rotate(self, failed: _Connection) -> None:
        """After ``failed`` proved unusable, use the next endpoint (if any)."""
        if len(self._endpoints) == 1 or self._conn is not failed:
            return
        self._index = (self._index + 1) % len(self._endpoints)
        self._conn = None
        _log.warn(
            "etcd endpoint {failed} unavailable; switching to {next}",
            failed=failed.endpoint.url,
            next=self._endpoints[self._index].url,
        )
        # Let requests still in flight on the old channel finish.
        task = asyncio.ensure_future(failed.channel.close(grace=self._timeout))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
