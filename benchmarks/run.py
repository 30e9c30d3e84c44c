"""Compare snetd with a direct connection and with nginx on the same load.

Usage::

    .venv/bin/python benchmarks/run.py [--quick] [--paths direct,nginx,nginx-keepalive,snetd]
                                       [--inflight 1,16,64] [--kinds unary,stream]

The harness starts the example echo service (grpc.aio) and, in front of it,
each proxy under test: nginx ``grpc_pass`` with and without upstream
keepalive, and snetd.  The backend and the proxies run on one CPU, the load
generator (h2load) and the harness on another.  For every call kind and every
number of calls in flight it measures each path in turn, several rounds, and
prints calls/s, p50/p99 latency, and CPU time per call of the proxy and of the
backend, plus the ratios of one path (snetd by default) to the others.
Everything is also written as JSON to ``benchmarks/results/``.  See
``benchmarks/README.md`` for how to read the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from _grpc import KINDS, Kind, probe
from _h2load import Load, LoadError, measure, warm_up
from _nginx import nginx_argv, nginx_config
from _procs import (
    HarnessError,
    ManagedProcess,
    StartError,
    cpu_busy_seconds,
    cpu_seconds,
    describe_exit,
    free_port,
    require_tools,
)
from _report import (
    Point,
    format_ratios,
    format_summary,
    paired_ratios,
    points_as_dicts,
    summarize,
)

#: The repository root: the servers run with it on PYTHONPATH.
REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PATHS = ("direct", "nginx", "nginx-keepalive", "snetd")
#: Connections h2load opens at most; more calls in flight become more streams.
MAX_CONNECTIONS = 4
#: snetd's start command; ``--snetd-cmd`` replaces it (same placeholders).
DEFAULT_SNETD_CMD = "{twistd} -n --pidfile= snetd --config={config}"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


class BackendDied(HarnessError):
    """The echo backend exited during the run."""


@dataclass(slots=True)
class Target:
    """One path to the echo service.

    Attributes:
        name: Path name as given to ``--paths``.
        port: Port the load generator connects to.
        proxy: The proxy process (None for ``direct``).
        command: The proxy's command line, for the report.
        error: Why the path is not measured (start or probe failure).
    """

    name: str
    port: int
    proxy: ManagedProcess | None = None
    command: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` for grpcio."""
        return f"{HOST}:{self.port}"


def load_shape(inflight: int) -> tuple[int, int]:
    """Connections and streams per connection giving ``inflight`` calls.

    1 -> 1x1, 16 -> 4x4, 64 -> 4x16: at most `MAX_CONNECTIONS` connections,
    always exactly ``inflight`` calls.
    """
    clients = math.gcd(inflight, MAX_CONNECTIONS)
    return clients, inflight // clients


def _csv(choices: Sequence[str] | None = None) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated list, optionally restricted to ``choices``."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        if choices is not None:
            unknown = [item for item in items if item not in choices]
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} (choose from {', '.join(choices)})")
        return list(dict.fromkeys(items))

    return parse


def _inflight_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        values = [int(item) for item in _csv()(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError("in-flight counts must be >= 1")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line (``--quick`` only changes unset timing options)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s per point (a smoke test)")
    parser.add_argument("--paths", type=_csv(PATHS), default=list(PATHS), help=f"default: {','.join(PATHS)}")
    parser.add_argument("--inflight", type=_inflight_list, default=[1, 16, 64], help="default: 1,16,64")
    parser.add_argument(
        "--kinds",
        type=_csv(tuple(KINDS)),
        default=["unary", "stream"],
        help=f"from {','.join(KINDS)}; default: unary,stream",
    )
    parser.add_argument("--rounds", type=int, help="measurements per point, median reported (default 3)")
    parser.add_argument("--duration", type=float, help="seconds per measurement (default 1.5)")
    parser.add_argument(
        "--warmup",
        type=float,
        help="seconds of unrecorded load before each measurement, also used to size it (default 0.5)",
    )
    parser.add_argument("--proxy-cpu", type=int, default=0, help="CPU for backend and proxies (default 0)")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU for h2load and the harness (default 1)")
    parser.add_argument("--subject", default="snetd", help="path compared with the others (default snetd)")
    parser.add_argument(
        "--snetd-cmd",
        default=DEFAULT_SNETD_CMD,
        help="command starting the snetd path, run under taskset with PYTHONPATH=<repo>; "
        "placeholders {config} {port} {backend_port} {twistd} {python} {repo} {tmp} "
        "(default: %(default)r)",
    )
    parser.add_argument("--snetd-timeout", type=float, default=30.0, help="seconds to wait for snetd")
    parser.add_argument("--output", type=Path, help="JSON file (default benchmarks/results/<time>.json)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    args.duration = args.duration if args.duration is not None else (1.0 if quick else 1.5)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if quick else 0.5)
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0.1:
        parser.error("--rounds must be >= 1, --duration > 0, --warmup >= 0.1")
    return args


class Harness:
    """Starts the servers, measures every path, and reports.

    All processes are registered on the ExitStack given to the constructor,
    which stops them when the run ends for any reason.
    """

    def __init__(self, args: argparse.Namespace, tools: dict[str, str], tmp: Path, stack: ExitStack) -> None:
        """Keep the settings; nothing starts yet."""
        self.args = args
        self.tools = tools
        self.tmp = tmp
        self.stack = stack
        self.kinds: list[Kind] = [KINDS[name] for name in args.kinds]
        self.targets: list[Target] = []
        self.points: list[Point] = []
        self.backend: ManagedProcess | None = None
        self.backend_port = 0
        self.nginx_configs: dict[str, str] = {}
        self.loadavg_at_start = list(os.getloadavg())
        self.busy_at_start: dict[int, float] = {}
        #: Why the run stopped early (the backend died), or None.
        self.aborted: str | None = None
        self.env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    # -- starting -----------------------------------------------------------

    def _start(self, process: ManagedProcess) -> ManagedProcess:
        """Start a process and make sure it is stopped when the run ends."""
        self.stack.callback(process.stop)
        process.start()
        return process

    def _probe(self, address: str) -> Callable[[], None]:
        """A readiness check: one call of each selected kind to ``address``."""
        return lambda: probe(address, self.kinds)

    def start_backend(self) -> None:
        """Start the echo service on the proxy CPU.

        Raises:
            HarnessError: If it does not answer; nothing can be measured then.
        """
        self.backend_port = free_port()
        argv = [
            sys.executable,
            "-m",
            "snet_daemon.example_service",
            "--host",
            HOST,
            "--port",
            str(self.backend_port),
        ]
        self.backend = ManagedProcess(
            "echo backend", argv, self.tmp / "backend.log", self.args.proxy_cpu, self.env, self.tmp
        )
        self._start(self.backend)
        try:
            self.backend.wait_ready(HOST, self.backend_port, self._probe(f"{HOST}:{self.backend_port}"), 20)
        except StartError as exc:
            raise HarnessError(str(exc)) from exc
        print(f"backend: {shlex.join(self.backend.argv)}")

    def start_targets(self) -> None:
        """Start every selected proxy; a proxy that fails is reported, not fatal."""
        for name in self.args.paths:
            if name == "direct":
                target = Target(name, self.backend_port)
            elif name in ("nginx", "nginx-keepalive"):
                target = self._start_nginx(name, keepalive=name == "nginx-keepalive")
            else:
                target = self._start_snetd(name)
            self.targets.append(target)
            if target.error is None:
                command = shlex.join(target.command) if target.command else "(no proxy)"
                print(f"{name}: {command}")
            else:
                print(f"{name}: FAILED to start\n{target.error}")

    def _wait(self, target: Target, timeout: float) -> None:
        """Wait for a proxy to answer; on failure record the error on ``target``."""
        assert target.proxy is not None
        try:
            target.proxy.wait_ready(HOST, target.port, self._probe(target.address), timeout)
        except StartError as exc:
            target.error = str(exc)
            # A stuck proxy must not disturb the paths that are measured.
            target.proxy.stop()

    def _start_nginx(self, name: str, keepalive: bool) -> Target:
        """Write a config for one nginx variant and start it on the proxy CPU."""
        prefix = self.tmp / name
        prefix.mkdir()
        # nginx workers run as "nobody" when the harness is root; they must be
        # able to reach their temp directories inside the run directory.
        for directory in (self.tmp, prefix):
            directory.chmod(0o755)
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_config(prefix, port, self.backend_port, keepalive))
        self.nginx_configs[name] = conf.read_text()
        argv = nginx_argv(self.tools["nginx"], prefix, conf)
        process = ManagedProcess(name, argv, prefix / "nginx.log", self.args.proxy_cpu)
        target = Target(name, port, process, process.argv)
        self._start(process)
        self._wait(target, 10)
        return target

    def _start_snetd(self, name: str) -> Target:
        """Write snetd's config and start it with ``--snetd-cmd`` on the proxy CPU."""
        port = free_port()
        config = self.tmp / "snetd.json"
        config.write_text(
            json.dumps(
                {
                    "daemon_endpoint": f"{HOST}:{port}",
                    "service_endpoint": f"http://{HOST}:{self.backend_port}",
                    "blockchain_enabled": False,
                    "payment_channel_storage_type": "memory",
                    "log": {"level": "warn"},
                },
                indent=2,
            )
        )
        fields = {
            "config": config,
            "port": port,
            "backend_port": self.backend_port,
            "twistd": Path(sys.executable).parent / "twistd",
            "python": sys.executable,
            "repo": REPO,
            "tmp": self.tmp,
        }
        try:
            argv = shlex.split(self.args.snetd_cmd.format(**fields))
        except (KeyError, IndexError, ValueError) as exc:
            return Target(name, port, error=f"bad --snetd-cmd: {exc!r}")
        process = ManagedProcess(name, argv, self.tmp / "snetd.log", self.args.proxy_cpu, self.env, self.tmp)
        target = Target(name, port, process, process.argv)
        self._start(process)
        self._wait(target, self.args.snetd_timeout)
        return target

    # -- measuring ----------------------------------------------------------

    def _live(self) -> list[Target]:
        """Targets that have not failed."""
        return [t for t in self.targets if t.error is None]

    def _check_backend(self) -> None:
        """Make sure the echo backend still runs.

        Raises:
            BackendDied: If it exited; every path depends on it.
        """
        assert self.backend is not None
        code = self.backend.exit_code()
        if code is not None:
            raise BackendDied(f"echo backend {describe_exit(code)}\n{self.backend.log_tail()}")

    def _fail(self, target: Target, reason: str) -> None:
        """Stop measuring ``target`` and say why.

        Raises:
            BackendDied: If the backend is gone: then it, not the path, failed.
        """
        self._check_backend()
        tail = ""
        if target.proxy is not None:
            target.proxy.stop()
            tail = f"\n{target.proxy.log_tail()}"
        target.error = f"{reason}{tail}"
        print(f"  ! {target.name}: {reason} (path dropped){tail}")

    def _check(self, target: Target, kind: Kind) -> bool:
        """One real grpcio call of ``kind`` through ``target`` before loading it."""
        self._check_backend()
        code = target.proxy.exit_code() if target.proxy is not None else None
        if code is not None:
            self._fail(target, f"proxy {describe_exit(code)}")
            return False
        try:
            probe(target.address, [kind])
        except (grpc.RpcError, ValueError) as exc:
            detail = f"{exc.code()}: {exc.details()}" if isinstance(exc, grpc.Call) else str(exc)
            self._fail(target, f"{kind.name} check call failed: {detail}")
            return False
        return True

    def run(self) -> None:
        """Measure every live path at every load; stop early if the backend dies."""
        try:
            self._run()
        except BackendDied as exc:
            self.aborted = str(exc)
            print(f"\n  ! run aborted: {exc}")

    def _run(self) -> None:
        """Measure every live path at every load, interleaving paths per round."""
        for kind in self.kinds:
            body = self.tmp / f"{kind.name}.body"
            body.write_bytes(kind.body)
            for inflight in self.args.inflight:
                clients, streams = load_shape(inflight)
                targets = [t for t in self._live() if self._check(t, kind)]
                title = f"{kind.name}, {inflight} in flight (-c{clients} -m{streams}): "
                print(title, end="", flush=True)
                for round_ in range(self.args.rounds):
                    # Rotate the order so no path is always measured first.
                    shift = round_ % max(1, len(targets))
                    for target in targets[shift:] + targets[:shift]:
                        if target.error is not None:
                            continue
                        load = Load(
                            self.tools["h2load"],
                            f"http://{target.address}{kind.method}",
                            body,
                            clients,
                            streams,
                            self.args.load_cpu,
                        )
                        point = self._measure(target, load, kind.name, inflight, round_)
                        if point is not None:
                            self.points.append(point)
                            print(".", end="", flush=True)
                print()

    def _measure(self, target: Target, load: Load, kind: str, inflight: int, round_: int) -> Point | None:
        """Warm up, then measure one path once; None if the path failed.

        The warm-up's rate sets how many calls the measured run makes, so that
        it lasts about ``--duration`` seconds; the CPU counters are read just
        before and just after the measured run.
        """
        assert self.backend is not None
        try:
            rate = warm_up(load, self.args.warmup)
            if rate <= 0:
                self._fail(target, "no call succeeded during the warm-up")
                return None
            calls = max(round(rate * self.args.duration), 10 * inflight)
            timeout = 30 + 20 * self.args.duration
            busy_before = cpu_busy_seconds(self.args.proxy_cpu)
            proxy_before = cpu_seconds(target.proxy.pid) if target.proxy else 0.0
            backend_before = cpu_seconds(self.backend.pid)
            result = measure(load, calls, self.tmp / "h2load.log", timeout)
            backend_cpu = cpu_seconds(self.backend.pid) - backend_before
            proxy_cpu = cpu_seconds(target.proxy.pid) - proxy_before if target.proxy else None
            busy = cpu_busy_seconds(self.args.proxy_cpu) - busy_before
        except LoadError as exc:
            self._fail(target, str(exc))
            return None
        code = target.proxy.exit_code() if target.proxy is not None else None
        if code is not None:
            self._fail(target, f"proxy {describe_exit(code)} during the load")
            return None
        if result.calls == 0:
            self._fail(target, f"no call succeeded ({result.failed} failed)")
            return None
        if result.failed:
            print(f"[{target.name}: {result.failed} failed calls]", end="", flush=True)
        return Point(
            kind=kind,
            inflight=inflight,
            path=target.name,
            round=round_,
            seconds=result.seconds,
            calls=result.calls,
            failed=result.failed,
            calls_per_s=result.calls / result.seconds,
            p50_ms=result.p50_ms,
            p99_ms=result.p99_ms,
            proxy_cpu_s=proxy_cpu,
            backend_cpu_s=backend_cpu,
            generator_cpu_s=result.generator_cpu_s,
            # Whatever else ran on the proxy CPU: other processes, interrupts
            # not charged to ours, time stolen by the hypervisor.
            other_cpu_s=max(0.0, busy - backend_cpu - (proxy_cpu or 0.0)),
        )

    # -- reporting ----------------------------------------------------------

    def report(self, started: float) -> dict[str, Any]:
        """Print the tables and return everything for the JSON file."""
        summary = summarize(self.points)
        subject = self.args.subject
        others = [t.name for t in self.targets if t.name != subject]
        ratios = paired_ratios(self.points, subject, others)
        titles = {k.name: f"{k.name}: {k.describe}" for k in self.kinds}
        print()
        cpu = self.args.proxy_cpu
        print(
            f"Medians of {self.args.rounds} x ~{self.args.duration:g} s per point "
            f"({self.args.warmup:g} s warm-up each); backend + proxy on CPU {cpu}, "
            f"h2load on CPU {self.args.load_cpu}.\n"
            "us/call: utime+stime of the process tree per call, in microseconds. "
            f"other CPU %: busy time of CPU {cpu} not charged to proxy or backend\n"
            "(other processes, unattributed interrupts, steal), in % of the run; "
            "high values mean a disturbed measurement."
        )
        print()
        print(format_summary(summary, titles) if summary else "(no measurements)")
        print()
        if ratios:
            print(f"Ratios {subject} / other (median of per-round ratios; < 1 is lower for {subject}):")
            print(format_ratios(ratios))
        else:
            print(f"No ratios: path {subject!r} was not measured (see --paths, --subject).")
        failed = {t.name: t.error for t in self.targets if t.error is not None}
        for name, error in failed.items():
            print(f"\nPath {name} FAILED:\n{error}")
        if self.aborted is not None:
            print(f"\nRUN ABORTED, results incomplete: {self.aborted}")
        return {
            "meta": self._meta(started),
            "aborted": self.aborted,
            "path_errors": failed,
            "summary": summary,
            "ratios": ratios,
            "points": points_as_dicts(self.points),
        }

    def _meta(self, started: float) -> dict[str, Any]:
        """Settings, versions and command lines, so a result can be reproduced."""
        return {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_seconds": round(time.time() - started, 1),
            "argv": sys.argv,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": self.loadavg_at_start,
            "cpu_busy_pct_at_start": self.busy_at_start,
            "python": sys.version.split()[0],
            "grpcio": grpc.__version__,
            "h2load": _version([self.tools["h2load"], "--version"]),
            "nginx": _version([self.tools["nginx"], "-v"]) if "nginx" in self.tools else None,
            "backend_command": self.backend.argv if self.backend else None,
            "path_commands": {t.name: t.command for t in self.targets},
            "nginx_configs": self.nginx_configs,
            "load_shapes": {n: "-c{} -m{}".format(*load_shape(n)) for n in self.args.inflight},
        }


def _version(argv: list[str]) -> str:
    """First line a tool prints about its version."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so cleanup runs as for Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


def _ignore_interrupts() -> None:
    """Ignore SIGINT/SIGTERM/SIGHUP while the servers are being stopped."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def idle_check(cpus: Sequence[int], seconds: float = 1.0) -> dict[int, float]:
    """How busy each CPU is before the run starts, in % over ``seconds``.

    The harness's own servers are not running yet, so anything seen here is
    someone else's load, which would disturb every measurement.
    """
    before = {cpu: cpu_busy_seconds(cpu) for cpu in cpus}
    time.sleep(seconds)
    return {cpu: 100 * (cpu_busy_seconds(cpu) - before[cpu]) / seconds for cpu in cpus}


def _check_cpus(args: argparse.Namespace) -> None:
    """Refuse CPUs the harness may not use; warn when load and proxy share one."""
    allowed = os.sched_getaffinity(0)
    for option, cpu in (("--proxy-cpu", args.proxy_cpu), ("--load-cpu", args.load_cpu)):
        if cpu not in allowed:
            raise HarnessError(f"{option} {cpu}: not an available CPU (available: {sorted(allowed)})")
    if args.proxy_cpu == args.load_cpu:
        print("warning: proxy and load generator share a CPU; numbers will mix both", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the process exit status."""
    args = parse_args(argv)
    started = time.time()
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved_handlers = {signum: signal.getsignal(signum) for signum in signums}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    try:
        needs_nginx = any(p.startswith("nginx") for p in args.paths)
        tools = require_tools(["h2load", "taskset"] + (["nginx"] if needs_nginx else []))
        _check_cpus(args)
        # The harness itself (grpcio probes, /proc reads) stays off the proxy CPU.
        os.sched_setaffinity(0, {args.load_cpu})
        with ExitStack() as stack:
            # The directory is removed last, after every process is stopped.
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="snetd-bench-")))
            harness = Harness(args, tools, tmp, stack)
            harness.busy_at_start = idle_check([args.proxy_cpu, args.load_cpu])
            busy = ", ".join(f"CPU {c} {pct:.0f}%" for c, pct in harness.busy_at_start.items())
            if max(harness.busy_at_start.values()) > 10:
                print(
                    f"warning: the machine is busy before the run ({busy}); numbers will be disturbed",
                    file=sys.stderr,
                )
            try:
                points = len(args.kinds) * len(args.inflight) * len(args.paths) * args.rounds
                print(
                    f"{points} measurements of {args.duration:g} s (+{args.warmup:g} s warm-up): "
                    f"about {points * (args.duration + args.warmup + 0.1):.0f} s"
                )
                harness.start_backend()
                harness.start_targets()
                harness.run()
                result = harness.report(started)
            finally:
                # A second Ctrl-C must not cut short the cleanup that follows.
                _ignore_interrupts()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
        output = args.output or RESULTS_DIR / f"{stamp}.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nResults: {output}")
        if result["aborted"]:
            return 2
        return 1 if result["path_errors"] else 0
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; all processes stopped", file=sys.stderr)
        return 130
    finally:
        for signum, handler in saved_handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
