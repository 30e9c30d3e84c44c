"""Ethereum, the Registry and metadata: what the payment code knows about the world.

* :mod:`~snet_daemon.blockchain.chain` -- :class:`ChainReader` (block number,
  MPE channels, token balances) and its JSON-RPC implementation;
* :mod:`~snet_daemon.blockchain.blocks` -- the block number kept fresh by a Service;
* :mod:`~snet_daemon.blockchain.metadata` -- typed organisation/service
  metadata, resolved for the daemon's group, and pricing;
* :mod:`~snet_daemon.blockchain.loader` and :mod:`~snet_daemon.blockchain.cid`
  -- metadata URIs to bytes, verified against their CIDs;
* :mod:`~snet_daemon.blockchain.refresh` -- the metadata source, reloaded on
  SIGHUP and Registry events;
* :mod:`~snet_daemon.blockchain.build` -- :func:`build_chain`, called by the
  composition root;
* :mod:`~snet_daemon.blockchain.fake` -- an in-memory :class:`ChainReader`
  that keeps the real one's contract, for tests.
"""

from snet_daemon.blockchain.blocks import BlockNumber, BlockStatus
from snet_daemon.blockchain.build import ChainComponents, Readiness, build_chain
from snet_daemon.blockchain.chain import ChainHealth, ChainReader, ChannelInfo, EthereumChainReader
from snet_daemon.blockchain.errors import (
    ChainError,
    ChainUnavailable,
    ContractCallFailed,
    MetadataError,
    MetadataFetchError,
    PriceNotDefined,
    RateLimited,
    StaleBlockNumber,
)
from snet_daemon.blockchain.metadata import DaemonMetadata, Pricing
from snet_daemon.blockchain.refresh import MetadataSource, MetadataStatus

__all__ = [
    "BlockNumber",
    "BlockStatus",
    "ChainComponents",
    "ChainError",
    "ChainHealth",
    "ChainReader",
    "ChainUnavailable",
    "ChannelInfo",
    "ContractCallFailed",
    "DaemonMetadata",
    "EthereumChainReader",
    "MetadataError",
    "MetadataFetchError",
    "MetadataSource",
    "MetadataStatus",
    "PriceNotDefined",
    "Pricing",
    "RateLimited",
    "Readiness",
    "StaleBlockNumber",
    "build_chain",
]
