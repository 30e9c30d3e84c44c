"""snetd: the SingularityNET daemon on Twisted.

A sidecar proxy in front of an AI service: it serves gRPC and gRPC-Web on one
port, checks each call's payment, and forwards paid calls to the service.
The composition root is :mod:`snet_daemon.tap`.
"""

__version__ = "0.1.0"
