"""The embedded etcd server: a real ``etcd`` child process, supervised.

Each test runs its own server on free loopback ports, in a temporary working
directory, and checks by PID that no etcd process outlives it.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.logger import LogLevel, capturedLogs

from snet_daemon.config.sections import StorageServerSettings
from snet_daemon.storage import embedded as embedded_module
from snet_daemon.storage.base import StorageSetupError
from snet_daemon.storage.embedded import (
    EmbeddedEtcd,
    EmbeddedEtcdError,
    EmbeddedEtcdStartError,
    etcd_arguments,
    etcd_log_level,
    find_etcd,
    http_cmdline,
)
from snet_daemon.storage.etcd import EtcdStorage
from tests.support.aio import aio_test
from tests.support.daemon import REPO
from tests.support.etcd import EtcdServer, etcd_factory, pid_alive, requires_etcd
from tests.support.ports import free_port

__all__ = ["etcd_factory"]  # a fixture, imported for pytest


def server_settings(**changes: object) -> StorageServerSettings:
    """Embedded-server settings on free loopback ports."""
    client, peer = free_port(), free_port()
    while peer == client:
        peer = free_port()
    settings = StorageServerSettings(
        name="storage-1",
        scheme="http",
        host="127.0.0.1",
        client_port=client,
        peer_port=peer,
        token="test-token",
        cluster=f"storage-1=http://127.0.0.1:{peer}",
        startup_timeout=20.0,
        data_dir="storage-data-dir-1.etcd",
        log_level="warn",
        log_outputs=("./etcd-server.log",),
        enabled=False,
    )
    return replace(settings, **changes)  # type: ignore[arg-type]


def embedded(workdir: Path, settings: StorageServerSettings | None = None, **kwargs: object) -> EmbeddedEtcd:
    """An EmbeddedEtcd on the real reactor."""
    return EmbeddedEtcd(settings or server_settings(), reactor, reactor, workdir=workdir, **kwargs)  # type: ignore[arg-type]


async def stop(service: EmbeddedEtcd) -> None:
    """Stop the service and wait for it."""
    await service.stopService().asFuture(asyncio.get_running_loop())


async def wait_for(predicate: object, within: float) -> None:
    """Poll ``predicate()`` until true."""
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------
# no process needed


def test_arguments_follow_settings_with_paths_relative_to_workdir(tmp_path: Path) -> None:
    """Data dir and log files are resolved against the working directory; stderr/stdout stay names."""
    settings = server_settings(log_outputs=("./etcd.log", "stderr"), data_dir="state/etcd")
    args = etcd_arguments(settings, tmp_path)
    assert f"--data-dir={tmp_path / 'state/etcd'}" in args
    assert f"--log-outputs={tmp_path / 'etcd.log'},stderr" in args
    assert f"--listen-client-urls=http://127.0.0.1:{settings.client_port}" in args
    assert f"--initial-advertise-peer-urls=http://127.0.0.1:{settings.peer_port}" in args
    assert "--initial-cluster-token=test-token" in args
    assert "--auto-compaction-mode=periodic" in args
    absolute = etcd_arguments(replace(settings, data_dir="/var/lib/snetd/etcd", cluster=""), tmp_path)
    assert "--data-dir=/var/lib/snetd/etcd" in absolute
    assert f"--initial-cluster=storage-1=http://127.0.0.1:{settings.peer_port}" in absolute


@pytest.mark.parametrize(
    ("line", "level"),
    [
        ('{"level":"info","msg":"serving client traffic"}', LogLevel.info),
        ('{"level":"warn","msg":"slow fdatasync","took":"1.2s"}', LogLevel.warn),
        ('{"level":"error","msg":"failed to publish local member"}', LogLevel.error),
        ('{"level":"fatal","msg":"failed to list data directory"}', LogLevel.critical),
        ('{"level":"panic","msg":"failed to open database"}', LogLevel.critical),
        ('{"level":"debug","msg":"recv"}', LogLevel.debug),
        ("panic: failed to open database", LogLevel.warn),
        ("goroutine 1 [running]:", LogLevel.warn),
        ('{"msg":"no level"}', LogLevel.warn),
        ("{not json", LogLevel.warn),
    ],
)
def test_etcd_output_is_logged_at_etcds_level(line: str, level: LogLevel) -> None:
    """etcd's zap JSON lines keep their level; anything else it prints (a Go panic, a flag error) is a warning."""
    assert etcd_log_level(line) == level


def test_missing_binary_says_how_to_fix_it(tmp_path: Path) -> None:
    """Without the etcd program, starting fails at once with the apt-get and endpoints hints."""
    with pytest.raises(EmbeddedEtcdError, match=r"apt-get install etcd-server.*storage_client\.endpoints"):
        find_etcd("etcd-not-installed-here")
    service = embedded(tmp_path, binary="etcd-not-installed-here")
    with pytest.raises(EmbeddedEtcdError, match="apt-get install etcd-server"):
        service.startService()
    assert not service.running


def test_https_scheme_is_refused(tmp_path: Path) -> None:
    """The embedded server cannot serve TLS (no server certificate keys), so https is refused clearly."""
    with pytest.raises(EmbeddedEtcdError, match="only serves http"):
        embedded(tmp_path, server_settings(scheme="https"))


def test_client_url_uses_loopback_for_wildcard_hosts() -> None:
    """A server listening on 0.0.0.0 is reached by this daemon on 127.0.0.1."""
    settings = server_settings(host="0.0.0.0")
    assert settings.client_url.startswith("http://0.0.0.0:")
    assert settings.local_client_url == f"http://127.0.0.1:{settings.client_port}"


# ---------------------------------------------------------------------------
# the real thing


@requires_etcd
@aio_test
async def test_lifecycle_start_crash_restart_stop_start(tmp_path: Path) -> None:
    """Start (healthy), SIGKILL the child (restarted, data kept), stop (child gone), start again (data still there)."""
    service = embedded(tmp_path)
    service.startService()
    await asyncio.wait_for(service.ready(), 30)
    first = service.pid
    assert first is not None
    assert pid_alive(first)
    assert (tmp_path / "storage-data-dir-1.etcd" / "member").is_dir()
    assert (tmp_path / "etcd-server.log").exists()  # the configured log output, relative to workdir

    storage = EtcdStorage([service.client_url], request_timeout=2.0)
    await storage.put("embedded/a", b"kept")

    os.kill(first, signal.SIGKILL)
    await wait_for(lambda: service.pid not in (None, first), within=15)
    assert service.restarts == 1
    await wait_for(lambda: not pid_alive(first), within=5)
    entry = None
    deadline = time.monotonic() + 15
    while entry is None:
        try:
            entry = await storage.get("embedded/a")
        except Exception:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    assert entry.value == b"kept"

    second = service.pid
    assert second is not None
    await stop(service)
    assert service.pid is None
    assert not pid_alive(second)
    assert all(not pid_alive(pid) for pid in service.spawned)

    service.startService()
    await asyncio.wait_for(service.ready(), 30)
    entry = await storage.get("embedded/a")
    assert entry is not None
    assert entry.value == b"kept"
    await storage.close()
    await stop(service)
    assert all(not pid_alive(pid) for pid in service.spawned)


@requires_etcd
@aio_test
async def test_trouble_is_reported_while_etcd_is_frozen_or_restarting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once started, a frozen etcd (SIGSTOP) and one being restarted after a crash show in ``trouble``
    (which the heartbeat reports); it clears when etcd is healthy again."""
    monkeypatch.setattr(embedded_module, "_WATCH_INTERVAL", 0.2)
    service = embedded(tmp_path)
    service.startService()
    try:
        await asyncio.wait_for(service.ready(), 30)
        assert service.trouble is None
        pid = service.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            await wait_for(lambda: service.trouble is not None, within=10)
            assert f"(pid {pid})" in str(service.trouble)
            assert "is not healthy" in str(service.trouble)
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_for(lambda: service.trouble is None, within=10)
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: service.trouble is not None, within=10)
        assert "killed by signal 9; restarting it" in str(service.trouble)
        await wait_for(lambda: service.pid not in (None, pid) and service.trouble is None, within=15)
    finally:
        await stop(service)


@requires_etcd
@aio_test
async def test_failed_start_reports_etcd_output_and_leaves_no_process(tmp_path: Path) -> None:
    """When etcd cannot start (its data dir is a file), ready() fails quoting etcd, and no etcd is left."""
    settings = server_settings(log_outputs=("stderr",), data_dir="not-a-directory")
    (tmp_path / "not-a-directory").write_text("")
    service = embedded(tmp_path, settings)
    with capturedLogs() as events:
        service.startService()
        with pytest.raises(EmbeddedEtcdStartError, match="did not start") as failed:
            await asyncio.wait_for(service.ready(), 30)
    assert "not a directory" in str(failed.value)
    # etcd's own "fatal" line is relayed as critical, not at info: `journalctl -p warning` shows it.
    relayed = [event for event in events if "not a directory" in event.get("line", "")]
    assert relayed
    assert {event["log_level"] for event in relayed} == {LogLevel.critical}
    # Worth trying again later, unlike a missing program: the payment stack retries it.
    assert not isinstance(failed.value, StorageSetupError)
    assert service.spawned
    assert all(not pid_alive(pid) for pid in service.spawned)
    assert service.restarts == 0  # a first start is not retried
    await stop(service)


@requires_etcd
@pytest.mark.parametrize("port", ["client_port", "peer_port"])
@aio_test
async def test_a_port_taken_by_another_process_is_reported_without_starting_etcd(tmp_path: Path, port: str) -> None:
    """A client or peer port someone else listens on fails the start at once, naming the port and the
    setting to change; no etcd is spawned."""
    settings = server_settings()
    number = getattr(settings, port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", number))
        taken.listen()
        service = embedded(tmp_path, settings)
        service.startService()
        with pytest.raises(EmbeddedEtcdStartError, match=f"127.0.0.1:{number} is already in use") as failed:
            await asyncio.wait_for(service.ready(), 30)
    assert f"payment_channel_storage_server.{port}" in str(failed.value)
    assert not service.spawned
    await stop(service)


@requires_etcd
@aio_test
async def test_another_etcd_on_the_ports_is_not_taken_for_ours(
    tmp_path: Path, etcd_factory: Callable[[], EtcdServer]
) -> None:
    """Another etcd (Debian's etcd.service, say) serves the configured ports: the start fails, says
    how to stop it, and nothing is written to that etcd.  (It used to answer /health in place of
    ours, so the daemon's payments went to its data dir while ours crash-looped.)"""
    other = etcd_factory().start()
    settings = server_settings(client_port=other.client_port, peer_port=other.peer_port)
    service = embedded(tmp_path, settings)
    service.startService()
    with pytest.raises(EmbeddedEtcdStartError, match="already in use") as failed:
        await asyncio.wait_for(service.ready(), 30)
    assert f"127.0.0.1:{other.client_port}" in str(failed.value)
    assert "systemctl disable --now etcd" in str(failed.value)
    assert not service.spawned
    assert not (tmp_path / settings.data_dir).exists()
    assert other.pid is not None  # the other etcd is left alone
    await stop(service)


@requires_etcd
@aio_test
async def test_another_etcd_that_answers_for_ours_is_recognised(
    tmp_path: Path, etcd_factory: Callable[[], EtcdServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should another etcd get the port between the check and our start, its healthy answer is still
    not taken for ours: its command line (name, data dir) is not the one snetd started."""
    other = etcd_factory().start()

    async def free(url: str) -> None:
        return None  # the race: the ports looked free

    monkeypatch.setattr(embedded_module, "busy_port", free)
    settings = server_settings(client_port=other.client_port, peer_port=other.peer_port, startup_timeout=10.0)
    service = embedded(tmp_path, settings)
    service.startService()
    with pytest.raises(EmbeddedEtcdStartError, match="another etcd answers") as failed:
        await asyncio.wait_for(service.ready(), 30)
    assert f"--data-dir={other.data_dir}" in str(failed.value)
    assert f"--data-dir={tmp_path / settings.data_dir}" in str(failed.value)
    assert service.spawned
    assert all(not pid_alive(pid) for pid in service.spawned)
    await stop(service)


@requires_etcd
@aio_test
async def test_a_data_dir_another_etcd_holds_is_reported_at_once(
    tmp_path: Path, etcd_factory: Callable[[], EtcdServer]
) -> None:
    """Another etcd (on other ports) runs on the configured data dir: the start fails at once naming
    the data dir and the process holding it.  (Our etcd used to wait silently for its lock until the
    startup timeout.)"""
    other = etcd_factory().start()
    assert other.pid is not None
    settings = server_settings(data_dir=str(other.data_dir), startup_timeout=15.0)
    service = embedded(tmp_path, settings)
    service.startService()
    start = time.monotonic()
    with pytest.raises(EmbeddedEtcdStartError, match="is in use by") as failed:
        await asyncio.wait_for(service.ready(), 30)
    assert time.monotonic() - start < 5
    assert f"data dir {other.data_dir} is in use by pid {other.pid} (etcd)" in str(failed.value)
    assert not service.spawned
    await stop(service)


@requires_etcd
@aio_test
async def test_our_etcd_is_recognised_by_its_command_line(tmp_path: Path) -> None:
    """The command line /debug/vars shows is the one snetd started: what tells ours from another etcd."""
    settings = server_settings()
    service = embedded(tmp_path, settings)
    service.startService()
    try:
        await asyncio.wait_for(service.ready(), 30)
        cmdline = await http_cmdline(service.client_url, 2.0)
        assert cmdline is not None
        assert cmdline[1:] == etcd_arguments(settings, tmp_path)
        assert await http_cmdline(f"http://127.0.0.1:{free_port()}", 1.0) is None
    finally:
        await stop(service)


class _SteppedClock:
    """The reactor as a clock, whose wall clock (``seconds()``) is stepped an hour forward on demand."""

    def __init__(self) -> None:
        self.step = 0.0

    def seconds(self) -> float:
        return float(reactor.seconds()) + self.step

    def callLater(self, delay: float, f: Callable[..., object], *args: object, **kwargs: object) -> object:
        return reactor.callLater(delay, f, *args, **kwargs)

    def getDelayedCalls(self) -> object:
        return reactor.getDelayedCalls()


@requires_etcd
@aio_test
async def test_a_wall_clock_step_while_starting_does_not_end_the_wait(tmp_path: Path) -> None:
    """NTP steps the wall clock an hour forward while etcd starts (a wrong clock at boot): the start
    still succeeds.  (The deadline was on the wall clock: the wait ended at once and a healthy etcd
    was killed.)"""
    clock = _SteppedClock()
    service = EmbeddedEtcd(server_settings(), reactor, clock, workdir=tmp_path)  # type: ignore[arg-type]
    service.startService()
    try:
        await wait_for(lambda: service.spawned, within=10)
        clock.step = 3600.0
        await asyncio.wait_for(service.ready(), 30)
        assert service.pid == service.spawned[0]
    finally:
        await stop(service)


@requires_etcd
@aio_test
async def test_start_that_never_gets_healthy_is_stopped(tmp_path: Path) -> None:
    """If etcd runs but is not healthy within startup_timeout, it is stopped and ready() fails."""

    async def never_healthy(url: str, seconds: float) -> bool:
        return False

    service = embedded(tmp_path, server_settings(startup_timeout=1.0), health=never_healthy)
    service.startService()
    with pytest.raises(EmbeddedEtcdStartError, match=r"not healthy within 1s; is another etcd using its data dir"):
        await asyncio.wait_for(service.ready(), 30)
    assert service.pid is None
    assert service.spawned
    assert all(not pid_alive(pid) for pid in service.spawned)
    await stop(service)


@requires_etcd
@aio_test
async def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    """An etcd that does not react to SIGTERM (frozen) is SIGKILLed after the stop timeout."""
    service = embedded(tmp_path, stop_timeout=1.0)
    service.startService()
    await asyncio.wait_for(service.ready(), 30)
    pid = service.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    await stop(service)
    assert 0.9 < time.monotonic() - start < 5
    assert not pid_alive(pid)


@requires_etcd
@aio_test
async def test_stop_during_startup_leaves_no_process(tmp_path: Path) -> None:
    """Stopping while etcd is still starting stops it and fails ready()."""
    service = embedded(tmp_path)
    service.startService()
    # Stopped once etcd is spawned (not before: that would prove nothing), well before it is healthy.
    await wait_for(lambda: service.spawned, within=10)
    await stop(service)
    with pytest.raises(EmbeddedEtcdStartError, match="stopped before it was ready"):
        await service.ready()
    assert len(service.spawned) == 1
    assert not pid_alive(service.spawned[0])


@requires_etcd
@aio_test
async def test_stop_finishes_even_if_the_supervisor_ignores_cancellation(tmp_path: Path) -> None:
    """A cancellation lost inside supervision (Python 3.11's wait_for could lose
    one) must not hang stopping: etcd is terminated after the stop timeout."""
    probes: list[asyncio.Task[object]] = []

    async def stubborn(url: str, seconds: float) -> bool:
        task = asyncio.current_task()
        assert task is not None
        probes.append(task)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(3600)  # the first cancellation is swallowed
        return False

    service = embedded(tmp_path, stop_timeout=1.0, health=stubborn)
    service.startService()
    await wait_for(lambda: probes and service.pid is not None, 10)
    start = time.monotonic()
    await asyncio.wait_for(stop(service), 10)
    assert 0.9 < time.monotonic() - start < 5
    assert service.spawned
    assert all(not pid_alive(pid) for pid in service.spawned)
    with pytest.raises(EmbeddedEtcdStartError, match="stopped before it was ready"):
        await service.ready()
    probes[0].cancel()  # the second cancellation ends the stuck supervisor
    await asyncio.wait(probes, timeout=5)
    assert probes[0].done()


_SUPERVISOR = """
import asyncio, json, sys
from pathlib import Path
from twisted.internet import asyncioreactor
loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)
asyncioreactor.install(loop)
from twisted.internet import reactor
from twisted.logger import LogLevel, capturedLogs
from snet_daemon.config.sections import StorageServerSettings
from snet_daemon.storage.embedded import EmbeddedEtcd

settings = json.loads(sys.argv[1])
settings["log_outputs"] = tuple(settings["log_outputs"])
service = EmbeddedEtcd(StorageServerSettings(**settings), reactor, reactor, workdir=Path(sys.argv[2]))
reactor.addSystemEventTrigger("before", "shutdown", service.stopService)

async def main():
    service.startService()
    await service.ready()
    print(service.pid, flush=True)

reactor.callWhenRunning(lambda: asyncio.ensure_future(main()))
reactor.run()
"""


@requires_etcd
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_daemon_death_leaves_no_etcd(tmp_path: Path, how: signal.Signals) -> None:
    """Whether the supervising process is SIGKILLed (kernel pdeathsig) or SIGTERMed (clean stop), etcd dies too."""
    settings = asdict(server_settings())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", _SUPERVISOR, json.dumps(settings), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "supervisor did not report etcd ready"
        etcd_pid = int(process.stdout.readline())
        assert pid_alive(etcd_pid)
        process.send_signal(how)
        process.wait(15)
        deadline = time.monotonic() + 10
        while pid_alive(etcd_pid):
            assert time.monotonic() < deadline, f"etcd {etcd_pid} outlived its parent"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@aio_test
async def test_exit_that_twisted_never_reported_is_detected() -> None:
    """After SIGKILL, a child whose exit report was lost is found gone, so stopping never hangs."""
    from snet_daemon.storage.embedded import _EtcdProcess

    child = subprocess.Popen(["true"])  # noqa: ASYNC220 (reaped at once, on purpose)
    child.wait()  # reaped behind Twisted's back: no report will ever come
    process = _EtcdProcess(asyncio.get_running_loop())
    process.pid = child.pid
    assert process.running
    assert process.gone_without_notice()
    assert process.ended.done()
    assert process.describe_end() == "killed by signal 9"
    alive = _EtcdProcess(asyncio.get_running_loop())
    alive.pid = os.getpid()
    assert not alive.gone_without_notice()
    assert alive.running
