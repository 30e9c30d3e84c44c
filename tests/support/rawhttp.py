"""Raw HTTP/1.1 and HTTP/2 clients for tests that look at bytes on the wire.

gRPC-Web replies are decoded here by hand (frames, trailers in the body,
base64 for ``-text``), and the HTTP/2 client can misbehave on purpose:
withhold flow-control window, send garbage, reset streams.
"""

from __future__ import annotations

import base64
import socket
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings


@dataclass
class WebReply:
    """A decoded gRPC-Web (or plain) HTTP reply."""

    status: int
    headers: dict[str, str]
    body: bytes
    messages: list[bytes] = field(default_factory=list)
    trailers: dict[str, str] = field(default_factory=dict)


def decode_grpc_web_body(body: bytes | bytearray, text: bool) -> tuple[list[bytes], dict[str, str]]:
    """Split a gRPC-Web reply body into messages and the trailer frame."""
    body = bytes(body)
    if text:
        # Chunks may each be padded: decode 4 characters at a time.
        clean = body.replace(b"\r", b"").replace(b"\n", b"")
        body = b"".join(base64.b64decode(clean[i : i + 4]) for i in range(0, len(clean), 4))
    messages: list[bytes] = []
    trailers: dict[str, str] = {}
    offset = 0
    while offset < len(body):
        flag = body[offset]
        length = int.from_bytes(body[offset + 1 : offset + 5], "big")
        payload = body[offset + 5 : offset + 5 + length]
        assert len(payload) == length, "truncated gRPC-Web frame"
        offset += 5 + length
        if flag & 0x80:
            for line in payload.decode().split("\r\n"):
                if line:
                    name, _, value = line.partition(":")
                    trailers[name.strip()] = value.strip()
        else:
            messages.append(payload)
    return messages, trailers


def read_http1_reply(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 reply (content-length or chunked) from ``sock``."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        buf = rest
        while True:
            while b"\r\n" not in buf:
                more = sock.recv(65536)
                if not more:
                    return status, headers, body
                buf += more
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                more = sock.recv(65536)
                if not more:
                    break
                buf += more
            if size == 0:
                return status, headers, body
            body += buf[:size]
            buf = buf[size + 2 :]
    length = int(headers.get("content-length", "0") or 0)
    body = rest
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return status, headers, body[:length] if length else body


def http1_request(
    address: str,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """Send one HTTP/1.1 request on a new connection; return the reply."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {address}", "Connection: close"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return read_http1_reply(sock, timeout)


@dataclass
class H2Reply:
    """What came back on one HTTP/2 stream."""

    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    reset: int | None = None
    ended: bool = False


class H2Client:
    """A minimal blocking HTTP/2 client (prior knowledge) for tests.

    Args:
        address: ``host:port``.
        auto_ack: acknowledge received DATA (grant window) automatically;
            False simulates a client that stops reading.
        window: the initial stream window advertised to the server.
    """

    def __init__(self, address: str, auto_ack: bool = True, window: int | None = None, timeout: float = 10.0) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.auto_ack = auto_ack
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.replies: dict[int, H2Reply] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        end_stream: bool = True,
        method: str = "POST",
    ) -> int:
        """Open a stream with ``headers`` (pseudo-headers added) and ``body``."""
        sid = self.conn.get_next_available_stream_id()
        full = [(":method", method), (":scheme", "http"), (":authority", "test"), (":path", path), *headers]
        self.conn.send_headers(sid, full, end_stream=end_stream and not body)
        if body:
            self.send_data(sid, body, end_stream=end_stream)
        self.replies[sid] = H2Reply()
        self.flush()
        return sid

    def send_data(self, sid: int, body: bytes, end_stream: bool = False) -> None:
        """Send ``body`` in window-sized frames (waits for window when needed)."""
        offset = 0
        while offset < len(body):
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.pump(0.2)
                continue
            chunk = body[offset : offset + window]
            self.conn.send_data(sid, chunk)
            offset += len(chunk)
            self.flush()
        if end_stream:
            self.conn.end_stream(sid)
        self.flush()

    def pump(self, timeout: float = 0.5) -> bool:
        """Read once from the socket and process events; False on timeout or EOF."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        except ConnectionError:
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            sid = getattr(event, "stream_id", None)
            reply = self.replies.get(sid) if sid else None
            if isinstance(event, h2.events.ResponseReceived) and reply is not None:
                reply.headers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.TrailersReceived) and reply is not None:
                reply.trailers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived) and reply is not None:
                reply.data += event.data or b""  # bytearray: no quadratic copying
                if self.auto_ack and event.flow_controlled_length:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and reply is not None:
                reply.ended = True
            elif isinstance(event, h2.events.StreamReset) and reply is not None:
                reply.reset = int(event.error_code or 0)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
        self.flush()
        return True

    def wait(self, sid: int, timeout: float = 10.0) -> H2Reply:
        """Pump until stream ``sid`` ended or was reset (or ``timeout``)."""
        end = time.monotonic() + timeout
        reply = self.replies[sid]
        while not (reply.ended or reply.reset is not None) and time.monotonic() < end and not self.closed:
            self.pump(0.2)
        return reply

    def wait_for_goaway(self, timeout: float = 5.0) -> h2.events.ConnectionTerminated | None:
        """Pump until the server sent GOAWAY or closed (or ``timeout``); the GOAWAY if any."""
        end = time.monotonic() + timeout
        while self.goaway is None and not self.closed and time.monotonic() < end:
            self.pump(0.2)
        return self.goaway

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self.flush()
        except Exception:
            pass
        self.sock.close()


def grpc_headers(
    content_type: str = "application/grpc", extra: list[tuple[str, str]] | None = None
) -> list[tuple[str, str]]:
    """Request headers of a gRPC (or gRPC-Web) call."""
    return [("content-type", content_type), ("te", "trailers"), *(extra or [])]
