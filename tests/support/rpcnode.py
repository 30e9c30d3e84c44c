"""Stub Ethereum JSON-RPC endpoints, served in-process on a free port.

async with serving(handle) as url:      # any aiohttp handler for POST /
    rpc = JsonRpcClient(url, now=...)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web

__all__ = ["serving"]

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
