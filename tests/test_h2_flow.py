"""Request flow control of the front end, frame by frame (tests/support/h2pair.py)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import h2.errors
import h2.events
import h2.settings
import pytest

from snet_daemon.frontend.call import Handler, ServerCall
from snet_daemon.frontend.status import Status
from tests.support.aio import aio_test
from tests.support.h2pair import H2Pair
from tests.support.oneport import METADATA_CALLS, metadata_handler

_GRPC = [("content-type", "application/grpc"), ("te", "trailers")]


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
        assert protocol is not None
        protocol.makeConnection(transport)
        if data:
            protocol.dataReceived(data)
    await asyncio.sleep(0.2)
    assert stalled.disconnecting
    assert not speaking.disconnecting


def _goaway(pair: H2Pair) -> h2.events.ConnectionTerminated | None:
    """The GOAWAY the server sent, if any (after delivering what it wrote)."""
    pair.to_client()
    found = [event for event in pair.events if isinstance(event, h2.events.ConnectionTerminated)]
    return found[0] if found else None


@aio_test
async def test_an_idle_connection_is_sent_goaway_and_closed() -> None:
    """A client that sent the preface and then only PINGs held its connection, and a file
    descriptor, for ever (the sniffing timeout ends with the preface).  After ``idle_timeout``
    without a stream it gets GOAWAY(NO_ERROR) and is closed; PINGs are not use."""

    async def handler(call: ServerCall) -> None:
        pass

    pair = H2Pair(handler, idle_timeout=0.2)
    for _ in range(40):  # PINGs every 50 ms would keep it open for ever, or 2 s here
        await asyncio.sleep(0.05)
        if pair.transport.disconnecting:
            break
        pair.client.ping(b"12345678")
        pair.pump()
    goaway = _goaway(pair)
    assert goaway is not None
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == 0
    assert pair.transport.disconnecting


@aio_test
async def test_the_idle_period_starts_when_the_last_stream_ends() -> None:
    """A connection with a call open is not idle however long the call takes; once the last
    stream ends, the connection is closed a whole idle period later, not at once."""
    release = asyncio.Event()

    async def handler(call: ServerCall) -> None:
        await release.wait()
        call.write(b"done")

    pair = H2Pair(handler, idle_timeout=0.3)
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_headers(
        sid,
        [(":method", "POST"), (":scheme", "http"), (":authority", "t"), (":path", "/p.S/M"), *_GRPC],
    )
    pair.client.send_data(sid, b"\x00\x00\x00\x00\x00", end_stream=True)
    pair.pump()
    await asyncio.sleep(0.7)
    assert _goaway(pair) is None
    release.set()
    for _ in range(5):
        await asyncio.sleep(0)
        pair.pump()
    assert any(isinstance(event, h2.events.StreamEnded) for event in pair.events)
    await asyncio.sleep(0.05)
    assert _goaway(pair) is None
    assert not pair.transport.disconnecting
    await asyncio.sleep(0.6)
    goaway = _goaway(pair)
    assert goaway is not None
    assert goaway.last_stream_id == sid
    assert pair.transport.disconnecting


def _browser_post(pair: H2Pair, path: str, content_type: str) -> int:
    """Open a POST stream to ``path`` as a page on another origin does; its stream id."""
    sid: int = pair.client.get_next_available_stream_id()
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "t"), (":path", path)]
    headers += [("content-type", content_type), ("origin", "https://app.example")]
    pair.client.send_headers(sid, headers)
    return sid


@aio_test
async def test_response_metadata_is_exposed_to_browser_scripts() -> None:
    """gRPC-Web over HTTP/2 lists the names of the metadata it sends (initial, or of a
    trailers-only error) in Access-Control-Expose-Headers, or browsers hide them."""

    pair = H2Pair(metadata_handler)
    sids = {}
    for path, name in METADATA_CALLS:
        sid = _browser_post(pair, path, "application/grpc-web")
        pair.client.send_data(sid, b"\x00\x00\x00\x00\x00", end_stream=True)
        sids[sid] = name
    for _ in range(10):
        await asyncio.sleep(0)
        pair.pump()
    for event in pair.events:
        if isinstance(event, h2.events.ResponseReceived) and event.stream_id in sids:
            headers: dict[str, str] = dict(event.headers or ())  # type: ignore[arg-type]
            name = sids.pop(event.stream_id)
            assert name in headers
            exposed = {n.strip() for n in str(headers["access-control-expose-headers"]).split(",")}
            assert name in exposed, headers
    assert not sids


@aio_test
async def test_an_unsupported_content_type_is_refused_with_cors() -> None:
    """The 415 for a POST that is neither gRPC nor gRPC-Web carried no CORS headers, so a page
    saw an opaque network error."""

    async def handler(call: ServerCall) -> None:
        pass

    pair = H2Pair(handler)
    sid = _browser_post(pair, "/p.S/M", "application/json")
    pair.client.end_stream(sid)
    pair.pump()
    replies = [event for event in pair.events if isinstance(event, h2.events.ResponseReceived)]
    headers: dict[str, str] = dict(replies[0].headers or ())  # type: ignore[arg-type]
    assert headers[":status"] == "415"
    assert headers["access-control-allow-origin"] == "*"


def _headers(pair: H2Pair, path: str) -> int:
    """Send the headers of a gRPC call on ``path`` (no body yet); its stream id."""
    sid: int = pair.client.get_next_available_stream_id()
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "t"), (":path", path), *_GRPC]
    pair.client.send_headers(sid, headers)
    return sid


def _open(pair: H2Pair, path: str, body: bytes = b"\x00\x00\x00\x00\x00") -> int:
    """Start a gRPC call on ``path`` with one request message; its stream id."""
    sid = _headers(pair, path)
    pair.client.send_data(sid, body, end_stream=True)
    return sid


async def _turns(pair: H2Pair, count: int = 10) -> None:
    """Let handlers run and deliver what each side sends, ``count`` times."""
    for _ in range(count):
        await asyncio.sleep(0)
        pair.pump()


def _trailers(pair: H2Pair, sid: int) -> dict[str, str]:
    """The trailers (or trailers-only headers) stream ``sid`` ended with, if it did."""
    for event in pair.events:
        ends = isinstance(event, (h2.events.TrailersReceived, h2.events.ResponseReceived)) and event.stream_ended
        if ends and event.stream_id == sid:
            return dict(event.headers or ())
    return {}


async def _three_replies(call: ServerCall) -> None:
    await call.read()
    for _ in range(3):
        call.write(b"x" * 5000)
        await call.drain()


async def _blocked_calls(handler: Handler, *paths: str) -> tuple[H2Pair, list[int]]:
    """Calls on ``paths`` whose replies wait for window (the client grants 1000 bytes a stream)."""
    pair = H2Pair(handler)
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    pair.pump()
    sids = [_open(pair, path) for path in paths]
    await _turns(pair)
    return pair, sids


@aio_test
async def test_a_window_update_and_a_reset_in_one_read_end_only_that_stream() -> None:
    """h2 parses a whole read before we see its events: a WINDOW_UPDATE for a stream whose replies
    wait for window, then the RST_STREAM of that stream, made us send on a stream h2 had closed.
    The StreamClosedError dropped the connection, and every other call on it; now that stream is
    simply gone."""
    pair, (bystander, victim) = await _blocked_calls(_three_replies, "/p.S/Stream", "/p.S/Stream")
    assert not _trailers(pair, bystander)  # both wait for window
    pair.client.increment_flow_control_window(500, victim)
    pair.client.reset_stream(victim, h2.errors.ErrorCodes.CANCEL)
    pair.to_server()  # one read
    assert not pair.transport.disconnecting
    pair.client.increment_flow_control_window(1 << 20, bystander)
    pair.client.increment_flow_control_window(1 << 20)
    await _turns(pair)
    assert _trailers(pair, bystander).get("grpc-status") == "0"
    assert not pair.transport.disconnecting


@aio_test
async def test_an_error_handling_one_stream_ends_only_that_stream() -> None:
    """An exception while handling one stream's event (here the relay's callback run by a window
    update) left dataReceived, and Twisted dropped the connection with every call on it; now that
    stream alone is reset."""

    def broken() -> None:
        raise RuntimeError("a bug in a relay")

    async def handler(call: ServerCall) -> None:
        await _three_replies(call)
        if call.method == "/p.S/Broken":
            call.on_writable = broken
            await asyncio.Event().wait()  # a call that goes on: a stream still open

    pair, (victim, bystander) = await _blocked_calls(handler, "/p.S/Broken", "/p.S/Stream")
    pair.client.increment_flow_control_window(1 << 20, victim)
    pair.client.increment_flow_control_window(1 << 20)
    pair.to_server()
    pair.to_client()
    assert any(isinstance(e, h2.events.StreamReset) and e.stream_id == victim for e in pair.events)
    pair.client.increment_flow_control_window(1 << 20, bystander)
    await _turns(pair)
    assert _trailers(pair, bystander).get("grpc-status") == "0"
    assert not pair.transport.disconnecting


async def _one_reply(call: ServerCall) -> None:
    await call.read()
    call.write(b"x" * 5000)


def _count_drains(pair: H2Pair) -> list[int]:
    """Count the server's attempts to send waiting replies (one per stream woken)."""
    drains = [0]
    drain = pair.server._drain

    def counting(stream: Any) -> None:
        drains[0] += 1
        drain(stream)

    pair.server._drain = counting  # type: ignore[method-assign]
    return drains


@aio_test
async def test_a_connection_window_update_wakes_only_what_it_lets_send() -> None:
    """Each WINDOW_UPDATE for the connection tried every stream waiting for window: with 100 replies
    waiting, 100 steps per 13-byte frame a client sends (460 us per frame with 1000).  Now the
    streams stopped by their own windows are not woken by it, and the walk ends when the
    connection window is used up."""
    pair = H2Pair(_one_reply)
    sids = [_open(pair, "/p.S/M") for _ in range(100)]
    await _turns(pair)
    ended = [sid for sid in sids if _trailers(pair, sid)]
    assert 5 < len(ended) < 20  # the rest wait for the connection window (64 KiB)
    drains = _count_drains(pair)
    for _ in range(1000):
        pair.client.increment_flow_control_window(1)
    pair.to_server()
    assert drains[0] <= 1000 + 100
    # Streams stopped by their own windows (0 here), then connection updates: no stream is tried.
    pair = H2Pair(_one_reply)
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    pair.pump()
    for _ in range(100):
        _open(pair, "/p.S/M")
    await _turns(pair)
    drains = _count_drains(pair)
    for _ in range(1000):
        pair.client.increment_flow_control_window(1000)
    pair.to_server()
    assert drains[0] == 0
    assert not pair.transport.disconnecting


async def _waiting_replies(**limits: Any) -> tuple[H2Pair, list[int]]:
    """100 calls whose replies wait: the client grants each stream no window at all."""
    pair = H2Pair(_one_reply, **limits)
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    pair.pump()
    sids = [_open(pair, "/p.S/M") for _ in range(100)]
    await _turns(pair)
    return pair, sids


@aio_test
async def test_settings_that_change_nothing_wake_nothing_and_a_flood_of_them_is_refused() -> None:
    """Every SETTINGS frame, even an empty one, tried every stream waiting for window.  Now only
    one that grows INITIAL_WINDOW_SIZE wakes them, and a client flooding frames that change
    nothing gets GOAWAY(ENHANCE_YOUR_CALM), as one resetting streams too fast does."""
    pair, _ = await _waiting_replies(max_control_frames_per_second=20)
    drains = _count_drains(pair)
    for _ in range(50):
        pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    pair.to_server()
    assert drains[0] == 0
    assert _goaway(pair) is None
    for _ in range(100):
        pair.client.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384})
    pair.to_server()
    goaway = _goaway(pair)
    assert goaway is not None
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert drains[0] == 0


@aio_test
async def test_settings_that_grow_the_stream_window_release_the_waiting_replies() -> None:
    """A client that grows INITIAL_WINDOW_SIZE (as gRPC's window tuning does) gets the replies
    that waited for it."""
    pair, sids = await _waiting_replies()
    assert not any(_trailers(pair, sid) for sid in sids)
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    pair.client.increment_flow_control_window(1 << 20)
    await _turns(pair)
    assert all(_trailers(pair, sid).get("grpc-status") == "0" for sid in sids)
    assert _goaway(pair) is None


@aio_test
async def test_a_flood_of_empty_data_frames_is_refused() -> None:
    """Empty DATA frames change nothing and have no flow control (CVE-2019-9518): a client
    sending them without end gets GOAWAY(ENHANCE_YOUR_CALM)."""

    async def handler(call: ServerCall) -> None:
        await asyncio.Event().wait()

    pair = H2Pair(handler, max_control_frames_per_second=20)
    sid = _headers(pair, "/p.S/M")
    for _ in range(150):
        pair.client.send_data(sid, b"")
    pair.to_server()
    goaway = _goaway(pair)
    assert goaway is not None
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


@aio_test
async def test_requests_whose_headers_carry_a_priority_do_not_spend_the_control_budget() -> None:
    """Browsers set a priority in every request's HEADERS, which h2 also reports as a
    PriorityUpdated: 150 such calls against a budget of 20 a second (100 at once) all complete,
    while 150 PRIORITY frames of their own get GOAWAY(ENHANCE_YOUR_CALM)."""
    finished = 0

    async def handler(call: ServerCall) -> None:
        nonlocal finished
        finished += 1

    pair = H2Pair(handler, max_control_frames_per_second=20)
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "t"), (":path", "/p.S/M"), *_GRPC]
    for _ in range(150):
        sid = pair.client.get_next_available_stream_id()
        pair.client.send_headers(sid, headers, priority_weight=220, priority_depends_on=0, priority_exclusive=True)
        pair.client.send_data(sid, b"\x00\x00\x00\x00\x00", end_stream=True)
        pair.to_server()
        await asyncio.sleep(0)
        pair.to_client()
    assert _goaway(pair) is None
    assert finished == 150

    pair = H2Pair(handler, max_control_frames_per_second=20)
    sid = _headers(pair, "/p.S/M")
    for _ in range(150):
        pair.client.prioritize(sid, weight=220)
    pair.to_server()
    goaway = _goaway(pair)
    assert goaway is not None
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def _protocol_error(pair: H2Pair) -> None:
    # WINDOW_UPDATE(0) with an increment of 0: a connection error (PROTOCOL_ERROR).
    pair.server.dataReceived(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x00")


def _client_goaway(pair: H2Pair) -> None:
    # With an error: the client is done with the connection (a graceful one
    # lets the calls finish: test_a_clients_graceful_goaway_lets_its_calls_finish).
    pair.client.close_connection(error_code=h2.errors.ErrorCodes.INTERNAL_ERROR)
    pair.to_server()


def _rapid_reset(pair: H2Pair) -> None:
    for _ in range(20):
        pair.client.reset_stream(_headers(pair, "/p.S/M"), h2.errors.ErrorCodes.CANCEL)
    pair.to_server()


@pytest.mark.parametrize(
    ("trigger", "code"),
    [
        (_protocol_error, h2.errors.ErrorCodes.PROTOCOL_ERROR),
        (_client_goaway, None),
        (_rapid_reset, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM),
    ],
    ids=["protocol-error", "client-goaway", "rapid-reset"],
)
@aio_test
async def test_a_connection_given_up_cancels_its_calls_and_is_aborted_if_it_lingers(
    trigger: Any, code: int | None
) -> None:
    """After a protocol error, a flood, or the client's GOAWAY, the connection was only closed
    politely: a client that did not read kept it, and its calls and their upstream calls ran on
    until the deadline it chose.  Now the calls are cancelled at once, and a connection that has
    not closed abort_grace seconds later is aborted."""
    calls: list[ServerCall] = []

    async def handler(call: ServerCall) -> None:
        calls.append(call)
        await asyncio.Event().wait()

    pair = H2Pair(handler, abort_grace=0.05, max_resets_per_second=1)
    aborted: list[bool] = []
    pair.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    _open(pair, "/p.S/Long")
    await _turns(pair)
    assert len(calls) == 1
    trigger(pair)
    assert calls[0].cancelled
    if code is not None:
        goaway = _goaway(pair)
        assert goaway is not None
        assert goaway.error_code == code
    assert pair.transport.disconnecting
    pair.to_client()
    pair.server.dataReceived(pair.client.data_to_send() or b"junk")  # dropped unread
    for _ in range(3):
        await asyncio.sleep(0)
    assert pair.transport.value() == b""  # nothing after the GOAWAY
    assert not aborted
    await asyncio.sleep(0.1)
    assert aborted
    assert calls[0].task is not None
    assert calls[0].task.done()
    assert len(calls) == 1  # the streams of the rapid reset never started


@aio_test
async def test_a_clients_graceful_goaway_lets_its_calls_finish() -> None:
    """A client shutting its channel down gracefully (grpc-java, Netty) sends GOAWAY(NO_ERROR) and
    waits for its running calls.  They were cancelled (h2 could send nothing after a GOAWAY it
    received); now they answer, a stream opened after the GOAWAY is refused, and the connection
    closes once the calls are done."""
    from hyperframe.frame import GoAwayFrame

    release = asyncio.Event()

    async def handler(call: ServerCall) -> None:
        await release.wait()
        call.write(b"done")

    pair = H2Pair(handler)
    first = _open(pair, "/p.S/Slow")
    second = _open(pair, "/p.S/Slow")
    await _turns(pair)
    pair.to_server()
    # Sent beside the client's h2, which would take no reply after its own GOAWAY.
    pair.server.dataReceived(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
    late = _open(pair, "/p.S/Slow")
    await _turns(pair)
    assert any(isinstance(e, h2.events.StreamReset) and e.stream_id == late for e in pair.events)
    assert not pair.transport.disconnecting
    release.set()
    await _turns(pair)
    for sid in (first, second):
        assert _trailers(pair, sid).get("grpc-status") == "0"
        replies = [e.data for e in pair.events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid]
        assert b"".join(replies) == b"\x00\x00\x00\x00\x04done"
    assert pair.transport.disconnecting


@pytest.mark.parametrize("goaway", ["client", "ours"])
@aio_test
async def test_a_closing_connection_closes_when_its_last_call_is_reset(goaway: str) -> None:
    """After a GOAWAY (the client's graceful one, or our own shutdown), the client cancelling its
    last call left the connection open until the idle timer aborted it: only a call that ended
    closed it.  Now a reset one does too."""
    from hyperframe.frame import GoAwayFrame

    async def handler(call: ServerCall) -> None:
        await asyncio.Event().wait()

    pair = H2Pair(handler)
    sid = _open(pair, "/p.S/Slow")
    await _turns(pair)
    if goaway == "client":
        pair.server.dataReceived(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
    else:
        pair.server.shutdown()
    assert not pair.transport.disconnecting
    pair.client.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    await _turns(pair)
    assert pair.transport.disconnecting


async def _echo_sizes(call: ServerCall) -> None:
    while (message := await call.read()) is not None:
        call.write(str(len(message)).encode())


def _start_message(pair: H2Pair, length: int, sent: int) -> int:
    """Open a call and send the first ``sent`` bytes of a message of ``length`` bytes."""
    sid = _headers(pair, "/p.S/Up")
    data = b"\x00" + length.to_bytes(4, "big") + b"x" * (sent - 5)
    for offset in range(0, len(data), 16 * 1024):
        pair.client.send_data(sid, data[offset : offset + 16 * 1024])
    pair.to_server()
    return sid


@aio_test
async def test_unfinished_messages_on_a_connection_are_bounded() -> None:
    """Bytes of a message still arriving are acknowledged at once, so flow control did not bound
    them: a client announcing a large message on each of 1000 streams, and never finishing one,
    made the daemon hold 1000 times the message size (4 GiB by default).  The stream whose bytes
    take the connection over its budget fails with RESOURCE_EXHAUSTED, and its bytes are freed."""
    pair = H2Pair(_echo_sizes, max_message_size=64 * 1024, max_unfinished_bytes=256 * 1024)
    await _turns(pair)
    sids = [_start_message(pair, 60 * 1024, 40 * 1024) for _ in range(10)]
    await _turns(pair)
    failed = [sid for sid in sids if _trailers(pair, sid).get("grpc-status") == str(int(Status.RESOURCE_EXHAUSTED))]
    assert failed == sids[6:]  # 6 x 40 KiB fit in 256 KiB; each later one went over
    assert "unfinished request messages" in _trailers(pair, failed[0])["grpc-message"]
    assert pair.server._unfinished == 6 * 40 * 1024
    # Streams that finish their messages free their share, and are served.
    rest = b"x" * (20 * 1024 + 5)
    for sid in sids[:6]:
        pair.client.send_data(sid, rest[:16384])
        pair.client.send_data(sid, rest[16384:], end_stream=True)
    await _turns(pair)
    assert pair.server._unfinished == 0
    for sid in sids[:6]:
        assert _trailers(pair, sid).get("grpc-status") == "0"
    assert not pair.transport.disconnecting


@aio_test
async def test_a_message_larger_than_the_windows_still_arrives() -> None:
    """The budget leaves large messages alone: one of 3 MiB, three times the stream window, still
    arrives whole."""
    pair = H2Pair(_echo_sizes)
    size = 3 * 1024 * 1024
    sid = _start_message(pair, size, 16 * 1024)
    left = size + 5 - 16 * 1024
    while left:
        window = min(pair.client.local_flow_control_window(sid), pair.client.max_outbound_frame_size, left)
        assert window > 0, "the window was not given back"
        pair.client.send_data(sid, b"x" * window)
        left -= window
        pair.pump()
    pair.client.end_stream(sid)
    await _turns(pair)
    assert _trailers(pair, sid).get("grpc-status") == "0"
    replies = b"".join(e.data for e in pair.events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)
    assert replies[5:] == str(size).encode()
