"""A coroutine run every N seconds of an injected clock, whose failures cannot stop it.

Background work of this package (block polling, Registry event polling,
metadata retries) is an asyncio task that sleeps on the reactor's clock
(``IReactorTime.callLater``), so tests can drive it with any clock and a
failing tick is logged and followed by the next one -- unlike a
``LoopingCall``, which ends on the first exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["Periodic", "clock_sleep"]

_log = Logger(namespace="snetd.chain")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def clock_sleep(clock: IReactorTime, seconds: float) -> None:
    """Sleep ``seconds`` on ``clock`` (not on the wall clock)."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    call = clock.callLater(seconds, _resolve, done)
    try:
        await done
    finally:
        if call.active():
            call.cancel()


class Periodic:
    """Runs ``tick`` now and then every ``interval`` seconds until stopped.

    Args:
        name: For log lines.
        tick: The work; exceptions are logged, never propagated.
        interval: Seconds between the end of one tick and the start of the next.
        clock: Where time comes from.
    """

    def __init__(self, name: str, tick: Callable[[], Awaitable[object]], interval: float, clock: IReactorTime) -> None:
        self.name = name
        self.interval = interval
        self.failures = 0
        self._tick = tick
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._call: IDelayedCall | None = None

    @property
    def running(self) -> bool:
        """Whether the loop is running."""
        return self._task is not None and not self._task.done()

    def start(self, *, now: bool = True) -> None:
        """Start the loop; the first tick runs at once unless ``now`` is false."""
        if not self.running:
            self._task = asyncio.ensure_future(self._run(now))

    def trigger(self) -> None:
        """Run the next tick now instead of at the end of the current wait."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def stop(self) -> None:
        """Stop the loop, cancelling a tick in progress."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def _run(self, now: bool) -> None:
        if not now:
            await self._sleep()
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failures += 1
                _log.failure(
                    "{name}: tick failed; trying again in {interval} s", name=self.name, interval=self.interval
                )
            await self._sleep()

    async def _sleep(self) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wake = wake
        call = self._clock.callLater(self.interval, _resolve, wake)
        try:
            await wake
        finally:
            self._wake = None
            if call.active():
                call.cancel()
