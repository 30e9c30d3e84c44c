"""Wiring of the chain reader and the metadata source from configuration.

The composition root calls :func:`build_chain` once::

    chain = build_chain(config.chain, reactor)
    for service in chain.services:
        service.setServiceParent(root)
    # payment code: chain.reader (ChainReader), chain.metadata.current (DaemonMetadata)
    # heartbeat:    chain.readiness()

Configuration mistakes that no retry can fix (a custom network without an
endpoint or a Registry address) raise :class:`ConfigError` here, at startup;
:func:`plan_chain` finds them without building anything, for
``--check-config``.
Everything that can fail at run time (RPC down, IPFS down, bad metadata)
does not: the daemon starts, reports not-ready with the reason, and retries.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from snet_daemon.blockchain.blocks import BlockNumber, BlockNumberService
from snet_daemon.blockchain.chain import EthereumChainReader
from snet_daemon.blockchain.contracts import NetworkInfo, is_address, network_info
from snet_daemon.blockchain.errors import ChainError
from snet_daemon.blockchain.loader import MetadataLoader
from snet_daemon.blockchain.metadata import DaemonMetadata
from snet_daemon.blockchain.periodic import Periodic
from snet_daemon.blockchain.refresh import MetadataSource
from snet_daemon.blockchain.registry import RegistryReader
from snet_daemon.blockchain.rpc import JsonRpcClient, auth_header, redact_url
from snet_daemon.config.errors import ConfigError, ConfigProblem
from snet_daemon.config.sections import ChainSettings
from snet_daemon.lifecycle import OrderedMultiService

__all__ = ["ChainComponents", "ChainPlan", "Readiness", "build_chain", "plan_chain"]

_log = Logger(namespace="snetd.chain")

_INFURA = {"main": "https://mainnet.infura.io/v3/", "sepolia": "https://sepolia.infura.io/v3/"}
_LOCAL_DEFAULT = "http://127.0.0.1:8545"


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether payments can be served, and if not, why.

    Attributes:
        ready: Chain (when enabled) and metadata are usable.
        reasons: One line per problem, for the heartbeat and the log.
    """

    ready: bool
    reasons: tuple[str, ...]


@dataclass
class ChainComponents:
    """What :func:`build_chain` made.

    Attributes:
        reader: The chain reader, or None with ``blockchain_enabled: false``.
        metadata: The metadata source, or None when there is no metadata
            to load (blockchain disabled and no local URIs).
        services: Add each to the root service (one ``OrderedMultiService``
            named ``chain``, whose children stop one at a time so that the
            RPC pool closes last).  The root must stop it only after running
            calls have drained: they read channels through the RPC pool.
        registry_address: The Registry in use ("" when none); part of the
            heartbeat's daemon id.
    """

    reader: EthereumChainReader | None
    metadata: MetadataSource | None
    services: list[IService]
    registry_address: str

    def readiness(self) -> Readiness:
        """Readiness of the chain and the metadata, for the heartbeat."""
        reasons: list[str] = []
        if self.reader is not None:
            health = self.reader.health()
            if not health.ok:
                reasons.append(f"chain: {health.error}")
        if self.metadata is not None:
            status = self.metadata.status()
            if not status.ready:
                reasons.append(f"metadata: {status.error or 'not loaded yet'}")
        return Readiness(ready=not reasons, reasons=tuple(reasons))


class _ChainIdCheck(Service):
    """Checks ``eth_chainId`` every 15 s until the node answers, then stops checking.

    A mismatch is not checked again: it is a configuration mistake, shown by
    the heartbeat until the daemon is restarted with the right endpoint.
    """

    name = "chain-id"

    def __init__(self, reader: EthereumChainReader) -> None:
        self._reader = reader
        self._periodic = Periodic("chain id check", self._check, 15.0)

    async def _check(self) -> None:
        try:
            await self._reader.check_chain_id()
        except ChainError:
            return  # logged by the RPC client; try again later
        self._periodic.finish()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._periodic.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromFuture(asyncio.ensure_future(self._periodic.stop()))


class _Closer(Service):
    """Closes the JSON-RPC connection pool when the chain services stop."""

    name = "chain-rpc"

    def __init__(self, rpc: JsonRpcClient) -> None:
        self._rpc = rpc

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromFuture(asyncio.ensure_future(self._rpc.close()))


@dataclass(frozen=True, slots=True)
class ChainPlan:
    """What the chain settings resolve to, before anything connects.

    Attributes:
        network: The network's known addresses (none for a custom network).
        endpoint: The JSON-RPC HTTP URL.
        key_in_header: The API key goes in a header (not in the URL's path).
        registry: The Registry address ("" when local metadata URIs replace it).
    """

    network: NetworkInfo
    endpoint: str
    key_in_header: bool
    registry: str


def plan_chain(settings: ChainSettings) -> ChainPlan:
    """Resolve the chain settings, or say why no retry could ever make them work.

    Pure (no I/O).  :func:`build_chain` uses it, and so does the daemon's
    configuration check (``snet_daemon.tap.check_config``), which
    ``--check-config`` runs: a configuration ``--check-config`` passes
    cannot then be refused at startup for a reason it could have seen.

    Args:
        settings: ``config.chain``, with ``blockchain_enabled`` true.

    Raises:
        ConfigError: listing every problem (no usable JSON-RPC endpoint, a
            Registry address that is not one, no Registry at all).
    """
    problems: list[ConfigProblem] = []
    network = network_info(settings.network)
    endpoint, key_in_header = "", True
    if settings.http_endpoint:
        endpoint = settings.http_endpoint
    elif settings.network in _INFURA:
        if settings.api_key:
            endpoint, key_in_header = _INFURA[settings.network] + settings.api_key, False
        else:
            problems.append(
                ConfigProblem(
                    "configuration key 'ethereum_json_rpc_http_endpoint' is empty and there is no "
                    "'blockchain_provider_api_key' for the default Infura endpoint of network "
                    f"{settings.network!r}; set one of them",
                    "ethereum_json_rpc_http_endpoint",
                    "",
                )
            )
    elif settings.network == "local":
        endpoint = _LOCAL_DEFAULT
    else:
        problems.append(
            ConfigProblem(
                f"configuration key 'ethereum_json_rpc_http_endpoint' is required for network {settings.network!r} "
                "(only 'main' and 'sepolia' have defaults)",
                "ethereum_json_rpc_http_endpoint",
                "",
            )
        )
    registry = settings.registry_address or network.registry or ""
    if registry and not is_address(registry):
        problems.append(
            ConfigProblem(
                f"configuration key 'registry_address_key': {registry!r} is not an Ethereum address",
                "registry_address_key",
                registry,
            )
        )
    elif not registry and not (settings.organization_metadata_uri and settings.service_metadata_uri):
        problems.append(
            ConfigProblem(
                f"configuration key 'registry_address_key' is required for network {settings.network!r} "
                "(its Registry address is not known), unless both 'organization_metadata_uri' and "
                "'service_metadata_uri' are set",
                "registry_address_key",
                "",
            )
        )
    if problems:
        raise ConfigError(problems=tuple(problems))
    return ChainPlan(network=network, endpoint=endpoint, key_in_header=key_in_header, registry=registry)


def build_chain(
    settings: ChainSettings,
    reactor: IReactorTime,
    *,
    metadata_retry: float = 2.0,
) -> ChainComponents:
    """Build the chain reader, the metadata source and their services.

    Args:
        settings: ``config.chain``.
        reactor: The (asyncio) reactor: the wall clock of the timestamps
            health reports show.  Ages and polls use the monotonic clock.
        metadata_retry: Seconds before the first retry of a failed metadata
            load (doubling up to 60 s).

    Raises:
        ConfigError: the configuration cannot work whatever the network does
            (:func:`plan_chain`).
    """
    loader = MetadataLoader(
        ipfs_endpoint=settings.ipfs_endpoint,
        lighthouse_endpoint=settings.lighthouse_endpoint,
        timeout=settings.ipfs_timeout,
    )
    # What the metadata source needs with or without a chain.
    metadata_source = functools.partial(
        MetadataSource,
        loader=loader,
        clock=reactor,
        organization_id=settings.organization_id,
        service_id=settings.service_id,
        group_name=settings.group_name,
        organization_uri=settings.organization_metadata_uri,
        service_uri=settings.service_metadata_uri,
        retry_interval=metadata_retry,
    )
    root = OrderedMultiService("chain")
    if not settings.enabled:
        if not (settings.service_metadata_uri or settings.organization_metadata_uri):
            return ChainComponents(None, None, [], "")
        metadata = metadata_source(event_interval=0, require_organization=False)
        metadata.setServiceParent(root)  # type: ignore[no-untyped-call]
        return ChainComponents(None, metadata, [root], "")

    plan = plan_chain(settings)
    network, endpoint, key_in_header, registry = plan.network, plan.endpoint, plan.key_in_header, plan.registry
    rpc = JsonRpcClient(endpoint, now=reactor.seconds, api_key=settings.api_key if key_in_header else "")
    blocks = BlockNumber(settings.block_max_age)
    ws = settings.ws_endpoint or None
    block_service = BlockNumberService(
        blocks,
        rpc,
        interval=settings.block_poll_interval,
        ws_url=ws,
        ws_authorization=auth_header(ws, settings.api_key, websocket=True) if ws else None,
    )
    reader = EthereumChainReader(
        rpc,
        blocks,
        network=network,
        mpe_address=settings.mpe_address or None,
        recheck_after=settings.block_poll_interval,
    )
    metadata = metadata_source(
        registry=RegistryReader(reader, registry) if registry else None,
        blocks=blocks,
        event_interval=settings.metadata_refresh_interval,
    )

    def use_mpe(current: DaemonMetadata) -> None:
        if current.mpe_address:
            reader.set_mpe_address(current.mpe_address)

    metadata.subscribe(use_mpe)
    # Started in this order, stopped one at a time in reverse: the metadata
    # source and the block poller have stopped calling when the RPC pool closes.
    for child in (_Closer(rpc), block_service, _ChainIdCheck(reader), metadata):
        child.setServiceParent(root)  # type: ignore[no-untyped-call]
    _log.info(
        "chain: network {network}, JSON-RPC {endpoint}{ws}, Registry {registry}",
        network=settings.network,
        endpoint=redact_url(endpoint),
        ws=f", newHeads over {redact_url(ws)}" if ws else "",
        registry=registry or "(none: local metadata URIs)",
    )
    return ChainComponents(reader, metadata, [root], registry)
