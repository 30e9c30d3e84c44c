"""``service_type: jsonrpc`` against a real JSON-RPC server, without a daemon."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from snet_daemon.frontend.status import Status
from snet_daemon.upstream.http import HttpClient
from snet_daemon.upstream.jsonrpc import JsonRpcUpstream, error_status
from snet_daemon.upstream.protos import ServiceProtos
from tests.support.aio import aio_test
from tests.support.ports import free_port
from tests.support.services import (
    UNPRINTABLE_TIME,
    JsonRpcServer,
    client,
    demo_protos,
    invoke,
    json_bytes,
    parse_reply,
    request_bytes,
)

__all__ = ["client"]  # fixture, imported for pytest

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[JsonRpcServer]:
    """The demo JSON-RPC server."""
    with JsonRpcServer() as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(server: JsonRpcServer) -> None:
    server.record.reset()
    server.mode = "normal"


def _adapter(
    client: HttpClient, server: JsonRpcServer, encoding: str = "proto", protos: ServiceProtos | None = None
) -> JsonRpcUpstream:
    return JsonRpcUpstream(
        client, server.url, protos=protos or demo_protos(), encoding=encoding, max_message_size=64 * MIB
    )


def test_error_codes_map_to_grpc_statuses() -> None:
    """Standard JSON-RPC codes, server errors, gRPC codes 1-16 and anything else."""
    assert error_status(-32601) == Status.UNIMPLEMENTED
    assert error_status(-32602) == Status.INVALID_ARGUMENT
    assert error_status(-32700) == Status.INTERNAL
    assert error_status(-32603) == Status.INTERNAL
    assert error_status(-32050) == Status.INTERNAL
    assert error_status(5) == Status.NOT_FOUND
    assert error_status(16) == Status.UNAUTHENTICATED
    assert error_status(0) == Status.UNKNOWN
    assert error_status(42) == Status.UNKNOWN
    assert error_status("7") == Status.UNKNOWN
    assert error_status(True) == Status.UNKNOWN


@aio_test
async def test_protobuf_request_becomes_a_json_rpc_call(client: HttpClient, server: JsonRpcServer) -> None:
    """A protobuf request is posted as JSON-RPC 2.0 with the short method name; result -> reply."""
    sink = await invoke(_adapter(client, server), "/demo.Demo/Echo", [request_bytes(text="hi", count=3, blob=b"\1")])
    assert sink.status == Status.OK, sink.message
    reply = parse_reply(sink.messages[0])
    assert (reply.text, reply.count, reply.blob) == ("hi", 3, b"\1")
    sent = server.record.seen[0].body
    assert (sent["jsonrpc"], sent["method"]) == ("2.0", "Echo")
    assert isinstance(sent["id"], int)
    assert sent["params"] == {"text": "hi", "count": "3", "blob": "AQ=="}
    assert server.record.seen[0].headers["content-type"] == "application/json"


@aio_test
async def test_json_messages_pass_through_unchanged(client: HttpClient, server: JsonRpcServer) -> None:
    """With encoding json, the message is the params verbatim and the result is the reply text (as in Go)."""
    params = {"text": "hi", "count": 3, "extra": [1, 2]}
    sink = await invoke(_adapter(client, server, "json"), "/demo.Demo/Echo", [json_bytes(params)])
    assert sink.status == Status.OK, sink.message
    assert server.record.seen[0].body["params"] == params
    assert json.loads(sink.messages[0]) == {"text": "hi", "count": 3, "blob": ""}


@aio_test
async def test_json_content_type_works_for_a_proto_service(client: HttpClient, server: JsonRpcServer) -> None:
    """application/grpc-web+json messages are JSON even when the metadata says proto."""
    sink = await invoke(
        _adapter(client, server),
        "/demo.Demo/Echo",
        [json_bytes({"text": "web"})],
        content_type="application/grpc-web+json",
    )
    assert sink.status == Status.OK, sink.message
    assert json.loads(sink.messages[0])["text"] == "web"


@aio_test
async def test_json_rpc_errors_become_grpc_errors(client: HttpClient, server: JsonRpcServer) -> None:
    """The error's code picks the status, its message is the gRPC message, code and data ride in trailers."""
    failing = request_bytes(options={"fail_code": 5, "fail_message": "no such model"})
    sink = await invoke(_adapter(client, server), "/demo.Demo/Fail", [failing])
    assert (sink.status, sink.message) == (Status.NOT_FOUND, "no such model")
    assert sink.trailer("snet-jsonrpc-error-code") == "5"
    assert json.loads(sink.trailer("snet-jsonrpc-error-data") or "") == {"method": "Fail"}
    invalid = await invoke(_adapter(client, server), "/demo.Demo/Fail", [request_bytes(options={"fail_code": -32602})])
    assert invalid.status == Status.INVALID_ARGUMENT
    unknown = await invoke(_adapter(client, server), "/demo.Demo/Hang", [request_bytes()])
    assert unknown.status == Status.UNIMPLEMENTED
    assert "not found" in unknown.message


@aio_test
async def test_methods_missing_from_the_protos_are_unimplemented(client: HttpClient, server: JsonRpcServer) -> None:
    """A method the protos do not define never reaches the service."""
    sink = await invoke(_adapter(client, server), "/demo.Demo/Missing", [request_bytes()])
    assert sink.status == Status.UNIMPLEMENTED
    assert "/demo.Demo/Missing" in sink.message
    assert server.record.seen == []


@aio_test
async def test_server_streaming_sends_one_reply_per_result_element(client: HttpClient, server: JsonRpcServer) -> None:
    """A server-streaming method's array result is a stream of replies, in order."""
    sink = await invoke(_adapter(client, server), "/demo.Demo/Split", [request_bytes(text="one two three")])
    assert sink.status == Status.OK, sink.message
    replies = [parse_reply(m) for m in sink.messages]
    assert [(r.text, r.index) for r in replies] == [("one", 0), ("two", 1), ("three", 2)]
    assert len(server.record.seen) == 1


@aio_test
async def test_client_streaming_sends_all_requests_as_one_array(client: HttpClient, server: JsonRpcServer) -> None:
    """A client-streaming call is one JSON-RPC call whose params is the array of requests."""
    requests = [request_bytes(text=word) for word in ("a", "b", "c")]
    sink = await invoke(_adapter(client, server), "/demo.Demo/Join", requests)
    assert sink.status == Status.OK, sink.message
    reply = parse_reply(sink.messages[0])
    assert (reply.text, reply.count) == ("a b c", 3)
    assert server.record.seen[0].body["params"] == [{"text": "a"}, {"text": "b"}, {"text": "c"}]


@aio_test
async def test_bidi_streaming_makes_one_call_per_message(client: HttpClient, server: JsonRpcServer) -> None:
    """Each request message of a bidirectional call is its own JSON-RPC call, answered in order."""
    requests = [request_bytes(text=word) for word in ("x", "y")]
    sink = await invoke(_adapter(client, server), "/demo.Demo/Chat", requests)
    assert sink.status == Status.OK, sink.message
    assert [parse_reply(m).text for m in sink.messages] == ["X", "Y"]
    assert [seen.body["params"] for seen in server.record.seen] == [{"text": "x"}, {"text": "y"}]


@aio_test
async def test_without_protos_json_clients_work_like_go(client: HttpClient, server: JsonRpcServer) -> None:
    """Without service_api_source, JSON messages still work; protobuf ones cannot be converted."""
    adapter = JsonRpcUpstream(client, server.url, protos=None, encoding="json")
    sink = await invoke(adapter, "/any.Service/Echo", [json_bytes({"text": "go"})])
    assert sink.status == Status.OK, sink.message
    assert json.loads(sink.messages[0])["text"] == "go"
    proto_only = JsonRpcUpstream(client, server.url, protos=None, encoding="proto")
    refused = await invoke(proto_only, "/any.Service/Echo", [request_bytes(text="x")])
    assert refused.status == Status.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("mode", "status", "fragment"),
    [
        ("bad-gateway", Status.UNAVAILABLE, "HTTP 502"),
        ("not-jsonrpc", Status.INTERNAL, "not a JSON-RPC response"),
        ("wrong-id", Status.INTERNAL, "does not match"),
    ],
)
@aio_test
async def test_answers_that_are_not_json_rpc_are_errors(
    client: HttpClient, server: JsonRpcServer, mode: str, status: Status, fragment: str
) -> None:
    """Non-JSON-RPC answers are UNAVAILABLE (non-2xx) or INTERNAL, with an excerpt."""
    server.mode = mode
    sink = await invoke(_adapter(client, server), "/demo.Demo/Echo", [request_bytes(text="x")])
    assert sink.status == status
    assert fragment in sink.message


@aio_test
async def test_an_unreachable_service_is_unavailable(client: HttpClient) -> None:
    """Connection refused is UNAVAILABLE."""
    adapter = JsonRpcUpstream(client, f"http://127.0.0.1:{free_port()}", protos=demo_protos(), encoding="proto")
    sink = await invoke(adapter, "/demo.Demo/Echo", [request_bytes()])
    assert sink.status == Status.UNAVAILABLE
    assert "cannot reach the service" in sink.message


@aio_test
async def test_the_deadline_ends_a_slow_call_and_the_adapter_carries_on(
    client: HttpClient, server: JsonRpcServer
) -> None:
    """A call past its deadline is DEADLINE_EXCEEDED at the deadline; the next call works."""
    adapter = _adapter(client, server)
    start = time.monotonic()
    slow = await invoke(adapter, "/demo.Demo/Slow", [request_bytes(options={"delay_ms": 3000})], timeout=0.3)
    assert slow.status == Status.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 2.0
    sink = await invoke(adapter, "/demo.Demo/Echo", [request_bytes(text="after")])
    assert parse_reply(sink.messages[0]).text == "after"


@aio_test
async def test_twenty_megabyte_messages_go_both_ways(client: HttpClient, server: JsonRpcServer) -> None:
    """A 20 MB request and a 20 MB reply pass (as base64 in JSON)."""
    blob = bytes(range(256)) * (20 * MIB // 256)
    sink = await invoke(_adapter(client, server), "/demo.Demo/Echo", [request_bytes(blob=blob)], timeout=60)
    assert sink.status == Status.OK, sink.message
    assert parse_reply(sink.messages[0]).blob == blob


@aio_test
async def test_answers_over_the_size_limit_are_refused(client: HttpClient, server: JsonRpcServer) -> None:
    """An answer larger than the bound is RESOURCE_EXHAUSTED, not buffered without end."""
    adapter = JsonRpcUpstream(client, server.url, protos=demo_protos(), encoding="proto", max_message_size=1024)
    sink = await invoke(adapter, "/demo.Demo/Echo", [request_bytes(options={"reply_size": 8 * MIB})])
    assert sink.status == Status.RESOURCE_EXHAUSTED


@aio_test
async def test_json_nested_too_deep_is_invalid_argument() -> None:
    """A client's JSON nested 100,000 deep is INVALID_ARGUMENT, not a logged internal error."""
    from twisted.internet import reactor

    adapter = JsonRpcUpstream(HttpClient(reactor), "http://127.0.0.1:9", protos=None, encoding="json")
    sink = await invoke(adapter, "/demo.Demo/Echo", [b"[" * 100_000 + b"]" * 100_000])
    assert sink.status == Status.INVALID_ARGUMENT
    assert "not JSON" in sink.message


@aio_test
async def test_a_request_without_a_json_form_is_invalid_argument(client: HttpClient, server: JsonRpcServer) -> None:
    """A protobuf request that parses but cannot be printed as JSON (here the second message of
    a client stream) is the client's error, and nothing is sent (it was "internal error" with a
    traceback on every call)."""
    requests = [request_bytes(text="fine"), request_bytes(sent_at=UNPRINTABLE_TIME)]
    sink = await invoke(_adapter(client, server), "/demo.Demo/Join", requests)
    assert (sink.status, server.record.seen) == (Status.INVALID_ARGUMENT, [])
    assert sink.message.startswith("request is not a valid demo.Request: "), sink.message


@aio_test
async def test_service_text_that_is_no_unicode_is_replaced(client: HttpClient, server: JsonRpcServer) -> None:
    """Lone surrogates in a service's result or error message become ``?`` and the status always
    goes out (an error message holding one failed the trailers: the client hung); the error code
    trailer is bounded like the message."""
    server.mode = "lone-surrogates"
    adapter = _adapter(client, server, "json")
    echo = await invoke(adapter, "/demo.Demo/Echo", [json_bytes({"text": "x"})])
    assert (echo.status, echo.messages) == (Status.OK, [b'{"text":"a?b"}'])
    failed = await invoke(adapter, "/demo.Demo/Fail", [json_bytes({"text": "x"})])
    assert failed.fields[:2] == [("grpc-status", str(Status.UNKNOWN)), ("grpc-message", "bad ? input")]
    code = failed.trailer("snet-jsonrpc-error-code")
    assert isinstance(code, str)
    assert code.startswith('{"long": "ccc')
    assert len(code) == 4096 + 3


@aio_test
async def test_a_request_that_is_no_unicode_is_invalid_argument(client: HttpClient, server: JsonRpcServer) -> None:
    """A JSON request holding an escaped lone surrogate is valid JSON but no text: the client's
    error, and nothing is sent (it was "internal error" with a traceback)."""
    sink = await invoke(_adapter(client, server, "json"), "/demo.Demo/Echo", [b'{"text": "\\ud800"}'])
    assert (sink.status, server.record.seen) == (Status.INVALID_ARGUMENT, [])
    assert "lone UTF-16 surrogate" in sink.message
