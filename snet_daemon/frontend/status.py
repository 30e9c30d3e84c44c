"""gRPC status codes and the one exception type that carries them.

Kept free of any ``grpc`` import: the front end speaks gRPC on the wire
itself, and the payment code must be testable without grpcio.
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """The canonical gRPC status codes (``grpc/status.h``).

    ``INCORRECT_NONCE`` (1000) is not canonical: the Go daemon invented it for
    a payment whose nonce is not the channel's current one, and the
    SingularityNET clients look for it, so it is part of the wire protocol.
    """

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16
    INCORRECT_NONCE = 1000


class GrpcError(Exception):
    """A call failed with a gRPC status that the client should see as is.

    Raise it from any handler; the front end turns it into trailers (or a
    trailers-only response).  The message is sent to the client, so it must
    never contain secrets.  Anything else a handler raises becomes
    ``INTERNAL`` with a generic message, and the traceback goes to the log.

    Args:
        status: the status code (a :class:`Status` or a plain int, for codes
            passed through from an upstream service unchanged).
        message: the ``grpc-message`` text.
        trailers: extra trailing metadata, e.g. from the upstream service.
    """

    def __init__(
        self,
        status: Status | int,
        message: str = "",
        trailers: tuple[tuple[str, str | bytes], ...] = (),
    ) -> None:
        super().__init__(status, message)
        self.status = int(status)
        self.message = message
        self.trailers = trailers

    def __str__(self) -> str:
        try:
            name = Status(self.status).name
        except ValueError:
            name = str(self.status)
        return f"{name}: {self.message}"
