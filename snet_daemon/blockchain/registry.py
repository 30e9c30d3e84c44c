"""The SingularityNET Registry: where metadata URIs and their change events live."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from twisted.logger import Logger

from snet_daemon.blockchain.chain import EthereumChainReader
from snet_daemon.blockchain.contracts import event_topic, function, id_to_bytes32
from snet_daemon.blockchain.errors import ChainError, ChainUnavailable, ContractCallFailed, MetadataError
from snet_daemon.blockchain.loader import clean_uri
from snet_daemon.blockchain.rpc import quantity

__all__ = ["ORG_EVENTS", "SERVICE_EVENTS", "RegistryEvent", "RegistryReader"]

_GET_ORG = function("Registry", "getOrganizationById")
_GET_SERVICE = function("Registry", "getServiceRegistrationById")

#: Events that change what an organisation's metadata URI resolves to.
ORG_EVENTS = ("OrganizationModified", "OrganizationDeleted", "OrganizationCreated")
#: Events that change a service's metadata URI (topic 2 is the service id).
SERVICE_EVENTS = ("ServiceMetadataModified", "ServiceCreated", "ServiceDeleted")

_TOPICS = {event_topic("Registry", name): name for name in ORG_EVENTS + SERVICE_EVENTS}

_log = Logger(namespace="snetd.metadata")

#: Most blocks asked for in one ``eth_getLogs`` (providers cap the range).
MAX_LOG_RANGE = 2000
#: Successful :meth:`RegistryReader.changes` calls after which a span made
#: smaller by a refusal is doubled again (see there).
_GROW_AFTER: Final = 50


@dataclass(frozen=True, slots=True)
class RegistryEvent:
    """A Registry event concerning our organisation or service.

    Attributes:
        name: Event name (``OrganizationModified``...).
        block: Block it was emitted in.
        transaction: Transaction hash.
    """

    name: str
    block: int
    transaction: str


class RegistryReader:
    """Reads metadata URIs from the Registry and finds their changes.

    Args:
        chain: For ``eth_call`` / ``eth_getLogs``.
        address: The Registry contract.
    """

    def __init__(self, chain: EthereumChainReader, address: str) -> None:
        self._chain = chain
        self.address = address
        self._log_span = MAX_LOG_RANGE
        self._calls_since_refusal = 0

    async def latest_block(self) -> int:
        """The node's latest block number (asked directly, not from the cache).

        Raises:
            ChainError: the node could not be asked, or its answer is not
                a block number.
        """
        return quantity(await self._chain.rpc.call("eth_blockNumber"), "eth_blockNumber")

    async def organization_uri(self, org_id: str, *, block: int | None = None) -> str:
        """The organisation's metadata URI, cleaned (see :func:`clean_uri`).

        Args:
            org_id: The organisation.
            block: Read at this block (None: the latest).

        Raises:
            MetadataError: the organisation is not registered.
            ChainError: the Registry could not be read (also: the node
                answering does not have ``block`` yet).
        """
        found, _, uri, *_ = await self._chain.call(self.address, _GET_ORG, id_to_bytes32(org_id), block=block)
        if not found:
            raise MetadataError(
                f"organization {org_id!r} (organization_id) is not registered in Registry {self.address}"
            )
        return clean_uri(uri)

    async def service_uri(self, org_id: str, service_id: str, *, block: int | None = None) -> str:
        """The service's metadata URI, cleaned.

        Args:
            org_id: The organisation.
            service_id: The service.
            block: Read at this block (None: the latest).

        Raises:
            MetadataError: the service is not registered.
            ChainError: the Registry could not be read (also: the node
                answering does not have ``block`` yet).
        """
        found, _, uri = await self._chain.call(
            self.address, _GET_SERVICE, id_to_bytes32(org_id), id_to_bytes32(service_id), block=block
        )
        if not found:
            raise MetadataError(
                f"service {service_id!r} (service_id) of organization {org_id!r} is not registered "
                f"in Registry {self.address}"
            )
        return clean_uri(uri)

    async def changes(self, org_id: str, service_id: str, from_block: int, to_block: int) -> list[RegistryEvent]:
        """Registry events for our organisation, or our service, in a block range.

        The range is asked for in chunks of at most :data:`MAX_LOG_RANGE`
        blocks.  Providers cap ``eth_getLogs`` ranges far below that
        (QuickNode's free plans at 5 blocks, while every poll asks for at
        least 13), each with its own error text, so any JSON-RPC error
        answer (:class:`ContractCallFailed`; not an outage, which raises at
        once) to a request for more than one block halves the chunk and asks
        again, down to one block.  The span that worked is kept for the next
        calls; as the refusal may have been a passing one (a node behind a
        load balancer that does not have the last block yet), it is doubled
        again after :data:`_GROW_AFTER` calls without a refusal.

        Raises:
            ChainError: the logs could not be read, even one block at a time.
        """
        org_topic = "0x" + id_to_bytes32(org_id).hex()
        service_topic = "0x" + id_to_bytes32(service_id).hex()
        events: list[RegistryEvent] = []
        start = from_block
        while start <= to_block:
            end = min(to_block, start + self._log_span - 1)
            try:
                logs = await self._get_logs(start, end, org_topic)
            except ContractCallFailed as exc:
                if end == start:
                    raise ContractCallFailed(
                        f"eth_getLogs refused even a single block ({start}): {exc}", exc.code
                    ) from exc
                self._log_span = max(1, (end - start + 1) // 2)
                self._calls_since_refusal = 0
                _log.info(
                    "eth_getLogs refused {blocks} blocks ({error}); asking for {span} at a time",
                    blocks=end - start + 1,
                    error=exc,
                    span=self._log_span,
                )
                continue
            events.extend(self._events(logs, service_topic))
            start = end + 1
        self._calls_since_refusal += 1
        if self._log_span < MAX_LOG_RANGE and self._calls_since_refusal >= _GROW_AFTER:
            self._log_span = min(MAX_LOG_RANGE, self._log_span * 2)
            self._calls_since_refusal = 0
        return events

    @property
    def log_span(self) -> int:
        """Blocks asked for in one ``eth_getLogs`` now (smaller after a provider refused more)."""
        return self._log_span

    async def _get_logs(self, start: int, end: int, org_topic: str) -> list[Any]:
        logs = await self._chain.rpc.call(
            "eth_getLogs",
            [
                {
                    "address": self.address,
                    "fromBlock": hex(start),
                    "toBlock": hex(end),
                    "topics": [list(_TOPICS), org_topic],
                }
            ],
        )
        if not isinstance(logs, list):
            raise ChainError(f"eth_getLogs returned {type(logs).__name__}, not a list")
        return logs

    @staticmethod
    def _events(logs: list[Any], service_topic: str) -> list[RegistryEvent]:
        """Our events among ``logs``; malformed entries are skipped with a warning.

        Skipped rather than failing the whole answer: a failure would leave
        the poll position where it is, so the same range -- and the same
        entry -- would fail every poll, and no later event would ever be
        seen.  A log not yet in a block (``blockNumber`` null, as nodes
        answer for pending ones) is seen again by a later poll, which scans
        the last blocks again.
        """
        events: list[RegistryEvent] = []
        for log in logs:
            raw_topics = log.get("topics", []) if isinstance(log, dict) else None
            if not isinstance(raw_topics, list):
                _log.warn("eth_getLogs: skipped a malformed log entry {entry}", entry=repr(log)[:200])
                continue
            topics = [str(topic).lower() for topic in raw_topics]
            name = _TOPICS.get(topics[0]) if topics else None
            if name is None:
                continue
            if name in SERVICE_EVENTS and (len(topics) < 3 or topics[2] != service_topic):
                continue  # another service of our organisation
            try:
                block = quantity(log.get("blockNumber"), f"eth_getLogs {name} blockNumber")
            except ChainUnavailable as exc:
                _log.warn("eth_getLogs: skipped a log: {error}", error=exc)
                continue
            events.append(RegistryEvent(name=name, block=block, transaction=str(log.get("transactionHash", ""))))
        return events
