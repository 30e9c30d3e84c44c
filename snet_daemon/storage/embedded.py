"""The embedded etcd server: a supervised ``etcd`` child process.

The Go daemon links etcd into its own binary (``embed.StartEtcd``).  Python
cannot, so by default snetd runs Debian's ``etcd`` binary as a child
process, with the settings of ``payment_channel_storage_server``, and
supervises it:

* **Ready means healthy, and ours.**  :meth:`EmbeddedEtcd.ready` completes
  once etcd's ``/health`` endpoint reports ``{"health": "true"}`` (a leader
  is elected and requests are served), within ``startup_timeout``, and the
  server that says so runs with our command line (``/debug/vars``).
* **Not someone else's etcd.**  Before each start the client and peer
  ports are checked: if another process listens there (Debian's
  ``etcd.service`` does, on 2379 and 2380), etcd is not started and the
  error names the port.  Another etcd's healthy answer, taken for our
  own, would send the daemon's payment state to that server's data dir.
* **A failed start leaves nothing behind.**  If the first start does not
  become healthy -- etcd exits (port in use, bad data dir), or the timeout
  passes -- the child is stopped and :meth:`ready` fails with an
  :class:`EmbeddedEtcdStartError` that quotes etcd's last output lines.
  That error is worth retrying (the port may be free and the data dir
  unlocked a minute later), unlike :class:`EmbeddedEtcdError`: no etcd
  program, or settings it cannot serve.
* **Restarts.**  Once it has been healthy, an unexpected exit is logged and
  etcd is started again after a backoff (0.5 s doubling to 30 s, reset after
  a minute of healthy running).  Its data directory is kept, so no state is
  lost.  While it is being restarted, or while a running etcd does not
  answer its health check (every few seconds), :attr:`EmbeddedEtcd.trouble`
  says so, and the heartbeat with it.
* **Stopping** sends SIGTERM, then SIGKILL after ``stop_timeout``, and
  completes when the child has been reaped.
* **No orphans, even if the daemon is SIGKILLed.**  The child is started as
  ``setpriv --pdeathsig KILL -- etcd ...`` (util-linux): the kernel kills
  etcd when the daemon dies, however it dies.  It also runs in a session of
  its own (``setsid``), so a Ctrl-C at the terminal reaches only the
  daemon, which then drains calls -- committing their payments to etcd --
  before stopping etcd itself.

Paths in the settings (data dir, log files) are relative to the daemon's
working directory, as with the Go daemon.  Besides the configured settings,
etcd runs with periodic auto-compaction (10 minutes of history): every
payment writes a revision, and an uncompacted history would fill etcd's
2 GiB quota within days on a busy service.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.process import reapAllProcesses
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from snet_daemon.config.sections import StorageServerSettings
from snet_daemon.storage.base import StorageSetupError, StorageUnavailable

__all__ = [
    "EXTERNAL_ALONE",
    "EmbeddedEtcd",
    "EmbeddedEtcdError",
    "EmbeddedEtcdStartError",
    "busy_port",
    "data_dir_holder",
    "etcd_arguments",
    "etcd_log_level",
    "find_etcd",
    "http_cmdline",
    "http_health",
]

_log = Logger(namespace="snetd.storage.embedded")

#: Health checks while starting, seconds apart.
_POLL_INTERVAL = 0.1
#: Most bytes read of an answer from etcd's HTTP endpoints (``/debug/vars``
#: is a few kB).
_HTTP_LIMIT = 1024 * 1024
#: Restart backoff: first delay, cap, and how long a run must last to reset it.
_RESTART_FIRST = 0.5
#: Seconds after SIGKILL before looking whether the exit report was lost.
_KILL_GRACE = 2.0
_RESTART_MAX = 30.0
_RESTART_RESET_AFTER = 60.0
#: Health checks of a running etcd, seconds apart, and how long each may take.
_WATCH_INTERVAL = 5.0
_WATCH_TIMEOUT = 2.0
#: Output lines kept for error messages.
_TAIL_LINES = 30

INSTALL_HINT = "install it (Debian/Ubuntu: apt-get install etcd-server)"

#: Why the embedded server runs, and how to do without it, when the caller
#: does not know which case applies: true in each.
_WHY = (
    "snetd runs its own etcd server (payment_channel_storage_type is 'etcd', and either no etcd endpoints are "
    "configured or payment_channel_storage_server.enabled is true)"
)
#: How to do without it when it runs whether or not endpoints are configured.
EXTERNAL_ALONE = (
    "or use an external etcd cluster alone: list it in payment_channel_storage_client.endpoints and set "
    "payment_channel_storage_server.enabled to false"
)


class EmbeddedEtcdError(StorageSetupError):
    """The embedded etcd server cannot be run as configured (no etcd
    program, a scheme it cannot serve): waiting will not help, the
    configuration or the installation must change; the message says how."""


class EmbeddedEtcdStartError(StorageUnavailable):
    """The embedded etcd server did not start this time: it exited (a port
    in use, a data dir locked by another etcd), was not healthy in time, or
    was stopped first.  Not a :class:`StorageSetupError`: starting again
    later may well work, so callers retry (with a backoff)."""


def find_etcd(binary: str = "etcd", *, why: str = _WHY, otherwise: str = EXTERNAL_ALONE) -> str:
    """Locate the etcd binary.

    Args:
        binary: A name looked up on ``PATH``, or a path.
        why: Why the embedded server runs, for the error message.
        otherwise: How to do without it, for the error message (after the
            installation hint).

    Returns:
        The absolute path of the executable.

    Raises:
        EmbeddedEtcdError: Not found: ``why``, the installation hint and
            ``otherwise``.
    """
    found = shutil.which(binary)
    if found is None:
        raise EmbeddedEtcdError(f"{why}, but the '{binary}' program was not found: {INSTALL_HINT}, {otherwise}")
    return os.path.abspath(found)


def etcd_arguments(settings: StorageServerSettings, workdir: Path) -> list[str]:
    """etcd's command-line flags for ``settings`` (without the program name).

    Relative data and log paths are made absolute against ``workdir``.
    """

    def absolute(path: str) -> str:
        return str(workdir / path)

    outputs = [out if out in ("stdout", "stderr", "default") else absolute(out) for out in settings.log_outputs]
    cluster = settings.cluster or f"{settings.name}={settings.peer_url}"
    return [
        f"--name={settings.name}",
        f"--data-dir={absolute(settings.data_dir)}",
        f"--listen-client-urls={settings.client_url}",
        f"--advertise-client-urls={settings.client_url}",
        f"--listen-peer-urls={settings.peer_url}",
        f"--initial-advertise-peer-urls={settings.peer_url}",
        f"--initial-cluster={cluster}",
        f"--initial-cluster-token={settings.token}",
        "--initial-cluster-state=new",
        "--logger=zap",
        f"--log-level={settings.log_level}",
        f"--log-outputs={','.join(outputs) or 'stderr'}",
        "--auto-compaction-mode=periodic",
        "--auto-compaction-retention=10m",
    ]


async def _http_get(url: str, path: str, seconds: float) -> bytes | None:
    """``GET path`` from etcd's client URL; the body of a 200 answer, else None.

    A plain HTTP/1.0 request on a fresh connection: tiny, loopback, and free
    of connection-pool state that could outlive the daemon's reactor.  The
    answer is read to its end (HTTP/1.0: the server closes), up to
    :data:`_HTTP_LIMIT` bytes.

    Args:
        url: The server's client URL.
        path: The path to get.
        seconds: Limit for connecting and for reading the answer.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 2379
    writer = None
    try:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
        # a cancellation that arrives as the inner call completes, and the
        # supervisor that runs this must stop when cancelled.
        async with asyncio.timeout(seconds):
            reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
        reply = b""
        async with asyncio.timeout(seconds):
            while len(reply) < _HTTP_LIMIT and (chunk := await reader.read(_HTTP_LIMIT - len(reply))):
                reply += chunk
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return body if head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")) else None


async def http_health(url: str, seconds: float) -> bool:
    """Ask etcd's ``/health`` endpoint whether the server is healthy.

    Args:
        url: The server's client URL.
        seconds: Limit for connecting and for reading the answer.

    Returns:
        True for HTTP 200 with ``{"health": "true"}``; False for anything
        else, including connection errors and timeouts.
    """
    body = await _http_get(url, "/health", seconds)
    try:
        return body is not None and bool(json.loads(body).get("health") == "true")
    except (ValueError, AttributeError):
        return False


async def http_cmdline(url: str, seconds: float) -> list[str] | None:
    """The command line of the etcd that serves ``url``, from ``/debug/vars``.

    etcd (3.4 and later) publishes Go's ``expvar`` variables there, among
    them ``cmdline``: its ``os.Args``.  Those carry the ``--name`` and the
    ``--data-dir`` the server was started with, which is what tells the
    etcd snetd started from any other one on the same port -- whose data
    dir the daemon's payment state must never go to.

    Args:
        url: The server's client URL.
        seconds: Limit for connecting and for reading the answer.

    Returns:
        The arguments, program first; None when there is no answer, or no
        command line in it.
    """
    body = await _http_get(url, "/debug/vars", seconds)
    try:
        cmdline = json.loads(body)["cmdline"] if body is not None else None
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(cmdline, list) or not all(isinstance(arg, str) for arg in cmdline):
        return None
    return cmdline


def _flag(argv: Sequence[str], name: str) -> str:
    """The value of ``--name=value`` in ``argv``, or ``?``."""
    prefix = f"--{name}="
    return next((arg.removeprefix(prefix) for arg in argv if arg.startswith(prefix)), "?")


#: What to do when another etcd holds our ports.
_OTHER_ETCD_HINT = (
    "Is it another etcd? Installing Debian's etcd-server package starts one (etcd.service) on "
    "localhost:2379 and 2380, snetd's default ports: stop it for good with `systemctl disable --now etcd`"
)


async def busy_port(url: str) -> str | None:
    """Whether another process already listens where etcd would (``url``'s host and port).

    Tried the way etcd itself will listen: a bind with ``SO_REUSEADDR``
    (what Go sets), so a port in ``TIME_WAIT`` after our own etcd exited
    counts as free, while one another server listens on -- on this address
    or on the wildcard -- does not.

    Returns:
        ``host:port`` when the port is taken; None when it is free, or when
        the host is not an address of this machine (etcd will say so).
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 0
    loop = asyncio.get_running_loop()
    try:
        found = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return None
    # Go's listener takes the first address, IPv4 first.
    found.sort(key=lambda info: info[0] != socket.AF_INET)
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    return None


def data_dir_holder(data_dir: Path) -> str | None:
    """Whether another process holds the database of etcd's data dir.

    etcd locks ``member/snap/db`` with ``flock`` when it opens it (bbolt),
    and a second etcd on the same data dir waits for that lock forever,
    silently at the default log levels, until the startup timeout.  The
    lock is tried here (and released at once) to say so up front.

    Returns:
        Who holds it (``pid N (etcd)`` when ``/proc/locks`` tells), or None
        when nobody does or there is no database yet.
    """
    try:
        fd = os.open(data_dir / "member" / "snap" / "db", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no database yet, or one etcd itself will complain about
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_holder(os.fstat(fd)) or "another process"
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock_holder(stat: os.stat_result) -> str | None:
    """``pid N (name)`` of the process holding a flock on this file, from ``/proc/locks``."""
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        with open("/proc/locks") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return None
    for line in lines:
        # "3: FLOCK  ADVISORY  WRITE 17188 fe:00:2237029 0 EOF"; waiters have "->".
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            pid = fields[4]
            try:
                with open(f"/proc/{pid}/comm") as comm:
                    return f"pid {pid} ({comm.read().strip()})"
            except OSError:
                return f"pid {pid}"
    return None


#: zap's levels (etcd's ``--logger=zap``) as the daemon's.
_ETCD_LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "dpanic": LogLevel.critical,
    "panic": LogLevel.critical,
    "fatal": LogLevel.critical,
}


def etcd_log_level(line: str) -> LogLevel:
    """The daemon's log level for one line of etcd's output.

    etcd runs with ``--logger=zap``: each line is a JSON object whose
    ``level`` is zap's.  Relayed at that level, etcd's warnings and errors
    reach ``journalctl -p warning`` and a daemon logging at ``warn``, and
    its chatter at ``info`` stays out of them.  A line that is not zap's
    JSON is what etcd writes outside its logger -- a Go panic and its
    stack, a flag error -- and is relayed as a warning.
    """
    relayed: LogLevel = LogLevel.warn
    if line.startswith("{"):
        try:
            level = json.loads(line).get("level")
        except (ValueError, AttributeError):
            return relayed
        if isinstance(level, str):
            relayed = _ETCD_LEVELS.get(level, relayed)
    return relayed


class _EtcdProcess(ProcessProtocol):
    """One run of the etcd child: its output tail and its end."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ended: asyncio.Future[Failure] = loop.create_future()
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._partial = b""
        self.pid: int | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        # etcd reads nothing from stdin.
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._output(data)

    def errReceived(self, data: bytes) -> None:
        self._output(data)

    def _output(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-4096:]
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.tail.append(line)
                _log.emit(etcd_log_level(line), "etcd: {line}", line=line)

    def processExited(self, reason: Failure) -> None:
        # The child is reaped: it is gone, even if a pipe is still open
        # (processEnded waits for those too, which could be never).
        if not self.ended.done():
            self.ended.set_result(reason)

    def processEnded(self, reason: Failure) -> None:
        if not self.ended.done():
            self.ended.set_result(reason)

    def gone_without_notice(self) -> bool:
        """After SIGKILL: the process is gone but Twisted has not said so.

        Forces a reap first (in case a SIGCHLD was lost); returns True when
        the pid no longer names a live process, in which case :attr:`ended`
        is completed here.
        """
        if not self.running or self.pid is None:
            return False
        reapAllProcesses()
        if self.ended.done():  # the forced reap delivered the exit
            return False
        try:
            with open(f"/proc/{self.pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return False  # still alive
        except OSError:
            pass
        self.ended.set_result(Failure(ProcessTerminated(signal=9)))
        return True

    @property
    def running(self) -> bool:
        return not self.ended.done()

    def signal(self, name: str) -> None:
        """Send a signal if the child still runs."""
        transport: IProcessTransport | None = self.transport
        if transport is None or not self.running:
            return
        try:
            transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def describe_end(self) -> str:
        """How the process ended, for messages."""
        if not self.ended.done():
            return "still running"
        value = self.ended.result().value
        signal = getattr(value, "signal", None)
        if signal:
            return f"killed by signal {signal}"
        return f"exited with status {getattr(value, 'exitCode', '?')}"

    def output(self) -> str:
        return "\n".join(self.tail) or "(no output)"


class EmbeddedEtcd(Service):
    """Runs and supervises a single-node etcd server.

    Args:
        settings: ``payment_channel_storage_server``.
        reactor: Spawns the process.
        clock: Schedules the polls, backoff and stop timers (usually the
            same reactor).
        workdir: Base of relative paths (the daemon's working directory).
        binary: The etcd program (name on ``PATH`` or path).
        health: ``(url, timeout) -> healthy?``; :func:`http_health` by default.
        identify: ``(url, timeout) -> command line`` of the etcd that
            answers there (None: no answer); :func:`http_cmdline` by default.
        stop_timeout: Seconds between SIGTERM and SIGKILL when stopping.
        isolate: Start etcd through ``setsid`` and ``setpriv --pdeathsig
            KILL`` when they are installed (see the module docstring).
        monotonic: The clock the startup deadline and the backoff reset
            are measured on.  Not ``clock.seconds()``, the wall clock: NTP
            stepping it forward while etcd starts (a wrong clock at boot)
            would end the wait at once and kill a healthy etcd.

    Raises:
        EmbeddedEtcdError: ``scheme`` is not ``http``.
    """

    name = "embedded-etcd"

    def __init__(
        self,
        settings: StorageServerSettings,
        reactor: IReactorProcess,
        clock: IReactorTime,
        *,
        workdir: Path,
        binary: str = "etcd",
        health: Callable[[str, float], Awaitable[bool]] = http_health,
        identify: Callable[[str, float], Awaitable[list[str] | None]] = http_cmdline,
        stop_timeout: float = 10.0,
        isolate: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.scheme != "http":
            raise EmbeddedEtcdError(
                f"payment_channel_storage_server.scheme {settings.scheme!r}: the embedded etcd server only "
                "serves http:// (the configuration has no server certificate); use an external cluster for TLS"
            )
        self._settings = settings
        self._reactor = reactor
        self._clock = clock
        self._workdir = workdir
        self._binary = binary
        self._health = health
        self._identify = identify
        self._stop_timeout = stop_timeout
        self._isolate = isolate
        self._monotonic = monotonic
        self._process: _EtcdProcess | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stopping = False
        #: Number of times etcd was started again after an unexpected exit.
        self.restarts = 0
        #: Why the server, once it had started, does not serve now (it is
        #: being restarted, or does not answer as healthy); None while it
        #: does.  For the heartbeat: requests fail meanwhile.
        self.trouble: str | None = None
        #: PIDs of every etcd process spawned, oldest first (diagnostics, tests).
        self.spawned: list[int] = []

    @property
    def client_url(self) -> str:
        """Where the daemon's client reaches this server."""
        return self._settings.local_client_url

    @property
    def pid(self) -> int | None:
        """PID of the running etcd child, if any."""
        process = self._process
        return process.pid if process is not None and process.running else None

    def command(self, etcd: str) -> list[str]:
        """The full argv, including the isolation wrappers when available."""
        argv = [etcd, *etcd_arguments(self._settings, self._workdir)]
        if self._isolate:
            setpriv = shutil.which("setpriv")
            if setpriv is not None:
                argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
            else:
                _log.warn("setpriv (util-linux) not found: etcd may outlive snetd if snetd is killed")
            setsid = shutil.which("setsid")
            if setsid is not None:
                argv = [setsid, *argv]
        return argv

    async def ready(self) -> None:
        """Complete when etcd is healthy for the first time since start.

        Raises:
            EmbeddedEtcdStartError: It did not start (the message has
                etcd's output), or the service was stopped first.
            EmbeddedEtcdError: The service was never started.
        """
        if self._ready is None:
            raise EmbeddedEtcdError("the embedded etcd server has not been started")
        await asyncio.shield(self._ready)

    # -- Service ------------------------------------------------------------------

    def startService(self) -> None:
        """Spawn etcd and begin supervising it.

        Raises:
            EmbeddedEtcdError: The etcd binary is missing (raised here, so
                that twistd aborts startup with the message).
        """
        etcd = find_etcd(self._binary)
        super().startService()  # type: ignore[no-untyped-call]
        loop = asyncio.get_event_loop()
        self._stopping = False
        ready: asyncio.Future[None] = loop.create_future()
        # Whoever never awaits ready() must not get "exception never retrieved".
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._ready = ready
        Path(self._workdir, self._settings.data_dir).parent.mkdir(parents=True, exist_ok=True)
        self._supervisor = asyncio.ensure_future(self._guarded(etcd))

    def stopService(self) -> Deferred[None]:
        """Stop supervising and stop etcd (SIGTERM, then SIGKILL)."""
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromFuture(asyncio.ensure_future(self._shutdown()))

    async def _shutdown(self) -> None:
        self._stopping = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and not supervisor.done():
            supervisor.cancel()
            # Bounded: stopping must finish even if a cancellation were lost
            # inside the supervisor (etcd is terminated below either way).
            await asyncio.wait({supervisor}, timeout=self._stop_timeout)
            if not supervisor.done():
                _log.warn("embedded etcd supervisor did not stop when asked; terminating etcd anyway")
        if self._process is not None:
            await self._terminate(self._process)
            _log.info("embedded etcd stopped")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(
                EmbeddedEtcdStartError("the embedded etcd server was stopped before it was ready")
            )

    # -- supervision ----------------------------------------------------------------

    def _stop_requested(self) -> bool:
        # A method, not the attribute: it changes while we await.
        return self._stopping

    async def _guarded(self, etcd: str) -> None:
        """Run :meth:`_supervise`; a bug in it must not leave etcd unsupervised."""
        try:
            await self._supervise(etcd)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            _log.failure("embedded etcd supervision failed; stopping etcd")
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(EmbeddedEtcdStartError(f"embedded etcd supervision failed: {error}"))
            if self._process is not None:
                await self._terminate(self._process)

    async def _supervise(self, etcd: str) -> None:
        """Start etcd, wait for health, restart it when it dies; until stopped."""
        delay = _RESTART_FIRST
        ready = self._ready
        assert ready is not None
        while not self._stopping:
            blocked = await self._blocked()
            if self._stop_requested():
                return
            if blocked is not None:
                # Nothing is spawned: our etcd would exit at once, or sit
                # waiting for a lock -- while the other server answered in
                # its place.
                if not ready.done():
                    ready.set_exception(
                        EmbeddedEtcdStartError(f"the embedded etcd server at {self.client_url} cannot start: {blocked}")
                    )
                    _log.error("embedded etcd cannot start: {reason}", reason=blocked)
                    return
                self.trouble = f"the embedded etcd server cannot restart: {blocked}"
                _log.error("embedded etcd cannot restart ({reason}); retrying in {delay}s", reason=blocked, delay=delay)
            else:
                process = self._spawn(etcd)
                failure = await self._wait_healthy(process)
                if self._stop_requested():
                    return  # _shutdown terminates the process
                if failure is None:
                    started = self._monotonic()
                    if not ready.done():
                        ready.set_result(None)
                    self.trouble = None
                    _log.info("embedded etcd healthy at {url} (pid {pid})", url=self.client_url, pid=process.pid)
                    await self._watch(process)
                    if self._stop_requested():
                        return
                    if self._monotonic() - started >= _RESTART_RESET_AFTER:
                        delay = _RESTART_FIRST
                    self.trouble = f"the embedded etcd server {process.describe_end()}; restarting it"
                    _log.error(
                        "embedded etcd (pid {pid}) {how}; restarting in {delay}s. Last output:\n{output}",
                        pid=process.pid,
                        how=process.describe_end(),
                        delay=delay,
                        output=process.output(),
                    )
                else:
                    await self._terminate(process)
                    if not ready.done():
                        # The first start failed: report it, leave nothing running.
                        ready.set_exception(
                            EmbeddedEtcdStartError(
                                f"the embedded etcd server at {self.client_url} did not start ({failure}). "
                                f"Its last output:\n{process.output()}"
                            )
                        )
                        _log.error("embedded etcd did not start ({reason})", reason=failure)
                        return
                    self.trouble = f"the embedded etcd server did not restart ({failure}); retrying"
                    _log.error(
                        "embedded etcd restart failed ({reason}); retrying in {delay}s", reason=failure, delay=delay
                    )
            await deferLater(self._clock, delay).asFuture(asyncio.get_running_loop())
            delay = min(delay * 2, _RESTART_MAX)
            self.restarts += 1

    async def _watch(self, process: _EtcdProcess) -> None:
        """Until ``process`` ends, ask it every :data:`_WATCH_INTERVAL` whether it is healthy.

        The answer goes to :attr:`trouble` (and the heartbeat): an etcd that
        runs but serves nothing -- out of space (its NOSPACE alarm), frozen
        -- fails every paid call just as one that crashed.
        """
        loop = asyncio.get_running_loop()
        while process.running:
            tick: asyncio.Future[None] = deferLater(self._clock, _WATCH_INTERVAL).asFuture(loop)
            try:
                either: set[asyncio.Future[Any]] = {process.ended, tick}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                tick.cancel()
            if process.ended.done():
                return
            healthy = await self._health(self.client_url, _WATCH_TIMEOUT)
            if process.ended.done():
                return
            if healthy and self.trouble is not None:
                _log.info("embedded etcd (pid {pid}) is healthy again", pid=process.pid)
                self.trouble = None
            elif not healthy and self.trouble is None:
                self.trouble = f"the embedded etcd server (pid {process.pid}) at {self.client_url} is not healthy"
                _log.warn("{trouble}", trouble=self.trouble)

    async def _blocked(self) -> str | None:
        """Why etcd cannot be started now (a port taken, the data dir locked), or None.

        Checked before every start: with its port taken our etcd exits at
        once, but another etcd listening there answers ``/health`` as if it
        were ours; with its data dir locked it waits, silently, for ever.
        """
        ports = (("client", self._settings.client_url), ("peer", self._settings.peer_url))
        for what, url in ports:
            taken = await busy_port(url)
            if taken is not None:
                return (
                    f"its {what} port {taken} is already in use by another process. {_OTHER_ETCD_HINT}, "
                    f"or give snetd another port (payment_channel_storage_server.{what}_port)"
                )
        data_dir = self._workdir / self._settings.data_dir
        holder = data_dir_holder(data_dir)
        if holder is not None:
            return (
                f"its data dir {data_dir} is in use by {holder}: another etcd runs on it (a second snetd "
                "in the same working directory, or an etcd left over). Stop that one, or give this daemon "
                "a data dir of its own (payment_channel_storage_server.data_dir)"
            )
        return None

    def _spawn(self, etcd: str) -> _EtcdProcess:
        process = _EtcdProcess(asyncio.get_running_loop())
        argv = self.command(etcd)
        # etcd reads ETCD_* variables as flags and refuses to start when one
        # shadows a flag we pass; the daemon's environment must not leak in.
        env = {key: value for key, value in os.environ.items() if not key.startswith("ETCD_")}
        # No ``path=`` (working directory), on purpose: every path etcd gets
        # is absolute already, and with a ``path`` Twisted must fork() and run
        # Python in the child instead of using posix_spawn().  A forked child
        # of a process running gRPC can abort before exec ("epoll_wait error:
        # Bad file descriptor" from gRPC's poller, seen in this test suite).
        self._reactor.spawnProcess(process, argv[0], argv, env=env, childFDs={0: "w", 1: "r", 2: "r"})
        self._process = process
        if process.pid is not None:
            self.spawned.append(process.pid)
        _log.info("embedded etcd starting (pid {pid}): {argv}", pid=process.pid, argv=" ".join(argv))
        return process

    async def _wait_healthy(self, process: _EtcdProcess) -> str | None:
        """Poll until our etcd is healthy (None), or say why it is not.

        Healthy means that ``/health`` says so *and* that the server which
        says so is ours: its command line (``/debug/vars``) is the one we
        started.  Another etcd that took the port between our check and our
        start would answer just as well, and the daemon's payment state
        would go to that server's data dir.
        """
        loop = asyncio.get_running_loop()
        ours = etcd_arguments(self._settings, self._workdir)
        deadline = self._monotonic() + self._settings.startup_timeout
        unconfirmed = False
        while process.running and self._monotonic() < deadline:
            if await self._health(self.client_url, 1.0):
                cmdline = await self._identify(self.client_url, 1.0)
                if cmdline is not None and cmdline[1:] != ours:
                    return self._stranger(cmdline)
                if process.ended.done():  # (not .running: mypy takes it for still True)
                    break  # it died right after answering
                if cmdline is not None:
                    return None
                unconfirmed = True
            await deferLater(self._clock, _POLL_INTERVAL).asFuture(loop)
        if process.running:
            if unconfirmed:
                return (
                    f"not confirmed within {self._settings.startup_timeout:g}s: a server at {self.client_url} "
                    "reports healthy but shows no command line at /debug/vars, so it cannot be told "
                    "from another etcd"
                )
            # An etcd waiting for the lock of a data dir another one holds
            # looks just like this (its output ends with its configuration).
            return (
                f"not healthy within {self._settings.startup_timeout:g}s; is another etcd using its data dir "
                f"{self._workdir / self._settings.data_dir}?"
            )
        ended = process.describe_end()
        # Another etcd on its ports explains an exit ("bind: address already
        # in use") better than etcd's own words.
        cmdline = await self._identify(self.client_url, 1.0)
        if cmdline is not None and cmdline[1:] != ours:
            return f"{ended}: {self._stranger(cmdline)}"
        return ended

    def _stranger(self, cmdline: Sequence[str]) -> str:
        """The failure when another etcd answers on our client URL."""
        return (
            f"another etcd answers at {self.client_url} (--name={_flag(cmdline, 'name')}, "
            f"--data-dir={_flag(cmdline, 'data-dir')}), not the one snetd started "
            f"(--name={self._settings.name}, --data-dir={self._workdir / self._settings.data_dir}). "
            f"{_OTHER_ETCD_HINT}, or give snetd other ports (payment_channel_storage_server.client_port "
            "and peer_port)"
        )

    async def _terminate(self, process: _EtcdProcess) -> None:
        """SIGTERM, SIGKILL after the stop timeout; return once reaped."""
        if not process.running:
            return
        process.signal("TERM")
        kill: IDelayedCall = self._clock.callLater(self._stop_timeout, self._kill, process)
        try:
            reason = await asyncio.shield(process.ended)
        finally:
            if kill.active():
                kill.cancel()
        if not reason.check(ProcessDone):
            _log.info("embedded etcd (pid {pid}) {how}", pid=process.pid, how=process.describe_end())

    def _kill(self, process: _EtcdProcess) -> None:
        _log.warn("embedded etcd (pid {pid}) ignored SIGTERM; sending SIGKILL", pid=process.pid)
        process.signal("KILL")
        # SIGKILL cannot be ignored; if no exit is reported soon, the report
        # was lost: look for ourselves rather than wait forever.
        self._clock.callLater(_KILL_GRACE, self._check_gone, process)

    def _check_gone(self, process: _EtcdProcess) -> None:
        if process.gone_without_notice():
            _log.warn("embedded etcd (pid {pid}) exited without notice; continuing", pid=process.pid)
        elif process.running:
            self._clock.callLater(_KILL_GRACE, self._check_gone, process)
