"""Metadata from the Registry and IPFS, refreshed on Registry events and SIGHUP, never fatal."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from snet_daemon.blockchain import registry as registry_module
from snet_daemon.blockchain.blocks import BlockNumber
from snet_daemon.blockchain.build import ChainComponents, build_chain
from snet_daemon.blockchain.metadata import DaemonMetadata
from snet_daemon.blockchain.refresh import MetadataSource
from snet_daemon.blockchain.registry import RegistryReader
from snet_daemon.config.errors import ConfigError
from snet_daemon.config.model import DaemonConfig
from snet_daemon.ops.reload import SighupReload
from tests.support.aio import aio_test, wait_for
from tests.support.chain import (  # noqa: F401 - fixtures
    ORG_ID,
    PROVIDER,
    SERVICE_ID,
    Anvil,
    Chain,
    chain,
    org_metadata,
    service_metadata,
)
from tests.support.ipfs import IpfsServer, ipfs  # noqa: F401 - fixture
from tests.support.ports import free_port
from tests.support.registry import ORG, SVC, FakeRegistryRpc, metadata_source


def settings(**keys: Any) -> Any:
    """``config.chain`` for a local network with fast polling."""
    base: dict[str, Any] = {
        "blockchain_network_selected": "local",
        "organization_id": ORG_ID,
        "service_id": SERVICE_ID,
        "block_poll_interval": "50ms",
        "metadata_refresh_interval": "100ms",
        "ipfs_timeout": 5,
    }
    base.update(keys)
    return DaemonConfig(**base).chain


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class Running:
    """Starts the components' services; stops them on exit."""

    def __init__(self, components: ChainComponents) -> None:
        self.components = components

    async def __aenter__(self) -> ChainComponents:
        for service in self.components.services:
            service.startService()
        return self.components

    async def __aexit__(self, *exc: object) -> None:
        for service in self.components.services:
            await service.stopService().asFuture(asyncio.get_running_loop())


def price(components: ChainComponents) -> int | None:
    """The current price of any method, or None before metadata is loaded."""
    assert components.metadata is not None
    current = components.metadata.current
    return None if current is None else current.price("/pkg.Svc/m")


def chain_settings(chain: Chain, ipfs: IpfsServer, **keys: Any) -> Any:  # noqa: F811
    return settings(
        ethereum_json_rpc_http_endpoint=chain.url,
        registry_address_key=chain.registry.address,
        ipfs_endpoint=ipfs.url,
        lighthouse_endpoint=ipfs.gateway,
        **keys,
    )


@aio_test
async def test_metadata_from_registry_and_ipfs(chain: Chain, ipfs: IpfsServer) -> None:  # noqa: F811
    """Registry URIs resolve through IPFS; the group, pricing and MPE reach the chain reader; ready."""
    org_uri, service_uri = chain.publish(ipfs)
    components = build_chain(chain_settings(chain, ipfs), reactor())
    assert components.reader is not None
    assert components.metadata is not None
    async with Running(components):
        await asyncio.wait_for(components.metadata.wait_loaded(), 10)
        current = components.metadata.current
        assert current is not None
        assert (current.org_uri, current.service_uri) == (org_uri, service_uri)
        assert current.payment_address == PROVIDER.address
        assert current.mpe_address == chain.mpe.address
        assert components.reader.mpe_address == chain.mpe.address
        assert price(components) == 10
        await wait_for(lambda: components.readiness().ready)
        assert components.metadata.status().org_uri == org_uri
        assert components.reader.health().blocks.number == chain.block_number()
        assert components.registry_address == chain.registry.address
        assert components.reader.health().blocks.error is None


@aio_test
async def test_registry_events_trigger_refresh(chain: Chain, ipfs: IpfsServer) -> None:  # noqa: F811
    """A new service or organisation URI in the Registry is loaded without restart and announced."""
    chain.publish(ipfs)
    components = build_chain(chain_settings(chain, ipfs), reactor())
    assert components.metadata is not None
    seen: list[DaemonMetadata] = []
    components.metadata.subscribe(seen.append)
    async with Running(components):
        await wait_for(lambda: price(components) == 10)
        assert len(seen) == 1

        new_service = "ipfs://" + ipfs.add_json(service_metadata(mpe_address=chain.mpe.address, price=25))
        chain.set_service_uri(ORG_ID, SERVICE_ID, new_service)
        await wait_for(lambda: price(components) == 25)

        chain.set_org_uri(ORG_ID, "ipfs://" + ipfs.add_json(org_metadata(threshold=777)))
        await wait_for(
            lambda: (
                components.metadata is not None
                and components.metadata.current is not None
                and components.metadata.current.payment_expiration_threshold == 777
            )
        )
        assert [md.price("/a.B/c") for md in seen] == [10, 25, 25]
        assert seen[-1].payment_expiration_threshold == 777

        # Another service of the same organisation changing is not our business.
        chain.create_service(ORG_ID, "other-service", new_service)
        loads = components.metadata.status().loads
        await asyncio.sleep(0.3)
        assert components.metadata.status().loads == loads


@aio_test
async def test_registry_event_in_blocks_replaced_after_a_poll_is_seen(chain: Chain, ipfs: IpfsServer) -> None:  # noqa: F811
    """Blocks already scanned are replaced (a reorganisation, here anvil's revert) by ones with a
    Registry event: the next polls scan recent blocks again and see it (scanning only blocks
    after the last one checked never would)."""
    chain.publish(ipfs)
    components = build_chain(chain_settings(chain, ipfs), reactor())
    source = components.metadata
    assert source is not None
    async with Running(components):
        await wait_for(lambda: price(components) == 10)
        chain.snapshot()
        top = chain.mine(3)
        await wait_for(lambda: (source._last_checked_block or 0) >= top)
        chain.revert()  # the three blocks are gone ...
        new_service = "ipfs://" + ipfs.add_json(service_metadata(mpe_address=chain.mpe.address, price=25))
        chain.set_service_uri(ORG_ID, SERVICE_ID, new_service)  # ... replaced by one with the event
        chain.mine(3)
        await wait_for(lambda: price(components) == 25)
        loads = source.status().loads
        await asyncio.sleep(0.5)  # polls that scan the event's block again do not load it again
        assert source.status().loads == loads


@aio_test
async def test_failed_refresh_keeps_previous_metadata(chain: Chain, ipfs: IpfsServer) -> None:  # noqa: F811
    """Broken new metadata is logged and refused; the old stays in use; a fix is picked up."""
    chain.publish(ipfs)
    components = build_chain(chain_settings(chain, ipfs), reactor())
    assert components.metadata is not None
    async with Running(components):
        await wait_for(lambda: price(components) == 10)
        broken = service_metadata(
            mpe_address=chain.mpe.address, pricing=[{"price_model": "fixed_price", "price_in_cogs": 3}]
        )
        chain.set_service_uri(ORG_ID, SERVICE_ID, "ipfs://" + ipfs.add_json(broken))
        await wait_for(lambda: components.metadata is not None and components.metadata.status().error is not None)
        status = components.metadata.status()
        assert status.ready
        assert price(components) == 10
        assert status.error is not None
        assert 'groups[0].pricing: no entry has "default": true' in status.error
        assert components.readiness().ready  # the previous metadata still serves

        # An unreachable document is retried until it appears.
        missing_cid = ipfs.add_json({"unpublished": True})
        document = service_metadata(mpe_address=chain.mpe.address, price=40)
        chain.set_service_uri(ORG_ID, SERVICE_ID, "ipfs://" + ipfs.add_json(document))
        await wait_for(lambda: price(components) == 40)
        assert components.metadata.status().error is None
        assert missing_cid


@aio_test
async def test_not_ready_until_chain_and_metadata_appear(chain: Chain, ipfs: IpfsServer) -> None:  # noqa: F811
    """With the node down at startup the daemon stays up, reports why it is not ready, and recovers."""
    port = free_port()
    components = build_chain(
        settings(
            ethereum_json_rpc_http_endpoint=f"http://127.0.0.1:{port}",
            registry_address_key=chain.registry.address,
            ipfs_endpoint=ipfs.url,
        ),
        reactor(),
        metadata_retry=0.05,
    )
    assert components.metadata is not None
    anvil = Anvil(port)
    try:
        async with Running(components):
            await wait_for(lambda: components.metadata is not None and components.metadata.status().error is not None)
            readiness = components.readiness()
            assert not readiness.ready
            assert any(reason.startswith("chain: current block number not known yet") for reason in readiness.reasons)
            assert any(reason.startswith("metadata: ChainUnavailable") for reason in readiness.reasons)

            anvil.start()
            fresh = Chain.deploy(anvil)  # same deployer, same nonces: same addresses
            assert fresh.registry.address == chain.registry.address
            fresh.publish(ipfs)
            await wait_for(lambda: components.readiness().ready, within=15)
            assert price(components) == 10
    finally:
        anvil.stop()


@aio_test
async def test_sighup_reloads_local_files(tmp_path: Path) -> None:
    """With blockchain disabled, local metadata files load, and SIGHUP (the daemon's handler) reloads them."""
    org_path, service_path = tmp_path / "org.json", tmp_path / "service.json"
    mpe = "0x" + "11" * 20
    org_path.write_text(json.dumps(org_metadata()))
    service_path.write_text(json.dumps(service_metadata(mpe_address=mpe, price=5)))
    components = build_chain(
        settings(
            blockchain_enabled=False,
            organization_metadata_uri=str(org_path),
            service_metadata_uri=service_path.as_uri(),
        ),
        reactor(),
    )
    assert components.reader is None
    metadata = components.metadata
    assert metadata is not None
    # What tap.build_daemon registers with the daemon's SIGHUP handler.
    sighup = SighupReload(reactor(), [("metadata", lambda: metadata.request_refresh("SIGHUP"))])
    previous = signal.getsignal(signal.SIGHUP)
    sighup.startService()
    try:
        async with Running(components):
            await wait_for(lambda: price(components) == 5)
            assert components.readiness().ready
            service_path.write_text(json.dumps(service_metadata(mpe_address=mpe, price=6)))
            os.kill(os.getpid(), signal.SIGHUP)
            await wait_for(lambda: price(components) == 6)
            service_path.write_text("{not json")
            os.kill(os.getpid(), signal.SIGHUP)
            await wait_for(lambda: metadata.status().error is not None)
            assert price(components) == 6
            assert "service metadata is not JSON" in (metadata.status().error or "")
    finally:
        sighup.stopService()
        after = signal.getsignal(signal.SIGHUP)
        signal.signal(signal.SIGHUP, previous)
    # Once stopped (the drain runs then), a SIGHUP must not end the process.
    assert after == (signal.SIG_IGN if previous in (signal.SIG_DFL, None) else previous)


@aio_test
async def test_service_only_metadata_when_blockchain_disabled(tmp_path: Path) -> None:
    """Without payments a service document alone is enough (encoding, service type)."""
    path = tmp_path / "service.json"
    document = service_metadata(mpe_address="0x" + "22" * 20)
    document["encoding"] = "json"
    path.write_text(json.dumps(document))
    components = build_chain(settings(blockchain_enabled=False, service_metadata_uri=str(path)), reactor())
    assert components.metadata is not None
    async with Running(components):
        await asyncio.wait_for(components.metadata.wait_loaded(), 5)
        assert components.metadata.current is None
        assert components.metadata.service is not None
        assert components.metadata.service.encoding == "json"
        assert components.readiness().ready


@aio_test
async def test_org_from_registry_service_from_http(chain: Chain, ipfs: IpfsServer) -> None:  # noqa: F811
    """A local service URI (HTTP here) overrides the Registry's while the organisation comes from it."""
    chain.publish(ipfs)
    ipfs.pages["/local/service.json"] = json.dumps(service_metadata(mpe_address=chain.mpe.address, price=77)).encode()
    components = build_chain(
        chain_settings(chain, ipfs, service_metadata_uri=f"{ipfs.url}/local/service.json"),
        reactor(),
    )
    async with Running(components):
        await wait_for(lambda: price(components) == 77)
        assert components.metadata is not None
        assert components.metadata.current is not None
        assert components.metadata.current.service_uri.endswith("/local/service.json")


def test_blockchain_disabled_without_metadata_builds_nothing() -> None:
    """With blockchain disabled and no local URIs there is nothing to run."""
    components = build_chain(settings(blockchain_enabled=False), reactor())
    assert (components.reader, components.metadata, components.services) == (None, None, [])
    assert components.readiness().ready


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"blockchain_network_selected": "private"}, "ethereum_json_rpc_http_endpoint' is required"),
        ({"blockchain_network_selected": "sepolia"}, "no 'blockchain_provider_api_key'"),
        ({"ethereum_json_rpc_http_endpoint": "http://127.0.0.1:1"}, "registry_address_key' is required"),
        (
            {"ethereum_json_rpc_http_endpoint": "http://127.0.0.1:1", "registry_address_key": "0x12"},
            "is not an Ethereum address",
        ),
    ],
)
def test_impossible_configurations_fail_at_startup(keys: dict[str, Any], message: str) -> None:
    """Configuration that no retry can fix is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=message):
        build_chain(settings(**keys), reactor())


def test_known_networks_need_only_an_api_key() -> None:
    """main and sepolia know their Registry; the Infura URL is derived from the key."""
    components = build_chain(
        settings(blockchain_network_selected="sepolia", blockchain_provider_api_key="k" * 32), reactor()
    )
    assert components.registry_address == "0x4DCc70c6FCE4064803f0ae0cE48497B3f7182e5D"
    assert components.reader is not None
    assert components.reader.rpc.url == "https://sepolia.infura.io/v3/" + "k" * 32
    assert components.reader.mpe_address == "0x042d31F61c598eADcAc729B845406514521db520"


def _unused(*_: AsyncIterator[Any]) -> None:
    """Keeps imports used only in annotations."""


# --------------------------------------------------------------------------
# Registry events from providers with habits anvil does not have
# (tests/support/registry.py): capped eth_getLogs ranges, lagging nodes.


@contextmanager
def warnings_logged() -> Iterator[list[str]]:
    """Texts of the warnings (and worse) logged by the metadata side while the block runs."""
    texts: list[str] = []

    def record(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "snetd.metadata" and event["log_level"] >= LogLevel.warn:
            texts.append(formatEvent(event))

    observer: Any = record  # a plain callable is an ILogObserver; mypy-zope cannot tell

    globalLogPublisher.addObserver(observer)
    try:
        yield texts
    finally:
        globalLogPublisher.removeObserver(observer)


async def poll(source: MetadataSource, blocks: BlockNumber, rpc: FakeRegistryRpc) -> None:
    """One event poll, after the block cache has learnt the chain's head."""
    blocks.update(rpc.head)
    await source._tick()


def source_price(source: MetadataSource) -> int:
    assert source.current is not None
    return source.current.price("/a.B/c")


@aio_test
async def test_registry_events_read_in_ranges_a_capped_provider_accepts() -> None:
    """QuickNode's free plans refuse eth_getLogs over more than 5 blocks, and a poll asks for at
    least 13 (the last 12 are scanned again): the range is halved until accepted, and the span that
    worked is kept, so a new price is applied and later polls are not refused again."""
    rpc = FakeRegistryRpc(log_limit=5)
    source, blocks, _ = metadata_source(rpc, Clock())
    await source._tick()  # startup load
    assert source_price(source) == 10
    rpc.set_service_uri("svc-v25.json")
    await poll(source, blocks, rpc)
    assert source_price(source) == 25
    assert rpc.refused == 2  # 13 blocks, then 6; 3 at a time works
    assert source.registry is not None
    assert source.registry.log_span == 3
    for _ in range(5):
        rpc.mine(2)
        await poll(source, blocks, rpc)
    assert rpc.refused == 2
    assert max(end - start for start, end in rpc.get_logs[2:]) == 2


@aio_test
async def test_registry_changes_in_chunks_cover_the_range_once() -> None:
    """Every block of the range is asked for exactly once, in order, and each event found once,
    whatever the provider's cap; the span grows back after many calls without a refusal (the
    refusal may have been a passing one) and is halved again if the provider still refuses."""
    for limit in (1, 2, 5, 7, 2000):
        rpc = FakeRegistryRpc(log_limit=limit)
        for block in range(1000, 1100, 7):
            rpc.emit("OrganizationModified", block)
        reader = _reader(rpc)
        events = await reader.changes(ORG, SVC, 990, 1099)
        assert [event.block for event in events] == list(range(1000, 1100, 7))
        accepted = [asked for asked in rpc.get_logs if asked[1] - asked[0] < limit]
        assert [block for start, end in accepted for block in range(start, end + 1)] == list(range(990, 1100))
    rpc = FakeRegistryRpc(log_limit=5)
    reader = _reader(rpc)
    for _ in range(registry_module._GROW_AFTER):
        await reader.changes(ORG, SVC, 1000, 1012)
    assert (reader.log_span, rpc.refused) == (6, 2)  # 13 -> 6 -> 3, then doubled
    await reader.changes(ORG, SVC, 1000, 1012)
    assert (reader.log_span, rpc.refused) == (3, 3)


@aio_test
async def test_registry_events_refused_even_for_one_block_are_a_warning() -> None:
    """When the provider refuses even one block, the poll fails with a warning naming the block,
    the metadata in use stays, and the range is asked for again on the next poll."""
    rpc = FakeRegistryRpc(log_limit=0)
    source, blocks, _ = metadata_source(rpc, Clock())
    await source._tick()
    rpc.set_service_uri("svc-v25.json")
    with warnings_logged() as warnings:
        await poll(source, blocks, rpc)
    assert source_price(source) == 10
    assert len(warnings) == 1
    assert "cannot read Registry events" in warnings[0]
    assert "eth_getLogs refused even a single block (989)" in warnings[0]
    rpc.log_limit = 5
    await poll(source, blocks, rpc)
    assert source_price(source) == 25


@aio_test
async def test_malformed_registry_logs_are_skipped_with_a_warning() -> None:
    """Log entries that are not objects, or whose blockNumber is not a quantity (null for a pending
    log), are skipped with a warning each: the poll goes on past them and finds the real event, where
    one such entry used to fail every poll of the same range (the position never advancing)."""
    rpc = FakeRegistryRpc()
    source, blocks, _ = metadata_source(rpc, Clock())
    await source._tick()
    rpc.junk_logs = [
        "junk",
        {"topics": "0x1"},
        rpc.log("ServiceMetadataModified", None, SVC),
        rpc.log("OrganizationModified", "-0x10"),
        rpc.log("OrganizationModified", "0x10", "ignored") | {"topics": []},  # not ours: skipped quietly
    ]
    rpc.set_service_uri("svc-v25.json")
    with warnings_logged() as warnings:
        await poll(source, blocks, rpc)
    assert source_price(source) == 25
    assert len(warnings) == 4
    assert all(text.startswith("eth_getLogs: skipped a") for text in warnings)
    assert "ServiceMetadataModified blockNumber: None is not a quantity" in warnings[2]
    assert "'-0x10' is not a quantity" in warnings[3]
    scanned_to = rpc.get_logs[-1][1]
    rpc.mine()
    await poll(source, blocks, rpc)
    assert rpc.get_logs[-1][1] == scanned_to + 1


def _reader(rpc: FakeRegistryRpc) -> RegistryReader:
    source, _, _ = metadata_source(rpc, Clock())
    assert source.registry is not None
    return source.registry


@aio_test
async def test_registry_event_applied_when_the_node_answering_lags() -> None:
    """Behind a load balancer the node answering eth_call may be a block behind the one that
    returned the event: asked for "latest" it answers the old URI, and the event would be used up
    with the old document.  URIs are read at the block the poll scanned to, which that node does
    not have yet: its error fails the refresh, which is tried again and loads the new price."""
    rpc = FakeRegistryRpc()
    source, blocks, _ = metadata_source(rpc, Clock())
    await source._tick()
    event_block = rpc.set_service_uri("svc-v25.json")
    rpc.lagging_calls = 2  # both reads of the refresh land on the lagging node
    await poll(source, blocks, rpc)
    assert source_price(source) == 10
    assert "header not found" in (source.status().error or "")
    rpc.lagging_calls = 0  # the next reads land on an up-to-date node
    await source._tick()  # the retry
    assert source_price(source) == 25
    # Startup read at its block; then the refused read and both again at the event's poll's block.
    assert rpc.call_blocks == [1000, 1000] + [event_block] * 3
    assert source.status().error is None


@aio_test
async def test_failed_sighup_refresh_is_tried_again() -> None:
    """A SIGHUP reload that fails (here: the node answering lags behind the cached block) is tried
    again on the next tick, also when Registry events are not polled."""
    rpc = FakeRegistryRpc()
    source, blocks, _ = metadata_source(rpc, Clock(), event_interval=0)
    await source._tick()
    rpc.set_service_uri("svc-v25.json")
    blocks.update(rpc.head)
    rpc.lagging_calls = 2
    assert not await source.refresh("SIGHUP")
    assert source_price(source) == 10
    rpc.lagging_calls = 0
    await source._tick()
    assert source_price(source) == 25


@aio_test
async def test_events_in_the_startup_metadata_are_not_loaded_again() -> None:
    """The first poll scans the 12 blocks before the startup load's block too (a reorganisation may
    have replaced them); the events it finds there (the organisation and service being created) are
    in what was loaded and do not load it again.  (It did: in the anvil test above, when the test's
    revert and new URI landed during that needless reload, the new price came from it and the
    event's own load came after the test's count, 1 run in 4-6.)"""
    rpc = FakeRegistryRpc()
    rpc.emit("OrganizationCreated", 998)
    rpc.emit("ServiceCreated", 999, SVC)
    source, blocks, loader = metadata_source(rpc, Clock())
    await source._tick()
    rpc.mine(3)
    await poll(source, blocks, rpc)
    assert source.status().loads == 1
    rpc.set_service_uri("svc-v25.json")
    await poll(source, blocks, rpc)
    assert source_price(source) == 25
    for _ in range(15):
        rpc.mine()
        await poll(source, blocks, rpc)
    assert source.status().loads == 2
    assert loader.loaded == ["org.json", "svc-v10.json", "org.json", "svc-v25.json"]


@aio_test
async def test_block_number_going_back_does_not_load_an_old_event_again() -> None:
    """A node behind a load balancer answers eth_blockNumber with a block before the last one
    scanned: the poll position goes back, but the next scan does not reach below the events
    remembered, so an event applied 12 blocks ago is not loaded again."""
    rpc = FakeRegistryRpc()
    source, blocks, _ = metadata_source(rpc, Clock())
    await source._tick()
    rpc.set_service_uri("svc-v25.json")
    await poll(source, blocks, rpc)
    assert source.status().loads == 2
    for _ in range(12):
        rpc.mine()
        await poll(source, blocks, rpc)
    blocks.update(rpc.head - 1)  # the lagging node's answer
    await source._tick()
    for _ in range(3):
        rpc.mine()
        await poll(source, blocks, rpc)
    assert source.status().loads == 2


@aio_test
async def test_event_in_blocks_replaced_by_a_shorter_chain_is_loaded_at_once() -> None:
    """Blocks already scanned are replaced by fewer ones, one with a Registry event: it is found by
    the next poll, without waiting for the chain to pass the height it had."""
    rpc = FakeRegistryRpc()
    source, blocks, _ = metadata_source(rpc, Clock())
    await source._tick()
    rpc.mine(10)
    await poll(source, blocks, rpc)
    rpc.head -= 3  # reverted
    rpc.set_service_uri("svc-v25.json")
    await poll(source, blocks, rpc)
    assert source_price(source) == 25
    assert source.status().loads == 2
