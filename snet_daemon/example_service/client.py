"""Call the example service, usually through snetd.

``python -m snet_daemon.example_service.client --endpoint 127.0.0.1:8080 add 2 3``
prints the result (``add(2, 3) = 5``), or the gRPC error and exits 1.  It
is the plain grpcio client an AI-service consumer would write.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon._proto import example_service_pb2_grpc as pb_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", default="127.0.0.1:8080", help="host:port of snetd (or the service)")
    parser.add_argument("operation", choices=["add", "sub", "mul", "div"])
    parser.add_argument("a", type=float)
    parser.add_argument("b", type=float)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.endpoint) as channel:
        method = getattr(pb_grpc.CalculatorStub(channel), args.operation)
        try:
            result = method(pb.Numbers(a=args.a, b=args.b), timeout=args.timeout)
        except grpc.RpcError as error:
            print(f"{args.operation}({args.a:g}, {args.b:g}) failed: {error.code().name}: {error.details()}")
            return 1
    print(f"{args.operation}({args.a:g}, {args.b:g}) = {result.value:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
