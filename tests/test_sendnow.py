"""send_now on real loopback sockets: sent at once when it can be, in order always."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet import tcp
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from snet_daemon import sendnow
from snet_daemon.sendnow import send_now
from tests.support.aio import aio_test

reactor: Any = _reactor


class _Peer(Protocol):
    """Records what it receives and when its connection goes."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connected_event = asyncio.Event()
        self.arrived = asyncio.Event()
        self.lost: asyncio.Future[Failure] = asyncio.get_running_loop().create_future()

    def connectionMade(self) -> None:
        self.connected_event.set()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.arrived.set()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)


async def _pair() -> tuple[_Peer, _Peer, Any]:
    """A connected (client, server, listening port) over loopback."""
    server = _Peer()
    client = _Peer()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
    factory = ClientFactory.forProtocol(lambda: client)
    reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
    await asyncio.wait_for(client.connected_event.wait(), 5)
    await asyncio.wait_for(server.connected_event.wait(), 5)
    return client, server, port


async def _stop(port: Any) -> None:
    await port.stopListening().asFuture(asyncio.get_running_loop())


async def _until(peer: _Peer, condition: Any, seconds: float = 10) -> None:
    """Wait until ``condition()`` holds, looking again whenever ``peer`` receives data."""
    async with asyncio.timeout(seconds):
        while not condition():
            peer.arrived.clear()
            await peer.arrived.wait()


def test_supported_on_this_twisted() -> None:
    """The Twisted we install keeps the buffer state send_now reads (else it would never send)."""
    assert sendnow._SUPPORTED


@aio_test
async def test_an_idle_connection_sends_at_once() -> None:
    """Nothing buffered: the data leaves in the call, and the reactor is not asked to watch for
    writability (transport.write would have buffered it and registered the socket)."""
    client, server, port = await _pair()
    try:
        transport: Any = client.transport
        assert isinstance(transport, tcp.Connection)
        send_now(transport, b"hello")
        assert transport not in reactor.getWriters()
        assert transport._tempDataLen == 0
        assert transport.dataBuffer == b""
        await _until(server, lambda: server.received == b"hello")
    finally:
        client.transport.loseConnection()  # type: ignore[union-attr]
        await _stop(port)


@aio_test
async def test_what_the_kernel_does_not_take_is_buffered_and_order_is_kept() -> None:
    """A peer that is not reading fills the socket buffers: the rest of a large send, and every
    later small one, wait in Twisted's buffer and arrive after it, in order."""
    client, server, port = await _pair()
    try:
        server.transport.pauseProducing()  # type: ignore[union-attr]
        transport: Any = client.transport
        assert isinstance(transport, tcp.Connection)
        big = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than loopback buffers hold
        send_now(transport, big)
        assert transport._tempDataLen > 0, "expected part of the data to be left buffered"
        assert transport in reactor.getWriters()
        tail = [b"after-%d;" % i for i in range(50)]
        for piece in tail:
            send_now(transport, piece)
        server.transport.resumeProducing()  # type: ignore[union-attr]
        expected = big + b"".join(tail)
        await _until(server, lambda: len(server.received) >= len(expected), seconds=30)
        assert bytes(server.received) == expected
        # Once drained, the next write goes at once again.
        assert transport not in reactor.getWriters()
        send_now(transport, b"!")
        assert transport not in reactor.getWriters()
        await _until(server, lambda: server.received.endswith(b"!"))
    finally:
        client.transport.loseConnection()  # type: ignore[union-attr]
        await _stop(port)


@aio_test
async def test_data_written_earlier_in_the_turn_goes_first() -> None:
    """Data handed to transport.write and not yet sent (it waits for the loop's next turn) is not
    overtaken by a later send_now, although the socket has room."""
    client, server, port = await _pair()
    try:
        transport: Any = client.transport
        assert isinstance(transport, tcp.Connection)
        transport.write(b"first;")
        send_now(transport, b"second;")
        transport.write(b"third;")
        send_now(transport, b"fourth")
        await _until(server, lambda: len(server.received) >= 25)
        assert server.received == b"first;second;third;fourth"
    finally:
        client.transport.loseConnection()  # type: ignore[union-attr]
        await _stop(port)


@aio_test
async def test_a_peer_that_reset_the_connection_is_reported_lost() -> None:
    """The send fails (connection reset): no exception reaches the caller, and the connection is
    reported lost as Twisted reports it for transport.write."""
    client, server, port = await _pair()
    try:
        handle = server.transport.getHandle()  # type: ignore[union-attr]
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.transport.abortConnection()  # type: ignore[union-attr]
        await asyncio.wait_for(server.lost, 5)
        await asyncio.sleep(0.05)  # the RST reaches the client's socket
        for _ in range(3):
            if client.lost.done():
                break
            send_now(client.transport, b"x" * 1000)  # type: ignore[arg-type]
            await asyncio.sleep(0.05)
        reason = await asyncio.wait_for(client.lost, 5)
        assert reason is not None
    finally:
        await _stop(port)


def test_other_transports_take_the_ordinary_path() -> None:
    """TLS and test transports are not plain TCP: the data goes to their write()."""
    transport = StringTransport()
    send_now(transport, b"abc")
    send_now(transport, b"def")
    assert transport.value() == b"abcdef"


@aio_test
async def test_a_closing_connection_takes_the_ordinary_path() -> None:
    """After loseConnection the data goes through Twisted's buffer, which decides its fate."""
    client, _server, port = await _pair()
    try:
        transport: Any = client.transport
        assert isinstance(transport, tcp.Connection)
        transport.loseConnection()
        send_now(transport, b"late")
        assert transport._tempDataLen == 4
        await asyncio.wait_for(client.lost, 5)
    finally:
        await _stop(port)
