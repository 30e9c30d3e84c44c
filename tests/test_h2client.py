"""The upstream HTTP/2 client: its connection driven frame by frame (no sockets), and its own unary calls."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from hyperframe.frame import GoAwayFrame
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import Logger

from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.upstream.h2client import AnswerLost, H2Upstream, UpstreamConnection
from tests.support.aio import aio_test, wait_for
from tests.support.ports import free_port
from tests.support.upstream import Upstream


class _Pool:
    """The bits of H2Upstream a connection calls back."""

    endpoint = "http://service.test:5000"
    peer = "the service"
    log = Logger(namespace="tests.h2client")

    def __init__(self) -> None:
        self.loop = asyncio.get_event_loop()
        self.capacity_changes = 0

    def capacity_changed(self) -> None:
        self.capacity_changes += 1

    def connection_made(self, conn: Any) -> None:
        pass

    def connection_lost(self, conn: Any) -> None:
        pass


def _server_bytes(*frames: str) -> bytes:
    """Frames a gRPC server would send: its preface, then GOAWAY and/or PING."""
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(h2.connection.H2Connection(h2.config.H2Configuration(client_side=True)).data_to_send() or b"")
    data = server.data_to_send()
    for name in frames:
        if name == "goaway":
            server.close_connection()
            data += server.data_to_send()
    if "ping" in frames:
        # A PING after GOAWAY: h2 on our side refuses it with ProtocolError.
        data += b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
    return data


@aio_test
async def test_a_connection_told_goaway_takes_no_new_streams() -> None:
    """After the service's GOAWAY (then a PING, in one read) the connection refuses new streams at
    once, answers the PING (h2 used to raise ProtocolError on it), and, carrying no call, closes."""
    pool = _Pool()
    conn = UpstreamConnection(pool)  # type: ignore[arg-type]
    transport = StringTransport()
    conn.makeConnection(transport)  # type: ignore[no-untyped-call]
    transport.clear()
    assert conn.has_capacity()
    conn.dataReceived(_server_bytes("goaway", "ping"))
    assert conn.draining
    assert not conn.has_capacity()
    relay_like: Any = type("R", (), {"conn": None, "sid": 0})()
    assert conn.start(relay_like, [(":method", "POST"), (":path", "/a.B/C")]) is False
    assert b"\x00\x00\x08\x06\x01\x00\x00\x00\x0012345678" in transport.value()  # PING ack
    assert transport.disconnecting
    assert pool.capacity_changes >= 1


@aio_test
async def test_start_on_a_closed_connection_reports_failure() -> None:
    """Opening a stream on a connection h2 considers closed returns False instead of raising."""
    pool = _Pool()
    conn = UpstreamConnection(pool)  # type: ignore[arg-type]
    conn.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
    conn._conn.close_connection()  # what h2 does after the service's GOAWAY
    relay_like: Any = type("R", (), {"conn": None, "sid": 0})()
    assert conn.start(relay_like, [(":method", "POST"), (":path", "/a.B/C")]) is False
    assert conn.draining
    assert conn.idle()


class _Sink:
    """A client's side of a call: reading (or not)."""

    def __init__(self, reading: bool) -> None:
        self.reading = reading

    def send_headers(self, metadata: Any) -> None:
        pass

    def send_message(self, message: bytes) -> None:
        pass

    def send_trailers(self, *args: Any) -> None:
        pass

    def can_write(self) -> bool:
        return self.reading

    def consumed(self, size: int) -> None:
        pass


class _Service:
    """An :class:`UpstreamConnection` (and its pool) talking to an h2 server connection in memory."""

    def __init__(self, settings: dict[int, int] | None = None) -> None:
        self.loop = asyncio.get_event_loop()
        self.pool = H2Upstream(None, "svc", 5000, "http://svc:5000", self.loop)
        self.conn = UpstreamConnection(self.pool)
        self.transport = StringTransport()
        self.conn.makeConnection(self.transport)  # type: ignore[no-untyped-call]
        self.pool._conn = self.conn
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        self.exchange()

    def exchange(self) -> list[Any]:
        """Deliver what each side has to send; the service's events."""
        self.conn._flush()
        data = self.transport.value()
        self.transport.clear()
        events = self.h2.receive_data(data) if data else []
        out = self.h2.data_to_send()
        if out:
            self.conn.dataReceived(out)
        return events

    async def start(self, sink: Any, request: bytes = b"request") -> tuple[asyncio.Task[None], int]:
        """Forward a call with one request message; its task and the service's stream id."""
        from snet_daemon.frontend.call import ServerCall

        call = ServerCall("/pkg.Svc/M", (), sink, self.loop)
        call.deliver(request)
        call.end_input()
        task = self.loop.create_task(self.pool.forward(call, ()))
        for _ in range(5):
            await asyncio.sleep(0)
        (sid,) = [e.stream_id for e in self.exchange() if isinstance(e, h2.events.RequestReceived)]
        return task, sid

    def answer(self, sid: int, end: bool = True) -> None:
        """Reply headers and one message on ``sid``, and OK trailers when ``end``."""
        self.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        self.h2.send_data(sid, b"\x00\x00\x00\x00\x02ok")
        if end:
            self.h2.send_headers(sid, [("grpc-status", "0")], end_stream=True)


def _goaway(last_stream_id: int) -> bytes:
    """A graceful GOAWAY frame (the test's h2 server could not send after its own)."""
    return GoAwayFrame(0, last_stream_id=last_stream_id, error_code=0).serialize()


@aio_test
async def test_a_service_that_breaks_the_protocol_and_does_not_read_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the service's protocol error the connection was only closed politely: a service that
    did not read held it, and the calls on it waited for their deadlines.  It gets h2's GOAWAY, and
    is aborted a grace period later; its calls end as answers lost."""
    from snet_daemon.upstream import h2client

    monkeypatch.setattr(h2client, "_ABORT_GRACE", 0.05)
    service = _Service()
    task, _ = await service.start(_Sink(reading=True))
    aborted: list[bool] = []

    def abort() -> None:
        aborted.append(True)
        service.conn.connectionLost()

    service.transport.abortConnection = abort  # type: ignore[method-assign]
    service.conn.dataReceived(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x00")  # WINDOW_UPDATE 0
    assert service.transport.disconnecting
    assert b"\x07" in service.transport.value()[3:4]  # the GOAWAY went out
    assert not task.done()
    with pytest.raises(AnswerLost):
        await asyncio.wait_for(task, 2)
    assert aborted


@aio_test
async def test_calls_a_goaway_lets_finish_are_relayed_to_their_end() -> None:
    """A gRPC server shutting down gracefully (or at its max_connection_age) sends GOAWAY naming
    every stream, a PING, a second GOAWAY naming the last stream it serves, then the replies.
    h2 closed the connection at the first GOAWAY and the replies raised ProtocolError: calls the
    service completed failed as answers lost.  Now they end OK, and the connection closes after."""
    service = _Service()
    first, first_sid = await service.start(_Sink(reading=True))
    second, second_sid = await service.start(_Sink(reading=True))
    service.conn.dataReceived(_goaway(2**31 - 1))
    service.h2.ping(b"shutdown")
    events = service.exchange()
    assert any(isinstance(e, h2.events.PingAckReceived) for e in events + service.exchange())
    assert service.conn.draining
    assert not service.transport.disconnecting
    service.conn.dataReceived(_goaway(second_sid))
    service.answer(first_sid)
    service.exchange()
    await asyncio.wait_for(first, 5)
    assert not service.transport.disconnecting  # the second call still runs
    service.answer(second_sid)
    service.exchange()
    await asyncio.wait_for(second, 5)
    assert service.transport.disconnecting


@aio_test
async def test_calls_above_the_goaways_last_stream_fail_unavailable_when_not_resendable() -> None:
    """A streaming request the service never processed (above the GOAWAY's last stream) cannot be
    sent again (its messages were consumed): UNAVAILABLE, while the call below goes on."""
    from snet_daemon.frontend.call import ServerCall

    service = _Service()
    kept, kept_sid = await service.start(_Sink(reading=True))
    call = ServerCall("/pkg.Svc/M", (), _Sink(reading=True), service.loop)
    call.deliver(b"one")  # not ended: the request streams
    dropped = service.loop.create_task(service.pool.forward(call, ()))
    for _ in range(5):
        await asyncio.sleep(0)
    service.exchange()
    service.conn.dataReceived(_goaway(kept_sid))
    with pytest.raises(GrpcError) as info:
        await asyncio.wait_for(dropped, 5)
    assert info.value.status == Status.UNAVAILABLE
    assert "GOAWAY" in info.value.message
    service.answer(kept_sid)
    service.exchange()
    await asyncio.wait_for(kept, 5)


@aio_test
async def test_clients_that_do_not_read_hold_only_their_own_streams() -> None:
    """Seventeen calls whose clients stopped reading, each with a reply as large as the service's
    stream window: the service can still answer another client (its connection window towards us
    is not used up), and only those streams wait."""
    service = _Service()
    tasks = []
    chunk = b"\x00" + (16 * 1024 - 5).to_bytes(4, "big") + b"x" * (16 * 1024 - 5)
    for _ in range(17):
        task, sid = await service.start(_Sink(reading=False))
        tasks.append(task)
        service.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        while service.h2.local_flow_control_window(sid) >= len(chunk):
            service.h2.send_data(sid, chunk)
        service.exchange()
        assert service.h2.local_flow_control_window(sid) < len(chunk)  # this stream waits
    task, sid = await service.start(_Sink(reading=True))
    tasks.append(task)
    assert service.h2.local_flow_control_window(sid) >= 1024 * 1024 - 16 * 1024
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@aio_test
async def test_a_service_that_ends_a_call_early_does_not_drop_the_connection() -> None:
    """The service answered a call while part of its request still waited for window, and sent a
    WINDOW_UPDATE for it in the same read: we sent on a stream h2 had closed, and the
    StreamClosedError dropped the daemon's one connection to the service, failing every other
    client's call on it (one gRPC-Web body of a million empty messages did it)."""
    service = _Service({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    early, early_sid = await service.start(_Sink(reading=True), b"x" * 5000)
    other, other_sid = await service.start(_Sink(reading=True))
    service.h2.increment_flow_control_window(50, early_sid)
    service.answer(early_sid)
    service.h2.reset_stream(early_sid, h2.errors.ErrorCodes.NO_ERROR)
    service.exchange()  # one read: WINDOW_UPDATE, then the stream ends
    await asyncio.sleep(0)
    assert early.done()
    assert not service.conn.lost
    assert not service.transport.disconnecting
    service.answer(other_sid)
    service.exchange()
    await asyncio.wait_for(other, 5)  # served on the same connection


def test_authority_omits_default_ports() -> None:
    """The :authority header carries the port only when it is not the scheme's default."""
    loop = asyncio.new_event_loop()
    try:
        assert H2Upstream(None, "svc", 80, "http://svc", loop)._authority == "svc"
        assert H2Upstream(None, "svc", 443, "https://svc", loop, tls=True)._authority == "svc"
        assert H2Upstream(None, "svc", 5000, "http://svc:5000", loop)._authority == "svc:5000"
    finally:
        loop.close()


# ---------------------------------------------------------------------------
# unary calls of the daemon's own, against a real grpcio service


def _upstream_client(port: int) -> H2Upstream:
    from twisted.internet import reactor

    return H2Upstream(reactor, "127.0.0.1", port, f"http://127.0.0.1:{port}", asyncio.get_event_loop())


@aio_test
async def test_unary_returns_the_reply(upstream: Upstream) -> None:
    client = _upstream_client(upstream.port)
    try:
        request = pb.EchoRequest(payload=b"ping").SerializeToString()
        for _ in range(3):  # the headers built once per method serve every call
            reply = pb.EchoReply.FromString(await client.unary("/example_service.Echo/Unary", request, 10))
            assert reply.payload == b"ping"
    finally:
        await client.close()


@aio_test
async def test_a_connection_that_lands_after_close_is_closed(upstream: Upstream) -> None:
    """close() while the connection is still being made: once made, it is closed and the call
    waiting for it fails, instead of carrying the call on a connection nobody will close."""
    client = _upstream_client(upstream.port)
    call = asyncio.ensure_future(client.unary("/example_service.Echo/Unary", b"", 10))
    await asyncio.sleep(0)  # the call has started dialling
    await client.close()
    with pytest.raises(GrpcError) as info:
        await call
    assert info.value.status == Status.UNAVAILABLE
    assert not client.ready()


@aio_test
async def test_unary_raises_the_service_status(upstream: Upstream) -> None:
    client = _upstream_client(upstream.port)
    try:
        request = pb.EchoRequest(fail_code=5, fail_message="no such thing").SerializeToString()
        with pytest.raises(GrpcError) as info:
            await client.unary("/example_service.Echo/Unary", request, 10)
        assert (info.value.status, info.value.message) == (Status.NOT_FOUND, "no such thing")
    finally:
        await client.close()


@aio_test
async def test_unary_past_its_deadline_is_cancelled_at_the_service(upstream: Upstream) -> None:
    client = _upstream_client(upstream.port)
    try:
        request = pb.EchoRequest(delay_ms=5_000).SerializeToString()
        with pytest.raises(TimeoutError):
            await client.unary("/example_service.Echo/Unary", request, 0.2)
        for _ in range(100):
            if upstream.record.cancelled:
                break
            await asyncio.sleep(0.05)
        assert upstream.record.cancelled == 1
    finally:
        await client.close()


@aio_test
async def test_a_reply_that_breaks_the_call_resets_the_stream_at_the_service(upstream: Upstream) -> None:
    """A reply message over the limit fails the call, and the service's stream is reset too
    (it would otherwise keep streaming into nowhere and hold one of its stream slots)."""
    from twisted.internet import reactor

    client = H2Upstream(
        reactor,
        "127.0.0.1",
        upstream.port,
        f"http://127.0.0.1:{upstream.port}",
        asyncio.get_event_loop(),
        max_message_size=1000,
    )
    try:
        request = pb.EchoRequest(reply_size=5000, repeat=100, delay_ms=20).SerializeToString()
        with pytest.raises(GrpcError) as info:
            await client.unary("/example_service.Echo/ServerStream", request, 10)
        assert info.value.status == Status.RESOURCE_EXHAUSTED
        for _ in range(100):
            if upstream.record.cancelled:
                break
            await asyncio.sleep(0.05)
        assert upstream.record.cancelled == 1
        assert upstream.record.replies_sent < 100
    finally:
        await client.close()


@aio_test
async def test_a_timeout_drops_only_the_connection_it_used(upstream: Upstream) -> None:
    """A call that times out on a connection the service has retired (GOAWAY) must not
    close the connection that replaced it: a call running there is doing fine."""
    upstream.record.reset()
    client = _upstream_client(upstream.port)
    method = "/example_service.Echo/Unary"
    try:
        stuck = asyncio.ensure_future(
            client.unary(method, pb.EchoRequest(delay_ms=5_000).SerializeToString(), 0.5, drop_on_timeout=True)
        )
        for _ in range(100):
            if upstream.record.metadata:
                break
            await asyncio.sleep(0.01)
        first = client._conn
        assert first is not None
        assert len(upstream.record.metadata) == 1
        # The service retires the connection, letting its open stream finish
        # (what a GOAWAY naming the last stream it will serve means).
        first._on_goaway(2**31 - 1)
        assert first.draining
        assert not first.lost
        # Sent on a new connection; answered about 0.5 s after the stuck call timed out.
        fine = asyncio.ensure_future(
            client.unary(method, pb.EchoRequest(payload=b"fine", delay_ms=1_000).SerializeToString(), 10.0)
        )
        with pytest.raises(TimeoutError):
            await stuck
        assert pb.EchoReply.FromString(await fine).payload == b"fine"
        assert client._conn is not first
    finally:
        await client.close()


@aio_test
async def test_calls_in_flight_survive_the_services_max_connection_age() -> None:
    """A real grpcio service retiring connections (``grpc.max_connection_age_ms``, common behind
    load balancers): calls running when it sends its GOAWAYs used to fail with the connection
    (h2 raised ProtocolError on their replies); now every call succeeds, on fresh connections."""
    service = Upstream(
        free_port(), options=[("grpc.max_connection_age_ms", 300), ("grpc.max_connection_age_grace_ms", 10_000)]
    ).start()
    client = _upstream_client(service.port)
    method = "/example_service.Echo/Unary"
    try:
        connections: set[UpstreamConnection] = set()  # kept alive: counted by identity
        for round_ in range(4):
            calls = [
                asyncio.ensure_future(
                    client.unary(method, pb.EchoRequest(payload=b"%d" % i, delay_ms=400).SerializeToString(), 10.0)
                )
                for i in range(8)
            ]
            for _ in range(100):
                if client._conn is not None:
                    connections.add(client._conn)
                    break
                await asyncio.sleep(0.01)
            replies = [pb.EchoReply.FromString(reply).payload for reply in await asyncio.gather(*calls)]
            assert replies == [b"%d" % i for i in range(8)], round_
        assert len(connections) >= 2  # the service did retire connections under the calls
    finally:
        await client.close()
        service.stop()


@aio_test
async def test_a_call_in_flight_survives_the_services_graceful_stop() -> None:
    """``server.stop(grace)`` lets running calls finish: through the daemon's client too."""
    service = Upstream(free_port()).start()
    client = _upstream_client(service.port)
    try:
        call = asyncio.ensure_future(
            client.unary(
                "/example_service.Echo/Unary", pb.EchoRequest(payload=b"late", delay_ms=800).SerializeToString(), 10.0
            )
        )
        await wait_for(lambda: bool(service.record.metadata))
        assert service._server is not None
        stopped = service._server.stop(grace=10)
        assert pb.EchoReply.FromString(await call).payload == b"late"
        await asyncio.get_running_loop().run_in_executor(None, stopped.wait)
    finally:
        await client.close()
        service.stop()


class _RefusingService(Protocol):
    """A gRPC server's HTTP/2 side, scripted: while the factory has refusals left it turns away
    each call it receives, by ``how`` (a GOAWAY naming no stream, after which this connection
    serves nothing, or RST_STREAM REFUSED_STREAM); then it answers each call with its request."""

    def __init__(self, factory: _RefusingFactory) -> None:
        self.factory = factory
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.refused: set[int] = set()

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        out = b""
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived) and self.factory.refusals > 0:
                self.factory.refusals -= 1
                self.factory.refused += 1
                self.refused.add(event.stream_id)
                if self.factory.how == "goaway":
                    out += _goaway(0)
                    self.transport.loseConnection()  # type: ignore[union-attr]
                else:
                    self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            elif isinstance(event, h2.events.DataReceived) and event.stream_id not in self.refused:
                self.h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
                self.h2.send_headers(event.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
                self.h2.send_data(event.stream_id, event.data or b"")
                assert event.stream_ended is not None  # the whole request, in one frame
                self.h2.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
        self.transport.write(self.h2.data_to_send() + out)  # type: ignore[union-attr]


class _RefusingFactory(Factory):
    def __init__(self, how: str, refusals: int) -> None:
        self.how = how
        self.refusals = refusals
        self.connections = 0
        self.refused = 0

    def buildProtocol(self, addr: Any) -> _RefusingService:
        return _RefusingService(self)


@pytest.mark.parametrize("how", ["goaway", "refused_stream"])
@aio_test
async def test_a_call_the_service_did_not_process_is_sent_again_once(how: str) -> None:
    """A unary call above the service's GOAWAY, or reset with REFUSED_STREAM, was never processed:
    it goes again (on a new connection after a GOAWAY), as gRPC clients retry transparently; but
    only once."""
    from twisted.internet import reactor

    factory = _RefusingFactory(how, refusals=1)
    listening: Any = reactor
    port: Any = listening.listenTCP(0, factory, interface="127.0.0.1")
    client = _upstream_client(port.getHost().port)
    try:
        assert await client.unary("/pkg.Svc/M", b"again", 10.0) == b"again"
        assert factory.refused == 1
        assert factory.connections == (2 if how == "goaway" else 1)
        factory.refusals = 2  # the call and its one retry are refused
        with pytest.raises(GrpcError) as info:
            await client.unary("/pkg.Svc/M", b"no", 10.0)
        assert info.value.status == Status.UNAVAILABLE
        assert factory.refused == 3
        assert await client.unary("/pkg.Svc/M", b"yes", 10.0) == b"yes"
    finally:
        await client.close()
        await port.stopListening().asFuture(asyncio.get_running_loop())


@aio_test
async def test_a_timeout_while_redialling_spares_the_retired_connection() -> None:
    """A call timing out while the connection replacing a retired one is still being dialled
    closed the retired connection, failing the calls the service was finishing on it (for etcd,
    writes of unknown outcome).  A retired connection is left to finish."""
    service = _Service()
    running, sid = await service.start(_Sink(reading=True))
    service.conn.dataReceived(_goaway(2**31 - 1))
    assert service.conn.draining

    async def hang(result: Any) -> None:  # the dial to the service hangs
        await asyncio.Event().wait()

    service.pool._dial = hang  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        await service.pool.unary("/pkg.Svc/Health", b"x", 0.05, drop_on_timeout=True)
    assert not service.transport.disconnecting
    service.answer(sid)
    service.exchange()
    await asyncio.wait_for(running, 5)


@aio_test
async def test_close_closes_retired_connections_too() -> None:
    """close() closed only the connection in use: one the service had retired stayed open, with
    the calls on it, after the client was closed (etcd's endpoint rotation, the daemon's stop)."""
    service = _Service()
    running, _ = await service.start(_Sink(reading=True))
    service.conn.dataReceived(_goaway(2**31 - 1))
    successor = UpstreamConnection(service.pool)
    successor.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
    service.pool._conn = successor
    await service.pool.close()
    assert service.transport.disconnecting
    service.conn.connectionLost()
    with pytest.raises(AnswerLost):
        await asyncio.wait_for(running, 5)


class _BrokenSink(_Sink):
    """A client whose transport fails when handed a reply (a bug on the client's side)."""

    def send_message(self, message: bytes) -> None:
        raise RuntimeError("the client's transport broke")


@aio_test
async def test_an_error_relaying_one_call_ends_only_that_call() -> None:
    """An exception while relaying one call's reply left dataReceived and dropped the connection
    to the service, failing every other client's call on it; now that call alone fails, as an
    answer lost (the request went out: for etcd, a write whose outcome must be settled)."""
    service = _Service()
    broken, broken_sid = await service.start(_BrokenSink(reading=True))
    other, other_sid = await service.start(_Sink(reading=True))
    service.answer(broken_sid, end=False)
    service.exchange()
    with pytest.raises(AnswerLost) as info:
        await asyncio.wait_for(broken, 5)
    assert info.value.status == Status.INTERNAL
    assert not service.conn.lost
    assert not service.transport.disconnecting
    assert any(isinstance(e, h2.events.StreamReset) and e.stream_id == broken_sid for e in service.exchange())
    service.answer(other_sid)
    service.exchange()
    await asyncio.wait_for(other, 5)


@aio_test
async def test_only_window_updates_that_help_wake_waiting_requests() -> None:
    """Every SETTINGS frame from the service tried every request waiting for its window, and a
    stream's WINDOW_UPDATE searched all of them; now a SETTINGS frame that does not grow
    INITIAL_WINDOW_SIZE tries none, and one that does releases them."""
    service = _Service({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    calls = [await service.start(_Sink(reading=True), b"x" * 5000) for _ in range(20)]
    tries = [0]
    window = service.conn._conn.local_flow_control_window

    def counting(stream_id: int) -> int:
        tries[0] += 1
        return window(stream_id)

    service.conn._conn.local_flow_control_window = counting  # type: ignore[method-assign]
    for _ in range(50):
        service.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
        service.exchange()
    assert tries[0] == 0
    service.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    service.h2.increment_flow_control_window(1 << 20)
    received = {sid: 0 for _, sid in calls}
    for event in service.exchange() + service.exchange():
        if isinstance(event, h2.events.DataReceived):
            received[event.stream_id] += event.flow_controlled_length or 0
    assert set(received.values()) == {5005 - 100}  # the rest of each request
    for task, _ in calls:
        task.cancel()
    await asyncio.gather(*(task for task, _ in calls), return_exceptions=True)
