"""The current block number, kept fresh in the background.

The Go daemon calls ``eth_blockNumber`` one to three times per paid call.
Here a Service keeps the number fresh -- polling every
``block_poll_interval``, and, when ``ethereum_json_rpc_ws_endpoint`` is set,
also following ``newHeads`` over a WebSocket -- and payment code reads the
cached value without I/O.  The value carries its age; reading it when it is
older than ``block_max_age`` raises :class:`StaleBlockNumber`, so an RPC
outage turns into clear refusals instead of decisions made on an old block.

A node that answers but has stopped following the chain (stuck syncing, cut
off from its peers) gives the same number poll after poll: the value looks
fresh, and channel expiry is checked against a block that is long past.
The daemon cannot tell that from a quiet development chain, which mines
only when sent a transaction, so it does not refuse payments for it; it
warns once the number has stood still for :data:`STALL_WARNING` seconds,
and says when it moves again.

Ages and poll waits are measured on the monotonic clock, never on the wall
clock: stepped back an hour (an NTP step, a VM resumed), a wall clock would
make an hour-old block look new and hold the next poll back by that hour.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from snet_daemon import jsontext
from snet_daemon.blockchain.errors import ChainError, StaleBlockNumber
from snet_daemon.blockchain.periodic import Periodic, Sleep
from snet_daemon.blockchain.rpc import JsonRpcClient, quantity, redact_url

__all__ = ["STALL_WARNING", "BlockNumber", "BlockNumberService", "BlockStatus"]

_log = Logger(namespace="snetd.chain.blocks")

#: Seconds the block number may stand still before a warning: 50 blocks of
#: Ethereum's 12 s, far beyond a missed slot or two.
STALL_WARNING = 600.0


@dataclass(frozen=True, slots=True)
class BlockStatus:
    """The cached block number as the heartbeat shows it.

    Attributes:
        number: Last block number seen, or None before the first.
        age: Seconds since it was fetched (monotonic), or None.
        max_age: The configured bound.
        fresh: ``age <= max_age``.
        source: ``"poll"`` or ``"newHeads"``: how the last value arrived.
        error: Why the last poll failed, until a value arrives again; the
            cause the heartbeat names when the number is not fresh (the
            JSON-RPC client's health alone does not show a JSON-RPC error
            answer or an answer that is not a block number).
    """

    number: int | None
    age: float | None
    max_age: float
    fresh: bool
    source: str | None
    error: str | None = None


class BlockNumber:
    """The latest block number and when it was learnt.

    Args:
        max_age: Seconds after which the value is too old to use.
        now: A monotonic clock in seconds (the default is the one
            asyncio's event loop uses); tests pass a fake.
    """

    def __init__(self, max_age: float, *, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self.max_age = max_age
        self._number: int | None = None
        self._updated: float | None = None
        self._source: str | None = None
        self._error: str | None = None
        #: When the number last changed (or was first learnt).
        self._changed: float | None = None

    def update(self, number: int, source: str = "poll") -> None:
        """Record ``number`` as the latest block, learnt now.

        A smaller number than before is accepted (a reorganisation, or a
        test chain reverted to a snapshot): the node is the authority.
        """
        now = self._now()
        if number != self._number:
            self._changed = now
        self._number = number
        self._updated = now
        self._source = source
        self._error = None

    def failed(self, error: str) -> None:
        """Record why a newer value could not be fetched (kept until one arrives)."""
        self._error = error

    def age(self) -> float | None:
        """Seconds since the value was fetched, or None before the first fetch."""
        if self._updated is None:
            return None
        return max(0.0, self._now() - self._updated)

    def unchanged_for(self) -> float | None:
        """Seconds the number has stood still (the node said the same each
        time), or None before the first fetch."""
        if self._changed is None:
            return None
        return max(0.0, self._now() - self._changed)

    def current(self) -> int:
        """The latest block number, without I/O.

        Raises:
            StaleBlockNumber: no block number yet, or it is older than
                :attr:`max_age`.
        """
        age = self.age()
        if self._number is None or age is None:
            raise StaleBlockNumber("current block number is not known yet (Ethereum JSON-RPC not reached)")
        if age > self.max_age:
            raise StaleBlockNumber(
                f"current block number {self._number} is {age:.0f} s old (bound {self.max_age:.0f} s); "
                "the Ethereum JSON-RPC endpoint is not answering"
            )
        return self._number

    def status(self) -> BlockStatus:
        """Number, age and freshness, for the heartbeat."""
        age = self.age()
        return BlockStatus(
            number=self._number,
            age=age,
            max_age=self.max_age,
            fresh=age is not None and age <= self.max_age,
            source=self._source,
            error=self._error,
        )


class BlockNumberService(Service):
    """Keeps a :class:`BlockNumber` fresh: polling, plus ``newHeads`` over WebSocket.

    Polling never stops, even with a WebSocket: when heads arrive, a poll
    finding the value younger than the interval does nothing, and when the
    socket dies polling carries on while it reconnects.

    A failed poll keeps the last value (its age grows), records why in
    :meth:`BlockNumber.failed` for the heartbeat, and is logged at warning
    level on the first failure in a row and every tenth after it, so an
    outage neither goes unexplained nor fills the log.

    Args:
        blocks: The cache to keep fresh.
        rpc: The HTTP JSON-RPC client.
        interval: Seconds between polls.
        ws_url: WebSocket JSON-RPC endpoint for ``newHeads``, or None.
        ws_authorization: ``Authorization`` header for the WebSocket.
        sleep: How to wait between polls and WebSocket reconnections
            (monotonic: :func:`asyncio.sleep`; tests pass a fake).
    """

    name = "chain-blocks"

    def __init__(
        self,
        blocks: BlockNumber,
        rpc: JsonRpcClient,
        *,
        interval: float,
        ws_url: str | None = None,
        ws_authorization: str | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.blocks = blocks
        self._rpc = rpc
        self._sleep = sleep
        self._poller = Periodic("block number poll", self._poll, interval, sleep=sleep)
        self._failures = 0
        #: The number we warned has stood still (None: no warning out).
        self._stalled_at: int | None = None
        self._ws_url = ws_url
        self._ws_headers = {"Authorization": ws_authorization} if ws_authorization else {}
        self._ws_task: asyncio.Task[None] | None = None
        self.ws_connected = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._poller.start()
        if self._ws_url:
            self._ws_task = asyncio.ensure_future(self._follow_heads(self._ws_url))

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromFuture(asyncio.ensure_future(self._stop()))

    async def _stop(self) -> None:
        await self._poller.stop()
        task, self._ws_task = self._ws_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def refresh(self) -> int:
        """Fetch the block number now (also used once at startup).

        Raises:
            ChainError: the node could not be asked, or its answer is not
                a block number.
        """
        number = quantity(await self._rpc.call("eth_blockNumber"), "eth_blockNumber")
        self.blocks.update(number, "poll")
        return number

    async def _poll(self) -> None:
        try:
            await self._fetch()
        finally:
            self._watch_stall()

    async def _fetch(self) -> None:
        age = self.blocks.age()
        if self.ws_connected and age is not None and age < self._poller.interval:
            return
        try:
            await self.refresh()
        except Exception as exc:
            self._poll_failed(exc)
        else:
            if self._failures:
                _log.info("block number poll works again after {failures} failures", failures=self._failures)
            self._failures = 0

    def _watch_stall(self) -> None:
        """Warn once when the node's number stands still, and say when it moves again."""
        number, still = self.blocks.status().number, self.blocks.unchanged_for()
        if self._stalled_at is not None and number != self._stalled_at:
            _log.info(
                "the block number moves again: {number} (it stood at {stalled})",
                number=number,
                stalled=self._stalled_at,
            )
            self._stalled_at = None
        elif self._stalled_at is None and still is not None and still > STALL_WARNING and self._failures == 0:
            self._stalled_at = number
            _log.warn(
                "the Ethereum node has answered block number {number} for {minutes:.0f} minutes: on a public "
                "network it has stopped following the chain (channel expiry is checked against that old block); "
                "a development chain that mines only on transactions looks the same",
                number=number,
                minutes=still / 60,
            )

    def _poll_failed(self, exc: Exception) -> None:
        error = str(exc) if isinstance(exc, ChainError) else f"unexpected {type(exc).__name__}: {exc}"
        self.blocks.failed(error)
        self._failures += 1
        if self._failures != 1 and self._failures % 10 != 0:
            return
        if isinstance(exc, ChainError):
            _log.warn(
                "block number poll failed ({failures} in a row; payments are refused once the block number "
                "is {max_age:.0f} s old): {error}",
                failures=self._failures,
                max_age=self.blocks.max_age,
                error=error,
            )
        else:  # a bug: worth its traceback, but not on every tick
            _log.failure("block number poll failed ({failures} in a row)", failures=self._failures)

    async def _follow_heads(self, url: str) -> None:
        delay = 1.0
        while True:
            try:
                async with (
                    aiohttp.ClientSession(headers=self._ws_headers) as session,
                    session.ws_connect(url, heartbeat=30.0) as ws,
                ):
                    await ws.send_str(
                        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe", "params": ["newHeads"]})
                    )
                    _log.info("following newHeads on {url}", url=redact_url(url))
                    delay = 1.0
                    async for message in ws:
                        if message.type != aiohttp.WSMsgType.TEXT:
                            break
                        self._on_message(message.data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warn(
                    "newHeads subscription on {url} failed ({error}); reconnecting in {delay:.0f} s",
                    url=redact_url(url),
                    error=exc,
                    delay=delay,
                )
            finally:
                self.ws_connected = False
            await self._sleep(delay)
            delay = min(30.0, delay * 2)

    def _on_message(self, data: str) -> None:
        try:
            message = jsontext.loads(data)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if message.get("id") == 1 and "result" in message:
            self.ws_connected = True
        elif message.get("id") == 1 and "error" in message:
            raise ChainError(f"eth_subscribe newHeads refused: {message['error']}")
        elif message.get("method") == "eth_subscription":
            params = message.get("params")
            head = params.get("result") if isinstance(params, dict) else None
            if not isinstance(head, dict):
                return
            # A head that is not a number raises: the subscription is
            # dropped with a warning and made again, as on other failures.
            number = quantity(head.get("number"), "newHeads")
            self.ws_connected = True
            self.blocks.update(number, "newHeads")
