"""Configuration of the daemon: Go-compatible keys, validated once at startup.

Typical use, in the composition root::

    loaded = load_config(options["config"], overrides=options.overrides)
    for warning in loaded.warnings:
        log.warn("{warning}", warning=warning)
    config = loaded.config
    listener = make_listener(config.listen)
    upstream = make_upstream(config.upstream)

An existing Go ``snetd.config.json`` (or its YAML equivalent) loads
unchanged; ``SNET_*`` environment variables and command-line overrides are
applied on top.  Any problem raises :class:`ConfigError` listing every bad
key.  ``docs/configuration.md`` describes every key.
"""

from snet_daemon.config.errors import ConfigError, ConfigProblem
from snet_daemon.config.load import LoadedConfig, load_config
from snet_daemon.config.model import DaemonConfig
from snet_daemon.config.render import render_effective_config
from snet_daemon.config.sections import (
    DaemonIdentity,
    FrontendSettings,
    HeartbeatSettings,
    ListenSettings,
    LogSettings,
    ServiceCredential,
    UpstreamSettings,
)

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "DaemonConfig",
    "DaemonIdentity",
    "FrontendSettings",
    "HeartbeatSettings",
    "ListenSettings",
    "LoadedConfig",
    "LogSettings",
    "ServiceCredential",
    "UpstreamSettings",
    "load_config",
    "render_effective_config",
]
