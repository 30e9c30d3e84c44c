"""Native gRPC through the daemon to a real gRPC service (all four call kinds).

Real grpcio clients call a real ``twistd snetd`` process, which forwards to
a real grpcio service (tests/support/upstream.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon._proto import example_service_pb2_grpc as pb_grpc
from tests.conftest import make_channel
from tests.support.daemon import Daemon
from tests.support.ports import free_port
from tests.support.upstream import Upstream

MiB = 1024 * 1024


def test_unary_call(channel: grpc.Channel) -> None:
    """A unary call reaches the service and its answer comes back."""
    assert pb_grpc.CalculatorStub(channel).add(pb.Numbers(a=2, b=3), timeout=10).value == 5


def test_metadata_goes_up_and_headers_and_trailers_come_back(channel: grpc.Channel, upstream: Upstream) -> None:
    """Client metadata (text and -bin) reaches the service; its headers and trailers come back."""
    reply, call = pb_grpc.EchoStub(channel).Unary.with_call(
        pb.EchoRequest(payload=b"hi"),
        metadata=[("x-custom", "value"), ("x-blob-bin", b"\x00\x01\xfe")],
        timeout=10,
    )
    assert reply.payload == b"hi"
    seen = dict(upstream.record.metadata[-1])
    assert seen["x-custom"] == "value"
    assert seen["x-blob-bin"] == b"\x00\x01\xfe"
    assert not any(k in seen for k in ("te", "content-type", "grpc-timeout"))
    assert ("x-echo-initial", "yes") in tuple(call.initial_metadata())
    trailers = dict(call.trailing_metadata())
    assert trailers["x-echo-trailer"] == "yes"
    assert trailers["x-echo-trailer-bin"] == b"\x00\x01\xff"


def test_server_streaming(channel: grpc.Channel) -> None:
    """Every reply of a server-streaming call arrives, in order."""
    replies = list(pb_grpc.EchoStub(channel).ServerStream(pb.EchoRequest(payload=b"s", repeat=50), timeout=10))
    assert [r.index for r in replies] == list(range(50))


def test_client_streaming(channel: grpc.Channel, upstream: Upstream) -> None:
    """All requests of a client-streaming call reach the service."""
    requests = (pb.EchoRequest(payload=bytes([65 + i % 26])) for i in range(100))
    reply = pb_grpc.EchoStub(channel).ClientStream(requests, timeout=10)
    assert reply.index == 100
    assert len(reply.payload) == 100
    assert upstream.record.requests_seen == 100


def test_bidi_ping_pong(channel: grpc.Channel) -> None:
    """A bidi call interleaves: each reply arrives before the next request is sent."""
    turn = threading.Semaphore(0)

    def requests() -> Iterator[pb.EchoRequest]:
        for i in range(5):
            yield pb.EchoRequest(payload=f"ping{i}".encode())
            assert turn.acquire(timeout=10), "reply did not arrive before the next request"

    got = []
    for reply in pb_grpc.EchoStub(channel).Bidi(requests(), timeout=20):
        got.append(reply.payload)
        turn.release()
    assert got == [f"ping{i}".encode() for i in range(5)]


def test_large_messages_both_directions(channel: grpc.Channel) -> None:
    """Messages of several MB (under the 4 MiB default) pass both ways."""
    echo = pb_grpc.EchoStub(channel)
    big = bytes(range(256)) * (3 * MiB // 256)
    assert echo.Unary(pb.EchoRequest(payload=big), timeout=30).payload == big
    assert len(echo.Unary(pb.EchoRequest(reply_size=3 * MiB + 123), timeout=30).payload) == 3 * MiB + 123
    streamed = list(echo.ServerStream(pb.EchoRequest(repeat=8, reply_size=2 * MiB), timeout=60))
    assert [len(r.payload) for r in streamed] == [2 * MiB] * 8
    sent = [pb.EchoRequest(payload=b"x" * MiB, reply_size=1) for _ in range(12)]
    assert echo.ClientStream(iter(sent), timeout=60).index == 12


def test_request_over_the_size_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    """A request message over max_message_size_in_mb fails with RESOURCE_EXHAUSTED."""
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.EchoStub(channel).Unary(pb.EchoRequest(payload=b"x" * (5 * MiB)), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details()
    assert pb_grpc.CalculatorStub(channel).add(pb.Numbers(a=1, b=1), timeout=10).value == 2


def test_reply_over_the_size_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    """A reply from the service over the limit fails with RESOURCE_EXHAUSTED."""
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.EchoStub(channel).Unary(pb.EchoRequest(reply_size=5 * MiB), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_many_concurrent_streams_on_one_connection(channel: grpc.Channel) -> None:
    """Hundreds of concurrent calls share one HTTP/2 connection and all succeed."""
    calc = pb_grpc.CalculatorStub(channel)
    futures = [calc.add.future(pb.Numbers(a=i, b=1), timeout=30) for i in range(300)]
    assert [f.result().value for f in futures] == [i + 1 for i in range(300)]


def test_concurrent_streaming_calls_from_threads(channel: grpc.Channel) -> None:
    """Streaming calls from many threads at once each get their own replies."""
    echo = pb_grpc.EchoStub(channel)

    def one(i: int) -> list[bytes]:
        tag = str(i).encode()
        return [r.payload for r in echo.ServerStream(pb.EchoRequest(payload=tag, repeat=20), timeout=30)]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    assert results == [[str(i).encode()] * 20 for i in range(32)]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, "no access"),
        (grpc.StatusCode.NOT_FOUND, "naïve ☃ 100%"),
        (grpc.StatusCode.UNAVAILABLE, "the model is loading"),
        (grpc.StatusCode.INTERNAL, ""),
    ],
)
def test_service_status_passes_through_unchanged(channel: grpc.Channel, code: grpc.StatusCode, message: str) -> None:
    """The service's status code and message reach the client unchanged, with its trailers."""
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.EchoStub(channel).Unary(pb.EchoRequest(fail_code=code.value[0], fail_message=message), timeout=10)
    assert info.value.code() == code
    assert info.value.details() == message
    assert dict(info.value.trailing_metadata())["x-echo-trailer"] == "yes"


def test_client_deadline_is_enforced_and_reaches_the_service(channel: grpc.Channel, upstream: Upstream) -> None:
    """A call slower than the client's deadline ends DEADLINE_EXCEEDED; the service sees it cancelled."""
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.EchoStub(channel).Unary(pb.EchoRequest(delay_ms=5000), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 3
    assert upstream.record.finished.wait(5)
    assert upstream.record.cancelled == 1


def test_client_cancellation_cancels_the_upstream_call(channel: grpc.Channel, upstream: Upstream) -> None:
    """Cancelling a call in the client cancels it at the service."""
    call = pb_grpc.EchoStub(channel).ServerStream(pb.EchoRequest(repeat=100, delay_ms=100), timeout=30)
    assert next(call).index == 0
    call.cancel()
    assert upstream.record.finished.wait(5)
    assert upstream.record.cancelled == 1
    assert upstream.record.replies_sent < 10


def test_connection_loss_cancels_the_upstream_call(daemon: Daemon, upstream: Upstream) -> None:
    """Closing the client connection mid-call cancels the call at the service."""
    upstream.record.reset()
    channel = make_channel(daemon.address)
    future = pb_grpc.EchoStub(channel).Unary.future(pb.EchoRequest(delay_ms=10_000), timeout=30)
    time.sleep(0.5)
    channel.close()
    assert future.exception() is not None
    assert upstream.record.finished.wait(5)
    assert upstream.record.cancelled == 1


def test_service_timeout_applies_without_a_client_deadline(upstream: Upstream, workdir: Path) -> None:
    """With no client deadline, service_timeout bounds the call."""
    config = {"service_endpoint": upstream.endpoint, "service_timeout": "1s"}
    with Daemon(workdir, config) as daemon:
        channel = make_channel(daemon.address)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.EchoStub(channel).Unary(pb.EchoRequest(delay_ms=5000))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.8 < time.monotonic() - start < 4
        channel.close()


def test_service_down_then_up(workdir: Path) -> None:
    """A stopped service gives UNAVAILABLE naming its endpoint; calls work again once it is back."""
    service = Upstream(free_port())
    with Daemon(workdir, {"service_endpoint": service.endpoint}) as daemon:
        channel = make_channel(daemon.address)
        calc = pb_grpc.CalculatorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            calc.add(pb.Numbers(a=1, b=2), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"127.0.0.1:{service.port}" in info.value.details()
        service.start()
        try:
            deadline = time.monotonic() + 30
            codes = []
            result = None
            while time.monotonic() < deadline:
                try:
                    result = calc.add(pb.Numbers(a=1, b=2), timeout=5).value
                    break
                except grpc.RpcError as error:
                    codes.append(error.code())
                    time.sleep(0.5)
            assert result == 3, "service did not become reachable again"
            assert set(codes) <= {grpc.StatusCode.UNAVAILABLE}
            service.stop()
            with pytest.raises(grpc.RpcError) as info:
                calc.add(pb.Numbers(a=1, b=2), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            service.stop()
            channel.close()


def test_calls_run_through_the_services_connection_retirements(workdir: Path) -> None:
    """A service that retires its connections (grpc's ``max_connection_age``, GOAWAY then the
    replies of the calls it is finishing): concurrent calls through the daemon all succeed,
    streaming ones too.  Before, each retirement failed the calls in flight with UNAVAILABLE."""
    service = Upstream(
        free_port(), options=[("grpc.max_connection_age_ms", 200), ("grpc.max_connection_age_grace_ms", 10_000)]
    ).start()
    try:
        with Daemon(workdir, {"service_endpoint": service.endpoint}) as daemon:
            channel = make_channel(daemon.address)
            echo = pb_grpc.EchoStub(channel)

            def one(i: int) -> bytes:
                if i % 2:
                    request = pb.EchoRequest(payload=b"%d" % i, delay_ms=150, repeat=2)
                    return b"".join(r.payload for r in echo.ServerStream(request, timeout=20))
                return bytes(echo.Unary(pb.EchoRequest(payload=b"%d" % i, delay_ms=300), timeout=20).payload)

            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(one, range(48)))
            assert replies == [b"%d" % i * (2 if i % 2 else 1) for i in range(48)]
            channel.close()
    finally:
        service.stop()


def test_passthrough_disabled_echoes(workdir: Path) -> None:
    """With passthrough_enabled false the daemon echoes requests (as Go does)."""
    with Daemon(workdir, {"passthrough_enabled": False, "service_endpoint": "http://127.0.0.1:1"}) as daemon:
        channel = make_channel(daemon.address)
        reply = pb_grpc.EchoStub(channel).Unary(pb.EchoRequest(payload=b"mirror"), timeout=10)
        assert reply.payload == b"mirror"
        replies = list(
            pb_grpc.EchoStub(channel).Bidi(
                iter([pb.EchoRequest(payload=b"a"), pb.EchoRequest(payload=b"b")]), timeout=10
            )
        )
        assert [r.payload for r in replies] == [b"a", b"b"]
        channel.close()
