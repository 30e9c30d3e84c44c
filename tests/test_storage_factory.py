"""build_storage: configuration to memory, external etcd or embedded etcd, and the storage service."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.task import Clock

from snet_daemon.config import load_config
from snet_daemon.config.sections import StorageSettings
from snet_daemon.storage.base import StorageSetupError
from snet_daemon.storage.etcd import DEFAULT_CONNECTION_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, EtcdStorage
from snet_daemon.storage.factory import MetadataStorageClient, StorageSetup, build_storage, embedded_etcd_need
from snet_daemon.storage.memory import MemoryStorage
from tests.support.aio import aio_test
from tests.support.certs import certificates
from tests.support.etcd import EtcdServer, etcd_server, pid_alive, requires_etcd
from tests.support.ports import free_port

__all__ = ["etcd_server"]  # fixture, imported for pytest


def settings(**overrides: str) -> StorageSettings:
    """The storage view of a configuration with ``overrides`` (Go key paths)."""
    return load_config(None, environ={}, overrides=overrides).config.storage


def build(config: StorageSettings, **kwargs: object) -> StorageSetup:
    """build_storage on the real reactor."""
    return build_storage(config, process_reactor=reactor, clock=reactor, **kwargs)  # type: ignore[arg-type]


def embedded_overrides() -> dict[str, str]:
    """An embedded server on free ports."""
    client, peer = free_port(), free_port()
    while peer == client:
        peer = free_port()
    return {
        "payment_channel_storage_server.client_port": str(client),
        "payment_channel_storage_server.peer_port": str(peer),
        "payment_channel_storage_server.cluster": f"storage-1=http://127.0.0.1:{peer}",
        "payment_channel_storage_server.log_level": "warn",
    }


# ---------------------------------------------------------------------------
# the decision


@pytest.mark.parametrize("kind", ["memory", "ETCD", "", "redis"])
def test_anything_but_etcd_is_memory(kind: str) -> None:
    """payment_channel_storage_type other than exactly 'etcd' keeps state in memory (as in Go)."""
    setup = build(settings(payment_channel_storage_type=kind))
    assert setup.mode == "memory"
    assert isinstance(setup.storage, MemoryStorage)
    assert setup.embedded is None


def test_configured_endpoints_mean_an_external_cluster() -> None:
    """etcd with configured endpoints uses them, with configured timeouts, and runs no server."""
    setup = build(
        settings(
            **{
                "payment_channel_storage_client.endpoints": "http://10.0.0.1:2379,http://10.0.0.2:2379",
                "payment_channel_storage_client.request_timeout": "1500ms",
            }
        ),
        metadata=MetadataStorageClient(endpoints=("http://meta:2379",), request_timeout=9, connection_timeout=7),
    )
    assert setup.mode == "etcd"
    assert setup.embedded is None
    assert isinstance(setup.storage, EtcdStorage)
    assert setup.storage.endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert setup.storage.request_timeout == 1.5  # config wins over metadata


def test_metadata_endpoints_and_timeouts_fill_gaps() -> None:
    """Without configured endpoints, the organisation metadata's are used, and its timeouts too."""
    setup = build(settings(), metadata=MetadataStorageClient(endpoints=("http://meta:2379",), request_timeout=4))
    assert setup.mode == "etcd"
    assert isinstance(setup.storage, EtcdStorage)
    assert setup.storage.endpoints == ("http://meta:2379",)
    assert setup.storage.request_timeout == 4


def test_defaults_apply_when_nobody_sets_timeouts() -> None:
    """With neither config nor metadata timeouts, the defaults apply."""
    setup = build(settings(**{"payment_channel_storage_client.endpoints": "http://h:2379"}))
    assert isinstance(setup.storage, EtcdStorage)
    assert setup.storage.request_timeout == DEFAULT_REQUEST_TIMEOUT
    assert DEFAULT_CONNECTION_TIMEOUT > 0


@requires_etcd
def test_no_endpoints_anywhere_means_embedded(tmp_path: Path) -> None:
    """etcd without endpoints runs the embedded server and points the client at it."""
    config = settings()
    setup = build(config, workdir=tmp_path)
    assert setup.mode == "embedded-etcd"
    assert setup.embedded is not None
    assert isinstance(setup.storage, EtcdStorage)
    assert setup.storage.endpoints == ("http://127.0.0.1:2379",)


@requires_etcd
def test_enabled_server_with_endpoints_runs_both(tmp_path: Path) -> None:
    """server.enabled starts the embedded server even with endpoints (Go's meaning), the client uses the endpoints."""
    setup = build(
        settings(
            **{
                "payment_channel_storage_client.endpoints": "http://127.0.0.1:2379",
                "payment_channel_storage_server.enabled": "true",
            }
        ),
        workdir=tmp_path,
    )
    assert setup.mode == "etcd"
    assert setup.embedded is not None


def test_missing_etcd_binary_fails_at_build_time(tmp_path: Path) -> None:
    """When the embedded server is needed and etcd is not installed, build_storage raises with the fix."""
    with pytest.raises(StorageSetupError, match="apt-get install etcd-server"):
        build(settings(), workdir=tmp_path, etcd_binary="etcd-not-installed-here")


def test_missing_etcd_binary_message_names_the_reason(tmp_path: Path) -> None:
    """The message says why the embedded server runs: no endpoints anywhere, or server.enabled with
    endpoints (then "no endpoints are configured" would be false, and the fix is enabled: false)."""
    with pytest.raises(StorageSetupError) as nowhere:
        build(settings(), workdir=tmp_path, etcd_binary="etcd-not-installed-here")
    assert "no etcd endpoints are configured" in str(nowhere.value)
    assert "configure an external etcd cluster with payment_channel_storage_client.endpoints" in str(nowhere.value)
    with pytest.raises(StorageSetupError) as enabled:
        build(
            settings(**{"payment_channel_storage_server.enabled": "true"}),
            workdir=tmp_path,
            metadata=MetadataStorageClient(endpoints=("http://10.0.0.5:2379",)),
            etcd_binary="etcd-not-installed-here",
        )
    message = str(enabled.value)
    assert "no etcd endpoints are configured" not in message
    assert message.startswith("payment_channel_storage_server.enabled is true, so snetd runs an etcd server")
    assert "'etcd-not-installed-here' program was not found: install it (Debian/Ubuntu: apt-get" in message
    assert message.endswith("set payment_channel_storage_server.enabled to false to use only those endpoints")


@pytest.mark.parametrize(
    ("overrides", "metadata", "expected"),
    [
        ({"payment_channel_storage_type": "memory", "payment_channel_storage_server.enabled": "true"}, (), None),
        ({}, ("http://meta:2379",), None),
        ({"payment_channel_storage_client.endpoints": "http://h:2379"}, None, None),
        ({}, (), True),
        ({}, None, False),  # the metadata, not loaded yet, may name endpoints
        ({"payment_channel_storage_server.enabled": "true"}, None, True),
        ({"payment_channel_storage_server.enabled": "true"}, ("http://meta:2379",), True),
    ],
)
def test_embedded_etcd_need(overrides: dict[str, str], metadata: tuple[str, ...] | None, expected: bool | None) -> None:
    """embedded_etcd_need: none (memory, or endpoints without server.enabled), certain, or up to the
    organisation metadata when it is not known yet (None) and the configuration names no endpoints."""
    need = embedded_etcd_need(settings(**overrides), metadata)
    assert (None if need is None else need.certain) is expected


def test_bad_endpoint_or_tls_files_fail_at_build_time(tmp_path: Path) -> None:
    """Malformed endpoints and unreadable TLS files are setup errors naming the problem."""
    with pytest.raises(StorageSetupError, match="scheme"):
        build(settings(**{"payment_channel_storage_client.endpoints": "ftp://h:1"}))
    with pytest.raises(StorageSetupError, match=r"missing\.pem"):
        build(
            settings(
                **{
                    "payment_channel_storage_client.endpoints": "https://h:2379",
                    "payment_channel_ca_path": str(tmp_path / "missing.pem"),
                },
            )
        )


def test_wrong_tls_material_fails_at_build_time(tmp_path: Path) -> None:
    """A CA file with no certificate, a key that is not PEM, and a key of another certificate stop
    startup with a message naming the file, instead of an OpenSSL error at the first connection."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    ca, cert, key = certificates(tmp_path / "one")
    _, other_cert, _ = certificates(tmp_path / "two")

    def tls(ca_path: Path, cert_path: Path, key_path: Path) -> None:
        build(
            settings(
                **{
                    "payment_channel_storage_client.endpoints": "https://h:2379",
                    "payment_channel_ca_path": str(ca_path),
                    "payment_channel_cert_path": str(cert_path),
                    "payment_channel_key_path": str(key_path),
                },
            )
        )

    with pytest.raises(StorageSetupError, match=rf"{re.escape(str(key))}: no PEM certificate"):
        tls(key, cert, key)
    with pytest.raises(StorageSetupError, match=rf"{re.escape(str(cert))}: no unencrypted PEM private key"):
        tls(ca, cert, cert)
    with pytest.raises(StorageSetupError, match=rf"{re.escape(str(key))}: this key does not belong"):
        tls(ca, other_cert, key)
    tls(ca, cert, key)  # the right material builds


# ---------------------------------------------------------------------------
# the service


@aio_test
async def test_memory_service_grants_lease_and_stops() -> None:
    """The memory setup is ready at once, keeps a lease, and revokes it on stop."""
    clock = Clock()
    setup = build_storage(settings(payment_channel_storage_type="memory"), process_reactor=reactor, clock=clock)
    setup.service.startService()
    await setup.ready()
    lease_id = await setup.lease_keeper.current()
    await setup.storage.put("k", b"v", lease=lease_id)
    await setup.service.stopService().asFuture(asyncio.get_running_loop())
    assert await setup.storage.get("k") is None


@aio_test
async def test_external_service_ready_fails_when_cluster_unreachable() -> None:
    """ready() fails with a storage error naming the endpoint when the cluster cannot be reached."""
    url = f"http://127.0.0.1:{free_port()}"
    setup = build(
        settings(
            **{
                "payment_channel_storage_client.endpoints": url,
                "payment_channel_storage_client.connection_timeout": "300ms",
            }
        )
    )
    setup.service.startService()
    with pytest.raises(Exception, match=url):
        await setup.ready()
    await setup.service.stopService().asFuture(asyncio.get_running_loop())


@aio_test
async def test_external_service_against_real_etcd(etcd_server: EtcdServer) -> None:
    """With a reachable cluster, ready() completes, a lease is kept, and stop revokes it."""
    setup = build(settings(**{"payment_channel_storage_client.endpoints": etcd_server.url}))
    setup.service.startService()
    await setup.ready()
    lease_id = await setup.lease_keeper.current()
    await setup.storage.put("factory/held", b"v", lease=lease_id)
    await setup.service.stopService().asFuture(asyncio.get_running_loop())
    check = EtcdStorage([etcd_server.url])
    assert await check.get("factory/held") is None
    await check.close()


@requires_etcd
@aio_test
async def test_daemon_restart_with_embedded_etcd_keeps_data(tmp_path: Path) -> None:
    """Embedded etcd (default config) stops with the daemon, leaves no process, and a restart finds the data
    but not the leased holds (revoked at stop, not left to expire)."""
    config = settings(**embedded_overrides())
    setup = build(config, workdir=tmp_path)
    setup.service.startService()
    await asyncio.wait_for(setup.ready(), 30)
    assert setup.embedded is not None
    running = setup.embedded.pid
    assert running is not None
    await setup.storage.put("channel", b"state")
    lease_id = await setup.lease_keeper.current()
    await setup.storage.put("hold", b"me", lease=lease_id)
    await setup.service.stopService().asFuture(asyncio.get_running_loop())
    assert setup.embedded.pid is None
    assert all(not pid_alive(pid) for pid in setup.embedded.spawned)

    again = build(config, workdir=tmp_path)
    again.service.startService()
    try:
        await asyncio.wait_for(again.ready(), 30)
        entry = await again.storage.get("channel")
        assert entry is not None
        assert entry.value == b"state"
        assert await again.storage.get("hold") is None
    finally:
        await again.service.stopService().asFuture(asyncio.get_running_loop())
    assert again.embedded is not None
    assert all(not pid_alive(pid) for pid in again.embedded.spawned)
