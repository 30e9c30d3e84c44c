"""The daemon's read-only view of the chain: block number, channels, balances.

:class:`ChainReader` is the seam the payment code depends on;
:class:`EthereumChainReader` implements it over JSON-RPC and
:class:`snet_daemon.blockchain.fake.FakeChainReader` in memory.

Channel state is cached.  The Go daemon reads ``channels(id)`` on every paid
call (its issue #179); here a channel is read once and served from memory
until one of these makes it be read again:

* the payment code asks for a fresh read, when a check fails in a way a
  newer chain state could fix (a nonce the cache does not expect, more than
  the cached value, a channel near its expiration);
* the payment code asks for a recheck because a claim it knows of is
  pending on the channel: such a claim may land any block, and one with
  ``isSendback`` empties the channel while every check still passes against
  the old view.  An entry older than ``recheck_after`` (one
  ``block_poll_interval``) is then read again, so payments are checked
  against a landed claim within about one block poll interval, at the
  cost of one RPC per channel in use and interval while claims are pending;
* the entry is older than :data:`CHANNEL_TTL`, a backstop for changes no
  check notices;
* the MPE contract changes (the whole cache is emptied).

"Not found" is cached too, briefly: the ids are the caller's to choose and
come before any authentication, so without it every request naming a
made-up channel would cost an RPC.  It is kept only while the block number
is the one it was read at, and never longer than ``recheck_after``: a
channel opened on chain is found at most one block poll interval later
even if its id was asked for just before (the real clients only learn the
id from the mined transaction, so they normally never meet this delay).
Concurrent reads of one channel share one RPC call, and at most
:data:`_CHANNEL_READS` cache misses are read at once, so a flood of
made-up ids cannot take all the JSON-RPC connections from the block number
poll and the Registry reads.  At most ``max_waiting_reads`` more wait for
their turn; beyond that a read fails at once with :class:`ChainUnavailable`
instead of queueing without bound while the node is slow.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from eth_utils.address import to_checksum_address
from twisted.logger import Logger

from snet_daemon.blockchain.blocks import BlockNumber, BlockStatus
from snet_daemon.blockchain.contracts import AbiFunction, NetworkInfo, function
from snet_daemon.blockchain.errors import ChainError, ChainUnavailable, ContractCallFailed
from snet_daemon.blockchain.rpc import JsonRpcClient, RpcHealth, quantity

__all__ = ["ChainHealth", "ChainReader", "ChannelInfo", "EthereumChainReader"]

_log = Logger(namespace="snetd.chain")

_CHANNELS = function("MultiPartyEscrow", "channels")
_MPE_TOKEN = function("MultiPartyEscrow", "token")
_BALANCE_OF = function("FetchToken", "balanceOf")

#: Seconds a cached channel is trusted when nothing else makes it be read
#: again (see the module docstring).  Not configurable (the Go daemon has
#: no such key, it caches nothing): with pending claims rechecked, it is
#: only a backstop for a change no payment check notices, such as a claim
#: sent to the chain without ``StartClaim``, which no daemon knows of.
CHANNEL_TTL: Final = 300.0
#: Most channel reads (cache misses) sent to the node at once; more wait
#: their turn.  The JSON-RPC client has 64 connections: this leaves most
#: of them to the block number poll, Registry reads and token balances,
#: and 16 reads of ~50 ms each still find hundreds of channels a second.
_CHANNEL_READS: Final = 16
#: Most cache misses waiting for one of the :data:`_CHANNEL_READS` places
#: (default of ``max_waiting_reads``).  At ~50 ms a read they are served
#: within about 3 s by a healthy node; a longer queue only means the node
#: is slow or someone is sending made-up ids faster than it answers.
_WAITING_READS: Final = 1024
#: Most "not found" answers kept (least recently asked are dropped first).
_ABSENT_LIMIT: Final = 10_000


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """A payment channel as the MPE contract holds it.

    Attributes:
        channel_id: The channel.
        nonce: Incremented by each on-chain claim.
        sender: Who funded the channel (checksummed).
        signer: Who may sign payments besides the sender (checksummed).
        recipient: The provider's payment address (checksummed).
        group_id: The provider group, 32 bytes.
        value: Cogs still locked in the channel.
        expiration: Block after which the sender may take the funds back.
    """

    channel_id: int
    nonce: int
    sender: str
    signer: str
    recipient: str
    group_id: bytes
    value: int
    expiration: int


@dataclass(frozen=True, slots=True)
class ChainHealth:
    """The chain as the heartbeat and readiness see it.

    Attributes:
        ok: The block number is fresh and the last RPC call succeeded.
        rpc: The JSON-RPC endpoint's state.
        blocks: The cached block number's state.
        error: Why not ``ok`` (for people), or None.
    """

    ok: bool
    rpc: RpcHealth
    blocks: BlockStatus
    error: str | None


class ChainReader(Protocol):
    """What the payment code reads from the chain.

    Every method documents the errors it raises; none of them retries on its
    own beyond what the JSON-RPC client already did.
    """

    @property
    def mpe_address(self) -> str | None:
        """The MultiPartyEscrow contract in use (checksummed), or None before metadata names it."""

    def current_block(self) -> int:
        """The latest block number, from the cache, without I/O.

        Raises:
            StaleBlockNumber: unknown yet, or older than the configured bound.
        """

    def block_status(self) -> BlockStatus:
        """The cached block number with its age."""

    async def channel(self, channel_id: int, *, fresh: bool = False, recheck: bool = False) -> ChannelInfo | None:
        """The channel's on-chain state, from the cache unless ``fresh``.

        Args:
            fresh: read the chain, whatever the cache holds.
            recheck: the caller expects the channel to change on chain soon
                (a claim it knows of may land any block): a cached entry
                older than about one block poll interval is read again.

        Returns:
            The channel, or None when the contract has no such channel
            (its ``sender`` is the zero address).  "Not found" is cached
            only until the block number changes, and at most about one
            block poll interval.

        Raises:
            ChainUnavailable: the node could not be reached (after retries).
            ChainError: no MPE address is known yet, the answer was garbage,
                or ``channel_id`` is no uint256 (``ContractCallFailed``).
        """

    def invalidate(self, channel_id: int | None = None) -> None:
        """Forget the cached state of one channel (or of all, with None)."""

    async def token_balance(self, address: str) -> int:
        """The FET/ASI token balance of ``address``, in cogs (never cached).

        Raises:
            ChainUnavailable: the node could not be reached.
            ChainError: the token address cannot be determined.
        """

    def health(self) -> ChainHealth:
        """Readiness of the chain side, for the heartbeat."""


class EthereumChainReader:
    """:class:`ChainReader` over Ethereum JSON-RPC.

    Args:
        rpc: The JSON-RPC client.
        blocks: The block number cache (kept fresh by a
            :class:`~snet_daemon.blockchain.blocks.BlockNumberService`).
        network: Known addresses of the selected network.
        mpe_address: A configured MPE address (``mpe_contract_address``);
            when None, the one service metadata names (:meth:`set_mpe_address`)
            is used, and before that the network's known one.
        channel_ttl: Seconds a cached channel is trusted without an
            invalidation (:data:`CHANNEL_TTL`); None trusts it until
            invalidated.
        recheck_after: Seconds after which a cached channel is read again
            when the caller asks for a recheck, and a "not found" is
            forgotten (``block_poll_interval``: the block number cannot
            show a newer chain any sooner).
        cache_size: Most channels kept (least recently used ones are dropped).
        max_waiting_reads: Most cache misses queued behind the
            :data:`_CHANNEL_READS` being read; more fail at once.
        now: Monotonic clock of cache ages, in seconds (tests pass a fake).
    """

    def __init__(
        self,
        rpc: JsonRpcClient,
        blocks: BlockNumber,
        *,
        network: NetworkInfo,
        mpe_address: str | None = None,
        channel_ttl: float | None = CHANNEL_TTL,
        recheck_after: float = 6.0,
        cache_size: int = 100_000,
        max_waiting_reads: int = _WAITING_READS,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpc = rpc
        self.blocks = blocks
        self.network = network
        self._now = now
        self._configured_mpe = to_checksum_address(mpe_address) if mpe_address else None
        # Until service metadata names one, the network's known MPE (if any).
        self._mpe = self._configured_mpe or network.mpe
        self._token: str | None = network.token
        self._ttl = channel_ttl
        self._recheck_after = recheck_after
        self._cache_size = cache_size
        self._max_reads = _CHANNEL_READS + max_waiting_reads
        self._channels: OrderedDict[int, tuple[ChannelInfo, float]] = OrderedDict()
        #: Channels found absent: the block number and the time of the read.
        self._absent: OrderedDict[int, tuple[int | None, float]] = OrderedDict()
        self._reads = asyncio.Semaphore(_CHANNEL_READS)
        self._inflight: dict[int, asyncio.Future[ChannelInfo | None]] = {}
        self.chain_id_error: str | None = None
        #: Channel reads served from the cache / from the node (for metrics and tests).
        self.cache_hits = 0
        self.cache_misses = 0

    # -- addresses -----------------------------------------------------------------

    @property
    def mpe_address(self) -> str | None:
        """The MPE contract in use (checksummed)."""
        return self._mpe

    def set_mpe_address(self, address: str) -> None:
        """Use the MPE named by service metadata (ignored when one is configured).

        A change of contract empties the channel cache: ids mean different
        channels in another contract.
        """
        if self._configured_mpe is not None:
            if to_checksum_address(address) != self._configured_mpe:
                _log.warn(
                    "service metadata names MPE {metadata}, but mpe_contract_address {configured} is configured; "
                    "using the configured one",
                    metadata=address,
                    configured=self._configured_mpe,
                )
            return
        address = to_checksum_address(address)
        if address != self._mpe:
            if self._mpe is not None:
                _log.info("MPE contract changed from {old} to {new}", old=self._mpe, new=address)
            self._mpe = address
            self._token = self.network.token
            self.invalidate()

    # -- generic calls -------------------------------------------------------------

    async def call(self, to: str, fn: AbiFunction, *args: Any, block: int | None = None) -> tuple[Any, ...]:
        """``eth_call`` ``fn(*args)`` on contract ``to`` at the latest block, or at ``block``.

        A node that does not have ``block`` yet answers an error rather than
        an older state, which is what makes reading "at least as new as
        block N" possible behind a load balancer whose nodes lag.

        Raises:
            ChainUnavailable: the node could not be reached.
            ContractCallFailed: the call reverted, the node does not have
                ``block``, or the answer is not what the ABI says (no
                contract at ``to``); or the arguments do not fit the ABI
                (nothing is sent).
        """
        at = "latest" if block is None else hex(block)
        try:
            call = fn.encode_call(*args)
        except ValueError as exc:
            raise ContractCallFailed(f"{to}: {exc}") from None
        data = await self.rpc.call("eth_call", [{"to": to, "data": call}, at])
        try:
            return fn.decode_result(data)
        except ValueError as exc:
            raise ContractCallFailed(f"{to}: {exc}") from exc

    async def check_chain_id(self) -> None:
        """Compare the node's ``eth_chainId`` with the selected network's.

        Sets :attr:`chain_id_error` (shown by :meth:`health`) on a mismatch:
        a ``main`` configuration pointed at a Sepolia node would read the
        wrong contracts.

        Raises:
            ChainUnavailable: the node could not be reached.
        """
        if self.network.chain_id is None:
            return
        chain_id = quantity(await self.rpc.call("eth_chainId"), "eth_chainId")
        if chain_id != self.network.chain_id:
            self.chain_id_error = (
                f"the Ethereum node's chain id is {chain_id}, but blockchain_network_selected "
                f"{self.network.name!r} is chain {self.network.chain_id}"
            )
            _log.error("{error}", error=self.chain_id_error)
        else:
            self.chain_id_error = None

    # -- ChainReader ---------------------------------------------------------------

    def current_block(self) -> int:
        """See :meth:`ChainReader.current_block`."""
        return self.blocks.current()

    def block_status(self) -> BlockStatus:
        """See :meth:`ChainReader.block_status`."""
        return self.blocks.status()

    async def channel(self, channel_id: int, *, fresh: bool = False, recheck: bool = False) -> ChannelInfo | None:
        """See :meth:`ChainReader.channel`."""
        if not fresh:
            now = self._now()
            cached = self._channels.get(channel_id)
            if cached is not None:
                info, fetched = cached
                ttl = self._ttl
                if recheck:
                    ttl = self._recheck_after if ttl is None else min(ttl, self._recheck_after)
                if ttl is None or now - fetched <= ttl:
                    self._channels.move_to_end(channel_id)
                    self.cache_hits += 1
                    return info
            absent = self._absent.get(channel_id)
            if absent is not None:
                block, fetched = absent
                if block == self.blocks.status().number and now - fetched <= self._recheck_after:
                    self._absent.move_to_end(channel_id)
                    self.cache_hits += 1
                    return None
        pending = self._inflight.get(channel_id)
        if pending is None:
            if len(self._inflight) >= self._max_reads:
                raise ChainUnavailable(
                    f"{len(self._inflight)} channel reads are waiting for the Ethereum node; try again later"
                )
            # One read per channel at a time, in a task of its own: callers
            # share it, and one of them going away (its client cancelled)
            # does not cancel it for the others.
            pending = asyncio.ensure_future(self._read_channel(channel_id))
            self._inflight[channel_id] = pending
            pending.add_done_callback(functools.partial(self._read_done, channel_id))
        return await asyncio.shield(pending)

    def _read_done(self, channel_id: int, read: asyncio.Future[ChannelInfo | None]) -> None:
        if self._inflight.get(channel_id) is read:
            del self._inflight[channel_id]
        if not read.cancelled():
            read.exception()  # retrieved: the callers (if any are left) raise it

    async def _read_channel(self, channel_id: int) -> ChannelInfo | None:
        mpe = self._mpe
        if mpe is None:
            raise ChainError("no MultiPartyEscrow address yet (service metadata not loaded)")
        self.cache_misses += 1
        async with self._reads:
            # Block and time from before the call (once its turn came), so
            # that an answer is never kept as newer than it is.
            block, fetched = self.blocks.status().number, self._now()
            nonce, sender, signer, recipient, group_id, value, expiration = await self.call(mpe, _CHANNELS, channel_id)
        current = mpe == self._mpe  # not switched to another contract meanwhile
        if int(sender, 16) == 0:
            self._channels.pop(channel_id, None)
            if current:
                self._absent[channel_id] = (block, fetched)
                self._absent.move_to_end(channel_id)
                while len(self._absent) > _ABSENT_LIMIT:
                    self._absent.popitem(last=False)
            return None
        info = ChannelInfo(
            channel_id=channel_id,
            nonce=nonce,
            sender=to_checksum_address(sender),
            signer=to_checksum_address(signer),
            recipient=to_checksum_address(recipient),
            group_id=bytes(group_id),
            value=value,
            expiration=expiration,
        )
        self._absent.pop(channel_id, None)
        if current:
            self._channels[channel_id] = (info, fetched)
            self._channels.move_to_end(channel_id)
            while len(self._channels) > self._cache_size:
                self._channels.popitem(last=False)
        return info

    def invalidate(self, channel_id: int | None = None) -> None:
        """See :meth:`ChainReader.invalidate`."""
        if channel_id is None:
            self._channels.clear()
            self._absent.clear()
        else:
            self._channels.pop(channel_id, None)
            self._absent.pop(channel_id, None)

    async def token_address(self) -> str:
        """The token contract: the network's, or the one the MPE contract uses.

        Raises:
            ChainError: no MPE address is known to ask.
        """
        if self._token is None:
            if self._mpe is None:
                raise ChainError("token address unknown: no MultiPartyEscrow address yet")
            (token,) = await self.call(self._mpe, _MPE_TOKEN)
            self._token = to_checksum_address(token)
        return self._token

    async def token_balance(self, address: str) -> int:
        """See :meth:`ChainReader.token_balance`."""
        (balance,) = await self.call(await self.token_address(), _BALANCE_OF, to_checksum_address(address))
        return int(balance)

    def health(self) -> ChainHealth:
        """See :meth:`ChainReader.health`."""
        rpc = self.rpc.health()
        blocks = self.blocks.status()
        error: str | None = None
        if self.chain_id_error:
            error = self.chain_id_error
        elif not blocks.fresh:
            error = (
                "current block number not known yet"
                if blocks.number is None
                else f"current block number is {blocks.age:.0f} s old (bound {blocks.max_age:.0f} s)"
            )
            cause = blocks.error or rpc.last_error
            if cause:
                error += f": {cause}"
        elif not rpc.ok and rpc.last_error:
            error = rpc.last_error
        return ChainHealth(ok=error is None, rpc=rpc, blocks=blocks, error=error)
