"""The HTTP/2 side of the daemon port: native gRPC, gRPC-Web and plain HTTP.

A Twisted protocol around the sans-I/O ``h2`` library.  twisted.web's own
HTTP/2 cannot serve gRPC (it sends no trailers, does no cleartext HTTP/2 and
buffers whole request bodies; DESIGN.md §2), hence this module.

Per stream, the request's content type decides the flavour:

* ``application/grpc*``: native gRPC.  Request DATA is split into messages
  as it arrives and handed to a :class:`ServerCall`; replies go out as DATA
  and the status as trailers (or a single trailers-only header block).
* ``application/grpc-web*``: gRPC-Web over HTTP/2; the trailers travel as a
  body frame, ``-text`` bodies are base64.
* anything else: plain HTTP (heartbeat, encoding, CORS preflight, 404).

Flow control is honoured both ways.  Request bytes are acknowledged once a
handler takes the message they belong to, so a handler that stops reading
stops the client once the complete messages waiting for it fill the window.
Bytes of a message still being assembled are acknowledged at once (a
message larger than the window could never complete otherwise), so flow
control does not bound them: a client announcing a large message on each of
1000 streams and never finishing one made the daemon hold 1000 times the
message size.  A budget per connection does,
:attr:`Limits.max_unfinished_bytes` (never less than twice the largest
message): the stream whose bytes take the connection over it fails with
``RESOURCE_EXHAUSTED``.  Reply bytes beyond the client's window wait in a
per-stream queue, and a handler writing more than :attr:`Limits.write_buffer`
ahead of the client waits in :meth:`ServerCall.drain`.

Handlers run as asyncio tasks.  New calls are started only after a whole
read has been processed, so a unary request that arrived complete (HEADERS,
DATA and END_STREAM in one read, as grpcio sends it) is seen complete by its
handler, which can then use a cheaper upstream call.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hpack.exceptions import HPACKError
from hyperframe.frame import GoAwayFrame
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from snet_daemon.frontend import grpcweb
from snet_daemon.frontend._h2_tuning import fast_hpack
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.gateway import Gateway, HttpResponse
from snet_daemon.frontend.h2flow import (
    GracefulH2Connection,
    WindowWaiters,
    initial_window_grew,
    send_queued,
    send_within_window,
)
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.frontend.wire import (
    ACCEPT_ENCODING,
    MessageDecoder,
    Metadata,
    frame,
    is_grpc_content_type,
    metadata_to_headers,
    status_headers,
)
from snet_daemon.sendnow import send_now

_log = Logger(namespace="snetd.frontend.http2")

_GRPC: Final = 1
_WEB: Final = 2
_PLAIN: Final = 3

_H2_CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,
    # We build every reply header block ourselves; skip h2's re-checks.
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    # Requests are checked (pseudo-headers, connection headers, case).
    validate_inbound_headers=True,
    normalize_inbound_headers=True,
)

_RequestReceived = h2.events.RequestReceived
_DataReceived = h2.events.DataReceived
_StreamEnded = h2.events.StreamEnded
_StreamReset = h2.events.StreamReset
_WindowUpdated = h2.events.WindowUpdated
_RemoteSettingsChanged = h2.events.RemoteSettingsChanged
_ConnectionTerminated = h2.events.ConnectionTerminated
#: Frames that change nothing for us, counted by the control-frame budget
#: (:meth:`H2ServerProtocol._spend_control`): priorities (we do not
#: prioritise), acknowledgements of PINGs we never sent, SETTINGS ACKs (we
#: send two SETTINGS frames, so two are expected), unknown frame types.
_USELESS = frozenset(
    {
        h2.events.PriorityUpdated,
        h2.events.PingAckReceived,
        h2.events.SettingsAcknowledged,
        h2.events.UnknownFrameReceived,
    }
)


class _Budget:
    """A token bucket on the loop clock: ``rate`` tokens a second, five seconds' worth at most.

    Args:
        rate: tokens added per second.
        now: the loop time now.
    """

    __slots__ = ("_cap", "_rate", "_time", "_tokens")

    def __init__(self, rate: float, now: float) -> None:
        self._rate = rate
        self._cap = rate * 5
        self._tokens = self._cap
        self._time = now

    def spend(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens at loop time ``now``; False once the bucket is overdrawn."""
        self._tokens = min(self._cap, self._tokens + (now - self._time) * self._rate) - cost
        self._time = now
        return self._tokens >= 0


class _Stream:
    """One HTTP/2 stream: the call on it plus what is queued for sending.

    It is also the :class:`CallSink` of its call, so each call costs one
    object here.
    """

    __slots__ = (
        "call",
        "decoded_unread",
        "decoder",
        "engaged",
        "final",
        "id",
        "kind",
        "local_closed",
        "origin",
        "partial",
        "pending",
        "pending_bytes",
        "proto",
        "remote_closed",
        "text",
        "text_decoder",
        "unacked",
        "web_content_type",
    )

    def __init__(self, stream_id: int, kind: int, proto: H2ServerProtocol) -> None:
        self.id = stream_id
        self.kind = kind
        self.proto = proto
        self.call: ServerCall | None = None
        self.decoder: MessageDecoder | None = None
        self.text = False
        self.text_decoder: grpcweb.TextDecoder | None = None
        self.web_content_type = ""
        self.origin: str | None = None
        #: Reply bytes not yet accepted by h2 (flow control).
        self.pending: deque[bytes] = deque()
        self.pending_bytes = 0
        #: What ends the stream once ``pending`` is sent: trailers to send as
        #: a header block, or an empty list to end with an empty DATA frame.
        self.final: list[tuple[str, str]] | None = None
        self.remote_closed = False
        self.local_closed = False
        #: A call is in progress on it (see H2ServerProtocol._engage).
        self.engaged = False
        #: Request bytes received but not yet acknowledged (flow control).
        self.unacked = 0
        #: Bytes of the request message being assembled, as counted in the
        #: connection's budget for them.
        self.partial = 0
        #: grpc-web-text: decoded bytes of messages delivered and not yet
        #: read, which ``unacked`` (base64 on the wire) pays for.
        self.decoded_unread = 0

    # -- CallSink ---------------------------------------------------------

    def send_headers(self, metadata: Metadata) -> None:
        headers = [(":status", "200")]
        fields: Iterable[tuple[str, str]]
        if self.kind == _GRPC:
            headers.append(("content-type", "application/grpc"))
            fields = metadata_to_headers(metadata)
        else:
            headers.append(("content-type", self.web_content_type))
            fields = list(metadata_to_headers(metadata))
            headers.extend(self.proto.gateway.cors.response_headers(self.origin, [name for name, _ in fields]))
        headers.append(("grpc-accept-encoding", ACCEPT_ENCODING))
        headers.extend(fields)
        self.proto.send_headers(self, headers, end_stream=False)

    def send_message(self, message: bytes) -> None:
        data = frame(message)
        if self.text:
            data = grpcweb.encode_text(data)
        self.proto.send_data(self, data)

    def send_trailers(self, status: int, message: str, metadata: Metadata, trailers_only: bool) -> None:
        proto = self.proto
        fields = status_headers(status, message)
        fields.extend(metadata_to_headers(metadata))
        if trailers_only:
            if self.kind == _GRPC:
                head = [(":status", "200"), ("content-type", "application/grpc")]
            else:
                head = [(":status", "200"), ("content-type", self.web_content_type)]
                head.extend(proto.gateway.cors.response_headers(self.origin, [name for name, _ in fields]))
            if status == Status.UNIMPLEMENTED:
                head.append(("grpc-accept-encoding", ACCEPT_ENCODING))
            head.extend(fields)
            proto.send_headers(self, head, end_stream=True)
        elif self.kind == _GRPC:
            proto.finish_stream(self, fields)
        else:
            block = grpcweb.trailer_frame(fields)
            proto.send_data(self, grpcweb.encode_text(block) if self.text else block)
            proto.finish_stream(self, [])

    def can_write(self) -> bool:
        return self.pending_bytes < self.proto.write_buffer and not self.proto.paused

    def consumed(self, size: int) -> None:
        # Acknowledge in the same units h2 counted (frame payload bytes); a
        # message is 5 bytes of prefix plus its body.
        if self.unacked:
            if self.text:
                # The wire carried base64: give back the share of what is
                # held that this message's decoded bytes stand for (all of
                # it with the last message read).
                read = size + 5
                if read >= self.decoded_unread:
                    amount, self.decoded_unread = self.unacked, 0
                else:
                    amount = self.unacked * read // self.decoded_unread
                    self.decoded_unread -= read
            else:
                amount = min(self.unacked, size + 5)
            self.unacked -= amount
            self.proto.acknowledge(self, amount)


@implementer(IPushProducer)
class H2ServerProtocol(Protocol):
    """One HTTP/2 connection to the daemon port (cleartext or TLS).

    Args:
        gateway: routing and limits shared by all connections.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        limits = gateway.limits
        self.write_buffer = limits.write_buffer
        self._max_message = limits.max_message_size
        #: Bytes of request messages being assembled, on all streams, and
        #: the most that may be (see the module docstring).
        self._unfinished = 0
        self._max_unfinished = max(limits.max_unfinished_bytes, 2 * limits.max_message_size)
        self._conn = GracefulH2Connection(config=_H2_CONFIG)
        fast_hpack(self._conn)
        self._streams: dict[int, _Stream] = {}
        #: Streams whose replies wait for flow-control window.
        self._waiters: WindowWaiters[_Stream] = WindowWaiters(self._conn)
        self._starting: list[_Stream] = []
        self._flush_scheduled = False
        self._receiving = False
        self._closing = False
        #: True once the connection is given up (see :meth:`_give_up`).
        self._given_up = False
        self._abort_timer: asyncio.TimerHandle | None = None
        self._last_accepted = 2**31 - 1
        self._lost = False
        self.paused = False
        self._peer = ""
        now = gateway.loop.time()
        self._resets = _Budget(limits.max_resets_per_second, now)
        self._control_frames = _Budget(limits.max_control_frames_per_second, now)
        self._idle_timeout = limits.idle_timeout
        #: When the last stream closed (loop time); read only by the idle timer.
        self._idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        #: Told when the first call begins (True) and the last one ends
        #: (False): the connection table's view (see _engage).
        self.on_busy: Callable[[bool], None] | None = None
        #: Streams engaged and still open.
        self._engaged = 0

    # -- Twisted Protocol -------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self._peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        limits = self.gateway.limits
        conn = self._conn
        conn.initiate_connection()
        conn.update_settings(
            {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
                # MAX_FRAME_SIZE stays at its 16 KiB default: h2 buffers a
                # header block until its END_HEADERS, over up to 64
                # CONTINUATION frames, so the frame size bounds what one
                # connection can park (1 MiB, against 64 MiB at 1 MiB frames).
            }
        )
        extra = limits.connection_window - 65535
        if extra > 0:
            conn.increment_flow_control_window(extra)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.gateway.connections.add(self)
        loop = self.gateway.loop
        self._idle_since = loop.time()
        self._idle_timer = loop.call_later(self._idle_timeout, self._check_idle)
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        if self._given_up:
            return  # given up (see _give_up): nothing more is served
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._receiving = True
        try:
            self._dispatch(events)
        finally:
            self._receiving = False
        self._flush()

    def _dispatch(self, events: list[h2.events.Event]) -> None:
        # h2 reports the priority a request's HEADERS carry (browsers set
        # one on every request) as a PriorityUpdated after the request: not
        # a frame of its own, so not a useless one.
        headers_priority: object = None
        for event in events:
            if self._given_up:
                break  # the rest of the read is not served
            kind = type(event)
            try:
                if kind is _DataReceived:
                    self._on_data(event)  # type: ignore[arg-type]
                elif kind is _RequestReceived:
                    headers_priority = event.priority_updated  # type: ignore[attr-defined]
                    self._on_request(event)  # type: ignore[arg-type]
                elif kind is _StreamEnded:
                    self._on_end(event.stream_id)  # type: ignore[attr-defined]
                elif kind is _WindowUpdated:
                    self._waiters.window_updated(event.stream_id, self._drain)  # type: ignore[attr-defined]
                elif kind is _StreamReset:
                    self._on_reset(event.stream_id)  # type: ignore[attr-defined]
                elif kind is _RemoteSettingsChanged:
                    self._on_settings(event)  # type: ignore[arg-type]
                elif kind is _ConnectionTerminated:
                    self._on_goaway(event.error_code)  # type: ignore[attr-defined]
                elif kind in _USELESS and event is not headers_priority:
                    self._spend_control(1)
            except Exception:
                # A bug met by one event: it must not take the connection,
                # and every other call on it, down (Twisted would drop the
                # connection for an exception out of dataReceived).  Only
                # the stream it concerns ends.
                _log.failure("error handling {event} from {peer}", event=kind.__name__, peer=self._peer)
                self._stream_failed(getattr(event, "stream_id", None) or 0)
        if self._starting:
            self._start_calls()

    def _stream_failed(self, sid: int) -> None:
        """End stream ``sid`` after an unexpected error: cancel its call, reset it."""
        stream = self._streams.get(sid)
        if stream is None:
            return
        if stream.call is not None:
            stream.call.cancel()
        stream.local_closed = stream.remote_closed = True
        try:
            self._conn.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        self._discard(stream)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self.gateway.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        for stream in list(self._streams.values()):
            if stream.call is not None:
                stream.call.cancel()
        self._streams.clear()
        self._engaged = 0  # the connection is going: its table entry goes with it
        self._waiters.clear()

    # -- IPushProducer: the transport's own write buffer ------------------

    def pauseProducing(self) -> None:
        # The client is not reading what we send.  Replies wait (``paused``),
        # and so does reading its requests: each may make us write (an
        # error's trailers, a PING's answer), and nothing else would bound
        # what piles up in the transport meanwhile.
        self.paused = True
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self.paused = False
        self.transport.resumeProducing()  # type: ignore[union-attr]
        for stream in list(self._streams.values()):
            if stream.call is not None:
                stream.call.writable()

    def stopProducing(self) -> None:
        self.paused = True

    # -- Connection (for the gateway) -------------------------------------

    def active_calls(self) -> int:
        return len(self._streams)

    def shutdown(self) -> None:
        """Send GOAWAY: no new streams; close once the running ones end.

        h2's own ``close_connection`` would also stop replies on the running
        streams, so the GOAWAY frame is written beside h2, after everything
        h2 has queued.
        """
        if self._closing or self._lost:
            return
        self._closing = True
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = self._last_accepted = self._conn.highest_inbound_stream_id
        goaway.error_code = 0
        self._flush()
        self.transport.write(goaway.serialize())  # type: ignore[union-attr]
        if not self._streams:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def make_room(self) -> None:
        """Close for the connection limit, which found no call in progress here.

        Streams still waiting for their request message are refused
        (``REFUSED_STREAM``: not processed, so gRPC clients retry them on a
        new connection by themselves) rather than left to start a call on
        a connection that is going; then GOAWAY.
        """
        for stream in [stream for stream in self._streams.values() if not stream.engaged]:
            stream.local_closed = stream.remote_closed = True
            if stream.call is not None:
                stream.call.cancel()
            try:
                self._conn.reset_stream(stream.id, h2.errors.ErrorCodes.REFUSED_STREAM)
            except h2.exceptions.ProtocolError:
                pass
            self._discard(stream)
        self.shutdown()

    def abort(self) -> None:
        if not self._lost:
            self.transport.abortConnection()  # type: ignore[union-attr]

    # -- idle connections -------------------------------------------------

    def _check_idle(self) -> None:
        """Close the connection once it has had no stream for ``idle_timeout``.

        As in grpc-go (``MaxConnectionIdle``), the one timer is not moved as
        streams come and go: a stream closing that leaves none open only
        notes the time, and the timer, when it fires, looks at how long the
        connection has been idle and sleeps again for the rest.  So calls
        cost no timer work; PINGs and SETTINGS are not use.  An idle
        connection gets GOAWAY (NO_ERROR: gRPC clients reconnect on their
        next call) and is closed; one that still has not gone an idle period
        later (a client that does not read) is aborted.
        """
        self._idle_timer = None
        if self._lost:
            return
        loop = self.gateway.loop
        delay = self._idle_timeout
        if not self._streams:
            left = self._idle_since + delay - loop.time()
            if left > 0:
                delay = left
            elif self._closing:
                self.abort()
                return
            else:
                _log.debug("closing idle HTTP/2 connection from {peer}", peer=self._peer)
                self.shutdown()
                self._idle_since = loop.time()
        self._idle_timer = loop.call_later(delay, self._check_idle)

    def _note_idle(self) -> None:
        """Called when the last open stream is gone: the idle period starts."""
        self._idle_since = self.gateway.loop.time()

    def _engage(self, stream: _Stream) -> None:
        """A call is in progress on ``stream``: closing the connection now would cut it short.

        That is from the moment the client has sent a whole request
        message, or ended its side, or we began the reply -- not from its
        HEADERS: a client that opens streams and sends nothing on them
        must not make its connection look busy to the connection limit
        (:mod:`snet_daemon.frontend.admission`).  Such streams on a
        connection closed to make room are refused (:meth:`make_room`).
        """
        stream.engaged = True
        self._engaged += 1
        if self._engaged == 1 and self.on_busy is not None:
            self.on_busy(True)

    def _disengage(self, stream: _Stream) -> None:
        """``stream`` is gone: the last call ended if it was the last engaged one."""
        if stream.engaged:
            stream.engaged = False
            self._engaged -= 1
            if not self._engaged and self.on_busy is not None:
                self.on_busy(False)

    # -- events -----------------------------------------------------------

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        raw = event.headers
        assert raw is not None
        headers = [(k.decode("ascii"), v.decode("latin-1")) for k, v in raw]
        pseudo = {k: v for k, v in headers if k[0] == ":"}
        method = pseudo.get(":method", "")
        path = pseudo.get(":path", "")
        content_type = ""
        for name, value in headers:
            if name == "content-type":
                content_type = value
                break
        ended = event.stream_ended is not None
        if method == "POST" and is_grpc_content_type(content_type):
            self._open_call(sid, _GRPC, path, headers, content_type, ended)
            return
        if method == "POST" and grpcweb.parse_content_type(content_type) is not None:
            self._open_call(sid, _WEB, path, headers, content_type, ended)
            return
        stream = _Stream(sid, _PLAIN, self)
        self._streams[sid] = stream
        stream.remote_closed = ended
        self._serve_plain(stream, method, path, headers, content_type)

    def _open_call(
        self,
        sid: int,
        kind: int,
        path: str,
        headers: list[tuple[str, str]],
        content_type: str,
        ended: bool,
    ) -> None:
        stream = _Stream(sid, kind, self)
        stream.remote_closed = ended
        self._streams[sid] = stream
        if kind == _WEB:
            parsed = grpcweb.parse_content_type(content_type)
            assert parsed is not None
            stream.text, stream.web_content_type = parsed
            if stream.text:
                stream.text_decoder = grpcweb.TextDecoder()
            stream.origin = _header(headers, "origin")
            if not self.gateway.cors.allows(stream.origin):
                self._respond_plain(stream, HttpResponse(403, b"origin not allowed\n"))
                return
        loop = self.gateway.loop
        call = ServerCall(path, (), stream, loop, peer=self._peer, web=kind == _WEB)
        stream.call = call
        try:
            encoding = call.accept_headers(headers, self.gateway.limits.default_timeout)
        except GrpcError as error:
            call.fail_input(error)
            return
        stream.decoder = MessageDecoder(self._max_message, encoding)
        if self._closing and sid > self._last_accepted:
            # Opened after a GOAWAY (ours, or the client's): refused
            # streams are safe for the client to retry on another connection.
            self._streams.pop(sid, None)
            self._conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self._starting.append(stream)

    def _start_calls(self) -> None:
        gateway = self.gateway
        for stream in self._starting:
            call = stream.call
            if call is not None and not call.finished:
                gateway.start(call)
        self._starting.clear()

    def _on_data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id
        size = event.flow_controlled_length or 0
        if not size and event.stream_ended is None:
            # An empty DATA frame changes nothing, yet costs as much to
            # handle as a full one (CVE-2019-9518).
            self._spend_control(1)
            if self._given_up:
                return
        stream = self._streams.get(sid)
        if stream is None or stream.call is None or stream.decoder is None or stream.call.finished:
            # Body of a plain request, or of a call that is already over.
            if size:
                self._conn.acknowledge_received_data(size, sid)
            return
        data = event.data or b""
        if stream.text_decoder is not None:
            try:
                data = stream.text_decoder.feed(data)
            except GrpcError as error:
                self._conn.acknowledge_received_data(size, sid)
                stream.call.fail_input(error)
                return
        decoder = stream.decoder
        try:
            messages = decoder.feed(data)
        except GrpcError as error:
            self._conn.acknowledge_received_data(size, sid)
            stream.call.fail_input(error)
            return
        call = stream.call
        partial = decoder.pending
        if partial != stream.partial:
            self._unfinished += partial - stream.partial
            stream.partial = partial
            if self._unfinished > self._max_unfinished:
                # This stream's bytes took the connection over its budget.
                self._conn.acknowledge_received_data(size, sid)
                self._drop_unfinished(stream)
                call.fail_input(
                    GrpcError(
                        Status.RESOURCE_EXHAUSTED,
                        f"too many bytes of unfinished request messages on this connection "
                        f"(limit {self._max_unfinished})",
                    )
                )
                return
        if not messages:
            # Part of a message: acknowledge at once (see module docstring).
            if size:
                self._conn.acknowledge_received_data(size, sid)
            return
        # Bytes of complete messages are acknowledged as the handler takes
        # them (ServerCall.read -> _Stream.consumed); the remainder now.
        held = sum(len(m) + 5 for m in messages)
        if stream.text_decoder is not None:
            # The messages came as base64: about 4/3 of their decoded size
            # on the wire (see _Stream.consumed).
            stream.decoded_unread += held
            held = (held * 4 + 2) // 3 + 4
        held = min(held, size)
        if size - held:
            self._conn.acknowledge_received_data(size - held, sid)
        stream.unacked += held
        if not stream.engaged:
            self._engage(stream)
        for message in messages:
            call.deliver(message)

    def _on_end(self, sid: int) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return
        stream.remote_closed = True
        if not stream.engaged:
            self._engage(stream)
        call = stream.call
        if call is not None:
            if stream.text_decoder is not None:
                try:
                    stream.text_decoder.finish()
                except GrpcError as error:
                    call.fail_input(error)
            if stream.decoder is not None and not stream.decoder.at_boundary():
                call.fail_input(GrpcError(Status.INTERNAL, "request ended in the middle of a message"))
            call.end_input()
        self._maybe_close(stream)

    def _on_reset(self, sid: int) -> None:
        stream = self._streams.pop(sid, None)
        if stream is not None:
            self._disengage(stream)
            if not self._streams:
                self._note_idle()
            self._waiters.discard(sid)
            self._release_window(stream)
            if stream.call is not None:
                stream.call.cancel()
            self._close_if_done()
        # Rapid-reset defence (CVE-2023-44487): a client that opens and
        # cancels streams faster than the budget refills is dropped.
        if not self._resets.spend(self.gateway.loop.time()):
            self._calm_down("too many stream resets")

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        """A SETTINGS frame: send what waited, if it grew every stream's window.

        One that lets nothing be sent is a useless control frame; if it made
        us look at many waiting streams in vain, it costs one more per 100.
        """
        cost = 1
        if self._waiters and initial_window_grew(event):
            conn = self._conn
            before = conn.outbound_flow_control_window
            woken = self._waiters.wake(self._drain, everyone=True)
            if conn.outbound_flow_control_window < before:
                return
            cost += woken // 100
        self._spend_control(cost)

    def _spend_control(self, cost: int) -> None:
        """Count control frames that changed nothing; too many close the connection.

        A client may send a few (its SETTINGS, a PRIORITY now and then), but
        each costs us the parsing, and they have no flow control: a client
        flooding them is told to calm down, as one resetting streams too
        fast is.  PINGs are not counted (gRPC clients use them to measure
        the connection while data flows, and each gets an answer, so a
        client that does not read its answers is stopped by the transport),
        nor WINDOW_UPDATEs (a client sends one per few DATA frames it reads;
        each wakes only the streams it lets send).
        """
        if not self._control_frames.spend(self.gateway.loop.time(), cost):
            self._calm_down("too many control frames that change nothing")

    def _calm_down(self, why: str) -> None:
        """Give up a connection whose client floods us: GOAWAY(ENHANCE_YOUR_CALM)."""
        _log.warn("closing connection from {peer}: {why}", peer=self._peer, why=why)
        self._give_up(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    def _on_goaway(self, error_code: int | None) -> None:
        """The client's GOAWAY.

        With an error code the client is done with the connection: it is
        given up.  A graceful one (NO_ERROR: grpc-java or Netty shutting a
        channel down while its calls run) means no new streams, and the
        running calls are still wanted: they finish, and the connection
        closes after them, as after our own GOAWAY.  (Before, every call was
        cancelled: h2 could send nothing after the client's GOAWAY.)
        """
        if error_code:
            self._give_up(None)
        elif self._closing:
            self._spend_control(1)  # a GOAWAY more changes nothing
        else:
            self._closing = True
            self._last_accepted = self._conn.highest_inbound_stream_id
            self._close_if_done()

    def _give_up(self, error_code: int | None) -> None:
        """Stop serving the connection: its calls are cancelled, and it is closed.

        For a protocol error or a flood (GOAWAY with ``error_code``), or the
        client's GOAWAY with an error (``None``).  No reply is wanted or can
        follow, so every call is cancelled now, which also cancels its upstream call.  Our
        side of the connection is closed once the GOAWAY is out, and what the
        client still sends is dropped unread, so that it sees the GOAWAY
        rather than a reset; a client that does not let the connection close
        (it stops reading, or keeps sending) is cut off ``abort_grace``
        seconds later.  Before, ``loseConnection`` alone waited for the
        client to read, which kept the connection and its calls (up to the
        deadline the client chose) for as long as it liked.
        """
        if self._given_up or self._lost:
            return
        self._given_up = self._closing = True
        if error_code is not None:
            try:
                self._conn.close_connection(error_code=error_code)
            except h2.exceptions.ProtocolError:
                pass
        streams = list(self._streams.values())
        self._streams.clear()
        if self._engaged:
            # No call is left: the connection may make room before it is gone.
            self._engaged = 0
            if self.on_busy is not None:
                self.on_busy(False)
        self._waiters.clear()
        self._starting.clear()
        for stream in streams:
            stream.local_closed = stream.remote_closed = True
            stream.pending.clear()
            if stream.call is not None:
                stream.call.cancel()
        # The GOAWAY, and the last frames before it; nothing is sent after.
        data = self._conn.data_to_send()
        if data:
            self.transport.write(data)  # type: ignore[union-attr]
        transport = self.transport
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        else:
            transport.loseConnection()  # type: ignore[union-attr]
        self._abort_timer = self.gateway.loop.call_later(self.gateway.limits.abort_grace, self.abort)

    def _protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        _log.info("HTTP/2 protocol error from {peer}: {error}", peer=self._peer, error=exc)
        code = getattr(exc, "error_code", None) or h2.errors.ErrorCodes.PROTOCOL_ERROR
        if isinstance(exc.__cause__, HPACKError) and not isinstance(exc, h2.exceptions.DenialOfServiceError):
            # h2 reports an undecodable header block as a protocol error;
            # RFC 9113 section 4.3 names it a COMPRESSION_ERROR.
            code = h2.errors.ErrorCodes.COMPRESSION_ERROR
        self._give_up(code)

    # -- plain HTTP -------------------------------------------------------

    def _serve_plain(
        self, stream: _Stream, method: str, path: str, headers: list[tuple[str, str]], content_type: str
    ) -> None:
        origin = _header(headers, "origin")
        if method == "OPTIONS":
            status, cors_headers = self.gateway.cors.preflight(
                origin,
                _header(headers, "access-control-request-headers"),
                _header(headers, "access-control-request-private-network") == "true",
            )
            self._respond_plain(stream, HttpResponse(status, headers=tuple(cors_headers)))
            return
        if method == "POST":
            # With CORS, or a page sees only an opaque network error.
            self._respond_plain(
                stream,
                HttpResponse(415, _unsupported(content_type)),
                extra=self.gateway.cors.response_headers(origin),
            )
            return
        loop = self.gateway.loop
        task = loop.create_task(self.gateway.routes.respond(method, path))

        def done(task: asyncio.Task[HttpResponse]) -> None:
            if stream.id not in self._streams or self._lost:
                return
            try:
                response = task.result()
            except Exception:
                _log.failure("error answering {method} {path}", method=method, path=path)
                response = HttpResponse(500, b"internal error\n")
            if method == "HEAD":
                response = HttpResponse(response.status, b"", response.content_type, response.headers)
            self._respond_plain(stream, response, extra=self.gateway.cors.response_headers(origin))
            self._schedule_flush()

        task.add_done_callback(done)

    def _respond_plain(
        self, stream: _Stream, response: HttpResponse, extra: list[tuple[str, str]] | None = None
    ) -> None:
        headers = [(":status", str(response.status))]
        if response.body or response.status not in (204, 304):
            headers.append(("content-type", response.content_type))
            headers.append(("content-length", str(len(response.body))))
        headers.extend(response.headers)
        headers.extend(extra or ())
        if stream.call is not None:
            stream.call.finished = True
        if not response.body:
            self.send_headers(stream, headers, end_stream=True)
            return
        self.send_headers(stream, headers, end_stream=False)
        self.send_data(stream, response.body)
        self.finish_stream(stream, [])

    # -- sending ----------------------------------------------------------

    def send_headers(self, stream: _Stream, headers: list[tuple[str, str]], end_stream: bool) -> None:
        if stream.local_closed or self._lost:
            return
        if not stream.engaged:
            self._engage(stream)
        try:
            self._conn.send_headers(stream.id, headers, end_stream=end_stream)
        except h2.exceptions.StreamClosedError:
            stream.local_closed = True
            self._discard(stream)
            return
        if end_stream:
            stream.local_closed = True
            self._maybe_close(stream)
        self._schedule_flush()

    def send_data(self, stream: _Stream, data: bytes) -> None:
        if stream.local_closed or self._lost:
            return
        if stream.pending:
            stream.pending.append(data)
            stream.pending_bytes += len(data)
        else:
            sent = send_within_window(self._conn, stream.id, data)
            if sent < len(data):
                stream.pending.append(data[sent:])
                stream.pending_bytes += len(data) - sent
                self._waiters.wait(stream.id, stream)
        self._schedule_flush()

    def finish_stream(self, stream: _Stream, trailers: list[tuple[str, str]]) -> None:
        """End the stream after its queued data: with trailers, or empty DATA."""
        stream.final = trailers
        if not stream.pending:
            self._send_final(stream)
        self._schedule_flush()

    def acknowledge(self, stream: _Stream, amount: int) -> None:
        if self._lost or stream.id not in self._streams:
            return
        self._conn.acknowledge_received_data(amount, stream.id)
        self._schedule_flush()

    def _drain(self, stream: _Stream) -> None:
        """Send what a window update now allows; end the stream if all sent."""
        sent, done = send_queued(self._conn, stream.id, stream.pending)
        stream.pending_bytes -= sent
        if not done:
            self._waiters.wait(stream.id, stream)
        elif stream.final is not None:
            self._send_final(stream)
        if stream.call is not None and stream.can_write():
            stream.call.writable()
        self._schedule_flush()

    def _send_final(self, stream: _Stream) -> None:
        trailers = stream.final
        stream.final = None
        if stream.local_closed:
            return
        try:
            if trailers:
                self._conn.send_headers(stream.id, trailers, end_stream=True)
            else:
                self._conn.end_stream(stream.id)
        except h2.exceptions.StreamClosedError:
            pass
        stream.local_closed = True
        self._maybe_close(stream)

    def _maybe_close(self, stream: _Stream) -> None:
        """Forget a stream once both sides are done with it."""
        if not stream.local_closed:
            return
        if not stream.remote_closed:
            # We answered before the client finished sending (an error, or
            # a handler that does not read): tell it to stop (RFC 9113 §8.1).
            try:
                self._conn.reset_stream(stream.id, h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass
        self._discard(stream)

    def _discard(self, stream: _Stream) -> None:
        streams = self._streams
        if streams.pop(stream.id, None) is not None:
            self._disengage(stream)
            if not streams:
                self._note_idle()
        self._waiters.discard(stream.id)
        self._release_window(stream)
        self._close_if_done()

    def _close_if_done(self) -> None:
        """After a GOAWAY (ours, or the client's graceful one), close once no call is left."""
        if self._closing and not self._streams and not self._lost:
            self._flush()
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _release_window(self, stream: _Stream) -> None:
        """Give back the window of request bytes no handler will read now."""
        if stream.unacked and not self._lost:
            self._conn.acknowledge_received_data(stream.unacked, stream.id)
            stream.unacked = 0
        if stream.partial:
            self._drop_unfinished(stream)

    def _drop_unfinished(self, stream: _Stream) -> None:
        """Free the message a stream was assembling, and its share of the budget."""
        self._unfinished -= stream.partial
        stream.partial = 0
        stream.decoder = None

    def _schedule_flush(self) -> None:
        if self._receiving:
            return  # dataReceived flushes when it is done
        if not self._flush_scheduled and not self._lost:
            self._flush_scheduled = True
            self.gateway.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._conn.data_to_send()
        if data and not self._lost and not self._given_up:
            send_now(self.transport, data)  # type: ignore[arg-type]


def _unsupported(content_type: str) -> bytes:
    """The body of a 415 answer."""
    return (f"unsupported content-type {content_type!r}: expected application/grpc or application/grpc-web\n").encode()


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    """The first value of header ``name`` (lower-case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None
