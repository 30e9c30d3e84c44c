"""The whole front end of the daemon port in process, over StringTransports.

:class:`OnePort` builds the real :class:`OnePortFactory` (protocol sniffing,
HTTP/1.1 and HTTP/2) around a stub handler and routes, and hands out
connections whose bytes the test reads and writes directly.  The HTTP/1.1
timeouts run on a :class:`Clock` the test advances; calls run on the asyncio
loop as in the daemon.
"""

from __future__ import annotations

import asyncio
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from snet_daemon.frontend.call import Handler, ServerCall
from snet_daemon.frontend.cors import CorsPolicy
from snet_daemon.frontend.gateway import Gateway, HttpResponse, Limits, Router
from snet_daemon.frontend.listener import OnePortFactory
from snet_daemon.frontend.status import GrpcError, Status


class StubRoutes:
    """Plain HTTP answers: ``/heartbeat`` is 200, ``/boom`` fails, the rest is 404."""

    async def respond(self, method: str, path: str) -> HttpResponse:
        if path == "/boom":
            raise RuntimeError("boom")
        if path == "/heartbeat":
            return HttpResponse(200, b'{"status":"Online"}', "application/json")
        return HttpResponse(404, b"404 page not found\n")


class OnePort:
    """A front end whose every call goes to ``handler``.

    Args:
        handler: the handler of every gRPC method.
        origins: ``cors_allowed_origins``.
        limits: fields of :class:`Limits`.
    """

    def __init__(self, handler: Handler, origins: tuple[str, ...] = ("*",), **limits: Any) -> None:
        self.gateway = Gateway(
            Router(handler), StubRoutes(), CorsPolicy(origins), Limits(**limits), asyncio.get_event_loop()
        )
        self.factory = OnePortFactory(self.gateway)
        self.clock = Clock()
        self.factory.site.reactor = self.clock

    def connect(self, data: bytes = b"") -> tuple[Protocol, StringTransport]:
        """A new connection, sent ``data`` if given."""
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5))
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5))
        assert protocol is not None, "the connection limit refused the connection"
        protocol.makeConnection(transport)
        if data:
            protocol.dataReceived(data)
        return protocol, transport


async def settle(turns: int = 10) -> None:
    """Let the asyncio side (handlers, plain routes) run a few turns."""
    for _ in range(turns):
        await asyncio.sleep(0)


def http1_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (lower-case names) of the first HTTP/1.1 reply in ``raw``."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1]) if head and len(head[0].split()) > 1 else 0
    headers: dict[str, str] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def closing(transport: StringTransport) -> bool:
    """True once the server closed (or began closing) ``transport``.

    A function, so that type checkers do not narrow ``disconnecting`` for
    the rest of a test after one assertion on it.
    """
    return bool(transport.disconnecting)


#: Paths of :func:`metadata_handler` and the metadata name each answer carries.
METADATA_CALLS = (("/p.S/M", "x-request-id"), ("/p.S/Fail", "x-retry-channel"))


async def metadata_handler(call: ServerCall) -> None:
    """Send initial metadata (``/p.S/M``), or fail with metadata (``/p.S/Fail``, trailers-only)."""
    await call.read()
    if call.method == "/p.S/Fail":
        raise GrpcError(Status.FAILED_PRECONDITION, "no", (("x-retry-channel", "42"),))
    call.send_initial_metadata((("x-request-id", "abc"),))
    call.write(b"ok")
