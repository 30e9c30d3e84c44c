"""Stub Ethereum JSON-RPC endpoints, served in-process on a free port.

async with serving(handle) as url:      # any aiohttp handler for POST /
    rpc = JsonRpcClient(url, now=...)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

__all__ = ["StubNode", "serving"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(handle: Handler) -> AsyncIterator[str]:
    """Serve ``POST /`` with ``handle`` on 127.0.0.1; yields the endpoint's URL."""
    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


class StubNode:
    """A node answering each method with a set ``result``, or a JSON-RPC ``error``.

    Serve it with ``serving(node.handle)``.  A method with neither is
    answered "method not found", as nodes do.

    Attributes:
        results: Method -> the ``result`` value answered (any JSON).
        errors: Method -> the ``error`` object answered instead.
        calls: Method -> requests seen.
    """

    def __init__(self, results: dict[str, Any] | None = None) -> None:
        self.results: dict[str, Any] = dict(results or {})
        self.errors: dict[str, dict[str, Any]] = {}
        self.calls: Counter[str] = Counter()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one JSON-RPC request."""
        body = await request.json()
        method = body["method"]
        self.calls[method] += 1
        answer: dict[str, Any] = {"jsonrpc": "2.0", "id": body["id"]}
        if method in self.errors:
            answer["error"] = self.errors[method]
        elif method in self.results:
            answer["result"] = self.results[method]
        else:
            answer["error"] = {"code": -32601, "message": f"the method {method} does not exist/is not available"}
        return web.json_response(answer)
