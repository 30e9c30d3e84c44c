"""``json.loads`` with a bound on nesting, for JSON from outside: clients, services, chain nodes, metadata.

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
