"""JSON from clients and services: nesting is bounded before the C decoder recurses."""

from __future__ import annotations

import json
import sys

import pytest

from snet_daemon import jsontext


def test_deep_nesting_is_a_value_error_even_with_a_raised_recursion_limit() -> None:
    """py_ecc (imported by web3) raises the recursion limit to 100,000: json.loads itself would
    then overflow the C stack on 100,000 brackets and crash the process."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        for text in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
            with pytest.raises(ValueError, match="nested deeper"):
                jsontext.loads(text)
    finally:
        sys.setrecursionlimit(previous)


def test_ordinary_json_is_parsed_as_json_loads_does() -> None:
    """Many brackets side by side, brackets inside strings (escaped quotes too), depth at the limit."""
    wide = json.dumps([[i] for i in range(5000)])
    strings = json.dumps({"text": "[" * 1000 + '"\\' + "{" * 1000, "list": [{"a": "]]]"}] * 300})
    deepest = "[" * jsontext.MAX_DEPTH + "]" * jsontext.MAX_DEPTH
    for text in (wide, strings, deepest, "[]", '"x"', "3"):
        assert jsontext.loads(text.encode()) == json.loads(text)
        assert jsontext.loads(text) == json.loads(text)
    with pytest.raises(ValueError, match="nested deeper"):
        jsontext.loads("[" * (jsontext.MAX_DEPTH + 1) + "]" * (jsontext.MAX_DEPTH + 1))
    with pytest.raises(ValueError):
        jsontext.loads(b"[1,")


def test_text_that_is_no_unicode_is_refused_or_replaced_when_written() -> None:
    """An escaped lone surrogate is valid JSON but cannot be UTF-8: dumps says so (a ValueError,
    not the UnicodeEncodeError of str.encode) or, asked to, writes ``?`` instead."""
    value = jsontext.loads(b'{"text": "a\\ud800b", "ok": "na\\u00efve \\ud83d\\ude00"}')
    with pytest.raises(ValueError, match="lone UTF-16 surrogate") as caught:
        jsontext.dumps(value)
    assert not isinstance(caught.value, UnicodeError)
    assert jsontext.dumps(value, replace=True) == '{"text":"a?b","ok":"naïve 😀"}'.encode()
