"""Run h2load against one path and read back its numbers.

h2load (Debian ``nghttp2-client``) posts the prebuilt gRPC body as raw HTTP/2
requests: ``-c`` connections with ``-m`` streams each give ``c * m`` calls in
flight.

Each measurement is two runs.  The warm-up runs for a fixed time (``-D``) and
records nothing but its rate.  The measured run then makes a fixed number of
calls (``-n``), chosen from that rate to last about the requested time, and
waits for all of them: every call whose CPU time falls inside the measured
window is counted, which a timed run cannot promise (it drops the calls still
in flight when the time is up, up to 64 of a few thousand).  ``--log-file``
writes one line per finished call (start time, HTTP status, microseconds to
the end of the response), from which the latency percentiles are computed.
"""

from __future__ import annotations

import math
import re
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path

from _procs import describe_exit

#: Headers every gRPC request carries; h2load adds :method POST because of -d.
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")

_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored"
)
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


class LoadError(Exception):
    """h2load failed to run or printed something unexpected."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one measured h2load run found.

    Attributes:
        seconds: From the start of the first call to the end of the last.
        calls: Calls that finished with HTTP 2xx (from the log file).
        failed: Calls that failed, errored or got a non-2xx status.
        p50_ms: Median latency of the 2xx calls, in milliseconds.
        p99_ms: 99th percentile latency of the 2xx calls, in milliseconds.
        generator_cpu_s: CPU seconds h2load itself used.
    """

    seconds: float
    calls: int
    failed: int
    p50_ms: float
    p99_ms: float
    generator_cpu_s: float


@dataclass(frozen=True, slots=True)
class Load:
    """How to load one path.

    Attributes:
        h2load: Path of the h2load binary.
        url: ``http://host:port/package.Service/Method``.
        body: File holding the request body (gRPC frames).
        clients: Connections (``-c``).
        streams: Concurrent streams per connection (``-m``).
        cpu: CPU h2load is pinned to.
    """

    h2load: str
    url: str
    body: Path
    clients: int
    streams: int
    cpu: int

    def argv(self, limit: list[str], log_file: Path | None = None) -> list[str]:
        """The h2load command line, with ``limit`` being ``-D ...`` or ``-n ...``."""
        argv = ["taskset", "-c", str(self.cpu), self.h2load]
        argv += ["-c", str(self.clients), "-m", str(self.streams), *limit, "-d", str(self.body)]
        for header in GRPC_HEADERS:
            argv += ["-H", header]
        if log_file is not None:
            argv.append(f"--log-file={log_file}")
        argv.append(self.url)
        return argv


@dataclass(frozen=True, slots=True)
class _Output:
    """The summary lines of h2load's output."""

    seconds: float
    rate: float
    h2load_failed: int
    generator_cpu_s: float


def _run(argv: list[str], timeout: float) -> _Output:
    """Run h2load and parse its summary.

    The CPU time is the growth of the harness's RUSAGE_CHILDREN, which counts
    children once they are reaped; h2load is the only child reaped here.

    Raises:
        LoadError: If h2load exits with an error or its output is unexpected.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # On Ctrl-C or a timeout, subprocess.run kills h2load before re-raising.
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"h2load did not finish within {timeout:.0f} s") from exc
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()[-10:]
        raise LoadError(f"h2load {describe_exit(done.returncode)}: " + " | ".join(output))
    finished = _FINISHED.search(done.stdout)
    counts = _REQUESTS.search(done.stdout)
    if finished is None or counts is None:
        tail = done.stdout.strip().splitlines()[-8:]
        raise LoadError("cannot parse h2load output: " + " | ".join(tail))
    return _Output(
        seconds=float(finished.group(1)) * _UNIT_SECONDS[finished.group(2)],
        rate=float(finished.group(3)),
        h2load_failed=int(counts.group(5)) + int(counts.group(6)),
        generator_cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    )


def warm_up(load: Load, seconds: float) -> float:
    """Load the path for ``seconds`` without recording anything.

    Returns:
        The rate reached, in calls per second (0.0 if nothing succeeded).

    Raises:
        LoadError: If h2load fails.
    """
    limit = ["-D", f"{max(1, round(seconds * 1000))}ms"]
    return _run(load.argv(limit), timeout=seconds + 30).rate


def measure(load: Load, calls: int, log_file: Path, timeout: float) -> LoadResult:
    """Make ``calls`` calls and return what h2load measured.

    Raises:
        LoadError: If h2load fails, takes longer than ``timeout`` seconds, or
            its output cannot be parsed.
    """
    # h2load appends to an existing log file.
    log_file.unlink(missing_ok=True)
    output = _run(load.argv(["-n", str(calls)], log_file), timeout)
    latencies_us: list[int] = []
    bad_status = 0
    first_start = last_end = None
    for line in log_file.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        start, elapsed = int(fields[0]), int(fields[2])
        first_start = start if first_start is None else min(first_start, start)
        last_end = start + elapsed if last_end is None else max(last_end, start + elapsed)
        if fields[1].startswith("2"):
            latencies_us.append(elapsed)
        else:
            bad_status += 1
    latencies_us.sort()
    # h2load prints its duration with 10 ms resolution; the log gives the span
    # from the first call's start to the last call's end in microseconds.
    if first_start is not None and last_end is not None and last_end > first_start:
        seconds = (last_end - first_start) / 1e6
    else:
        seconds = output.seconds
    return LoadResult(
        seconds=seconds,
        calls=len(latencies_us),
        # A stream that fails is logged with status -1 and also counted by
        # h2load as failed; count each such call once.
        failed=max(bad_status, output.h2load_failed),
        p50_ms=percentile(latencies_us, 0.50) / 1000,
        p99_ms=percentile(latencies_us, 0.99) / 1000,
        generator_cpu_s=output.generator_cpu_s,
    )


def percentile(sorted_values: list[int], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when it is empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return float(sorted_values[rank - 1])
