"""Cost of a chain read: web3's AsyncWeb3 against raw JSON-RPC + eth-abi.

Usage::

    .venv/bin/python benchmarks/chain.py [--calls 2000] [--concurrency 1,32]

Starts anvil (from ``npm ci``), deploys the contracts, opens one channel,
and then, on Twisted's asyncio reactor (the daemon's runtime), times the
two reads the daemon makes -- ``eth_blockNumber`` and MPE ``channels(id)``
-- through three clients:

* ``web3``: ``AsyncWeb3(AsyncHTTPProvider)`` and a contract object;
* ``aiohttp``: one ``aiohttp.ClientSession``, hand-built JSON-RPC bodies,
  ``eth_abi`` decoding (what :mod:`snet_daemon.blockchain.rpc` does);
* ``treq``: the same over treq with a persistent pool;
* ``EthereumChainReader``: the daemon's reader (aiohttp client with retries,
  decoding and checksumming), uncached (``fresh=True``) and from its cache.

It prints calls/s and, more to the point for a daemon that shares its core
with the payment path, CPU milliseconds spent in this process per call
(anvil runs in another process and is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import asyncioreactor

_loop = asyncio.new_event_loop()
asyncio.set_event_loop(_loop)
asyncioreactor.install(_loop)

import aiohttp  # noqa: E402
import treq  # noqa: E402
from eth_abi.abi import decode, encode  # noqa: E402
from eth_utils.crypto import keccak  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.web.client import HTTPConnectionPool  # noqa: E402
from web3 import AsyncHTTPProvider, AsyncWeb3  # noqa: E402

from snet_daemon.blockchain.blocks import BlockNumber  # noqa: E402
from snet_daemon.blockchain.chain import EthereumChainReader  # noqa: E402
from snet_daemon.blockchain.contracts import network_info  # noqa: E402
from snet_daemon.blockchain.rpc import JsonRpcClient  # noqa: E402
from tests.support.chain import Anvil, Chain  # noqa: E402

_CHANNELS = keccak(text="channels(uint256)")[:4]
_CHANNEL_TYPES = ["uint256", "address", "address", "address", "bytes32", "uint256", "uint256"]

Call = Callable[[], Awaitable[Any]]


async def measure(name: str, call: Call, calls: int, concurrency: int) -> None:
    """Run ``calls`` calls, ``concurrency`` at a time, and print the rates."""
    for _ in range(20):  # warm up connections and caches
        await call()
    queue = iter(range(calls))

    async def worker() -> None:
        for _ in queue:
            await call()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{name:34s} c={concurrency:<3d} {calls / wall:8.0f} calls/s  {cpu / calls * 1000:6.3f} ms CPU/call")


async def main(args: argparse.Namespace) -> None:
    anvil = Anvil().start()
    try:
        chain = Chain.deploy(anvil)
        channel_id = chain.open_channel()
        mpe_address = chain.mpe.address
        abi = json.loads(json.dumps(chain.mpe.abi))

        w3 = AsyncWeb3(AsyncHTTPProvider(anvil.url))
        mpe = w3.eth.contract(address=mpe_address, abi=abi)
        session = aiohttp.ClientSession()
        pool = HTTPConnectionPool(reactor, persistent=True)
        ids = iter(range(10**9))

        def body(method: str, params: list[Any]) -> bytes:
            return json.dumps({"jsonrpc": "2.0", "id": next(ids), "method": method, "params": params}).encode()

        call_data = "0x" + (_CHANNELS + encode(["uint256"], [channel_id])).hex()
        call_params = [{"to": mpe_address, "data": call_data}, "latest"]

        async def aio(method: str, params: list[Any]) -> Any:
            async with session.post(
                anvil.url, data=body(method, params), headers={"Content-Type": "application/json"}
            ) as response:
                return json.loads(await response.read())["result"]

        async def tq(method: str, params: list[Any]) -> Any:
            headers: dict[bytes | str, bytes | str] = {b"Content-Type": b"application/json"}
            d = treq.post(anvil.url, data=body(method, params), headers=headers, pool=pool)
            response = await Deferred.asFuture(d, _loop)
            content: Deferred[bytes] = treq.content(response)
            return json.loads(await content.asFuture(_loop))["result"]

        reader = EthereumChainReader(
            JsonRpcClient(anvil.url, now=reactor.seconds),
            BlockNumber(60),
            network=network_info("local"),
            mpe_address=mpe_address,
        )

        async def ours_channel() -> Any:
            return await reader.channel(channel_id, fresh=True)

        async def ours_cached() -> Any:
            return await reader.channel(channel_id)

        async def web3_block() -> int:
            return await w3.eth.block_number

        async def web3_channel() -> Any:
            return await mpe.functions.channels(channel_id).call()

        async def aio_block() -> int:
            return int(await aio("eth_blockNumber", []), 16)

        async def aio_channel() -> Any:
            return decode(_CHANNEL_TYPES, bytes.fromhex((await aio("eth_call", call_params))[2:]))

        async def tq_block() -> int:
            return int(await tq("eth_blockNumber", []), 16)

        async def tq_channel() -> Any:
            return decode(_CHANNEL_TYPES, bytes.fromhex((await tq("eth_call", call_params))[2:]))

        # eth_abi returns lower-case addresses, web3 checksummed ones: compare the numbers.
        numbers = [
            tuple(c[i] for i in (0, 4, 5, 6)) for c in (await web3_channel(), await aio_channel(), await tq_channel())
        ]
        assert numbers[0] == numbers[1] == numbers[2], numbers
        for concurrency in args.concurrency:
            await measure("web3 eth_blockNumber", web3_block, args.calls, concurrency)
            await measure("aiohttp+json eth_blockNumber", aio_block, args.calls, concurrency)
            await measure("treq+json eth_blockNumber", tq_block, args.calls, concurrency)
            await measure("web3 channels(id)", web3_channel, args.calls, concurrency)
            await measure("aiohttp+eth-abi channels(id)", aio_channel, args.calls, concurrency)
            await measure("treq+eth-abi channels(id)", tq_channel, args.calls, concurrency)
            await measure("EthereumChainReader channels(id)", ours_channel, args.calls, concurrency)
            await measure("EthereumChainReader cached", ours_cached, args.calls, concurrency)
        await session.close()
        await reader.rpc.close()
        await w3.provider.disconnect()
        await Deferred.asFuture(pool.closeCachedConnections(), _loop)
    finally:
        anvil.stop()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    args = parser.parse_args()
    failure: list[BaseException] = []

    def done(result: object) -> None:
        if isinstance(result, BaseException):
            failure.append(result)
        reactor.stop()

    d = Deferred.fromFuture(asyncio.ensure_future(main(args)))
    d.addBoth(lambda r: done(r.value if hasattr(r, "value") else r))
    reactor.run()
    if failure:
        raise failure[0]


if __name__ == "__main__":
    run()
