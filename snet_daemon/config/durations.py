"""Go duration strings (``"100s"``, ``"1m30s"``, ``"500ms"``).

The Go daemon reads ``service_timeout`` and the etcd timeouts with Viper's
``GetDuration``, which ends in ``time.ParseDuration``.  Existing
``snetd.config.json`` files therefore contain Go duration syntax, and we must
read exactly that syntax: a sequence of decimal numbers, each with a unit
(``ns``, ``us``/``µs``, ``ms``, ``s``, ``m``, ``h``), an optional leading sign,
and the bare ``"0"``.

The parser works in integer nanoseconds, as Go does, so ``"1.5h"`` and
``"90m"`` compare equal and nothing is lost to float rounding until the
caller asks for seconds.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["DurationError", "parse_duration", "parse_duration_ns"]

# Nanoseconds per unit.  Go accepts both the micro sign (U+00B5) and the Greek
# letter mu (U+03BC) for microseconds; so do we.
_UNIT_NS: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}

# One "number + unit" component.  Go takes the longest run of non-digit,
# non-dot characters as the unit, so "1msx" fails on the unknown unit "msx";
# capturing the whole run reproduces that instead of matching "ms" and then
# tripping over "x" with a less helpful message.
_COMPONENT = re.compile(r"(?P<number>[0-9]*(?:\.[0-9]*)?)(?P<unit>[^0-9.]*)")

# time.Duration is an int64 of nanoseconds; Go rejects anything larger.
_MAX_NS = 2**63 - 1


class DurationError(ValueError):
    """A string is not a valid Go duration; the message says why."""


def parse_duration_ns(text: str) -> int:
    """Parse a Go duration string into integer nanoseconds.

    Args:
        text: The duration as written in the configuration, e.g. ``"1m30s"``.

    Returns:
        The duration in nanoseconds (negative if the string has a ``-`` sign).

    Raises:
        DurationError: The string is not valid ``time.ParseDuration`` input;
            the message quotes Go's own wording ("missing unit", "unknown
            unit") so operators who know the Go daemon recognise it.
    """
    rest = text
    sign = 1
    if rest[:1] in ("-", "+"):
        sign = -1 if rest[0] == "-" else 1
        rest = rest[1:]
    # Go special-cases a lone zero: it needs no unit.
    if rest == "0":
        return 0
    if not rest:
        raise DurationError(f"invalid duration {text!r}")
    total = 0
    position = 0
    while position < len(rest):
        match = _COMPONENT.match(rest, position)
        # The pattern always matches (possibly empty); an empty match means a
        # character the grammar cannot start a component with.
        assert match is not None
        number, unit = match.group("number"), match.group("unit")
        if number in ("", "."):
            raise DurationError(f"invalid duration {text!r}")
        if not unit:
            raise DurationError(f"missing unit in duration {text!r}")
        if unit not in _UNIT_NS:
            raise DurationError(f"unknown unit {unit!r} in duration {text!r}")
        try:
            total += int(Decimal(number) * _UNIT_NS[unit])
        except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
            raise DurationError(f"invalid duration {text!r}") from exc
        if total > _MAX_NS:
            raise DurationError(f"invalid duration {text!r}: out of range")
        position = match.end()
    return sign * total


def parse_duration(text: str) -> float:
    """Parse a Go duration string into (float) seconds.

    This is the form Twisted wants for ``callLater`` and timeouts.

    Args:
        text: The duration as written in the configuration.

    Returns:
        The duration in seconds.

    Raises:
        DurationError: As :func:`parse_duration_ns`.
    """
    return parse_duration_ns(text) / 1e9
