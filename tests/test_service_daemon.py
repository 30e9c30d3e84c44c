"""Every service type through a real ``twistd snetd``, called by grpcio clients.

Behind each daemon: the demo JSON-RPC server, the demo HTTP server, or the
demo executables (Python and shell), described by a local service metadata
file (``service_metadata_uri``, with ``blockchain_enabled: false``) whose
``service_api_source`` is a tar.gz of ``tests/data/services/*.proto``.  After
every misbehaviour (errors, timeouts, cancellations, 20 MB payloads, stderr,
executables that do not read or never end) the daemon must still answer.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import make_channel
from tests.support.daemon import Daemon
from tests.support.rawhttp import decode_grpc_web_body, http1_request
from tests.support.services import (
    SHELL_EXECUTABLE,
    HttpServer,
    JsonRpcServer,
    demo_protos,
    demo_tarball,
    pids_alive,
    python_executable,
    wait_for,
)

MIB = 1024 * 1024
#: service_timeout of the test daemons: calls without a client deadline end after it.
SERVICE_TIMEOUT = 3.0

#: (service_type, encoding, executable) of each daemon under test.
FLAVOURS = {
    "jsonrpc": ("jsonrpc", "proto", None),
    "jsonrpc-json": ("jsonrpc", "json", None),
    "http": ("http", "proto", None),
    "http-json": ("http", "json", None),
    "process-python": ("process", "proto", "python"),
    "process-python-json": ("process", "json", "python"),
    "process-shell": ("process", "proto", "shell"),
}
PROTO_FLAVOURS = ["jsonrpc", "http", "process-python", "process-shell"]
JSON_FLAVOURS = ["jsonrpc-json", "http-json", "process-python-json"]
STREAMING_FLAVOURS = ["jsonrpc", "http", "process-python"]


class Running:
    """The daemons, started on first use and stopped at the end of the module."""

    def __init__(self, workdir: Path, jsonrpc: JsonRpcServer, http: HttpServer) -> None:
        self.workdir = workdir
        self.jsonrpc = jsonrpc
        self.http = http
        self.daemons: dict[str, Daemon] = {}
        self.pidfile = workdir / "hang.pids"
        self.tarball = demo_tarball(workdir)

    def get(self, flavour: str) -> Daemon:
        if flavour not in self.daemons:
            self.daemons[flavour] = self._start(flavour)
        return self.daemons[flavour]

    def _start(self, flavour: str) -> Daemon:
        service_type, encoding, executable = FLAVOURS[flavour]
        directory = self.workdir / flavour
        directory.mkdir()
        metadata = directory / "service_metadata.json"
        metadata.write_text(
            json.dumps(
                {
                    "version": 1,
                    "display_name": f"demo {flavour}",
                    "service_type": service_type,
                    "encoding": encoding,
                    "service_api_source": f"file://{self.tarball}",
                    "groups": [{"group_name": "default_group", "pricing": []}],
                }
            )
        )
        config: dict[str, Any] = {
            "service_metadata_uri": str(metadata),
            "max_message_size_in_mb": 64,
            "service_timeout": f"{SERVICE_TIMEOUT:g}s",
            "log": {"level": "info"},
            "service_heartbeat_type": "none",
        }
        if service_type == "jsonrpc":
            config["service_endpoint"] = self.jsonrpc.url
        elif service_type == "http":
            config["service_endpoint"] = self.http.url
            config["service_credentials"] = [{"key": "X-Api-Key", "value": "secret", "location": "header"}]
        else:
            config["executable_path"] = python_executable(directory) if executable == "python" else SHELL_EXECUTABLE
            config["max_concurrent_processes"] = 4
        daemon = Daemon(directory, config, env={"DEMO_PIDFILE": str(self.pidfile)}).start()
        # The metadata is loaded and the protos compiled after the port opens.
        if not wait_for(lambda: "ready: encoding" in daemon.log_path.read_text(errors="replace"), 20):
            daemon.stop()
            raise RuntimeError(f"{flavour}: the service type never became ready:\n{daemon.log_tail()}")
        return daemon

    def stop(self) -> None:
        for daemon in self.daemons.values():
            daemon.stop()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The demo servers and, lazily, one daemon per flavour."""
    with JsonRpcServer() as jsonrpc, HttpServer() as http:
        daemons = Running(tmp_path_factory.mktemp("service-types"), jsonrpc, http)
        try:
            yield daemons
        finally:
            daemons.stop()


# --------------------------------------------------------------------------
# Clients.


def _codec(encoding: str) -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    method = demo_protos().require("/demo.Demo/Echo")
    if encoding == "json":
        return (lambda value: json.dumps(value).encode()), json.loads

    def serialize(fields: Any) -> bytes:
        return bytes(method.input_type(**fields).SerializeToString())

    return serialize, method.output_type.FromString


class Client:
    """grpcio calls to the demo methods, with protobuf or JSON messages (dicts in, replies out)."""

    def __init__(self, daemon: Daemon, encoding: str) -> None:
        self.channel = make_channel(daemon.address)
        self.encoding = encoding
        self.serialize, self.deserialize = _codec(encoding)

    def unary(self, name: str, **kwargs: Any) -> Any:
        return self.channel.unary_unary(
            f"/demo.Demo/{name}", request_serializer=self.serialize, response_deserializer=self.deserialize
        )

    def server_stream(self, name: str) -> Any:
        return self.channel.unary_stream(
            f"/demo.Demo/{name}", request_serializer=self.serialize, response_deserializer=self.deserialize
        )

    def client_stream(self, name: str) -> Any:
        return self.channel.stream_unary(
            f"/demo.Demo/{name}", request_serializer=self.serialize, response_deserializer=self.deserialize
        )

    def bidi(self, name: str) -> Any:
        return self.channel.stream_stream(
            f"/demo.Demo/{name}", request_serializer=self.serialize, response_deserializer=self.deserialize
        )

    def text(self, reply: Any) -> str:
        return str(reply.get("text", "")) if self.encoding == "json" else str(reply.text)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def client_for(running: Running) -> Iterator[Callable[[str], Client]]:
    """Open clients to a flavour's daemon (closed after the test)."""
    clients: list[Client] = []

    def make(flavour: str) -> Client:
        client = Client(running.get(flavour), FLAVOURS[flavour][1])
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def assert_healthy(daemon: Daemon, encoding: str = "proto") -> None:
    """The daemon runs, answers its heartbeat and serves an Echo."""
    assert daemon.process is not None
    assert daemon.process.poll() is None, daemon.log_tail()
    with urllib.request.urlopen(f"http://{daemon.address}/heartbeat", timeout=5) as reply:
        assert reply.status == 200
    client = Client(daemon, encoding)
    try:
        reply = client.unary("Echo")({"text": "still here"}, timeout=10)
        assert client.text(reply) == "still here"
    finally:
        client.close()


# --------------------------------------------------------------------------
# Unary calls, both encodings.


@pytest.mark.parametrize("flavour", PROTO_FLAVOURS)
def test_protobuf_clients_get_answers(client_for: Callable[[str], Client], flavour: str) -> None:
    """A protobuf Echo through the daemon comes back intact."""
    client = client_for(flavour)
    reply = client.unary("Echo")({"text": "hello", "count": 42, "blob": b"\x00\x01\xff"}, timeout=10)
    assert (reply.text, reply.count, reply.blob) == ("hello", 42, b"\x00\x01\xff")


@pytest.mark.parametrize("flavour", JSON_FLAVOURS)
def test_json_clients_get_answers(client_for: Callable[[str], Client], flavour: str) -> None:
    """With encoding json, grpcio clients sending JSON messages get JSON replies."""
    client = client_for(flavour)
    reply = client.unary("Echo")({"text": "json", "count": "7"}, timeout=10)
    assert reply["text"] == "json"
    assert str(reply["count"]) == "7"


def test_grpc_web_json_reaches_a_proto_service(running: Running) -> None:
    """application/grpc-web+json is converted by the daemon for a proto jsonrpc service."""
    daemon = running.get("jsonrpc")
    message = json.dumps({"text": "web"}).encode()
    status, _, body = http1_request(
        daemon.address,
        "POST",
        "/demo.Demo/Echo",
        {"content-type": "application/grpc-web+json", "x-grpc-web": "1"},
        b"\0" + len(message).to_bytes(4, "big") + message,
    )
    assert status == 200
    messages, trailers = decode_grpc_web_body(body, text=False)
    assert trailers["grpc-status"] == "0", trailers
    assert json.loads(messages[0])["text"] == "web"


def test_http_credentials_reach_the_service(client_for: Callable[[str], Client], running: Running) -> None:
    """service_credentials from the configuration are sent to the HTTP service."""
    running.http.record.reset()
    client_for("http").unary("Echo")({"text": "c"}, timeout=10)
    assert running.http.record.seen[-1].headers["x-api-key"] == "secret"


def test_unknown_methods_are_unimplemented(client_for: Callable[[str], Client]) -> None:
    """A method that is not in the service's protos is UNIMPLEMENTED."""
    client = client_for("jsonrpc")
    with pytest.raises(grpc.RpcError) as caught:
        client.channel.unary_unary("/demo.Demo/Missing")(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --------------------------------------------------------------------------
# Service errors.


@pytest.mark.parametrize(
    ("flavour", "code", "fragment"),
    [
        ("jsonrpc", grpc.StatusCode.NOT_FOUND, "no such model"),
        ("http", grpc.StatusCode.UNAVAILABLE, "service answered HTTP 503: demo: no such model"),
        ("process-python", grpc.StatusCode.INTERNAL, "the executable exited with status 5"),
        ("process-shell", grpc.StatusCode.INTERNAL, "the executable exited with status 7"),
    ],
)
def test_service_errors_become_grpc_errors(
    client_for: Callable[[str], Client], running: Running, flavour: str, code: grpc.StatusCode, fragment: str
) -> None:
    """Each type's failure is a gRPC error; an executable's stderr goes to the log, not the client."""
    client = client_for(flavour)
    fail_code = 503 if flavour == "http" else 5
    with pytest.raises(grpc.RpcError) as caught:
        client.unary("Fail")({"options": {"fail_code": fail_code, "fail_message": "no such model"}}, timeout=10)
    assert caught.value.code() == code
    assert fragment in caught.value.details()
    daemon = running.get(flavour)
    if flavour.startswith("process"):
        assert "failing on purpose" not in caught.value.details()
        assert wait_for(lambda: "failing on purpose" in daemon.log_path.read_text(errors="replace"), 5)
    assert_healthy(daemon)


# --------------------------------------------------------------------------
# Timeouts and cancellation.


@pytest.mark.parametrize("flavour", ["jsonrpc", "http", "process-python"])
def test_client_deadlines_are_kept(client_for: Callable[[str], Client], running: Running, flavour: str) -> None:
    """A slow answer past the client's deadline is DEADLINE_EXCEEDED, on time."""
    client = client_for(flavour)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        client.unary("Slow")({"options": {"delay_ms": 2500}}, timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 2.0
    assert_healthy(running.get(flavour))


@pytest.mark.parametrize("flavour", ["process-python", "process-shell"])
def test_service_timeout_kills_a_hanging_executable(
    client_for: Callable[[str], Client], running: Running, flavour: str
) -> None:
    """Without a client deadline, service_timeout ends the call and kills the executable and its child."""
    running.pidfile.unlink(missing_ok=True)
    client = client_for(flavour)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        client.unary("Hang")({})
    elapsed = time.monotonic() - start
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert SERVICE_TIMEOUT - 0.5 < elapsed < SERVICE_TIMEOUT + 3
    assert wait_for(lambda: running.pidfile.exists() and not pids_alive(running.pidfile), 5)
    assert len(running.pidfile.read_text().split()) == 2
    assert_healthy(running.get(flavour))


@pytest.mark.parametrize("flavour", ["jsonrpc", "http", "process-python"])
def test_cancelled_calls_leave_the_daemon_healthy(
    client_for: Callable[[str], Client], running: Running, flavour: str
) -> None:
    """A client that cancels mid-call: the work is abandoned (the executable killed), the daemon carries on."""
    running.pidfile.unlink(missing_ok=True)
    client = client_for(flavour)
    method = "Hang" if flavour.startswith("process") else "Slow"
    future = client.unary(method).future({"options": {"delay_ms": 2000}}, timeout=30)
    if flavour.startswith("process"):
        assert wait_for(lambda: running.pidfile.exists() and len(running.pidfile.read_text().split()) == 2, 10)
    else:
        time.sleep(0.3)
    future.cancel()
    assert future.cancelled()
    if flavour.startswith("process"):
        assert wait_for(lambda: not pids_alive(running.pidfile), 5)
    assert_healthy(running.get(flavour))


def test_sigterm_to_twistd_alone_lets_a_running_executable_finish(running: Running, tmp_path: Path) -> None:
    """What `systemctl stop` does under etc/snetd.service (KillMode=mixed): SIGTERM to twistd alone.
    The running call's executable is not signalled and the call ends with its reply during the
    drain.  (With systemd's default, KillMode=control-group, the executable got SIGTERM too and
    the call failed with INTERNAL.)"""
    own = Running(tmp_path, running.jsonrpc, running.http)
    daemon = own.get("process-python")
    client = Client(daemon, "proto")
    try:
        future = client.unary("Slow").future({"text": "late", "options": {"delay_ms": 1500}}, timeout=20)
        time.sleep(0.5)  # the executable is running
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        assert future.result().text == "late"
        assert daemon.process.wait(20) == -signal.SIGTERM
    finally:
        client.close()
        own.stop()


# --------------------------------------------------------------------------
# Large payloads and misbehaving executables.


@pytest.mark.parametrize("flavour", PROTO_FLAVOURS)
def test_twenty_megabyte_payloads(client_for: Callable[[str], Client], running: Running, flavour: str) -> None:
    """A 20 MB request and its 20 MB echo pass through every service type."""
    blob = bytes(range(256)) * (20 * MIB // 256)
    reply = client_for(flavour).unary("Echo")({"blob": blob}, timeout=60)
    assert reply.blob == blob
    assert_healthy(running.get(flavour))


@pytest.mark.parametrize("flavour", ["process-python", "process-shell"])
def test_executables_that_never_read_stdin(client_for: Callable[[str], Client], running: Running, flavour: str) -> None:
    """A 20 MB request to an executable that never reads stdin: answered, no deadlock."""
    reply = client_for(flavour).unary("NoRead")({"blob": b"z" * 20 * MIB}, timeout=30)
    assert reply.text == ("no-read" if flavour == "process-python" else "")
    assert_healthy(running.get(flavour))


def test_stderr_never_mixes_into_the_reply(client_for: Callable[[str], Client], running: Running) -> None:
    """An executable writing 1 MB to stderr answers cleanly."""
    reply = client_for("process-python").unary("Noisy")({"text": "clean"}, timeout=20)
    assert reply.text == "clean"
    assert reply.blob == b""
    assert_healthy(running.get("process-python"))


# --------------------------------------------------------------------------
# Streaming.


@pytest.mark.parametrize("flavour", STREAMING_FLAVOURS)
def test_server_streaming(client_for: Callable[[str], Client], flavour: str) -> None:
    """One request, one reply per word, in order."""
    client = client_for(flavour)
    replies = list(client.server_stream("Split")({"text": "alpha beta gamma"}, timeout=10))
    assert [client.text(r) for r in replies] == ["alpha", "beta", "gamma"]


@pytest.mark.parametrize("flavour", STREAMING_FLAVOURS)
def test_client_streaming(client_for: Callable[[str], Client], flavour: str) -> None:
    """Many requests, one reply joining them."""
    client = client_for(flavour)
    reply = client.client_stream("Join")(iter([{"text": "x"}, {"text": "y"}, {"text": "z"}]), timeout=10)
    assert (reply.text, reply.count) == ("x y z", 3)


@pytest.mark.parametrize("flavour", [*STREAMING_FLAVOURS, "process-python-json"])
def test_bidi_streaming(client_for: Callable[[str], Client], flavour: str) -> None:
    """Each request is answered in order (jsonrpc/http: one request each; process: one executable)."""
    client = client_for(flavour)
    replies = list(client.bidi("Chat")(iter([{"text": "a"}, {"text": "b"}]), timeout=10))
    assert [client.text(r) for r in replies] == ["A", "B"]
