"""Show the effective configuration without leaking secrets.

Operators debugging a deployment want to see every value the daemon ended up
with after file, environment and flags were merged -- under the Go key names
they wrote, so the output can be diffed against (or pasted into) a
``snetd.config.json``.  The same output goes into bug reports and logs, so
every secret is masked: fields flagged :attr:`KeyFlag.SECRET` (private keys,
``token_secret_key``, ``blockchain_provider_api_key``, credential values,
hook passwords and API keys) and passwords embedded in any URL.

This module also renders the key reference table of
``docs/configuration.md`` from the models, so the documentation cannot drift
from the code (a test compares them).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel

from snet_daemon.config.keys import documented_keys, fields_by_key, has_flag
from snet_daemon.config.model import DaemonConfig, KeyFlag

__all__ = ["MASK", "mask_url_password", "render_effective_config", "render_key_reference"]

#: What a secret is replaced with.
MASK = "***"


def mask_url_password(text: str) -> str:
    """Replace the password of a URL's user info with ``***``.

    ``"https://user:pw@host/x"`` becomes ``"https://user:***@host/x"``;
    anything that is not such a URL is returned unchanged.

    Args:
        text: Any string value.

    Returns:
        The string, with an embedded password masked.
    """
    if "://" not in text or "@" not in text:
        return text
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return text
    if not password:
        return text
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{hostport}"))


def _mask_urls(value: Any) -> Any:
    """Mask URL passwords anywhere inside a JSON value."""
    if isinstance(value, str):
        return mask_url_password(value)
    if isinstance(value, list):
        return [_mask_urls(item) for item in value]
    if isinstance(value, dict):
        return {key: _mask_urls(item) for key, item in value.items()}
    return value


def _masked(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """Mask secrets in ``data``, the JSON dump of ``model``, by walking the model.

    The JSON dump gives the wire form of each value (tuples as lists, the
    ``"unlimited"`` spelling of free calls); the model gives the flags.
    """
    result: dict[str, Any] = {}
    for key, (name, field) in fields_by_key(type(model)).items():
        value, dumped = getattr(model, name), data[key]
        if has_flag(field, KeyFlag.HOOK_SECTIONS):
            # Hook sections go back beside the other log keys, as in the file.
            for hook, section in value.items():
                result[hook] = _masked(section, dumped[hook])
        elif isinstance(value, BaseModel):
            result[key] = _masked(value, dumped)
        elif isinstance(value, tuple) and value and all(isinstance(item, BaseModel) for item in value):
            result[key] = [_masked(item, item_data) for item, item_data in zip(value, dumped, strict=True)]
        elif has_flag(field, KeyFlag.SECRET) and dumped not in ("", None):
            result[key] = MASK
        else:
            result[key] = _mask_urls(dumped)
    return result


def render_effective_config(config: DaemonConfig) -> str:
    """Render every key of ``config`` as pretty JSON, secrets masked.

    Keys use the Go names and nesting (``log.<hook>`` sections included) and
    are sorted, so two renderings diff cleanly.  An empty secret is shown as
    ``""`` -- that it is unset is useful to know and reveals nothing.

    Args:
        config: The configuration to show.

    Returns:
        A JSON document (no trailing newline).
    """
    data = _masked(config, config.model_dump(mode="json", by_alias=True))
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)


def render_key_reference() -> str:
    """Render the Markdown table of every key for ``docs/configuration.md``.

    Returns:
        The table, one row per leaf key in model order, without a trailing
        newline.
    """
    lines = [
        "| Key | Default | Implemented | Environment variable | Meaning |",
        "|---|---|---|---|---|",
    ]
    for doc in documented_keys():
        # A "|" inside a cell would end it; Markdown wants it escaped.
        default = (doc.default if doc.default == "required" else f"`{doc.default}`").replace("|", "\\|")
        description = doc.description.replace("|", "\\|")
        implemented = "yes" if doc.implemented else "no"
        env_var = f"`{doc.env_var}`" if doc.env_var else "(file or flag only)"
        lines.append(f"| `{doc.path}` | {default} | {implemented} | {env_var} | {description} |")
    return "\n".join(lines)
