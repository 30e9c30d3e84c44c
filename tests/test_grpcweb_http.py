"""gRPC-Web and plain HTTP on the daemon port, decoded from the raw replies.

gRPC-Web is exercised over HTTP/1.1 and HTTP/2, binary and ``-text``,
unary and server-streaming, the way browsers' gRPC-Web libraries send it.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon.frontend.wire import frame
from tests.support.daemon import Daemon
from tests.support.rawhttp import H2Client, decode_grpc_web_body, grpc_headers, http1_request
from tests.support.upstream import Upstream

ORIGIN = "https://app.example.com"


def _web_body(message: bytes, text: bool) -> bytes:
    body = frame(message)
    return base64.b64encode(body) if text else body


def _web_call_http1(
    daemon: Daemon, method: str, request: pb.EchoRequest, text: bool, extra: dict[str, str] | None = None
) -> tuple[int, dict[str, str], list[bytes], dict[str, str]]:
    content_type = "application/grpc-web-text" if text else "application/grpc-web+proto"
    status, headers, body = http1_request(
        daemon.address,
        "POST",
        method,
        {"content-type": content_type, "x-grpc-web": "1", "origin": ORIGIN, **(extra or {})},
        _web_body(request.SerializeToString(), text),
    )
    messages, trailers = decode_grpc_web_body(body, text)
    return status, headers, messages, trailers


@pytest.mark.parametrize("text", [False, True])
def test_grpc_web_unary_http1(daemon: Daemon, text: bool) -> None:
    """A gRPC-Web unary call over HTTP/1.1 returns the message and trailers in the body."""
    status, headers, messages, trailers = _web_call_http1(
        daemon, "/example_service.Echo/Unary", pb.EchoRequest(payload=b"web"), text
    )
    assert status == 200
    assert headers["content-type"].startswith("application/grpc-web")
    assert [pb.EchoReply.FromString(m).payload for m in messages] == [b"web"]
    assert trailers["grpc-status"] == "0"
    assert trailers["x-echo-trailer"] == "yes"
    assert headers["x-echo-initial"] == "yes"
    assert headers["access-control-allow-origin"] == "*"
    assert "grpc-status" in headers["access-control-expose-headers"]


@pytest.mark.parametrize("text", [False, True])
def test_grpc_web_server_streaming_http1(daemon: Daemon, text: bool) -> None:
    """A server-streaming gRPC-Web call over HTTP/1.1 streams every reply, then trailers."""
    status, headers, messages, trailers = _web_call_http1(
        daemon, "/example_service.Echo/ServerStream", pb.EchoRequest(payload=b"s", repeat=7), text
    )
    assert status == 200
    assert headers.get("transfer-encoding") == "chunked"
    assert [pb.EchoReply.FromString(m).index for m in messages] == list(range(7))
    assert trailers["grpc-status"] == "0"


def test_grpc_web_metadata_reaches_the_service(daemon: Daemon, upstream: Upstream) -> None:
    """gRPC-Web request headers become call metadata; browser headers do not."""
    upstream.record.reset()
    sig = base64.b64encode(b"\x01\x02\x03").decode()
    _web_call_http1(
        daemon,
        "/example_service.Echo/Unary",
        pb.EchoRequest(),
        False,
        {"snet-payment-type": "escrow", "snet-payment-channel-signature-bin": sig},
    )
    seen = dict(upstream.record.metadata[-1])
    assert seen["snet-payment-type"] == "escrow"
    assert seen["snet-payment-channel-signature-bin"] == b"\x01\x02\x03"
    assert "origin" not in seen
    assert "x-grpc-web" not in seen


def test_grpc_web_error_is_trailers_only(daemon: Daemon) -> None:
    """A gRPC-Web call failing before any reply carries its status in the HTTP headers."""
    status, headers, messages, trailers = _web_call_http1(
        daemon, "/example_service.Echo/Unary", pb.EchoRequest(fail_code=5, fail_message="gone"), False
    )
    assert status == 200
    assert messages == []
    combined = {**headers, **trailers}
    assert combined["grpc-status"] == "5"
    assert combined["grpc-message"] == "gone"


@pytest.mark.parametrize("text", [False, True])
@pytest.mark.parametrize("method", ["/example_service.Echo/Unary", "/example_service.Echo/ServerStream"])
def test_grpc_web_over_http2(daemon: Daemon, text: bool, method: str) -> None:
    """gRPC-Web over HTTP/2: messages and the trailer frame in DATA, binary and text."""
    client = H2Client(daemon.address)
    try:
        content_type = "application/grpc-web-text+proto" if text else "application/grpc-web+proto"
        request = pb.EchoRequest(payload=b"h2web", repeat=3)
        sid = client.request(
            method,
            [("content-type", content_type), ("x-grpc-web", "1"), ("origin", ORIGIN)],
            _web_body(request.SerializeToString(), text),
        )
        reply = client.wait(sid)
        assert reply.ended
        assert reply.headers[":status"] == "200"
        assert reply.headers["content-type"] == content_type
        assert reply.headers["access-control-allow-origin"] == "*"
        messages, trailers = decode_grpc_web_body(reply.data, text)
        expected = 3 if method.endswith("ServerStream") else 1
        assert [pb.EchoReply.FromString(m).payload for m in messages] == [b"h2web"] * expected
        assert trailers["grpc-status"] == "0"
        assert not reply.trailers  # gRPC-Web never uses HTTP trailers
    finally:
        client.close()


def test_cors_preflight_http1(daemon: Daemon) -> None:
    """An OPTIONS preflight from a browser is granted with the requested headers."""
    status, headers, _ = http1_request(
        daemon.address,
        "OPTIONS",
        "/example_service.Echo/Unary",
        {
            "origin": ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,x-grpc-web,snet-payment-type",
        },
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == "*"
    assert headers["access-control-allow-headers"] == "content-type,x-grpc-web,snet-payment-type"
    assert "POST" in headers["access-control-allow-methods"]


def test_cors_allowed_origins_are_enforced(upstream: Upstream, workdir: Path) -> None:
    """With cors_allowed_origins set, listed origins are reflected and others refused."""
    config = {"service_endpoint": upstream.endpoint, "cors_allowed_origins": [ORIGIN]}
    with Daemon(workdir, config) as daemon:
        status, headers, _messages, trailers = _web_call_http1(
            daemon, "/example_service.Echo/Unary", pb.EchoRequest(payload=b"ok"), False
        )
        assert status == 200
        assert trailers["grpc-status"] == "0"
        assert headers["access-control-allow-origin"] == ORIGIN
        status, _, _ = http1_request(
            daemon.address,
            "POST",
            "/example_service.Echo/Unary",
            {"content-type": "application/grpc-web", "origin": "https://evil.example"},
            frame(b""),
        )
        assert status == 403
        status, headers, _ = http1_request(
            daemon.address,
            "OPTIONS",
            "/x.Y/Z",
            {"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert status == 403
        assert "access-control-allow-origin" not in headers


def test_heartbeat_http1(daemon: Daemon) -> None:
    """GET /heartbeat returns the Go daemon's JSON fields, Online while the service is up."""
    status, headers, body = http1_request(daemon.address, "GET", "/heartbeat")
    assert status == 200
    assert headers["content-type"] == "application/json"
    report = json.loads(body)
    for key in (
        "daemonID",
        "timestamp",
        "status",
        "serviceheartbeat",
        "daemonVersion",
        "blockchainEnabled",
        "blockchainNetwork",
    ):
        assert key in report
    assert report["status"] == "Online"
    assert report["blockchainEnabled"] is False
    assert json.loads(report["serviceheartbeat"]) == {"serviceID": "YOUR_SERVICE_ID", "status": "SERVING"}
    assert len(report["daemonID"]) == 64


def test_heartbeat_reports_offline_service(workdir: Path) -> None:
    """When the service does not accept connections the heartbeat says Offline."""
    with Daemon(workdir, {"service_endpoint": "http://127.0.0.1:1"}) as daemon:
        status, _, body = http1_request(daemon.address, "GET", "/heartbeat")
        report = json.loads(body)
        assert status == 200
        assert report["status"] == "Offline"
        assert json.loads(report["serviceheartbeat"])["status"] == "NOT_SERVING"


class _Health(BaseHTTPRequestHandler):
    """A health URL answering ``status`` (a class attribute the test changes)."""

    status = 503

    def do_GET(self) -> None:
        body = b"OK" if self.status == 200 else b"down"
        self.send_response(self.status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_http_heartbeat_type_gets_the_health_url(upstream: Upstream, workdir: Path) -> None:
    """service_heartbeat_type http GETs heartbeat_endpoint: 503 is NOT_SERVING although the port
    accepts connections, 200 with a body is SERVING (a TCP connect would call both serving)."""
    health = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=health.serve_forever, daemon=True).start()
    config = {
        "service_endpoint": upstream.endpoint,
        "service_heartbeat_type": "http",
        "heartbeat_endpoint": f"http://127.0.0.1:{health.server_address[1]}/health",
    }
    try:
        with Daemon(workdir, config) as daemon:
            _Health.status = 503
            report = json.loads(http1_request(daemon.address, "GET", "/heartbeat")[2])
            assert json.loads(report["serviceheartbeat"])["status"] == "NOT_SERVING"
            assert report["status"] == "Offline"
            _Health.status = 200
            time.sleep(1.1)  # past the heartbeat's probe cache
            report = json.loads(http1_request(daemon.address, "GET", "/heartbeat")[2])
            assert json.loads(report["serviceheartbeat"])["status"] == "SERVING"
            assert report["status"] == "Online"
    finally:
        health.shutdown()
        health.server_close()


def test_encoding_and_not_found_http1(daemon: Daemon) -> None:
    """/encoding answers "proto"; unknown paths 404; HEAD has no body."""
    assert http1_request(daemon.address, "GET", "/encoding")[::2] == (200, b"proto\n")
    status, _, body = http1_request(daemon.address, "GET", "/no/such/page")
    assert (status, body) == (404, b"404 page not found\n")
    status, _headers, body = http1_request(daemon.address, "HEAD", "/heartbeat")
    assert status == 200
    assert body == b""


def test_plain_http_over_http2(daemon: Daemon) -> None:
    """Heartbeat, encoding and 404 answer over cleartext HTTP/2 as well."""
    client = H2Client(daemon.address)
    try:
        beat = client.wait(client.request("/heartbeat", [], method="GET"))
        assert beat.headers[":status"] == "200"
        assert json.loads(beat.data)["status"] == "Online"
        enc = client.wait(client.request("/encoding", [], method="GET"))
        assert (enc.headers[":status"], bytes(enc.data)) == ("200", b"proto\n")
        missing = client.wait(client.request("/missing", [], method="GET"))
        assert missing.headers[":status"] == "404"
        pre = client.wait(
            client.request(
                "/x.Y/Z",
                [("origin", ORIGIN), ("access-control-request-method", "POST")],
                method="OPTIONS",
            )
        )
        assert pre.headers[":status"] == "204"
        assert pre.headers["access-control-allow-origin"] == "*"
    finally:
        client.close()


def test_native_grpc_over_http1_is_refused(daemon: Daemon) -> None:
    """application/grpc over HTTP/1.1 gets a clear HTTP error (native gRPC needs HTTP/2)."""
    status, _, body = http1_request(daemon.address, "POST", "/example_service.Echo/Unary", grpc_dict(), frame(b""))
    assert status == 505
    assert b"HTTP/2" in body


def grpc_dict() -> dict[str, str]:
    return dict(grpc_headers())
