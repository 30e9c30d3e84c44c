"""The heartbeat probes: http/https GET the health URL, grpc asks a gRPC health server."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from snet_daemon.ops.heartbeat import (
    GrpcHealthProbe,
    Heartbeat,
    HeartbeatIdentity,
    HttpGet,
    HttpProbe,
    storage_cert_details,
)
from snet_daemon.upstream.h2client import H2Upstream
from tests.support.aio import aio_fixture, aio_test
from tests.support.certs import certificates
from tests.support.health import NOT_SERVING, SERVING, GrpcHealth, aio_health_server
from tests.support.ports import free_port


@dataclass
class Health:
    """What the stub health endpoint answers."""

    url: str
    status: int = 200
    body: bytes = b"OK"
    hang: bool = False
    released: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when the client of ``/endless`` (a redirect whose body never ends) went away.
    endless_closed: asyncio.Event = field(default_factory=asyncio.Event)


@aio_fixture
async def health() -> AsyncIterator[Health]:
    """A scriptable health endpoint on a free port (``/health``; ``/moved`` redirects there)."""
    state = Health(url="")

    async def handle(request: web.Request) -> web.Response:
        if state.hang:
            await state.released.wait()
        return web.Response(status=state.status, body=state.body)

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/health")

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=302, headers={"Location": "/health"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b"x" * 4096)
                await asyncio.sleep(0.001)
        except (ConnectionError, asyncio.CancelledError):
            state.endless_closed.set()
            raise

    app = web.Application()
    app.router.add_get("/health", handle)
    app.router.add_get("/moved", moved)
    app.router.add_get("/endless", endless)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/health"
    yield state
    state.released.set()
    await runner.cleanup()


def _reactor() -> object:
    from twisted.internet import reactor

    return reactor


@aio_test
async def test_http_probe_needs_200_with_a_body(health: Health) -> None:
    """200 with a body is serving; 503, or 200 with an empty body, is not (Go's rule)."""
    probe = HttpProbe(health.url, HttpGet(_reactor()))
    assert await probe()
    health.status, health.body = 503, b"down"
    assert not await probe()
    health.status, health.body = 200, b""
    assert not await probe()


@aio_test
async def test_http_probe_follows_redirects(health: Health) -> None:
    """A redirect is followed, as Go's http.Get does."""
    assert await HttpProbe(health.url.replace("/health", "/moved"), HttpGet(_reactor()))()


@aio_test
async def test_http_probe_closes_a_redirect_whose_body_never_ends(health: Health) -> None:
    """The redirect is followed and its connection closed: Twisted's RedirectAgent left it open,
    buffering its body without limit, for as long as the body went on."""
    assert await HttpProbe(health.url.replace("/health", "/endless"), HttpGet(_reactor()))()
    await asyncio.wait_for(health.endless_closed.wait(), 5)


@aio_test
async def test_http_probe_refused_connection_is_not_serving() -> None:
    """Nothing listening at the health URL means not serving, not an exception."""
    assert not await HttpProbe(f"http://127.0.0.1:{free_port()}/health", HttpGet(_reactor()))()


@aio_test
async def test_http_get_times_out(health: Health) -> None:
    """A health URL that never answers fails the probe after the timeout instead of hanging the heartbeat."""
    health.hang = True
    get = HttpGet(_reactor(), timeout=0.2)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await get(health.url)
    assert asyncio.get_running_loop().time() - started < 2
    assert not await HttpProbe(health.url, get)()


@aio_test
async def test_http_get_reads_only_the_start_of_a_large_body(health: Health) -> None:
    """A huge health answer is not read whole: the first body_limit bytes are enough."""
    health.body = b"x" * (4 * 1024 * 1024)
    status, body = await HttpGet(_reactor(), body_limit=1000)(health.url)
    assert (status, body) == (200, b"x" * 1000)


# ---------------------------------------------------------------------------
# grpc: a health Check, against a real grpc.aio health server


@asynccontextmanager
async def _health(statuses: dict[str, int]) -> AsyncIterator[tuple[GrpcHealth, H2Upstream]]:
    """A health server answering ``statuses``, and the daemon's HTTP/2 client to it."""
    async with aio_health_server(GrpcHealth(statuses=statuses)) as health:
        client = H2Upstream(_reactor(), "127.0.0.1", health.port, health.target, asyncio.get_running_loop())
        try:
            yield health, client
        finally:
            await client.close()


@aio_test
async def test_grpc_probe_names_the_service_id() -> None:
    """The Check asks about service_id, as Go's daemon does: a server that registered only
    that name is serving (asking about "" was NOT_FOUND there)."""
    async with _health({"my-service": SERVING}) as (health, client):
        assert await GrpcHealthProbe(client.unary, service="my-service")()
        assert health.asked == ["my-service"]


@aio_test
async def test_grpc_probe_falls_back_to_the_whole_server_on_not_found() -> None:
    """A server that does not know service_id answers NOT_FOUND: the probe asks about ""
    (what grpcio and grpc-go health servers register by themselves)."""
    async with _health({"": SERVING}) as (health, client):
        assert await GrpcHealthProbe(client.unary, service="my-service")()
        assert health.asked == ["my-service", ""]
        health.statuses[""] = NOT_SERVING
        assert not await GrpcHealthProbe(client.unary, service="my-service")()


@aio_test
async def test_grpc_probe_takes_the_named_answer_as_final() -> None:
    """Only NOT_FOUND falls back: a service that says it is NOT_SERVING is not serving,
    although the server as a whole is."""
    async with _health({"": SERVING, "my-service": NOT_SERVING}) as (health, client):
        assert not await GrpcHealthProbe(client.unary, service="my-service")()
        assert health.asked == ["my-service"]


@aio_test
async def test_grpc_probe_without_a_service_id_asks_once_about_the_server() -> None:
    """No service_id: one Check about "", and its NOT_FOUND is not asked again."""
    async with _health({}) as (health, client):
        assert not await GrpcHealthProbe(client.unary, service="")()
        assert health.asked == [""]


# ---------------------------------------------------------------------------
# storageClientCertDetails


def test_storage_cert_details_in_gos_words(tmp_path: Path) -> None:
    """The etcd client certificate's validity, worded and formatted exactly as Go's daemon
    writes it (fmt "Valid Since: %+v days" of time.Time.String())."""
    _, cert, _ = certificates(
        tmp_path,
        not_before=datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2026, 11, 12, 13, 14, 15, tzinfo=datetime.UTC),
    )
    assert storage_cert_details(str(cert)) == {
        "validFrom": "Valid Since: 2024-01-02 03:04:05 +0000 UTC days",
        "validTill": "Valid Till: 2026-11-12 13:14:15 +0000 UTC days",
    }


def test_storage_cert_details_empty_without_a_certificate(tmp_path: Path) -> None:
    """No path, a missing file or a file that holds no certificate: Go's empty fields."""
    (tmp_path / "key-only.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    empty = {"validFrom": "", "validTill": ""}
    assert storage_cert_details("") == empty
    assert storage_cert_details(str(tmp_path / "missing.pem")) == empty
    assert storage_cert_details(str(tmp_path / "key-only.pem")) == empty


@aio_test
async def test_the_report_carries_the_storage_cert_details() -> None:
    """The details given are reported as they are, an object of two strings."""
    details = {"validFrom": "Valid Since: x days", "validTill": "Valid Till: y days"}
    identity = HeartbeatIdentity("org", "svc", "group", "0xregistry", "1.0", True, "sepolia")

    async def serving() -> bool:
        return True

    report = await Heartbeat(lambda: identity, serving, lambda: 0.0, storage_cert=details).report()
    assert report["storageClientCertDetails"] == details


@aio_test
async def test_the_probe_cache_ignores_a_wall_clock_step() -> None:
    """The wall clock stepped back an hour (an NTP step, a VM resumed) neither keeps one probe
    answer for that hour nor changes the cache period: it runs on the monotonic clock, and the
    wall clock only stamps the report."""
    identity = HeartbeatIdentity("org", "svc", "group", "0xregistry", "1.0", True, "sepolia")
    wall = [10_000.0]
    ticks = [0.0]
    answers = [True, False]

    async def probe() -> bool:
        return answers.pop(0)

    heartbeat = Heartbeat(lambda: identity, probe, lambda: wall[0], cache_seconds=1.0, monotonic=lambda: ticks[0])
    assert await heartbeat.serving()
    wall[0] -= 3600
    ticks[0] += 1.5
    assert not await heartbeat.serving()
    assert answers == []
    report = await heartbeat.report()
    assert report["timestamp"] == str(int(wall[0]))
