"""Fakes and helpers for payment tests without a chain: a channel table, keys, signing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from snet_daemon.payments import signatures as sig
from snet_daemon.payments.escrow import PaymentTerms
from snet_daemon.payments.keys import PaymentKeys
from snet_daemon.storage.base import AtomicStorage, Condition, Entry, Lease, Op, StorageTimeout
from snet_daemon.storage.keys import KeyLayout

MPE = sig.address_bytes("0x5e7d000000000000000000000000000000000e5c")
GROUP = bytes(range(32))
CLIENT_KEY = sig.keccak256(b"test-client")
SENDER_KEY = sig.keccak256(b"test-sender")
PROVIDER_KEY = sig.keccak256(b"test-provider")
CLIENT = sig.address_of(CLIENT_KEY)
SENDER = sig.address_of(SENDER_KEY)
PROVIDER = sig.address_of(PROVIDER_KEY)
PRICE = 10
METHOD = "/example_service.Calculator/add"


def terms(price: int = PRICE, threshold: int = 100) -> PaymentTerms:
    return PaymentTerms(
        mpe_address=MPE,
        group_id=GROUP,
        payment_address=PROVIDER,
        expiration_threshold=threshold,
        price=lambda method: price,
    )


@dataclass
class Channel:
    """A ChannelInfo look-alike."""

    channel_id: int
    nonce: int = 0
    sender: str = sig.checksum(SENDER)
    signer: str = sig.checksum(CLIENT)
    recipient: str = sig.checksum(PROVIDER)
    group_id: bytes = GROUP
    value: int = 1000
    expiration: int = 10_000


@dataclass
class FakeChain:
    """A chain reader with a cache that can go stale on purpose.

    ``channel_error``, when set, is raised by every channel read that goes
    to the "node" (fresh, or not cached), as the real reader raises
    ``ChainUnavailable`` while still serving its cache.  Cached entries
    age as :attr:`now` is moved on: a recheck reads those older than
    :attr:`recheck_after` again (a block poll interval, in the real one).
    """

    block: int = 1000
    channels: dict[int, Channel] = field(default_factory=dict)
    cached: dict[int, Channel] = field(default_factory=dict)
    fresh_reads: int = 0
    block_error: Exception | None = None
    channel_error: Exception | None = None
    now: float = 0.0
    recheck_after: float = 6.0
    cached_at: dict[int, float] = field(default_factory=dict)

    def current_block(self) -> int:
        if self.block_error is not None:
            raise self.block_error
        return self.block

    async def channel(self, channel_id: int, *, fresh: bool = False, recheck: bool = False) -> Channel | None:
        if recheck and self.now - self.cached_at.get(channel_id, self.now) > self.recheck_after:
            fresh = True
        if fresh or channel_id not in self.cached:
            if self.channel_error is not None:
                raise self.channel_error
            self.fresh_reads += 1
            found = self.channels.get(channel_id)
            if found is None:
                return None
            self.cached[channel_id] = replace(found)
            self.cached_at[channel_id] = self.now
        return self.cached[channel_id]

    def open(self, channel_id: int, **kwargs: Any) -> Channel:
        channel = Channel(channel_id, **kwargs)
        self.channels[channel_id] = channel
        return channel


def Keys(mpe: bytes = MPE) -> PaymentKeys:
    """The real key layout of the tests' payment group (on the MPE contract ``mpe``)."""
    return PaymentKeys(
        KeyLayout(network="test", organization_id="test-org", group_id=GROUP, mpe_address=sig.checksum(mpe))
    )


class StorageLease:
    """A lease granted on the test storage (what LeaseKeeper does in the daemon)."""

    def __init__(self, storage: AtomicStorage, ttl: int = 10) -> None:
        self._storage = storage
        self._ttl = ttl
        self.lease: Lease | None = None

    async def current(self) -> int:
        if self.lease is None:
            self.lease = await self._storage.grant_lease(self._ttl)
        return self.lease.id

    def lost(self, lease_id: int) -> None:
        self.lease = None


class CountingStorage:
    """Wraps a storage and counts round trips (every awaited call is one)."""

    def __init__(self, inner: AtomicStorage) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.fail: Exception | None = None
        #: This many next transactions apply, then raise StorageTimeout (the
        #: reply was lost: the outcome a timed-out write leaves unknown).
        self.timeout_after_apply = 0
        #: When set, the next transaction applies, then its reply waits for
        #: this event (the reply is on its way while the caller is cancelled).
        self.reply_after: asyncio.Event | None = None
        #: Set once that transaction has applied.
        self.applied = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if not callable(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if self.fail is not None:
                raise self.fail
            return await target(*args, **kwargs)

        return call

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        self.calls.append("transaction")
        if self.fail is not None:
            raise self.fail
        revision = await self.inner.transaction(conditions, ops)
        if self.reply_after is not None:
            reply_after, self.reply_after = self.reply_after, None
            self.applied.set()
            await reply_after.wait()
        if self.timeout_after_apply:
            self.timeout_after_apply -= 1
            raise StorageTimeout("reply lost")
        return revision

    async def get(self, key: str) -> Entry | None:
        self.calls.append("get")
        if self.fail is not None:
            raise self.fail
        return await self.inner.get(key)


def payment_metadata(
    channel_id: int, nonce: int, amount: int, key: bytes = CLIENT_KEY, mpe: bytes = MPE
) -> tuple[tuple[str, str | bytes], ...]:
    """The escrow metadata a client sends for a payment."""
    signature = sig.sign(sig.mpe_claim(mpe, channel_id, nonce, amount), key)
    return (
        ("snet-payment-type", "escrow"),
        ("snet-payment-channel-id", str(channel_id)),
        ("snet-payment-channel-nonce", str(nonce)),
        ("snet-payment-channel-amount", str(amount)),
        ("snet-payment-channel-signature-bin", signature),
    )


@dataclass
class Hold:
    """What :class:`RecordingLedger` authorizes: a payment from a fixed sender."""

    sender: str = "0x" + "11" * 20


class RecordingLedger:
    """An escrow ledger that accepts every payment and records whether it was charged.

    Its release takes one storage round trip (10 ms), as a real one does.
    """

    def __init__(self) -> None:
        self.released = False
        self.committed = False

    async def authorize(self, method: str, payment: object) -> Hold:
        return Hold()

    async def release(self, hold: Hold) -> None:
        await asyncio.sleep(0.01)  # an etcd txn on loopback
        self.released = True

    def commit(self, hold: Hold) -> None:
        self.committed = True
