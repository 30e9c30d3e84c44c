"""The daemon port keeps at most ``max_connections`` client connections.

At the limit the oldest idle connection makes room for a new one; when
every connection has a call in progress the new one is refused.  Unit
tests on the table with fake connections, then a real ``twistd snetd``
with real HTTP/2 and grpcio clients, and the open-file limit it raises.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from twisted.logger import LogLevel, capturedLogs, formatEvent

from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon._proto import example_service_pb2_grpc as pb_grpc
from snet_daemon.config.model import DaemonConfig
from snet_daemon.frontend.admission import AUTOMATIC_LIMIT, ConnectionTable, connection_limit
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.wire import frame
from tests.conftest import make_channel
from tests.support.aio import aio_test
from tests.support.daemon import Daemon
from tests.support.oneport import OnePort
from tests.support.rawhttp import H2Client, grpc_headers
from tests.support.upstream import Upstream

# -- the table ----------------------------------------------------------------------


@dataclass(eq=False)
class _Fake:
    name: str
    busy: bool = False
    evicted: bool = False

    def idle(self) -> bool:
        return not self.busy

    def evict(self) -> None:
        self.evicted = True


def test_below_the_limit_every_connection_is_admitted() -> None:
    table = ConnectionTable(3, lambda: 0.0)
    fakes = [_Fake(str(i)) for i in range(3)]
    assert all(table.admit(fake) for fake in fakes)
    assert len(table) == 3
    assert not any(fake.evicted for fake in fakes)
    table.release(fakes[1])
    assert len(table) == 2
    assert table.admit(_Fake("x"))
    assert not any(fake.evicted for fake in fakes)


def test_at_the_limit_the_oldest_idle_connection_makes_room() -> None:
    table = ConnectionTable(3, lambda: 0.0)
    first, second, third = _Fake("1", busy=True), _Fake("2"), _Fake("3")
    for fake in (first, second, third):
        assert table.admit(fake)
    newcomer = _Fake("4")
    assert table.admit(newcomer)
    # The busy first one is kept; the oldest idle one goes.
    assert (first.evicted, second.evicted, third.evicted) == (False, True, False)
    assert len(table) == 3
    assert table.evicted == 1
    # Its connectionLost comes later and changes nothing.
    table.release(second)
    assert len(table) == 3
    assert table.admit(_Fake("5"))
    assert third.evicted


def test_with_every_connection_busy_new_ones_are_refused_and_the_operator_warned_once_a_minute() -> None:
    now = [100.0]
    table = ConnectionTable(2, lambda: now[0])
    busy = [_Fake("a", busy=True), _Fake("b", busy=True)]
    for fake in busy:
        assert table.admit(fake)
    with capturedLogs() as events:
        assert not table.admit(_Fake("c"))
        now[0] += 30
        assert not table.admit(_Fake("d"))
        now[0] += 31
        assert not table.admit(_Fake("e"))
    warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 2, warnings
    assert "max_connections" in warnings[0]
    assert "2 are open" in warnings[0]
    assert "3 refused so far" in warnings[1]
    assert table.refused == 3
    assert len(table) == 2
    assert not any(fake.evicted for fake in busy)
    # A call ends: its connection may now make room.
    busy[1].busy = False
    assert table.admit(_Fake("f"))
    assert busy[1].evicted


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ConnectionTable(0, lambda: 0.0)


@pytest.mark.parametrize(
    ("configured", "open_files", "limit"),
    [
        (0, 0, AUTOMATIC_LIMIT),  # limits unknown
        (0, 1024, 768),  # a shell's default: 256 kept for the daemon
        (0, 65536, AUTOMATIC_LIMIT),  # the systemd unit's
        (0, 200, 16),  # absurdly low: still serve a few
        (50, 1024, 50),
    ],
)
def test_the_automatic_limit_keeps_room_for_the_daemons_own_files(configured: int, open_files: int, limit: int) -> None:
    assert connection_limit(configured, open_files) == (limit, None)


def test_a_limit_beyond_the_open_files_is_kept_with_a_warning() -> None:
    limit, warning = connection_limit(5000, 1024)
    assert limit == 5000
    assert warning is not None
    assert "LimitNOFILE" in warning
    assert "768" in warning


def test_max_connections_is_a_whole_number_of_zero_or_more() -> None:
    assert DaemonConfig.model_validate({}).frontend.max_connections == 0
    assert DaemonConfig.model_validate({"max_connections": "7"}).frontend.max_connections == 7
    with pytest.raises(ValueError):
        DaemonConfig.model_validate({"max_connections": -1})


# -- a real daemon ------------------------------------------------------------------

_LIMIT = 3


@pytest.fixture(scope="module")
def limited(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    config = {"service_endpoint": upstream.endpoint, "max_connections": _LIMIT}
    with Daemon(tmp_path_factory.mktemp("limited"), config) as running:
        yield running


def _call(daemon: Daemon) -> int:
    """One grpcio call on a connection of its own."""
    channel = make_channel(daemon.address)
    try:
        return pb_grpc.CalculatorStub(channel).add(pb.Numbers(a=2, b=3), timeout=10).value  # type: ignore[no-any-return]
    finally:
        channel.close()


def _slow_call(client: H2Client, delay_ms: int) -> int:
    body = frame(pb.EchoRequest(payload=b"x", delay_ms=delay_ms).SerializeToString())
    return client.request("/example_service.Echo/Unary", grpc_headers(), body)


def _refused(daemon: Daemon) -> bool:
    """Whether a new TCP connection is closed by the daemon before it answers anything."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        try:
            return sock.recv(1024) == b""
        except ConnectionResetError:
            return True


def test_idle_connections_make_room_for_new_ones(limited: Daemon) -> None:
    """Connections that only said hello fill the table; calls on new connections still go
    through, and the oldest idle connections get GOAWAY and are closed."""
    idle = [H2Client(limited.address) for _ in range(_LIMIT)]
    try:
        for client in idle:
            client.pump(0.5)  # the server's SETTINGS: admitted
        assert _call(limited) == 5
        oldest = idle[0]
        goaway = oldest.wait_for_goaway(5)
        assert goaway is not None
        assert goaway.error_code == 0
        end = time.monotonic() + 5
        while not oldest.closed and time.monotonic() < end:
            oldest.pump(0.2)
        assert oldest.closed
        # The others were not needed.
        assert all(client.goaway is None for client in idle[1:])
    finally:
        for client in idle:
            client.close()
    assert _call(limited) == 5


def test_when_every_connection_has_a_call_new_ones_are_refused(limited: Daemon) -> None:
    """Nothing running is cut short: the new connection is closed unread, grpcio says
    UNAVAILABLE, and calls go through again once a connection is idle."""
    busy = [H2Client(limited.address) for _ in range(_LIMIT)]
    try:
        streams = [_slow_call(client, 3000) for client in busy]
        time.sleep(0.3)  # the calls have reached the service
        assert _refused(limited)
        channel = make_channel(limited.address)
        try:
            with pytest.raises(grpc.RpcError) as raised:
                pb_grpc.CalculatorStub(channel).add(pb.Numbers(a=1, b=1), timeout=1)
            assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            channel.close()
        for client, sid in zip(busy, streams, strict=True):
            reply = client.wait(sid, 10)
            assert reply.ended, reply
            assert reply.trailers.get("grpc-status") == "0", reply
        assert _call(limited) == 5
    finally:
        for client in busy:
            client.close()
    assert "refusing client connections: 3 are open" in limited.log_tail(200)


# -- the open-file limit ------------------------------------------------------------


def _limits(pid: int) -> tuple[str, str]:
    """The soft and hard open-file limits of process ``pid``."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open-file limit")


def test_twistd_raises_its_soft_open_file_limit_to_the_hard_one(upstream: Upstream, tmp_path: Path) -> None:
    """As Go programs do: a daemon started with ``ulimit -Sn 256`` gets its hard limit."""
    import resource

    probe = subprocess.run(["prlimit", "--version"], capture_output=True, check=False)
    assert probe.returncode == 0, "prlimit (util-linux) is required"
    # Lowering the hard limit needs no privilege; raising it would.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    daemon = Daemon(tmp_path, {"service_endpoint": upstream.endpoint}, prefix=["prlimit", f"--nofile=256:{hard}", "--"])
    with daemon:
        assert daemon.process is not None
        assert _limits(daemon.process.pid) == (str(hard), str(hard))
        assert _call(daemon) == 5


def test_raise_open_file_limit_raises_the_soft_limit_to_the_hard_one() -> None:
    """In a child process, so this one keeps its limits."""
    script = (
        "import resource\n"
        "from snet_daemon.frontend.admission import open_file_limit, raise_open_file_limit\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "before = open_file_limit()\n"
        "raise_open_file_limit()\n"
        "print(before, open_file_limit() == hard)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["256", "True"]


@aio_test
async def test_an_idle_http1_connection_makes_room_and_is_cut_off_if_it_does_not_close() -> None:
    """Between requests an HTTP/1.1 connection is idle: it is closed for the newcomer, and
    aborted after the grace period if its client, no longer reading, keeps it from closing."""

    async def handler(call: ServerCall) -> None:
        pass

    front = OnePort(handler)
    front.factory.connections = ConnectionTable(1, lambda: 0.0)
    front.factory.evict_grace = 0.05
    browser, transport = front.connect(b"GET")  # an HTTP/1.1 request line, not finished
    assert front.factory.connections.admit(_Fake("newcomer"))
    assert transport.disconnecting
    await asyncio.sleep(0.2)
    assert transport.disconnected  # StringTransport: abortConnection, not just loseConnection
    browser.connectionLost(None)  # type: ignore[arg-type]
    assert len(front.factory.connections) == 1
