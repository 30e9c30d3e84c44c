"""A real etcd server (Debian's ``etcd-server``) for tests.

Each :class:`EtcdServer` listens on free loopback ports with its own data
directory, and is stopped by PID: SIGTERM, then SIGKILL.  It is started
through ``setpriv --pdeathsig KILL`` so that even a test run that is killed
outright leaves no etcd behind.  It can be stopped and started again on the
same ports and data, to test what clients do while etcd is down.

Fixtures:

* :func:`etcd_server` (module scope) -- one server shared by a module's
  tests; tests keep apart by using unique key prefixes.
* :func:`etcd_factory` -- build private servers (for tests that stop one).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.ports import free_port

ETCD = shutil.which("etcd")
SETPRIV = shutil.which("setpriv")

#: Skip marker for tests that need the etcd binary.
requires_etcd = pytest.mark.skipif(ETCD is None, reason="needs the etcd binary (apt-get install etcd-server)")


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # Field 3 is the state; Z is a zombie (dead, not yet reaped).
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_healthy(
    url: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    context: ssl.SSLContext | None = None,
) -> None:
    """Poll ``url/health`` until etcd reports healthy.

    Raises:
        RuntimeError: The process exited, or ``timeout`` passed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"etcd exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1, context=context) as reply:
                if json.loads(reply.read()).get("health") == "true":
                    return
        except (OSError, ValueError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"etcd at {url} not healthy within {timeout}s")


class EtcdServer:
    """One single-node etcd on 127.0.0.1.

    Args:
        data_dir: Its data directory (created by etcd).
        log_path: Where its output goes.
        tls: ``(ca, cert, key)`` PEM paths: serve https and require client
            certificates signed by ``ca`` (the same cert serves both ends).
    """

    def __init__(self, data_dir: Path, log_path: Path, tls: tuple[Path, Path, Path] | None = None) -> None:
        self.client_port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        self.data_dir = data_dir
        self.log_path = log_path
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        """Whether the etcd binary is installed."""
        return ETCD is not None

    @property
    def url(self) -> str:
        """The client URL (``http(s)://127.0.0.1:<port>``)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        """The PID of the running etcd, if any."""
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def command(self) -> list[str]:
        """The etcd command line."""
        assert ETCD is not None
        peer = f"http://127.0.0.1:{self.peer_port}"
        etcd = [
            ETCD,
            "--name=test",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--initial-cluster-token=tests",
            "--logger=zap",
            "--log-outputs=stderr",
            "--log-level=warn",
        ]
        if self.tls:
            ca, cert, key = self.tls
            etcd += [f"--trusted-ca-file={ca}", f"--cert-file={cert}", f"--key-file={key}", "--client-cert-auth"]
        return [SETPRIV, "--pdeathsig", "KILL", "--", *etcd] if SETPRIV else etcd

    def start(self, timeout: float = 20.0) -> EtcdServer:
        """Start etcd and wait until ``/health`` says it is healthy.

        On the first start, a port taken by someone else in the meantime
        (other test runs share the machine) means new ports and a retry.
        """
        assert self.process is None or self.process.poll() is not None, "already running"
        first = self.process is None
        for attempt in range(3):
            if attempt:
                self.client_port, self.peer_port = free_port(), free_port()
            if self._launch(timeout, context=self._client_context()):
                return self
            if not (first and "address already in use" in self.log_tail()):
                break
        raise RuntimeError(f"etcd did not start\n{self.log_tail()}")

    def _client_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ca, cert, key = self.tls
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
        return context

    def _launch(self, timeout: float, context: ssl.SSLContext | None) -> bool:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.url, timeout, self.process, context)
        except RuntimeError:
            self.stop()
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd by PID: SIGTERM, then SIGKILL after ``timeout``."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL etcd (a crash)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        """The end of etcd's output, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One running etcd for the whole module (stopped at the end, always)."""
    if ETCD is None:
        pytest.skip("needs the etcd binary (apt-get install etcd-server)")
    base = tmp_path_factory.mktemp("etcd")
    with EtcdServer(base / "data", base / "etcd.log") as server:
        yield server


@pytest.fixture
def etcd_factory(tmp_path: Path) -> Iterator[Callable[[], EtcdServer]]:
    """Build private etcd servers (not started); all are stopped at the end."""
    if ETCD is None:
        pytest.skip("needs the etcd binary (apt-get install etcd-server)")
    servers: list[EtcdServer] = []

    def make() -> EtcdServer:
        index = len(servers)
        server = EtcdServer(tmp_path / f"etcd-{index}", tmp_path / f"etcd-{index}.log")
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
