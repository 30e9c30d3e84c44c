"""Group commit of etcd transactions (:mod:`snet_daemon.storage.batch`).

First with an in-memory ``send`` that the test answers by hand (which
requests go out, and who gets which answer), then through
:class:`~snet_daemon.storage.etcd.EtcdStorage` against a real etcd: batched
transactions keep their meaning there (no lost update, no write skew, each
caller its own lease error).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aetcd import rpc  # type: ignore[import-untyped]

from snet_daemon.storage.base import (
    Condition,
    ConditionFailed,
    Delete,
    LeaseNotFound,
    Put,
    StorageTimeout,
    StorageUnavailable,
)
from snet_daemon.storage.batch import TxnBatcher, _batch_request, _Member
from snet_daemon.storage.etcd import EtcdStorage
from tests.support.aio import aio_test
from tests.support.etcd import EtcdServer, etcd_server

__all__ = ["etcd_server"]  # fixture, imported for pytest


class FakeEtcd:
    """A ``send`` whose requests wait until the test answers them."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, int, asyncio.Future[Any]]] = []
        self._busy: asyncio.Task[Any] | None = None

    async def send(self, data: bytes, lease: int) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append((rpc.TxnRequest.FromString(data), lease, future))
        return await future

    def answer(self, index: int, revision: int) -> None:
        """Answer request ``index``: succeeded, one nested response per member."""
        request, _, future = self.sent[index]
        reply = rpc.TxnResponse(succeeded=True)
        reply.header.revision = revision
        for op in request.success:
            if op.HasField("request_txn"):
                nested = reply.responses.add().response_txn
                nested.succeeded = True
                nested.header.revision = revision
        future.set_result(reply)

    async def occupy(self, batcher: TxnBatcher) -> None:
        """Put one transaction in flight (request 0), so that later ones queue."""
        self._busy = _submit(batcher, b"busy")
        await _settle()

    async def free(self) -> None:
        """Answer request 0: what queued meanwhile goes out."""
        assert self._busy is not None
        self.answer(0, 1)
        await self._busy
        await _settle()

    def fail(self, index: int, error: Exception) -> None:
        self.sent[index][2].set_exception(error)

    def members(self, index: int) -> list[bytes]:
        """The first put key of each transaction carried by request ``index``."""
        request = self.sent[index][0]
        nested = [op.request_txn for op in request.success if op.HasField("request_txn")]
        return [txn.success[0].request_put.key for txn in nested or [request]]


def _txn(key: bytes, *, reads: tuple[bytes, ...] = (), ops: int = 1, value: bytes = b"v") -> rpc.TxnRequest:
    """A transaction that puts ``key`` (``ops`` times, for size) and compares ``reads``."""
    return rpc.TxnRequest(
        compare=[rpc.Compare(key=read, target=rpc.Compare.MOD, mod_revision=0) for read in reads],
        success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value)) for _ in range(ops)],
    )


def _submit(batcher: TxnBatcher, key: bytes, *, reads: tuple[bytes, ...] = (), **kwargs: Any) -> asyncio.Task[Any]:
    request = _txn(key, reads=reads, **kwargs)
    return asyncio.ensure_future(batcher.submit(request, reads=reads, writes=[key], lease=0))


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------
# with a hand-answered fake


@aio_test
async def test_lone_transaction_is_sent_as_itself() -> None:
    fake = FakeEtcd()
    batcher = TxnBatcher(fake.send)
    task = _submit(batcher, b"a")
    await _settle()
    assert len(fake.sent) == 1
    assert fake.members(0) == [b"a"]
    assert not any(op.HasField("request_txn") for op in fake.sent[0][0].success)
    fake.answer(0, 7)
    reply, revision = await task
    assert reply.succeeded
    assert revision == 7
    assert (batcher.requests, batcher.carried) == (1, 1)


@aio_test
async def test_transactions_of_one_loop_turn_go_out_together() -> None:
    """Transactions submitted in one turn of the event loop share the first request."""
    fake = FakeEtcd()
    batcher = TxnBatcher(fake.send)
    tasks = [_submit(batcher, key) for key in (b"a", b"b", b"c")]
    await _settle()
    assert len(fake.sent) == 1
    assert fake.members(0) == [b"a", b"b", b"c"]
    fake.answer(0, 5)
    assert [revision for _, revision in await asyncio.gather(*tasks)] == [5, 5, 5]


@aio_test
async def test_transactions_arriving_during_a_request_go_out_together() -> None:
    """While one request is out, later transactions queue; its answer sends them as one, each gets its own reply."""
    fake = FakeEtcd()
    batcher = TxnBatcher(fake.send)
    await fake.occupy(batcher)
    queued = [_submit(batcher, key) for key in (b"b", b"c", b"d")]
    await _settle()
    assert len(fake.sent) == 1, "nothing more is sent while the first request is out"
    await fake.free()
    assert len(fake.sent) == 2
    assert fake.members(1) == [b"b", b"c", b"d"]
    assert fake.sent[1][1] == 0
    fake.answer(1, 11)
    replies = await asyncio.gather(*queued)
    assert [revision for _, revision in replies] == [11, 11, 11]
    assert all(reply.succeeded for reply, _ in replies)
    assert (batcher.requests, batcher.carried) == (2, 4)


@aio_test
async def test_conflicting_transactions_wait_for_the_next_batch() -> None:
    """A write to a key the batch reads or writes, or a read of a key it writes, is not batched with it."""
    fake = FakeEtcd()
    batcher = TxnBatcher(fake.send)
    await fake.occupy(batcher)
    tasks = [
        _submit(batcher, b"x", reads=(b"r",)),  # batch 1
        _submit(batcher, b"x"),  # writes what batch 1 writes
        _submit(batcher, b"r"),  # writes what batch 1 reads
        _submit(batcher, b"y", reads=(b"x",)),  # reads what batch 1 writes
        _submit(batcher, b"z", reads=(b"r",)),  # reads what batch 1 reads: fine
    ]
    await _settle()
    await fake.free()
    assert fake.members(1) == [b"x", b"z"]
    fake.answer(1, 2)
    await _settle()
    # The skipped ones keep their order; among them, x then r conflict with nothing
    # in a fresh batch, and y reads x, which this batch writes.
    assert fake.members(2) == [b"x", b"r"]
    fake.answer(2, 3)
    await _settle()
    assert fake.members(3) == [b"y"]
    fake.answer(3, 4)
    assert [revision for _, revision in await asyncio.gather(*tasks)] == [2, 3, 3, 4, 2]


@aio_test
async def test_large_transactions_travel_alone() -> None:
    """Too many operations or bytes to share a request with max_members others: sent on its own."""
    fake = FakeEtcd()
    batcher = TxnBatcher(fake.send, max_members=64)
    await fake.occupy(batcher)
    tasks = [
        _submit(batcher, b"a"),
        _submit(batcher, b"many", ops=65),
        _submit(batcher, b"b"),
        _submit(batcher, b"big", value=b"x" * 300_000),
        _submit(batcher, b"c"),
    ]
    await _settle()
    for index in range(4):
        fake.answer(index, index + 1)
        await _settle()
    batches = [fake.members(index) for index in range(1, 4)]
    assert len(fake.sent) == 4
    assert batches[0] == [b"a", b"b", b"c"]
    # Each large one is a plain request: not wrapped in a transaction of transactions.
    assert batches[1:] == [[b"many"], [b"big"]]
    assert all(not any(op.HasField("request_txn") for op in fake.sent[i][0].success) for i in (2, 3))
    await asyncio.gather(*tasks)


@aio_test
async def test_cancelled_queued_transaction_is_not_sent() -> None:
    fake = FakeEtcd()
    batcher = TxnBatcher(fake.send)
    await fake.occupy(batcher)
    keep, drop = _submit(batcher, b"keep"), _submit(batcher, b"drop")
    await _settle()
    drop.cancel()
    await fake.free()
    assert fake.members(1) == [b"keep"]
    fake.answer(1, 2)
    assert (await keep)[1] == 2
    with pytest.raises(asyncio.CancelledError):
        await drop


@aio_test
async def test_batch_refused_for_a_member_is_retried_member_by_member() -> None:
    """A lease error on the batch may be one member's: each is sent alone and gets its own answer."""
    fake = FakeEtcd()
    batcher = TxnBatcher(fake.send)
    await fake.occupy(batcher)
    good, bad = _submit(batcher, b"good"), _submit(batcher, b"bad")
    await _settle()
    await fake.free()
    fake.fail(1, LeaseNotFound(0))
    await _settle()
    assert [fake.members(index) for index in (2, 3)] == [[b"good"], [b"bad"]]
    fake.answer(2, 5)
    fake.fail(3, LeaseNotFound(42))
    assert (await good)[1] == 5
    with pytest.raises(LeaseNotFound):
        await bad


@aio_test
async def test_transport_failure_of_a_batch_is_every_members_answer() -> None:
    fake = FakeEtcd()
    batcher = TxnBatcher(fake.send)
    await fake.occupy(batcher)
    queued = [_submit(batcher, key) for key in (b"a", b"b")]
    await _settle()
    await fake.free()
    fake.fail(1, StorageTimeout("etcd did not answer"))
    errors = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(error, StorageTimeout) for error in errors)
    assert errors[0] is not errors[1], "each caller raises its own exception object"
    assert len(fake.sent) == 2, "a timed-out batch is not re-sent"


@aio_test
async def test_close_fails_queued_and_later_transactions() -> None:
    fake = FakeEtcd()
    batcher = TxnBatcher(fake.send)
    await fake.occupy(batcher)
    queued = _submit(batcher, b"a")
    await _settle()
    batcher.close()
    with pytest.raises(StorageUnavailable, match="closed"):
        await queued
    with pytest.raises(StorageUnavailable, match="closed"):
        await batcher.submit(_txn(b"b"), reads=(), writes=[b"b"], lease=0)
    await fake.free()  # the request in flight still gets its answer


def test_limits_are_checked() -> None:
    fake = FakeEtcd()
    for bad in ({"limit": 0}, {"max_members": 1}, {"max_members": 101}):
        with pytest.raises(ValueError, match="limit"):
            TxnBatcher(fake.send, **bad)


# ---------------------------------------------------------------------------
# through EtcdStorage, against a real etcd


async def _increment(storage: EtcdStorage, key: str) -> int:
    """Read-modify-write with retries, as the payment code does; return attempts."""
    current = await storage.get(key)
    attempts = 1
    while True:
        value = int(current.value) if current is not None else 0
        try:
            await storage.transaction([Condition.unchanged(key, current)], [Put(key, b"%d" % (value + 1))])
            return attempts
        except ConditionFailed as failed:
            current = failed.current[key]
            attempts += 1


@aio_test
async def test_concurrent_transactions_share_requests_and_lose_no_update(etcd_server: EtcdServer) -> None:
    """Many writers on a few counters: requests carry several transactions, every increment counts."""
    storage = EtcdStorage([etcd_server.url])
    try:
        keys = [f"batch/counter/{index}" for index in range(8)]
        await asyncio.gather(*(_increment(storage, keys[i % 8]) for i in range(400)))
        counters = await storage.get_many(keys)
        assert [int(entry.value) for entry in counters.values() if entry] == [50] * 8
        batcher = storage._txns
        assert batcher.carried > batcher.requests, "concurrent transactions were batched"

        # Writes sent together share one revision, which is each key's mod_revision.
        written = [f"batch/shared/{index}" for index in range(32)]
        revisions = await asyncio.gather(*(storage.transaction([], [Put(key, b"v")]) for key in written))
        assert len(set(revisions)) < len(revisions)
        entries = await storage.get_many(written)
        assert [entries[key].mod_revision for key in written] == revisions  # type: ignore[union-attr]
    finally:
        await storage.close()


@aio_test
async def test_batched_transactions_have_no_write_skew(etcd_server: EtcdServer) -> None:
    """A: if y absent put x.  B: if x absent put y.  In any order one fails; sent together too."""
    storage = EtcdStorage([etcd_server.url])
    try:
        for round_ in range(20):
            x, y = f"batch/skew/{round_}/x", f"batch/skew/{round_}/y"
            blocker = storage.transaction([], [Put(f"batch/skew/{round_}/busy", b"v")])
            a = storage.transaction([Condition.absent(y)], [Put(x, b"a")])
            b = storage.transaction([Condition.absent(x)], [Put(y, b"b")])
            other = storage.transaction([], [Put(f"batch/skew/{round_}/other", b"v")])
            results = await asyncio.gather(blocker, a, b, other, return_exceptions=True)
            assert sum(isinstance(result, ConditionFailed) for result in results[1:3]) == 1, results
        # Each round: the blocker, a and other together, then b.
        assert (storage._txns.requests, storage._txns.carried) == (40, 80)
    finally:
        await storage.close()


@aio_test
async def test_lease_error_in_a_batch_is_only_its_members(etcd_server: EtcdServer) -> None:
    """One member names a revoked lease: it alone gets LeaseNotFound; the others are written."""
    storage = EtcdStorage([etcd_server.url])
    try:
        lease = await storage.grant_lease(30)
        await storage.revoke_lease(lease.id)
        busy = storage.transaction([], [Put("batch/lease/busy", b"v")])
        names = [f"batch/lease/{i}" for i in range(3)]
        good = [storage.transaction([Condition.absent(name)], [Put(name, b"v")]) for name in names]
        bad = storage.transaction([], [Put("batch/lease/bad", b"v", lease.id), Delete("batch/lease/0x")])
        results = await asyncio.gather(busy, *good, bad, return_exceptions=True)
        assert all(isinstance(result, int) for result in results[:4]), results
        assert isinstance(results[4], LeaseNotFound)
        assert results[4].lease_id == lease.id
        assert await storage.get("batch/lease/bad") is None
        assert None not in (await storage.get_many(names)).values()
    finally:
        await storage.close()


def test_batch_request_is_what_protobuf_would_write() -> None:
    """The hand-wrapped batch is byte for byte the protobuf message of its members."""
    members = [
        _Member(_txn(key, reads=(b"r",), ops=ops), frozenset(), frozenset([key]), 0, None)  # type: ignore[arg-type]
        for key, ops in ((b"a", 1), (b"b" * 300, 3), (b"c", 2))
    ]
    expected = rpc.TxnRequest(success=[rpc.RequestOp(request_txn=member.request) for member in members])
    assert _batch_request(members) == expected.SerializeToString()
