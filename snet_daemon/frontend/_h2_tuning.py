"""h2 and HPACK tuning for the daemon's connections: measured costs on every call.

1. Our own HPACK codec on every connection (:func:`fast_hpack`), see
   :mod:`snet_daemon.frontend.hpack_codec`: a paid request's header block
   decodes in 11-16 us instead of 33-37 and encodes in 4 us instead of 20.

2. A short ``repr`` for HTTP/2 frames.

   h2 formats every frame it receives for a trace log line
   (``logger.trace("Received frame: %s", repr(frame))``) whether or not
   anything is logged, and hyperframe's ``repr`` renders the whole payload:
   10 us per unpaid proxied call and 24 us per paid one (more frames: the
   etcd round trip), measured with py-spy in ``benchmarks/paid.py``.  The
   daemon never logs frames; the short form keeps the type, stream and
   flags.

3. The same check of received header characters, done by C code.

   h2 checks each byte of each received header name and value in a Python
   loop (RFC 9113 section 8.2.1): 10.2 us for a paid request's twelve
   headers, 4.8 for an unpaid one's seven.  A regular expression (once per
   header name) and ``bytes`` searches accept exactly what h2 accepts, in
   5.6 and 3.3 us; a header they refuse goes to h2's own check, which
   raises its usual ``ProtocolError``.

Importing this module applies changes 2 and 3; it is idempotent and only
touches hyperframe's ``Frame.__repr__`` and h2's
``utilities._reject_illegal_characters``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterable

import h2.connection
import h2.utilities
import hyperframe.frame

from snet_daemon.frontend import hpack_codec


def _short_repr(frame: hyperframe.frame.Frame) -> str:
    return f"{type(frame).__name__}(stream_id={frame.stream_id}, flags={sorted(frame.flags)})"


hyperframe.frame.Frame.__repr__ = _short_repr  # type: ignore[method-assign]


#: A field name h2 accepts: no octet in 0x00-0x20, 0x41-0x5a (upper case) or
#: 0x7f-0xff, and no colon except a pseudo-header's leading one.
_NAME = re.compile(rb":?[\x21-\x39\x3b-\x40\x5b-\x7e]*")
#: Names already found valid (clients send the same few on every call).
_GOOD_NAMES: set[bytes] = set()
_GOOD_NAMES_LIMIT = 1024
#: h2's own check (h2 4.2 and later; older h2 checks less and is left alone).
_h2_reject_illegal_characters: Callable[..., Iterable[tuple[bytes, bytes]]] | None = getattr(
    h2.utilities, "_h2_reject_illegal_characters", getattr(h2.utilities, "_reject_illegal_characters", None)
)


def _reject_illegal_characters(
    headers: Iterable[tuple[bytes, bytes]], hdr_validation_flags: h2.utilities.HeaderValidationFlags
) -> Generator[tuple[bytes, bytes], None, None]:
    """h2's check of header characters, done by C code; h2's own reports a failure."""
    good = _GOOD_NAMES
    for header in headers:
        name, value = header
        if name not in good:
            if _NAME.fullmatch(name) is None:
                yield from _refuse(header, hdr_validation_flags)
            if len(good) >= _GOOD_NAMES_LIMIT:
                good.clear()
            good.add(name)
        if value and (b"\0" in value or b"\n" in value or b"\r" in value or value[0] in b" \t" or value[-1] in b" \t"):
            yield from _refuse(header, hdr_validation_flags)
        yield header


def _refuse(
    header: tuple[bytes, bytes], hdr_validation_flags: h2.utilities.HeaderValidationFlags
) -> Iterable[tuple[bytes, bytes]]:
    """h2's own check of ``header``, which raises h2's own error for it."""
    assert _h2_reject_illegal_characters is not None  # we are installed only then
    return _h2_reject_illegal_characters([header], hdr_validation_flags)


if _h2_reject_illegal_characters is not None:
    h2.utilities._h2_reject_illegal_characters = _h2_reject_illegal_characters  # type: ignore[attr-defined]
    h2.utilities._reject_illegal_characters = _reject_illegal_characters


def fast_hpack(conn: h2.connection.H2Connection) -> None:
    """Give ``conn`` our HPACK encoder and decoder; call it before any data.

    The decoder keeps the limits h2 has already set on its own.
    """
    previous = conn.decoder
    decoder = hpack_codec.Decoder(previous.max_header_list_size)
    decoder.max_allowed_table_size = previous.max_allowed_table_size
    conn.decoder = decoder  # type: ignore[assignment]
    conn.encoder = hpack_codec.Encoder()  # type: ignore[assignment]
