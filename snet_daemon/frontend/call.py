"""One gRPC call as handlers see it, whatever the transport.

Native gRPC over HTTP/2, gRPC-Web over HTTP/2 and gRPC-Web over HTTP/1.1
each decode requests their own way, then hand the same :class:`ServerCall`
to a handler.  The handler reads request messages, writes reply messages and
returns (or raises :class:`GrpcError`); :func:`run_call` turns the outcome
into trailers.  The transport side talks to the call through a
:class:`CallSink` and the ``deliver``/``end_input``/``cancel`` methods.

Flow control works in both directions through this object: a handler that
does not read leaves the messages delivered to it unacknowledged (the
transport stops granting the client window once they fill it), and a handler
that writes faster than the client reads is made to wait in
:meth:`ServerCall.drain`.  The bytes of a message still being assembled are
not the handler's to hold back: the transport bounds them itself (HTTP/2: a
budget per connection; HTTP/1.1: the body size limit).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from twisted.logger import Logger

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.frontend.wire import Metadata, check_encoding, metadata_from_headers, parse_timeout

_log = Logger(namespace="snetd.frontend")


class CallSink(Protocol):
    """What a :class:`ServerCall` needs from the transport that carries it."""

    def send_headers(self, metadata: Metadata) -> None:
        """Send the reply headers with this initial metadata."""

    def send_message(self, message: bytes) -> None:
        """Send one reply message (not yet length-prefixed)."""

    def send_trailers(self, status: int, message: str, metadata: Metadata, trailers_only: bool) -> None:
        """End the reply with this status.

        ``trailers_only`` is true when no headers were sent: the transport
        then sends one header block carrying both (gRPC's "Trailers-Only").
        """

    def can_write(self) -> bool:
        """False while the transport holds too much unsent reply data."""

    def consumed(self, size: int) -> None:
        """The handler has taken a request message of ``size`` bytes.

        The transport may now grant the client more flow-control window.
        """


class ServerCall:
    """A call in progress, between a transport and a handler.

    Attributes:
        method: the full method name, ``/package.Service/Method``.
        metadata: the request metadata (``-bin`` values as bytes), without
            pseudo-headers and transport headers.
        deadline: the loop time by which the call must end, or None.
        peer: the client's address, for logs.
        web: True for gRPC-Web calls.
        content_type: the request's content type without parameters
            (``application/grpc``, ``application/grpc+json``,
            ``application/grpc-web+proto``...).  ``+json`` means the
            messages are JSON text, not protobuf.
    """

    __slots__ = (
        "_drainer",
        "_headers_sent",
        "_inbox",
        "_input_done",
        "_input_error",
        "_loop",
        "_reader",
        "_sink",
        "_trailers",
        "cancelled",
        "content_type",
        "deadline",
        "finished",
        "metadata",
        "method",
        "on_writable",
        "peer",
        "task",
        "web",
    )

    def __init__(
        self,
        method: str,
        metadata: Metadata,
        sink: CallSink,
        loop: asyncio.AbstractEventLoop,
        *,
        deadline: float | None = None,
        peer: str = "",
        web: bool = False,
    ) -> None:
        self.method = method
        self.metadata = metadata
        self.deadline = deadline
        self.peer = peer
        self.web = web
        self.content_type = "application/grpc"
        self._sink = sink
        self._loop = loop
        self._inbox: deque[bytes] = deque()
        self._input_done = False
        self._input_error: GrpcError | None = None
        self._reader: asyncio.Future[None] | None = None
        self._drainer: asyncio.Future[None] | None = None
        self._headers_sent = False
        self._trailers: Metadata = ()
        #: True once the final status has been handed to the transport.
        self.finished = False
        #: True when the client went away (RST_STREAM, disconnect).
        self.cancelled = False
        #: The task running the handler, set by :func:`run_call`.
        self.task: asyncio.Task[None] | None = None
        #: Called when the transport can take reply data again (for relays
        #: that write from callbacks rather than awaiting :meth:`drain`).
        self.on_writable: Callable[[], None] | None = None

    # -- for handlers -----------------------------------------------------

    def time_remaining(self) -> float | None:
        """Seconds until the deadline (never negative), or None without one."""
        if self.deadline is None:
            return None
        return max(self.deadline - self._loop.time(), 0.0)

    def request_if_complete(self) -> bytes | None:
        """The request message, if the client already sent exactly one and closed.

        This is every unary and server-streaming call from ordinary clients:
        both arrive in one read.  It lets the upstream use a cheaper call
        shape; when it returns None, use :meth:`read` instead.
        """
        if self._input_done and len(self._inbox) == 1 and self._input_error is None:
            message = self._inbox.popleft()
            self._sink.consumed(len(message))
            return message
        return None

    async def read(self) -> bytes | None:
        """The next request message, or None once the client has closed.

        Raises:
            GrpcError: when the request could not be decoded (the call is
                already being failed with that status).
        """
        while True:
            if self._inbox:
                message = self._inbox.popleft()
                self._sink.consumed(len(message))
                return message
            if self._input_error is not None:
                raise self._input_error
            if self._input_done:
                return None
            self._reader = self._loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None

    def send_initial_metadata(self, metadata: Metadata = ()) -> None:
        """Send the reply headers now, with ``metadata``; later calls do nothing."""
        if not self._headers_sent and not self.finished:
            self._headers_sent = True
            self._sink.send_headers(metadata)

    def write(self, message: bytes) -> None:
        """Queue one reply message.  Call :meth:`drain` in loops that write many."""
        if self.finished:
            return
        if not self._headers_sent:
            self._headers_sent = True
            self._sink.send_headers(())
        self._sink.send_message(message)

    def can_write(self) -> bool:
        """False while the transport holds too much unsent reply data."""
        return self._sink.can_write()

    async def drain(self) -> None:
        """Wait until the transport can take more reply data."""
        while not self._sink.can_write() and not self.finished:
            self._drainer = self._loop.create_future()
            try:
                await self._drainer
            finally:
                self._drainer = None

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        """Metadata to send with the final status."""
        self._trailers = metadata

    def finish(self, status: int, message: str = "", metadata: Metadata | None = None) -> None:
        """Send the final status; the first call wins, later ones do nothing."""
        if self.finished:
            return
        self.finished = True
        trailers = self._trailers if metadata is None else metadata
        self._sink.send_trailers(status, message, trailers, not self._headers_sent)
        self._wake_drainer()

    # -- for transports ---------------------------------------------------

    def accept_headers(self, headers: list[tuple[str, str]], default_timeout: float | None = None) -> str:
        """Take the deadline and metadata from the request headers.

        Args:
            headers: all request headers, names in lower case.
            default_timeout: seconds the call may take when the client set
                no deadline (``service_timeout``), or None for no limit.

        Returns:
            The request's message encoding (``grpc-encoding``).

        Raises:
            GrpcError: for a malformed method name, ``grpc-timeout`` or
                ``-bin`` value, or an unsupported encoding.
        """
        if not self.method.startswith("/") or self.method.count("/") != 2:
            # Shown cut short: the client chose it, and must not make the
            # status we write much larger than what it sent.
            shown = self.method if len(self.method) <= 200 else self.method[:200] + "..."
            raise GrpcError(Status.UNIMPLEMENTED, f"malformed method name {shown!r}")
        timeout = encoding = None
        for name, value in headers:
            if name == "grpc-timeout":
                timeout = value
            elif name == "grpc-encoding":
                encoding = value
            elif name == "content-type":
                self.content_type = value.split(";", 1)[0].strip().lower()
        if timeout is not None:
            self.deadline = self._loop.time() + parse_timeout(timeout)
        elif default_timeout is not None:
            self.deadline = self._loop.time() + default_timeout
        checked = check_encoding(encoding)
        self.metadata = metadata_from_headers(headers)
        return checked

    def deliver(self, message: bytes) -> None:
        """A request message arrived."""
        self._inbox.append(message)
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def end_input(self) -> None:
        """The client closed its side of the call."""
        self._input_done = True
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def fail_input(self, error: GrpcError) -> None:
        """The request could not be decoded: fail the call with ``error``."""
        self._input_error = error
        self._input_done = True
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)
        self.finish(error.status, error.message)
        self.abort()

    def writable(self) -> None:
        """The transport can take reply data again."""
        self._wake_drainer()
        if self.on_writable is not None:
            self.on_writable()

    def cancel(self) -> None:
        """The client went away: stop the handler; nothing more is sent."""
        if self.cancelled:
            return
        self.cancelled = True
        self.finished = True
        self.abort()
        self._wake_drainer()

    def abort(self) -> None:
        """Cancel the handler task, if it is still running."""
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def queued_bytes(self) -> int:
        """Bytes of request messages waiting for the handler."""
        return sum(map(len, self._inbox))

    def _wake_drainer(self) -> None:
        if self._drainer is not None and not self._drainer.done():
            self._drainer.set_result(None)


#: A handler serves one call; it may raise :class:`GrpcError`.
Handler = Callable[[ServerCall], Awaitable[None]]


async def run_call(handler: Handler, call: ServerCall) -> None:
    """Run ``handler`` on ``call`` and send the final status, whatever happens.

    A normal return means ``OK``; :class:`GrpcError` becomes its status; an
    expired deadline becomes ``DEADLINE_EXCEEDED``; a client cancellation
    sends nothing; any other exception is a bug: it is logged with its
    traceback and the client gets a generic ``INTERNAL`` (never the text of
    an unexpected exception, which might hold secrets).
    """
    timer = None
    if call.deadline is not None:
        timer = call._loop.call_at(call.deadline, _expire, call)
    try:
        await handler(call)
    except GrpcError as error:
        call.finish(error.status, error.message, error.trailers or None)
    except asyncio.CancelledError:
        # Either the client went away (nothing to send) or the deadline
        # passed (already answered by _expire) or the input failed (already
        # answered by fail_input).
        if not call.finished:
            call.finish(Status.CANCELLED, "call cancelled")
    except Exception:
        _log.failure("unexpected error in handler for {method}", method=call.method)
        call.finish(Status.INTERNAL, "internal error")
    else:
        call.finish(Status.OK)
    finally:
        if timer is not None:
            timer.cancel()


def _expire(call: ServerCall) -> None:
    """The call's deadline passed: answer DEADLINE_EXCEEDED and stop the handler."""
    if not call.finished:
        call.finish(Status.DEADLINE_EXCEEDED, "deadline exceeded")
    call.abort()


def start_call(handler: Handler, call: ServerCall) -> None:
    """Run ``handler`` for ``call`` in its own task (see :func:`run_call`)."""
    call.task = call._loop.create_task(run_call(handler, call))
