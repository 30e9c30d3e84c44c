"""An in-memory :class:`~snet_daemon.blockchain.chain.ChainReader`, for code that reads the chain in tests.

It honours the real reader's contract (checked side by side with it in
``tests/test_blockchain_chain.py``): the cached block number may be stale,
"not found" is None, and a read through the cache returns what was cached
until :meth:`invalidate` (a recheck: until it is older than
``recheck_after``).  (The payment code's own tests use
``tests/support/payments.FakeChain`` instead, which counts fresh reads and
fails block and channel reads separately.)

    chain = FakeChainReader(block=100)
    chain.put_channel(ChannelInfo(...))
    chain.set_channel_value(7, 2000)     # on-chain change the cache does not see yet
    chain.fail_with(ChainUnavailable("down"))
"""

from __future__ import annotations

from dataclasses import replace

from snet_daemon.blockchain.blocks import BlockStatus
from snet_daemon.blockchain.chain import ChainHealth, ChannelInfo
from snet_daemon.blockchain.errors import ChainError, StaleBlockNumber
from snet_daemon.blockchain.rpc import RpcHealth

__all__ = ["FakeChainReader"]


class FakeChainReader:
    """A chain held in dictionaries, with a cache that behaves like the real one.

    Args:
        block: The current block number (None: not known yet).
        mpe_address: What :attr:`mpe_address` reports.

    Attributes:
        reads: Channel ids read from the "chain" (cache misses), in order.
        now: The time cached channels age by (tests move it on).
        recheck_after: Age after which a recheck reads a channel again.
    """

    def __init__(self, block: int | None = 0, mpe_address: str | None = "0x" + "00" * 19 + "01") -> None:
        self.block: int | None = block
        self.block_stale = False
        self._mpe = mpe_address
        self.chain_channels: dict[int, ChannelInfo] = {}
        self.balances: dict[str, int] = {}
        self._cache: dict[int, tuple[ChannelInfo, float]] = {}
        self.now = 0.0
        self.recheck_after = 6.0
        self._failure: ChainError | None = None
        self.reads: list[int] = []

    # -- driving the fake ----------------------------------------------------------

    def put_channel(self, channel: ChannelInfo) -> None:
        """Create or replace a channel on the "chain" (the cache is not told)."""
        self.chain_channels[channel.channel_id] = channel

    def set_channel_value(self, channel_id: int, value: int) -> None:
        """Change a channel's value on the "chain" (e.g. the sender added funds)."""
        self.chain_channels[channel_id] = replace(self.chain_channels[channel_id], value=value)

    def fail_with(self, error: ChainError | None) -> None:
        """Make every chain read raise ``error`` (None: stop failing)."""
        self._failure = error

    # -- ChainReader ---------------------------------------------------------------

    @property
    def mpe_address(self) -> str | None:
        """See :meth:`ChainReader.mpe_address`."""
        return self._mpe

    def current_block(self) -> int:
        """See :meth:`ChainReader.current_block`."""
        if self.block is None or self.block_stale:
            raise StaleBlockNumber("current block number is not known (fake)")
        return self.block

    def block_status(self) -> BlockStatus:
        """See :meth:`ChainReader.block_status`."""
        fresh = self.block is not None and not self.block_stale
        return BlockStatus(number=self.block, age=0.0 if fresh else None, max_age=60.0, fresh=fresh, source="fake")

    async def channel(self, channel_id: int, *, fresh: bool = False, recheck: bool = False) -> ChannelInfo | None:
        """See :meth:`ChainReader.channel` ("not found" is not cached here)."""
        cached = self._cache.get(channel_id)
        if not fresh and cached is not None and not (recheck and self.now - cached[1] > self.recheck_after):
            return cached[0]
        if self._failure is not None:
            raise self._failure
        self.reads.append(channel_id)
        info = self.chain_channels.get(channel_id)
        if info is not None:
            self._cache[channel_id] = (info, self.now)
        return info

    def invalidate(self, channel_id: int | None = None) -> None:
        """See :meth:`ChainReader.invalidate`."""
        if channel_id is None:
            self._cache.clear()
        else:
            self._cache.pop(channel_id, None)

    async def token_balance(self, address: str) -> int:
        """See :meth:`ChainReader.token_balance`."""
        if self._failure is not None:
            raise self._failure
        return self.balances.get(address.lower(), 0)

    def health(self) -> ChainHealth:
        """See :meth:`ChainReader.health`."""
        blocks = self.block_status()
        error = None if blocks.fresh and self._failure is None else str(self._failure or "block number stale")
        rpc = RpcHealth(
            endpoint="fake",
            ok=self._failure is None,
            last_success=None,
            last_error=None if self._failure is None else str(self._failure),
            consecutive_failures=0 if self._failure is None else 1,
        )
        return ChainHealth(ok=error is None, rpc=rpc, blocks=blocks, error=error)
