"""The daemon port keeps at most ``max_connections`` client connections.

At the limit an idle connection makes room for a new one (first those
silent since they came, then the longest idle); when every connection has a
call in progress the new one is refused.  Unit
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
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from twisted.logger import LogLevel, capturedLogs, formatEvent

from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon._proto import example_service_pb2_grpc as pb_grpc
from snet_daemon.config.model import DaemonConfig
from snet_daemon.frontend.admission import AUTOMATIC_LIMIT, FIRST_CALL_GRACE, ConnectionTable, connection_limit
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.wire import frame
from tests.conftest import make_channel
from tests.support.aio import aio_test
from tests.support.daemon import Daemon
from tests.support.oneport import OnePort, http1_head, settle
from tests.support.rawhttp import H2Client, grpc_headers
from tests.support.upstream import Upstream

# -- the table ----------------------------------------------------------------------


@dataclass(eq=False)
class _Fake:
    name: str
    evicted: bool = False

    def evict(self) -> None:
        self.evicted = True


def _full(table: ConnectionTable, *names: str) -> list[_Fake]:
    fakes = [_Fake(name) for name in names]
    assert all(table.admit(fake) for fake in fakes)
    return fakes


def test_below_the_limit_every_connection_is_admitted() -> None:
    table = ConnectionTable(3, lambda: 0.0)
    fakes = _full(table, "1", "2", "3")
    assert len(table) == 3
    assert not any(fake.evicted for fake in fakes)
    table.release(fakes[1])
    assert len(table) == 2
    assert table.admit(_Fake("x"))
    assert not any(fake.evicted for fake in fakes)


def test_connections_silent_since_they_came_make_room_first_then_the_longest_idle() -> None:
    """A flood of silent connections takes its own places, not those of clients that called
    and keep their connection for the next call."""
    now = [0.0]
    table = ConnectionTable(3, lambda: now[0])
    caller, silent, busy = _full(table, "caller", "silent", "busy")
    table.busy(caller)
    table.idle(caller)  # called, idle now; older than "silent"
    table.busy(busy)
    now[0] += FIRST_CALL_GRACE
    newcomer = _Fake("newcomer")
    assert table.admit(newcomer)
    assert (caller.evicted, silent.evicted, busy.evicted) == (False, True, False)
    table.release(silent)  # its connectionLost comes later and changes nothing
    assert len(table) == 3
    # The newcomer is within its grace: the idle caller goes, the busy one stays.
    assert table.admit(_Fake("second"))
    assert (caller.evicted, newcomer.evicted, busy.evicted) == (True, False, False)
    # With no idle one left, a newcomer within its grace goes all the same, oldest first.
    assert table.admit(_Fake("third"))
    assert (newcomer.evicted, busy.evicted) == (True, False)
    assert table.evicted == 3
    assert len(table) == 3


def test_the_idle_one_to_go_is_the_one_idle_the_longest() -> None:
    table = ConnectionTable(2, lambda: 0.0)
    first, second = _full(table, "first", "second")
    for fake in (first, second):
        table.busy(fake)
    table.idle(second)
    table.idle(first)  # idle since later than "second", though older
    assert table.admit(_Fake("new"))
    assert (second.evicted, first.evicted) == (True, False)


def test_with_every_connection_busy_new_ones_are_refused_and_the_operator_warned_once_a_minute() -> None:
    now = [100.0]
    table = ConnectionTable(2, lambda: now[0])
    busy = _full(table, "a", "b")
    for fake in busy:
        table.busy(fake)
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
    table.idle(busy[1])
    assert table.admit(_Fake("f"))
    assert busy[1].evicted


def test_making_room_is_logged_once_a_minute() -> None:
    now = [0.0]
    table = ConnectionTable(1, lambda: now[0])
    _full(table, "first")
    with capturedLogs() as events:
        for _ in range(5):
            assert table.admit(_Fake("next"))
            now[0] += 20
    warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert warnings == [
        "1 client connections are open (max_connections): idle ones are closed to make room for new ones (1 so far)",
        "1 client connections are open (max_connections): idle ones are closed to make room for new ones (4 so far)",
    ]


def test_a_closed_connection_stays_out_whatever_its_protocol_reports_after() -> None:
    """connectionLost releases first; a call ending in the protocol's own cleanup afterwards
    must not bring the connection back into the count."""
    table = ConnectionTable(2, lambda: 0.0)
    (conn,) = _full(table, "gone")
    table.busy(conn)
    table.release(conn)
    table.idle(conn)
    table.busy(conn)
    assert len(table) == 0


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
    through, and the oldest of those connections gets GOAWAY and is closed."""
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


def test_streams_that_send_no_message_do_not_pin_the_connections(limited: Daemon) -> None:
    """Every slot holds a stream that sent HEADERS with a far deadline and nothing more (on the
    daemon's own GetChannelState, which waits for its request): a grpcio call still gets in,
    and the oldest of those connections gets GOAWAY."""
    pins = [H2Client(limited.address) for _ in range(_LIMIT)]
    try:
        for client in pins:
            headers = grpc_headers(extra=[("grpc-timeout", "99999999S")])
            client.request("/escrow.PaymentChannelStateService/GetChannelState", headers, end_stream=False)
            client.pump(0.5)
        time.sleep(0.3)
        assert _call(limited) == 5
        goaway = pins[0].wait_for_goaway(5)
        assert goaway is not None
        assert goaway.error_code == 0
    finally:
        for client in pins:
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


def _front_of_one(release: asyncio.Event) -> tuple[OnePort, ConnectionTable]:
    """A front end whose table holds one connection, and whose calls read their request and
    reply once ``release`` is set."""

    async def handler(call: ServerCall) -> None:
        await call.read()
        await release.wait()
        call.write(b"reply")
        call.finish(0)

    front = OnePort(handler)
    front.factory.connections = table = ConnectionTable(1, lambda: 0.0)
    return front, table


def _h2_client() -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    return client


#: Request headers of a gRPC call to the test front end.
_CALL_HEADERS = [(":method", "POST"), (":scheme", "http"), (":authority", "d"), (":path", "/x.Y/Z"), *grpc_headers()]


def _web_request(body: bytes) -> bytes:
    """A gRPC-Web call over HTTP/1.1."""
    head = (
        "POST /x.Y/Z HTTP/1.1\r\nHost: daemon\r\nContent-Type: application/grpc-web+proto\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@aio_test
async def test_an_http1_connection_is_busy_from_a_whole_request_to_its_response() -> None:
    """A request still arriving (one byte of it, or a slow body) holds no place, as on HTTP/2;
    a whole request does until its response is finished; between requests the connection is
    closed for the newcomer, and aborted after the grace period if its client, no longer
    reading, keeps it from closing."""
    release = asyncio.Event()
    front, table = _front_of_one(release)
    front.factory.evict_grace = 0.05
    request = _web_request(frame(b"request"))
    _, trickle = front.connect(request[:-3])  # all but the last bytes of its body
    assert table.admit(_Fake("newcomer"))  # it makes room: the request was not whole
    assert trickle.disconnecting
    table = front.factory.connections = ConnectionTable(1, lambda: 0.0)
    browser, transport = front.connect(request)
    await settle()
    assert not table.admit(_Fake("newcomer"))  # a whole request being served
    release.set()
    await settle()
    assert http1_head(transport.value())[0] == 200
    assert table.admit(_Fake("newcomer"))  # between requests: idle
    assert transport.disconnecting
    await asyncio.sleep(0.2)
    assert transport.disconnected  # StringTransport: abortConnection, not just loseConnection
    browser.connectionLost(None)  # type: ignore[arg-type]
    assert len(table) == 1


@aio_test
async def test_http2_streams_without_a_request_message_do_not_hold_the_connection() -> None:
    """HEADERS alone (no message, a far deadline) leave the connection idle to the table: a
    client cannot pin every slot with streams that cost it nothing.  A whole request message
    makes it busy until the reply is sent; then it is idle again, and closed for a newcomer
    with GOAWAY."""
    release = asyncio.Event()
    front, table = _front_of_one(release)
    client = _h2_client()
    protocol, transport = front.connect(client.data_to_send())
    headers = [*_CALL_HEADERS, ("grpc-timeout", "99999999S")]
    pins = [1, 3]
    for sid in pins:
        client.send_headers(sid, headers)
    protocol.dataReceived(client.data_to_send())
    await settle()
    assert not table._busy
    client.send_data(1, frame(b"request"), end_stream=True)
    protocol.dataReceived(client.data_to_send())
    await settle()
    assert not table.admit(_Fake("newcomer"))  # a whole message: a call in progress
    release.set()
    await settle()
    events = client.receive_data(transport.value())
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 1 for e in events)
    # Stream 3 still waits for its message: idle all the same.  Closed to make room, the
    # connection refuses it (gRPC clients retry such a stream elsewhere) and goes at once.
    transport.clear()
    assert table.admit(_Fake("newcomer"))
    events = client.receive_data(transport.value())
    (reset,) = [e for e in events if isinstance(e, h2.events.StreamReset)]
    assert (reset.stream_id, reset.error_code) == (3, h2.errors.ErrorCodes.REFUSED_STREAM)
    (goaway,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway.error_code == 0
    assert transport.disconnecting


@aio_test
async def test_a_connection_given_up_makes_room_before_it_is_gone() -> None:
    """A protocol error on a connection with a call in progress cancels the call: from then on
    the connection holds no call, even while its client keeps it from closing."""
    front, table = _front_of_one(asyncio.Event())  # never released
    client = _h2_client()
    protocol, _ = front.connect(client.data_to_send())
    client.send_headers(1, _CALL_HEADERS)
    client.send_data(1, frame(b"request"))
    protocol.dataReceived(client.data_to_send())
    await settle()
    assert not table.admit(_Fake("newcomer"))
    protocol.dataReceived(b"\x00\x00\x00\x04\x00\x00\x00\x00\x03")  # SETTINGS on a stream: a protocol error
    await settle()
    assert table.admit(_Fake("newcomer"))
