"""``json.loads`` with a bound on nesting, for JSON from outside: clients, services, chain nodes, metadata.

And :func:`dumps`, which says what to do with text that is valid JSON but no
Unicode: ``"\\ud800"`` (an escaped lone UTF-16 surrogate) parses into a
string that cannot be encoded as UTF-8.

The C decoder recurses once per nesting level and relies on the recursion
limit to stop; a library that raises that limit (py_ecc sets 100,000 on
import) turns a few hundred kilobytes of ``[[[[...`` into a crash of the
whole daemon rather than an error.  So the depth is checked first, cheaply
when the text cannot be deep.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

#: Deepest nesting accepted (arrays and objects).
MAX_DEPTH: Final = 200

_TOKENS: Final = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def loads(data: bytes | str) -> Any:
    """Parse JSON text.

    Raises:
        ValueError: not JSON, or nested deeper than :data:`MAX_DEPTH`.
        UnicodeDecodeError: not UTF-8.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        depth = 0
        for token in _TOKENS.finditer(raw):
            char = token.group()[:1]
            if char in (b"[", b"{"):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
            elif char in (b"]", b"}"):
                depth -= 1
    return json.loads(data)


def dumps(value: Any, *, replace: bool = False) -> bytes:
    """``value`` as compact UTF-8 JSON text.

    Args:
        value: a JSON value.
        replace: lone surrogates become ``?`` (for text the daemon must pass
            on whatever it holds, such as a service's answer), instead of
            raising.

    Raises:
        ValueError: ``value`` holds a lone surrogate (and not ``replace``).
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8", errors="replace" if replace else "strict")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text holds a lone UTF-16 surrogate ({exc.object[exc.start]!a}), which is not Unicode"
        ) from None
