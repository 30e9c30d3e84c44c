"""Request flow control of the front end, frame by frame (tests/support/h2pair.py)."""

from __future__ import annotations

import asyncio
import base64

import pytest

from snet_daemon.frontend.call import ServerCall
from tests.support.aio import aio_test
from tests.support.h2pair import H2Pair


@pytest.mark.parametrize("text", [False, True], ids=["grpc-web", "grpc-web-text"])
@aio_test
async def test_requests_wait_for_a_handler_that_is_not_reading(text: bool) -> None:
    """While the handler does not read (the payment check, a busy service), the client's window
    runs out: what the daemon holds for it stays bounded (grpc-web-text was acknowledged at once,
    117 MiB and counting).  Once the handler reads, the window comes back."""
    calls: list[ServerCall] = []
    reading = asyncio.Event()

    async def handler(call: ServerCall) -> None:
        calls.append(call)
        await reading.wait()
        while await call.read() is not None:
            pass

    pair = H2Pair(handler)
    sid = pair.client.get_next_available_stream_id()
    content_type = "application/grpc-web-text" if text else "application/grpc-web"
    pair.client.send_headers(
        sid,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "t"),
            (":path", "/pkg.Svc/M"),
            ("content-type", content_type),
        ],
    )
    pair.pump()
    await asyncio.sleep(0)
    assert calls
    message = b"\x00" + (3000).to_bytes(4, "big") + b"x" * 3000
    chunk = base64.b64encode(message) if text else message
    pushed = 0
    while pushed < 64 << 20 and pair.client.local_flow_control_window(sid) >= len(chunk):
        pair.client.send_data(sid, chunk)
        pushed += len(chunk)
        pair.pump()
    assert pushed < 4 << 20
    assert calls[0].queued_bytes() < 4 << 20
    reading.set()
    for _ in range(20):
        await asyncio.sleep(0)
        pair.pump()
    assert calls[0].queued_bytes() == 0
    # Given back (h2 announces a window update once half the window is free).
    assert pair.client.local_flow_control_window(sid) >= pushed // 2
    pair.client.end_stream(sid)
    pair.pump()
    for _ in range(5):
        await asyncio.sleep(0)
    assert calls[0].task is not None
    assert calls[0].task.done()


@pytest.mark.parametrize("first", [b"", b"PRI * HTTP/2.0\r\n"], ids=["silent", "partial-preface"])
@aio_test
async def test_a_connection_that_never_shows_its_protocol_is_closed(first: bytes) -> None:
    """A client that sends nothing, or part of the HTTP/2 preface, is cut off after the sniffing
    timeout (it held its connection, and a file descriptor, for ever); one that does is not."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from snet_daemon.frontend.cors import CorsPolicy
    from snet_daemon.frontend.gateway import Gateway, Limits, Router
    from snet_daemon.frontend.listener import PREFACE, OnePortFactory

    async def handler(call: ServerCall) -> None:
        pass

    gateway = Gateway(Router(handler), None, CorsPolicy(), Limits(), asyncio.get_running_loop())  # type: ignore[arg-type]
    factory = OnePortFactory(gateway)
    factory.sniff_timeout = 0.05
    stalled, speaking = StringTransport(), StringTransport()
    for transport, data in ((stalled, first), (speaking, PREFACE)):
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5))
        protocol.makeConnection(transport)
        if data:
            protocol.dataReceived(data)
    await asyncio.sleep(0.2)
    assert stalled.disconnecting
    assert not speaking.disconnecting
