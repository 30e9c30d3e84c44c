"""A real grpcio server playing the AI service behind the daemon in tests.

It implements ``protos/example_service.proto`` (Echo and Calculator) with
grpcio's thread-pool server, and records what it saw: the metadata of each
call, whether a call was cancelled by its client (the daemon), and how many
replies a stream produced, so tests can check what the daemon forwarded and
that cancellation and backpressure reach the service.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon._proto import example_service_pb2_grpc as pb_grpc


@dataclass
class Record:
    """What the service observed; shared across calls (lock-protected)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    metadata: list[tuple[tuple[str, str | bytes], ...]] = field(default_factory=list)
    cancelled: int = 0
    replies_sent: int = 0
    requests_seen: int = 0
    finished: threading.Event = field(default_factory=threading.Event)

    def reset(self) -> None:
        with self.lock:
            self.metadata.clear()
            self.cancelled = 0
            self.replies_sent = 0
            self.requests_seen = 0
            self.finished.clear()


def _code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


class RecordingEcho(pb_grpc.EchoServicer):
    """The Echo service, recording cancellations and reply counts."""

    def __init__(self, record: Record) -> None:
        self.record = record

    def _begin(self, context: grpc.ServicerContext) -> None:
        with self.record.lock:
            self.record.metadata.append(tuple(context.invocation_metadata()))
        context.send_initial_metadata((("x-echo-initial", "yes"),))
        context.set_trailing_metadata((("x-echo-trailer", "yes"), ("x-echo-trailer-bin", b"\x00\x01\xff")))

    def _wait(self, request: pb.EchoRequest, context: grpc.ServicerContext) -> bool:
        """Sleep ``delay_ms``; False (and recorded) if the client cancelled."""
        end = time.monotonic() + request.delay_ms / 1000
        while time.monotonic() < end:
            if not context.is_active():
                with self.record.lock:
                    self.record.cancelled += 1
                return False
            time.sleep(0.01)
        return True

    def _reply(self, request: pb.EchoRequest, context: grpc.ServicerContext, index: int) -> pb.EchoReply:
        if request.fail_code:
            context.abort(_code(request.fail_code), request.fail_message)
        payload = b"r" * request.reply_size if request.reply_size else request.payload
        with self.record.lock:
            self.record.replies_sent += 1
        return pb.EchoReply(
            payload=payload,
            index=index,
            metadata=[f"{k}={v.hex() if isinstance(v, bytes) else v}" for k, v in context.invocation_metadata()],
        )

    def Unary(self, request: pb.EchoRequest, context: grpc.ServicerContext) -> pb.EchoReply:
        self._begin(context)
        try:
            if not self._wait(request, context):
                return pb.EchoReply()
            return self._reply(request, context, 0)
        finally:
            self.record.finished.set()

    def ServerStream(self, request: pb.EchoRequest, context: grpc.ServicerContext) -> Iterator[pb.EchoReply]:
        self._begin(context)
        try:
            for index in range(max(request.repeat, 1)):
                if not self._wait(request, context):
                    return
                if not context.is_active():
                    with self.record.lock:
                        self.record.cancelled += 1
                    return
                yield self._reply(request, context, index)
        finally:
            self.record.finished.set()

    def ClientStream(self, request_iterator: Iterator[pb.EchoRequest], context: grpc.ServicerContext) -> pb.EchoReply:
        self._begin(context)
        count = 0
        payload = b""
        last = pb.EchoRequest()
        for request in request_iterator:
            count += 1
            with self.record.lock:
                self.record.requests_seen += 1
            payload += request.payload
            last = request
        reply = self._reply(last, context, count)
        if not last.reply_size:
            reply.payload = payload
        self.record.finished.set()
        return reply

    def Bidi(self, request_iterator: Iterator[pb.EchoRequest], context: grpc.ServicerContext) -> Iterator[pb.EchoReply]:
        self._begin(context)
        index = 0
        try:
            for request in request_iterator:
                with self.record.lock:
                    self.record.requests_seen += 1
                if not self._wait(request, context):
                    return
                yield self._reply(request, context, index)
                index += 1
        finally:
            self.record.finished.set()


class SyncCalculator(pb_grpc.CalculatorServicer):
    """The Calculator with grpcio's synchronous API."""

    def add(self, request: pb.Numbers, context: grpc.ServicerContext) -> pb.Result:
        return pb.Result(value=request.a + request.b)

    def sub(self, request: pb.Numbers, context: grpc.ServicerContext) -> pb.Result:
        return pb.Result(value=request.a - request.b)

    def mul(self, request: pb.Numbers, context: grpc.ServicerContext) -> pb.Result:
        return pb.Result(value=request.a * request.b)

    def div(self, request: pb.Numbers, context: grpc.ServicerContext) -> pb.Result:
        if request.b == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "division by zero")
        return pb.Result(value=request.a / request.b)


class Upstream:
    """The test service on a fixed port; it can be stopped and started again."""

    def __init__(
        self, port: int, max_message_size: int = 64 * 1024 * 1024, options: Sequence[tuple[str, Any]] = ()
    ) -> None:
        self.port = port
        self.record = Record()
        self._max = max_message_size
        #: More grpcio server options (e.g. ``grpc.max_connection_age_ms``).
        self._options = list(options)
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Upstream:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64),
            options=[
                ("grpc.max_receive_message_length", self._max),
                ("grpc.max_send_message_length", self._max),
                ("grpc.so_reuseport", 0),
                *self._options,
            ],
        )
        pb_grpc.add_EchoServicer_to_server(RecordingEcho(self.record), server)
        pb_grpc.add_CalculatorServicer_to_server(SyncCalculator(), server)
        bound = server.add_insecure_port(f"127.0.0.1:{self.port}")
        if bound != self.port:
            raise RuntimeError(f"could not bind test service to port {self.port}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None


class ExampleServiceProcess:
    """``python -m snet_daemon.example_service`` in its own process, as a provider runs it.

    Args:
        port: where it listens (on 127.0.0.1).
        prefix: put before the command, e.g. ``["taskset", "-c", "0"]``.
    """

    def __init__(self, port: int, prefix: tuple[str, ...] = ()) -> None:
        self.port = port
        argv = [*prefix, sys.executable, "-m", "snet_daemon.example_service", "--port", str(port)]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not _accepts(port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the example service did not start on port {port}")
            time.sleep(0.05)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True
