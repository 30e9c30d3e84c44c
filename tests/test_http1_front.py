"""The HTTP/1.1 side of the daemon port in process (tests/support/oneport.py).

What needs the clock or the bytes under control: request deadlines, refusals
before the body, the headers of the daemon's own answers.  The real daemon's
tests (tests/test_grpcweb_http.py, tests/test_robustness.py) cover the
common paths end to end.
"""

from __future__ import annotations

import asyncio

from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.http1 import BODY_DEADLINE, BODY_MIN_RATE, HEAD_DEADLINE
from snet_daemon.frontend.status import Status
from snet_daemon.frontend.wire import frame
from tests.support.aio import aio_test
from tests.support.oneport import METADATA_CALLS, OnePort, closing, http1_head, metadata_handler, settle


async def _echo(call: ServerCall) -> None:
    message = await call.read()
    call.write(message or b"")


def _web_post(body: bytes, extra: bytes = b"", length: int | None = None) -> bytes:
    """The head of a gRPC-Web POST (and ``body``)."""
    size = len(body) if length is None else length
    return (
        b"POST /p.S/M HTTP/1.1\r\nHost: a\r\nContent-Type: application/grpc-web+proto\r\n"
        b"Content-Length: %d\r\n%s\r\n" % (size, extra)
    ) + body


def test_a_trickled_request_head_is_cut_off() -> None:
    """A head sent a byte a second never let twisted.web's idle timeout (60 s, restarted on
    every byte) fire: the connection, and a file descriptor, was held for ever.  The head now
    has HEAD_DEADLINE seconds from its first byte, then gets 408 and the connection closes."""
    front = OnePort(_echo)
    protocol, transport = front.connect()
    head = b"GET /heartbeat HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"a" * 100
    for byte in head[: int(HEAD_DEADLINE) - 1]:
        protocol.dataReceived(bytes([byte]))
        front.clock.advance(1)
    assert not closing(transport)
    for byte in head[int(HEAD_DEADLINE) - 1 :]:
        protocol.dataReceived(bytes([byte]))
        front.clock.advance(1)
        if closing(transport):
            break
    assert closing(transport)
    assert http1_head(transport.value())[0] == 408


def test_a_trickled_body_is_cut_off_by_its_length() -> None:
    """A body gets at least BODY_DEADLINE seconds, and a longer one as long as it takes at
    BODY_MIN_RATE; then 408."""
    front = OnePort(_echo)
    length = 4 * 1024 * 1024
    allowed = max(BODY_DEADLINE, length / BODY_MIN_RATE)
    protocol, transport = front.connect(_web_post(b"", length=length))
    for _ in range(int(allowed) - 1):
        protocol.dataReceived(b"\x00" * 100)
        front.clock.advance(1)
    assert not closing(transport)
    front.clock.advance(2)
    assert closing(transport)
    assert http1_head(transport.value())[0] == 408

    protocol, transport = front.connect(_web_post(b"", length=10))
    front.clock.advance(BODY_DEADLINE - 1)
    assert not closing(transport)
    front.clock.advance(2)
    assert http1_head(transport.value())[0] == 408


@aio_test
async def test_requests_that_arrive_in_time_are_not_cut_off() -> None:
    """A deadline covers arrival only: a call served for longer than any deadline, and the next
    request on the connection (pipelined, or after a pause), are answered normally."""
    release = asyncio.Event()

    async def slow(call: ServerCall) -> None:
        message = await call.read()
        await release.wait()
        call.write(message or b"")

    front = OnePort(slow)
    request = _web_post(frame(b"hi"))
    protocol, transport = front.connect(request + request[:10])
    await settle()
    front.clock.advance(HEAD_DEADLINE * 10)
    release.set()
    await settle()
    protocol.dataReceived(request[10:])
    await settle()
    front.clock.advance(HEAD_DEADLINE - 1)
    protocol.dataReceived(request)
    await settle()
    front.clock.advance(HEAD_DEADLINE + 1)  # twisted.web's idle timeout (60 s) is not due yet
    replies = transport.value()
    assert replies.count(b"HTTP/1.1 200 OK") == 3
    assert b"408" not in replies
    assert not closing(transport)


def _exposed(headers: dict[str, str]) -> set[str]:
    return {name.strip() for name in headers.get("access-control-expose-headers", "").split(",")}


@aio_test
async def test_response_metadata_is_exposed_to_browser_scripts() -> None:
    """The service's initial metadata, and the metadata of a trailers-only error (sent as
    headers), were hidden from the page: Access-Control-Expose-Headers was a fixed list."""

    front = OnePort(metadata_handler)
    origin = b"Origin: https://app.example\r\n"
    for path, name in METADATA_CALLS:
        _, transport = front.connect(_web_post(frame(b"hi"), origin).replace(b"/p.S/M", path.encode()))
        await settle()
        status, headers = http1_head(transport.value())
        assert status == 200
        assert name in headers
        assert name in _exposed(headers), headers


def test_an_oversized_body_is_refused_before_it_is_sent() -> None:
    """A Content-Length over the limit was read (and dropped) to the end before the answer, and
    ``Expect: 100-continue`` even invited the upload.  It is answered at once, without 100
    Continue: trailers-only RESOURCE_EXHAUSTED with CORS for gRPC-Web, 413 otherwise; the
    connection closes."""
    front = OnePort(_echo, max_message_size=1000)
    extra = b"Expect: 100-continue\r\nOrigin: https://app.example\r\n"
    _, transport = front.connect(_web_post(b"", extra, length=10**11))
    reply = transport.value()
    status, headers = http1_head(reply)
    assert b"100 Continue" not in reply
    assert status == 200
    assert headers["grpc-status"] == str(int(Status.RESOURCE_EXHAUSTED))
    assert headers["access-control-allow-origin"] == "*"
    assert headers["connection"] == "close"
    assert closing(transport)

    head = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Type: image/png\r\nContent-Length: 99999\r\n\r\n"
    _, transport = front.connect(head)
    status, headers = http1_head(transport.value())
    assert status == 413
    assert headers["connection"] == "close"
    assert closing(transport)


def test_a_chunked_body_is_refused_once_it_passes_the_limit() -> None:
    """A chunked body has no length to check: it is refused as soon as it passes the limit,
    and what follows is not read (no second answer, no 400 for the rest)."""
    front = OnePort(_echo, max_message_size=1000)
    head = (
        b"POST /p.S/M HTTP/1.1\r\nHost: a\r\nContent-Type: application/grpc-web-text\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"400\r\n" + b"A" * 0x400 + b"\r\n"
    protocol, transport = front.connect(head + chunk)
    assert transport.value() == b""
    protocol.dataReceived(chunk + b"garbage\r\n" + chunk)
    status, headers = http1_head(transport.value())
    assert status == 200
    assert headers["grpc-status"] == str(int(Status.RESOURCE_EXHAUSTED))
    assert transport.value().count(b"HTTP/1.1") == 1
    assert closing(transport)


@aio_test
async def test_the_daemons_own_errors_carry_cors() -> None:
    """415 (wrong content type), 505 (native gRPC over HTTP/1.1) and 500 (a failing route)
    had no CORS headers, so a page saw an opaque network error instead of the answer."""
    front = OnePort(_echo)
    origin = b"Origin: https://app.example\r\n"
    post = b"POST /p.S/M HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Type: %s\r\n%s\r\n"
    requests = [
        (post % (b"application/json", origin), 415),
        (post % (b"application/grpc", origin), 505),
        (b"GET /boom HTTP/1.1\r\nHost: a\r\n" + origin + b"\r\n", 500),
    ]
    for request, expected in requests:
        _, transport = front.connect(request)
        await settle()
        status, headers = http1_head(transport.value())
        assert status == expected
        assert headers.get("access-control-allow-origin") == "*", (expected, headers)


@aio_test
async def test_a_body_of_absurdly_many_messages_is_refused() -> None:
    """A gRPC-Web body of 200,000 empty messages was split in one go, each handed to the call
    (about 2 us each, all on the one event loop; a body of the largest size held a million), and
    forwarded to the service.  More than MAX_WEB_MESSAGES are refused before the call starts; a
    body of a few messages is still served."""
    started: list[ServerCall] = []

    async def handler(call: ServerCall) -> None:
        started.append(call)
        while (message := await call.read()) is not None:
            call.write(message)

    front = OnePort(handler)
    _, transport = front.connect(_web_post(frame(b"") * 200_000))
    await settle()
    status, headers = http1_head(transport.value())
    assert status == 200
    assert headers["grpc-status"] == str(int(Status.RESOURCE_EXHAUSTED))
    assert "too many request messages" in headers["grpc-message"]
    assert not started
    _, transport = front.connect(_web_post(frame(b"a") + frame(b"b") + frame(b"c")))
    await settle()
    reply = transport.value()
    assert all(frame(m) in reply for m in (b"a", b"b", b"c"))
    assert b"grpc-status: 0" in reply
    assert len(started) == 1
