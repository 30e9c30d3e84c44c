"""``service_type: jsonrpc``: each call becomes a JSON-RPC 2.0 request.

Compatible with the Go daemon: a call to ``/package.Service/Method`` is
POSTed to ``service_endpoint`` as::

    {"jsonrpc": "2.0", "method": "Method", "params": <request as JSON>, "id": <n>}

and the response's ``result`` is the reply message.  Go takes the request
message's bytes as the JSON ``params``, so its clients send JSON messages
(``encoding: json`` services, ``application/grpc+json``); those pass through
unchanged here too.  With the service's protos known, protobuf messages are
also accepted and converted both ways (original proto field names), which
Go cannot do.

A JSON-RPC ``error`` becomes a gRPC error whose message is the error's
``message``; the status follows :data:`ERROR_STATUS` (codes 1-16 are taken
as gRPC status codes, so a service can answer ``NOT_FOUND`` on purpose), and
the trailers carry the original code (``snet-jsonrpc-error-code``, JSON,
bounded) and ``data`` (``snet-jsonrpc-error-data``, JSON, bounded).  The HTTP status is
not checked when the body is a JSON-RPC response (servers answer errors with
4xx/5xx too); a body that is not one is ``UNAVAILABLE`` for a non-2xx status
and ``INTERNAL`` otherwise.

Streaming methods (Go reads only the first message): see
:func:`~snet_daemon.upstream.protos.relay_json`: one JSON-RPC request per
request message for bidirectional calls, one request whose ``params`` is the
array of all messages for client-streaming calls, and for server-streaming
calls a ``result`` that is an array is sent as one reply per element.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

from snet_daemon import jsontext
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.frontend.wire import Metadata
from snet_daemon.upstream.http import HttpClient, base_url, excerpt
from snet_daemon.upstream.protos import JsonMessages, ServiceProtos, relay_json, request_text

__all__ = ["ERROR_STATUS", "JsonRpcUpstream", "error_status"]

#: JSON-RPC error code -> gRPC status.  Codes 1..16 map to the gRPC status of
#: the same number; any other code is ``UNKNOWN``.
ERROR_STATUS: Final[Mapping[int, Status]] = MappingProxyType(
    {
        -32700: Status.INTERNAL,  # parse error: the daemon's request was not understood
        -32600: Status.INTERNAL,  # invalid request: likewise
        -32601: Status.UNIMPLEMENTED,  # method not found
        -32602: Status.INVALID_ARGUMENT,  # invalid params: the client's request
        -32603: Status.INTERNAL,  # internal error
    }
)
#: -32099..-32000: "server error", reserved for implementation-defined errors.
_SERVER_ERRORS = range(-32099, -32000 + 1)
#: Longest JSON-RPC error message or data passed on to the client.
_MAX_ERROR_TEXT: Final = 4096


def error_status(code: Any) -> Status:
    """The gRPC status for a JSON-RPC error ``code`` (see :data:`ERROR_STATUS`)."""
    if isinstance(code, bool) or not isinstance(code, int):
        return Status.UNKNOWN
    if code in ERROR_STATUS:
        return ERROR_STATUS[code]
    if code in _SERVER_ERRORS:
        return Status.INTERNAL
    if 1 <= code <= 16:
        return Status(code)
    return Status.UNKNOWN


def _bounded(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_TEXT else text[:_MAX_ERROR_TEXT] + "..."


def _rpc_error(error: Any) -> GrpcError:
    """The gRPC error for a JSON-RPC ``error`` member."""
    if not isinstance(error, dict):
        return GrpcError(Status.UNKNOWN, _bounded(f"JSON-RPC error: {json.dumps(error)}"))
    code = error.get("code")
    message = error.get("message")
    text = message if isinstance(message, str) else json.dumps(message)
    trailers: list[tuple[str, str | bytes]] = [("snet-jsonrpc-error-code", _bounded(json.dumps(code)))]
    if "data" in error:
        trailers.append(("snet-jsonrpc-error-data", _bounded(json.dumps(error["data"], separators=(",", ":")))))
    return GrpcError(error_status(code), _bounded(text), tuple(trailers))


class JsonRpcUpstream:
    """The handler for ``service_type: jsonrpc``.

    Args:
        client: the shared HTTP client.
        endpoint: ``service_endpoint`` (the JSON-RPC URL, posted to as is).
        protos: the service's protos, or None (then only JSON clients can
            be served, as with the Go daemon).
        encoding: the metadata's ``encoding``.
        max_message_size: the largest message, in bytes; responses may be
            up to four times as large (JSON is bigger than protobuf).
    """

    def __init__(
        self,
        client: HttpClient,
        endpoint: str,
        *,
        protos: ServiceProtos | None,
        encoding: str,
        max_message_size: int = 4 * 1024 * 1024,
    ) -> None:
        self.client = client
        self.url = base_url(endpoint)
        self.protos = protos
        self.encoding = encoding
        self._max_response = 4 * max_message_size + 1024 * 1024
        self._ids = itertools.count(1)

    async def __call__(self, call: ServerCall) -> None:
        """Serve ``call`` (metadata is not sent to JSON-RPC services, as in Go)."""
        await self.forward(call, call.metadata)

    async def forward(self, call: ServerCall, metadata: Metadata) -> None:
        """Serve ``call``; ``metadata`` is not forwarded (JSON-RPC services never got it in Go)."""
        messages = JsonMessages.for_call(call, self.protos, self.encoding)
        name = call.method.rsplit("/", 1)[-1]

        async def exchange(params: Any, emit: Callable[[Any], Awaitable[None]], many: bool) -> None:
            result = await self.request(name, params)
            if many and isinstance(result, list):
                for item in result:
                    await emit(item)
            else:
                await emit(result)

        await relay_json(call, messages, exchange, self._max_response)

    async def request(self, method: str, params: Any) -> Any:
        """One JSON-RPC call: the ``result``.

        Raises:
            GrpcError: the mapped JSON-RPC error; ``UNAVAILABLE`` when the
                service cannot be reached or answers a non-2xx status without
                a JSON-RPC body; ``INTERNAL`` for an answer that is not a
                JSON-RPC response to this request.
        """
        request_id = next(self._ids)
        body = request_text({"jsonrpc": "2.0", "method": method, "params": params, "id": request_id})
        response = await self.client.post(
            self.url, body, {"content-type": "application/json", "accept": "application/json"}
        )
        answer = await self.client.reader(response, self._max_response).read_all()
        try:
            document = jsontext.loads(answer)
        except (ValueError, UnicodeDecodeError, RecursionError):
            document = None
        if not isinstance(document, dict) or not ("result" in document or "error" in document):
            if not 200 <= response.code < 300:
                raise GrpcError(Status.UNAVAILABLE, f"service answered HTTP {response.code}: {excerpt(answer)}")
            raise GrpcError(Status.INTERNAL, f"service answer is not a JSON-RPC response: {excerpt(answer)}")
        if document.get("error") is not None:
            raise _rpc_error(document["error"])
        if document.get("id") != request_id:
            got = document.get("id")
            raise GrpcError(Status.INTERNAL, f"JSON-RPC response id {got!r} does not match the request's {request_id}")
        return document.get("result")
