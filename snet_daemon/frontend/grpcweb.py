"""gRPC-Web encoding, without any I/O (``PROTOCOL-WEB.md``).

gRPC-Web differs from native gRPC in three ways this module handles: the
trailers travel inside the body as a frame whose flag byte has bit 0x80 set;
the ``-text`` content types base64-encode the whole body; and browsers need
CORS.  Requests are never client-streaming, but replies may stream.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from typing import Final

from snet_daemon.frontend.status import GrpcError, Status

_TRAILER_FLAG: Final = 0x80

#: Response headers a browser script may always read (CORS); the names of
#: the metadata a response carries are added to them (CorsPolicy), as the Go
#: daemon's grpcweb wrapper exposes every header of its responses.
EXPOSED_HEADERS: Final = (
    "x-grpc-web",
    "grpc-encoding",
    "grpc-status",
    "grpc-message",
    "grpc-timeout",
    "grpc-accept-encoding",
    "grpc-status-details-bin",
    "retry-after",
)


def parse_content_type(value: str) -> tuple[bool, str] | None:
    """Classify a gRPC-Web content type.

    Returns:
        ``(text_mode, reply_content_type)`` for ``application/grpc-web`` and
        ``application/grpc-web-text`` (optionally ``+proto``, ``+json`` or
        with parameters), else None.  The reply uses the request's type.
    """
    base = value.split(";", 1)[0].strip().lower()
    if base.startswith("application/grpc-web-text"):
        rest = base[len("application/grpc-web-text") :]
        text = True
    elif base.startswith("application/grpc-web"):
        rest = base[len("application/grpc-web") :]
        text = False
    else:
        return None
    if rest not in ("", "+proto", "+json"):
        return None
    return text, base


def trailer_frame(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Encode trailers as the body frame gRPC-Web uses for them.

    Header names are lower-case and each line ends in CRLF, as the spec asks.
    """
    block = "".join(f"{name.lower()}: {value}\r\n" for name, value in pairs).encode("utf-8")
    return bytes((_TRAILER_FLAG,)) + len(block).to_bytes(4, "big") + block


#: A base64 segment up to and including its padding (linear on a chunk
#: that ends with padding: see TextDecoder.feed).
_SEGMENT: Final = re.compile(rb"[^=]*=+")

#: Padded base64 segments a grpc-web-text body may hold beyond one per
#: :data:`_SEGMENT_SPAN` characters.  Each costs a decode call (about 1 us):
#: a body of nothing but ``AA==`` held the event loop for half a second.
#: grpc-web's JavaScript client encodes a request as one base64 string (and
#: connect-es sends binary gRPC-Web only): one padded segment per message.
#: Only a client streaming messages under 1 KiB, each padded on its own,
#: would come near the bound, after some 180 of them.
_FREE_SEGMENTS: Final = 64
_SEGMENT_SPAN: Final = 1024


class TextDecoder:
    """Decodes a ``grpc-web-text`` request body that may arrive in pieces.

    The body is base64; clients may send several independently padded
    segments one after another, so each 4-character group is decoded on its
    own terms rather than the body as a whole.
    """

    __slots__ = ("_pending", "_seen", "_segments")

    def __init__(self) -> None:
        self._pending = b""
        self._segments = 0
        self._seen = 0

    def feed(self, data: bytes) -> bytes:
        """Return the bytes decoded from ``data`` (and earlier leftovers).

        Raises:
            GrpcError: ``INVALID_ARGUMENT`` for a body that is not base64.
        """
        data = self._pending + data.replace(b"\r", b"").replace(b"\n", b"")
        usable = len(data) - len(data) % 4
        self._pending = data[usable:]
        chunk = data[:usable]
        if not chunk:
            return b""
        self._seen += usable
        padding = chunk.count(b"=")
        if padding:
            # One segment per "=" or "==" ending (counted in C, before any
            # work per segment).
            self._segments += padding - chunk.count(b"==")
            if self._segments > _FREE_SEGMENTS + self._seen // _SEGMENT_SPAN:
                raise GrpcError(Status.INVALID_ARGUMENT, "grpc-web-text body split into too many padded segments")
        try:
            if b"=" not in chunk[:-4]:
                return base64.b64decode(chunk, validate=True)
            # Padded segments in the middle: decode segment by segment, each
            # up to its padding (a decode call per 4 characters let one body
            # hold the event loop for most of a second).
            end = chunk.rfind(b"=") + 1
            head, tail = chunk[:end], chunk[end:]
            out = b"".join([binascii.a2b_base64(part, strict_mode=True) for part in _SEGMENT.findall(head)])
            return out + binascii.a2b_base64(tail, strict_mode=True) if tail else out
        except (binascii.Error, ValueError) as exc:
            raise GrpcError(Status.INVALID_ARGUMENT, "malformed grpc-web-text body") from exc

    def finish(self) -> None:
        """Check that nothing undecodable is left at the end of the body.

        Raises:
            GrpcError: ``INVALID_ARGUMENT`` when a partial group remains.
        """
        if self._pending:
            raise GrpcError(Status.INVALID_ARGUMENT, "truncated grpc-web-text body")


def encode_text(data: bytes) -> bytes:
    """Base64-encode one reply chunk for ``grpc-web-text``.

    Each chunk is padded on its own, which gRPC-Web clients accept; it lets
    every streamed message reach the browser as soon as it is sent.
    """
    return base64.b64encode(data)
