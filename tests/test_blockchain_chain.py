"""The chain reader against a real chain (anvil): block number, channels, balances, outages;
and against a stub node where anvil cannot be made slow."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from eth_abi.abi import encode
from twisted.application.service import MultiService
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from snet_daemon.blockchain.blocks import STALL_WARNING, BlockNumber, BlockNumberService
from snet_daemon.blockchain.build import build_chain
from snet_daemon.blockchain.chain import ChainReader, ChannelInfo, EthereumChainReader
from snet_daemon.blockchain.contracts import ZERO_ADDRESS, function, network_info
from snet_daemon.blockchain.errors import ChainError, ChainUnavailable, ContractCallFailed, StaleBlockNumber
from snet_daemon.blockchain.fake import FakeChainReader
from snet_daemon.blockchain.rpc import JsonRpcClient
from snet_daemon.config.model import DaemonConfig
from tests.support.aio import aio_fixture, aio_test, wait_for
from tests.support.chain import CLIENT, DEFAULT_GROUP_ID, PROVIDER, SIGNER, Anvil, Chain, chain  # noqa: F401


def reactor_clock() -> Clock:
    """The running reactor, typed as a clock."""
    from twisted.internet import reactor

    return reactor  # type: ignore[return-value]


def make_reader(
    url: str,
    *,
    mpe: str | None = None,
    max_age: float = 60.0,
    clock: Clock | None = None,
    network: str = "local",
    ttl: float | None = 300.0,
    recheck_after: float = 6.0,
    max_waiting_reads: int = 1024,
) -> EthereumChainReader:
    """A reader on ``url`` that retries fast; its ages run on ``clock`` when one is given."""
    now = clock.seconds if clock is not None else time.monotonic
    rpc = JsonRpcClient(url, now=reactor_clock().seconds, attempts=2, backoff=0.01, timeout=2.0)
    return EthereumChainReader(
        rpc,
        BlockNumber(max_age, now=now),
        now=now,
        network=network_info(network),
        mpe_address=mpe,
        channel_ttl=ttl,
        recheck_after=recheck_after,
        max_waiting_reads=max_waiting_reads,
    )


def test_block_number_age_bound() -> None:
    """The cached block number is refused before the first fetch and once older than the bound."""
    clock = Clock()
    blocks = BlockNumber(10, now=clock.seconds)
    with pytest.raises(StaleBlockNumber, match="not known yet"):
        blocks.current()
    blocks.update(42)
    clock.advance(10)
    assert blocks.current() == 42
    assert blocks.status().fresh
    clock.advance(0.5)
    with pytest.raises(StaleBlockNumber, match="42 is 10 s old"):
        blocks.current()
    assert blocks.status().age == 10.5
    assert not blocks.status().fresh


@aio_test
async def test_block_number_service_follows_anvil_mine(chain: Chain) -> None:  # noqa: F811
    """Polling keeps the cached block number fresh as blocks are mined."""
    reader = make_reader(chain.url)
    service = BlockNumberService(reader.blocks, reader.rpc, interval=0.05)
    service.startService()
    try:
        await wait_for(lambda: reader.blocks.status().number == chain.block_number())
        target = chain.mine(3)
        await wait_for(lambda: reader.blocks.status().number == target)
        assert reader.current_block() == target
        assert reader.block_status().source == "poll"
        assert reader.health().ok
    finally:
        await service.stopService().asFuture(asyncio.get_running_loop())
        await reader.rpc.close()


@aio_test
async def test_newheads_over_websocket(chain: Chain) -> None:  # noqa: F811
    """With a WebSocket endpoint, new blocks arrive through newHeads without waiting for a poll."""
    reader = make_reader(chain.url)
    service = BlockNumberService(reader.blocks, reader.rpc, interval=3600, ws_url=chain.anvil.ws_url)
    service.startService()
    try:
        await wait_for(lambda: service.ws_connected and reader.blocks.status().number is not None)
        target = chain.mine(2)
        await wait_for(lambda: reader.blocks.status().number == target)
        assert reader.block_status().source == "newHeads"
    finally:
        await service.stopService().asFuture(asyncio.get_running_loop())
        await reader.rpc.close()


@aio_test
async def test_a_block_number_that_stands_still_is_warned_of_once(chain: Chain) -> None:  # noqa: F811
    """anvil mines only when told to, so it answers as a node that stopped following the chain
    does: after STALL_WARNING seconds of one number the poll warns, once; when the number moves
    it says so, and a second stall is warned of again."""
    clock = Clock()
    reader = make_reader(chain.url, clock=clock, max_age=STALL_WARNING * 4)
    service = BlockNumberService(reader.blocks, reader.rpc, interval=60)

    async def polls(seconds: float) -> list[str]:
        """Poll every 60 s of the fake clock for ``seconds``; what was logged at info or above."""
        with capturedLogs() as events:
            for _ in range(int(seconds // 60)):
                clock.advance(60)
                await service._poll()
        return [formatEvent(event) for event in events if event["log_level"] >= LogLevel.info]

    try:
        assert await polls(STALL_WARNING - 60) == []
        (warning,) = await polls(STALL_WARNING)
        stood = chain.block_number()
        assert f"answered block number {stood} for 11 minutes" in warning
        assert "stopped following the chain" in warning
        assert reader.health().ok  # a warning, not a refusal: a quiet dev chain looks the same
        moved = chain.mine(1)
        assert await polls(60) == [f"the block number moves again: {moved} (it stood at {stood})"]
        assert await polls(STALL_WARNING - 60) == []
        (again,) = await polls(120)
        assert f"answered block number {moved} for 11 minutes" in again
    finally:
        await reader.rpc.close()


@aio_test
async def test_channel_read_and_cache(chain: Chain) -> None:  # noqa: F811
    """channels(id) is decoded, cached, refreshed on invalidation or fresh=True, and None when absent
    (kept for the block: see test_not_found_is_kept_for_one_block)."""
    channel_id = chain.open_channel(amount=1000, expiration=5000)
    reader = make_reader(chain.url, mpe=chain.mpe.address)
    try:
        info = await reader.channel(channel_id)
        assert info is not None
        assert (info.channel_id, info.nonce, info.value, info.expiration) == (channel_id, 0, 1000, 5000)
        assert (info.sender, info.signer, info.recipient) == (CLIENT.address, SIGNER.address, PROVIDER.address)
        assert info.group_id == DEFAULT_GROUP_ID
        assert await reader.channel(channel_id) is info
        assert (reader.cache_hits, reader.cache_misses) == (1, 1)

        chain.add_funds(channel_id, 500)
        assert (await reader.channel(channel_id)).value == 1000  # type: ignore[union-attr]
        fresh = await reader.channel(channel_id, fresh=True)
        assert fresh is not None
        assert fresh.value == 1500
        chain.extend(channel_id, 9000)
        reader.invalidate(channel_id)
        assert (await reader.channel(channel_id)).expiration == 9000  # type: ignore[union-attr]

        assert await reader.channel(channel_id + 100) is None
        assert await reader.channel(channel_id + 100) is None
        assert reader.cache_misses == 4  # "not found" is kept for the block
    finally:
        await reader.rpc.close()


@aio_test
async def test_not_found_is_kept_for_one_block(chain: Chain) -> None:  # noqa: F811
    """A made-up channel id costs one RPC per block, not one per request; a channel opened on chain
    is found as soon as the block number moves on, or ``recheck_after`` later at the latest."""
    clock = Clock()
    reader = make_reader(chain.url, mpe=chain.mpe.address, clock=clock, recheck_after=6.0)
    try:
        reader.blocks.update(chain.block_number())
        unknown = chain.open_channel() + 1  # the id the next channel gets
        for _ in range(5):
            assert await reader.channel(unknown) is None
        assert reader.cache_misses == 1
        assert chain.open_channel() == unknown
        assert await reader.channel(unknown) is None  # as far as we know, the same block
        reader.blocks.update(chain.block_number())
        assert await reader.channel(unknown) is not None
        assert reader.cache_misses == 2

        later = unknown + 1
        assert await reader.channel(later) is None
        assert chain.open_channel() == later
        clock.advance(6)
        assert await reader.channel(later) is None
        clock.advance(0.5)  # no new block seen, but a block poll interval has passed
        assert await reader.channel(later) is not None

        assert await reader.channel(later + 1) is None
        reader.invalidate(later + 1)
        assert await reader.channel(later + 1) is None
        assert await reader.channel(later + 1, fresh=True) is None
        assert reader.cache_misses == 7
    finally:
        await reader.rpc.close()


class SlowNode:
    """A JSON-RPC node whose ``eth_call`` (a channel that does not exist) waits for :attr:`gate`."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0
        outputs = list(function("MultiPartyEscrow", "channels").outputs)
        self.absent = "0x" + encode(outputs, [0, ZERO_ADDRESS, ZERO_ADDRESS, ZERO_ADDRESS, b"\0" * 32, 0, 0]).hex()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        result: str = "0x64"  # eth_blockNumber
        if body["method"] == "eth_call":
            self.calls += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                await self.gate.wait()
            finally:
                self.in_flight -= 1
            result = self.absent
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": result}, dumps=json.dumps)


@aio_fixture
async def slow_node() -> AsyncIterator[tuple[str, SlowNode]]:
    node = SlowNode()
    app = web.Application()
    app.router.add_post("/", node.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/", node
    node.gate.set()
    await runner.cleanup()


@aio_test
async def test_made_up_channels_leave_connections_to_the_block_poll(slow_node: tuple[str, SlowNode]) -> None:
    """200 reads of made-up channel ids on a node that has become slow: no more than 16 go to the
    node at once, so the block number poll still gets a connection at once (before, the reads
    took all 64 and the poll waited behind them until it timed out)."""
    url, node = slow_node
    reader = make_reader(url, mpe="0x" + "11" * 20)
    try:
        reads = [asyncio.ensure_future(reader.channel(channel_id)) for channel_id in range(1000, 1200)]
        await wait_for(lambda: node.in_flight >= 16)
        await asyncio.sleep(0.05)  # more would have arrived by now
        assert await asyncio.wait_for(reader.rpc.call("eth_blockNumber"), 1.0) == "0x64"
        node.gate.set()
        assert await asyncio.gather(*reads) == [None] * 200
        assert (node.calls, node.most_in_flight) == (200, 16)
    finally:
        await reader.rpc.close()


@aio_test
async def test_reads_beyond_the_waiting_limit_fail_at_once(slow_node: tuple[str, SlowNode]) -> None:
    """With 16 reads at the node and 4 more waiting, a read of another channel fails at once with
    ChainUnavailable instead of queueing behind them; a read of a channel already being read still
    shares that read; once the node answers, new reads are taken again."""
    url, node = slow_node
    reader = make_reader(url, mpe="0x" + "11" * 20, max_waiting_reads=4)
    try:
        reads = [asyncio.ensure_future(reader.channel(channel_id)) for channel_id in range(1000, 1020)]
        await wait_for(lambda: node.in_flight >= 16)
        with pytest.raises(ChainUnavailable, match="20 channel reads are waiting"):
            await reader.channel(2000)
        shared = asyncio.ensure_future(reader.channel(1019))  # queued, not refused
        node.gate.set()
        assert await asyncio.gather(*reads, shared) == [None] * 21
        assert node.calls == 20
        assert await reader.channel(2000) is None
        assert node.calls == 21
    finally:
        await reader.rpc.close()


@aio_test
async def test_channel_id_beyond_uint256_is_a_chain_error(slow_node: tuple[str, SlowNode]) -> None:
    """A channel id that does not fit the ABI's uint256 (from a client's bytes) is refused with
    ContractCallFailed, a ChainError the payment code answers, without asking the node; eth-abi's
    own error would reach the client as INTERNAL "internal error" with a traceback in the log."""
    url, node = slow_node
    reader = make_reader(url, mpe="0x" + "11" * 20)
    try:
        with pytest.raises(ContractCallFailed, match=r"channels\(\) cannot take these arguments"):
            await reader.channel(2**256)
        assert node.calls == 0
        node.gate.set()
        assert await reader.channel(2**256 - 1) is None  # the largest id is read as any other
    finally:
        await reader.rpc.close()


@aio_test
async def test_concurrent_reads_share_one_call(chain: Chain) -> None:  # noqa: F811
    """Concurrent reads of one uncached channel make one RPC call.  The caller that started it
    going away (its client cancelled) does not cancel it for the others."""
    channel_id = chain.open_channel()
    reader = make_reader(chain.url, mpe=chain.mpe.address)
    try:
        first = asyncio.ensure_future(reader.channel(channel_id))
        await asyncio.sleep(0)
        others = [asyncio.ensure_future(reader.channel(channel_id)) for _ in range(19)]
        await asyncio.sleep(0)
        first.cancel()
        results = await asyncio.gather(*others)
        assert first.cancelled()
        assert len({id(result) for result in results}) == 1
        assert results[0] is not None
        assert results[0].channel_id == channel_id
        assert reader.cache_misses == 1
    finally:
        await reader.rpc.close()


@aio_test
async def test_channel_ttl(chain: Chain) -> None:  # noqa: F811
    """A cached channel older than the TTL is read again."""
    channel_id = chain.open_channel(amount=10)
    clock = Clock()
    reader = make_reader(chain.url, mpe=chain.mpe.address, clock=clock, ttl=30)
    try:
        await reader.channel(channel_id)
        chain.add_funds(channel_id, 5)
        clock.advance(30)
        assert (await reader.channel(channel_id)).value == 10  # type: ignore[union-attr]
        clock.advance(1)
        assert (await reader.channel(channel_id)).value == 15  # type: ignore[union-attr]
    finally:
        await reader.rpc.close()


@aio_test
async def test_recheck_reads_a_view_older_than_recheck_after(chain: Chain) -> None:  # noqa: F811
    """A recheck (a claim is pending: it may land any block) reads a cached channel again once it
    is older than ``recheck_after``, even when the cache is otherwise trusted until invalidated."""
    channel_id = chain.open_channel(amount=10)
    clock = Clock()
    reader = make_reader(chain.url, mpe=chain.mpe.address, clock=clock, ttl=None, recheck_after=6.0)
    try:
        await reader.channel(channel_id)
        chain.add_funds(channel_id, 5)
        clock.advance(6)
        assert (await reader.channel(channel_id, recheck=True)).value == 10  # type: ignore[union-attr]
        clock.advance(0.5)
        assert (await reader.channel(channel_id)).value == 10  # type: ignore[union-attr]
        assert (await reader.channel(channel_id, recheck=True)).value == 15  # type: ignore[union-attr]
        assert (await reader.channel(channel_id, recheck=True)).value == 15  # type: ignore[union-attr]
        assert reader.cache_misses == 2
    finally:
        await reader.rpc.close()


@aio_test
async def test_mpe_from_metadata_and_token_balance(chain: Chain) -> None:  # noqa: F811
    """The MPE named by metadata is used (cache emptied on change); the token comes from MPE.token()."""
    reader = make_reader(chain.url)
    try:
        with pytest.raises(ChainError, match="no MultiPartyEscrow address"):
            await reader.channel(0)
        channel_id = chain.open_channel()
        reader.set_mpe_address(chain.mpe.address.lower())
        assert reader.mpe_address == chain.mpe.address
        assert await reader.channel(channel_id) is not None
        chain.mint(PROVIDER.address, 12345)
        assert await reader.token_balance(PROVIDER.address) == chain.token_balance(PROVIDER.address)
        assert await reader.token_address() == chain.token.address
        reader.set_mpe_address(chain.registry.address)  # another contract: the cache is dropped
        with pytest.raises(ChainError):
            await reader.channel(channel_id)
    finally:
        await reader.rpc.close()


@aio_test
async def test_configured_mpe_wins_over_metadata(chain: Chain) -> None:  # noqa: F811
    """mpe_contract_address, when configured, is not replaced by metadata."""
    reader = make_reader(chain.url, mpe=chain.mpe.address)
    reader.set_mpe_address(chain.registry.address)
    assert reader.mpe_address == chain.mpe.address
    await reader.rpc.close()


@aio_test
async def test_chain_id_mismatch_is_not_ready(chain: Chain) -> None:  # noqa: F811
    """A 'main' configuration pointed at another chain reports why it is not ready."""
    reader = make_reader(chain.url, network="main")
    try:
        reader.blocks.update(chain.block_number())
        await reader.check_chain_id()
        health = reader.health()
        assert not health.ok
        assert health.error is not None
        assert "chain id is 31337" in health.error
    finally:
        await reader.rpc.close()


@aio_test
async def test_rpc_down_and_back() -> None:
    """When the node goes away the daemon keeps the last block until it is too old, then recovers."""
    anvil = Anvil().start()
    reader = make_reader(anvil.url, max_age=0.3)
    service = BlockNumberService(reader.blocks, reader.rpc, interval=0.05)
    service.startService()
    try:
        await wait_for(lambda: reader.health().ok)
        anvil.stop()
        with pytest.raises(ChainUnavailable):
            await reader.rpc.call("eth_blockNumber")
        await wait_for(lambda: not reader.block_status().fresh)
        with pytest.raises(StaleBlockNumber, match="not answering"):
            reader.current_block()
        health = reader.health()
        assert not health.ok
        assert health.rpc.consecutive_failures >= 1
        assert health.error is not None
        assert "s old" in health.error

        anvil.start()  # same port
        await wait_for(lambda: reader.health().ok)
        assert reader.current_block() == 0
    finally:
        await service.stopService().asFuture(asyncio.get_running_loop())
        await reader.rpc.close()
        anvil.stop()


@aio_test
async def test_fake_reader_behaves_like_the_real_one() -> None:
    """The in-memory reader caches, invalidates, fails and goes stale like the real one."""
    fake = FakeChainReader(block=5)
    reader: ChainReader = fake  # both implementations satisfy the protocol (checked by mypy)
    real: ChainReader = make_reader("http://127.0.0.1:1")
    assert real.mpe_address is None
    info = ChannelInfo(1, 0, CLIENT.address, SIGNER.address, PROVIDER.address, DEFAULT_GROUP_ID, 100, 1000)
    fake.put_channel(info)
    assert await reader.channel(1) == info
    fake.set_channel_value(1, 150)
    assert (await reader.channel(1)).value == 100  # type: ignore[union-attr]
    reader.invalidate(1)
    assert (await reader.channel(1)).value == 150  # type: ignore[union-attr]
    assert await reader.channel(2) is None
    assert fake.reads == [1, 1, 2]
    fake.set_channel_value(1, 175)
    fake.now = 6.5
    assert (await reader.channel(1)).value == 150  # type: ignore[union-attr]
    assert (await reader.channel(1, recheck=True)).value == 175  # type: ignore[union-attr]
    fake.fail_with(ChainUnavailable("down"))
    with pytest.raises(ChainUnavailable):
        await reader.channel(3)
    assert not reader.health().ok
    fake.block_stale = True
    with pytest.raises(StaleBlockNumber):
        reader.current_block()


def built_chain(url: str, **keys: Any) -> tuple[EthereumChainReader, BlockNumberService]:
    """The reader and block service as :func:`build_chain` wires them for the daemon, on ``url``."""
    config = DaemonConfig(
        blockchain_network_selected="local",
        ethereum_json_rpc_http_endpoint=url,
        registry_address_key=PROVIDER.address,
        organization_id="org",
        service_id="svc",
        **keys,
    )
    components = build_chain(config.chain, reactor_clock())
    assert components.reader is not None
    root = components.services[0]
    assert isinstance(root, MultiService)
    blocks = root.getServiceNamed("chain-blocks")
    assert isinstance(blocks, BlockNumberService)
    return components.reader, blocks


@aio_test
async def test_wall_clock_stepped_back_neither_stops_polls_nor_keeps_the_block_fresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wall clock stepped back an hour (an NTP step, a VM resumed; under the asyncio reactor
    ``reactor.seconds()`` is ``time.time()``): polling goes on, and once the node stops answering
    the block number goes stale after ``block_max_age``, not an hour later."""
    anvil = Anvil().start()
    reader, service = built_chain(anvil.url, block_poll_interval="50ms", block_max_age="1s")
    service.startService()
    try:
        await wait_for(lambda: reader.blocks.status().number == 0)
        wall = reactor_clock().seconds
        monkeypatch.setattr(reactor_clock(), "seconds", lambda: wall() - 3600)
        await reader.rpc.call("evm_mine")
        await wait_for(lambda: reader.blocks.status().number == 1, within=2)
        anvil.stop()
        await wait_for(lambda: not reader.block_status().fresh, within=3)
        with pytest.raises(StaleBlockNumber, match="not answering"):
            reader.current_block()
    finally:
        await service.stopService().asFuture(asyncio.get_running_loop())
        await reader.rpc.close()
        anvil.stop()


@aio_test
async def test_wall_clock_stepped_forward_neither_ages_the_block_nor_the_channel_cache(
    chain: Chain,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wall clock stepped forward an hour: the block number just fetched is still fresh (payments
    are not refused as if the node had gone), and a channel just read is still served from the cache."""
    channel_id = chain.open_channel(amount=10)
    reader, service = built_chain(chain.url, mpe_contract_address=chain.mpe.address)
    try:
        block = await service.refresh()
        assert (await reader.channel(channel_id)).value == 10  # type: ignore[union-attr]
        chain.add_funds(channel_id, 5)
        wall = reactor_clock().seconds
        monkeypatch.setattr(reactor_clock(), "seconds", lambda: wall() + 3600)
        assert reader.current_block() == block
        assert reader.block_status().fresh
        assert (await reader.channel(channel_id)).value == 10  # type: ignore[union-attr]
    finally:
        await reader.rpc.close()
