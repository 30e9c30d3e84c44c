"""Silence hpack's per-header debug logging, which costs on every call.

hpack calls ``logging.Logger.debug`` about 80 times per proxied gRPC call
(each header encoded, decoded and added to the table), and each call costs
a method call plus a level check even when debug logging is off.  The
daemon never routes hpack's stdlib logging anywhere, so its two module
loggers are replaced with a logger whose ``debug`` does nothing.

Importing this module applies the change; it is idempotent and only
touches the ``log`` attribute of the two hpack modules that have one.
"""

from __future__ import annotations

import logging
from typing import Any

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
