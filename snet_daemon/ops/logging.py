"""Log output for ``twistd snetd``: level filter and text or JSON lines.

twistd chooses where logs go (``--logfile``, stdout with ``-n``, syslog);
the daemon's config chooses how much and in which format (``log.level``,
``log.formatter.type``).  :func:`observer_for` builds an observer that
writes where twistd would, but filtered and formatted as configured; the
composition root sets it on the twistd application, which twistd then uses
instead of its own default.  A ``--logger`` given on the twistd command
line still wins.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "fatal": LogLevel.critical,
    "panic": LogLevel.critical,
    "critical": LogLevel.critical,
}


def level_named(name: str) -> LogLevel:
    """The Twisted log level for a Go daemon level name (``info``, ``warn``...)."""
    level: LogLevel = _LEVELS[name.lower()]
    return level


def destination(twistd_options: Mapping[str, Any] | None) -> IO[str] | None:
    """Where twistd would log, given its own options; None means "twistd decides".

    Mirrors twistd's Unix logger: ``--logfile=-`` or ``-n`` without a log
    file means stdout; a daemon without ``--logfile`` writes ``twistd.log``.
    Returns None for ``--syslog`` and ``--logger``, which are left to twistd.
    """
    if twistd_options is None:
        return sys.stdout
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    name = twistd_options.get("logfile") or ""
    if name == "-" or (not name and twistd_options.get("nodaemon")):
        return sys.stdout
    return LogFile.fromFullPath(name or "twistd.log")  # type: ignore[no-any-return]


def observer_for(level: str, json: bool, stream: IO[str]) -> ILogObserver:
    """An observer writing events at ``level`` or above to ``stream``."""
    base = jsonFileLogObserver(stream) if json else textFileLogObserver(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level_named(level))
    return FilteringLogObserver(base, [predicate])
