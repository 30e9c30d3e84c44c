"""``service_type: grpc``: forward calls to the service as raw bytes.

The daemon never parses the service's messages: request and reply messages
pass through as bytes, with the client's metadata going up and the
service's headers, trailers, status code and message coming back unchanged
(the Go daemon drops the headers).  Calls without a client deadline get
``service_timeout`` (applied by the front end).

Why our own HTTP/2 client (:mod:`.h2client`) rather than grpc.aio, as
DESIGN.md §3 first planned: measured on this machine, same run, h2load at
16 calls in flight through each proxy to the same grpcio echo service, proxy
and service pinned to one core, CPU per proxied unary call:

=====================================  ===========  =============
proxy                                  proxy µs     service µs
=====================================  ===========  =============
grpc.aio unary-stream (all methods)    360          224
grpc.aio unary-unary (unary only)      238          190
h2 relay on the front end's stack      241          146
=====================================  ===========  =============

grpc.aio's unary-unary shape cannot be used without knowing each method's
kind (on a streaming method it hangs until the deadline), so the choice was
360 against 241, and grpc.aio's client also made the service itself work
harder (extra frames).  The relay also passes headers through exactly and
hands each reply message to the client from the data callback, with no
coroutine step per message.
"""

from __future__ import annotations

from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.wire import Metadata
from snet_daemon.upstream.h2client import H2Upstream


class GrpcPassthrough:
    """The handler that relays every call it gets to the service.

    Args:
        client: the HTTP/2 client for the service.
    """

    def __init__(self, client: H2Upstream) -> None:
        self.client = client

    async def __call__(self, call: ServerCall) -> None:
        """Relay ``call`` with the client's own metadata."""
        await self.client.forward(call, call.metadata)

    async def forward(self, call: ServerCall, metadata: Metadata) -> None:
        """Relay ``call`` with ``metadata`` (the payment layer adds to it)."""
        await self.client.forward(call, metadata)
