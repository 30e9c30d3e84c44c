"""Group commit: concurrent etcd transactions sent as one request.

Every paid call makes an etcd transaction (record the payment and hold the
channel), and a finished call's hold is deleted by another unless the
channel's next call takes it over.  With many calls in flight, most of
their cost is per *request*, not per operation: in the daemon, HTTP/2
framing, HPACK and a socket write and read per request; in etcd, a gRPC
call, a Raft proposal and a WAL write per request.  etcd (3.3 and later)
accepts a transaction whose operations are themselves transactions, each
with its own comparisons, outcome and reads, applied together at one
revision.  So while ``limit`` requests are in flight, further transactions
wait in a queue, and when a request comes back everything queued goes out
as one such transaction of transactions.

Transactions are sent at the end of the event loop's turn in which they
were submitted, so the calls handled in one turn share a request (and a
lone transaction goes out as itself, one loop turn later).  Under load the
one request in flight is the usual case, and each request then carries what
arrived during one round trip.  Measured with ``benchmarks/paid.py`` (paid
calls over one channel each, embedded etcd): see ``benchmarks/README.md``.

What a caller sees does not change, with one exception the storage contract
allows for: transactions that travel together share one revision.

* No member of a batch reads or compares a key another member writes, and
  no two members write the same key (etcd refuses a request in which two
  operations write one key).  etcd evaluates every comparison of the batch
  before applying any of it, so without this rule two members could each
  miss the other's write and the batch would match no order of the two.
  With it, the members commute: the batch has the effect of sending them
  one after the other in any order.  A queued transaction that conflicts
  with one already in the batch waits for the next.
* etcd limits the operations of a request (``--max-txn-ops``, 128 by
  default, counted so that the batch size plus the largest member must fit)
  and its size (``--max-request-bytes``, 1.5 MiB by default), hence at most
  ``max_members`` and 512 KiB per batch, and large transactions alone.
* If etcd refuses a batch as a whole for a reason that may belong to one
  member (an expired lease, an invalid request), each member is sent again
  on its own, so every caller gets its own answer.  A transport failure
  (unavailable, timed out) is every member's answer: it is what each would
  have met alone, and a timed-out write's outcome is unknown either way.
"""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from snet_daemon.storage.base import LeaseNotFound, StorageUnavailable
from snet_daemon.varint import encode_varint

__all__ = ["TxnBatcher"]

#: (serialized ``TxnRequest``, lease) -> ``TxnResponse``: sends one etcd
#: ``Txn`` request.  ``lease`` is the lease the request's puts use (0: none),
#: for error reporting.
Send = Callable[[bytes, int], Awaitable[Any]]

#: Errors after which a batch is retried member by member (see the module
#: docstring); anything else is every member's answer.
_MEMBER_ERRORS = (LeaseNotFound, ValueError)

#: etcd's default ``--max-txn-ops``.
_MAX_OPS = 128

#: Most bytes of transactions in one batch: a third of etcd's default
#: ``--max-request-bytes``, leaving room for clusters configured lower.
_MAX_BYTES = 512 * 1024


@dataclass(slots=True, eq=False)
class _Member:
    request: Any
    reads: frozenset[bytes]
    writes: frozenset[bytes]
    lease: int
    future: asyncio.Future[tuple[Any, int]] = field(repr=False)
    #: What etcd counts against ``--max-txn-ops`` for this transaction.
    ops: int = field(init=False)
    #: The request, serialized (once: see :func:`_batch_request`).
    data: bytes = field(init=False, repr=False)
    #: Its encoded size.
    size: int = field(init=False)

    def __post_init__(self) -> None:
        request = self.request
        self.ops = max(len(request.compare), len(request.success), len(request.failure))
        self.data = request.SerializeToString()
        self.size = len(self.data)

    def fits(self, max_members: int) -> bool:
        """Whether this transaction may travel with others."""
        return self.ops + max_members <= _MAX_OPS and self.size <= _MAX_BYTES // 2


class TxnBatcher:
    """Sends etcd transactions, grouping those that arrive under load.

    Args:
        send: sends one ``TxnRequest`` and returns its ``TxnResponse``,
            raising the storage errors.
        limit: requests in flight before transactions queue (at least 1).
        max_members: most transactions in one request.
    """

    def __init__(self, send: Send, *, limit: int = 1, max_members: int = 64) -> None:
        if limit < 1 or not 2 <= max_members <= 100:
            raise ValueError("limit must be >= 1 and max_members within 2..100")
        self._send = send
        self._limit = limit
        self._max_members = max_members
        self._running = 0
        self._queue: deque[_Member] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._flush_scheduled = False
        #: Requests sent, and transactions carried by them (for tests and
        #: benchmarks: ``carried / requests`` is the average batch size).
        self.requests = 0
        self.carried = 0

    async def submit(
        self, request: Any, *, reads: Collection[bytes], writes: Collection[bytes], lease: int
    ) -> tuple[Any, int]:
        """Send ``request`` (a ``TxnRequest``), alone or with others.

        Args:
            request: the transaction.
            reads: the keys it compares or reads.
            writes: the keys it puts or deletes.
            lease: the lease its puts use (0: none).

        Returns:
            Its ``TxnResponse`` and the revision of the request that carried
            it (the revision its writes have, if it succeeded).
        """
        if self._closed:
            raise StorageUnavailable("etcd storage is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Any, int]] = loop.create_future()
        self._queue.append(_Member(request, frozenset(reads), frozenset(writes), lease, future))
        if not self._flush_scheduled:
            # Send at the end of this turn of the event loop, together with
            # whatever else the calls handled in it submit.
            self._flush_scheduled = True
            loop.call_soon(self._scheduled_flush)
        # Cancelling the caller cancels ``future``; a cancelled member still
        # queued is skipped, one already sent is not taken back (as with any
        # request: its outcome is then unknown).
        return await future

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def close(self) -> None:
        """Fail everything still queued; later submissions fail at once."""
        self._closed = True
        while self._queue:
            member = self._queue.popleft()
            if not member.future.done():
                member.future.set_exception(StorageUnavailable("etcd storage is closed"))

    # -- internals ----------------------------------------------------------------

    def _flush(self) -> None:
        while self._queue and self._running < self._limit:
            batch = self._take()
            if not batch:
                return
            self._running += 1
            task = asyncio.ensure_future(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Member]:
        """The next batch: queued members in order, none conflicting."""
        batch: list[_Member] = []
        written: set[bytes] = set()
        touched: set[bytes] = set()  # read or written
        size = 0
        skipped: list[_Member] = []
        limit = self._max_members
        queue = self._queue
        while queue and len(batch) < limit:
            member = queue.popleft()
            if member.future.done():  # cancelled while queued
                continue
            fits = member.fits(limit)
            if batch and (
                not fits
                or size + member.size > _MAX_BYTES
                or not touched.isdisjoint(member.writes)
                or not written.isdisjoint(member.reads)
            ):
                skipped.append(member)
                continue
            batch.append(member)
            if not fits:
                break  # a large transaction travels alone
            written.update(member.writes)
            touched.update(member.writes, member.reads)
            size += member.size
        queue.extendleft(reversed(skipped))
        return batch

    async def _run(self, batch: list[_Member]) -> None:
        """Send one batch (``_running`` was counted by :meth:`_flush`)."""
        try:
            self.requests += 1
            self.carried += len(batch)
            if len(batch) == 1:
                await self._alone(batch[0])
                return
            try:
                reply = await self._send(_batch_request(batch), 0)
            except _MEMBER_ERRORS:
                await asyncio.gather(*(self._alone(member) for member in batch))
                return
            except Exception as error:
                for member in batch:
                    _fail(member, error)
                return
            revision = int(reply.header.revision)
            for member, response in zip(batch, reply.responses, strict=True):
                if not member.future.done():
                    member.future.set_result((response.response_txn, revision))
        finally:
            self._running -= 1
            self._flush()

    async def _alone(self, member: _Member) -> None:
        if member.future.done():
            return
        try:
            reply = await self._send(member.data, member.lease)
        except Exception as error:
            if not member.future.done():
                member.future.set_exception(error)
        else:
            if not member.future.done():
                member.future.set_result((reply, int(reply.header.revision)))


#: Field keys (field number << 3 | length-delimited) of the two wrappers.
_SUCCESS = bytes([2 << 3 | 2])
_REQUEST_TXN = bytes([4 << 3 | 2])


def _batch_request(batch: list[_Member]) -> bytes:
    """The serialized ``TxnRequest`` whose ``success`` ops are the members.

    Written as bytes around each member's own serialization (needed anyway
    for its size), byte for byte what protobuf would write: building the
    message instead (``TxnRequest(success=[RequestOp(request_txn=...)])``)
    copies every member, 1.9 us a member against 0.55 us (protobuf 7, upb).
    """
    parts = []
    for member in batch:
        # RequestOp { request_txn = 4 }, inside TxnRequest { success = 2 }.
        op = _REQUEST_TXN + encode_varint(len(member.data)) + member.data
        parts.append(_SUCCESS + encode_varint(len(op)))
        parts.append(op)
    return b"".join(parts)


def _fail(member: _Member, error: Exception) -> None:
    """Give one member of a failed batch the batch's error."""
    if member.future.done():
        return
    # Each caller raises its own copy: one exception object raised in
    # several tasks would collect all their tracebacks.
    try:
        own = copy.copy(error)
    except Exception:  # an exception type that cannot be rebuilt from its args
        own = error
    member.future.set_exception(own)
