"""EtcdStorage beyond the contract: outages, timeouts, endpoints, TLS, readiness.

All against real etcd servers (Debian's ``etcd-server``) on loopback ports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import capturedLogs, formatEvent

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.storage.base import (
    Condition,
    Entry,
    Put,
    StorageError,
    StorageTimeout,
    StorageUnavailable,
)
from snet_daemon.storage.etcd import EtcdStorage, EtcdTls, parse_endpoint, prefix_range_end
from tests.support.aio import aio_test
from tests.support.certs import certificates
from tests.support.etcd import EtcdServer, etcd_factory, etcd_server
from tests.support.ports import free_port
from tests.support.tcpproxy import TcpProxy

__all__ = ["etcd_factory", "etcd_server"]  # fixtures, imported for pytest

# ---------------------------------------------------------------------------
# pure helpers


@pytest.mark.parametrize(
    ("url", "target", "tls"),
    [
        ("http://127.0.0.1:2379", "127.0.0.1:2379", False),
        ("https://etcd.example.org:2379", "etcd.example.org:2379", True),
        ("HTTPS://etcd.example.org", "etcd.example.org:2379", True),
        ("10.0.0.5:23790", "10.0.0.5:23790", False),
        ("http://[::1]:2379/", "[::1]:2379", False),
        ("http://[::1]", "[::1]:2379", False),
    ],
)
def test_parse_endpoint(url: str, target: str, tls: bool) -> None:
    """Endpoints in the forms Go configs use become a gRPC target and a TLS flag."""
    endpoint = parse_endpoint(url)
    assert (endpoint.target, endpoint.tls) == (target, tls)


@pytest.mark.parametrize("url", ["unix:///tmp/etcd.sock", "http://", "ftp://h:1"])
def test_parse_endpoint_rejects_others(url: str) -> None:
    """Unsupported schemes and missing hosts are refused with a message naming the endpoint."""
    with pytest.raises(ValueError, match="etcd endpoint"):
        parse_endpoint(url)


@pytest.mark.parametrize(
    ("prefix", "end"),
    [(b"a/", b"a0"), (b"a\xff", b"b"), (b"\xff\xff", b"\0"), (b"", b"\0"), (b"k", b"l")],
)
def test_prefix_range_end(prefix: bytes, end: bytes) -> None:
    """The range end of a prefix is the next key after every key with that prefix."""
    assert prefix_range_end(prefix) == end


def test_tls_material_from_paths(tmp_path: Path) -> None:
    """TLS files are read when set; none set means no TLS; cert without key is an error."""
    assert EtcdTls.from_paths() is None
    ca, cert, key = certificates(tmp_path)
    tls = EtcdTls.from_paths(str(ca), str(cert), str(key))
    assert tls == EtcdTls(ca=ca.read_bytes(), cert=cert.read_bytes(), key=key.read_bytes())
    assert "PRIVATE" not in repr(tls)
    with pytest.raises(ValueError, match="together"):
        EtcdTls.from_paths(cert_path=str(cert))
    with pytest.raises(OSError):
        EtcdTls.from_paths(ca_path=str(tmp_path / "missing.pem"))


def test_constructor_checks_arguments() -> None:
    """No endpoints, or a non-positive timeout, is refused up front."""
    with pytest.raises(ValueError):
        EtcdStorage([])
    with pytest.raises(ValueError):
        EtcdStorage(["http://127.0.0.1:2379"], request_timeout=0)


# ---------------------------------------------------------------------------
# outages


def _operations(storage: EtcdStorage, lease_id: int) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    """One call of every storage operation, by name."""
    return [
        ("get", lambda: storage.get("outage/a")),
        ("get_many", lambda: storage.get_many(["outage/a", "outage/b"])),
        ("get_prefix", lambda: storage.get_prefix("outage/")),
        ("put", lambda: storage.put("outage/a", b"v")),
        ("put_if_absent", lambda: storage.put_if_absent("outage/b", b"v")),
        ("compare_and_swap", lambda: storage.compare_and_swap("outage/a", b"v", b"w")),
        ("delete", lambda: storage.delete("outage/a")),
        ("transaction", lambda: storage.transaction([Condition.absent("outage/c")], [Put("outage/c", b"v")])),
        ("grant_lease", lambda: storage.grant_lease(5)),
        ("keep_alive", lambda: storage.keep_alive(lease_id)),
    ]


async def _until_ok(call: Callable[[], Awaitable[Any]], within: float) -> float:
    """Retry ``call`` until it succeeds; return how long that took."""
    start = time.monotonic()
    while True:
        try:
            await call()
            return time.monotonic() - start
        except StorageError:
            if time.monotonic() - start > within:
                raise
            await asyncio.sleep(0.05)


@aio_test
async def test_stopped_etcd_gives_typed_errors_fast_then_recovers(etcd_factory: Callable[[], EtcdServer]) -> None:
    """While etcd is stopped every operation fails fast with a typed error; after a restart all works, data intact."""
    server = etcd_factory().start()
    storage = EtcdStorage([server.url], request_timeout=1.0)
    try:
        await storage.put("outage/kept", b"persisted")
        lease = await storage.grant_lease(30)
        await asyncio.to_thread(server.stop)
        for name, call in _operations(storage, lease.id):
            start = time.monotonic()
            with pytest.raises((StorageUnavailable, StorageTimeout)) as failed:
                await call()
            elapsed = time.monotonic() - start
            assert elapsed < 1.5, f"{name} took {elapsed:.2f}s"
            assert server.url in str(failed.value), name
        await asyncio.to_thread(server.start)
        recovery = await _until_ok(lambda: storage.get("outage/kept"), within=5.0)
        assert recovery < 3.0
        entry = await storage.get("outage/kept")
        assert entry is not None
        assert entry.value == b"persisted"
        assert await storage.keep_alive(lease.id) > 0  # the lease survived the restart
    finally:
        await storage.close()


@aio_test
async def test_hung_etcd_times_out_within_request_timeout(etcd_factory: Callable[[], EtcdServer]) -> None:
    """A frozen etcd (SIGSTOP) makes requests end with StorageTimeout at the request timeout, not hang."""
    server = etcd_factory().start()
    storage = EtcdStorage([server.url], request_timeout=0.5)
    pid = server.pid
    assert pid is not None
    try:
        await storage.put("hung/a", b"v")
        os.kill(pid, signal.SIGSTOP)
        try:
            for call in (lambda: storage.get("hung/a"), lambda: storage.put("hung/a", b"w")):
                start = time.monotonic()
                with pytest.raises(StorageTimeout, match=r"did not answer within 0\.5s"):
                    await call()
                assert 0.4 < time.monotonic() - start < 1.5
        finally:
            os.kill(pid, signal.SIGCONT)
        await _until_ok(lambda: storage.get("hung/a"), within=5.0)
    finally:
        await storage.close()


@aio_test
async def test_write_whose_answer_is_lost_with_the_connection_is_of_unknown_outcome(etcd_server: EtcdServer) -> None:
    """etcd applied a transaction, then the connection died before its answer came: that is a
    StorageTimeout (outcome unknown: callers read back), never StorageUnavailable (not applied)."""
    host, port = etcd_server.url.removeprefix("http://").split(":")
    proxy = TcpProxy((host, int(port)))
    proxy.reply_delay = 30.0  # answers are held back ...
    proxy.up()
    storage = EtcdStorage([proxy.url], request_timeout=10.0)
    try:
        txn = asyncio.ensure_future(storage.transaction([Condition.absent("lost/k")], [Put("lost/k", b"mine")]))
        applied = None
        for _ in range(100):  # ... until etcd has applied it
            applied = await _direct_get(etcd_server, "lost/k")
            if applied is not None:
                break
            await asyncio.sleep(0.05)
        assert applied is not None, "etcd never applied the transaction: the premise does not hold"
        assert applied.value == b"mine"
        assert not txn.done()  # its answer is still held back
        proxy.down()  # and the connection dies
        with pytest.raises(StorageTimeout):
            await txn
    finally:
        await storage.close()
        proxy.down()


@aio_test
async def test_requests_on_a_connection_dropped_for_a_timeout_are_of_unknown_outcome(
    etcd_server: EtcdServer,
) -> None:
    """One request times out and its connection is dropped: a transaction sent on it meanwhile,
    which etcd applied, is a StorageTimeout too (not "not applied")."""
    host, port = etcd_server.url.removeprefix("http://").split(":")
    proxy = TcpProxy((host, int(port)))
    proxy.reply_delay = 30.0
    proxy.up()
    storage = EtcdStorage([proxy.url], request_timeout=1.0)
    try:
        slow = asyncio.ensure_future(storage.get("lost2/x"))
        await asyncio.sleep(0.5)
        txn = asyncio.ensure_future(storage.transaction([Condition.absent("lost2/k")], [Put("lost2/k", b"mine")]))
        with pytest.raises(StorageTimeout):
            await slow
        with pytest.raises(StorageTimeout):
            await txn
        assert await _direct_get(etcd_server, "lost2/k") is not None  # it had applied
    finally:
        await storage.close()
        proxy.down()


async def _direct_get(server: EtcdServer, key: str) -> Entry | None:
    storage = EtcdStorage([server.url])
    try:
        return await storage.get(key)
    finally:
        await storage.close()


@aio_test
async def test_open_reports_unreachable_endpoint_within_connection_timeout() -> None:
    """open() on an endpoint where nothing listens fails with StorageUnavailable naming it."""
    url = f"http://127.0.0.1:{free_port()}"
    storage = EtcdStorage([url], connection_timeout=0.5, request_timeout=0.5)
    try:
        start = time.monotonic()
        with pytest.raises(StorageUnavailable, match=url):
            await storage.open()
        assert time.monotonic() - start < 2.0
    finally:
        await storage.close()


@aio_test
async def test_an_etcd_outage_is_reported_as_etcd_not_as_the_service() -> None:
    """With etcd down, the error and the log name etcd, under the storage's log namespace: an operator
    reading "service at ... is unavailable" under snetd.upstream looked at the AI service."""
    url = f"http://127.0.0.1:{free_port()}"
    storage = EtcdStorage([url], request_timeout=0.5)
    try:
        with capturedLogs() as events, pytest.raises(StorageUnavailable) as failed:
            await storage.get("named/a")
    finally:
        await storage.close()
    message = str(failed.value)
    assert message.startswith(f"etcd at {url} is unavailable: ")
    assert message.count(url) == 1
    assert "service" not in message
    logged = [event for event in events if url in formatEvent(event)]
    assert logged
    for event in logged:
        assert event["log_namespace"] == "snetd.storage.etcd"
        assert "service" not in formatEvent(event)


@aio_test
async def test_next_endpoint_is_used_when_one_is_down(etcd_server: EtcdServer) -> None:
    """With a dead first endpoint, open() moves on to the live one, and so do requests after a failure."""
    dead = f"http://127.0.0.1:{free_port()}"
    storage = EtcdStorage([dead, etcd_server.url], connection_timeout=0.5, request_timeout=1.0)
    try:
        assert await storage.open() == "3.4.23"
        await storage.put("failover/a", b"v")
    finally:
        await storage.close()
    storage = EtcdStorage([dead, etcd_server.url], request_timeout=1.0)
    try:
        with pytest.raises(StorageUnavailable, match=dead):
            await storage.get("failover/a")
        entry = await storage.get("failover/a")
        assert entry is not None
        assert entry.value == b"v"
    finally:
        await storage.close()


@aio_test
async def test_next_endpoint_is_used_when_the_one_in_use_hangs(etcd_factory: Callable[[], EtcdServer]) -> None:
    """The endpoint in use freezes (SIGSTOP: it still accepts connections, answers nothing): one request
    times out, and the following ones go to the next endpoint.  (They all timed out on the frozen one.)"""
    first, second = etcd_factory().start(), etcd_factory().start()
    await _direct_put(second, "hang-over/which", b"second")
    storage = EtcdStorage([first.url, second.url], request_timeout=0.5, connection_timeout=1.0)
    pid = first.pid
    assert pid is not None
    try:
        assert await storage.get("hang-over/which") is None  # the first endpoint answers
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(StorageTimeout, match=first.url):
                await storage.get("hang-over/which")
            start = time.monotonic()
            entry = await storage.get("hang-over/which")
            assert entry is not None
            assert entry.value == b"second"
            assert time.monotonic() - start < 0.5
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        await storage.close()


async def _direct_put(server: EtcdServer, key: str, value: bytes) -> None:
    storage = EtcdStorage([server.url])
    try:
        await storage.put(key, value)
    finally:
        await storage.close()


@aio_test
async def test_closed_storage_refuses_requests(etcd_server: EtcdServer) -> None:
    """After close() requests fail with StorageUnavailable instead of reconnecting."""
    storage = EtcdStorage([etcd_server.url])
    await storage.put("closed/a", b"v")
    await storage.close()
    with pytest.raises(StorageUnavailable, match="closed"):
        await storage.get("closed/a")


# ---------------------------------------------------------------------------
# readiness gate


@aio_test
async def test_requests_wait_for_ready_signal(etcd_server: EtcdServer) -> None:
    """Requests made before the ready signal wait for it, then proceed."""
    gate = asyncio.Event()

    async def ready() -> None:
        await gate.wait()

    storage = EtcdStorage([etcd_server.url], request_timeout=5.0, ready=ready)
    try:
        pending = asyncio.ensure_future(storage.put("gate/a", b"v"))
        await asyncio.sleep(0.2)
        assert not pending.done()
        gate.set()
        assert await pending > 0
    finally:
        await storage.close()


@aio_test
async def test_failed_or_slow_ready_signal_is_unavailable(etcd_server: EtcdServer) -> None:
    """A ready signal that fails, or does not come within the request timeout, gives StorageUnavailable."""

    async def broken() -> None:
        raise RuntimeError("port 2379 in use")

    storage = EtcdStorage([etcd_server.url], ready=broken)
    with pytest.raises(StorageUnavailable, match="did not start: port 2379 in use"):
        await storage.get("gate/a")
    await storage.close()

    async def never() -> None:
        await asyncio.Event().wait()

    storage = EtcdStorage([etcd_server.url], request_timeout=0.3, ready=never)
    with pytest.raises(StorageUnavailable, match="not ready yet"):
        await storage.get("gate/a")
    await storage.close()


# ---------------------------------------------------------------------------
# TLS


@aio_test
async def test_mutual_tls(tmp_path: Path) -> None:
    """An https:// endpoint uses the configured CA and client certificate; without the certificate etcd refuses."""
    if not EtcdServer.available():
        pytest.skip("needs the etcd binary")
    ca, cert, key = certificates(tmp_path)
    with EtcdServer(tmp_path / "data", tmp_path / "etcd.log", tls=(ca, cert, key)) as server:
        assert server.url.startswith("https://")
        tls = EtcdTls.from_paths(str(ca), str(cert), str(key))
        storage = EtcdStorage([server.url], tls=tls, request_timeout=3.0)
        try:
            await storage.put("tls/a", b"secret")
            entry = await storage.get("tls/a")
            assert entry is not None
            assert entry.value == b"secret"
        finally:
            await storage.close()
        anonymous = EtcdStorage([server.url], tls=EtcdTls(ca=ca.read_bytes()), request_timeout=3.0)
        try:
            with pytest.raises(StorageError):
                await anonymous.get("tls/a")
        finally:
            await anonymous.close()


class _Endpoint:
    endpoint = parse_endpoint("http://127.0.0.1:2379")


@pytest.mark.parametrize(
    ("code", "details", "unknown"),
    [
        (Status.UNAVAILABLE, "etcdserver: request timed out", True),
        (Status.UNAVAILABLE, "etcdserver: leader changed", True),
        # Said of a proposal already handed to raft when the member stops: it may commit elsewhere.
        (Status.UNAVAILABLE, "etcdserver: server stopped", True),
        (Status.CANCELLED, "etcdserver: request cancelled", True),
        # Refused before anything was proposed.
        (Status.UNAVAILABLE, "etcdserver: no leader", False),
        (Status.UNAVAILABLE, "connection refused", False),
    ],
)
def test_errors_said_after_a_proposal_leave_the_outcome_unknown(code: Status, details: str, unknown: bool) -> None:
    """Only an error etcd gives after proposing the request is a timeout (outcome unknown, the
    payment write is settled by a fence); the others mean nothing was written."""
    storage = EtcdStorage(["http://127.0.0.1:2379"])
    error = storage._translate(GrpcError(code, details), _Endpoint(), 0)  # type: ignore[arg-type]
    assert isinstance(error, StorageTimeout if unknown else StorageUnavailable)
    assert details in str(error)
