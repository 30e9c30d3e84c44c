"""Paid against unpaid calls through snetd, side by side in one run.

A local chain (anvil) with the real contracts, metadata through the test
IPFS server, the example service, and two daemons in front of it: one with
payments (escrow, embedded etcd) and one without (``blockchain_enabled:
false``).  The same load generator (``benchmarks/_loadgen.py``, pinned to
CPU 1) drives both with 16 calls in flight; for the paid daemon each of the
16 workers pays on its own channel, one call after another, with
pre-signed cumulative amounts.  Daemons, etcd and the service share CPU 0.

    .venv/bin/python benchmarks/paid.py [--rounds 3] [--duration 4]

Prints calls/s, p50, p99 and daemon CPU per call for both, and the ratios.
With ``--rate N`` both daemons are offered N calls/s instead of as many as
they can serve: below both capacities the p50 difference is the latency the
payment check adds at equal load, without the queueing that a lower
capacity brings at 16 calls in flight.
Requires anvil (``scripts/setup``: npm) and etcd (``etcd-server``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from snet_daemon._proto import example_service_pb2 as pb  # noqa: E402
from snet_daemon.frontend.wire import frame  # noqa: E402
from snet_daemon.payments import signatures as sig  # noqa: E402
from tests.support.chain import SIGNER, shared_chain  # noqa: E402
from tests.support.daemon import Daemon  # noqa: E402
from tests.support.ipfs import IpfsServer  # noqa: E402
from tests.support.paid import PRICE, daemon_config, publish, wait_ready  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.upstream import ExampleServiceProcess  # noqa: E402

WORKERS = 16
_workers = WORKERS
#: Offered calls/s (``--rate``); None: each worker sends as soon as its last call returns.
_rate: float | None = None
PATH = "/example_service.Echo/Unary"
PROXY_CPU = "0"
LOAD_CPU = "1"


def _body() -> str:
    return frame(pb.EchoRequest(payload=b"x" * 32).SerializeToString()).hex()


def _paid_plan(port: int, mpe: bytes, channels: list[int], calls: int, duration: float) -> dict[str, Any]:
    key = bytes.fromhex(SIGNER.private_key[2:])
    body = _body()
    workers = []
    for channel_id in channels:
        requests = []
        for k in range(1, calls + 1):
            amount = k * PRICE
            signature = sig.sign(sig.mpe_claim(mpe, channel_id, 0, amount), key)
            headers = [
                ["snet-payment-type", "escrow"],
                ["snet-payment-channel-id", str(channel_id)],
                ["snet-payment-channel-nonce", "0"],
                ["snet-payment-channel-amount", str(amount)],
                ["snet-payment-channel-signature-bin", sig_b64(signature)],
            ]
            requests.append([headers, body])
        workers.append(requests)
    return _plan(port, duration, workers)


def sig_b64(signature: bytes) -> str:
    import base64

    return base64.b64encode(signature).decode().rstrip("=")


def _prepaid_token(chain: Any, address: str, channel_id: int, amount: int) -> str:
    """A prepaid token for ``amount`` cogs, asked as snet-sdk asks it."""
    import grpc

    from snet_daemon._proto.escrow import token_service_pb2 as tpb
    from snet_daemon._proto.escrow import token_service_pb2_grpc as tpb_grpc

    key = bytes.fromhex(SIGNER.private_key[2:])
    mpe = sig.address_bytes(chain.mpe.address)
    block = chain.block_number()
    claim = sig.sign(sig.mpe_claim(mpe, channel_id, 0, amount), key)
    request = tpb.TokenRequest(
        channel_id=channel_id,
        current_nonce=0,
        signed_amount=amount,
        signature=sig.sign(sig.token_request(claim, block), key),
        current_block=block,
        claim_signature=claim,
    )
    with grpc.insecure_channel(address) as channel:
        reply = tpb_grpc.TokenServiceStub(channel).GetToken(request, timeout=10)
    return str(reply.token)


def _prepaid_plan(port: int, channel_id: int, token: str, duration: float) -> dict[str, Any]:
    headers = [
        ["snet-payment-type", "prepaid-call"],
        ["snet-payment-channel-id", str(channel_id)],
        ["snet-payment-channel-nonce", "0"],
        ["snet-prepaid-auth-token-bin", sig_b64(token.encode())],
    ]
    return _repeating_plan(port, headers, duration)


def _unpaid_plan(port: int, duration: float) -> dict[str, Any]:
    return _repeating_plan(port, [], duration)


def _repeating_plan(port: int, headers: list[list[str]], duration: float) -> dict[str, Any]:
    """Every worker sends the same call (same headers) again and again."""
    return _plan(port, duration, [[[headers, _body()]] for _ in range(_workers)], cycle=True)


def _plan(port: int, duration: float, workers: list[Any], cycle: bool = False) -> dict[str, Any]:
    """A ``_loadgen.py`` plan against the daemon on ``port``."""
    return {
        "host": "127.0.0.1",
        "port": port,
        "path": PATH,
        "connections": 4,
        "duration": duration,
        "cycle": cycle,
        "rate": _rate,
        "workers": workers,
    }


def _measure(plan: dict[str, Any], pids: list[int], workdir: Path) -> dict[str, Any]:
    path = workdir / "plan.json"
    path.write_text(json.dumps(plan))
    # Each process once, by its own counters: ``pids`` lists the daemon's
    # children (embedded etcd) explicitly, so a tree sum would count them twice.
    each_before = [_own_cpu(pid) for pid in pids]
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, sys.executable, str(REPO / "benchmarks" / "_loadgen.py"), str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    each_after = [_own_cpu(pid) for pid in pids]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    calls = max(result["ok"], 1)
    result["daemon_us_per_call"] = (sum(each_after) - sum(each_before)) / calls * 1e6
    result["split_us_per_call"] = {
        str(pid): round((a - b) / calls * 1e6) for pid, a, b in zip(pids, each_after, each_before, strict=True)
    }
    return result


def _calls_per_worker(args: argparse.Namespace) -> int:
    """Pre-signed calls per paid worker: more than it can make in the run.

    A worker makes one call at a time, so it cannot exceed about 1,500
    calls/s (0.7 ms a call on loopback); all workers together stay below
    4,000 calls/s on these machines (the unpaid daemon's rate).  A worker
    that runs out anyway is reported (``exhausted_workers``).
    """
    per_second = min(1500.0, 4000.0 / args.workers)
    if args.rate:
        per_second = min(per_second, 1.5 * args.rate / args.workers)
    return int(args.duration * per_second) + 100


def _own_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` alone (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def _descendants(pid: int) -> list[int]:
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        found += [int(child), *_descendants(int(child))]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=WORKERS, help="calls in flight (one channel each)")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="offer this many calls/s (all workers together) to both daemons instead of sending as fast as "
        "calls return; below both capacities, the p50 difference is what the payment check adds at equal load",
    )
    parser.add_argument(
        "--mode",
        choices=("escrow", "prepaid"),
        default="escrow",
        help="escrow: each worker pays per call on its own channel; prepaid: all workers spend one "
        "prepaid token on ONE channel (the concurrency mode; use --workers 64)",
    )
    parser.add_argument(
        "--storage",
        choices=("embedded", "memory"),
        default="embedded",
        help="payment storage of the paid daemon: embedded etcd (as deployed) or in-process memory "
        "(isolates the daemon's own payment cost from etcd's)",
    )
    args = parser.parse_args()
    global _workers, _rate
    _workers = args.workers
    _rate = args.rate

    workdir = Path(tempfile.mkdtemp(prefix="snetd-paid-bench-"))
    chain = shared_chain()
    ipfs = IpfsServer().start()
    service = ExampleServiceProcess(free_port(), ("taskset", "-c", PROXY_CPU))
    prefix = ["taskset", "-c", PROXY_CPU]
    (workdir / "paid").mkdir()
    paid = Daemon(workdir / "paid", {}, prefix=prefix)
    extra: dict[str, Any] = {"log": {"level": "warn"}}
    if args.storage == "memory":
        extra["payment_channel_storage_type"] = "memory"
    paid.config.update(daemon_config(chain, ipfs, service, workdir / "paid", extra=extra))  # type: ignore[arg-type]
    paid.config_path.write_text(json.dumps(paid.config))
    etcd_url = f"http://127.0.0.1:{paid.config['payment_channel_storage_server']['client_port']}"
    publish(chain, ipfs, paid.port, etcd_endpoints=(etcd_url,))
    unpaid = Daemon(workdir, {"service_endpoint": service.endpoint, "log": {"level": "warn"}}, prefix=prefix)
    results: dict[str, list[dict[str, Any]]] = {"paid": [], "unpaid": []}
    try:
        paid.start(60)
        unpaid.start()
        wait_ready(paid)
        mpe = sig.address_bytes(chain.mpe.address)
        for round_ in range(args.rounds):
            # Unpaid first, paid second, then swapped: drift hits both alike.
            order = ["unpaid", "paid"] if round_ % 2 == 0 else ["paid", "unpaid"]
            for kind in order:
                if kind == "paid" and args.mode == "prepaid":
                    channel_id = chain.open_channel(amount=10**9)
                    token = _prepaid_token(chain, paid.address, channel_id, amount=10**8)
                    plan = _prepaid_plan(paid.port, channel_id, token, args.duration)
                    pids = [paid.process.pid, *_descendants(paid.process.pid), service.process.pid]  # type: ignore[union-attr]
                elif kind == "paid":
                    channels = [chain.open_channel(amount=10**9) for _ in range(_workers)]
                    plan = _paid_plan(paid.port, mpe, channels, calls=_calls_per_worker(args), duration=args.duration)
                    pids = [paid.process.pid, *_descendants(paid.process.pid), service.process.pid]  # type: ignore[union-attr]
                else:
                    plan = _unpaid_plan(unpaid.port, args.duration)
                    pids = [unpaid.process.pid, service.process.pid]  # type: ignore[union-attr]
                result = _measure(plan, pids, workdir)
                results[kind].append(result)
                if result["exhausted_workers"]:
                    print(f"warning: {result['exhausted_workers']} workers ran out of pre-signed calls", flush=True)
                if _rate and abs(result["calls_per_second"] - _rate) > 0.02 * _rate:
                    print(
                        f"warning: achieved {result['calls_per_second']:.0f} calls/s, offered {_rate:g}: "
                        "not at equal load",
                        flush=True,
                    )
                print(
                    f"round {round_ + 1} {kind:7s} {result['calls_per_second']:8.0f} calls/s  "
                    f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
                    f"servers CPU {result['daemon_us_per_call']:.0f} us/call  failures {result['failures']}  "
                    f"by pid {result['split_us_per_call']}",
                    flush=True,
                )
    finally:
        paid.stop()
        unpaid.stop()
        service.stop()
        ipfs.stop()

    def median(kind: str, key: str) -> float:
        return float(statistics.median(r[key] for r in results[kind]))

    print()
    print(f"{'':8s} {'calls/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'CPU us/call':>12s}")
    for kind in ("unpaid", "paid"):
        print(
            f"{kind:8s} {median(kind, 'calls_per_second'):9.0f} {median(kind, 'p50_ms'):8.2f} "
            f"{median(kind, 'p99_ms'):8.2f} {median(kind, 'daemon_us_per_call'):12.0f}"
        )
    ratios = [
        p["calls_per_second"] / u["calls_per_second"] for p, u in zip(results["paid"], results["unpaid"], strict=True)
    ]
    added = [p["p50_ms"] - u["p50_ms"] for p, u in zip(results["paid"], results["unpaid"], strict=True)]
    print(f"paid/unpaid calls/s (median of per-round ratios): {statistics.median(ratios):.2f}x")
    print(f"p50 added by payments (median of per-round differences): {statistics.median(added):.2f} ms")
    if args.mode == "prepaid":
        print(f"({_workers} calls in flight, all on ONE channel with one prepaid token)")
    else:
        print(f"({_workers} calls in flight; each paid worker pays on its own channel, calls sequential per channel)")
    if _rate:
        print(f"(offered {_rate:g} calls/s to each daemon: at equal load compare p50, not calls/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
