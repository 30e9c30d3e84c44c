"""Storage benchmark: compare-and-swap transactions per second against embedded etcd.

Usage::

    .venv/bin/python benchmarks/storage.py                  # ~30 s
    .venv/bin/python benchmarks/storage.py --inflight 1,16 --rounds 1 --duration 1

What it measures, from inside a Twisted asyncio-reactor event loop (the
daemon's runtime): an etcd transaction "if the key's mod revision is still R,
put a new value" -- the conditional write every paid call makes -- repeated
by N concurrent workers, each on its own key (so every transaction succeeds
and the numbers are throughput, not contention).

Clients, measured side by side in each round (order alternating between
rounds, so drift of a shared machine hits both):

* ``EtcdStorage`` -- ours (``snet_daemon.storage.etcd``);
* ``aetcd`` -- a raw ``aetcd.Client``, the baseline.

Also measured for ours only: the payment pattern (``get_many`` of two keys,
then a transaction conditioned on both), which is two round trips.

The etcd server is the embedded one (``EmbeddedEtcd``), started by the script
in a temporary directory on free ports and stopped at the end.  Ratios are
computed per round (paired) and their median is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Workload(Protocol):
    """One kind of operation: per-worker setup, then one operation at a time."""

    async def setup(self, index: int) -> Any:
        """Prepare worker ``index``; return its state."""

    async def once(self, index: int, state: Any) -> Any:
        """Do one operation; return the next state."""


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def measure(workload: Workload, inflight: int, duration: float, warmup: float) -> tuple[float, float]:
    """Run ``inflight`` workers after a warm-up.

    Returns:
        Completed operations per second, and this process's CPU time per
        operation in microseconds (the client's cost, whatever etcd does).
    """
    done = [0] * inflight
    stop = False

    async def worker(index: int) -> None:
        state = await workload.setup(index)
        while not stop:
            state = await workload.once(index, state)
            done[index] += 1

    tasks = [asyncio.ensure_future(worker(index)) for index in range(inflight)]
    await asyncio.sleep(warmup)
    before, start, cpu_start = sum(done), time.perf_counter(), time.process_time()
    await asyncio.sleep(duration)
    after, end, cpu_end = sum(done), time.perf_counter(), time.process_time()
    stop = True
    await asyncio.gather(*tasks)
    operations = max(after - before, 1)
    return operations / (end - start), (cpu_end - cpu_start) / operations * 1e6


class OursCas:
    """CAS through EtcdStorage.transaction."""

    def __init__(self, storage: Any, tag: str) -> None:
        self.storage = storage
        self.tag = tag

    async def setup(self, index: int) -> tuple[str, int]:
        key = f"bench/{self.tag}/{index}"
        return key, await self.storage.put(key, b"0")

    async def once(self, index: int, state: tuple[str, int]) -> tuple[str, int]:
        from snet_daemon.storage.base import Condition, Put

        key, revision = state
        revision = await self.storage.transaction([Condition(key, mod_revision=revision)], [Put(key, b"x" * 64)])
        return key, revision


class OursPayment:
    """The payment pattern: read two keys in one round trip, then a transaction on both."""

    def __init__(self, storage: Any, tag: str) -> None:
        self.storage = storage
        self.tag = tag

    async def setup(self, index: int) -> tuple[str, str]:
        state, hold = f"bench/{self.tag}/{index}/state", f"bench/{self.tag}/{index}/hold"
        await self.storage.put(state, b"0")
        return state, hold

    async def once(self, index: int, keys: tuple[str, str]) -> tuple[str, str]:
        from snet_daemon.storage.base import Condition, Put

        state, hold = keys
        seen = await self.storage.get_many([state, hold])
        await self.storage.transaction(
            [Condition.unchanged(state, seen[state]), Condition.unchanged(hold, seen[hold])],
            [Put(state, b"y" * 200)],
        )
        return keys


class AetcdCas:
    """The same CAS through a raw aetcd.Client."""

    def __init__(self, client: Any, tag: str) -> None:
        self.client = client
        self.tag = tag

    async def setup(self, index: int) -> tuple[bytes, int]:
        key = f"bench/{self.tag}/{index}".encode()
        put = await self.client.put(key, b"0")
        return key, put.header.revision

    async def once(self, index: int, state: tuple[bytes, int]) -> tuple[bytes, int]:
        key, revision = state
        txn = self.client.transactions
        succeeded, responses = await self.client.transaction(
            compare=[txn.mod(key) == revision], success=[txn.put(key, b"x" * 64)], failure=[]
        )
        assert succeeded
        return key, responses[0].response_put.header.revision


async def point(
    client: str, op: str, workload: Workload, inflight: int, round_index: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Measure one point and print it as it comes."""
    rate, cpu = await measure(workload, inflight, args.duration, args.warmup)
    print(
        f"  {op:7} {client:5} in flight {inflight:3} round {round_index}: {rate:8.0f}/s {cpu:5.0f} us CPU/op",
        flush=True,
    )
    return {"client": client, "op": op, "inflight": inflight, "round": round_index, "rate": rate, "cpu_us": cpu}


async def bench(args: argparse.Namespace, reactor: Any) -> list[dict[str, Any]]:
    """Start embedded etcd, measure every point, stop etcd."""
    import aetcd  # type: ignore[import-untyped]

    from snet_daemon.config.sections import StorageServerSettings
    from snet_daemon.storage.embedded import EmbeddedEtcd
    from snet_daemon.storage.etcd import EtcdStorage

    workdir = Path(tempfile.mkdtemp(prefix="snetd-storage-bench-"))
    client_port, peer_port = free_port(), free_port()
    settings = StorageServerSettings(
        name="bench",
        scheme="http",
        host="127.0.0.1",
        client_port=client_port,
        peer_port=peer_port,
        token="bench",
        cluster=f"bench=http://127.0.0.1:{peer_port}",
        startup_timeout=30.0,
        data_dir="etcd-data",
        log_level="warn",
        log_outputs=("etcd.log",),
        enabled=True,
    )
    etcd = EmbeddedEtcd(settings, reactor, reactor, workdir=workdir)
    etcd.startService()
    points: list[dict[str, Any]] = []
    ours = EtcdStorage([etcd.client_url], request_timeout=10.0)
    raw = aetcd.Client(host="127.0.0.1", port=client_port, timeout=10)
    try:
        await etcd.ready()
        print(f"etcd {await ours.open()} at {etcd.client_url} (pid {etcd.pid}), data in {workdir}", flush=True)
        await raw.connect()
        clients: dict[str, Any] = {
            "ours": lambda tag: OursCas(ours, tag),
            "aetcd": lambda tag: AetcdCas(raw, tag),
        }
        for inflight in args.inflight:
            for round_index in range(args.rounds):
                order = ["ours", "aetcd"] if round_index % 2 == 0 else ["aetcd", "ours"]
                for name in order:
                    workload = clients[name](f"{name}-{inflight}-{round_index}")
                    points.append(await point(name, "cas", workload, inflight, round_index, args))
                if args.payment:
                    workload = OursPayment(ours, f"pay-{inflight}-{round_index}")
                    points.append(await point("ours", "payment", workload, inflight, round_index, args))
    finally:
        await ours.close()
        await raw.close()
        await etcd.stopService().asFuture(asyncio.get_running_loop())
        shutil.rmtree(workdir, ignore_errors=True)
    return points


def report(points: list[dict[str, Any]], inflight: list[int], rounds: int) -> str:
    """The table: median rates per client and the median of paired ratios."""

    def values(client: str, op: str, level: int, metric: str = "rate") -> list[float]:
        wanted = (client, op, level)
        by_round = {p["round"]: p[metric] for p in points if (p["client"], p["op"], p["inflight"]) == wanted}
        return [by_round[r] for r in range(rounds) if r in by_round]

    def paired(a: list[float], b: list[float]) -> str:
        return f"{statistics.median(x / y for x, y in zip(a, b, strict=False)):.2f}" if a and b else "-"

    def median(v: list[float], unit: str = "") -> str:
        return f"{statistics.median(v):,.0f}{unit}" if v else "-"

    lines = [
        "| in flight | EtcdStorage CAS/s | raw aetcd CAS/s | ratio | client CPU/op: ours | aetcd | ratio "
        "| payment pattern/s (get_many + txn) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in inflight:
        ours, raw = values("ours", "cas", level), values("aetcd", "cas", level)
        ours_cpu, raw_cpu = values("ours", "cas", level, "cpu_us"), values("aetcd", "cas", level, "cpu_us")
        payment = values("ours", "payment", level)
        lines.append(
            f"| {level} | {median(ours)} | {median(raw)} | {paired(ours, raw)} "
            f"| {median(ours_cpu, ' us')} | {median(raw_cpu, ' us')} | {paired(ours_cpu, raw_cpu)} "
            f"| {median(payment)} |"
        )
    return "\n".join(lines)


def main() -> int:
    """Parse arguments, run the benchmark on the asyncio reactor, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--inflight", default="1,16,64", help="concurrent workers per point (comma list)")
    parser.add_argument("--rounds", type=int, default=2, help="repetitions per point (paired ratios, median)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=0.3, help="unmeasured seconds before each point")
    parser.add_argument("--no-payment", dest="payment", action="store_false", help="skip the payment-pattern rows")
    args = parser.parse_args()
    args.inflight = [int(level) for level in args.inflight.split(",")]

    from twisted.internet import asyncioreactor

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    outcome: list[Any] = []

    def start() -> None:
        done = Deferred.fromFuture(asyncio.ensure_future(bench(args, reactor)))
        done.addBoth(outcome.append)
        done.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome or not isinstance(outcome[0], list):
        print(f"benchmark failed: {outcome[0] if outcome else 'no result'}", file=sys.stderr)
        return 1
    print()
    print(f"CAS = one etcd Txn (mod_revision == R ? put); {args.duration:g} s x {args.rounds} rounds per point;")
    print(f"{os.cpu_count()} CPUs shared by etcd, the client and everything else on the machine.")
    print(report(outcome[0], args.inflight, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
