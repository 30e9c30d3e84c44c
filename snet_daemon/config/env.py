"""Configuration from ``SNET_*`` environment variables (and flag strings).

Naming follows the Go daemon for top-level keys -- ``SNET_`` plus the key in
upper case (``SNET_SERVICE_ENDPOINT``, ``SNET_MAX_MESSAGE_SIZE_IN_MB``) --
and adds ``__`` to reach nested keys, which Go's Viper could only do with a
dot in the variable name: ``SNET_LOG__LEVEL`` is ``log.level``,
``SNET_LOG__OUTPUT__TYPE`` is ``log.output.type``.

Other tools share the prefix (snet-cli and snet-sdk read ``SNET_PRIVATE_KEY``
and friends), so a variable that names no configuration key is ignored
without a word: the daemon must start in a shell set up for those tools.
A variable that is set but empty is ignored too, as Go's Viper ignores it
(``AllowEmptyEnv`` is off in snetd): ``SNET_PRIVATE_KEY_FOR_FREE_CALLS=``
left in a unit file or a ``docker run -e`` must not wipe the file's key.
An empty list is written ``[]``.

Environment variables and command-line overrides are strings; both are
turned into configuration values by :func:`coerce`, according to the shape of
the key they set.  Scalars are left to pydantic's lenient coercion (``"4"``,
``"true"``, ``"yes"``, ``"0.5"``); lists and maps need parsing here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

from snet_daemon import jsontext
from snet_daemon.config.keys import Shape, shape_at

__all__ = ["ENV_PREFIX", "NESTING_SEPARATOR", "CoercionError", "coerce", "environment_keys", "unreadable_reason"]

#: Prefix of the daemon's environment variables (Go: ``SetEnvPrefix("SNET")``).
ENV_PREFIX = "SNET_"

#: Separator between nesting levels in a variable name.
NESTING_SEPARATOR = "__"


class CoercionError(ValueError):
    """A string cannot become a value of the key's shape; the message reads after the value."""


def environment_keys(environ: Mapping[str, str]) -> Iterator[tuple[str, tuple[str, ...], Shape]]:
    """Find the variables that name configuration keys.

    Variables are visited in sorted order, so a whole-section variable
    (``SNET_LOG``) is applied before, and refined by, a nested one
    (``SNET_LOG__LEVEL``).

    Args:
        environ: The process environment (or a test's stand-in).

    Yields:
        ``(variable name, key path, shape)`` for every non-empty ``SNET_*``
        variable whose name resolves to a known key, deprecated alias or
        stale key.
        ``log.<hook>`` sections are out of reach: hook names are free-form,
        so claiming ``SNET_LOG__<ANY>`` would break the "other tools' SNET_
        variables are ignored" promise.
    """
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or environ[name] == "":
            continue
        path = tuple(name[len(ENV_PREFIX) :].lower().split(NESTING_SEPARATOR))
        if not all(path):
            continue
        shape = shape_at(path, hooks=False)
        if shape is not None:
            yield name, path, shape


def coerce(text: str, shape: Shape) -> object:
    """Turn a string into a value of the given shape.

    Args:
        text: The variable's (or flag's) value.
        shape: What the key holds.

    Returns:
        ``text`` itself for scalars (pydantic converts it to the field type);
        a list for lists -- from a JSON array (``'["a", "b"]'``) or, failing
        a leading ``[`` or ``{``, from comma-separated items (``"a, b"``); a
        dict for maps and sections, from a JSON object.  Text starting with
        ``{`` is read as JSON even for a list: it can only be an object meant
        for a list of objects such as ``service_credentials`` (no item of a
        list of strings starts with a brace), and split at its commas it would
        become pieces of an object, each reported as a bad item.  An empty ``text`` (which only
        a command-line override can give: empty variables are skipped) is
        the empty list or map.

    Raises:
        CoercionError: A list or map value is not valid JSON of the right kind,
            or nests deeper than :data:`snet_daemon.jsontext.MAX_DEPTH`; the
            message reads after the quoted value ("is not a JSON ...").
    """
    if shape is Shape.SCALAR:
        return text
    stripped = text.strip()
    if shape is Shape.LIST:
        if not stripped.startswith(("[", "{")):
            return [item.strip() for item in text.split(",") if item.strip()]
        value = _json(stripped, "array")
        if not isinstance(value, list):
            raise CoercionError("is a JSON object, not a JSON array (write a list of objects: [{...}])")
        return value
    if not stripped:
        return {}
    value = _json(stripped, "object")
    if not isinstance(value, dict):
        raise CoercionError('is not a JSON object (write e.g. {"key": "value"})')
    return value


def _json(text: str, kind: str) -> object:
    try:
        return jsontext.loads(text)
    except json.JSONDecodeError as exc:
        raise CoercionError(f"is not a valid JSON {kind} ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:  # too deep, or a number too long to read
        raise CoercionError(f"is not a usable JSON {kind} ({unreadable_reason(exc)})") from None


def unreadable_reason(exc: ValueError) -> str:
    """Why a JSON or YAML value could not be read, without Python's advice.

    A number of more than 4300 digits is refused by ``int()`` with a hint to
    call ``sys.set_int_max_str_digits()``, which an operator cannot do.
    """
    return str(exc).partition("; use sys.set_int_max_str_digits()")[0]
