"""``service_type: http``: each call becomes JSON POSTed to the service.

Compatible with the Go daemon: a call to ``/package.Service/Method`` is a
``POST`` to ``service_endpoint`` + ``/Method`` (a protobuf identifier,
checked when there are no protos) with the request as JSON (proto3 JSON
mapping, original proto field names) and ``content-type:
application/json``; ``service_credentials`` are added to the query string,
the headers or the JSON body; a non-2xx answer is ``UNAVAILABLE`` with the
HTTP status and a bounded excerpt of the body; a 2xx answer's JSON is the
reply message (unknown fields ignored).  An empty 2xx body is an empty
reply.

Beyond Go, which only ever reads the first request message:

* streaming methods (see :func:`~snet_daemon.upstream.protos.relay_json`):
  a bidirectional call POSTs once per request message, in order, and sends
  each answer as a reply; a client-streaming call POSTs all its request
  messages as one JSON array; a server-streaming call's answer may be a JSON
  array (one reply per element) or, with a JSON-lines content type
  (``application/x-ndjson``, ``application/jsonl``...), one reply per line,
  each sent to the client as soon as its line arrives;
* clients may send JSON messages (``encoding: json`` services, or
  ``+json`` content types): they are posted as they are, and the answers are
  returned as JSON text.

The request and answer sizes are bounded (see :class:`HttpClient`); the
call's deadline and cancellation abort the HTTP request.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Final
from urllib.parse import quote, urlencode, urlsplit

import treq.client
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from snet_daemon import jsontext
from snet_daemon.config.sections import ServiceCredential
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.frontend.wire import Metadata
from snet_daemon.upstream.protos import JsonMessages, ServiceProtos, relay_json, request_text, short_name

__all__ = [
    "JSON_LINES_TYPES",
    "HttpClient",
    "HttpUpstream",
    "base_url",
    "excerpt",
]

_log = Logger(namespace="snetd.upstream.http")

#: Longest piece of a failed answer quoted to the client.
EXCERPT_SIZE: Final = 512
#: Content types of answers that carry one JSON value per line.
JSON_LINES_TYPES: Final = frozenset(
    {
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/x-jsonlines",
        "application/jsonlines",
    }
)
#: Unread answer bytes after which a streamed answer stops being read.
_STREAM_HIGH_WATER: Final = 1024 * 1024


def excerpt(body: bytes, limit: int = EXCERPT_SIZE) -> str:
    """The start of ``body`` as one line of text, for an error message."""
    text = body[:limit].decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return text + ("..." if len(body) > limit else "")


def base_url(endpoint: str) -> str:
    """``service_endpoint`` as an HTTP URL (``host:port`` and ``grpc://`` mean ``http://``)."""
    endpoint = endpoint.strip()
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return f"http://{endpoint}"
    if scheme.lower() == "grpc":
        return f"http://{rest}"
    return endpoint


@implementer(IBodyProducer)
class _BytesBody:
    """A request body already in memory, handed to the transport in one write."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class AnswerReader(Protocol):
    """Reads an HTTP answer body, whole or line by line, within a size bound.

    Whole (:meth:`read_all`): the body up to ``limit`` bytes.  Lines
    (:meth:`next_line`): each line up to ``limit`` bytes, handed out as it
    completes; reading from the network pauses while more than
    :data:`_STREAM_HIGH_WATER` bytes wait for the consumer, so a slow client
    slows the service down instead of filling memory.

    Args:
        limit: most bytes of the body (whole) or of one line (lines).
        loop: the asyncio loop the consumer runs on.
        truncate: past ``limit``, keep the first ``limit`` bytes and stop
            reading instead of failing (for error excerpts).
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop, *, truncate: bool = False) -> None:
        self._limit = limit
        self._loop = loop
        self._truncate = truncate
        self._chunks: list[bytes] = []
        self._size = 0
        self._lines: list[bytes] = []
        self._queued = 0
        self._line_mode = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: GrpcError | None = None

    # -- Protocol -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._line_mode and b"\n" in data:
            self._split_lines()
        if self._size > self._limit and self._truncate:
            self._chunks = [b"".join(self._chunks)[: self._limit]]
            self._done = True
            self._producer().stopProducing()
            self._wake()
            return
        if self._size > self._limit:
            what = "a line of the service answer" if self._line_mode else "the service answer"
            self._fail(GrpcError(Status.RESOURCE_EXHAUSTED, f"{what} is larger than {self._limit} bytes"))
            self._producer().stopProducing()
            return
        if self._line_mode and self._queued > _STREAM_HIGH_WATER and not self._paused:
            self._paused = True
            self._producer().pauseProducing()
        self._wake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done:
            return
        if not reason.check(ResponseDone, PotentialDataLoss):
            self._fail(
                GrpcError(
                    Status.UNAVAILABLE, f"connection to the service lost while reading its answer: {reason.value}"
                )
            )
            return
        if self._line_mode and self._chunks:
            rest = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            self._push_line(rest)
        self._done = True
        self._wake()

    # -- consumer side ------------------------------------------------------

    async def read_all(self) -> bytes:
        """The whole body.

        Raises:
            GrpcError: ``RESOURCE_EXHAUSTED`` over the limit,
                ``UNAVAILABLE`` when the connection broke.
        """
        try:
            while not self._done:
                await self._wait()
        finally:
            self.abort_if_unfinished()
        if self._error is not None:
            raise self._error
        return b"".join(self._chunks)

    async def next_line(self) -> bytes | None:
        """The next non-blank line (without its end), or None at the end of the body.

        Raises:
            GrpcError: as :meth:`read_all`.
        """
        self._line_mode = True
        self._split_lines()
        try:
            while True:
                if self._lines:
                    line = self._lines.pop(0)
                    self._queued -= len(line)
                    if self._paused and self._queued <= _STREAM_HIGH_WATER // 2:
                        self._paused = False
                        self._producer().resumeProducing()
                    return line
                if self._error is not None:
                    raise self._error
                if self._done:
                    return None
                await self._wait()
        except BaseException:
            self.abort_if_unfinished()
            raise

    def abort_if_unfinished(self) -> None:
        """Drop the connection unless the whole body has been read.

        For a call that ended (deadline, cancellation, an error) before the
        answer did: reading the rest would hold the connection, and unread
        lines in memory, for nothing; an unfinished answer also keeps the
        connection out of the pool for ever.  :meth:`read_all` and
        :meth:`next_line` do it when they fail; a consumer that can fail
        between two :meth:`next_line` calls must do it too.
        """
        if not self._done and self.transport is not None:
            self._done = True
            self._producer().stopProducing()

    # -- internals ------------------------------------------------------------

    def _producer(self) -> Any:
        """The body's transport (an ``IPushProducer`` in twisted.web's client)."""
        return self.transport

    def _split_lines(self) -> None:
        if not any(b"\n" in chunk for chunk in self._chunks):
            return
        data = b"".join(self._chunks)
        *lines, rest = data.split(b"\n")
        self._chunks = [rest] if rest else []
        self._size = len(rest)
        for line in lines:
            self._push_line(line)

    def _push_line(self, line: bytes) -> None:
        line = line.strip()
        if line:
            self._lines.append(line)
            self._queued += len(line)

    def _fail(self, error: GrpcError) -> None:
        self._error = error
        self._done = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


@implementer(IStreamClientEndpoint)
class _NoDelay:
    """An endpoint whose connections send small writes at once (``TCP_NODELAY``).

    twisted.web writes a request's headers and body separately; with Nagle's
    algorithm the body then waits for the service's delayed ACK (40 ms on
    Linux) on every call.
    """

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self._inner = inner

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        return self._inner.connect(protocolFactory).addCallback(self._no_delay)

    @staticmethod
    def _no_delay(protocol: Any) -> Any:
        transport = protocol.transport
        while transport is not None and not isinstance(getattr(transport, "socket", None), socket.socket):
            transport = getattr(transport, "transport", None)  # through TLS to TCP
        if transport is not None:
            try:
                transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return protocol


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """TCP for ``http://``, TLS (system trust roots) for ``https://``, without Nagle."""

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return _NoDelay(endpoint)


#: The pool's connection factory, without the "Starting factory" log line per connection.
_QUIET_FACTORY: Any = type("_QuietFactory", (HTTPConnectionPool._factory,), {"noisy": False})


class HttpClient:
    """One treq client and connection pool for all calls to the service.

    Cookies the service sets are never stored: one client's session must not
    leak into another client's calls.  Redirects are not followed (the Go
    daemon's client follows them, but a POST redirected to a GET would lose
    the request).

    Args:
        reactor: the reactor (TCP, TLS, time).
        max_per_host: persistent connections kept to the service.
        connect_timeout: seconds to establish a connection.
    """

    def __init__(self, reactor: Any, *, max_per_host: int = 32, connect_timeout: float = 10.0) -> None:
        self._reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool._factory = _QUIET_FACTORY
        self.pool.maxPersistentPerHost = max_per_host
        agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor, connect_timeout), pool=self.pool)
        no_cookies: Any = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self._treq = treq.client.HTTPClient(agent, cookiejar=no_cookies)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Any:
        """POST ``body`` to ``url``; the answer's headers are in, its body is not read yet.

        Returns:
            treq's response (``code``, ``headers``, ``deliverBody``).

        Raises:
            GrpcError: ``UNAVAILABLE`` when the service cannot be reached or
                the connection fails before the answer's headers.
        """
        deferred = self._treq.request(
            "POST",
            url,
            data=_BytesBody(body),
            headers={key: [value] for key, value in headers.items()},  # type: ignore[arg-type]
            allow_redirects=False,
            unbuffered=True,
        )
        try:
            return await deferred.asFuture(asyncio.get_running_loop())
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            raise GrpcError(Status.UNAVAILABLE, f"cannot reach the service: {reason}") from None

    @staticmethod
    def reader(response: Any, limit: int) -> AnswerReader:
        """Start reading ``response``'s body with an :class:`AnswerReader`."""
        reader = AnswerReader(limit, asyncio.get_running_loop())
        response.deliverBody(reader)
        return reader

    async def close(self) -> None:
        """Close the pooled connections."""
        await self.pool.closeCachedConnections().asFuture(asyncio.get_running_loop())


def _content_type(response: Any) -> str:
    values = response.headers.getRawHeaders(b"content-type") or [b""]
    return str(values[0].decode("latin-1").split(";", 1)[0].strip().lower())


async def read_error(response: Any) -> GrpcError:
    """The ``UNAVAILABLE`` error for a non-2xx answer, quoting its status and body start."""
    reader = AnswerReader(EXCERPT_SIZE + 1, asyncio.get_running_loop(), truncate=True)
    response.deliverBody(reader)
    try:
        body = await reader.read_all()
    except GrpcError:
        body = b""
    return GrpcError(Status.UNAVAILABLE, f"service answered HTTP {response.code}: {excerpt(body)}".rstrip(": "))


class HttpUpstream:
    """The handler for ``service_type: http``.

    Args:
        client: the shared HTTP client.
        endpoint: ``service_endpoint``.
        protos: the service's protos, or None when it has none (then only
            JSON clients can be served).
        encoding: the metadata's ``encoding`` (``proto`` or ``json``).
        credentials: ``service_credentials``.
        max_message_size: the largest message, in bytes; answers may be up
            to four times as large (JSON is bigger than protobuf).
    """

    def __init__(
        self,
        client: HttpClient,
        endpoint: str,
        *,
        protos: ServiceProtos | None,
        encoding: str,
        credentials: tuple[ServiceCredential, ...] = (),
        max_message_size: int = 4 * 1024 * 1024,
    ) -> None:
        self.client = client
        self._base = base_url(endpoint).rstrip("/")
        self.protos = protos
        self.encoding = encoding
        self._max_message = max_message_size
        self._max_answer = 4 * max_message_size + 1024 * 1024
        self._query = urlencode([(item.key, _text(item.value)) for item in credentials if item.location == "query"])
        self._headers = {item.key: _text(item.value) for item in credentials if item.location == "header"}
        self._body = {item.key: item.value for item in credentials if item.location == "body"}

    async def __call__(self, call: ServerCall) -> None:
        """Serve ``call`` (the client's metadata is not sent to HTTP services, as in Go)."""
        await self.forward(call, call.metadata)

    async def forward(self, call: ServerCall, metadata: Metadata) -> None:
        """Serve ``call``; ``metadata`` is not forwarded (HTTP services never got it in Go)."""
        messages = JsonMessages.for_call(call, self.protos, self.encoding)
        url = self._url(short_name(call.method))
        method = messages.method
        # A client-streaming exchange is the array of the call's messages.
        gathered = method is not None and method.client_streaming and not method.server_streaming

        async def exchange(value: Any, emit: Callable[[Any], Awaitable[None]], many: bool) -> None:
            await self._exchange(url, self._with_credentials(value, gathered), emit, many)

        await relay_json(call, messages, exchange, self._max_answer)

    def _url(self, name: str) -> str:
        # Quoted too, though a protobuf identifier needs no quoting: the
        # name must never be more than one path segment.
        url = f"{self._base}/{quote(name, safe='')}"
        if self._query:
            url += ("&" if urlsplit(url).query else "?") + self._query
        return url

    def _with_credentials(self, value: Any, gathered: bool) -> Any:
        """``value`` with the body credentials, which win over same-named fields sent by the client.

        They are set in a JSON object, and in each object of a client
        stream's array (``gathered``): each element is a request message,
        and the service reads them as it would the one of a unary call.
        Anything else (a JSON client's bare value) is sent as it is.
        """
        if not self._body:
            return value
        if isinstance(value, dict):
            return {**value, **self._body}
        if gathered and isinstance(value, list):
            return [self._with_credentials(item, False) for item in value]
        return value

    async def _exchange(self, url: str, value: Any, emit: Callable[[Any], Awaitable[None]], many: bool) -> None:
        body = request_text(value)
        headers = {
            "content-type": "application/json",
            "accept": "application/json, application/x-ndjson" if many else "application/json",
            **self._headers,
        }
        response = await self.client.post(url, body, headers)
        if not 200 <= response.code < 300:
            raise await read_error(response)
        if many and _content_type(response) in JSON_LINES_TYPES:
            reader = self.client.reader(response, self._max_answer)
            try:
                while (line := await reader.next_line()) is not None:
                    item = _parse(line, "a line of the service answer")
                    for element in item if isinstance(item, list) else (item,):
                        await emit(element)
            finally:
                # A line that is no reply, or the call ending while emit()
                # waits for the client, stops the loop outside the reader:
                # left alone, it would keep the connection for ever.
                reader.abort_if_unfinished()
            return
        answer = await self.client.reader(response, self._max_answer).read_all()
        item = _parse(answer, "the service answer") if answer.strip() else {}
        if many and isinstance(item, list):
            for element in item:
                await emit(element)
        else:
            await emit(item)


def _parse(data: bytes, what: str) -> Any:
    try:
        return jsontext.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise GrpcError(Status.INTERNAL, f"{what} is not JSON: {excerpt(data)}") from None


def _text(value: Any) -> str:
    """A credential value as header or query text (JSON text unless a string)."""
    return value if isinstance(value, str) else json.dumps(value)
