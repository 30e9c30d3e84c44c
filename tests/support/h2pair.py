"""The front end's HTTP/2 protocol in process: a StringTransport, and an h2 client driving it.

For tests of flow control and framing that need every frame under control
and no sockets; the real daemon's tests (tests/test_robustness.py) cover
the same paths end to end.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from snet_daemon.frontend.call import Handler
from snet_daemon.frontend.cors import CorsPolicy
from snet_daemon.frontend.gateway import Gateway, HttpResponse, Limits, Router
from snet_daemon.frontend.http2 import H2ServerProtocol


class _NoRoutes:
    async def respond(self, method: str, path: str) -> HttpResponse:
        return HttpResponse(404, b"404 page not found\n")


class H2Pair:
    """An :class:`H2ServerProtocol` whose every call goes to ``handler``, and a client for it."""

    def __init__(self, handler: Handler, **limits: Any) -> None:
        gateway = Gateway(Router(handler), _NoRoutes(), CorsPolicy(), Limits(**limits), asyncio.get_event_loop())
        self.server = H2ServerProtocol(gateway)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5))
        self.server.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.client.initiate_connection()
        self.events: list[Any] = []
        self.pump()

    def to_server(self) -> None:
        data = self.client.data_to_send()
        if data:
            self.server.dataReceived(data)

    def to_client(self) -> None:
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.events.extend(self.client.receive_data(data))

    def pump(self) -> None:
        """Deliver what each side has to send, both ways (twice, for the answers to answers)."""
        self.to_server()
        self.to_client()
        self.to_server()
        self.to_client()
