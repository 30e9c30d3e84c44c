"""h2 and HPACK tuning for the daemon's connections: measured costs on every call.

1. No Huffman coding of the headers we send (:func:`plain_literals`).
   hpack's Huffman coder is pure Python and slow on long values; signatures
   and tokens (base64) are sent on every paid call.  Header blocks grow by
   about a quarter, which does not matter on the links a daemon uses, and
   decoding what peers send is unchanged.

2. Silence hpack's per-header debug logging.

   hpack calls ``logging.Logger.debug`` about 80 times per proxied gRPC call
   (each header encoded, decoded and added to the table), and each call
   costs a method call plus a level check even when debug logging is off.
   The daemon never routes hpack's stdlib logging anywhere, so its two
   module loggers are replaced with a logger whose ``debug`` does nothing.

3. A short ``repr`` for HTTP/2 frames.

   h2 formats every frame it receives for a trace log line
   (``logger.trace("Received frame: %s", repr(frame))``) whether or not
   anything is logged, and hyperframe's ``repr`` renders the whole payload:
   10 us per unpaid proxied call and 24 us per paid one (more frames: the
   etcd round trip), measured with py-spy in ``benchmarks/paid.py``.  The
   daemon never logs frames; the short form keeps the type, stream and
   flags.

Importing this module applies the changes; it is idempotent and only
touches the ``log`` attribute of the two hpack modules that have one and
hyperframe's ``Frame.__repr__``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import h2.connection
import hpack.hpack
import hpack.table
import hyperframe.frame


class _QuietLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger whose debug messages cost nothing; other levels pass through."""

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        pass


for _module in (hpack.hpack, hpack.table):
    _current = getattr(_module, "log", None)
    if isinstance(_current, logging.Logger):
        setattr(_module, "log", _QuietLogger(_current, {}))  # noqa: B010


def _short_repr(frame: hyperframe.frame.Frame) -> str:
    return f"{type(frame).__name__}(stream_id={frame.stream_id}, flags={sorted(frame.flags)})"


hyperframe.frame.Frame.__repr__ = _short_repr  # type: ignore[method-assign]


def plain_literals(conn: h2.connection.H2Connection) -> None:
    """Make ``conn`` send header literals without Huffman coding."""
    encoder = conn.encoder
    encoder.encode = functools.partial(type(encoder).encode, encoder, huffman=False)  # type: ignore[method-assign]
