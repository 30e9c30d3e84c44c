"""The JSON-RPC client: provider authentication, retries with backoff, typed errors."""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from snet_daemon.blockchain.errors import ChainUnavailable, ContractCallFailed, RateLimited
from snet_daemon.blockchain.rpc import MAX_ANSWER_SIZE, JsonRpcClient, auth_header, redact_url
from tests.support.aio import aio_fixture, aio_test
from tests.support.rpcnode import serving

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


def test_auth_header_like_go() -> None:
    """JWT-looking keys get Bearer; Infura endpoints get Basic(":" + key); others Bearer; WebSocket always Basic."""
    basic = "Basic " + base64.b64encode(b":secret").decode()
    assert auth_header("https://mainnet.infura.io/v3/x", "") is None
    assert auth_header("https://mainnet.infura.io/v3/x", JWT) == f"Bearer {JWT}"
    assert auth_header("https://mainnet.infura.io/v3/x", "secret") == basic
    assert auth_header("https://eth.example.com", "secret") == "Bearer secret"
    assert (
        auth_header("wss://eth.example.com", JWT, websocket=True)
        == "Basic " + base64.b64encode(f":{JWT}".encode()).decode()
    )


def test_redact_url() -> None:
    """Keys in provider URLs (path or user info) never reach the log."""
    assert (
        redact_url("https://mainnet.infura.io/v3/0123456789abcdef0123456789abcdef")
        == "https://mainnet.infura.io/v3/***"
    )
    assert redact_url("https://user:pw@host:8545/") == "https://***@host:8545/"
    assert redact_url("http://127.0.0.1:8545") == "http://127.0.0.1:8545"


@dataclass
class Script:
    """What the stub node answers, one entry per request (the last one repeats)."""

    answers: list[tuple[int, Any, dict[str, str]]] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


@aio_fixture
async def node() -> AsyncIterator[tuple[str, Script]]:
    """A scriptable JSON-RPC endpoint on a free port."""
    script = Script()

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        script.seen.append(body)
        script.headers.append(dict(request.headers))
        status, answer, headers = script.answers.pop(0) if len(script.answers) > 1 else script.answers[0]
        if isinstance(answer, dict) and "result" not in answer and "error" not in answer:
            answer = {"jsonrpc": "2.0", "id": body["id"], **answer}
        text = answer if isinstance(answer, str) else json.dumps(answer)
        return web.Response(status=status, text=text, headers=headers, content_type="application/json")

    async with serving(handle) as url:
        yield url, script


class Sleeps:
    """Records retry delays instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def client(url: str, sleeps: Sleeps, **kwargs: Any) -> JsonRpcClient:
    return JsonRpcClient(url, now=lambda: 100.0, sleep=sleeps, backoff=0.5, max_backoff=4.0, **kwargs)


def ok(result: Any) -> tuple[int, Any, dict[str, str]]:
    return 200, {"result": result}, {}


@aio_test
async def test_result_and_auth(node: tuple[str, Script]) -> None:
    """A result is returned, the body is JSON-RPC 2.0, and the API key is sent."""
    url, script = node
    script.answers = [ok("0x10")]
    rpc = client(url, Sleeps(), api_key="secret")
    try:
        assert await rpc.call("eth_blockNumber") == "0x10"
        assert script.seen[0]["method"] == "eth_blockNumber"
        assert script.seen[0]["jsonrpc"] == "2.0"
        assert script.headers[0]["Authorization"] == "Bearer secret"
        assert rpc.health().ok
        assert rpc.health().last_success == 100.0
    finally:
        await rpc.close()


@aio_test
async def test_rate_limit_is_retried_with_retry_after(node: tuple[str, Script]) -> None:
    """HTTP 429 and JSON-RPC -32005 are retried, honouring Retry-After, then succeed."""
    url, script = node
    script.answers = [
        (429, "Too Many Requests", {"Retry-After": "3"}),
        (200, {"error": {"code": -32005, "message": "daily request count exceeded, request rate limited"}}, {}),
        ok("0x1"),
    ]
    sleeps = Sleeps()
    rpc = client(url, sleeps)
    try:
        assert await rpc.call("eth_blockNumber") == "0x1"
        assert sleeps.delays == [3.0, 1.0]
    finally:
        await rpc.close()


@aio_test
async def test_persistent_failure_is_typed_and_counted(node: tuple[str, Script]) -> None:
    """A node answering 503 is retried with doubling delays, then ChainUnavailable; health shows it."""
    url, script = node
    script.answers = [(503, "upstream down", {})]
    sleeps = Sleeps()
    rpc = client(url, sleeps, attempts=4)
    try:
        with pytest.raises(ChainUnavailable, match="HTTP 503") as caught:
            await rpc.call("eth_call", [{}, "latest"])
        assert not isinstance(caught.value, RateLimited)
        assert sleeps.delays == [0.5, 1.0, 2.0]
        health = rpc.health()
        assert not health.ok
        assert health.consecutive_failures == 1
        assert "HTTP 503" in (health.last_error or "")
        script.answers = [(429, "slow down", {})]
        with pytest.raises(RateLimited):
            await rpc.call("eth_blockNumber")
        assert rpc.health().consecutive_failures == 2
    finally:
        await rpc.close()


@aio_test
async def test_json_rpc_error_is_not_retried(node: tuple[str, Script]) -> None:
    """A revert is a ContractCallFailed at once, and the node still counts as reachable."""
    url, script = node
    script.answers = [(200, {"error": {"code": 3, "message": "execution reverted", "data": "0x08c379a0"}}, {})]
    sleeps = Sleeps()
    rpc = client(url, sleeps)
    try:
        with pytest.raises(ContractCallFailed, match="execution reverted") as caught:
            await rpc.call("eth_call", [{}, "latest"])
        assert caught.value.code == 3
        assert sleeps.delays == []
        assert len(script.seen) == 1
        assert rpc.health().ok
    finally:
        await rpc.close()


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            -32602,
            "Log response size exceeded. You can make eth_getLogs requests with up to a 2K block range "
            "and no limit on the response size",
        ),
        (-32005, "query returned more than 10000 results. Try with this block range [0x1, 0x2]."),
    ],
    ids=["alchemy", "infura"],
)
@aio_test
async def test_log_range_refusal_is_not_a_rate_limit(node: tuple[str, Script], code: int, message: str) -> None:
    """Providers refuse an eth_getLogs range in words or codes of a rate limit (Alchemy, Infura):
    waiting does not help, a smaller range does, so it is a ContractCallFailed at once (which
    RegistryReader.changes answers by halving the range), not retried as RateLimited."""
    url, script = node
    script.answers = [(200, {"error": {"code": code, "message": message}}, {})]
    sleeps = Sleeps()
    rpc = client(url, sleeps)
    try:
        with pytest.raises(ContractCallFailed) as caught:
            await rpc.call("eth_getLogs", [{"fromBlock": "0x1", "toBlock": "0x2"}])
        assert not isinstance(caught.value, RateLimited)
        assert sleeps.delays == []
        with pytest.raises(RateLimited):  # the same words from another method are still a rate limit
            await rpc.call("eth_blockNumber")
    finally:
        await rpc.close()


@aio_test
async def test_bad_credentials_are_not_retried(node: tuple[str, Script]) -> None:
    """HTTP 401 says to check the API key and is not retried."""
    url, script = node
    script.answers = [(401, "unauthorized", {})]
    sleeps = Sleeps()
    rpc = client(url, sleeps, api_key="wrong")
    try:
        with pytest.raises(ChainUnavailable, match="blockchain_provider_api_key"):
            await rpc.call("eth_blockNumber")
        assert sleeps.delays == []
    finally:
        await rpc.close()


@aio_test
async def test_garbage_answers_are_unavailable(node: tuple[str, Script]) -> None:
    """An answer that is not JSON-RPC is treated as an unavailable node."""
    url, script = node
    script.answers = [(200, "<html>proxy error</html>", {})]
    rpc = client(url, Sleeps(), attempts=1)
    try:
        with pytest.raises(ChainUnavailable, match="not JSON"):
            await rpc.call("eth_blockNumber")
        script.answers = [(200, {"jsonrpc": "2.0", "id": 1}, {})]
        with pytest.raises(ChainUnavailable, match="neither result nor error"):
            await rpc.call("eth_blockNumber")
    finally:
        await rpc.close()


_NO_UPSTREAM: tuple[int, Any, dict[str, str]] = (
    503,
    {"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "no healthy upstream"}},
    {},
)


@aio_test
async def test_server_errors_with_a_json_rpc_body_are_retried_and_counted(node: tuple[str, Script]) -> None:
    """A gateway's 503 carrying a JSON-RPC error is the node failing, not the call: retried, and
    counted against the node's health with the gateway's message."""
    url, script = node
    script.answers = [_NO_UPSTREAM, ok("0x2a")]
    sleeps = Sleeps()
    rpc = client(url, sleeps)
    try:
        assert await rpc.call("eth_blockNumber") == "0x2a"
        assert len(sleeps.delays) == 1
        script.answers = [_NO_UPSTREAM]
        with pytest.raises(ChainUnavailable, match="HTTP 503: no healthy upstream"):
            await rpc.call("eth_blockNumber")
        health = rpc.health()
        assert not health.ok
        assert "no healthy upstream" in (health.last_error or "")
    finally:
        await rpc.close()


@aio_test
async def test_deeply_nested_answers_are_refused_before_decoding(node: tuple[str, Script]) -> None:
    """Nesting is bounded before json's C decoder recurses (a deep enough answer would crash the
    daemon under the recursion limit py_ecc sets)."""
    url, script = node
    script.answers = [(200, '{"jsonrpc": "2.0", "id": 1, "result": ' + "[" * 1000 + "]" * 1000 + "}", {})]
    rpc = client(url, Sleeps(), attempts=1)
    try:
        with pytest.raises(ChainUnavailable, match="nested deeper than 200"):
            await rpc.call("eth_blockNumber")
    finally:
        await rpc.close()


def _oversized_answer() -> bytes:
    """A valid JSON-RPC answer one byte over :data:`MAX_ANSWER_SIZE`."""
    head, tail = b'{"jsonrpc": "2.0", "id": 1, "result": "0x', b'"}'
    return head + b"0" * (MAX_ANSWER_SIZE + 1 - len(head) - len(tail)) + tail


@pytest.mark.parametrize("framing", ["content-length", "chunked", "gzip"])
@aio_test
async def test_oversized_answers_are_refused(framing: str) -> None:
    """An answer over 8 MiB (a broken node, an endpoint URL serving a file) is refused, not read
    into memory whole: at once when its Content-Length says so, else as soon as the bytes read (once
    inflated, for a compressed body) pass the limit; asking again would fetch it again, so it is not
    retried."""
    answer = _oversized_answer()
    requests = 0

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal requests
        requests += 1
        await request.read()
        if framing == "content-length":
            return web.Response(body=answer, content_type="application/json")
        if framing == "gzip":
            packed = gzip.compress(answer)
            return web.Response(body=packed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for start in range(0, len(answer), 65536):
                await response.write(answer[start : start + 65536])
        except ConnectionResetError:
            pass  # the client gave up reading, as it should
        return response

    sleeps = Sleeps()
    async with serving(handle) as url:
        rpc = client(url, sleeps)
        try:
            with pytest.raises(ChainUnavailable, match=f"refused \\(limit {MAX_ANSWER_SIZE}\\)"):
                await rpc.call("eth_blockNumber")
            assert (requests, sleeps.delays) == (1, [])
            assert "is the endpoint an Ethereum node?" in (rpc.health().last_error or "")
        finally:
            await rpc.close()


@aio_test
async def test_answers_up_to_the_limit_are_read(node: tuple[str, Script]) -> None:
    """An answer of exactly the limit is read (the refusal is for larger ones only)."""
    url, script = node
    result = "0x" + "0" * (MAX_ANSWER_SIZE - len(json.dumps({"result": "0x", "jsonrpc": "2.0", "id": 1})))
    script.answers = [ok(result)]
    rpc = client(url, Sleeps(), attempts=1)
    try:
        assert await rpc.call("eth_blockNumber") == result
    finally:
        await rpc.close()


@aio_test
async def test_closed_client_opens_no_new_pool(node: tuple[str, Script]) -> None:
    """After close (the daemon stopping) a call fails at once, unretried, and opens no new
    connection pool: nobody would close it ("Unclosed client session" at exit)."""
    url, script = node
    script.answers = [ok("0x10")]
    sleeps = Sleeps()
    rpc = client(url, sleeps)
    assert await rpc.call("eth_blockNumber") == "0x10"
    await rpc.close()
    with pytest.raises(ChainUnavailable, match="closed") as caught:
        await rpc.call("eth_blockNumber")
    assert caught.value.permanent
    assert sleeps.delays == []
    assert len(script.seen) == 1
    assert rpc._session is None
