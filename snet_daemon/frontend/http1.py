"""The HTTP/1.1 side of the daemon port: gRPC-Web, CORS and plain HTTP.

Browsers reach the daemon over HTTP/1.1 with gRPC-Web; the heartbeat and
encoding endpoints are plain GETs.  twisted.web parses HTTP/1.1 well
(keep-alive, pipelining, header limits, malformed requests), so this module
is a single leaf resource on a twisted.web ``Site``.  A request body over
HTTP/1.1 arrives whole (browsers cannot stream one), so it is buffered,
bounded by the message size limit, and split into at most
:data:`MAX_WEB_MESSAGES` messages (a browser sends one).  Replies stream with
chunked encoding.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

from snet_daemon.frontend import grpcweb
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.cors import CorsPolicy
from snet_daemon.frontend.gateway import Gateway, HttpResponse
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

_log = Logger(namespace="snetd.frontend.http1")

#: Seconds a client has, from the first byte of a request, to send the whole
#: request head.  twisted.web's idle timeout restarts on every byte, so a
#: client sending a byte every few seconds held its connection for ever; a
#: browser writes a head at once, and the sniffing timeout gives a new
#: connection as long to show its protocol.
HEAD_DEADLINE = 30.0
#: Seconds any request body may take to arrive ...
BODY_DEADLINE = 30.0
#: ... and, for a longer one, the slowest average rate it may arrive at
#: (bytes per second, about a 0.5 Mbit/s uplink): a body of the largest
#: size a message may have (4 MiB by default) gets over a minute, and no
#: client holds a connection longer than its body justifies.
BODY_MIN_RATE = 64 * 1024
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
#: Seconds a refused request's connection stays open, half-closed, reading
#: and dropping what the client still sends, before it is closed: closing
#: with unread bytes makes the kernel reset the connection, and the client
#: could lose the answer (Go's net/http waits 500 ms the same way).
_LINGER = 0.5
#: Most request messages one gRPC-Web body may hold.  Unary and
#: server-streaming calls take one; the limit only stops absurd bodies: a
#: body of the largest size holds a million empty messages, which took
#: seconds of the only event loop to split, and more to forward.
MAX_WEB_MESSAGES = 1000


class _BoundedRequest(server.Request):
    """A request whose body is kept in memory, up to a size limit.

    twisted.web would spool any body to a temporary file; a gRPC-Web body
    holds one message.  A body announced (``Content-Length``) or found
    (chunked) to be larger than the limit is refused at once by the channel,
    without reading the rest.
    """

    body_limit = 1 << 20
    too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()
        if length is not None and length > self.body_limit:
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.body_limit:
            self._refuse()
        elif self.content is not None:
            self.content.write(data)

    def _refuse(self) -> None:
        self.too_large = True
        channel = self.channel
        if isinstance(channel, Channel):
            channel.refuse_oversized(self)


class Channel(http.HTTPChannel):
    """An ``HTTPChannel`` that gives every request a deadline to arrive in.

    The head must be complete :data:`HEAD_DEADLINE` seconds after its first
    byte, and the body by a deadline set by its length (at least
    :data:`BODY_DEADLINE`, at :data:`BODY_MIN_RATE`; a chunked body is given
    what the largest body would get).  A request that misses it is answered
    ``408`` and its connection closed.  One timer per request, moved from
    head to body; none while a request is served or the connection waits
    for the next one (twisted.web's idle timeout covers that).
    """

    _deadline: IDelayedCall | None = None
    #: True once a request was refused before its body: nothing more is read.
    _refused = False
    #: Told when a request has arrived whole (True) and when its response
    #: is finished with no other request being served (False): the
    #: connection table's view (:mod:`snet_daemon.frontend.admission`).  A
    #: request still arriving does not count, as on HTTP/2: one byte would
    #: otherwise hold a place for the head deadline, and a slow body for
    #: minutes.
    on_busy: Callable[[bool], None] | None = None
    _busy = False

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None and not self._handlingRequest:
            self._deadline = self.callLater(HEAD_DEADLINE, self._expired)  # type: ignore[no-untyped-call]
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def requestDone(self, request: http.Request) -> None:
        # Persistent: what the client sent meanwhile is read in here, which
        # may be the whole next request (allContentReceived, below).
        super().requestDone(request)  # type: ignore[no-untyped-call]
        if not self._handlingRequest:
            self._report(False)

    def _report(self, busy: bool) -> None:
        if busy != self._busy:
            self._busy = busy
            if self.on_busy is not None:
                self.on_busy(busy)

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()  # type: ignore[no-untyped-call]
        deadline = self._deadline
        if deadline is not None and self.length != 0 and deadline.active():
            length = self.length if self.length is not None else self.requests[-1].body_limit
            deadline.reset(max(BODY_DEADLINE, length / BODY_MIN_RATE))

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        if not self._refused:
            self._report(True)
            super().allContentReceived()  # type: ignore[no-untyped-call]

    def _send100Continue(self) -> None:
        # No invitation to upload a body that is refused already.
        if not self._refused:
            super()._send100Continue()  # type: ignore[no-untyped-call]

    def _respondToBadRequestAndDisconnect(self) -> None:
        # A chunked body refused in the middle of a read: the chunk parser
        # goes on through the rest of that read, and must not answer twice.
        if not self._refused:
            super()._respondToBadRequestAndDisconnect()  # type: ignore[no-untyped-call]

    def refuse_oversized(self, request: _BoundedRequest) -> None:
        """Answer a request whose body is over the limit, and close.

        gRPC-Web calls get a trailers-only ``RESOURCE_EXHAUSTED`` (with CORS,
        so a page can read it), anything else ``413``; the rest of the body
        is not read.
        """
        transport = self.transport
        if self._refused or transport is None:
            return
        self._refused = True
        self._cancel_deadline()
        site: _Site = self.site  # type: ignore[attr-defined]  # set by Site.buildProtocol
        content_type = _header(request, b"content-type") or ""
        parsed = grpcweb.parse_content_type(content_type)
        body = b""
        if parsed is not None:
            status = "200 OK"
            message = f"request body larger than the limit ({site.max_message_size} bytes per message)"
            fields = status_headers(Status.RESOURCE_EXHAUSTED, message)
            head = [("content-type", parsed[1]), *fields]
        else:
            status = "413 Content Too Large"
            body = f"request body larger than the limit ({request.body_limit} bytes)\n".encode()
            fields = []
            head = [("content-type", "text/plain; charset=utf-8")]
        head.extend(site.cors.response_headers(_header(request, b"origin"), [name for name, _ in fields]))
        head.append(("content-length", str(len(body))))
        head.append(("connection", "close"))
        lines = "".join(f"{name}: {value}\r\n" for name, value in head)
        transport.write(f"HTTP/1.1 {status}\r\n{lines}\r\n".encode("latin-1") + body)
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            self.loseConnection()  # type: ignore[no-untyped-call]
            return
        half_close()
        self._deadline = self.callLater(_LINGER, self.loseConnection)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _cancel_deadline(self) -> None:
        deadline = self._deadline
        if deadline is not None:
            self._deadline = None
            if deadline.active():
                deadline.cancel()

    def _expired(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None or getattr(transport, "disconnecting", False):
            return
        transport.write(_TIMED_OUT)
        self.timeoutConnection()  # type: ignore[no-untyped-call]


class _Site(server.Site):
    """A ``Site`` that builds bounded requests and logs no access lines.

    Per-request access lines would repeat what the call log says, at a cost
    on every call.
    """

    noisy = False
    #: Not twisted.web's ALPN wrapper: the listener has chosen HTTP/1.1.
    protocol = Channel  # type: ignore[assignment]

    def __init__(self, resource: Resource, gateway: Gateway) -> None:
        super().__init__(resource, requestFactory=self._make_request)  # type: ignore[no-untyped-call]
        limit = gateway.limits.max_message_size
        self.max_message_size = limit
        # One message, its 5-byte prefix, base64 growth for -text, some slack.
        self._body_limit = (limit + 5) * 4 // 3 + 64
        self.cors = gateway.cors
        self.displayTracebacks = False

    def _make_request(self, *args: Any, **kwargs: Any) -> _BoundedRequest:
        request = _BoundedRequest(*args, **kwargs)  # type: ignore[no-untyped-call]
        request.body_limit = self._body_limit
        # twisted.web would parse form bodies (urlencoded, multipart) of any
        # POST before the resource sees it: seconds of the only event loop
        # for a few megabytes of tiny fields.  Nothing here reads forms.
        request._parsePOSTFormSubmission = False
        return request

    def log(self, request: http.Request) -> None:
        pass


@implementer(IPushProducer)
class _WebSink:
    """The :class:`CallSink` of a gRPC-Web call carried by HTTP/1.1.

    It is also registered as the request's push producer, so a browser that
    reads slowly pauses the handler (through ``can_write``).
    """

    def __init__(
        self, request: server.Request, text: bool, content_type: str, cors: CorsPolicy, origin: str | None
    ) -> None:
        self._request = request
        self._text = text
        self._content_type = content_type
        self._cors = cors
        self._origin = origin
        self._paused = False
        self._done = False
        self.call: ServerCall | None = None
        request.registerProducer(self, True)

    def _set_headers(self, pairs: list[tuple[str, str]]) -> None:
        request = self._request
        request.setResponseCode(200)
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [self._content_type.encode()])
        for name, value in self._cors.response_headers(self._origin, [name for name, _ in pairs]):
            headers.addRawHeader(name.encode(), value.encode())
        for name, value in pairs:
            headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))

    def send_headers(self, metadata: Metadata) -> None:
        if self._done:
            return
        self._set_headers([("grpc-accept-encoding", ACCEPT_ENCODING), *metadata_to_headers(metadata)])
        self._request.write(b"")

    def send_message(self, message: bytes) -> None:
        if self._done:
            return
        data = frame(message)
        self._request.write(grpcweb.encode_text(data) if self._text else data)

    def send_trailers(self, status: int, message: str, metadata: Metadata, trailers_only: bool) -> None:
        if self._done:
            return
        fields = status_headers(status, message)
        fields.extend(metadata_to_headers(metadata))
        if trailers_only:
            self._set_headers(fields)
            self._request.setHeader(b"content-length", b"0")
        else:
            block = grpcweb.trailer_frame(fields)
            self._request.write(grpcweb.encode_text(block) if self._text else block)
        self._close()

    def can_write(self) -> bool:
        return not self._paused

    def consumed(self, size: int) -> None:
        pass

    def _close(self) -> None:
        self._done = True
        request = self._request
        request.unregisterProducer()
        if not request.finished and not getattr(request, "_disconnected", False):
            request.finish()

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self.call is not None:
            self.call.writable()

    def stopProducing(self) -> None:
        self._paused = True


class FrontResource(Resource):
    """The one resource behind HTTP/1.1 on the daemon port.

    Args:
        gateway: routing, CORS and limits shared with the HTTP/2 side.
    """

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._gateway = gateway

    def render(self, request: server.Request) -> bytes | int:
        method = (request.method or b"GET").decode("latin-1")
        path = (request.path or b"/").decode("latin-1")
        origin = _header(request, b"origin")
        cors = self._gateway.cors
        if method == "OPTIONS":
            status, headers = cors.preflight(
                origin,
                _header(request, b"access-control-request-headers"),
                _header(request, b"access-control-request-private-network") == "true",
            )
            return _plain(request, HttpResponse(status, headers=tuple(headers)))
        content_type = _header(request, b"content-type") or ""
        if method == "POST":
            parsed = grpcweb.parse_content_type(content_type)
            if parsed is not None:
                if not cors.allows(origin):
                    return _plain(request, HttpResponse(403, b"origin not allowed\n"))
                self._grpc_web(request, path, parsed, origin)
                return server.NOT_DONE_YET
            # The daemon's own errors carry CORS too, or a page sees only
            # an opaque network error.
            if is_grpc_content_type(content_type):
                return _plain(
                    request,
                    HttpResponse(505, b"native gRPC needs HTTP/2; use gRPC-Web over HTTP/1.1\n"),
                    cors.response_headers(origin),
                )
            return _plain(
                request,
                HttpResponse(
                    415,
                    f"unsupported content-type {content_type!r}: expected application/grpc-web\n".encode(),
                ),
                cors.response_headers(origin),
            )
        self._plain_route(request, method, path, cors.response_headers(origin))
        return server.NOT_DONE_YET

    def _plain_route(self, request: server.Request, method: str, path: str, extra: list[tuple[str, str]]) -> None:
        task = self._gateway.loop.create_task(self._gateway.routes.respond(method, path))
        finished = Deferred.fromFuture(task)

        def answer(response: HttpResponse) -> None:
            if getattr(request, "_disconnected", False):
                return
            body = _plain(request, response, extra)
            request.setHeader(b"content-length", str(len(body)).encode())
            if method != "HEAD":
                request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            _log.failure("error answering {method} {path}", failure, method=method, path=path)
            if not getattr(request, "_disconnected", False):
                body = _plain(request, HttpResponse(500, b"internal error\n"), extra)
                request.setHeader(b"content-length", str(len(body)).encode())
                request.write(body)
                request.finish()

        finished.addCallbacks(answer, failed)

    def _grpc_web(
        self,
        request: server.Request,
        path: str,
        parsed: tuple[bool, str],
        origin: str | None,
    ) -> None:
        text, content_type = parsed
        gateway = self._gateway
        sink = _WebSink(request, text, content_type, gateway.cors, origin)
        peer = request.getClientAddress()
        call = ServerCall(
            path,
            (),
            sink,
            gateway.loop,
            peer=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
            web=True,
        )
        sink.call = call
        request.notifyFinish().addErrback(lambda _: call.cancel())
        try:
            headers = [
                (name.decode("latin-1").lower(), value.decode("latin-1"))
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ]
            encoding = call.accept_headers(headers, gateway.limits.default_timeout)
            body = _read_all(request.content)
            if text:
                decoder = grpcweb.TextDecoder()
                body = decoder.feed(body)
                decoder.finish()
            messages = MessageDecoder(gateway.limits.max_message_size, encoding, MAX_WEB_MESSAGES)
            for message in messages.feed(body):
                call.deliver(message)
            if not messages.at_boundary():
                raise GrpcError(Status.INTERNAL, "request ended in the middle of a message")
            call.end_input()
        except GrpcError as error:
            call.fail_input(error)
            return
        gateway.start(call)


def _read_all(content: IO[bytes] | None) -> bytes:
    if content is None:
        return b""
    content.seek(0)
    return content.read()


def _header(request: server.Request, name: bytes) -> str | None:
    value: bytes | None = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _plain(request: server.Request, response: HttpResponse, extra: list[tuple[str, str]] | None = None) -> bytes:
    """Set the status and headers of ``response`` on ``request``; return its body.

    The caller writes the body (or returns it from ``render``, which makes
    twisted.web add the content length).
    """
    request.setResponseCode(response.status)
    if response.body or response.status not in (204, 304):
        request.setHeader(b"content-type", response.content_type.encode())
    for name, value in (*response.headers, *(extra or ())):
        request.responseHeaders.addRawHeader(name.encode(), value.encode())
    return response.body


def build_site(gateway: Gateway) -> server.Site:
    """The twisted.web ``Site`` serving HTTP/1.1 connections of the port."""
    return _Site(FrontResource(gateway), gateway)
