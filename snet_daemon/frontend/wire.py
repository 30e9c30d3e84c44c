"""gRPC on the wire, without any I/O: message framing, timeouts, metadata.

Everything here is a pure function or a small state machine fed with bytes,
shared by the native gRPC (HTTP/2) and the gRPC-Web front ends.  The
references are gRPC's ``PROTOCOL-HTTP2.md`` and ``PROTOCOL-WEB.md``.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from collections.abc import Iterable, Iterator
from typing import Final, cast

from hpack import NeverIndexedHeaderTuple

from snet_daemon.frontend.status import GrpcError, Status

#: A metadata value is text, or bytes for keys ending in ``-bin``.
MetadataValue = str | bytes
Metadata = tuple[tuple[str, MetadataValue], ...]

HEADER_LEN: Final = 5
_FLAG_COMPRESSED: Final = 0x01

#: Compression we can undo on requests.  We never compress replies.
ACCEPT_ENCODING: Final = "identity,deflate,gzip"

#: Request headers that describe one HTTP hop or the gRPC transport itself.
#: They are consumed by the daemon and never forwarded to the service as
#: metadata (the upstream client writes its own).
RESERVED_HEADERS: Final = frozenset(
    {
        "content-type",
        "te",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-message-type",
        "user-agent",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
        "x-grpc-web",
        "x-user-agent",
        "origin",
        "referer",
        "accept",
        "accept-language",
        "cache-control",
        "pragma",
        "priority",
    }
)


#: Headers whose values change with every call (amounts, signatures, the
#: remaining deadline).  They are sent as HPACK "never indexed" literals:
#: adding them to the compression table would only evict useful entries, at
#: a measurable cost per call, and signatures are what RFC 7541 §7.1.3 asks
#: to keep out of the table anyway.
NEVER_INDEXED: Final = frozenset(
    {
        "grpc-timeout",
        "snet-payment-channel-nonce",
        "snet-payment-channel-amount",
        "snet-payment-channel-signature-bin",
        "snet-free-call-auth-token-bin",
        "snet-prepaid-auth-token-bin",
        "snet-current-block-number",
    }
)


def frame(message: bytes) -> bytes:
    """Return ``message`` as one uncompressed length-prefixed gRPC message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


class MessageDecoder:
    """Splits a byte stream into gRPC messages, enforcing the size limit.

    Feed it the DATA payload of one request as it arrives; it returns each
    complete message once.  It keeps at most one partial message.

    Args:
        max_message_size: largest message accepted, in bytes.  A larger
            length prefix fails at once with ``RESOURCE_EXHAUSTED``, before
            the daemon buffers the body.
        encoding: the request's ``grpc-encoding`` (``identity`` when absent).
            It must be validated with :func:`check_encoding` first.
        max_messages: most messages one :meth:`feed` may return (None: no
            limit).  For a body that arrives whole, where a client could
            otherwise pack a million empty messages into a few megabytes and
            have them all split in one go.
    """

    __slots__ = ("_buffer", "_encoding", "_max", "_max_messages", "pending")

    def __init__(self, max_message_size: int, encoding: str = "identity", max_messages: int | None = None) -> None:
        self._buffer = bytearray()
        self._max = max_message_size
        self._max_messages = -1 if max_messages is None else max_messages
        self._encoding = encoding
        #: Bytes of the message currently being assembled (0 between messages).
        self.pending = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` and return the messages it completes (maybe none).

        Raises:
            GrpcError: ``RESOURCE_EXHAUSTED`` for an oversized message or
                more messages than ``max_messages``, ``INTERNAL`` for a
                compressed message without an encoding or one that does
                not decompress.
        """
        buf = self._buffer
        if not buf and len(data) >= HEADER_LEN:
            # Fast path: one whole message in one chunk (every small unary
            # request from grpcio arrives like this).
            length = int.from_bytes(data[1:5], "big")
            if len(data) == HEADER_LEN + length and not data[0]:
                self._check_length(length)
                return [data[HEADER_LEN:]]
        buf += data
        messages: list[bytes] = []
        limit = self._max_messages
        while len(buf) >= HEADER_LEN:
            if len(messages) == limit:
                raise GrpcError(Status.RESOURCE_EXHAUSTED, f"too many request messages (more than {limit})")
            flag = buf[0]
            length = int.from_bytes(buf[1:5], "big")
            self._check_length(length)
            end = HEADER_LEN + length
            if len(buf) < end:
                break
            payload = bytes(buf[HEADER_LEN:end])
            del buf[:end]
            if flag & _FLAG_COMPRESSED:
                payload = self._decompress(payload)
            elif flag:
                raise GrpcError(Status.INTERNAL, f"invalid gRPC message flags 0x{flag:02x}")
            messages.append(payload)
        self.pending = len(buf)
        return messages

    def at_boundary(self) -> bool:
        """True when no partial message is buffered (a clean end of stream)."""
        return not self._buffer

    def _check_length(self, length: int) -> None:
        if length > self._max:
            raise GrpcError(
                Status.RESOURCE_EXHAUSTED,
                f"received message larger than max ({length} vs. {self._max})",
            )

    def _decompress(self, payload: bytes) -> bytes:
        if self._encoding == "identity":
            raise GrpcError(
                Status.INTERNAL,
                "compressed message received without a grpc-encoding header",
            )
        # Inflated piece by piece, never past the limit: a small message can
        # expand a thousandfold, and must not be allowed to before it is
        # refused.  gzip may hold several members, one after another.
        wbits = 16 + zlib.MAX_WBITS if self._encoding == "gzip" else zlib.MAX_WBITS
        out = bytearray()
        data = payload
        try:
            while True:
                inflater = zlib.decompressobj(wbits)
                out += inflater.decompress(data, self._max + 1 - len(out))
                if len(out) > self._max:
                    raise GrpcError(
                        Status.RESOURCE_EXHAUSTED,
                        f"received message after decompression larger than max ({self._max})",
                    )
                if not inflater.eof:
                    raise zlib.error("incomplete or truncated stream")
                data = inflater.unused_data
                if not data:
                    return bytes(out)
                if self._encoding != "gzip":
                    raise zlib.error("data after the end of the stream")
        except zlib.error as exc:
            raise GrpcError(Status.INTERNAL, f"could not decompress message ({self._encoding}): {exc}") from exc


def check_encoding(value: str | None) -> str:
    """Validate a request's ``grpc-encoding`` header; return the encoding.

    Raises:
        GrpcError: ``UNIMPLEMENTED`` for an encoding we cannot decompress
            (the spec's answer; the reply carries ``grpc-accept-encoding``).
    """
    if value is None or value == "identity":
        return "identity"
    if value in ("gzip", "deflate"):
        return value
    raise GrpcError(
        Status.UNIMPLEMENTED,
        f"unsupported grpc-encoding {value!r}; supported: {ACCEPT_ENCODING}",
    )


_TIMEOUT_RE: Final = re.compile(r"^([0-9]{1,8})([HMSmun])$")
_TIMEOUT_UNITS: Final = {
    "H": 3600.0,
    "M": 60.0,
    "S": 1.0,
    "m": 1e-3,
    "u": 1e-6,
    "n": 1e-9,
}


def parse_timeout(value: str) -> float:
    """Parse a ``grpc-timeout`` header (``"100m"`` → 0.1) into seconds.

    Raises:
        GrpcError: ``INVALID_ARGUMENT`` when the value is malformed (at most
            eight digits and one unit letter, as the spec says).
    """
    match = _TIMEOUT_RE.match(value)
    if match is None:
        raise GrpcError(Status.INVALID_ARGUMENT, f"malformed grpc-timeout {value!r}")
    return int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]


def encode_timeout(seconds: float) -> str:
    """Render ``seconds`` as a ``grpc-timeout`` value with at most 8 digits."""
    for unit, scale in (("n", 1e-9), ("u", 1e-6), ("m", 1e-3), ("S", 1.0), ("M", 60.0)):
        amount = int(seconds / scale + 0.999999)
        if amount < 100_000_000:
            return f"{max(amount, 0)}{unit}"
    return f"{min(int(seconds / 3600.0 + 0.999999), 99_999_999)}H"


def decode_bin(value: str | bytes) -> bytes:
    """Decode a ``-bin`` metadata value.

    gRPC sends base64 without padding; some clients (and the JS SDKs) pad.
    Both are accepted, standard or URL-safe alphabet.

    Raises:
        GrpcError: ``INVALID_ARGUMENT`` when the value is not base64.
    """
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = value.strip().rstrip("=")
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GrpcError(Status.INVALID_ARGUMENT, "malformed base64 in binary metadata") from exc


def encode_bin(value: bytes) -> str:
    """Encode a ``-bin`` metadata value the way gRPC does (no padding)."""
    return base64.b64encode(value).decode("ascii").rstrip("=")


def metadata_from_headers(headers: Iterable[tuple[str, str]]) -> Metadata:
    """Turn request headers into call metadata.

    Pseudo-headers and :data:`RESERVED_HEADERS` are dropped; ``-bin`` values
    are base64-decoded into bytes.

    Raises:
        GrpcError: ``INVALID_ARGUMENT`` for a malformed ``-bin`` value.
    """
    out: list[tuple[str, MetadataValue]] = []
    for name, value in headers:
        if name[0] == ":" or name in RESERVED_HEADERS:
            continue
        if name.endswith("-bin"):
            out.append((name, decode_bin(value)))
        else:
            out.append((name, value))
    return tuple(out)


def metadata_to_headers(metadata: Iterable[tuple[str, MetadataValue]]) -> Iterator[tuple[str, str]]:
    """Turn metadata into header pairs (``-bin`` values base64-encoded).

    Keys gRPC reserves for itself (``grpc-*`` status fields, ``content-type``
    and friends) are skipped: the front end writes those.  Headers in
    :data:`NEVER_INDEXED` come out as never-indexed HPACK tuples.
    """
    for name, value in metadata:
        name = name.lower()
        if name in RESERVED_HEADERS or name in ("grpc-status", "grpc-message") or name[:1] == ":":
            continue
        if isinstance(value, bytes):
            text = encode_bin(value) if name.endswith("-bin") else value.decode("latin-1")
        elif name.endswith("-bin"):
            text = encode_bin(value.encode("utf-8"))
        else:
            text = value
        yield never_indexed(name, text) if name in NEVER_INDEXED else (name, text)


def never_indexed(name: str, value: str) -> tuple[str, str]:
    """A header pair HPACK must not add to its table (see :data:`NEVER_INDEXED`)."""
    return cast(tuple[str, str], NeverIndexedHeaderTuple(name, value))


# grpc-message is percent-encoded: bytes outside 0x20..0x7E and "%" itself.
_UNRESERVED: Final = frozenset(range(0x20, 0x7F)) - {ord("%")}


def encode_message(message: str) -> str:
    """Percent-encode a status message for the ``grpc-message`` field.

    Lone surrogates (text from a service's JSON, ``"\\ud800"``) become
    ``?``: the status must always go out, and it is sent after the call
    counts as finished.
    """
    raw = message.encode("utf-8", errors="replace")
    if all(b in _UNRESERVED for b in raw):
        return raw.decode("ascii")
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in raw)


_HEX: Final = frozenset(b"0123456789abcdefABCDEF")


def decode_message(value: str) -> str:
    """Undo :func:`encode_message`; malformed escapes are kept as they are."""
    if "%" not in value:
        return value
    out = bytearray()
    i = 0
    raw = value.encode("latin-1", "replace")
    while i < len(raw):
        hexdigits = raw[i + 1 : i + 3]
        if raw[i] == 0x25 and len(hexdigits) == 2 and all(c in _HEX for c in hexdigits):
            out.append(int(hexdigits, 16))
            i += 3
            continue
        out.append(raw[i])
        i += 1
    return out.decode("utf-8", "replace")


def status_headers(status: int, message: str) -> list[tuple[str, str]]:
    """The ``grpc-status`` / ``grpc-message`` header pairs of a reply."""
    pairs = [("grpc-status", str(status))]
    if message:
        pairs.append(("grpc-message", encode_message(message)))
    return pairs


def is_grpc_content_type(value: str) -> bool:
    """True for ``application/grpc`` and its ``+proto``/``+json``/``;`` forms."""
    return value == "application/grpc" or (
        value.startswith("application/grpc") and len(value) > 16 and value[16] in "+;"
    )
