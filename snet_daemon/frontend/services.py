"""Serving the daemon's own unary gRPC services (channel state, claims, ...).

The daemon's services are few, small and unary; they are registered on the
:class:`~snet_daemon.frontend.gateway.Router` by full method name, next to
the passthrough, and served over native gRPC and gRPC-Web alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from snet_daemon.frontend.call import Handler, ServerCall
from snet_daemon.frontend.status import GrpcError, Status

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


def unary(request_type: type[Req], implementation: Callable[[Req, ServerCall], Awaitable[Resp]]) -> Handler:
    """A handler that parses one request, calls ``implementation``, sends its reply.

    Raises (to the client):
        GrpcError: ``INTERNAL`` for a request that does not parse (what
            grpc servers answer), ``UNIMPLEMENTED`` for more than one request
            message, and whatever ``implementation`` raises.
    """

    async def serve(call: ServerCall) -> None:
        data = call.request_if_complete()
        if data is None:
            data = await call.read()
            if data is None:
                raise GrpcError(Status.UNIMPLEMENTED, "unary call without a request message")
            if await call.read() is not None:
                raise GrpcError(Status.UNIMPLEMENTED, "unary call with more than one request message")
        try:
            request = request_type.FromString(data)
        except DecodeError:
            raise GrpcError(Status.INTERNAL, "grpc: error unmarshalling request") from None
        reply = await implementation(request, call)
        call.write(reply.SerializeToString())

    return serve
