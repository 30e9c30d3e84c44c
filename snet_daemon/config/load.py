"""Load the configuration: file, environment and flags -> :class:`DaemonConfig`.

Sources, lowest precedence first (as in the Go daemon's Viper setup):

1. defaults (the model's field defaults, i.e. Go's ``defaultConfigJson``);
2. the file (JSON or YAML, chosen by extension);
3. ``SNET_*`` environment variables (:mod:`snet_daemon.config.env`);
4. overrides from command-line flags (dotted key path -> string).

Each source becomes a *layer*: a nested dict with lower-cased keys (Viper
keys are case-insensitive) plus, for environment and flags, a note of where
each key came from so that error messages can name the variable or flag.
Within a layer, deprecated aliases are migrated and stale README keys
dropped, each with a warning; then the layers are deep-merged and validated
once, and every problem -- bad strings in the environment, unknown keys,
validation failures -- is reported in one :class:`ConfigError`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from snet_daemon import jsontext
from snet_daemon.config import support
from snet_daemon.config.env import CoercionError, coerce, environment_keys, unreadable_reason
from snet_daemon.config.errors import ConfigError, ConfigProblem
from snet_daemon.config.keys import (
    default_config,
    display_path,
    holds_secrets,
    is_section,
    leaf_paths,
    model_at,
    same_value,
    shape_at,
    suggest,
    value_at,
)
from snet_daemon.config.model import DaemonConfig, KeyFlag
from snet_daemon.config.render import MASK, mask_url_password
from snet_daemon.config.support import DEPRECATED_ALIASES, is_stale_key

__all__ = ["LoadedConfig", "load_config"]

_EXTENSIONS = (".json", ".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated configuration and what the operator should be told about it.

    Attributes:
        config: The configuration.
        warnings: Human-readable warnings (deprecated or ignored keys, keys
            that are recognised but not implemented yet), each naming its key.
            The caller logs them; loading never logs by itself.
    """

    config: DaemonConfig
    warnings: tuple[str, ...]


@dataclass(slots=True)
class _Layer:
    """One source of values.

    Attributes:
        tree: Nested values with lower-cased keys and no ``null`` leaves.
        labels: Key path -> where it came from ("environment variable
            SNET_X"); empty for the file, whose keys need no explanation.
    """

    tree: dict[str, Any]
    labels: dict[tuple[str, ...], str] = field(default_factory=dict)


def load_config(
    path: str | None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Load, merge and validate the daemon configuration.

    Args:
        path: Configuration file (``.json``, ``.yaml`` or ``.yml``), or None
            to start from the defaults.
        environ: Environment to read ``SNET_*`` variables from; None means
            ``os.environ``.  Tests pass a dict so they never depend on the
            developer's shell.
        overrides: Values from command-line flags, by dotted key path
            (``{"log.level": "debug"}``); strings, coerced exactly like
            environment values.  They win over everything else.

    Returns:
        The configuration and the warnings about it.

    Raises:
        ConfigError: The file cannot be read or parsed, or any value is
            invalid; the error lists every problem found.
    """
    problems: list[ConfigProblem] = []
    warnings: list[str] = []
    layers: list[_Layer] = []
    if path is not None:
        layers.append(_file_layer(path))
    layers.append(_environment_layer(os.environ if environ is None else environ, problems))
    layers.append(_override_layer(overrides or {}, problems))
    for layer in layers:
        _migrate_aliases(layer, warnings)
        _drop_stale_keys(layer, warnings)

    merged: dict[str, Any] = {}
    labels: dict[tuple[str, ...], str] = {}
    for layer in layers:
        _deep_merge(merged, layer.tree)
        labels.update(layer.labels)

    config: DaemonConfig | None = None
    try:
        config = DaemonConfig.model_validate(merged)
    except ValidationError as exc:
        problems.extend(_explain(error, labels) for error in exc.errors(include_url=False))
    if problems or config is None:
        raise ConfigError(problems=tuple(problems))
    warnings.extend(_unimplemented_warnings(config, layers))
    return LoadedConfig(config=config, warnings=tuple(warnings))


# ------------------------------------------------------------------------------
# Reading the file.


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1's safe loader, minus two surprises for a config file.

    * Integers are decimal only.  YAML 1.1 reads an unquoted ``0x3Bb9...``
      (every Ethereum address in ``trusted_free_call_signers``) as a huge
      hexadecimal int, and ``1:30`` as sexagesimal 90.
    * No timestamps: a date-like string stays a string.
    """


_INT_TAG = "tag:yaml.org,2002:int"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_INT_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_INT_TAG, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))


def _read_file(path: str) -> object:
    """Parse the configuration file, turning every failure into a ConfigError."""
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ConfigError(
            f"configuration file '{path}' has an unsupported extension {suffix or '(none)'!r}; use .json, .yaml or .yml"
        )
    try:
        # utf-8-sig: editors on Windows like to start files with a BOM.
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read configuration file '{path}': not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file '{path}': {exc.strerror or exc}") from None
    if suffix == ".json":
        try:
            return jsontext.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"syntax error in configuration file '{path}' at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
        except ValueError as exc:  # nested too deep, or a number too long to read
            raise ConfigError(f"cannot read configuration file '{path}': {unreadable_reason(exc)}") from None
    try:
        return yaml.load(text, Loader=_YamlLoader)  # _YamlLoader is a SafeLoader
    except RecursionError:
        # PyYAML's composer recurses once per level; jsontext's cheap pre-check has no YAML equivalent.
        raise ConfigError(
            f"cannot read configuration file '{path}': values nested deeper than {jsontext.MAX_DEPTH} levels"
        ) from None
    except ValueError as exc:  # a number too long to read, an "!!int" that is none
        raise ConfigError(f"cannot read configuration file '{path}': {unreadable_reason(exc)}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"syntax error in configuration file '{path}'{where}: {exc.problem or exc.context or exc}"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"syntax error in configuration file '{path}': {exc}") from None


def _normalise(tree: Mapping[Any, Any]) -> dict[str, Any]:
    """Lower-case mapping keys (recursively) and drop ``null`` values.

    Viper lower-cases every key of nested maps (not of maps inside lists),
    so ``"Daemon_Endpoint"`` works in Go and must work here.  A ``null``
    means "not set" to Viper, so the default applies.
    """
    result: dict[str, Any] = {}
    for key, value in tree.items():
        if value is None:
            continue
        result[str(key).lower()] = _normalise(value) if isinstance(value, Mapping) else value
    return result


def _check_nesting(value: object, path: str) -> None:
    """Refuse a file whose values nest deeper than :data:`jsontext.MAX_DEPTH` or contain themselves.

    A YAML alias inside its own anchor (``log: &a {formatter: *a}``) loads
    as a structure that contains itself; everything that walks it after
    loading -- normalising keys, validation, error messages -- would recurse
    until Python gives up.  Heights are remembered per object, so a value
    shared through aliases is measured once however often it is used.

    Raises:
        ConfigError: naming the file and the problem.
    """
    heights: dict[int, int] = {}
    walking: set[int] = set()

    def height(node: object) -> int:
        if not isinstance(node, dict | list):
            return 0
        key = id(node)
        if key in heights:
            return heights[key]
        if key in walking:
            raise ConfigError(
                f"cannot read configuration file '{path}': a value contains itself (a YAML alias inside its own anchor)"
            )
        if len(walking) >= jsontext.MAX_DEPTH:
            raise ConfigError(
                f"cannot read configuration file '{path}': values nested deeper than {jsontext.MAX_DEPTH} levels"
            )
        walking.add(key)
        heights[key] = 1 + max(map(height, node.values() if isinstance(node, dict) else node), default=0)
        walking.discard(key)
        return heights[key]

    height(value)


def _file_layer(path: str) -> _Layer:
    data = _read_file(path)
    if data is None:  # an empty YAML file: all defaults
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"configuration file '{path}' must hold a mapping of keys at the top level, not {type(data).__name__}"
        )
    _check_nesting(data, path)
    tree = _normalise(data)
    # Go quirk: an embedded-etcd section without "enabled" means enabled.
    server = tree.get("payment_channel_storage_server")
    if isinstance(server, dict) and "enabled" not in server:
        server["enabled"] = True
    return _Layer(tree)


# ------------------------------------------------------------------------------
# Environment and overrides.


def _set(tree: dict[str, Any], path: Sequence[str], value: object) -> None:
    """Set ``tree[p0][p1]... = value``, creating (or replacing) dicts on the way."""
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = _normalise(value) if isinstance(value, Mapping) else value


def _environment_layer(environ: Mapping[str, str], problems: list[ConfigProblem]) -> _Layer:
    layer = _Layer({})
    for name, path, shape in environment_keys(environ):
        label = f"environment variable {name}"
        try:
            value = coerce(environ[name], shape)
        except CoercionError as exc:
            problems.append(_string_problem(path, environ[name], label, str(exc)))
            continue
        _set(layer.tree, path, value)
        layer.labels[path] = label
    return layer


def _override_layer(overrides: Mapping[str, str], problems: list[ConfigProblem]) -> _Layer:
    layer = _Layer({})
    for key, text in overrides.items():
        path = tuple(key.strip().lower().split("."))
        label = f"command-line override '{key}'"
        shape = None
        if all(path):
            # A hook section is reachable by its fields ("log.tg.type"), never
            # as a whole: "log.levle" must be a typo, not a hook named levle.
            shape = shape_at(path, hooks=False) or (shape_at(path) if len(path) > 2 else None)
        if shape is None:
            # Unlike a stray SNET_* variable, a flag is certainly meant for us.
            problems.append(_unknown_key_problem(path, label, value=key))
            continue
        try:
            value = coerce(text, shape)
        except CoercionError as exc:
            problems.append(_string_problem(path, text, label, str(exc)))
            continue
        _set(layer.tree, path, value)
        layer.labels[path] = label
    return layer


def _string_problem(path: Sequence[str], text: str, label: str, reason: str) -> ConfigProblem:
    dotted = ".".join(path)
    shown = MASK if text and holds_secrets(path) else text
    return ConfigProblem(f"{_key_ref(dotted, label)}: {_show(shown)} {reason}", dotted, shown)


# ------------------------------------------------------------------------------
# Per-layer key migration.


def _migrate_aliases(layer: _Layer, warnings: list[str]) -> None:
    """Copy deprecated top-level keys to their new names, with a warning.

    Done per layer, so precedence between sources is unaffected: an old name
    in the environment still beats a new name in the file.  Within one layer
    the new name wins.
    """
    for old, new in DEPRECATED_ALIASES.items():
        if old not in layer.tree:
            continue
        value = layer.tree.pop(old)
        label = layer.labels.pop((old,), None)
        if new in layer.tree:
            warnings.append(
                f"{_key_ref(old, label)} is deprecated and was ignored because '{new}' is also set; remove '{old}'"
            )
            continue
        layer.tree[new] = value
        if label:
            layer.labels[(new,)] = label
        warnings.append(f"{_key_ref(old, label)} is deprecated; its value is used for '{new}' (rename the key)")


def _drop_stale_keys(layer: _Layer, warnings: list[str]) -> None:
    """Remove keys the Go README documents but Go never read, with a warning."""
    for key in [key for key in layer.tree if is_stale_key(key)]:
        del layer.tree[key]
        label = layer.labels.pop((key,), None)
        warnings.append(
            f"{_key_ref(key, label)} is ignored: the Go daemon's README lists it, but no version of snetd uses it"
        )


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any], path: tuple[str, ...] = ()) -> None:
    """Merge ``top`` into ``base``: sections merge key by key, anything else replaces.

    A map-valued key (``free_calls_per_address``) is one value, like a list:
    a higher source replaces it whole, so ``SNET_FREE_CALLS_PER_ADDRESS={}``
    can empty the file's map rather than leave every entry in place.
    """
    for key, value in top.items():
        current = base.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping) and is_section((*path, key)):
            _deep_merge(current, value, (*path, key))
        else:
            base[key] = _normalise(value) if isinstance(value, Mapping) else value


# ------------------------------------------------------------------------------
# Explaining validation errors.

# Wording for pydantic's own error types; the fallback quotes pydantic.
_REASONS: Mapping[str, str] = {
    "int_parsing": "is not a whole number",
    "int_type": "is not a whole number",
    "int_from_float": "is not a whole number",
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "finite_number": "is not a finite number",
    "bool_parsing": "is not a boolean (true/false, 1/0, yes/no)",
    "bool_type": "is not a boolean (true/false, 1/0, yes/no)",
    "string_type": "is not a string",
    "tuple_type": "is not a list",
    "list_type": "is not a list",
    "dict_type": "is not a mapping (a JSON object)",
    "model_type": "is not a mapping (a JSON object)",
    "model_attributes_type": "is not a mapping (a JSON object)",
}


def _key_ref(path: str, label: str | None) -> str:
    """``configuration key 'path'``, plus the source when it is not the file."""
    return f"configuration key '{path}'" + (f" (from {label})" if label else "")


def _show(value: object) -> str:
    """Quote a value for a message: strings as ``'text'``, the rest as JSON."""
    if isinstance(value, str):
        text = repr(mask_url_password(value))
    else:
        text = json.dumps(value, default=str, ensure_ascii=False)
    # A whole section can be the offending value; keep the line readable.
    return text if len(text) <= 120 else text[:117] + "..."


def _label_for(loc: Sequence[str | int], labels: Mapping[tuple[str, ...], str]) -> str | None:
    """Where the value at ``loc`` came from, if not from the file."""
    path = tuple(segment for segment in loc if isinstance(segment, str) and not segment.startswith(("<", "[")))
    for end in range(len(path), 0, -1):
        label = labels.get(path[:end])
        if label:
            return label
    # An unknown section ("log.formater") is set by deeper keys ("log.formater.type").
    for labelled, label in labels.items():
        if labelled[: len(path)] == path:
            return label
    return None


def _unknown_key_problem(
    loc: Sequence[str | int], label: str | None, value: object, *, hook_hint: bool = False
) -> ConfigProblem:
    path = display_path(loc)
    suggestion = suggest(str(loc[-1]), loc[:-1]) if loc else None
    message = f"unknown {_key_ref(path, label)}"
    if suggestion:
        message += f" (did you mean '{suggestion}'?)"
    elif hook_hint:
        message += "; a log hook section must be listed in 'log.hooks'"
    return ConfigProblem(message, path, value)


def _explain(error: ErrorDetails, labels: Mapping[tuple[str, ...], str]) -> ConfigProblem:
    """Turn one pydantic error into a path-qualified problem."""
    loc = error["loc"]
    label = _label_for(loc, labels)
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        container = model_at(loc[:-1])
        hook_hint = (
            container is not None
            and any(KeyFlag.HOOK_SECTIONS in info.metadata for info in container.model_fields.values())
            and isinstance(value, Mapping)
            and "type" in value
        )
        return _unknown_key_problem(loc, label, display_path(loc), hook_hint=hook_hint)
    path = display_path(loc)
    if error["type"] == "missing":
        return ConfigProblem(f"{_key_ref(path, label)} is required but not set", path, None)
    if holds_secrets(loc) and value not in ("", None):
        value = MASK
    if error["type"] == "snet_config":
        reason = str((error.get("ctx") or {}).get("reason", error["msg"]))
    else:
        reason = _REASONS.get(error["type"], f"is invalid ({error['msg']})")
    return ConfigProblem(f"{_key_ref(path, label)}: {_show(value)} {reason}", path, value)


# ------------------------------------------------------------------------------
# Warnings about keys we accept but do not implement.


def _unimplemented_warnings(config: DaemonConfig, layers: Sequence[_Layer]) -> list[str]:
    """One warning per key that a user set away from its default but we ignore.

    Only keys some source actually set are considered, and only if the final
    value differs from the default: a Go ``init-full`` file restating every
    default must load without a wall of warnings.
    """
    paths: dict[tuple[str, ...], None] = {}
    for layer in layers:
        paths.update(dict.fromkeys(leaf_paths(layer.tree)))
    default = default_config()
    warnings = []
    for path in sorted(paths):
        dotted = ".".join(path)
        # Looked up at call time, so a test can extend the set.
        if dotted in support.IMPLEMENTED_KEYS or same_value(path, value_at(config, path), value_at(default, path)):
            continue
        warnings.append(f"configuration key '{dotted}' is recognised but not implemented yet; it has no effect")
    return warnings
