"""``/heartbeat`` of a real ``twistd snetd``: what each ``service_heartbeat_type`` probes.

As Go: ``grpc`` asks the gRPC health service at ``heartbeat_endpoint`` (the
service itself when it is empty); ``http``/``https`` GET ``heartbeat_endpoint``
(tests/test_grpcweb_http.py); ``tcp``, ``none`` and ``""`` connect to the
service's own host:port and never read ``heartbeat_endpoint``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from snet_daemon.config import load_config
from snet_daemon.tap import build_daemon
from tests.support.aio import aio_test
from tests.support.certs import certificates
from tests.support.daemon import Daemon
from tests.support.health import SERVING, GrpcHealth, connections_to, health_server
from tests.support.ports import free_port
from tests.support.rawhttp import http1_request
from tests.support.services import demo_tarball, python_executable, wait_for
from tests.support.upstream import Upstream


def _heartbeat(daemon: Daemon) -> dict[str, Any]:
    status, _, body = http1_request(daemon.address, "GET", "/heartbeat")
    assert status == 200
    report: dict[str, Any] = json.loads(body)
    return report


def _service_status(report: dict[str, Any]) -> str:
    status: str = json.loads(report["serviceheartbeat"])["status"]
    return status


# --------------------------------------------------------------------------
# tcp, none and "": the service's own host:port


@pytest.mark.parametrize("probe", ["", "tcp", "none"])
def test_tcp_types_probe_the_service_not_a_leftover_heartbeat_endpoint(
    upstream: Upstream, tmp_path: Path, probe: str
) -> None:
    """A heartbeat_endpoint left over from an old Go config (Go ignores it for these types)
    where nothing listens: the service is up, so the heartbeat says SERVING and Online."""
    config = {
        "service_endpoint": upstream.endpoint,
        "service_heartbeat_type": probe,
        "heartbeat_endpoint": f"http://127.0.0.1:{free_port()}/health",
    }
    with Daemon(tmp_path, config) as daemon:
        report = _heartbeat(daemon)
    assert _service_status(report) == "SERVING", report
    assert report["status"] == "Online", report


def test_tcp_type_still_sees_the_service_down(tmp_path: Path) -> None:
    """The other way round: a heartbeat_endpoint that accepts connections does not make a
    service that is down look SERVING."""
    up = Upstream(free_port()).start()
    try:
        config = {
            "service_endpoint": f"http://127.0.0.1:{free_port()}",
            "service_heartbeat_type": "tcp",
            "heartbeat_endpoint": up.endpoint,
        }
        with Daemon(tmp_path, config) as daemon:
            report = _heartbeat(daemon)
    finally:
        up.stop()
    assert _service_status(report) == "NOT_SERVING", report
    assert report["status"] == "Offline", report


def test_a_process_service_is_serving_when_ready_whatever_the_endpoints(tmp_path: Path) -> None:
    """An executable has no address to connect to: it is SERVING once it is ready to run,
    although nothing listens at service_endpoint nor at heartbeat_endpoint."""
    metadata = tmp_path / "service_metadata.json"
    metadata.write_text(
        json.dumps(
            {
                "version": 1,
                "display_name": "demo process",
                "service_type": "process",
                "encoding": "proto",
                "service_api_source": f"file://{demo_tarball(tmp_path)}",
                "groups": [{"group_name": "default_group", "pricing": []}],
            }
        )
    )
    config = {
        "service_metadata_uri": str(metadata),
        "executable_path": python_executable(tmp_path),
        "service_endpoint": f"http://127.0.0.1:{free_port()}",
        "heartbeat_endpoint": f"http://127.0.0.1:{free_port()}/health",
        "log": {"level": "info"},
    }
    with Daemon(tmp_path, config) as daemon:
        # The protos are compiled after the port opens; until then the executable is not ready.
        assert wait_for(lambda: _service_status(_heartbeat(daemon)) == "SERVING", 20), daemon.log_tail()


# --------------------------------------------------------------------------
# grpc: a health Check about service_id


def test_grpc_type_asks_the_service_about_its_service_id(tmp_path: Path) -> None:
    """Without heartbeat_endpoint the service itself is asked, about service_id as Go asks;
    a health server that registered only that name is SERVING."""
    with health_server(GrpcHealth(statuses={"my-service": SERVING})) as health:
        config = {"service_endpoint": health.target, "service_heartbeat_type": "grpc", "service_id": "my-service"}
        with Daemon(tmp_path, config) as daemon:
            report = _heartbeat(daemon)
    assert _service_status(report) == "SERVING", report
    assert report["status"] == "Online", report
    assert "my-service" in health.asked


# --------------------------------------------------------------------------
# grpc with heartbeat_endpoint: the Check goes there


@pytest.mark.parametrize("form", ["{}", "http://{}", "grpc://{}"])
def test_grpc_type_asks_heartbeat_endpoint(upstream: Upstream, tmp_path: Path, form: str) -> None:
    """The health server at heartbeat_endpoint is asked, not the service (which has no health
    service here), whether the endpoint is host:port or the URL Go's validation asks for."""
    with health_server() as health:
        config = {
            "service_endpoint": upstream.endpoint,
            "service_heartbeat_type": "grpc",
            "heartbeat_endpoint": form.format(health.target),
        }
        with Daemon(tmp_path, config) as daemon:
            report = _heartbeat(daemon)
    assert _service_status(report) == "SERVING", report
    assert health.asked, "the health server was never asked"


def test_grpc_type_with_https_checks_over_tls(upstream: Upstream, tmp_path: Path) -> None:
    """https://: the Check goes over TLS, verified against the system trust roots (here a
    private CA, through SSL_CERT_FILE)."""
    ca, cert, key = certificates(tmp_path)
    with health_server(tls=(cert, key)) as health:
        config = {
            "service_endpoint": upstream.endpoint,
            "service_heartbeat_type": "grpc",
            "heartbeat_endpoint": f"https://{health.target}",
        }
        with Daemon(tmp_path, config, env={"SSL_CERT_FILE": str(ca)}) as daemon:
            report = _heartbeat(daemon)
    assert _service_status(report) == "SERVING", report


def test_grpc_type_with_https_never_falls_back_to_plaintext(upstream: Upstream, tmp_path: Path) -> None:
    """https:// to a plaintext health server is NOT_SERVING: TLS or nothing."""
    with health_server() as health:
        config = {
            "service_endpoint": upstream.endpoint,
            "service_heartbeat_type": "grpc",
            "heartbeat_endpoint": f"https://{health.target}",
        }
        with Daemon(tmp_path, config) as daemon:
            report = _heartbeat(daemon)
    assert _service_status(report) == "NOT_SERVING", report
    assert health.asked == []


async def _get_heartbeat(address: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://{address}/heartbeat") as reply:
        report: dict[str, Any] = await reply.json()
        return report


@aio_test
async def test_the_health_connection_serves_every_probe_and_closes_when_the_daemon_stops(upstream: Upstream) -> None:
    """The daemon built in this process: its probes of heartbeat_endpoint share one
    connection (none is left behind per probe), and stopping the daemon closes it."""
    from twisted.internet import reactor

    # A thread-pool server: it answers whatever the daemon, on this loop, is busy with.
    with health_server() as health:
        address = f"127.0.0.1:{free_port()}"
        overrides = {
            "daemon_endpoint": address,
            "blockchain_enabled": "false",
            "service_endpoint": upstream.endpoint,
            "service_heartbeat_type": "grpc",
            "heartbeat_endpoint": f"http://{health.target}",
        }
        root = build_daemon(load_config(None, environ={}, overrides=overrides), reactor)
        root.startService()
        try:
            for _ in range(3):
                report = await _get_heartbeat(address)
                assert _service_status(report) == "SERVING", (report, health.asked)
                await asyncio.sleep(1.1)  # past the heartbeat's cache: the next report probes again
            assert health.asked.count("YOUR_SERVICE_ID") == 3
            assert connections_to(health.port) == 1
        finally:
            await root.stopService().asFuture(asyncio.get_running_loop())
        for _ in range(50):
            if connections_to(health.port) == 0:
                break
            await asyncio.sleep(0.05)
        assert connections_to(health.port) == 0


# --------------------------------------------------------------------------
# storageClientCertDetails


def test_heartbeat_reports_the_storage_client_certificate(upstream: Upstream, tmp_path: Path) -> None:
    """With payment_channel_cert_path set, storageClientCertDetails says when the etcd client
    certificate is valid, in Go's words (it was always empty)."""
    _, cert, key = certificates(
        tmp_path,
        not_before=datetime.datetime(2025, 3, 4, 5, 6, 7, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2027, 3, 4, 5, 6, 7, tzinfo=datetime.UTC),
    )
    config = {
        "service_endpoint": upstream.endpoint,
        "payment_channel_cert_path": str(cert),
        "payment_channel_key_path": str(key),
    }
    with Daemon(tmp_path, config) as daemon:
        report = _heartbeat(daemon)
    assert report["storageClientCertDetails"] == {
        "validFrom": "Valid Since: 2025-03-04 05:06:07 +0000 UTC days",
        "validTill": "Valid Till: 2027-03-04 05:06:07 +0000 UTC days",
    }
