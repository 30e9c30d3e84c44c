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
