"""One port for everything: pick HTTP/2 or HTTP/1.1 per connection.

Under TLS the client's ALPN choice decides.  In cleartext, a connection
that starts with the HTTP/2 client preface is HTTP/2 "with prior knowledge"
(what grpcio does for insecure channels); anything else is handed to the
HTTP/1.1 server, which answers garbage with ``400 Bad Request``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from twisted.internet.interfaces import IAddress, IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import server
from zope.interface import implementer

from snet_daemon.frontend.admission import AUTOMATIC_LIMIT, ConnectionTable
from snet_daemon.frontend.gateway import Gateway
from snet_daemon.frontend.http1 import Channel, build_site
from snet_daemon.frontend.http2 import H2ServerProtocol

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class SniffingProtocol(Protocol):
    """Decides HTTP/2 or HTTP/1.1 from the first bytes (or ALPN), then forwards.

    It stays in place as a thin forwarder so the choice works the same over
    TCP and TLS transports.
    """

    def __init__(self, factory: OnePortFactory, addr: IAddress) -> None:
        self._factory = factory
        self._addr = addr
        self._buffer = b""
        self._inner: Protocol | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connectionMade(self) -> None:
        # Replies are written as they become ready, often in several small
        # writes per call; with Nagle's algorithm the later ones would wait
        # for the client's delayed ACK (tens of milliseconds).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated == b"h2":
            self._switch(self._factory.http2())
        elif negotiated == b"http/1.1":
            self._switch(self._factory.http1(self._addr))
        if self._inner is None:
            # A client that sends nothing (or a partial preface) would hold
            # the connection, and a file descriptor, for ever.
            self._timer = self._factory.gateway.loop.call_later(self._factory.sniff_timeout, self._expire)

    def _expire(self) -> None:
        """The sniff timeout, or the end of an evicted connection's grace."""
        self._timer = None
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        inner = self._inner
        if inner is not None:
            inner.dataReceived(data)
            return
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated is not None:
            # TLS: ALPN is known once the handshake is done.
            self._switch(self._factory.http2() if negotiated == b"h2" else self._factory.http1(self._addr))
            self._inner.dataReceived(data)  # type: ignore[union-attr]
            return
        self._buffer += data
        seen = self._buffer[: len(PREFACE)]
        if not PREFACE.startswith(seen):
            self._switch(self._factory.http1(self._addr))
        elif len(self._buffer) >= len(PREFACE):
            self._switch(self._factory.http2())
        else:
            return
        buffered, self._buffer = self._buffer, b""
        self._inner.dataReceived(buffered)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._factory.connections.release(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inner is not None:
            self._inner.connectionLost(reason)

    # -- the connection table (snet_daemon.frontend.admission) -------------

    def _calls(self, running: bool) -> None:
        """The protocol's report: the first call began (True), or the last one ended."""
        table = self._factory.connections
        if running:
            table.busy(self)
        else:
            table.idle(self)

    def evict(self) -> None:
        """Close to make room for a new connection.

        HTTP/2 gets GOAWAY (a gRPC client reconnects by itself), its
        streams still waiting for a request message REFUSED_STREAM;
        HTTP/1.1 is closed.  Whatever is left after
        :attr:`OnePortFactory.evict_grace` seconds (a client that stopped
        reading, so what is left to send never goes) is cut off.
        """
        inner = self._inner
        if inner is None:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if isinstance(inner, H2ServerProtocol):
            inner.make_room()
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]
        if self._timer is None:
            self._timer = self._factory.gateway.loop.call_later(self._factory.evict_grace, self._expire)

    def _switch(self, inner: Protocol) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner = inner
        if isinstance(inner, H2ServerProtocol | Channel):
            inner.on_busy = self._calls
        inner.makeConnection(self.transport)


@implementer(IProtocolNegotiationFactory)
class OnePortFactory(Factory):
    """Builds the protocol of every connection to ``daemon_endpoint``.

    Args:
        gateway: the state every connection shares.
        max_connections: most connections kept open at once (see
            :mod:`snet_daemon.frontend.admission`).
    """

    noisy = False
    #: Seconds a connection may take to show which protocol it speaks.
    sniff_timeout = 30.0
    #: Seconds a connection closed to make room may take to go: it has no
    #: call left, but a client that stopped reading keeps what is left to
    #: send (the GOAWAY, a response) from going.
    evict_grace = 5.0

    def __init__(self, gateway: Gateway, max_connections: int = AUTOMATIC_LIMIT) -> None:
        self.gateway = gateway
        self._site = build_site(gateway)
        self.connections = ConnectionTable(max_connections, gateway.loop.time)

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        assert addr is not None
        protocol = SniffingProtocol(self, addr)
        # None: Twisted closes the new socket before reading from it.
        return protocol if self.connections.admit(protocol) else None

    def acceptableProtocols(self) -> list[bytes]:
        """ALPN offer under TLS: HTTP/2 first, then HTTP/1.1 for browsers."""
        return [b"h2", b"http/1.1"]

    def http2(self) -> Protocol:
        return H2ServerProtocol(self.gateway)

    def http1(self, addr: IAddress) -> Protocol:
        protocol: Any = self._site.buildProtocol(addr)
        return protocol  # type: ignore[no-any-return]

    @property
    def site(self) -> server.Site:
        return self._site
