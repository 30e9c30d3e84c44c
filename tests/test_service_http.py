"""``service_type: http`` against a real HTTP/JSON server, without a daemon."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from snet_daemon.config.sections import ServiceCredential
from snet_daemon.frontend.call import start_call
from snet_daemon.frontend.status import Status
from snet_daemon.upstream.http import HttpClient, HttpUpstream, base_url, excerpt
from tests.support.aio import aio_test, wait_for
from tests.support.ports import free_port
from tests.support.services import (
    UNPRINTABLE_TIME,
    HttpServer,
    client,
    demo_protos,
    invoke,
    json_bytes,
    new_call,
    parse_reply,
    request_bytes,
)

__all__ = ["client"]  # fixture, imported for pytest

MIB = 1024 * 1024
CREDENTIALS = (
    ServiceCredential(key="api_key", value="q-secret", location="query"),
    ServiceCredential(key="X-Api-Key", value="h-secret", location="header"),
    ServiceCredential(key="token", value={"nested": True}, location="body"),
)


@pytest.fixture(scope="module")
def server() -> Iterator[HttpServer]:
    """The demo HTTP server."""
    with HttpServer() as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(server: HttpServer) -> None:
    server.record.reset()
    server.mode = "normal"


def _adapter(client: HttpClient, server: HttpServer, encoding: str = "proto", **kwargs: object) -> HttpUpstream:
    options: dict[str, object] = {"protos": demo_protos(), "encoding": encoding, "max_message_size": 64 * MIB}
    options.update(kwargs)
    return HttpUpstream(client, server.url + "/api/", **options)  # type: ignore[arg-type]


def test_endpoint_forms_and_excerpts() -> None:
    """host:port and grpc:// mean http://; excerpts are one bounded line."""
    assert base_url("localhost:5000") == "http://localhost:5000"
    assert base_url("grpc://h:1") == "http://h:1"
    assert base_url("https://h/x") == "https://h/x"
    assert excerpt(b"a\n  b\r\nc") == "a b c"
    assert excerpt(b"x" * 1000, 10) == "x" * 10 + "..."


@aio_test
async def test_a_call_is_a_post_to_the_method_path(client: HttpClient, server: HttpServer) -> None:
    """POST endpoint + /Method with JSON (original names); unknown answer fields are ignored."""
    sink = await invoke(_adapter(client, server), "/demo.Demo/Echo", [request_bytes(text="hi", count=2)])
    assert sink.status == Status.OK, sink.message
    reply = parse_reply(sink.messages[0])
    assert (reply.text, reply.count) == ("hi", 2)
    seen = server.record.seen[0]
    assert seen.path == "/api/Echo"
    assert seen.body == {"text": "hi", "count": "2"}
    assert seen.headers["content-type"] == "application/json"


@aio_test
async def test_credentials_go_to_query_header_and_body(client: HttpClient, server: HttpServer) -> None:
    """service_credentials are injected where configured; body ones win over the client's fields."""
    adapter = _adapter(client, server, credentials=CREDENTIALS)
    sink = await invoke(
        adapter,
        "/demo.Demo/Echo",
        [json_bytes({"text": "hi", "token": "client's"})],
        content_type="application/grpc+json",
    )
    assert sink.status == Status.OK, sink.message
    seen = server.record.seen[0]
    assert seen.query == {"api_key": ["q-secret"]}
    assert seen.headers["x-api-key"] == "h-secret"
    assert seen.body == {"text": "hi", "token": {"nested": True}}


@aio_test
async def test_body_credentials_go_into_each_message_of_a_client_stream(client: HttpClient, server: HttpServer) -> None:
    """A client-streaming call posts an array of its messages: body credentials are set in each
    (they were only merged into an object body, and silently dropped here)."""
    adapter = _adapter(client, server, credentials=CREDENTIALS)
    sink = await invoke(adapter, "/demo.Demo/Join", [request_bytes(text=t) for t in "ab"])
    assert sink.status == Status.OK, sink.message
    assert server.record.seen[0].body == [{"text": t, "token": {"nested": True}} for t in "ab"]


@aio_test
async def test_non_2xx_is_unavailable_with_status_and_bounded_excerpt(client: HttpClient, server: HttpServer) -> None:
    """A failing answer is UNAVAILABLE quoting the HTTP status and the start of the body."""
    failing = request_bytes(options={"fail_code": 503, "fail_message": "model is warming up"})
    sink = await invoke(_adapter(client, server), "/demo.Demo/Fail", [failing])
    assert sink.status == Status.UNAVAILABLE
    assert sink.message == "service answered HTTP 503: demo: model is warming up"
    server.mode = "bad-gateway"
    big = await invoke(_adapter(client, server), "/demo.Demo/Echo", [request_bytes()])
    assert big.status == Status.UNAVAILABLE
    assert big.message.startswith("service answered HTTP 502: <html>")
    assert len(big.message) < 600


@aio_test
async def test_server_streaming_relays_json_lines_as_they_arrive(client: HttpClient, server: HttpServer) -> None:
    """Each line of a JSON-lines answer is a reply, sent before the next line arrives."""
    call, sink = new_call("/demo.Demo/Split")
    call.deliver(request_bytes(text="a b c d e f"))
    call.end_input()
    start = time.monotonic()
    start_call(_adapter(client, server), call)
    await sink.message_arrived.wait()
    first = time.monotonic() - start
    assert call.task is not None
    await call.task
    total = time.monotonic() - start
    assert sink.status == Status.OK, sink.message
    assert [parse_reply(m).text for m in sink.messages] == list("abcdef")
    assert [parse_reply(m).index for m in sink.messages] == list(range(6))
    # The server writes a line every 50 ms: the first reply came well before the end.
    assert first < total - 0.15


@aio_test
async def test_client_streaming_posts_one_array(client: HttpClient, server: HttpServer) -> None:
    """A client-streaming call POSTs all its requests as one JSON array."""
    sink = await invoke(_adapter(client, server), "/demo.Demo/Join", [request_bytes(text=t) for t in "xyz"])
    assert sink.status == Status.OK, sink.message
    assert parse_reply(sink.messages[0]).text == "x y z"
    assert server.record.seen[0].body == [{"text": "x"}, {"text": "y"}, {"text": "z"}]


@aio_test
async def test_bidi_posts_once_per_message_and_expands_arrays(client: HttpClient, server: HttpServer) -> None:
    """Each request of a bidirectional call is one POST; an array answer is several replies."""
    sink = await invoke(_adapter(client, server), "/demo.Demo/Chat", [request_bytes(text=t) for t in ("p", "q")])
    assert sink.status == Status.OK, sink.message
    assert [parse_reply(m).text for m in sink.messages] == ["P", "Q"]
    assert len(server.record.seen) == 2


@aio_test
async def test_json_encoding_round_trips_text(client: HttpClient, server: HttpServer) -> None:
    """encoding json: the client's JSON is posted as is and the answer is returned as JSON text."""
    sink = await invoke(_adapter(client, server, "json"), "/demo.Demo/Echo", [json_bytes({"text": "j", "count": 1})])
    assert sink.status == Status.OK, sink.message
    assert json.loads(sink.messages[0]) == {
        "text": "j",
        "count": 1,
        "blob": "",
        "unknown_field": "ignored by the daemon",
    }


@aio_test
async def test_missing_methods_and_unreachable_services(client: HttpClient, server: HttpServer) -> None:
    """Methods outside the protos are UNIMPLEMENTED; a closed port is UNAVAILABLE."""
    missing = await invoke(_adapter(client, server), "/demo.Demo/Nope", [request_bytes()])
    assert missing.status == Status.UNIMPLEMENTED
    down = HttpUpstream(client, f"127.0.0.1:{free_port()}", protos=demo_protos(), encoding="proto")
    sink = await invoke(down, "/demo.Demo/Echo", [request_bytes()])
    assert sink.status == Status.UNAVAILABLE


@aio_test
async def test_deadline_and_cancellation_abort_the_request(client: HttpClient, server: HttpServer) -> None:
    """A slow answer ends at the deadline; a cancelled call stops at once; the adapter carries on."""
    adapter = _adapter(client, server)
    slow = await invoke(adapter, "/demo.Demo/Slow", [request_bytes(options={"delay_ms": 3000})], timeout=0.3)
    assert slow.status == Status.DEADLINE_EXCEEDED
    call, _ = new_call("/demo.Demo/Slow")
    call.deliver(request_bytes(options={"delay_ms": 3000}))
    call.end_input()
    start_call(adapter, call)
    await asyncio.sleep(0.2)
    call.cancel()
    assert call.task is not None
    await asyncio.wait([call.task], timeout=2)
    assert call.task.done()
    after = await invoke(adapter, "/demo.Demo/Echo", [request_bytes(text="ok")])
    assert parse_reply(after.messages[0]).text == "ok"


@aio_test
async def test_twenty_megabyte_messages_go_both_ways(client: HttpClient, server: HttpServer) -> None:
    """A 20 MB request and a 20 MB reply pass."""
    blob = b"\x07" * (20 * MIB)
    sink = await invoke(_adapter(client, server), "/demo.Demo/Echo", [request_bytes(blob=blob)], timeout=60)
    assert sink.status == Status.OK, sink.message
    assert parse_reply(sink.messages[0]).blob == blob


@aio_test
async def test_a_request_without_a_json_form_is_invalid_argument(client: HttpClient, server: HttpServer) -> None:
    """A protobuf request that parses but cannot be printed as JSON is the client's error, and
    nothing is sent (it was "internal error" with a traceback on every call)."""
    sink = await invoke(_adapter(client, server), "/demo.Demo/Echo", [request_bytes(sent_at=UNPRINTABLE_TIME)])
    assert sink.status == Status.INVALID_ARGUMENT
    assert sink.message.startswith("request is not a valid demo.Request: "), sink.message
    assert server.record.seen == []


@pytest.mark.parametrize("name", ["..", "Echo?admin=1", "Echo#x", "Echo%2Fx", "Écho", ""])
@aio_test
async def test_without_protos_a_method_name_that_is_no_identifier_is_not_posted(
    client: HttpClient, server: HttpServer, name: str
) -> None:
    """The client's method name becomes the last URL segment: without protos to check it against,
    anything but a protobuf identifier is UNIMPLEMENTED (it was appended as is, so ``..``, a
    query or a fragment reached another URL)."""
    adapter = _adapter(client, server, "json", protos=None)
    sink = await invoke(adapter, f"/svc.S/{name}", [json_bytes({"text": "x"})])
    assert (sink.status, server.record.seen) == (Status.UNIMPLEMENTED, [])
    assert "is not a protobuf identifier" in sink.message
    ok = await invoke(adapter, "/svc.S/Echo", [json_bytes({"text": "x"})])
    assert ok.status == Status.OK, ok.message
    assert [(seen.path, seen.query) for seen in server.record.seen] == [("/api/Echo", {})]


@aio_test
async def test_a_bidi_request_that_is_no_unicode_ends_the_call(client: HttpClient, server: HttpServer) -> None:
    """In a bidirectional call, the message holding an escaped lone surrogate is INVALID_ARGUMENT
    and is not posted; the ones before it were answered."""
    requests = [json_bytes({"text": "first"}), b'{"text": "\\udc00 second"}']
    sink = await invoke(_adapter(client, server, "json"), "/demo.Demo/Chat", requests)
    assert sink.status == Status.INVALID_ARGUMENT
    assert "lone UTF-16 surrogate" in sink.message
    assert [seen.body for seen in server.record.seen] == [{"text": "first"}]
    assert [json.loads(message) for message in sink.messages] == [{"text": "FIRST"}]


class _EndlessLines:
    """An HTTP server answering one POST with JSON lines for ever, a line every 10 ms.

    With ``bad_second``, the second line is a JSON string, not a reply object.
    ``closed`` is set when the daemon drops the connection.
    """

    def __init__(self, *, bad_second: bool) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.bad_second = bad_second
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.listener.close()
        with conn:
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
            try:
                conn.sendall(head)
                for index in range(100_000):
                    line = b'"not an object"\n' if self.bad_second and index == 1 else b'{"text": "x%d"}\n' % index
                    conn.sendall(b"%x\r\n%s\r\n" % (len(line), line))
                    time.sleep(0.01)
            except OSError:
                self.closed.set()


@pytest.mark.parametrize("ending", ["bad line", "deadline while the client is slow"])
@aio_test
async def test_a_json_lines_call_ending_between_lines_drops_the_connection(client: HttpClient, ending: str) -> None:
    """A call that ends while a reply is handed on (a line that is no reply: INTERNAL; the deadline
    while a slow client holds the reply) drops the service's connection (it was kept open for ever,
    the answer read until 1 MiB waited, then paused)."""
    server = _EndlessLines(bad_second=ending == "bad line")
    adapter = HttpUpstream(client, f"127.0.0.1:{server.port}", protos=demo_protos(), encoding="proto")
    call, sink = new_call("/demo.Demo/Split", timeout=1.0 if ending.startswith("deadline") else 10.0)
    sink.writable = ending == "bad line"  # else emit() waits in call.drain()
    call.deliver(request_bytes(text="a"))
    call.end_input()
    start_call(adapter, call)
    assert call.task is not None
    await call.task
    expected = Status.INTERNAL if ending == "bad line" else Status.DEADLINE_EXCEEDED
    assert sink.status == expected, (sink.status, sink.message)
    await wait_for(server.closed.is_set, within=3.0)
