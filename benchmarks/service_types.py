"""One row per service type: calls/s and latency through a real snetd at 16 calls in flight.

Usage::

    .venv/bin/python benchmarks/service_types.py                 # ~20 s
    .venv/bin/python benchmarks/service_types.py --types jsonrpc,process --duration 3

For each service type the script starts a backend and a ``twistd -n snetd``
in front of it (both pinned to the proxy CPU, as ``run.py`` does), checks one
real grpcio call, then loads the daemon with h2load (``-c 4 -m 4``: 16 calls
in flight, pinned to the load CPU) with a unary call carrying a 32-byte
text, and reports calls/s, p50/p99 latency and CPU time per call:

* ``grpc``: the example echo service (grpc.aio), ``/example_service.Echo/Unary``;
* ``jsonrpc``: the tests' demo JSON-RPC server (``ThreadingHTTPServer``),
  ``/demo.Demo/Echo`` converted protobuf -> JSON-RPC -> protobuf;
* ``http``: the tests' demo HTTP server, the same call as a POST ``/Echo``;
* ``process``: ``tests/data/services/demo_process.sh`` (``exec cat``), one
  ``setsid`` + ``sh`` + ``cat`` per call.

``daemon us/call`` counts the daemon and, for ``process``, the executables
it ran and reaped (``cutime``/``cstime``); ``backend us/call`` the backend's
process tree.  The backends are Python test servers, so calls/s mostly shows
what one shared core affords daemon + backend; compare daemon CPU per call
between types.  Numbers are measurements, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from _grpc import KINDS, grpc_frame
from _h2load import Load, LoadError, measure, warm_up
from _procs import HarnessError, ManagedProcess, StartError, cpu_seconds, free_port, require_tools

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TYPES = ("grpc", "jsonrpc", "http", "process")
TEXT = "x" * 32
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    """One service type's measurement."""

    service_type: str
    calls_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    daemon_us: float = 0.0
    backend_us: float = 0.0
    failed: int = 0
    error: str | None = None


def reaped_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``'s children that exited and were reaped (``cutime + cstime``)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0.0
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[13]) + int(fields[14])) / _TICKS


def serve(kind: str, port: int) -> None:
    """Run a demo backend (``--serve``) until killed."""
    from tests.support.services import HttpServer, JsonRpcServer

    server = JsonRpcServer(port) if kind == "jsonrpc" else HttpServer(port)
    print(f"{kind} backend on {server.url}", flush=True)
    server.httpd.serve_forever()


def _demo_request() -> bytes:
    from tests.support.services import request_bytes

    return request_bytes(text=TEXT)


def _probe(address: str, service_type: str) -> None:
    """One grpcio Echo through the daemon; raises unless the text comes back."""
    with grpc.insecure_channel(address) as channel:
        if service_type == "grpc":
            KINDS["unary"].check(channel)
            return
        from tests.support.services import parse_reply

        reply = channel.unary_unary("/demo.Demo/Echo")(_demo_request(), timeout=5)
        if parse_reply(reply).text != TEXT:
            raise ValueError(f"Echo answered {reply!r}")


class Bench:
    """Starts, measures and stops one service type at a time."""

    def __init__(self, args: argparse.Namespace, tools: dict[str, str], tmp: Path) -> None:
        self.args = args
        self.tools = tools
        self.tmp = tmp
        self.env = {"PYTHONPATH": str(REPO)}
        from tests.support.services import demo_tarball

        self.tarball = demo_tarball(tmp)

    def run(self, service_type: str) -> Row:
        row = Row(service_type)
        processes: list[ManagedProcess] = []
        try:
            backend, backend_port = self._backend(service_type)
            if backend is not None:
                processes.append(backend)
            daemon, port = self._daemon(service_type, backend_port)
            processes.append(daemon)
            self._measure(row, daemon, backend, port)
        except (HarnessError, StartError, LoadError, grpc.RpcError, ValueError) as exc:
            row.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"{service_type}: {exc}", file=sys.stderr)
        finally:
            for process in reversed(processes):
                process.stop()
        return row

    def _backend(self, service_type: str) -> tuple[ManagedProcess | None, int]:
        if service_type == "process":
            return None, 0
        port = free_port()
        if service_type == "grpc":
            argv = [sys.executable, "-m", "snet_daemon.example_service", "--host", HOST, "--port", str(port)]
        else:
            argv = [sys.executable, __file__, "--serve", service_type, "--port", str(port)]
        process = ManagedProcess(
            f"{service_type} backend", argv, self.tmp / f"{service_type}-backend.log", self.args.proxy_cpu, self.env
        )
        process.start()
        process.wait_ready(HOST, port, lambda: None, 20)
        return process, port

    def _daemon(self, service_type: str, backend_port: int) -> tuple[ManagedProcess, int]:
        port = free_port()
        metadata = self.tmp / f"{service_type}-metadata.json"
        metadata.write_text(
            json.dumps(
                {
                    "service_type": service_type,
                    "encoding": "proto",
                    "service_api_source": str(self.tarball) if service_type != "grpc" else "",
                }
            )
        )
        config: dict[str, Any] = {
            "daemon_endpoint": f"{HOST}:{port}",
            "service_endpoint": f"http://{HOST}:{backend_port or 9}",
            "blockchain_enabled": False,
            "payment_channel_storage_type": "memory",
            "service_metadata_uri": str(metadata),
            "service_heartbeat_type": "none",
            "log": {"level": "warn"},
        }
        if service_type == "process":
            config["executable_path"] = str(REPO / "tests" / "data" / "services" / "demo_process.sh")
        path = self.tmp / f"{service_type}-snetd.json"
        path.write_text(json.dumps(config))
        twistd = str(Path(sys.executable).parent / "twistd")
        process = ManagedProcess(
            f"snetd ({service_type})",
            [twistd, "-n", "--pidfile=", "snetd", f"--config={path}"],
            self.tmp / f"{service_type}-snetd.log",
            self.args.proxy_cpu,
            self.env,
            self.tmp,
        )
        process.start()
        process.wait_ready(HOST, port, lambda: _probe(f"{HOST}:{port}", service_type), 30)
        return process, port

    def _measure(self, row: Row, daemon: ManagedProcess, backend: ManagedProcess | None, port: int) -> None:
        if row.service_type == "grpc":
            kind = KINDS["unary"]
            method, body = kind.method, kind.body
        else:
            method, body = "/demo.Demo/Echo", grpc_frame(_demo_request())
        body_path = self.tmp / f"{row.service_type}.body"
        body_path.write_bytes(body)
        load = Load(self.tools["h2load"], f"http://{HOST}:{port}{method}", body_path, 4, 4, self.args.load_cpu)
        rate = warm_up(load, self.args.warmup)
        calls = max(160, round(rate * self.args.duration))

        def daemon_cpu() -> float:
            return cpu_seconds(daemon.pid) + reaped_cpu_seconds(daemon.pid)

        before = daemon_cpu(), cpu_seconds(backend.pid) if backend else 0.0
        result = measure(load, calls, self.tmp / f"{row.service_type}.log", timeout=self.args.duration * 20 + 60)
        after = daemon_cpu(), cpu_seconds(backend.pid) if backend else 0.0
        done = max(result.calls, 1)
        row.calls_per_s = result.calls / result.seconds if result.seconds else 0.0
        row.p50_ms, row.p99_ms, row.failed = result.p50_ms, result.p99_ms, result.failed
        row.daemon_us = (after[0] - before[0]) / done * 1e6
        row.backend_us = (after[1] - before[1]) / done * 1e6


def format_rows(rows: list[Row]) -> str:
    """The result table (Markdown)."""
    lines = [
        "| service type | calls/s | p50 ms | p99 ms | daemon us/call | backend us/call | failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.error:
            lines.append(f"| {row.service_type} | error: {row.error} | | | | | |")
            continue
        lines.append(
            f"| {row.service_type} | {row.calls_per_s:,.0f} | {row.p50_ms:.2f} | {row.p99_ms:.2f} | "
            f"{row.daemon_us:,.0f} | {row.backend_us:,.0f} | {row.failed} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default=",".join(TYPES), help="service types to measure")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement (approximate)")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of unrecorded load first")
    parser.add_argument("--proxy-cpu", type=int, default=0, help="CPU of the daemon and the backend")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU of h2load")
    parser.add_argument("--serve", choices=("jsonrpc", "http"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0
    types = [name.strip() for name in args.types.split(",") if name.strip()]
    unknown = set(types) - set(TYPES)
    if unknown:
        parser.error(f"unknown service types: {', '.join(sorted(unknown))}")
    try:
        tools = require_tools(["h2load", "taskset"])
    except HarnessError as exc:
        print(f"service_types: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="snetd-bench-types-") as tmp:
        bench = Bench(args, tools, Path(tmp))
        rows = []
        for service_type in types:
            started = time.monotonic()
            rows.append(bench.run(service_type))
            print(f"{service_type}: measured in {time.monotonic() - started:.1f} s", file=sys.stderr)
    print("unary echo, 32-byte text, 16 calls in flight (h2load -c4 -m4), daemon and backend on one CPU")
    print(format_rows(rows))
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
