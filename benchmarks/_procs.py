"""Processes for the benchmark harness: tools, ports, CPU accounting, lifecycle.

Every server the harness starts is a `ManagedProcess`: it runs in its own
session (so one signal reaches the process and anything it forks), writes its
output to a log file in the run's temporary directory, and is stopped with
SIGTERM and then SIGKILL.  `cpu_seconds` reads utime+stime from
``/proc/<pid>/stat`` for a process and all its live descendants, which is how
the harness charges CPU to the proxy (nginx's master and worker, twistd...) and
to the echo backend.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

#: The Debian package that installs each external tool the harness needs.
TOOL_PACKAGES: Mapping[str, str] = {
    "h2load": "nghttp2-client",
    "taskset": "util-linux",
    "nginx": "nginx-light (or nginx)",
}

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class HarnessError(Exception):
    """A problem that stops the whole run (missing tool, backend down...)."""


class StartError(Exception):
    """A server did not become ready; the message includes its log tail."""


def require_tools(names: Sequence[str]) -> dict[str, str]:
    """Find the external tools the run needs.

    Args:
        names: Tool names, keys of `TOOL_PACKAGES`.

    Returns:
        Each name mapped to its absolute path.

    Raises:
        HarnessError: If any tool is missing; the message names the Debian
            package to install for each missing tool.
    """
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in names:
        # nginx lives in /usr/sbin, which is not on every user's PATH.
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if path is None:
            missing.append(f"  {name}: apt-get install {TOOL_PACKAGES[name]}")
        else:
            found[name] = path
    if missing:
        raise HarnessError("missing tools:\n" + "\n".join(missing))
    return found


def free_port(host: str = "127.0.0.1", low: int = 20000, high: int = 32000) -> int:
    """Pick a free TCP port below the ephemeral range.

    Ports from 32768 up are handed out by the kernel for outgoing
    connections (h2load's, nginx's upstream ones), so a server listening there
    can collide with them; this picks from ``[low, high)`` instead.

    Raises:
        HarnessError: If no free port is found after many tries.
    """
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise HarnessError(f"no free port in [{low}, {high}) on {host}")


def describe_exit(code: int) -> str:
    """``exited with code N`` or ``was killed by SIGNAME`` for a return code."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def tcp_connects(host: str, port: int, timeout: float = 0.5) -> bool:
    """Return whether a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _children_map() -> dict[int, list[int]]:
    """Map each live pid to the pids of its children (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name, or None if gone.

    The command name (field 2) may contain spaces and parentheses, so the
    split starts after its closing parenthesis: index 0 is then the state,
    1 the ppid, 2 the process group, 11 utime and 12 stime.
    """
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].decode().split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its live descendants.

    ``/proc/<pid>/stat`` counts every thread of a process, so a
    multi-threaded server (grpcio) is fully accounted.  Processes that exited
    during the measurement are not counted; none of the servers measured
    here fork per request.

    Returns:
        The CPU time in seconds (0.0 if the process is gone).
    """
    children = _children_map()
    total_ticks = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        fields = _stat_fields(current)
        if fields is not None:
            total_ticks += int(fields[11]) + int(fields[12])
        todo.extend(children.get(current, ()))
    return total_ticks / _CLOCK_TICKS


def cpu_busy_seconds(cpu: int) -> float:
    """Seconds CPU ``cpu`` has spent busy since boot (any process, or stolen).

    Sums user, nice, system, irq, softirq and steal from ``/proc/stat``: the
    time the CPU was not idle or unavailable to us.  Compared with the CPU
    time of the processes pinned there, it shows how much other work (or the
    hypervisor) took from the measured CPU.
    """
    prefix = f"cpu{cpu} "
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(prefix):
            values = [int(v) for v in line.split()[1:9]]
            user, nice, system, _idle, _iowait, irq, softirq, steal = values
            return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS
    raise HarnessError(f"cpu{cpu} not in /proc/stat")


class ManagedProcess:
    """A server started by the harness, pinned to a CPU, with a log file.

    The process runs in its own session, so stopping it signals its whole
    process group (nginx's workers, anything a proxy forks) and a Ctrl-C in
    the terminal does not reach it before the harness has decided to stop it.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        cpu: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        """Describe the process; nothing starts until `start`.

        Args:
            name: Short name used in messages.
            argv: The command line.
            log_path: File receiving the process's stdout and stderr.
            cpu: When set, the command runs under ``taskset -c <cpu>``.
            env: Extra environment variables on top of the harness's.
            cwd: Working directory.
        """
        self.name = name
        self.argv = (["taskset", "-c", str(cpu)] if cpu is not None else []) + list(argv)
        self.log_path = log_path
        self._env = {**os.environ, **(env or {})}
        self._cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """The pid (the real server's: ``taskset`` and ``env`` exec it)."""
        if self._popen is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._popen.pid

    def start(self) -> None:
        """Start the process (returns at once; see `wait_ready`)."""
        self._log = self.log_path.open("ab")
        self._popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._env,
            cwd=self._cwd,
            start_new_session=True,
        )

    def exit_code(self) -> int | None:
        """The exit code if the process has exited, else None."""
        return None if self._popen is None else self._popen.poll()

    def wait_ready(
        self,
        host: str,
        port: int,
        check: Callable[[], None],
        timeout: float,
    ) -> None:
        """Wait until ``host:port`` accepts TCP connections and ``check`` passes.

        Args:
            host: Address the server listens on.
            port: Port the server listens on.
            check: Makes one real call through the server; raises on failure.
            timeout: Seconds to wait in total.

        Raises:
            StartError: If the process exits, or the port or the call is not
                ready within ``timeout``; the message ends with the log tail.
        """
        deadline = time.monotonic() + timeout
        last_error = "port never accepted a connection"
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                raise StartError(f"{self.name} {describe_exit(code)}\n{self.log_tail()}")
            if tcp_connects(host, port):
                try:
                    check()
                    return
                # Whatever the probe raises, the server may just not be ready yet.
                except Exception as exc:
                    last_error = f"check call failed: {exc}"
            time.sleep(0.1)
        raise StartError(f"{self.name} not ready after {timeout:.0f} s ({last_error})\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the process's log, indented."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "    (no log)"
        # Collapse runs of identical lines (nginx logs one line per failed call).
        collapsed: list[tuple[str, int]] = []
        for line in text.splitlines():
            if collapsed and collapsed[-1][0] == line:
                collapsed[-1] = (line, collapsed[-1][1] + 1)
            else:
                collapsed.append((line, 1))
        tail = [line if count == 1 else f"{line}   [{count} times]" for line, count in collapsed[-lines:]]
        return "\n".join("    " + line for line in tail or ["(empty log)"])

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the process group: SIGTERM, then SIGKILL after ``timeout`` s.

        Safe to call more than once and on a process that already exited.
        """
        popen = self._popen
        if popen is not None:
            if popen.poll() is None:
                _signal_group(popen.pid, signal.SIGTERM)
                try:
                    popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            if popen.poll() is None:
                _signal_group(popen.pid, signal.SIGKILL)
                popen.wait()
            # Members left behind by a leader that exited (an orphaned worker):
            # while any member lives the group id cannot be reused, so these
            # pids are ours.
            for pid in _group_members(popen.pid):
                _kill(pid)
        if self._log is not None:
            self._log.close()
            self._log = None


def _group_members(pgid: int) -> list[int]:
    """Pids of the live processes whose process group is ``pgid``."""
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            # fields[0] is the state: a zombie waits for its parent to reap it.
            if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _kill(pid: int) -> None:
    """SIGKILL one process, ignoring one that is already gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a process group, ignoring an already empty group."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
