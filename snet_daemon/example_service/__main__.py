"""``python -m snet_daemon.example_service [--host H] [--port P]``: run the example service."""

from __future__ import annotations

import argparse
import asyncio

from snet_daemon.example_service.server import build_server


async def _serve(host: str, port: int) -> None:
    server, bound = build_server(f"{host}:{port}")
    await server.start()
    print(f"example service listening on {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
