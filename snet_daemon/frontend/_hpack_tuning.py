"""HPACK tuning for the daemon's connections: measured costs on every call.

1. No Huffman coding of the headers we send (:func:`plain_literals`).
   hpack's Huffman coder is pure Python and slow on long values; signatures
   and tokens (base64) are sent on every paid call.  Header blocks grow by
   about a quarter, which does not matter on the links a daemon uses, and
   decoding what peers send is unchanged.

2. Silence hpack's per-header debug logging.

hpack calls ``logging.Logger.debug`` about 80 times per proxied gRPC call
(each header encoded, decoded and added to the table), and each call costs
a method call plus a level check even when debug logging is off.  The
daemon never routes hpack's stdlib logging anywhere, so its two module
loggers are replaced with a logger whose ``debug`` does nothing.

Importing this module applies the change; it is idempotent and only
touches the ``log`` attribute of the two hpack modules that have one.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import h2.connection
import hpack.hpack
import hpack.table


class _QuietLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger whose debug messages cost nothing; other levels pass through."""

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        pass


for _module in (hpack.hpack, hpack.table):
    _current = getattr(_module, "log", None)
    if isinstance(_current, logging.Logger):
        setattr(_module, "log", _QuietLogger(_current, {}))  # noqa: B010


def plain_literals(conn: h2.connection.H2Connection) -> None:
    """Make ``conn`` send header literals without Huffman coding."""
    encoder = conn.encoder
    encoder.encode = functools.partial(type(encoder).encode, encoder, huffman=False)  # type: ignore[method-assign]
