"""Periodic: the loop behind the chain side's polls, on an injected sleep."""

from __future__ import annotations

import asyncio

from snet_daemon.blockchain.periodic import Periodic
from tests.support.aio import aio_test, wait_for


class Sleeps:
    """Records the waits asked for and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


@aio_test
async def test_failing_ticks_do_not_stop_the_loop() -> None:
    """A tick that raises is counted and followed by the next one after the interval, which may
    change between ticks; finish() ends the loop once the tick that calls it returns."""
    sleeps = Sleeps()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        ticks += 1
        if ticks <= 2:
            raise RuntimeError("tick failed")
        periodic.interval = 7.0
        if ticks == 4:
            periodic.finish()

    periodic = Periodic("test", tick, 5.0, sleep=sleeps)
    periodic.start()
    await wait_for(lambda: not periodic.running)
    assert (ticks, periodic.failures) == (4, 2)
    assert sleeps.delays == [5.0, 5.0, 7.0]


@aio_test
async def test_stop_cancels_a_tick_in_progress() -> None:
    """stop() cancels the tick it interrupts and waits for the loop to end; starting again works."""
    started = asyncio.Event()
    cancelled = False

    async def tick() -> None:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled = True
            raise

    periodic = Periodic("test", tick, 5.0, sleep=Sleeps())
    periodic.start()
    await started.wait()
    await periodic.stop()
    assert cancelled
    assert not periodic.running
    started.clear()
    periodic.start()
    await started.wait()  # ticking again
    await periodic.stop()
