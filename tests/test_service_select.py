"""Choosing the adapter from the service metadata (:mod:`snet_daemon.upstream.select`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from snet_daemon.blockchain.metadata import parse_service
from snet_daemon.config import DaemonConfig
from snet_daemon.config.sections import UpstreamSettings
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.status import Status
from snet_daemon.frontend.wire import Metadata
from snet_daemon.upstream.select import ServiceKind, ServiceUpstream
from tests.support.aio import aio_test
from tests.support.services import (
    SHELL_EXECUTABLE,
    HttpServer,
    JsonRpcServer,
    LocalFetcher,
    demo_tarball,
    invoke,
    json_bytes,
    make_tarball,
    parse_reply,
    request_bytes,
)


def _settings(**config: Any) -> UpstreamSettings:
    return DaemonConfig.model_validate({"blockchain_enabled": False, **config}).upstream


class FakeGrpc:
    """Stands in for the gRPC passthrough: answers every call with one fixed message."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def forward(self, call: ServerCall, metadata: Metadata) -> None:
        self.calls.append(call.method)
        call.write(b"from grpc")

    async def __call__(self, call: ServerCall) -> None:
        await self.forward(call, call.metadata)


class FakeSource:
    """A metadata source whose documents the test publishes."""

    def __init__(self, loader: LocalFetcher | None = None) -> None:
        self.service: Any = None
        self.error: str | None = None
        self.loader = loader or LocalFetcher()
        self._loaded = asyncio.Event()
        self._subscribers: list[Callable[[Any], object]] = []

    def status(self) -> Any:
        return SimpleNamespace(error=self.error)

    async def wait_loaded(self) -> None:
        await self._loaded.wait()

    def subscribe(self, callback: Callable[[Any], object]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def publish(self, **document: Any) -> None:
        self.service = parse_service(json.dumps(document))
        self.error = None
        self._loaded.set()
        for callback in self._subscribers:
            callback(object())


@pytest.fixture(scope="module")
def jsonrpc() -> Iterator[JsonRpcServer]:
    """The demo JSON-RPC server."""
    with JsonRpcServer() as running:
        yield running


@pytest.fixture(scope="module")
def http() -> Iterator[HttpServer]:
    """The demo HTTP server."""
    with HttpServer() as running:
        yield running


def _upstream(settings: UpstreamSettings, source: FakeSource | None, grpc: FakeGrpc | None = None) -> ServiceUpstream:
    from twisted.internet import reactor

    return ServiceUpstream(settings, reactor=reactor, grpc=grpc or FakeGrpc(), metadata=source, first_load_wait=2.0)


def test_service_kind_reads_metadata_case_insensitively() -> None:
    """service_type and encoding are lower-cased; the legacy hash becomes ipfs://."""
    doc = parse_service(json.dumps({"service_type": "JSONRPC", "encoding": "JSON", "model_ipfs_hash": "QmX"}))
    assert ServiceKind.of(doc) == ServiceKind("jsonrpc", "json", "ipfs://QmX")
    with pytest.raises(ValueError, match="service_type 'soap'"):
        ServiceKind("soap").check()
    with pytest.raises(ValueError, match="encoding 'xml'"):
        ServiceKind("grpc", "xml").check()


@aio_test
async def test_without_metadata_the_service_is_grpc() -> None:
    """No metadata source: every call goes to the gRPC passthrough, as in Go."""
    grpc = FakeGrpc()
    upstream = _upstream(_settings(), None, grpc)
    upstream.start()
    sink = await invoke(upstream, "/x.Y/Z", [b"req"])
    assert sink.messages == [b"from grpc"]
    assert upstream.status().service_type == "grpc"
    assert upstream.status().ready
    await upstream.close()


@aio_test
async def test_calls_wait_for_the_first_metadata_then_use_its_type(jsonrpc: JsonRpcServer, tmp_path: Path) -> None:
    """A call made before the metadata is loaded waits, then is served as jsonrpc with the compiled protos."""
    source = FakeSource()
    upstream = _upstream(_settings(service_endpoint=jsonrpc.url), source)
    upstream.start()
    pending = asyncio.ensure_future(invoke(upstream, "/demo.Demo/Echo", [request_bytes(text="early")]))
    await asyncio.sleep(0.1)
    assert not pending.done()
    source.publish(service_type="jsonrpc", encoding="proto", service_api_source=str(demo_tarball(tmp_path)))
    sink = await pending
    assert sink.status == Status.OK, sink.message
    assert parse_reply(sink.messages[0]).text == "early"
    status = upstream.status()
    assert (status.ready, status.service_type, status.methods, status.error) == (True, "jsonrpc", 9, None)
    await upstream.close()


@aio_test
async def test_metadata_that_cannot_be_loaded_is_unavailable() -> None:
    """A metadata load error is reported to callers at once."""
    source = FakeSource()
    source.error = "cannot read metadata file 'x.json'"
    upstream = _upstream(_settings(), source)
    sink = await invoke(upstream, "/demo.Demo/Echo", [request_bytes()])
    assert sink.status == Status.UNAVAILABLE
    assert "cannot read metadata file" in sink.message
    await upstream.close()


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"service_type": "soap"}, "service_type 'soap'"),
        ({"service_type": "http", "service_api_source": "bad.tgz"}, "not a tar archive"),
        ({"service_type": "http", "service_api_source": "broken.tgz"}, "do not compile"),
        ({"service_type": "process"}, "executable_path is empty"),
    ],
)
@aio_test
async def test_unusable_metadata_or_config_is_a_clear_error(document: dict[str, str], fragment: str) -> None:
    """Unknown types, bad archives, protos that do not compile, missing executables: UNAVAILABLE, why."""
    loader = LocalFetcher(
        {"bad.tgz": b"garbage" * 100, "broken.tgz": make_tarball({"x.proto": b"syntax = 'proto3'; message {"})}
    )
    source = FakeSource(loader)
    upstream = _upstream(_settings(), source)
    upstream.start()
    source.publish(**document)
    sink = await invoke(upstream, "/demo.Demo/Echo", [request_bytes()])
    assert sink.status == Status.UNAVAILABLE
    assert fragment in sink.message
    assert fragment in (upstream.status().error or "")
    assert not upstream.status().ready
    await upstream.close()


@aio_test
async def test_new_metadata_switches_the_adapter(http: HttpServer, tmp_path: Path) -> None:
    """grpc, then http after a metadata reload: calls follow the new type."""
    grpc = FakeGrpc()
    source = FakeSource()
    upstream = _upstream(_settings(service_endpoint=http.url), source, grpc)
    upstream.start()
    source.publish(service_type="grpc")
    first = await invoke(upstream, "/demo.Demo/Echo", [request_bytes(text="a")])
    assert first.messages == [b"from grpc"]
    source.publish(service_type="http", service_api_source=str(demo_tarball(tmp_path)))
    for _ in range(100):
        if upstream.status().service_type == "http" and upstream.status().ready:
            break
        await asyncio.sleep(0.05)
    second = await invoke(upstream, "/demo.Demo/Echo", [request_bytes(text="b")])
    assert parse_reply(second.messages[0]).text == "b"
    assert grpc.calls == ["/demo.Demo/Echo"]
    await upstream.close()


@aio_test
async def test_process_type_uses_executable_path_and_json_encoding() -> None:
    """A process service without protos, encoding json: the shell executable echoes JSON."""
    source = FakeSource()
    upstream = _upstream(_settings(executable_path=SHELL_EXECUTABLE), source)
    upstream.start()
    source.publish(service_type="process", encoding="json")
    sink = await invoke(upstream, "/demo.Demo/Echo", [json_bytes({"text": "p"})])
    assert sink.status == Status.OK, sink.message
    assert json.loads(sink.messages[0]) == {"text": "p"}
    await upstream.close()


@aio_test
async def test_passthrough_disabled_echoes_whatever_the_type(jsonrpc: JsonRpcServer) -> None:
    """passthrough_enabled: false echoes requests for every service type, as Go does."""
    source = FakeSource()
    upstream = _upstream(_settings(passthrough_enabled=False, service_endpoint=jsonrpc.url), source)
    upstream.start()
    source.publish(service_type="jsonrpc")
    sink = await invoke(upstream, "/demo.Demo/Echo", [b"one", b"two"])
    assert sink.messages == [b"one", b"two"]
    await upstream.close()


def test_the_process_limit_is_a_config_key() -> None:
    """max_concurrent_processes: a whole number >= 0 (0 means twice the CPUs), strings coerced."""
    from pydantic import ValidationError

    assert DaemonConfig.model_validate({"max_concurrent_processes": "3"}).max_concurrent_processes == 3
    assert DaemonConfig.model_validate({}).max_concurrent_processes == 0
    with pytest.raises(ValidationError, match="must not be negative"):
        DaemonConfig.model_validate({"max_concurrent_processes": -1})
