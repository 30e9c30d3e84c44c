"""The chain side against a node that answers nonsense: typed chain errors, nothing stored."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import pytest
from eth_abi.abi import encode
from twisted.application.service import MultiService
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent

from snet_daemon.blockchain.blocks import STALL_WARNING, BlockNumber, BlockNumberService
from snet_daemon.blockchain.build import _ChainIdCheck, build_chain
from snet_daemon.blockchain.chain import EthereumChainReader
from snet_daemon.blockchain.contracts import ZERO_ADDRESS, function, network_info
from snet_daemon.blockchain.errors import ChainUnavailable, ContractCallFailed
from snet_daemon.blockchain.registry import RegistryReader
from snet_daemon.blockchain.rpc import JsonRpcClient, quantity
from snet_daemon.config.model import DaemonConfig
from tests.support.aio import aio_fixture, aio_test, wait_for
from tests.support.registry import MPE, REGISTRY
from tests.support.rpcnode import StubNode, serving

#: The block the reader knew before the node's bad answer.
KNOWN_BLOCK = 1000


@aio_fixture
async def node() -> AsyncIterator[tuple[str, StubNode]]:
    """A stub node on a free port, answering what the test sets."""
    stub = StubNode()
    async with serving(stub.handle) as url:
        yield url, stub


def reader_on(url: str, network: str = "local") -> EthereumChainReader:
    """A reader of ``url`` (no retries) whose block cache knows :data:`KNOWN_BLOCK`."""
    rpc = JsonRpcClient(url, now=lambda: 0.0, attempts=1, timeout=5.0)
    blocks = BlockNumber(60.0)
    blocks.update(KNOWN_BLOCK)
    return EthereumChainReader(rpc, blocks, network=network_info(network), mpe_address=MPE)


@pytest.mark.parametrize("value", ["0x0", "0x10", "0xAbC", "0x" + "f" * 16, "0x0000000000000001"])
def test_quantity_accepts_uint64_hex(value: str) -> None:
    """``0x`` and 1 to 16 hex digits, either case, is a quantity."""
    assert quantity(value, "test") == int(value, 16)


NOT_QUANTITIES = [None, 42, 1.5, ["0x1"], {"x": "0x1"}, "", "0x", "10", "latest", "0X10", "0x" + "f" * 17]
NOT_QUANTITIES += ["-0x10", "0x-10", "0x1_0", " 0x10", "0x10\n"]


@pytest.mark.parametrize("value", NOT_QUANTITIES)
def test_quantity_refuses_anything_else(value: Any) -> None:
    """Not a string, a sign, separators, blanks, no digits, or more than a uint64: a chain error."""
    with pytest.raises(ChainUnavailable, match=r"test: .* is not a quantity"):
        quantity(value, "test")


def test_quantity_error_shows_the_start_of_a_long_value() -> None:
    """The message quotes at most 40 characters of what the node sent."""
    with pytest.raises(ChainUnavailable) as caught:
        quantity("0x" + "f" * 80, "test")
    assert str(caught.value) == "test: '0x" + "f" * 34 + "... is not a quantity (0x and 1 to 16 hex digits)"


# A block number or chain id that int(x, 16) took (-16 would turn the expiry check off), or that
# escaped the ChainError contract as TypeError / ValueError.
GARBAGE_QUANTITIES = [None, 42, "latest", "-0x10", "0x" + "f" * 80, "0x1_0"]
GARBAGE_IDS = ["null", "number", "latest", "negative", "80 digits", "separator"]


@pytest.mark.parametrize("value", GARBAGE_QUANTITIES, ids=GARBAGE_IDS)
@aio_test
async def test_block_number_that_is_not_a_quantity_is_refused(node: tuple[str, StubNode], value: Any) -> None:
    """An eth_blockNumber answer that is not a uint64 in hex is a chain error, and the block number
    the reader knew stays (ageing towards stale) instead of being replaced."""
    url, stub = node
    stub.results["eth_blockNumber"] = value
    reader = reader_on(url)
    service = BlockNumberService(reader.blocks, reader.rpc, interval=60)
    try:
        with pytest.raises(ChainUnavailable, match=r"eth_blockNumber: .* is not a quantity"):
            await service.refresh()
        assert reader.current_block() == KNOWN_BLOCK
        with pytest.raises(ChainUnavailable, match=r"eth_blockNumber: .* is not a quantity"):
            await RegistryReader(reader, REGISTRY).latest_block()
    finally:
        await reader.rpc.close()


@pytest.mark.parametrize("value", GARBAGE_QUANTITIES, ids=GARBAGE_IDS)
@aio_test
async def test_chain_id_that_is_not_a_quantity_is_refused(node: tuple[str, StubNode], value: Any) -> None:
    """An eth_chainId answer that is not a quantity is a chain error (the check is tried again),
    not a chain id to compare."""
    url, stub = node
    stub.results["eth_chainId"] = value
    reader = reader_on(url, network="main")
    try:
        with pytest.raises(ChainUnavailable, match=r"eth_chainId: .* is not a quantity"):
            await reader.check_chain_id()
        assert reader.chain_id_error is None
    finally:
        await reader.rpc.close()


def test_newheads_that_are_not_numbers_are_refused() -> None:
    """A newHeads notification whose number is not a quantity ends the subscription (it is made
    again) instead of becoming the block number; one without a head object is ignored."""
    blocks = BlockNumber(60.0)
    blocks.update(KNOWN_BLOCK)
    service = BlockNumberService(blocks, JsonRpcClient("http://127.0.0.1:1", now=lambda: 0.0), interval=60)

    def head(result: Any) -> str:
        return json.dumps({"jsonrpc": "2.0", "method": "eth_subscription", "params": {"result": result}})

    for number in ("-0x10", None, "0x" + "f" * 80):
        with pytest.raises(ChainUnavailable, match=r"newHeads: .* is not a quantity"):
            service._on_message(head({"number": number}))
    service._on_message(head(None))
    service._on_message(json.dumps({"jsonrpc": "2.0", "method": "eth_subscription", "params": "junk"}))
    assert blocks.current() == KNOWN_BLOCK
    service._on_message(head({"number": "0x3e9"}))
    assert (blocks.current(), blocks.status().source) == (1001, "newHeads")


@pytest.mark.parametrize("result", [None, 42, ["0x1"], {"x": 1}])
@aio_test
async def test_eth_call_answer_that_is_not_hex_is_a_chain_error(node: tuple[str, StubNode], result: Any) -> None:
    """An eth_call result that is not a string is a ContractCallFailed (a chain error the payment
    code and the daemon's services handle), not an AttributeError reaching the front end."""
    url, stub = node
    stub.results["eth_call"] = result
    reader = reader_on(url)
    try:
        with pytest.raises(ContractCallFailed, match=f"channels\\(\\) returned {type(result).__name__} instead"):
            await reader.channel(7)
    finally:
        await reader.rpc.close()


@aio_test
async def test_eth_call_hex_answer_is_decoded(node: tuple[str, StubNode]) -> None:
    """The check lets a well-formed answer through: a channel without a sender is "not found"."""
    url, stub = node
    channels = function("MultiPartyEscrow", "channels")
    empty = [0, ZERO_ADDRESS, ZERO_ADDRESS, ZERO_ADDRESS, b"\0" * 32, 0, 0]
    stub.results["eth_call"] = "0x" + encode(list(channels.outputs), empty).hex()
    reader = reader_on(url)
    try:
        assert await reader.channel(7) is None
    finally:
        await reader.rpc.close()


def block_poll_logs(events: Sequence[LogEvent]) -> list[LogEvent]:
    """The block number service's log events."""
    return [event for event in events if event.get("log_namespace") == "snetd.chain.blocks"]


@pytest.mark.parametrize(
    ("answer", "cause"),
    [
        (
            {"code": -32601, "message": "method eth_blockNumber is not available"},
            "eth_blockNumber: method eth_blockNumber is not available",
        ),
        (None, "eth_blockNumber: None is not a quantity (0x and 1 to 16 hex digits)"),
    ],
    ids=["json-rpc error", "not a quantity"],
)
@aio_test
async def test_health_names_why_the_block_poll_fails(
    node: tuple[str, StubNode], answer: dict[str, Any] | None, cause: str
) -> None:
    """A node answering eth_blockNumber with a JSON-RPC error (the method disabled by the provider) or
    with something that is not a block number: the JSON-RPC client counts it as reachable, so the
    heartbeat named no cause.  Now the poll's error is named until a block number arrives; it is
    logged as a warning on the first failure and every tenth, without a traceback."""
    url, stub = node
    if answer is None:
        stub.results["eth_blockNumber"] = None
    else:
        stub.errors["eth_blockNumber"] = answer
    rpc = JsonRpcClient(url, now=lambda: 0.0, attempts=1, timeout=5.0)
    reader = EthereumChainReader(rpc, BlockNumber(60.0), network=network_info("local"))
    service = BlockNumberService(reader.blocks, rpc, interval=0.01)
    with capturedLogs() as events:
        service.startService()
        try:
            await wait_for(lambda: stub.calls["eth_blockNumber"] >= 12)
            health = reader.health()
            assert health.rpc.ok
            assert not health.ok
            assert health.error == f"current block number not known yet: {cause}"
            assert reader.block_status().error == cause
            stub.errors.clear()
            stub.results["eth_blockNumber"] = "0x10"
            await wait_for(lambda: reader.health().ok)
            assert reader.block_status().error is None
        finally:
            await service.stopService().asFuture(asyncio.get_running_loop())
            await rpc.close()
    *logged, recovered = block_poll_logs(events)
    assert formatEvent(recovered).startswith("block number poll works again")
    assert recovered["failures"] >= 11
    failed = [event for event in logged if event["log_level"] == LogLevel.warn]
    assert [event["failures"] for event in failed] == [1, *range(10, recovered["failures"] + 1, 10)]
    assert cause in formatEvent(failed[0])
    assert not [event for event in logged if "log_failure" in event]


class BrokenRpc:
    """A JSON-RPC client with a bug: every call raises something that is not a chain error."""

    async def call(self, method: str, params: Sequence[Any] = ()) -> Any:
        """Fail the way a bug does."""
        raise RuntimeError(f"bug in {method}")


@aio_test
async def test_unexpected_block_poll_errors_are_logged_with_a_traceback_now_and_then() -> None:
    """A bug in the poll (not a chain error) is named for the heartbeat and logged with its traceback
    on the first failure and every tenth, not on every tick."""
    blocks = BlockNumber(60.0)
    service = BlockNumberService(blocks, cast(JsonRpcClient, BrokenRpc()), interval=60)
    with capturedLogs() as events:
        for _ in range(25):
            await service._poll()
    logged = block_poll_logs(events)
    assert [event["failures"] for event in logged] == [1, 10, 20]
    assert all("log_failure" in event for event in logged)
    assert blocks.status().error == "unexpected RuntimeError: bug in eth_blockNumber"


@aio_test
async def test_chain_id_is_checked_until_the_node_answers_then_no_more(node: tuple[str, StubNode]) -> None:
    """The daemon's chain id check asks eth_chainId once the node answers, and then stops its loop
    (it used to wake every 15 s for the life of the daemon, doing nothing)."""
    url, stub = node
    stub.results["eth_chainId"] = "0x1"
    config = DaemonConfig(blockchain_network_selected="main", ethereum_json_rpc_http_endpoint=url)
    from twisted.internet import reactor  # the running one (pytest-twisted installed it)

    components = build_chain(config.chain, reactor)
    assert components.reader is not None
    root = components.services[0]
    assert isinstance(root, MultiService)
    check = root.getServiceNamed("chain-id")
    assert isinstance(check, _ChainIdCheck)
    check.startService()
    try:
        await wait_for(lambda: not check._periodic.running)
        assert stub.calls["eth_chainId"] == 1
        assert components.reader.chain_id_error is None
    finally:
        await check.stopService().asFuture(asyncio.get_running_loop())
        await components.reader.rpc.close()


class OutageRpc:
    """A node that answers :data:`KNOWN_BLOCK` until ``down``, then cannot be reached."""

    def __init__(self) -> None:
        self.down = False

    async def call(self, method: str, params: Sequence[Any] = ()) -> Any:
        if self.down:
            raise ChainUnavailable("http://node: connection refused")
        return hex(KNOWN_BLOCK)


@aio_test
async def test_an_outage_is_not_taken_for_a_stalled_node() -> None:
    """While polls fail the number stands still because nobody answers: the outage's own warnings
    say so, and no stall warning is added; a node that comes back still on the old number, though,
    has stalled."""
    clock = [0.0]
    blocks = BlockNumber(STALL_WARNING * 4, now=lambda: clock[0])
    rpc = OutageRpc()
    service = BlockNumberService(blocks, cast(JsonRpcClient, rpc), interval=60)
    await service._poll()
    rpc.down = True
    with capturedLogs() as events:
        for _ in range(20):
            clock[0] += 60
            await service._poll()
    logged = [formatEvent(event) for event in block_poll_logs(events)]
    assert len(logged) == 3  # the first failure, the tenth and the twentieth
    assert all("block number poll failed" in text for text in logged)
    rpc.down = False
    with capturedLogs() as events:
        await service._poll()
    logged = [formatEvent(event) for event in block_poll_logs(events)]
    assert logged[0] == "block number poll works again after 20 failures"
    assert f"answered block number {KNOWN_BLOCK} for 20 minutes" in logged[1]
