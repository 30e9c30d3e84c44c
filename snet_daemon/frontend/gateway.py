"""What every connection of the front end shares: routing, limits, CORS.

One :class:`Gateway` is built by the composition root and handed to the
listening factory; each connection protocol (HTTP/2 or HTTP/1.1) asks it
which handler serves a method, how large a message may be, and which plain
HTTP answer a ``GET`` gets.  It also tracks open connections so the daemon
can drain them on shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.logger import Logger

from snet_daemon.frontend.call import Handler, ServerCall, start_call
from snet_daemon.frontend.cors import CorsPolicy
from snet_daemon.frontend.status import Status

_log = Logger(namespace="snetd.frontend")


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete plain-HTTP answer (heartbeat, encoding, errors)."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


class HttpRoutes(Protocol):
    """Answers the plain HTTP requests that reach the daemon port."""

    async def respond(self, method: str, path: str) -> HttpResponse:
        """Return the answer for ``method`` on ``path`` (404 when unknown)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Protocol limits of the front end.

    Attributes:
        max_message_size: largest request message, in bytes
            (``max_message_size_in_mb``); a larger one fails with
            ``RESOURCE_EXHAUSTED`` as soon as its length prefix arrives,
            before its body is buffered.  This bounds one message, not what
            a connection may have buffered: see ``max_unfinished_bytes``.
        max_unfinished_bytes: bytes of request messages still being
            assembled that one HTTP/2 connection may have, on all its
            streams (never less than twice ``max_message_size``).  Flow
            control does not bound them (they are acknowledged at once, or a
            message larger than the window could never complete); the stream
            that goes over fails with ``RESOURCE_EXHAUSTED``.
        max_concurrent_streams: HTTP/2 streams one connection may have open.
        max_header_list_size: largest request header block (decoded), bytes.
        stream_window: HTTP/2 receive window granted per stream.
        connection_window: HTTP/2 receive window for a whole connection.
        write_buffer: reply bytes a call may queue before its writer must
            wait for the client to read (the slow-reader bound).
        max_resets_per_second: RST_STREAMs a client may send per second, on
            average, before the connection is closed (rapid-reset defence).
        max_control_frames_per_second: HTTP/2 frames that change nothing
            (empty DATA, PRIORITY, SETTINGS that let no reply go on,
            unsolicited ACKs) a client may send per second, on average,
            before the connection is closed with ENHANCE_YOUR_CALM.  Both
            budgets allow bursts of five seconds' worth.
        default_timeout: seconds a call may take when the client set no
            deadline (``service_timeout``); None for no limit.
        idle_timeout: seconds an HTTP/2 connection may stay without an open
            stream before it is sent GOAWAY and closed (grpc-go's
            ``MaxConnectionIdle``; PINGs do not count as use).  Without it a
            client that sent the preface and went silent held a file
            descriptor for ever.  Five minutes is long enough that a client
            calling now and then keeps its connection (gRPC clients reconnect
            transparently after a GOAWAY anyway) and short enough that a few
            hundred abandoned connections are gone before they matter.
        abort_grace: seconds an HTTP/2 connection the daemon has given up on
            (a protocol error, a flood, the client's GOAWAY with an error) may take to
            close before it is aborted; its calls are cancelled at once.
    """

    max_message_size: int = 4 * 1024 * 1024
    max_unfinished_bytes: int = 32 * 1024 * 1024
    max_concurrent_streams: int = 1000
    max_header_list_size: int = 64 * 1024
    stream_window: int = 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    write_buffer: int = 256 * 1024
    max_resets_per_second: float = 200.0
    max_control_frames_per_second: float = 200.0
    default_timeout: float | None = None
    idle_timeout: float = 300.0
    abort_grace: float = 5.0


class Router:
    """Maps full method names to handlers; unknown methods go to the default.

    The daemon's own services register exact names; the default handler is
    the passthrough to the AI service, as in the Go daemon, where every
    method the daemon does not serve itself is proxied.
    """

    def __init__(self, default: Handler) -> None:
        self._handlers: dict[str, Handler] = {}
        self._default = default

    def add(self, method: str, handler: Handler) -> None:
        """Serve ``method`` (``/package.Service/Method``) with ``handler``."""
        self._handlers[method] = handler

    def lookup(self, method: str) -> Handler:
        """The handler for ``method``."""
        return self._handlers.get(method, self._default)


class Connection(Protocol):
    """A front-end connection, as the gateway sees it for shutdown."""

    def active_calls(self) -> int:
        """Calls still in progress on this connection."""

    def shutdown(self) -> None:
        """Refuse new calls (HTTP/2 GOAWAY) and close once idle."""

    def abort(self) -> None:
        """Close now, cancelling whatever is in progress."""


@dataclass
class Gateway:
    """The shared state of every front-end connection.

    Attributes:
        router: which handler serves which gRPC method.
        routes: the plain HTTP answers (heartbeat, encoding).
        cors: the CORS policy for browsers (gRPC-Web).
        limits: protocol limits.
        loop: the event loop calls run on (the asyncio reactor's loop).
    """

    router: Router
    routes: HttpRoutes
    cors: CorsPolicy
    limits: Limits
    loop: asyncio.AbstractEventLoop
    connections: set[Connection] = field(default_factory=set)
    #: Calls whose handler is running, on any transport.
    active: set[ServerCall] = field(default_factory=set)
    #: True once shutdown began: new calls are refused with UNAVAILABLE.
    closing: bool = False

    def start(self, call: ServerCall) -> None:
        """Run the handler for ``call``, or refuse it while shutting down."""
        if self.closing:
            call.finish(Status.UNAVAILABLE, "the daemon is shutting down")
            return
        start_call(self.router.lookup(call.method), call)
        task = call.task
        assert task is not None
        self.active.add(call)
        task.add_done_callback(lambda _: self.active.discard(call))

    async def drain(
        self, grace: float, sleep: Callable[[float], Awaitable[None]] | None = None, settle: float = 5.0
    ) -> None:
        """Stop taking calls and wait up to ``grace`` seconds for running ones.

        HTTP/2 clients get GOAWAY (they open no new streams and reconnect
        elsewhere); calls still running after the grace period are ended
        with UNAVAILABLE, which cancels their upstream calls.  Their
        handlers then refund the payments (a storage round trip or a few
        retries): they are given up to ``settle`` seconds more, so that the
        payment storage does not close under them.
        """
        pause = sleep or asyncio.sleep
        self.closing = True
        for conn in list(self.connections):
            conn.shutdown()
        waited = 0.0
        while waited < grace and self.active:
            await pause(0.05)
            waited += 0.05
        if self.active:
            _log.warn("ending {count} call(s) still running after {grace}s", count=len(self.active), grace=grace)
            for call in list(self.active):
                call.finish(Status.UNAVAILABLE, "the daemon is shutting down")
                call.abort()
            await pause(0)
            waited = 0.0
            while waited < settle and self.active:
                await pause(0.01)
                waited += 0.01
            if self.active:
                _log.warn(
                    "{count} cancelled call(s) did not end within {settle}s", count=len(self.active), settle=settle
                )
        for conn in list(self.connections):
            if conn.active_calls():
                conn.abort()
