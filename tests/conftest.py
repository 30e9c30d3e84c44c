"""Shared fixtures: a real test service, and a real ``twistd snetd`` in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.support.daemon import Daemon
from tests.support.ports import free_port
from tests.support.upstream import Upstream

#: Message size the test clients allow (the daemon's limit is what is tested).
CLIENT_MAX = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """The example service (grpcio, thread pool) on a free port."""
    service = Upstream(free_port()).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def daemon(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """``twistd -n snetd`` with default settings in front of :func:`upstream`."""
    with Daemon(tmp_path_factory.mktemp("snetd"), {"service_endpoint": upstream.endpoint}) as running:
        yield running


def make_channel(address: str) -> grpc.Channel:
    """A grpcio channel to ``address`` that allows large messages."""
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", CLIENT_MAX),
            ("grpc.max_receive_message_length", CLIENT_MAX),
            ("grpc.enable_retries", 0),
        ],
    )


@pytest.fixture
def channel(daemon: Daemon, upstream: Upstream) -> Iterator[grpc.Channel]:
    """A fresh client channel to the daemon; the service's record is cleared."""
    upstream.record.reset()
    ch = make_channel(daemon.address)
    yield ch
    ch.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch directory for configs and logs."""
    return tmp_path
