"""Free-call counters at the daemon's stop: ``settle`` waits for every write under way, ``close``
leaves nothing waiting and refuses what comes after."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from twisted.logger import capturedLogs

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments.counters import Counters, decode_count
from snet_daemon.storage.base import Condition, Op
from snet_daemon.storage.memory import MemoryStorage
from tests.support.aio import aio_test, turns
from tests.test_counters_settling import warnings


@aio_test
async def test_close_before_the_worker_ran_lets_the_give_back_go_and_logs_it() -> None:
    """A give-back queued just before the stop, its worker not started yet: close() lets its
    caller go, logs it as lost, and leaves the counter usable by nothing hanging."""
    memory = MemoryStorage(lambda: 0.0)
    counters = Counters(memory)
    await counters.count("k", 5)
    with capturedLogs() as events:
        give_back = asyncio.ensure_future(counters.give_back("k"))
        await asyncio.sleep(0)  # queued, its worker created but not started
        assert counters._queues
        counters.close()
        await asyncio.wait_for(give_back, 1.0)
    (text,) = warnings(events)
    assert "not given back on k" in text
    assert "the daemon stopped first" in text
    assert not counters._queues


@aio_test
async def test_close_refuses_the_calls_waiting_and_those_after_it() -> None:
    memory = MemoryStorage(lambda: 0.0)
    counters = Counters(memory)
    waiting = asyncio.ensure_future(counters.count("k", 5))
    await asyncio.sleep(0)
    counters.close()
    later = asyncio.ensure_future(counters.count("k", 5))
    for call in (waiting, later):
        error = await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), 1.0)
        assert isinstance(error[0], GrpcError)
        assert (error[0].status, error[0].message) == (Status.UNAVAILABLE, "the daemon is stopping")
    with capturedLogs() as events:
        await asyncio.wait_for(counters.give_back("k"), 1.0)  # a failed call's, after the stop
    assert any("not given back on k" in text for text in warnings(events))
    assert not counters._queues
    assert await memory.get("k") is None


class Gated:
    """Transactions on a key wait for that key's gate while it is set."""

    def __init__(self, inner: MemoryStorage) -> None:
        self.inner = inner
        self.gates: dict[str, asyncio.Event] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def transaction(self, conditions: Sequence[Condition], ops: Sequence[Op]) -> int:
        gate = self.gates.get(ops[0].key)
        if gate is not None:
            await gate.wait()
        return await self.inner.transaction(conditions, ops)


@aio_test
async def test_settle_waits_for_a_give_back_queued_while_it_waits() -> None:
    """settle() collects the workers again: a give-back queued on another counter while it waits
    (a call cut short by the stop) lands in time instead of being logged as lost by close()."""
    memory = MemoryStorage(lambda: 0.0)
    storage = Gated(memory)
    counters = Counters(storage)
    await counters.count("A", 5)
    await counters.count("B", 5)
    storage.gates["A"] = gate_a = asyncio.Event()
    storage.gates["B"] = gate_b = asyncio.Event()
    give_back_a = asyncio.ensure_future(counters.give_back("A"))
    await asyncio.sleep(0)
    settling = asyncio.ensure_future(counters.settle(3.0))
    await asyncio.sleep(0)
    give_back_b = asyncio.ensure_future(counters.give_back("B"))  # queued while settle waits
    await asyncio.sleep(0)
    gate_a.set()
    asyncio.get_running_loop().call_later(0.05, gate_b.set)  # B lands 50 ms later
    await asyncio.wait_for(settling, 1.0)
    assert give_back_a.done()
    assert give_back_b.done()
    with capturedLogs() as events:
        counters.close()
        await turns()
    assert not warnings(events)
    assert decode_count(await memory.get("A")) == 0
    assert decode_count(await memory.get("B")) == 0


@aio_test
async def test_close_names_the_write_under_way_once() -> None:
    """close() while a count write is under way: its calls are refused, and one warning says what
    that write carried (two calls that may stay counted, one give-back that may not have landed),
    instead of calling the give-back lost outright."""
    memory = MemoryStorage(lambda: 0.0)
    storage = Gated(memory)
    counters = Counters(storage)
    await counters.count("k", 5)
    storage.gates["k"] = asyncio.Event()  # the next write waits
    give_back = asyncio.ensure_future(counters.give_back("k"))
    calls = [asyncio.ensure_future(counters.count("k", 5)) for _ in range(2)]
    await turns()
    assert counters._queues["k"].writing is not None
    with capturedLogs() as events:
        counters.close()
        await asyncio.wait_for(give_back, 1.0)
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 1.0)
    for result in results:
        assert isinstance(result, GrpcError)
        assert (result.status, result.message) == (Status.UNAVAILABLE, "the daemon is stopping")
    (text,) = warnings(events)
    assert "write of free-call counter k was under way as the daemon stopped" in text
    assert "2 refused call(s) stay counted" in text
    assert "1 failed call(s) were not given back" in text
