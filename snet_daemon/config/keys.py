"""Questions about key paths, answered from the models.

The models are the only list of keys; this module walks them so that the
loader, the environment reader, the error messages, the renderer and the
documentation never keep a second list.  Two path spellings exist:

* *file paths*, as the user writes them: ``("log", "send-mail", "port")``;
* pydantic *locations* in validation errors, which also contain list indices
  and the internal :data:`~snet_daemon.config.model.HOOK_SECTIONS_ALIAS`
  segment: ``("log", "<log hook sections>", "send-mail", "port")``.
"""

from __future__ import annotations

import difflib
import enum
import json
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from snet_daemon.config.durations import parse_duration_ns
from snet_daemon.config.model import HOOK_SECTIONS_ALIAS, DaemonConfig, KeyFlag
from snet_daemon.config.support import (
    DEPRECATED_ALIASES,
    IMPLEMENTED_KEYS,
    is_stale_key,
)

__all__ = [
    "KeyDoc",
    "Shape",
    "default_config",
    "display_path",
    "documented_keys",
    "env_var_name",
    "field_at",
    "fields_by_key",
    "has_flag",
    "holds_secrets",
    "is_secret",
    "is_section",
    "leaf_paths",
    "model_at",
    "same_value",
    "shape_at",
    "suggest",
    "value_at",
]

Loc = Sequence[str | int]


class Shape(enum.Enum):
    """What a string from the environment must be turned into."""

    SCALAR = "scalar"  #: passed to pydantic as is; it coerces "4", "true", ...
    LIST = "list"  #: a JSON array, or comma-separated items
    MAP = "map"  #: a JSON object


@cache
def default_config() -> DaemonConfig:
    """The all-defaults configuration (built once; it is immutable)."""
    return DaemonConfig()


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` down to the underlying type."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _model(annotation: Any) -> type[BaseModel] | None:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


@cache
def fields_by_key(model: type[BaseModel]) -> Mapping[str, tuple[str, FieldInfo]]:
    """Key as written in the file (the alias, if any) -> (attribute, field)."""
    return {(field.alias or name): (name, field) for name, field in model.model_fields.items()}


def has_flag(field: FieldInfo | None, flag: KeyFlag) -> bool:
    """Tell whether a field carries a :class:`KeyFlag` marker."""
    return field is not None and flag in field.metadata


def _hook_field(model: type[BaseModel]) -> FieldInfo | None:
    for _, field in fields_by_key(model).values():
        if has_flag(field, KeyFlag.HOOK_SECTIONS):
            return field
    return None


def _element(annotation: Any) -> Any | None:
    """Item type of a tuple/list annotation, value type of a dict, else None."""
    annotation = _unwrap(annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (tuple, list) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _resolve(loc: Loc, *, file_path: bool) -> tuple[Any, FieldInfo | None] | None:
    """Walk the models along ``loc``.

    Args:
        loc: A file path or a pydantic location.
        file_path: True for file paths: an unknown key inside a model with
            hook sections is then taken to be a hook name (``log.<name>``).

    Returns:
        ``(annotation, field)`` for the last segment -- ``field`` is the
        model field it names, or None for list items and dict entries -- or
        None if the path does not exist.
    """
    annotation: Any = DaemonConfig
    field: FieldInfo | None = None
    for segment in loc:
        model = _model(annotation)
        if model is not None:
            entry = fields_by_key(model).get(segment) if isinstance(segment, str) else None
            if entry is not None:
                field = entry[1]
                annotation = field.annotation
                continue
            hooks = _hook_field(model) if file_path else None
            if hooks is None or not isinstance(segment, str):
                return None
            annotation, field = _element(hooks.annotation), None
            continue
        element = _element(annotation)
        if element is None:
            return None
        annotation, field = element, None
    return annotation, field


def _shape(annotation: Any) -> Shape:
    if _model(annotation) is not None:
        return Shape.MAP
    origin = get_origin(_unwrap(annotation))
    if origin in (tuple, list):
        return Shape.LIST
    if origin is dict:
        return Shape.MAP
    return Shape.SCALAR


def shape_at(path: Sequence[str], *, hooks: bool = True) -> Shape | None:
    """How to coerce a string given for a file path, or None if no such key.

    Deprecated aliases and stale README keys count as (scalar) keys, so that
    ``SNET_DAEMON_END_POINT`` is migrated and ``SNET_HDWALLET_INDEX`` is
    reported as ignored rather than silently dropped.

    Args:
        path: Key path, lower-cased.
        hooks: Whether ``log.<name>...`` may name a hook section.  Any name
            can be a hook, so the environment passes False: otherwise every
            ``SNET_LOG__<ANYTHING>`` variable would be claimed as ours.
    """
    if len(path) == 1 and (path[0] in DEPRECATED_ALIASES or is_stale_key(path[0])):
        resolved = _resolve((DEPRECATED_ALIASES.get(path[0], ""),), file_path=True)
        return _shape(resolved[0]) if resolved else Shape.SCALAR
    resolved = _resolve(path, file_path=hooks)
    return None if resolved is None else _shape(resolved[0])


def field_at(loc: Loc) -> FieldInfo | None:
    """The model field a file path or pydantic location ends in, if any."""
    resolved = _resolve(loc, file_path=True)
    return None if resolved is None else resolved[1]


def is_secret(loc: Loc) -> bool:
    """Tell whether the value at a location must never be shown."""
    return has_flag(field_at(loc), KeyFlag.SECRET)


def holds_secrets(loc: Loc) -> bool:
    """Tell whether the value at a location is, or may contain, a secret.

    True for a secret field, and for a section or list whose items have one
    at any depth: ``service_credentials``, ``service_credentials[0]``,
    ``log`` (its hook sections have passwords).  An error about such a value
    must not quote it, since what was written there -- JSON text that failed
    to parse, an object where a list belongs -- may well hold the secret.
    """
    # A location inside a secret: a credential's JSON value, "service_credentials[0].value.list[2]".
    if any(is_secret(loc[:end]) for end in range(1, len(loc) + 1)):
        return True
    resolved = _resolve(loc, file_path=True)
    return resolved is not None and _contains_secret(resolved[0])


def _contains_secret(annotation: Any) -> bool:
    """Whether a type is a section, list or map with a secret field somewhere inside."""
    element = _element(annotation)
    if element is not None:
        return _contains_secret(element)
    model = _model(annotation)
    return model is not None and _model_has_secret(model)


@cache
def _model_has_secret(model: type[BaseModel]) -> bool:
    return any(
        has_flag(field, KeyFlag.SECRET) or _contains_secret(field.annotation)
        for _, field in fields_by_key(model).values()
    )


def is_section(path: Sequence[str]) -> bool:
    """Tell whether a file path names a section (``log``, ``log.<hook>``), not a value.

    Sources merge sections key by key; any other value, a map-valued key
    such as ``free_calls_per_address`` included, is replaced as a whole.
    """
    resolved = _resolve(path, file_path=True)
    return resolved is not None and _model(resolved[0]) is not None


def model_at(loc: Loc) -> type[BaseModel] | None:
    """The model whose fields are the valid keys at ``loc`` (for suggestions)."""
    resolved = _resolve(loc, file_path=False)
    return None if resolved is None else _model(resolved[0])


def suggest(key: str, loc: Loc) -> str | None:
    """The known key closest to an unknown ``key`` found inside ``loc``.

    Args:
        key: The unknown key.
        loc: Location of the mapping that contained it.

    Returns:
        The full dotted path of the suggestion, or None if nothing is close.
    """
    model = model_at(loc)
    if model is None:
        return None
    candidates = [name for name in fields_by_key(model) if name != HOOK_SECTIONS_ALIAS]
    matches = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not matches:
        return None
    return display_path([*loc, matches[0]])


def display_path(loc: Loc) -> str:
    """Format a location as users write it: ``service_credentials[0].key``.

    The internal hook-sections segment is dropped (``log.send-mail.port``)
    and pydantic's ``[key]`` marker for dict-key errors is left out.
    """
    text = ""
    for segment in loc:
        if segment in (HOOK_SECTIONS_ALIAS, "[key]"):
            continue
        if isinstance(segment, int):
            text += f"[{segment}]"
        else:
            text += f".{segment}" if text else segment
    return text


def leaf_paths(tree: Mapping[str, Any], model: type[BaseModel] = DaemonConfig) -> Iterator[tuple[str, ...]]:
    """The keys a user set, as paths to leaves of the models.

    A "leaf" is a field that is not itself a section: ``log.level``,
    ``free_calls_per_address`` (a whole map), ``service_credentials`` (a
    whole list).  Keys that are not fields (``log.<hook>`` sections) are
    skipped; a hook is covered by ``log.hooks``.

    Args:
        tree: A nested mapping of user-supplied values (lower-cased keys).
        model: The model the mapping is for.

    Yields:
        Key paths, in the mapping's order.
    """
    fields = fields_by_key(model)
    for key, value in tree.items():
        entry = fields.get(key)
        if entry is None:
            continue
        section = _model(entry[1].annotation)
        if section is not None and isinstance(value, Mapping):
            for path in leaf_paths(value, section):
                yield (key, *path)
        else:
            yield (key,)


def value_at(config: BaseModel, path: Sequence[str]) -> Any:
    """Read the value at a path of field keys from a model instance."""
    value: Any = config
    for key in path:
        model: type[BaseModel] = type(value)
        value = getattr(value, fields_by_key(model)[key][0])
    return value


def same_value(path: Sequence[str], first: Any, second: Any) -> bool:
    """Compare two values of the key at ``path`` as the daemon would use them.

    Go durations compare by length of time, so ``"1m"`` equals ``"60s"``.
    """
    resolved = _resolve(path, file_path=True)
    if resolved is not None and has_flag(resolved[1], KeyFlag.DURATION):
        return bool(parse_duration_ns(first) == parse_duration_ns(second))
    return bool(first == second)


def env_var_name(path: str) -> str:
    """The environment variable for a dotted key path (``log.level`` -> ``SNET_LOG__LEVEL``)."""
    return "SNET_" + "__".join(path.split(".")).upper()


@dataclass(frozen=True, slots=True)
class KeyDoc:
    """One row of the key reference in ``docs/configuration.md``.

    Attributes:
        path: Dotted key path; hook keys use ``log.<hook>.…``.
        default: The default, as JSON text (``required`` if none).
        implemented: Whether the daemon uses the key today.
        env_var: Environment variable setting the key ("" if none can).
        description: What the key means.
    """

    path: str
    default: str
    implemented: bool
    env_var: str
    description: str


def documented_keys(model: type[BaseModel] = DaemonConfig, prefix: str = "") -> Iterator[KeyDoc]:
    """Every leaf key of the models, with what the documentation says about it.

    Args:
        model: The model to describe.
        prefix: Dotted path of ``model`` inside :class:`DaemonConfig`.

    Yields:
        One :class:`KeyDoc` per leaf key, in model order.
    """
    for key, (_, field) in fields_by_key(model).items():
        if has_flag(field, KeyFlag.HOOK_SECTIONS):
            hook_model = _model(_element(field.annotation))
            assert hook_model is not None
            yield from documented_keys(hook_model, f"{prefix}<hook>.")
            continue
        section = _model(field.annotation)
        if section is not None:
            yield from documented_keys(section, f"{prefix}{key}.")
            continue
        path = f"{prefix}{key}"
        if field.is_required():
            default = "required"
        else:
            default = json.dumps(to_jsonable_python(field.get_default(call_default_factory=True)), ensure_ascii=False)
        yield KeyDoc(
            path=path,
            default=default,
            implemented=path in IMPLEMENTED_KEYS,
            # Hook names are free-form, so the environment cannot reach them.
            env_var="" if "<hook>" in path else env_var_name(path),
            description=field.description or "",
        )
