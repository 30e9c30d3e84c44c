"""Token balances for free-call eligibility, cached per address.

snet-sdk's default strategy asks ``GetFreeCallToken`` before *every* call,
prepaid ones included, and anyone can sign such a request with a fresh key
at no cost.  Reading ``balanceOf`` from the chain each time would spend an
RPC call per service call (against DESIGN §4: no Ethereum RPC per call in
steady state) and let anybody burn the provider's RPC quota.  So answers are
kept for a few block-poll intervals -- a balance cannot be seen to change
sooner than the block number does -- in a bounded, least-recently-used
table, and concurrent lookups of one address share a single read.

A balance high enough is kept longer than one too low: a user who just
topped up their wallet should not wait long, while one who moved tokens
away keeps free calls a little longer at worst.  Failed reads are not kept:
the next request reads again.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

#: Addresses whose balance is kept (about 100 bytes each).
CACHE_SIZE: Final = 10_000


class BalanceCache:
    """Token balances by address, read at most once per lifetime and at a time.

    Args:
        read: reads the balance of a checksummed address, in cogs.
        minimum: the balance, in cogs, that is "enough".
        enough_for: seconds a balance of at least ``minimum`` is kept.
        short_for: seconds a lower balance is kept.
        now: a monotonic clock, in seconds (tests pass a fake).
        size: most addresses kept (least recently used ones go first).
    """

    def __init__(
        self,
        read: Callable[[str], Awaitable[int]],
        *,
        minimum: int,
        enough_for: float,
        short_for: float,
        now: Callable[[], float] = time.monotonic,
        size: int = CACHE_SIZE,
    ) -> None:
        self._read = read
        self._minimum = minimum
        self._enough_for = enough_for
        self._short_for = short_for
        self._now = now
        self._size = size
        #: Balance and when it expires, by address, least recently used first.
        self._known: OrderedDict[str, tuple[int, float]] = OrderedDict()
        #: Reads under way, by address (each shared by every caller).
        self._reading: dict[str, asyncio.Future[int]] = {}
        #: Reads that went to the chain (for tests and metrics).
        self.reads = 0

    async def balance(self, address: str) -> int:
        """The balance of ``address`` (checksummed), from the cache when fresh.

        Raises:
            Exception: whatever ``read`` raised (nothing is cached then).
        """
        known = self._known.get(address)
        if known is not None:
            balance, expires = known
            if self._now() < expires:
                self._known.move_to_end(address)
                return balance
            del self._known[address]
        reading = self._reading.get(address)
        if reading is None:
            reading = self._reading[address] = asyncio.ensure_future(self._fetch(address))
            reading.add_done_callback(functools.partial(self._done, address))
        # A caller that goes away (cancelled) leaves the read to the others.
        return await asyncio.shield(reading)

    async def _fetch(self, address: str) -> int:
        self.reads += 1
        balance = await self._read(address)
        lifetime = self._enough_for if balance >= self._minimum else self._short_for
        self._known[address] = (balance, self._now() + lifetime)
        self._known.move_to_end(address)
        while len(self._known) > self._size:
            self._known.popitem(last=False)
        return balance

    def _done(self, address: str, reading: asyncio.Future[int]) -> None:
        if self._reading.get(address) is reading:
            del self._reading[address]
        if not reading.cancelled():
            reading.exception()  # retrieved: every caller may have gone


__all__: Sequence[str] = ("CACHE_SIZE", "BalanceCache")
