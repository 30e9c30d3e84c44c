"""Real services of every non-gRPC type for the service-type tests.

* :class:`JsonRpcServer` and :class:`HttpServer`: the demo service
  (``tests/data/services/demo.proto``) as a JSON-RPC 2.0 server and as an
  HTTP/JSON server, each a real ``ThreadingHTTPServer`` on a free port,
  recording what they were sent;
* :func:`python_executable` / :data:`SHELL_EXECUTABLE`: the demo service as
  executables;
* :func:`demo_tarball` and :func:`make_tarball`: proto archives, good and
  bad; :func:`demo_protos`: the demo protos compiled for test clients;
* :class:`Sink` and :func:`invoke`: drive an adapter with a real
  :class:`~snet_daemon.frontend.call.ServerCall`, without a daemon.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from snet_daemon.frontend.call import Handler, ServerCall, start_call
from snet_daemon.frontend.wire import Metadata, metadata_to_headers, status_headers
from snet_daemon.upstream.http import HttpClient
from snet_daemon.upstream.protos import ServiceProtos
from tests.support.aio import aio_fixture
from tests.support.ports import free_port

DATA = Path(__file__).resolve().parent.parent / "data" / "services"
PROTO_FILES = ("demo.proto", "common.proto")
SHELL_EXECUTABLE = str(DATA / "demo_process.sh")
PYTHON_SCRIPT = DATA / "demo_process.py"


# --------------------------------------------------------------------------
# Protos and archives.


@aio_fixture
async def client() -> AsyncIterator[HttpClient]:
    """Fixture: one HTTP client (connection pool), closed after the test."""
    from twisted.internet import reactor

    http = HttpClient(reactor)
    yield http
    await http.close()


def demo_files() -> dict[str, bytes]:
    """The demo service's .proto files, by name."""
    return {name: (DATA / name).read_bytes() for name in PROTO_FILES}


def make_tarball(files: dict[str, bytes], compression: str = "gz") -> bytes:
    """A tar archive of ``files`` (``compression``: ``gz``, ``bz2``, ``xz`` or ``""``)."""
    out = io.BytesIO()
    mode: Any = f"w:{compression}" if compression else "w"
    with tarfile.open(fileobj=out, mode=mode) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def demo_tarball(directory: Path, compression: str = "gz") -> Path:
    """Write the demo protos as an archive in ``directory``; its path."""
    path = directory / f"demo-protos.tar{'.' + compression if compression else ''}"
    path.write_bytes(make_tarball(demo_files(), compression))
    return path


_compiled: ServiceProtos | None = None


def demo_protos() -> ServiceProtos:
    """The demo protos compiled (synchronously, once) for test clients and checks."""
    global _compiled
    if _compiled is None:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{DATA}",
                "--include_imports",
                "--descriptor_set_out=/dev/stdout",
                *PROTO_FILES,
            ],
            check=True,
            capture_output=True,
        )
        _compiled = ServiceProtos(out.stdout)
    return _compiled


#: A ``Timestamp`` that parses but has no JSON form (nanos must be under 10^9).
UNPRINTABLE_TIME: Final = {"nanos": 2_000_000_000}


def request_bytes(**fields: Any) -> bytes:
    """A serialized ``demo.Request``."""
    message = demo_protos().require("/demo.Demo/Echo").input_type(**fields)
    return message.SerializeToString()


def parse_reply(data: bytes) -> Any:
    """A ``demo.Reply`` from bytes."""
    reply = demo_protos().require("/demo.Demo/Echo").output_type()
    reply.ParseFromString(data)
    return reply


class LocalFetcher:
    """Fetches URIs from a dict, or from disk for paths (a stand-in for the metadata loader)."""

    def __init__(self, content: dict[str, bytes] | None = None) -> None:
        self.content = content or {}
        self.fetched: list[str] = []

    async def load(self, uri: str) -> bytes:
        self.fetched.append(uri)
        if uri in self.content:
            return self.content[uri]
        return Path(uri.removeprefix("file://")).read_bytes()  # noqa: ASYNC240 - small local test files


# --------------------------------------------------------------------------
# Executables.


def python_executable(directory: Path) -> str:
    """The Python demo executable, with this interpreter in its ``#!`` line."""
    path = directory / "demo_process.py"
    text = PYTHON_SCRIPT.read_text().split("\n", 1)[1]
    path.write_text(f"#!{sys.executable}\n{text}")
    path.chmod(0o755)
    return str(path)


def pids_alive(pidfile: Path) -> list[int]:
    """Pids listed in ``pidfile`` that still run (zombies count as gone)."""
    alive = []
    for pid in map(int, pidfile.read_text().split()):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds passed (blocking)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


# --------------------------------------------------------------------------
# The demo service's logic, on JSON values (proto3 JSON mapping).


class DemoError(Exception):
    """The demo service refuses: ``code`` and ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


def _echo(value: dict[str, Any]) -> dict[str, Any]:
    options = value.get("options") or {}
    size = int(options.get("reply_size", 0))
    blob = base64.b64encode(b"r" * size).decode() if size else value.get("blob", "")
    return {"text": value.get("text", ""), "count": value.get("count", 0), "blob": blob}


def demo_answer(method: str, value: Any) -> Any:
    """What the demo service answers ``value`` sent to ``method``.

    Raises:
        DemoError: for ``Fail`` and unknown methods (code -32601).
    """
    options = value.get("options") or {} if isinstance(value, dict) else {}
    if method == "Echo":
        return _echo(value)
    if method == "Slow":
        time.sleep(int(options.get("delay_ms", 0)) / 1000)
        return _echo(value)
    if method == "Fail":
        raise DemoError(int(options.get("fail_code", 0)), options.get("fail_message", "failing on purpose"))
    if method == "Split":
        return [{"text": word, "index": i} for i, word in enumerate(value.get("text", "").split())]
    if method == "Join":
        return {"text": " ".join(item.get("text", "") for item in value), "count": len(value)}
    if method == "Chat":
        return [{"text": value.get("text", "").upper()}]
    raise DemoError(-32601, f"method {method} not found")


@dataclass
class Seen:
    """One request a server received."""

    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class _Recorder:
    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: list[Seen] = field(default_factory=list)

    def add(self, item: Seen) -> None:
        with self.lock:
            self.seen.append(item)

    def reset(self) -> None:
        with self.lock:
            self.seen.clear()


class _Listener(ThreadingHTTPServer):
    # The default backlog of 5 drops connections when a pool opens 16 at once.
    request_queue_size = 128
    daemon_threads = True


class _Server:
    """A ``ThreadingHTTPServer`` in a thread, on a free loopback port."""

    handler: type[BaseHTTPRequestHandler]

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.record = _Recorder()
        #: Misbehaviour on demand: ``"bad-gateway"`` (HTML 502), ``"not-jsonrpc"``, ``"wrong-id"``,
        #: ``"lone-surrogates"`` (JSON-RPC: Echo's result and other methods' error text hold them).
        self.mode = "normal"
        handler = type("Handler", (self.handler,), {"server_state": self})
        self.httpd = _Listener(("127.0.0.1", self.port), handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Any:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _BaseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: without this, Nagle's algorithm
    # and the daemon's delayed ACKs add 40 ms to every answer.
    disable_nagle_algorithm = True
    server_state: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> Any:
        size = int(self.headers.get("content-length", "0"))
        raw = self.rfile.read(size)
        return json.loads(raw) if raw else None

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass  # the daemon gave up on this call

    def _record(self, body: Any) -> None:
        parts = urlsplit(self.path)
        headers = {key.lower(): value for key, value in self.headers.items()}
        self.server_state.record.add(Seen(parts.path, parse_qs(parts.query), headers, body))


class _JsonRpcHandler(_BaseHandler):
    def do_POST(self) -> None:
        request = self._body()
        self._record(request)
        mode = self.server_state.mode
        if mode == "bad-gateway":
            self._send(502, b"<html><body>Bad Gateway</body></html>", "text/html")
            return
        if mode == "not-jsonrpc":
            self._send(200, b'{"hello": "world"}')
            return
        request_id = request.get("id")
        if mode == "wrong-id":
            request_id = "someone else's"
        if mode == "lone-surrogates":
            # Valid JSON (escaped) that is no Unicode, and an error code no trailer should carry whole.
            error = {"code": {"long": "c" * 10_000}, "message": "bad \ud800 input"}
            answer = {"jsonrpc": "2.0", "id": request_id, "result": {"text": "a\udfffb"}, "error": error}
            del answer["error" if request["method"] == "Echo" else "result"]
            self._send(200, json.dumps(answer).encode())
            return
        try:
            result = demo_answer(request["method"], request.get("params"))
            answer = {"jsonrpc": "2.0", "id": request_id, "result": result}
        except DemoError as error:
            answer = {
                "jsonrpc": "2.0",
                "id": request_id,
                "error": {"code": error.code, "message": error.message, "data": {"method": request["method"]}},
            }
        self._send(200, json.dumps(answer).encode())


class JsonRpcServer(_Server):
    """The demo service over JSON-RPC 2.0 (POST to any path)."""

    handler = _JsonRpcHandler


class _HttpHandler(_BaseHandler):
    def do_POST(self) -> None:
        body = self._body()
        self._record(body)
        method = urlsplit(self.path).path.rsplit("/", 1)[-1]
        if self.server_state.mode == "bad-gateway":
            self._send(502, b"<html><body>" + b"Bad Gateway " * 200 + b"</body></html>", "text/html")
            return
        try:
            answer = demo_answer(method, body)
        except DemoError as error:
            status = error.code if 400 <= error.code < 600 else (404 if error.code == -32601 else 500)
            self._send(status, f"demo: {error.message}".encode(), "text/plain")
            return
        if method == "Split":
            self._stream_lines(answer)
            return
        if method == "Echo":
            answer = {**answer, "unknown_field": "ignored by the daemon"}
        self._send(200, json.dumps(answer).encode())

    def _stream_lines(self, items: Iterable[Any]) -> None:
        """JSON lines, chunked, one every 50 ms (the daemon must relay each at once)."""
        self.send_response(200)
        self.send_header("content-type", "application/x-ndjson")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for item in items:
                line = json.dumps(item).encode() + b"\n"
                self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                self.wfile.flush()
                time.sleep(0.05)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass


class HttpServer(_Server):
    """The demo service as HTTP/JSON: POST ``/<Method>``; ``Split`` answers JSON lines."""

    handler = _HttpHandler


# --------------------------------------------------------------------------
# Driving an adapter without a daemon.


class Sink:
    """A :class:`~snet_daemon.frontend.call.CallSink` that records the reply."""

    def __init__(self) -> None:
        self.headers: Metadata | None = None
        self.messages: list[bytes] = []
        self.status: int | None = None
        self.message = ""
        self.trailers: Metadata = ()
        #: The status and trailers as header fields, encoded as on the wire.
        self.fields: list[tuple[str, str]] = []
        self.writable = True
        self.done = asyncio.Event()
        self.message_arrived = asyncio.Event()

    def send_headers(self, metadata: Metadata) -> None:
        self.headers = metadata

    def send_message(self, message: bytes) -> None:
        self.messages.append(message)
        self.message_arrived.set()

    def send_trailers(self, status: int, message: str, metadata: Metadata, trailers_only: bool) -> None:
        self.status, self.message, self.trailers = status, message, metadata
        # As the front ends encode them: a status they cannot encode is never sent.
        self.fields = [
            (name, value.encode("utf-8").decode())
            for name, value in [*status_headers(status, message), *metadata_to_headers(metadata)]
        ]
        self.done.set()

    def can_write(self) -> bool:
        return self.writable

    def consumed(self, size: int) -> None:
        pass

    def trailer(self, name: str) -> str | bytes | None:
        return dict(self.trailers).get(name)


def new_call(
    method: str, *, content_type: str = "application/grpc", timeout: float | None = None
) -> tuple[ServerCall, Sink]:
    """A call as the front end would make it, and its sink."""
    loop = asyncio.get_running_loop()
    sink = Sink()
    call = ServerCall(method, (), sink, loop, deadline=None if timeout is None else loop.time() + timeout)
    call.content_type = content_type
    return call, sink


async def invoke(
    handler: Handler,
    method: str,
    requests: Iterable[bytes],
    *,
    content_type: str = "application/grpc",
    timeout: float | None = 20.0,  # noqa: ASYNC109 - the call's deadline, enforced by the front end
) -> Sink:
    """Run ``handler`` on a call carrying ``requests`` (then closed); the finished sink."""
    call, sink = new_call(method, content_type=content_type, timeout=timeout)
    for request in requests:
        call.deliver(request)
    call.end_input()
    start_call(handler, call)
    assert call.task is not None
    await call.task
    return sink


def json_bytes(value: Any) -> bytes:
    """A JSON message as a client sends it."""
    return json.dumps(value).encode()


def lines(data: Iterator[bytes]) -> list[Any]:
    """Decode JSON messages."""
    return [json.loads(item) for item in data]
