"""The example gRPC service bundled with snetd.

The demo puts it behind the daemon; tests and benchmarks call it through the
daemon.  Its protocol is ``protos/example_service.proto``.
"""
