"""Run ``twistd -n snetd`` as a real subprocess for integration tests.

The daemon runs exactly as users run it: the ``twistd`` of the venv, the
plugin found through ``PYTHONPATH`` (the source tree), a JSON config file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
TWISTD = str(Path(sys.executable).with_name("twistd"))


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a daemon subprocess: source tree first, no stray SNET_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNET_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


class Daemon:
    """One ``twistd -n snetd`` process.

    Args:
        workdir: where the config and log files go (also the cwd).
        config: configuration keys; ``daemon_endpoint`` is filled in.
        env: extra environment variables.
        prefix: a command to run twistd under (e.g. ``["taskset", "-c", "0"]``).
        default_config_file: write the config to ``workdir/snetd.config.json``
            and give no ``--config`` (the daemon finds it in its working directory).
    """

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        default_config_file: bool = False,
    ) -> None:
        self.prefix = prefix or []
        self.port = free_port()
        self.workdir = workdir
        self.config = {
            "daemon_endpoint": f"127.0.0.1:{self.port}",
            "blockchain_enabled": False,
            "payment_channel_storage_type": "memory",
            **config,
        }
        self.config_path = workdir / ("snetd.config.json" if default_config_file else f"snetd-{self.port}.json")
        self._config_args = [] if default_config_file else [f"--config={self.config_path}"]
        self.config_path.write_text(json.dumps(self.config))
        self.log_path = workdir / f"snetd-{self.port}.log"
        #: Extra environment variables (may be changed before start).
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Daemon:
        """Start the daemon and wait until it answers ``/heartbeat``."""
        log = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child, closed below)
        self.process = subprocess.Popen(
            [*self.prefix, TWISTD, "-n", "--pidfile=", "snetd", *self._config_args],
            cwd=self.workdir,
            env=daemon_env(self.env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"snetd exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                with urllib.request.urlopen(f"http://{self.address}/heartbeat", timeout=5) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"snetd did not become ready in {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop with SIGTERM (SIGKILL after ``timeout``); return the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def rss_kib(self) -> int:
        """Resident memory of the daemon process, in KiB."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_twistd(
    args: list[str], cwd: Path, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``twistd`` with ``args`` to completion (for option and config checks)."""
    return subprocess.run(
        [TWISTD, *args],
        cwd=cwd,
        env=daemon_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
