"""A small HTTP/2 gRPC load generator whose calls can carry different headers.

h2load replays one fixed request, which cannot pay: every paid call needs
its own signed amount.  This generator runs *workers*, each sending calls
one after another from its own list of (headers, body) requests, over a few
shared HTTP/2 connections, and records each call's latency.  Run it as a
separate process pinned to its own CPU: ``python -m benchmarks._loadgen
<plan.json>``; it prints one JSON line of results.

The plan (JSON): ``{"host", "port", "path", "connections", "duration",
"cycle", "rate", "workers": [[[headers...], body_hex], ...]]}``; with
``cycle`` each worker repeats its list, otherwise it stops at its end (a
paid worker's list never repeats: each call pays a new cumulative amount).
With ``rate`` (calls/s, all workers together) each worker waits for its
next slot before sending, so the load is offered at that rate instead of as
fast as calls return; two servers then compare at the same load.  A call's
latency then counts from its slot, so a server that falls behind is charged
for the wait, and the caller compares the achieved rate with the offered
one.  ``exhausted_workers`` in the result counts workers whose list ended
before the duration did.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import h2.config
import h2.connection
import h2.events


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.waiting: dict[int, asyncio.Future[str]] = {}
        self.status: dict[int, str] = {}
        self.writer.write(self.h2.data_to_send())

    async def pump(self) -> None:
        while True:
            data = await self.reader.read(1 << 16)
            if not data:
                for future in self.waiting.values():
                    if not future.done():
                        future.set_result("closed")
                return
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    for name, value in event.headers:
                        if name == b"grpc-status":
                            self.status[event.stream_id] = value.decode()
                elif isinstance(event, h2.events.StreamEnded):
                    future = self.waiting.pop(event.stream_id, None)  # type: ignore[arg-type]
                    if future is not None and not future.done():
                        future.set_result(self.status.pop(event.stream_id, "?"))
                elif isinstance(event, h2.events.StreamReset):
                    future = self.waiting.pop(event.stream_id, None)  # type: ignore[arg-type]
                    if future is not None and not future.done():
                        future.set_result("reset")
            out = self.h2.data_to_send()
            if out:
                self.writer.write(out)

    async def call(self, authority: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> str:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            sid,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path.encode()),
                (b":authority", authority.encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                *headers,
            ],
        )
        self.h2.send_data(sid, body, end_stream=True)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiting[sid] = future
        self.writer.write(self.h2.data_to_send())
        return await future


async def run(plan: dict[str, Any]) -> dict[str, Any]:
    host, port, path = plan["host"], plan["port"], plan["path"]
    conns = []
    pumps = []
    for _ in range(plan["connections"]):
        reader, writer = await asyncio.open_connection(host, port)
        conn = _Conn(reader, writer)
        conns.append(conn)
        pumps.append(asyncio.ensure_future(conn.pump()))
    latencies: list[float] = []
    failures: dict[str, int] = {}
    authority = f"{host}:{port}"
    cycle = bool(plan.get("cycle"))
    rate = plan.get("rate")
    # Each worker's slots: one every workers / rate seconds, staggered.
    interval = len(plan["workers"]) / rate if rate else 0.0
    # Every request is built before the clock starts: a paid plan holds
    # thousands per worker, an unpaid one a single request.
    prepared = [
        [
            (
                [(k.encode(), bytes.fromhex(v[4:]) if v.startswith("hex:") else v.encode()) for k, v in hs],
                bytes.fromhex(b),
            )
            for hs, b in requests
        ]
        for requests in plan["workers"]
    ]
    #: Workers whose list ended before the duration did (fewer calls in
    #: flight from then on: the plan was too short).
    exhausted = 0
    started = time.monotonic()
    stop_at = started + plan["duration"]

    async def worker(index: int, requests: list[Any]) -> None:
        nonlocal exhausted
        conn = conns[index % len(conns)]
        i = 0
        next_at = started + index * interval / len(plan["workers"])
        while time.monotonic() < stop_at:
            if not cycle and i >= len(requests):
                exhausted += 1
                return
            if interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                # Latency counts from the slot, not from the send: a late
                # send is time the caller waited (no coordinated omission).
                start = next_at
                next_at += interval
            else:
                start = time.monotonic()
            headers, body = requests[i % len(requests)]
            i += 1
            status = await conn.call(authority, path, headers, body)
            if status == "0":
                latencies.append(time.monotonic() - start)
            else:
                failures[status] = failures.get(status, 0) + 1

    await asyncio.gather(*(worker(i, reqs) for i, reqs in enumerate(prepared)))
    elapsed = time.monotonic() - started
    for pump in pumps:
        pump.cancel()
    latencies.sort()

    def pct(p: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else None

    return {
        "ok": len(latencies),
        "failures": failures,
        "seconds": elapsed,
        "calls_per_second": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "exhausted_workers": exhausted,
    }


def main() -> None:
    with open(sys.argv[1]) as handle:
        plan = json.load(handle)
    print(json.dumps(asyncio.run(run(plan))))


if __name__ == "__main__":
    main()
