"""A coroutine run every N seconds of the monotonic clock, whose failures cannot stop it.

Background work of this package (block polling, Registry event polling,
metadata retries, the chain id check) is an asyncio task that waits with
an injected ``sleep``, by default :func:`asyncio.sleep`.  asyncio's timers
run on the event loop's monotonic clock; Twisted's do not: under the
asyncio reactor, ``IReactorTime.callLater`` deadlines are wall-clock times
(``reactor.seconds()`` is ``time.time()``), so a clock stepped back by an
hour (an NTP step, a VM resumed) would stop every poll for an hour while
the last block number went on looking fresh.  A failing tick is logged and
followed by the next one -- unlike a ``LoopingCall``, which ends on the
first exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from twisted.logger import Logger

__all__ = ["Periodic", "Sleep"]

_log = Logger(namespace="snetd.chain")

#: How a loop waits ``seconds``: :func:`asyncio.sleep`, or a test's fake.
Sleep = Callable[[float], Awaitable[None]]


class Periodic:
    """Runs ``tick`` now and then every ``interval`` seconds until stopped.

    Args:
        name: For log lines.
        tick: The work; exceptions are logged, never propagated.
        interval: Seconds between the end of one tick and the start of the
            next; may be changed between ticks.
        sleep: How to wait (tests pass a fake).

    Attributes:
        failures: Ticks that raised.
    """

    def __init__(
        self,
        name: str,
        tick: Callable[[], Awaitable[object]],
        interval: float,
        *,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.name = name
        self.interval = interval
        self.failures = 0
        self._tick = tick
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self._finished = False

    @property
    def running(self) -> bool:
        """Whether the loop is running."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the loop; the first tick runs at once."""
        if not self.running:
            self._finished = False
            self._task = asyncio.ensure_future(self._run())

    def finish(self) -> None:
        """End the loop when the tick in progress returns: for a tick whose work is done for good."""
        self._finished = True

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

    async def _run(self) -> None:
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
            if self._finished:
                return
            await self._sleep(self.interval)
