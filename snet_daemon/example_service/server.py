"""A grpc.aio implementation of ``protos/example_service.proto``.

Run it with ``python -m snet_daemon.example_service --port 5001``.  It is a
plain gRPC server with no knowledge of snetd: exactly what an AI-service
provider runs behind the daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc

from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon._proto import example_service_pb2_grpc as pb_grpc


def _metadata_lines(metadata: Sequence[tuple[str, str | bytes]] | None) -> list[str]:
    """Render request metadata as ``key=value`` lines (binary values in hex)."""
    lines = []
    for key, value in metadata or ():
        text = value.hex() if isinstance(value, bytes) else value
        lines.append(f"{key}={text}")
    return lines


class Calculator(pb_grpc.CalculatorServicer):
    """Arithmetic on two floats, as in SingularityNET's example service."""

    async def add(self, request: pb.Numbers, context: grpc.aio.ServicerContext) -> pb.Result:
        return pb.Result(value=request.a + request.b)

    async def sub(self, request: pb.Numbers, context: grpc.aio.ServicerContext) -> pb.Result:
        return pb.Result(value=request.a - request.b)

    async def mul(self, request: pb.Numbers, context: grpc.aio.ServicerContext) -> pb.Result:
        return pb.Result(value=request.a * request.b)

    async def div(self, request: pb.Numbers, context: grpc.aio.ServicerContext) -> pb.Result:
        if request.b == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "division by zero")
        return pb.Result(value=request.a / request.b)


class Echo(pb_grpc.EchoServicer):
    """Echoes requests back; the request fields ask for delays, failures and sizes.

    Every call sends the initial metadata ``x-echo-initial: yes`` and the
    trailer ``x-echo-trailer: yes`` (plus ``x-echo-trailer-bin``), so tests can
    check that the daemon forwards the service's headers and trailers.
    """

    async def _start(self, context: grpc.aio.ServicerContext) -> None:
        await context.send_initial_metadata((("x-echo-initial", "yes"),))
        context.set_trailing_metadata((("x-echo-trailer", "yes"), ("x-echo-trailer-bin", b"\x00\x01\xff")))

    async def _reply(self, request: pb.EchoRequest, context: grpc.aio.ServicerContext, index: int) -> pb.EchoReply:
        if request.delay_ms:
            await asyncio.sleep(request.delay_ms / 1000)
        if request.fail_code:
            await context.abort(grpc.StatusCode(_status_code(request.fail_code)), request.fail_message)
        payload = b"r" * request.reply_size if request.reply_size else request.payload
        return pb.EchoReply(
            payload=payload,
            index=index,
            metadata=_metadata_lines(context.invocation_metadata()),
        )

    async def Unary(self, request: pb.EchoRequest, context: grpc.aio.ServicerContext) -> pb.EchoReply:
        await self._start(context)
        return await self._reply(request, context, 0)

    async def ServerStream(
        self, request: pb.EchoRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EchoReply]:
        await self._start(context)
        for index in range(max(request.repeat, 1)):
            yield await self._reply(request, context, index)

    async def ClientStream(
        self, request_iterator: AsyncIterator[pb.EchoRequest], context: grpc.aio.ServicerContext
    ) -> pb.EchoReply:
        await self._start(context)
        count = 0
        payload = b""
        last = pb.EchoRequest()
        async for request in request_iterator:
            count += 1
            payload += request.payload
            last = request
        reply = await self._reply(last, context, count)
        if not last.reply_size:
            reply.payload = payload
        return reply

    async def Bidi(
        self, request_iterator: AsyncIterator[pb.EchoRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EchoReply]:
        await self._start(context)
        index = 0
        async for request in request_iterator:
            yield await self._reply(request, context, index)
            index += 1


def _status_code(value: int) -> tuple[int, str]:
    """Map a numeric status code to the ``grpc.StatusCode`` enum value."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code.value  # type: ignore[no-any-return]
    return grpc.StatusCode.UNKNOWN.value  # type: ignore[no-any-return]


def build_server(address: str, max_message_size: int = 64 * 1024 * 1024) -> tuple[grpc.aio.Server, int]:
    """Create (but do not start) the example server listening on ``address``.

    Returns the server and the bound port (useful with port 0).  The caller
    must keep a reference to the server: grpc.aio stops a server that is
    garbage-collected.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_size),
            ("grpc.max_send_message_length", max_message_size),
        ]
    )
    pb_grpc.add_CalculatorServicer_to_server(Calculator(), server)
    pb_grpc.add_EchoServicer_to_server(Echo(), server)
    port = server.add_insecure_port(address)
    return server, port
