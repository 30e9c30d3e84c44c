"""Bad input on the daemon port gets a clear protocol-level error, and the daemon keeps serving.

Each test ends by making an ordinary call, proving the daemon survived.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from pathlib import Path

import grpc
import h2.errors
import pytest

from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon._proto import example_service_pb2_grpc as pb_grpc
from snet_daemon.frontend.wire import frame
from tests.conftest import make_channel
from tests.support.daemon import Daemon
from tests.support.rawhttp import H2Client, decode_grpc_web_body, grpc_headers, read_http1_reply
from tests.support.upstream import Upstream

ECHO = "/example_service.Echo/Unary"


def assert_still_serving(daemon: Daemon) -> None:
    """An ordinary call still succeeds."""
    channel = make_channel(daemon.address)
    try:
        assert pb_grpc.CalculatorStub(channel).add(pb.Numbers(a=20, b=22), timeout=10).value == 42
    finally:
        channel.close()


def _raw(daemon: Daemon, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_garbage_gets_400(daemon: Daemon) -> None:
    """Bytes that are neither HTTP/1.1 nor the HTTP/2 preface get 400 Bad Request."""
    reply = _raw(daemon, b"\x16\x03\x01\x00\xa5garbage that is not http\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")
    assert_still_serving(daemon)


def test_broken_http2_preface(daemon: Daemon) -> None:
    """A preface that starts like HTTP/2 but is wrong is answered as bad HTTP/1.1."""
    reply = _raw(daemon, b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
    assert reply == b"" or reply.startswith(b"HTTP/1.1 4")
    assert_still_serving(daemon)


def test_invalid_http2_frames_get_goaway(daemon: Daemon) -> None:
    """After a valid preface, an invalid frame gets GOAWAY and the connection closes."""
    client = H2Client(daemon.address)
    # A DATA frame on stream 0 is a connection error (PROTOCOL_ERROR).
    client.sock.sendall(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    goaway = client.wait_for_goaway()
    assert goaway is not None
    assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    client.close()
    assert_still_serving(daemon)


def _grpc_raw(
    daemon: Daemon, body: bytes, extra: list[tuple[str, str]] | None = None, path: str = ECHO
) -> dict[str, str]:
    """Send one raw gRPC request over HTTP/2 and return the status fields."""
    client = H2Client(daemon.address)
    try:
        reply = client.wait(client.request(path, grpc_headers(extra=extra), body))
        assert reply.ended, "no response"
        return {**reply.headers, **reply.trailers}
    finally:
        client.close()


def test_truncated_message_is_internal(daemon: Daemon) -> None:
    """A request whose length prefix promises more bytes than arrive is INTERNAL."""
    fields = _grpc_raw(daemon, b"\x00\x00\x00\x00\x64" + b"x" * 10)
    assert fields["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])
    assert "middle of a message" in fields["grpc-message"]
    assert_still_serving(daemon)


def test_compressed_flag_without_encoding_is_internal(daemon: Daemon) -> None:
    """The compressed flag without grpc-encoding is a protocol error (INTERNAL)."""
    fields = _grpc_raw(daemon, b"\x01\x00\x00\x00\x02ab")
    assert fields["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])
    assert "grpc-encoding" in fields["grpc-message"]
    assert_still_serving(daemon)


def test_unsupported_grpc_encoding_is_unimplemented(daemon: Daemon) -> None:
    """An encoding the daemon cannot decompress is UNIMPLEMENTED, with grpc-accept-encoding."""
    fields = _grpc_raw(daemon, frame(b""), [("grpc-encoding", "snappy")])
    assert fields["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    assert "gzip" in fields["grpc-accept-encoding"]


def test_gzip_request_is_accepted(daemon: Daemon) -> None:
    """A gzip-compressed request (grpcio client compression) is decompressed and served."""
    channel = make_channel(daemon.address)
    try:
        reply = pb_grpc.EchoStub(channel).Unary(
            pb.EchoRequest(payload=b"squeeze" * 1000), timeout=10, compression=grpc.Compression.Gzip
        )
        assert reply.payload == b"squeeze" * 1000
    finally:
        channel.close()


def test_malformed_timeout_and_metadata_are_invalid_argument(daemon: Daemon) -> None:
    """A bad grpc-timeout or -bin value is INVALID_ARGUMENT."""
    fields = _grpc_raw(daemon, frame(b""), [("grpc-timeout", "soon")])
    assert fields["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    fields = _grpc_raw(daemon, frame(b""), [("x-sig-bin", "***")])
    assert fields["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert_still_serving(daemon)


def test_malformed_method_name_is_unimplemented(daemon: Daemon) -> None:
    """A path that is not /package.Service/Method is UNIMPLEMENTED."""
    fields = _grpc_raw(daemon, frame(b""), path="/not-a-method")
    assert fields["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    # A long one is shown cut short: the client must not make the status much larger than its request.
    fields = _grpc_raw(daemon, frame(b""), path="/a/b/" + "%" * 4000)
    assert fields["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    assert len(fields["grpc-message"]) < 1000


def test_unknown_method_passes_to_the_service(daemon: Daemon) -> None:
    """A method the service does not have gets the service's own UNIMPLEMENTED."""
    fields = _grpc_raw(daemon, frame(b""), path="/example_service.Echo/Nope")
    assert fields["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])


def test_unknown_content_type_gets_415(daemon: Daemon) -> None:
    """A POST with a content type that is neither gRPC nor gRPC-Web gets 415 (HTTP/2 and HTTP/1.1)."""
    client = H2Client(daemon.address)
    try:
        reply = client.wait(client.request(ECHO, [("content-type", "application/json")], b"{}"))
        assert reply.headers[":status"] == "415"
    finally:
        client.close()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Type: text/xml\r\nContent-Length: 2\r\n\r\n<>")
        status, _, _ = read_http1_reply(sock)
    assert status == 415
    assert_still_serving(daemon)


def test_oversized_headers_http2(daemon: Daemon) -> None:
    """A header block over the limit closes that connection only, with GOAWAY; others keep working."""
    bystander = make_channel(daemon.address)
    calc = pb_grpc.CalculatorStub(bystander)
    assert calc.add(pb.Numbers(a=1, b=1), timeout=10).value == 2
    client = H2Client(daemon.address)
    huge = [(f"x-big-{i}", "v" * 4000) for i in range(40)]
    client.request(ECHO, grpc_headers(extra=huge), frame(b""))
    goaway = client.wait_for_goaway()
    assert goaway is not None, "closed without GOAWAY"
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM  # h2: header list over our limit
    client.close()
    assert calc.add(pb.Numbers(a=2, b=2), timeout=10).value == 4
    bystander.close()


@pytest.mark.parametrize(
    "block",
    [
        b"\x80",  # an indexed field with index 0
        b"\xbe",  # index 62: the dynamic table is empty
        b"\x00\x81\xff\x01v",  # a Huffman-coded name of 8 padding bits
        b"\x00\x05ab",  # a name said to be 5 octets long, with 2
    ],
    ids=["index-0", "empty-table", "huffman-padding", "truncated"],
)
def test_malformed_header_block_is_a_compression_error(daemon: Daemon, block: bytes) -> None:
    """A header block HPACK cannot decode ends that connection with COMPRESSION_ERROR; others keep working."""
    client = H2Client(daemon.address)
    # A HEADERS frame (type 1, END_STREAM | END_HEADERS) on stream 1, written by hand.
    client.sock.sendall(len(block).to_bytes(3, "big") + b"\x01\x05" + (1).to_bytes(4, "big") + block)
    goaway = client.wait_for_goaway()
    assert goaway is not None
    assert goaway.error_code == h2.errors.ErrorCodes.COMPRESSION_ERROR
    client.close()
    assert_still_serving(daemon)


def test_frames_are_limited_to_16_kib(daemon: Daemon) -> None:
    """The front end keeps HTTP/2's default frame size: h2 buffers a header block over up to 64
    CONTINUATION frames, so larger frames would let one connection park 64 MiB."""
    client = H2Client(daemon.address)
    for _ in range(20):
        if not client.pump(0.1):
            break
    assert client.conn.max_outbound_frame_size == 16384
    huge = b"\x00\x01x" + b"\xff\x8f\xfc\x3f"  # a literal with a new name, a value said to be ~1 MB
    header = len(huge).to_bytes(3, "big") + b"\x01\x00" + (1).to_bytes(4, "big")
    client.sock.sendall(header + huge + (32768).to_bytes(3, "big") + b"\x09\x04" + (1).to_bytes(4, "big"))
    client.sock.sendall(b"\x00" * 32768)
    goaway = client.wait_for_goaway()
    assert goaway is not None
    assert goaway.error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR  # a 32 KiB CONTINUATION frame
    client.close()
    assert_still_serving(daemon)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_client_that_does_not_read_cannot_make_the_daemon_buffer(daemon: Daemon) -> None:
    """A client that sends PINGs and never reads the answers: the daemon stops reading it once its
    send buffer is full, instead of queueing the answers in memory (it grew 1:1 with what was
    sent: 70 MB for 67 MB of PINGs)."""
    assert daemon.process is not None
    before = _rss_kib(daemon.process.pid)
    client = H2Client(daemon.address, timeout=2)
    pings = (b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678") * 4000
    sent = 0
    try:
        while sent < 32 << 20:
            client.sock.sendall(pings)
            sent += len(pings)
    except (TimeoutError, OSError):
        pass  # the daemon stopped reading us: the socket buffers filled up
    grown = 0
    for _ in range(10):  # what it did read, it answers at once
        time.sleep(0.1)
        grown = max(grown, _rss_kib(daemon.process.pid) - before)
    client.close()
    assert sent < 32 << 20
    assert grown < 16 * 1024, f"daemon grew by {grown} KiB for {sent} bytes sent"
    assert_still_serving(daemon)


def test_oversized_headers_http1(daemon: Daemon) -> None:
    """An HTTP/1.1 request with huge headers is refused with a 4xx."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        big = b"".join(b"X-Big-%d: %s\r\n" % (i, b"v" * 4000) for i in range(5))
        sock.sendall(b"GET /heartbeat HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n")
        status, _, _ = read_http1_reply(sock)
    assert 400 <= status < 500
    assert_still_serving(daemon)


def _post_http1(daemon: Daemon, content_type: str, body: bytes) -> tuple[int, dict[str, str]]:
    """POST ``body`` to the Echo method over HTTP/1.1; the reply's status and headers."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        head = (
            f"POST {ECHO} HTTP/1.1\r\nHost: a\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        sock.sendall(head + body)
        status, headers, _ = read_http1_reply(sock, 30)
    return status, headers


def test_oversized_grpc_web_body(daemon: Daemon) -> None:
    """A gRPC-Web body over the message limit is RESOURCE_EXHAUSTED, without buffering it."""
    status, headers = _post_http1(daemon, "application/grpc-web", frame(b"x" * (5 * 1024 * 1024)))
    assert status == 200
    assert headers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    assert_still_serving(daemon)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_LIMIT_BODY = (4 * 1024 * 1024 + 5) * 4 // 3  # about the largest HTTP/1.1 body the daemon takes in
_PART = b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n'


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b"&".join(b"%d=" % i for i in range(10**6))[:_LIMIT_BODY]),
        ("multipart/form-data; boundary=b", _PART * ((_LIMIT_BODY - 16) // len(_PART)) + b"--b--\r\n"),
        ("application/grpc-web-text", b"AA==" + base64.b64encode(b"x" * (_LIMIT_BODY // 4 * 3 - 3))),
        ("application/grpc-web-text", b"AA==" * (_LIMIT_BODY // 4)),
        ("application/grpc-web", frame(b"") * (_LIMIT_BODY // 5)),
    ],
    ids=["urlencoded", "multipart", "grpc-web-text-padding", "grpc-web-text-all-padding", "grpc-web-empty-messages"],
)
def test_a_large_body_costs_the_daemon_little_cpu(daemon: Daemon, content_type: str, body: bytes) -> None:
    """No payment is needed to send these; they must not hold the one event loop.  Form bodies
    were parsed by twisted.web before anything looked at them (0.6-0.8 s of CPU here for the
    urlencoded one, 1.3 s for the multipart one), and a padded group early in a grpc-web-text
    body made it decode 4 characters at a time (0.40 s; 0.03 s now), and a body of nothing but
    padded groups still cost a decode call per group (0.36 s; it is refused early now), and a body
    of a million empty messages was split in one go (4 s; more than MAX_WEB_MESSAGES are refused)."""
    assert daemon.process is not None
    before = _cpu_seconds(daemon.process.pid)
    _post_http1(daemon, content_type, body)
    spent = _cpu_seconds(daemon.process.pid) - before
    assert spent < 0.2, f"{spent:.2f} s of daemon CPU for one {len(body)}-byte {content_type} body"
    assert_still_serving(daemon)


def test_slow_reader_does_not_make_the_daemon_buffer(daemon: Daemon, upstream: Upstream) -> None:
    """A client that stops reading pauses the service's stream instead of filling the daemon's memory."""
    upstream.record.reset()
    rss_before = daemon.rss_kib()
    client = H2Client(daemon.address, auto_ack=False)
    total = 200
    request = pb.EchoRequest(repeat=total, reply_size=256 * 1024)
    sid = client.request("/example_service.Echo/ServerStream", grpc_headers(), frame(request.SerializeToString()))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        client.pump(0.2)
    sent_while_stalled = upstream.record.replies_sent
    growth_mib = (daemon.rss_kib() - rss_before) / 1024
    # 200 replies x 256 KiB = 50 MiB would be buffered without backpressure.
    assert sent_while_stalled < total / 2, sent_while_stalled
    assert growth_mib < 30, growth_mib
    assert_still_serving(daemon)
    # Once the client reads again, the rest of the stream flows.
    client.auto_ack = True
    client.conn.increment_flow_control_window(64 * 1024 * 1024)
    client.conn.increment_flow_control_window(64 * 1024 * 1024, sid)
    client.flush()
    reply = client.wait(sid, timeout=60)
    assert reply.ended
    assert reply.trailers.get("grpc-status") == "0"
    messages, _ = decode_grpc_web_body(reply.data, text=False)
    assert [pb.EchoReply.FromString(m).index for m in messages] == list(range(total))
    client.close()


def test_rapid_reset_closes_the_connection(daemon: Daemon) -> None:
    """A client opening and resetting streams in a flood is sent GOAWAY(ENHANCE_YOUR_CALM) and
    disconnected (CVE-2023-44487).  The GOAWAY must arrive: the daemon drops what the client still
    sends instead of closing with it unread, which would reset the connection and lose it."""
    client = H2Client(daemon.address)
    for _ in range(3000):
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            sid,
            [(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", ECHO), *grpc_headers()],
        )
        client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    try:
        client.flush()
    except OSError:
        pass
    goaway = client.wait_for_goaway()
    assert goaway is not None, "closed without GOAWAY"
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    client.close()
    assert_still_serving(daemon)


@pytest.mark.parametrize("junk", [b"\x00" * 100, b"GET / HTTP/1.1\r\n" * 3, b"\r\n\r\n\r\n"])
def test_assorted_junk(daemon: Daemon, junk: bytes) -> None:
    """Assorted junk never takes the daemon down."""
    try:
        _raw(daemon, junk)
    except OSError:
        pass
    assert_still_serving(daemon)
