"""``/heartbeat`` of a real ``twistd snetd``: what each ``service_heartbeat_type`` probes.

As Go: ``grpc`` asks the gRPC health service at ``heartbeat_endpoint`` (the
service itself when it is empty); ``http``/``https`` GET ``heartbeat_endpoint``
(tests/test_grpcweb_http.py); ``tcp``, ``none`` and ``""`` connect to the
service's own host:port and never read ``heartbeat_endpoint``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.health import SERVING, GrpcHealth, health_server
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
