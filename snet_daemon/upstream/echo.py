"""The handler for ``passthrough_enabled: false``: echo the request back.

The Go daemon answers with the request's first message; echoing every
message keeps that behaviour for unary calls and makes streaming calls
behave sensibly too.  It is meant for checking a deployment (payments,
TLS, clients) before the real service is wired in.
"""

from __future__ import annotations

from snet_daemon.frontend.call import ServerCall


async def echo(call: ServerCall) -> None:
    """Send every request message back, in order."""
    call.send_initial_metadata()
    while (message := await call.read()) is not None:
        call.write(message)
        await call.drain()
