"""A real gRPC health server (``grpc.health.v1.Health/Check``) for heartbeat tests.

grpcio-health-checking is not installed.  The two messages are built here
from a descriptor in a private pool, so the test decodes the request the
daemon encodes by hand with protobuf itself, not with the daemon's own
reading of the wire format.  The servicer answers like grpcio's
``HealthServicer``: the status of a known service name, ``NOT_FOUND`` for
any other name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVING = 1
NOT_SERVING = 2

_F = descriptor_pb2.FieldDescriptorProto


def _message_classes() -> tuple[Any, Any]:
    """``HealthCheckRequest`` and ``HealthCheckResponse`` of grpc/health/v1/health.proto."""
    file = descriptor_pb2.FileDescriptorProto(
        name="tests/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = file.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    response = file.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=_F.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=_F.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")),
    )


HealthCheckRequest, HealthCheckResponse = _message_classes()


@dataclass
class GrpcHealth:
    """What the health server answers, and what it was asked.

    Attributes:
        statuses: service name -> ServingStatus; a name not in it is NOT_FOUND.
        asked: the ``service`` field of every Check received, in order.
        port: where the server listens (set once started).
    """

    statuses: dict[str, int] = field(default_factory=lambda: {"": SERVING})
    asked: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answer(self, request: Any) -> tuple[Any, grpc.StatusCode | None]:
        """The reply to ``request``, or the error status instead."""
        self.asked.append(request.service)
        if request.service not in self.statuses:
            return None, grpc.StatusCode.NOT_FOUND
        return HealthCheckResponse(status=self.statuses[request.service]), None


def _handler(method: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                method,
                request_deserializer=HealthCheckRequest.FromString,
                response_serializer=lambda reply: reply.SerializeToString(),
            )
        },
    )


@asynccontextmanager
async def aio_health_server(health: GrpcHealth | None = None) -> AsyncIterator[GrpcHealth]:
    """A ``grpc.aio`` health server on the running loop (``aio_test`` tests)."""
    state = health or GrpcHealth()

    async def check(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        reply, error = state.answer(request)
        if error is not None:
            await context.abort(error, "unknown service")
        return reply

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(check),))
    state.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield state
    finally:
        await server.stop(None)


@contextmanager
def health_server(health: GrpcHealth | None = None, tls: tuple[Path, Path] | None = None) -> Iterator[GrpcHealth]:
    """A thread-pool health server (for tests that block, e.g. on a daemon subprocess).

    Args:
        health: what it answers.
        tls: ``(certificate, key)`` PEM files to serve TLS with; None: plaintext.
    """
    state = health or GrpcHealth()

    def check(request: Any, context: grpc.ServicerContext) -> Any:
        reply, error = state.answer(request)
        if error is not None:
            context.abort(error, "unknown service")
        return reply

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((_handler(check),))
    if tls is None:
        state.port = server.add_insecure_port("127.0.0.1:0")
    else:
        certificate, key = tls
        credentials = grpc.ssl_server_credentials([(key.read_bytes(), certificate.read_bytes())])
        state.port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield state
    finally:
        server.stop(None)


def connections_to(port: int) -> int:
    """Open TCP connections to ``127.0.0.1:port``, counted at their client end.

    A gRPC server does not say how many connections it holds; the kernel
    does (``/proc/net/tcp``, state 01 is ESTABLISHED).
    """
    remote = f"0100007F:{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == remote and fields[3] == "01":
            count += 1
    return count
