"""An HTTP/2 client for gRPC services, on the same ``h2`` stack as the front end.

This replaces grpc.aio for the passthrough (DESIGN.md §3 named grpc.aio; the
measurement that changed it is in the module docstring of
:mod:`snet_daemon.upstream.grpc`).  A call is relayed event by event: the
service's headers, messages and trailers are handed to the client's
:class:`~snet_daemon.frontend.call.ServerCall` from the data callback, with
no coroutine hop per message, and the headers go through as they are.

One connection per service (HTTP/2 multiplexes); calls beyond the service's
``MAX_CONCURRENT_STREAMS`` wait for a free stream.  A connection that fails
is retried on the next call, but not more often than a short, growing
backoff, so a dead service is not hammered at the call rate.  Flow control
is honoured both ways: request bytes wait for the service's window, and the
service's reply bytes are acknowledged only once the client can take them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from snet_daemon import __version__
from snet_daemon.frontend._h2_tuning import fast_hpack
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.h2flow import (
    GracefulH2Connection,
    WindowWaiters,
    initial_window_grew,
    send_queued,
    send_within_window,
)
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.frontend.wire import (
    MessageDecoder,
    Metadata,
    check_encoding,
    decode_message,
    encode_timeout,
    frame,
    metadata_from_headers,
    metadata_to_headers,
    never_indexed,
)
from snet_daemon.sendnow import send_now

_log = Logger(namespace="snetd.upstream")

_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
)
_USER_AGENT: Final = f"snetd/{__version__}"
_STREAM_WINDOW: Final = 1024 * 1024
_CONNECTION_WINDOW: Final = 16 * 1024 * 1024
#: Request bytes a call may queue before its pump waits for window.
_WRITE_BUFFER: Final = 256 * 1024
#: Who answers, in messages, unless :class:`H2Upstream` is told otherwise.
_SERVICE: Final = "the service"
#: Seconds a connection given up after a protocol error may take to close
#: before it is aborted.
_ABORT_GRACE: Final = 5.0
#: Why calls fail once :meth:`H2Upstream.close` has run.
_SHUTTING_DOWN: Final = "the daemon is shutting down"

# HTTP status → gRPC status, for replies that are not gRPC at all
# (PROTOCOL-HTTP2.md, "HTTP to gRPC Status Code Mapping").
_HTTP_TO_GRPC: Final = {
    400: Status.INTERNAL,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.UNIMPLEMENTED,
    429: Status.UNAVAILABLE,
    502: Status.UNAVAILABLE,
    503: Status.UNAVAILABLE,
    504: Status.UNAVAILABLE,
}

_ResponseReceived = h2.events.ResponseReceived
_DataReceived = h2.events.DataReceived
_TrailersReceived = h2.events.TrailersReceived
_StreamEnded = h2.events.StreamEnded
_StreamReset = h2.events.StreamReset
_WindowUpdated = h2.events.WindowUpdated
_RemoteSettingsChanged = h2.events.RemoteSettingsChanged
_ConnectionTerminated = h2.events.ConnectionTerminated


class AnswerLost(GrpcError):
    """A request went out but its answer never came: the connection was
    lost, or the service reset the stream.  The service may have processed
    it (unlike a refused stream, or one above a GOAWAY's last stream id).

    Clients see its status (``UNAVAILABLE``, ``CANCELLED``, ``INTERNAL``);
    the etcd client tells it apart, as a write of unknown outcome.
    """


class _Refused(GrpcError):
    """The service did not process the call: its GOAWAY named a last stream
    below it, or it reset the stream with ``REFUSED_STREAM`` (RFC 9113
    §8.7).  A call whose whole request is at hand is sent again, once (on
    another connection after a GOAWAY), as gRPC clients do ("transparent
    retry"), so a service retiring a connection fails no call.
    """


class _Relay:
    """One upstream stream, relaying the service's reply into a client call."""

    __slots__ = (
        "call",
        "closed",
        "conn",
        "decoder",
        "done",
        "drainer",
        "end_after_pending",
        "headers_seen",
        "max_message",
        "pending",
        "pending_bytes",
        "sid",
        "unacked",
    )

    def __init__(self, call: ServerCall, loop: asyncio.AbstractEventLoop, max_message: int) -> None:
        self.call = call
        self.max_message = max_message
        self.reset(loop)

    def reset(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start afresh, for a call sent again after :class:`_Refused`."""
        self.conn: UpstreamConnection | None = None
        self.sid = 0
        #: Resolves with None on OK, or fails with the GrpcError to raise.
        self.done: asyncio.Future[None] = loop.create_future()
        self.decoder = MessageDecoder(self.max_message)
        self.headers_seen = False
        self.pending: deque[bytes] = deque()
        self.pending_bytes = 0
        self.end_after_pending = False
        self.unacked = 0
        self.drainer: asyncio.Future[None] | None = None
        self.closed = False

    def finish(self, error: GrpcError | None) -> None:
        """Resolve the call's outcome once."""
        self.closed = True
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)
        self.wake()

    def wake(self) -> None:
        if self.drainer is not None and not self.drainer.done():
            self.drainer.set_result(None)

    def peer(self) -> str:
        """Who answers, for messages ("the service", "etcd")."""
        conn = self.conn
        return conn.peer if conn is not None else _SERVICE

    # -- events from the connection ---------------------------------------

    def on_headers(self, headers: list[tuple[str, str]], end_stream: bool) -> None:
        if self.headers_seen or end_stream:
            # Trailers, or a trailers-only reply.
            self.on_trailers(headers)
            return
        self.headers_seen = True
        status = _get(headers, ":status")
        if status != "200":
            self.finish(_http_error(status, headers, self.peer()))
            return
        try:
            self.decoder = MessageDecoder(self.max_message, check_encoding(_get(headers, "grpc-encoding")))
            metadata = metadata_from_headers(headers)
        except GrpcError as error:
            self.finish(GrpcError(Status.INTERNAL, f"bad reply headers from {self.peer()}: {error.message}"))
            return
        self.call.send_initial_metadata(metadata)

    def on_data(self, data: bytes, size: int) -> int:
        """Relay reply messages; return how many bytes to acknowledge now."""
        if self.closed:
            return size
        try:
            messages = self.decoder.feed(data)
        except GrpcError as error:
            self.finish(GrpcError(error.status, f"bad reply from {self.peer()}: {error.message}"))
            return size
        call = self.call
        for message in messages:
            call.write(message)
        if call.can_write():
            return size
        # The client is slow: hold the service's window until it drains.
        self.unacked += size
        call.on_writable = self._client_drained
        return 0

    def _client_drained(self) -> None:
        self.call.on_writable = None
        conn = self.conn
        if self.unacked and conn is not None:
            amount, self.unacked = self.unacked, 0
            conn.acknowledge(self, amount)

    def on_trailers(self, headers: list[tuple[str, str]]) -> None:
        raw_status = _get(headers, "grpc-status")
        if raw_status is None:
            status = _get(headers, ":status")
            if status is not None and status != "200":
                self.finish(_http_error(status, headers, self.peer()))
            else:
                self.finish(GrpcError(Status.INTERNAL, f"{self.peer()} ended the call without a grpc-status"))
            return
        try:
            code = int(raw_status)
            trailers = metadata_from_headers(headers)
        except (ValueError, GrpcError):
            self.finish(GrpcError(Status.INTERNAL, f"malformed trailers from {self.peer()}"))
            return
        message = decode_message(_get(headers, "grpc-message") or "")
        if not self.decoder.at_boundary():
            self.finish(GrpcError(Status.INTERNAL, f"{self.peer()}'s reply ended in the middle of a message"))
        elif code == 0:
            self.call.set_trailing_metadata(trailers)
            self.finish(None)
        else:
            self.finish(GrpcError(code, message, trailers))

    def on_reset(self, code: int) -> None:
        error: GrpcError
        if code == h2.errors.ErrorCodes.REFUSED_STREAM:
            error = _Refused(Status.UNAVAILABLE, f"{self.peer()} refused the call (REFUSED_STREAM)")
        elif code == h2.errors.ErrorCodes.CANCEL:
            error = AnswerLost(Status.CANCELLED, f"{self.peer()} cancelled the call")
        else:
            error = AnswerLost(Status.INTERNAL, f"{self.peer()} reset the call (HTTP/2 error {code})")
        self.finish(error)


class UpstreamConnection(Protocol):
    """One HTTP/2 connection to the service."""

    def __init__(self, pool: H2Upstream) -> None:
        self._pool = pool
        self._conn = GracefulH2Connection(config=_CONFIG)
        fast_hpack(self._conn)
        self._relays: dict[int, _Relay] = {}
        #: Calls whose request bytes wait for the service's window.
        self._waiters: WindowWaiters[_Relay] = WindowWaiters(self._conn)
        self._flush_scheduled = False
        self._receiving = False
        self.lost = False
        #: No new streams after the service's GOAWAY.
        self.draining = False

    # -- Twisted Protocol -------------------------------------------------

    def connectionMade(self) -> None:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        conn = self._conn
        conn.initiate_connection()
        conn.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: 1024 * 1024,
            }
        )
        conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self._flush()
        self._pool.connection_made(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._pool.log.warn(
                "HTTP/2 protocol error from {peer} at {endpoint}: {error}",
                peer=self._pool.peer,
                endpoint=self._pool.endpoint,
                error=exc,
            )
            # No new streams here from now on (connectionLost comes later).
            self.draining = True
            self._pool.capacity_changed()
            self._give_up()
            return
        self._receiving = True
        try:
            for event in events:
                try:
                    self._dispatch(event)
                except Exception:
                    # This connection carries every client's calls: a bug
                    # met relaying one event ends that call only (Twisted
                    # would drop the connection for an exception out of
                    # dataReceived).
                    self._pool.log.failure(
                        "error relaying {event} from {peer} at {endpoint}",
                        event=type(event).__name__,
                        peer=self._pool.peer,
                        endpoint=self._pool.endpoint,
                    )
                    self._relay_failed(getattr(event, "stream_id", None) or 0)
        finally:
            self._receiving = False
        self._flush()

    def _give_up(self) -> None:
        """Close the connection after the service broke the protocol.

        h2's GOAWAY goes first.  A service that does not read it would keep
        the connection, and every call on it waiting for its deadline, so it
        is aborted after :data:`_ABORT_GRACE` seconds if still open; its
        calls then end as answers lost.
        """
        data = self._conn.data_to_send()
        if data:
            self.transport.write(data)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]
        self._pool.loop.call_later(_ABORT_GRACE, self._abort)

    def _abort(self) -> None:
        if not self.lost:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _relay_failed(self, sid: int) -> None:
        """End the call on stream ``sid`` after an unexpected error, resetting the stream.

        The request went out, so the peer may have acted on it: the call
        ends with :class:`AnswerLost`, which the etcd client treats as a
        write of unknown outcome (to be settled), not as one never applied.
        """
        relay = self._relays.get(sid)
        if relay is not None:
            relay.finish(AnswerLost(Status.INTERNAL, f"internal error relaying the reply of {self._pool.peer}"))
            self.cancel(relay)

    def _dispatch(self, event: h2.events.Event) -> None:
        kind = type(event)
        if kind is _DataReceived:
            relay = self._relays.get(event.stream_id)  # type: ignore[attr-defined]
            size = event.flow_controlled_length or 0  # type: ignore[attr-defined]
            ack = size if relay is None else relay.on_data(event.data or b"", size)  # type: ignore[attr-defined]
            if ack:
                self._conn.acknowledge_received_data(ack, event.stream_id)  # type: ignore[attr-defined]
            elif size:
                # Held for a client that is not reading: only this stream's
                # window waits for it.  The connection's is given back now,
                # or a few slow clients would hold the whole connection and
                # stall every other call's reply.  (When the stream's bytes
                # are acknowledged later, h2 adds no more to the connection
                # than its window lacks.)
                self._conn.increment_flow_control_window(size)
        elif kind is _ResponseReceived or kind is _TrailersReceived:
            relay = self._relays.get(event.stream_id)  # type: ignore[attr-defined]
            if relay is not None:
                headers = [(k.decode("ascii"), v.decode("latin-1")) for k, v in event.headers]  # type: ignore[attr-defined]
                relay.on_headers(headers, event.stream_ended is not None)  # type: ignore[attr-defined]
        elif kind is _StreamEnded:
            relay = self._relays.pop(event.stream_id, None)  # type: ignore[attr-defined]
            if relay is not None:
                if not relay.closed:
                    relay.finish(GrpcError(Status.INTERNAL, f"{self._pool.peer} ended the call without a status"))
                self._forget(relay)
        elif kind is _StreamReset:
            relay = self._relays.pop(event.stream_id, None)  # type: ignore[attr-defined]
            if relay is not None:
                relay.on_reset(int(event.error_code or 0))  # type: ignore[attr-defined]
                self._forget(relay)
        elif kind is _WindowUpdated:
            self._waiters.window_updated(event.stream_id, self._drain)  # type: ignore[attr-defined]
        elif kind is _RemoteSettingsChanged:
            if self._waiters and initial_window_grew(event):  # type: ignore[arg-type]
                self._waiters.wake(self._drain, everyone=True)
            self._pool.capacity_changed()
        elif kind is _ConnectionTerminated:
            self._on_goaway(event.last_stream_id or 0)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        relays = list(self._relays.values())
        self._relays.clear()
        self._waiters.clear()
        for relay in relays:
            relay.finish(
                AnswerLost(Status.UNAVAILABLE, f"lost the connection to {self._pool.peer} at {self._pool.endpoint}")
            )
        self._pool.connection_lost(self)

    # -- for the pool -----------------------------------------------------

    @property
    def peer(self) -> str:
        """Who answers on this connection, for messages."""
        return self._pool.peer

    def has_capacity(self) -> bool:
        if self.lost or self.draining:
            return False
        limit = self._conn.remote_settings.max_concurrent_streams
        return len(self._relays) < limit

    def idle(self) -> bool:
        return not self._relays

    def start(self, relay: _Relay, headers: list[tuple[str, str]]) -> bool:
        """Open a stream for ``relay`` with ``headers``.

        Returns False when the connection turned out to be closing (the
        service's GOAWAY, or h2 refusing new streams); the caller takes
        another connection.
        """
        if self.draining or self.lost:
            return False
        try:
            sid = self._conn.get_next_available_stream_id()
            self._conn.send_headers(sid, headers)
        except h2.exceptions.ProtocolError:
            self.draining = True
            return False
        relay.conn = self
        relay.sid = sid
        self._relays[sid] = relay
        self._schedule_flush()
        return True

    def send(self, relay: _Relay, data: bytes, end_stream: bool = False) -> None:
        """Queue request bytes (and maybe the end of the request)."""
        if relay.closed or self.lost:
            return
        if data:
            if relay.pending:
                relay.pending.append(data)
                relay.pending_bytes += len(data)
            else:
                sent = send_within_window(self._conn, relay.sid, data, end_stream)
                if sent < len(data):
                    relay.pending.append(data[sent:])
                    relay.pending_bytes += len(data) - sent
                    self._waiters.wait(relay.sid, relay)
                elif end_stream:
                    end_stream = False  # ended by the frame that carried the last byte
        if end_stream:
            if relay.pending:
                relay.end_after_pending = True
            else:
                self._end(relay)
        self._schedule_flush()

    def cancel(self, relay: _Relay) -> None:
        """The call ended early (the client went away, the reply broke): reset the stream at the service."""
        if relay.sid in self._relays and not self.lost:
            self._relays.pop(relay.sid, None)
            try:
                self._conn.reset_stream(relay.sid, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:
                pass
            self._forget(relay)
            self._schedule_flush()

    def acknowledge(self, relay: _Relay, amount: int) -> None:
        if self.lost:
            return
        self._conn.acknowledge_received_data(amount, relay.sid)
        self._schedule_flush()

    def close(self) -> None:
        if not self.lost:
            try:
                self._conn.close_connection()
                self._flush()
            except h2.exceptions.ProtocolError:
                pass
            self.transport.loseConnection()  # type: ignore[union-attr]

    # -- internals --------------------------------------------------------

    def _end(self, relay: _Relay) -> None:
        try:
            self._conn.end_stream(relay.sid)
        except h2.exceptions.ProtocolError:
            pass

    def _drain(self, relay: _Relay) -> None:
        """Send the request bytes the windows now allow; end the request if all went."""
        sent, done = send_queued(self._conn, relay.sid, relay.pending)
        relay.pending_bytes -= sent
        if not done:
            self._waiters.wait(relay.sid, relay)
        elif relay.end_after_pending:
            relay.end_after_pending = False
            self._end(relay)
        if relay.pending_bytes < _WRITE_BUFFER:
            relay.wake()
        self._schedule_flush()

    def _on_goaway(self, last_stream_id: int) -> None:
        self.draining = True
        for sid in [s for s in self._relays if s > last_stream_id]:
            relay = self._relays.pop(sid)
            relay.finish(_Refused(Status.UNAVAILABLE, f"{self._pool.peer} is shutting down (GOAWAY)"))
            self._forget(relay)
        self._pool.capacity_changed()
        if not self._relays:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _forget(self, relay: _Relay) -> None:
        self._waiters.discard(relay.sid)
        if relay.call.on_writable is not None:
            relay.call.on_writable = None
        if relay.unacked and not self.lost:
            self._conn.acknowledge_received_data(relay.unacked, relay.sid)
            relay.unacked = 0
        self._pool.capacity_changed()
        if self.draining and not self._relays and not self.lost:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _schedule_flush(self) -> None:
        if self._receiving or self._flush_scheduled or self.lost:
            return
        self._flush_scheduled = True
        self._pool.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._conn.data_to_send()
        if data and not self.lost:
            send_now(self.transport, data)  # type: ignore[arg-type]


class H2Upstream:
    """Calls to one gRPC service over HTTP/2: connection, queueing, relaying.

    Args:
        reactor: provides TCP connections (and the clock for backoff).
        host: the service host (name or address).
        port: the service port.
        endpoint: the configured ``service_endpoint``, for messages.
        loop: the event loop of the asyncio reactor.
        tls: connect with TLS (system trust roots), offering ALPN ``h2``.
        max_message_size: limit for reply messages.
        connect_timeout: seconds to wait for a TCP (+TLS) connection.
        tls_options: TLS client options to use instead of the system trust
            roots (a private CA, a client certificate: etcd with mTLS).
        max_backoff: longest wait, in seconds, before retrying a failed
            connection (calls fail fast meanwhile).
        peer: who answers, as errors and logs name it: "the service", or
            "etcd" for the payment storage's client (an operator reading
            "the service at ... is unavailable" looks at the AI service).
        log: where connection failures are logged (the storage client's
            go under its own namespace).
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        endpoint: str,
        loop: asyncio.AbstractEventLoop,
        *,
        tls: bool = False,
        max_message_size: int = 4 * 1024 * 1024,
        connect_timeout: float = 10.0,
        tls_options: Any = None,
        max_backoff: float = 5.0,
        peer: str = _SERVICE,
        log: Logger = _log,
    ) -> None:
        self._reactor = reactor
        self.peer = peer
        self.log = log
        self._tls_options = tls_options
        self._max_backoff = max_backoff
        self.host = host
        self.port = port
        self.endpoint = endpoint
        self.loop = loop
        self._tls = tls
        self._max_message = max_message_size
        self._connect_timeout = connect_timeout
        self._authority = host if port == (443 if tls else 80) else f"{host}:{port}"
        self._scheme = "https" if tls else "http"
        self._conn: UpstreamConnection | None = None
        #: Every open connection: the one in use, and those the service
        #: retired (GOAWAY) that still finish their calls.
        self._open: set[UpstreamConnection] = set()
        self._connecting: asyncio.Future[UpstreamConnection] | None = None
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._failed_until = 0.0
        self._backoff = 0.0
        self._last_error = ""
        self._closed = False

    # -- lifecycle --------------------------------------------------------

    def open(self) -> None:
        """Start connecting now, so the first call does not wait for it."""
        self._closed = False
        self.loop.create_task(self._connect_quietly())

    async def _connect_quietly(self) -> None:
        try:
            await self._connection()
        except GrpcError:
            pass  # logged by _connection; calls will retry

    async def close(self, grace: float | None = None) -> None:
        """Close the connections, retired ones too (running calls fail with UNAVAILABLE)."""
        self._closed = True
        self._conn = None
        for conn in list(self._open):
            conn.close()

    def drop_connection(self) -> None:
        """Close the current connection; the next call makes a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def connect(self) -> None:
        """Wait for a connection to the service.

        Raises:
            GrpcError: ``UNAVAILABLE`` when it cannot be reached (right now,
                or still within the backoff after a failed attempt).
        """
        await self._connection()

    def ready(self) -> bool:
        """True while connected (for the heartbeat)."""
        return self._conn is not None and not self._conn.lost

    # -- calls ------------------------------------------------------------

    async def forward(self, call: ServerCall, metadata: Metadata, relay: _Relay | None = None) -> None:
        """Relay ``call`` to the service with ``metadata`` (through ``relay``
        when given, so the caller can see which connection carried it).

        Raises:
            GrpcError: the service's status when not OK; UNAVAILABLE when
                the service cannot be reached; what the reply's framing
                breaks (INTERNAL, RESOURCE_EXHAUSTED).
        """
        if relay is None:
            relay = _Relay(call, self.loop, self._max_message)
        request = call.request_if_complete()
        retried = False
        while True:
            headers = self._headers(call, metadata)
            conn = await self._stream_slot()
            while not conn.start(relay, headers):
                conn = await self._stream_slot()
            pump: asyncio.Task[None] | None = None
            try:
                if request is not None:
                    conn.send(relay, frame(request), end_stream=True)
                else:
                    pump = self.loop.create_task(self._pump(call, relay, conn))
                await relay.done
                return
            except _Refused:
                # Not processed (the stream is already forgotten): once more,
                # when the request can be sent again.
                if request is None or retried or relay.headers_seen:
                    raise
                retried = True
                relay.reset(self.loop)
            except BaseException:
                # Cancelled, or the reply broke (bad headers, a message over the
                # limit): the stream may still be open at the service, holding
                # one of its stream slots and sending on.  (A stream that ended
                # is no longer registered: nothing to do then.)
                conn.cancel(relay)
                raise
            finally:
                if pump is not None and not pump.done():
                    pump.cancel()
                call.on_writable = None

    async def unary(
        self,
        method: str,
        request: bytes,
        timeout: float,  # noqa: ASYNC109
        *,
        drop_on_timeout: bool = False,
    ) -> bytes:
        """Make a unary call of our own (e.g. a health check); return the reply.

        ``drop_on_timeout``: when the call times out, close the connection
        it was sent on (a silently dead peer would hold every later call
        too), but only while that is still the connection in use and not
        retired: one the service has retired (GOAWAY) may still carry this
        late call and others it is finishing, and its successor carries
        calls that are doing fine.

        Raises:
            GrpcError: as :meth:`forward`.
            TimeoutError: no answer within ``timeout`` seconds.
        """
        sink = _CollectingSink()
        # The deadline is kept here rather than sent (no grpc-timeout): these
        # calls are small and frequent (etcd, on every paid call), and
        # asyncio.timeout needs no extra task, unlike wait_for.
        call = ServerCall(method, (), sink, self.loop)
        call.deliver(request)
        call.end_input()
        relay = _Relay(call, self.loop, self._max_message)
        try:
            async with asyncio.timeout(timeout):
                await self.forward(call, (), relay)
        except TimeoutError:
            current = self._conn
            if (
                drop_on_timeout
                and current is not None
                and not current.draining
                and (relay.conn is None or relay.conn is current)
            ):
                self.drop_connection()
            raise
        if len(sink.messages) != 1:
            raise GrpcError(Status.INTERNAL, f"expected one reply, got {len(sink.messages)}")
        return sink.messages[0]

    def _headers(self, call: ServerCall, metadata: Metadata) -> list[tuple[str, str]]:
        headers = [
            (":method", "POST"),
            (":scheme", self._scheme),
            (":path", call.method),
            (":authority", self._authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", _USER_AGENT),
            # No grpc-accept-encoding: without it a service sends replies
            # uncompressed, which is what we want.
        ]
        remaining = call.time_remaining()
        if remaining is not None:
            headers.append(never_indexed("grpc-timeout", encode_timeout(remaining)))
        headers.extend(metadata_to_headers(metadata))
        return headers

    async def _pump(self, call: ServerCall, relay: _Relay, conn: UpstreamConnection) -> None:
        """Move a streaming request to the service, waiting for its window."""
        try:
            while (message := await call.read()) is not None:
                conn.send(relay, frame(message))
                while relay.pending_bytes >= _WRITE_BUFFER and not relay.closed:
                    relay.drainer = self.loop.create_future()
                    await relay.drainer
                if relay.closed:
                    return
            conn.send(relay, b"", end_stream=True)
        except GrpcError:
            # The request was malformed; the front end is failing the call.
            conn.cancel(relay)

    async def _stream_slot(self) -> UpstreamConnection:
        """A connection with a free stream, waiting for one if necessary."""
        while True:
            conn = await self._connection()
            if conn.has_capacity():
                return conn
            waiter = self.loop.create_future()
            self._waiting.append(waiter)
            await waiter

    def capacity_changed(self) -> None:
        """A stream closed or settings changed: let waiting calls retry."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def _connection(self) -> UpstreamConnection:
        conn = self._conn
        if conn is not None and not conn.lost and not conn.draining:
            return conn
        if self._closed:
            raise GrpcError(Status.UNAVAILABLE, _SHUTTING_DOWN)
        if self._connecting is None:
            # The event loop's clock is monotonic: a wall clock stepped back
            # would stretch the backoff by the step.
            now = self.loop.time()
            if now < self._failed_until:
                raise GrpcError(Status.UNAVAILABLE, self._last_error)
            self._connecting = self.loop.create_future()
            self.loop.create_task(self._dial(self._connecting))
        return await asyncio.shield(self._connecting)

    async def _dial(self, result: asyncio.Future[UpstreamConnection]) -> None:
        endpoint: Any = HostnameEndpoint(self._reactor, self.host, self.port, timeout=self._connect_timeout)
        if self._tls:
            options = self._tls_options or optionsForClientTLS(self.host, acceptableProtocols=[b"h2"])
            endpoint = wrapClientTLS(options, endpoint)
        try:
            connecting: Deferred[UpstreamConnection] = endpoint.connect(_ConnectionFactory(self))
            conn = await connecting.asFuture(self.loop)
        except Exception as exc:
            self._backoff = min(max(self._backoff * 2, 0.25), self._max_backoff)
            self._failed_until = self.loop.time() + self._backoff
            self._last_error = f"{self.peer} at {self.endpoint} is unavailable: {_describe(exc)}"
            self.log.warn("{error}", error=self._last_error)
            result.set_exception(GrpcError(Status.UNAVAILABLE, self._last_error))
            result.exception()  # retrieved: nobody may be waiting
        else:
            self._backoff = 0.0
            if self._closed:
                # close() ran while this connection was being made: kept,
                # it would stay open with nobody left to close it.
                conn.close()
                result.set_exception(GrpcError(Status.UNAVAILABLE, _SHUTTING_DOWN))
                result.exception()
            else:
                self._conn = conn
                result.set_result(conn)
        finally:
            self._connecting = None
            self.capacity_changed()

    def connection_made(self, conn: UpstreamConnection) -> None:
        self._open.add(conn)

    def connection_lost(self, conn: UpstreamConnection) -> None:
        self._open.discard(conn)
        if self._conn is conn:
            self._conn = None
        self.capacity_changed()


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: H2Upstream) -> None:
        self._pool = pool

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._pool)


class _CollectingSink:
    """A CallSink that keeps replies in memory (for the daemon's own calls)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def send_headers(self, metadata: Metadata) -> None:
        pass

    def send_message(self, message: bytes) -> None:
        self.messages.append(message)

    def send_trailers(self, status: int, message: str, metadata: Metadata, trailers_only: bool) -> None:
        pass

    def can_write(self) -> bool:
        return True

    def consumed(self, size: int) -> None:
        pass


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _http_error(status: str | None, headers: list[tuple[str, str]], peer: str) -> GrpcError:
    """A gRPC error for a reply of ``peer`` that is not gRPC (wrong HTTP status)."""
    raw = _get(headers, "grpc-status")
    if raw is not None and raw.isdigit():
        return GrpcError(int(raw), decode_message(_get(headers, "grpc-message") or ""))
    code = _HTTP_TO_GRPC.get(int(status or 0) if (status or "").isdigit() else 0, Status.UNKNOWN)
    return GrpcError(code, f"{peer} answered HTTP status {status} instead of gRPC")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__
