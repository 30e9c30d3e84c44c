"""The calls the benchmark makes: gRPC frames for h2load and grpcio probes.

h2load sends the same prebuilt request body for every call and does not look
at ``grpc-status``, so each path is first checked with a real grpcio call of
the same kind (`Kind.check`): a path that answers HTTP 200 with a gRPC error
would otherwise be measured as if it worked.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon._proto import example_service_pb2_grpc as pb_grpc

#: Payload of every request (the issue's "small" message).
PAYLOAD = b"x" * 32
#: Replies per server-streaming call and requests per client-streaming call.
STREAM_MESSAGES = 10


def grpc_frame(message: bytes) -> bytes:
    """Frame one serialized message: flag 0 (uncompressed), 4-byte length, bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of call: its method, its request body and its probe.

    Attributes:
        name: The name used on the command line and in the report.
        method: The HTTP/2 path of the gRPC method.
        body: The request body h2load sends (one or more gRPC frames).
        describe: One line for the report.
        check: Makes one grpcio call of this kind on a channel and raises
            if the reply is not what the echo service sends.
    """

    name: str
    method: str
    body: bytes
    describe: str
    check: Callable[[grpc.Channel], None]


def _stub(channel: grpc.Channel) -> Any:
    """An Echo stub, typed loosely: the generated stubs may lack type hints."""
    factory: Any = pb_grpc.EchoStub
    return factory(channel)


def _check_unary(channel: grpc.Channel) -> None:
    """One Unary call; the echo must come back."""
    reply = _stub(channel).Unary(pb.EchoRequest(payload=PAYLOAD), timeout=5)
    if reply.payload != PAYLOAD:
        raise ValueError(f"Unary echoed {reply.payload!r}")


def _check_server_stream(channel: grpc.Channel) -> None:
    """One ServerStream call; all replies must come back."""
    request = pb.EchoRequest(payload=PAYLOAD, repeat=STREAM_MESSAGES)
    replies = list(_stub(channel).ServerStream(request, timeout=5))
    if len(replies) != STREAM_MESSAGES or any(r.payload != PAYLOAD for r in replies):
        raise ValueError(f"ServerStream returned {len(replies)} replies, not {STREAM_MESSAGES}")


def _check_client_stream(channel: grpc.Channel) -> None:
    """One ClientStream call; the service must count every request."""
    requests = iter([pb.EchoRequest(payload=PAYLOAD)] * STREAM_MESSAGES)
    reply = _stub(channel).ClientStream(requests, timeout=5)
    if reply.index != STREAM_MESSAGES:
        raise ValueError(f"ClientStream counted {reply.index} requests, not {STREAM_MESSAGES}")


def _kinds() -> dict[str, Kind]:
    """Build the catalogue of call kinds."""
    unary = pb.EchoRequest(payload=PAYLOAD).SerializeToString()
    stream = pb.EchoRequest(payload=PAYLOAD, repeat=STREAM_MESSAGES).SerializeToString()
    return {
        "unary": Kind(
            "unary",
            "/example_service.Echo/Unary",
            grpc_frame(unary),
            f"Echo/Unary, {len(PAYLOAD)}-byte payload",
            _check_unary,
        ),
        "stream": Kind(
            "stream",
            "/example_service.Echo/ServerStream",
            grpc_frame(stream),
            f"Echo/ServerStream, {STREAM_MESSAGES} replies per call",
            _check_server_stream,
        ),
        "cstream": Kind(
            "cstream",
            "/example_service.Echo/ClientStream",
            grpc_frame(unary) * STREAM_MESSAGES,
            f"Echo/ClientStream, {STREAM_MESSAGES} requests per call",
            _check_client_stream,
        ),
    }


#: Every kind the harness knows, by name.
KINDS: dict[str, Kind] = _kinds()


def probe(address: str, kinds: list[Kind]) -> None:
    """Make one grpcio call of each kind to ``address`` (``host:port``).

    A fresh channel is used and closed, so the probe leaves no connection
    open on the path while it is measured.

    Raises:
        grpc.RpcError: If a call fails.
        ValueError: If a reply is wrong.
    """
    with grpc.insecure_channel(address) as channel:
        for kind in kinds:
            kind.check(channel)
