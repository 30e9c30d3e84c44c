"""The daemon's one public port: native gRPC, gRPC-Web and plain HTTP.

Layers, from the wire up: :mod:`wire` and :mod:`grpcweb` (sans-I/O
encodings), :mod:`http2` and :mod:`http1` (the two transports),
:mod:`listener` (choosing between them per connection), :mod:`call` (the
call object handlers see) and :mod:`gateway` (routing and limits).
"""
