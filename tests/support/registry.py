"""An in-memory Registry behind a JSON-RPC stub, with the habits of real providers.

anvil answers every request from one node with no limits; these tests need
what it cannot do: a provider that caps ``eth_getLogs`` ranges (QuickNode's
free plans allow 5 blocks), a load balancer whose nodes may be a block
behind the one that answered ``eth_blockNumber``, and exact control of the
block each poll sees.  :class:`FakeRegistryRpc` stands in for
:class:`~snet_daemon.blockchain.rpc.JsonRpcClient` under a real
:class:`~snet_daemon.blockchain.chain.EthereumChainReader` and
:class:`~snet_daemon.blockchain.registry.RegistryReader`, so the daemon's
own encoding of ``eth_call`` and ``eth_getLogs`` is what is exercised.

    rpc = FakeRegistryRpc(log_limit=5)
    source = metadata_source(rpc, clock)
    rpc.set_service_uri("svc-v2.json")   # a new block with the event
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast

from eth_abi.abi import decode, encode
from twisted.internet.task import Clock

from snet_daemon.blockchain.blocks import BlockNumber
from snet_daemon.blockchain.chain import EthereumChainReader
from snet_daemon.blockchain.contracts import ZERO_ADDRESS, NetworkInfo, event_topic, function, id_to_bytes32
from snet_daemon.blockchain.errors import ContractCallFailed
from snet_daemon.blockchain.loader import MetadataLoader
from snet_daemon.blockchain.refresh import MetadataSource
from snet_daemon.blockchain.registry import RegistryReader
from snet_daemon.blockchain.rpc import JsonRpcClient
from tests.support.chain import org_metadata, service_metadata

__all__ = ["MPE", "ORG", "REGISTRY", "SVC", "DocumentLoader", "FakeRegistryRpc", "metadata_source"]

ORG, SVC = "org", "svc"
MPE = "0x5e592F9b1d303183d963635f895f0f0C48284f4e"
REGISTRY = "0x" + "11" * 20

_GET_ORG = function("Registry", "getOrganizationById")
_GET_SERVICE = function("Registry", "getServiceRegistrationById")


@dataclass
class FakeRegistryRpc:
    """The Registry of one organisation and service, block by block.

    Attributes:
        head: The chain's latest block.
        log_limit: Most blocks one ``eth_getLogs`` may ask for (None: no cap).
        org_uris: ``(block, uri)`` in block order: the organisation's URI
            from that block on.
        service_uris: The same for the service.
        logs: Registry logs, as ``eth_getLogs`` returns them.
        junk_logs: Entries added to every ``eth_getLogs`` answer, whatever
            its range: what a broken provider may send (a pending log's
            ``blockNumber`` is null).
        get_logs: Every ``(fromBlock, toBlock)`` asked for, refused or not.
        refused: ``eth_getLogs`` requests refused for their range.
        call_blocks: The block parameter of every ``eth_call``.
        lagging_calls: That many next ``eth_call`` are answered by a node
            one block behind :attr:`head`: ``latest`` means its head, and a
            later block is unknown to it ("header not found"), as geth answers.
    """

    head: int = 1000
    log_limit: int | None = None
    org_uris: list[tuple[int, str]] = field(default_factory=lambda: [(0, "org.json")])
    service_uris: list[tuple[int, str]] = field(default_factory=lambda: [(0, "svc-v10.json")])
    logs: list[dict[str, Any]] = field(default_factory=list)
    junk_logs: list[Any] = field(default_factory=list)
    get_logs: list[tuple[int, int]] = field(default_factory=list)
    refused: int = 0
    call_blocks: list[int | str] = field(default_factory=list)
    lagging_calls: int = 0

    # -- the chain changing ----------------------------------------------------

    def mine(self, blocks: int = 1) -> int:
        """Add empty blocks; returns the new head."""
        self.head += blocks
        return self.head

    def set_service_uri(self, uri: str) -> int:
        """``updateServiceRegistration`` in a new block: the URI and a ServiceMetadataModified log."""
        block = self.mine()
        self.service_uris.append((block, uri))
        self.emit("ServiceMetadataModified", block, SVC)
        return block

    def emit(self, name: str, block: int, service: str | None = None) -> None:
        """Add a Registry log for our organisation (and ``service``) at ``block``."""
        self.logs.append(self.log(name, hex(block), service))

    def log(self, name: str, block: Any, service: str | None = None) -> dict[str, Any]:
        """A Registry log for our organisation (and ``service``) with ``block`` as its ``blockNumber``."""
        topics = [event_topic("Registry", name), "0x" + id_to_bytes32(ORG).hex()]
        if service is not None:
            topics.append("0x" + id_to_bytes32(service).hex())
        return {
            "address": REGISTRY,
            "topics": topics,
            "blockNumber": block,
            "transactionHash": "0x" + f"{len(self.logs) + 1:064x}",
        }

    # -- JsonRpcClient ---------------------------------------------------------

    async def call(self, method: str, params: Any = ()) -> Any:
        """Answer ``method`` as a node of the provider would."""
        if method == "eth_blockNumber":
            return hex(self.head)
        if method == "eth_getLogs":
            return self._get_logs(params[0])
        if method == "eth_call":
            return self._eth_call(params[0], params[1])
        raise ContractCallFailed(f"{method}: the method does not exist", -32601)

    async def close(self) -> None:
        """Nothing to close."""

    def _get_logs(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        start, end = int(query["fromBlock"], 16), int(query["toBlock"], 16)
        self.get_logs.append((start, end))
        if self.log_limit is not None and end - start + 1 > self.log_limit:
            self.refused += 1
            raise ContractCallFailed(f"eth_getLogs: eth_getLogs is limited to a {self.log_limit} range", -32614)
        return [log for log in self.logs if start <= int(log["blockNumber"], 16) <= end] + self.junk_logs

    def _eth_call(self, call: dict[str, Any], block: str) -> str:
        node_head = self.head
        if self.lagging_calls > 0:
            self.lagging_calls -= 1
            node_head -= 1
        self.call_blocks.append(block if block == "latest" else int(block, 16))
        at = node_head if block == "latest" else int(block, 16)
        if at > node_head:
            raise ContractCallFailed("eth_call: header not found", -32000)
        data = bytes.fromhex(call["data"][2:])
        if data[:4] == _GET_ORG.selector:
            values: tuple[Any, ...] = (True, id_to_bytes32(ORG), _at(self.org_uris, at), ZERO_ADDRESS, [], [])
            outputs = _GET_ORG.outputs
        elif data[:4] == _GET_SERVICE.selector:
            _, service = decode(list(_GET_SERVICE.inputs), data[4:])
            values = (True, service, _at(self.service_uris, at))
            outputs = _GET_SERVICE.outputs
        else:
            raise ContractCallFailed("eth_call: execution reverted", 3)
        return "0x" + encode(list(outputs), list(values)).hex()


def _at(history: list[tuple[int, str]], block: int) -> bytes:
    """The URI in force at ``block``."""
    return [uri for since, uri in history if since <= block][-1].encode()


class DocumentLoader:
    """Metadata documents by URI: ``org.json``, and ``svc-v<price>.json`` priced at that price."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    async def load(self, uri: str) -> bytes:
        """The document at ``uri``."""
        self.loaded.append(uri)
        if uri == "org.json":
            return json.dumps(org_metadata()).encode()
        price = int(uri.removeprefix("svc-v").removesuffix(".json"))
        return json.dumps(service_metadata(mpe_address=MPE, price=price)).encode()

    async def close(self) -> None:
        """Nothing to close."""


def metadata_source(
    rpc: FakeRegistryRpc, clock: Clock, *, event_interval: float = 30
) -> tuple[MetadataSource, BlockNumber, DocumentLoader]:
    """A MetadataSource over ``rpc``, its block cache and its loader.

    Nothing runs by itself: a test updates the block cache from ``rpc.head``
    and calls ``source._tick()`` for each poll.
    """
    blocks = BlockNumber(60, now=clock.seconds)
    blocks.update(rpc.head)
    reader = EthereumChainReader(
        cast(JsonRpcClient, rpc),
        blocks,
        now=clock.seconds,
        network=NetworkInfo(name="local", chain_id=None, registry=None, mpe=None, token=None),
    )
    loader = DocumentLoader()
    source = MetadataSource(
        loader=cast(MetadataLoader, loader),
        clock=clock,
        organization_id=ORG,
        service_id=SVC,
        group_name="default_group",
        registry=RegistryReader(reader, REGISTRY),
        blocks=blocks,
        event_interval=event_interval,
    )
    return source, blocks, loader
