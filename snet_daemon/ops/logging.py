"""Log output for ``twistd snetd``: level filter, text or JSON lines, journal priorities.

twistd chooses where logs go (``--logfile``, stdout with ``-n``, syslog);
the daemon's config chooses how much and in which format (``log.level``,
``log.formatter.type``).  :func:`destination` works out where twistd would
write and :func:`observer_for` builds an observer writing there, filtered
and formatted as configured; the composition root sets it on the twistd
application, which twistd then uses instead of its own default.  Taking
twistd's place also means taking over what twistd does for its log file:
:class:`RotateOnSigusr1` handles ``SIGUSR1`` as twistd would.

Left to twistd, and so neither filtered nor formatted as configured:
``--syslog`` and ``--logger`` (twistd builds those observers itself).  A
``--logger`` given on the twistd command line wins in any case.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python.logfile import LogFile
from twisted.python.usage import UsageError

__all__ = ["RotateOnSigusr1", "destination", "json_line", "level_named", "observer_for", "writes_to_journal"]

_log = Logger(namespace="snetd")

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

#: syslog priorities (``<N>`` line prefixes) of Twisted's levels.
_PRIORITIES = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}

#: Bookkeeping that ``twisted.python.log`` events carry besides their text
#: (``time`` repeats ``log_time``, ``message`` and ``why`` are in the text).
_LEGACY_KEYS = frozenset({"message", "time", "system", "isError", "format", "why", "failure"})

#: The keys every JSON line has; an event field of the same name is left out.
_JSON_KEYS = ("timestamp", "level", "logger", "msg", "error")


def level_named(name: str) -> LogLevel:
    """The Twisted log level for a Go daemon level name (``info``, ``warn``...)."""
    level: LogLevel = _LEVELS[name.lower()]
    return level


def destination(twistd_options: Mapping[str, Any] | None) -> IO[str] | LogFile | None:
    """Where twistd would log, given its own options; None means "twistd decides".

    Mirrors twistd's Unix logger: ``--logfile=-`` or ``-n`` without a log
    file means stdout; a daemon without ``--logfile`` writes ``twistd.log``
    (a :class:`LogFile`, which twistd rotates at 1 MB and on ``SIGUSR1``).
    Returns None for ``--syslog`` and ``--logger``, which are left to twistd.

    Raises:
        UsageError: ``--logfile=-`` without ``-n``.  twistd refuses that
            ("Daemons cannot log to stdout"), but only in the code this
            observer replaces: without this check the daemon would detach
            from the terminal and log to /dev/null.  Also a log file that
            cannot be opened (no such directory, no permission): said in
            one line, as a port that cannot be bound is, not a traceback.
    """
    if twistd_options is None:
        return sys.stdout
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    name = twistd_options.get("logfile") or ""
    if name == "-" and not twistd_options.get("nodaemon"):
        raise UsageError(
            "a daemon cannot log to stdout (--logfile=-): add -n (--nodaemon) to stay in the foreground, "
            "or give --logfile=FILE"
        )
    if name == "-" or (not name and twistd_options.get("nodaemon")):
        return sys.stdout
    path = name or "twistd.log"
    try:
        logfile: LogFile = LogFile.fromFullPath(path)
    except OSError as error:
        raise UsageError(f"cannot open the log file {path}: {error.strerror or error}") from None
    return logfile


def writes_to_journal(stream: IO[str] | LogFile, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``stream`` is systemd's journal, as ``$JOURNAL_STREAM`` says.

    systemd sets ``JOURNAL_STREAM=device:inode`` for a service whose
    stdout or stderr goes to the journal; the stream is the journal when
    its file descriptor has that device and inode (systemd.exec(5)).  That
    is exact: a terminal, a file, a pipe or a child process whose output
    was redirected is not mistaken for the journal.
    """
    device, sep, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep or isinstance(stream, LogFile):  # a log file is never the journal
        return False
    try:
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):  # no file descriptor (io.UnsupportedOperation), a malformed variable
        return False


def observer_for(level: str, json: bool, stream: IO[str] | LogFile, *, journal: bool | None = None) -> ILogObserver:
    """An observer writing events at ``level`` or above to ``stream``.

    Args:
        level: a Go level name (:func:`level_named`).
        json: one JSON object per line (:func:`json_line`); otherwise
            Twisted's text lines, as twistd writes them.
        stream: where the lines go.
        journal: start each line with its syslog priority (``<3>`` for an
            error...), which journald strips and files the line under, so
            that ``journalctl -p warning`` finds warnings and errors.
            Default: when :func:`writes_to_journal` says ``stream`` is the
            journal; anywhere else the prefix would only be noise.
    """
    line: Callable[[LogEvent], str | None] = json_line if json else formatEventAsClassicLogText
    if writes_to_journal(stream) if journal is None else journal:
        line = _with_priority(line)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level_named(level))
    # A LogFile has write() and flush(), all that FileLogObserver uses.
    return FilteringLogObserver(FileLogObserver(cast(IO[str], stream), line), [predicate])


def _with_priority(line: Callable[[LogEvent], str | None]) -> Callable[[LogEvent], str | None]:
    """``line`` with each output line prefixed by the event's syslog priority.

    Every line, not only the first: journald makes a record of each line,
    and a traceback's lines belong to the error as much as its first one.
    """

    def prefixed(event: LogEvent) -> str | None:
        text = line(event)
        if not text:
            return text
        prefix = f"<{_PRIORITIES.get(event.get('log_level', LogLevel.info), 6)}>"
        return "".join(prefix + part for part in text.splitlines(keepends=True))

    return prefixed


def json_line(event: LogEvent) -> str:
    """One log event as one line of JSON (never raises).

    The line holds ``timestamp`` (ISO 8601, UTC, milliseconds, as Go's
    default ``log.formatter.timestamp_format``), ``level`` (Twisted's level
    name), ``logger`` (the namespace), ``msg`` (the rendered message) and,
    for a failure, ``error``: its traceback, ending with the exception and
    its message.  The event's other fields follow when they are strings,
    numbers, booleans or null; anything else is rendered in ``msg`` when the
    message names it, and left out otherwise (an object's ``repr`` is
    seldom useful and may hold more than the message meant to show).
    ``log_*`` keys are Twisted's own and are left out.

    Pure ASCII (``\\u`` escapes), so that writing it cannot fail whatever
    the stream's encoding, and no RFC 7464 ``\\x1e`` separator, so that
    any JSON-lines reader, and the journal, take it.
    """
    try:
        record = _json_record(event)
    except Exception as error:  # a broken event must not take the log down with it
        record = {"timestamp": _timestamp(None), "level": "error", "msg": f"unloggable event: {error!r}"}
    return json.dumps(record) + "\n"


def _json_record(event: LogEvent) -> dict[str, object]:
    legacy = event.get("log_namespace") == "log_legacy"
    fields = {
        key: _scalar(value)
        for key, value in event.items()
        if isinstance(key, str)
        and not key.startswith("log_")
        and key not in _JSON_KEYS
        and not (legacy and key in _LEGACY_KEYS)
        and _is_scalar(value)
    }
    level = event.get("log_level", LogLevel.info)
    record: dict[str, object] = {
        "timestamp": _timestamp(event.get("log_time")),
        "level": level.name if level in _PRIORITIES else "info",
        "logger": str(event.get("log_namespace", "")),
        "msg": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["error"] = failure.getTraceback()
        except Exception as error:
            record["error"] = f"(traceback unavailable: {error!r})"
    return record | fields


def _timestamp(seconds: object) -> str:
    when = seconds if isinstance(seconds, int | float) and math.isfinite(seconds) else datetime.now(UTC).timestamp()
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _scalar(value: object) -> object:
    """JSON has no NaN or infinity: those become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RotateOnSigusr1(Service):
    """``SIGUSR1`` rotates the log file, as under plain twistd.

    twistd installs this handler along with its own log file observer,
    which snetd replaces; without it ``SIGUSR1``, which logrotate setups
    and operators send out of twistd habit, would end the daemon at once.
    As twistd does, an existing handler (or ``SIG_IGN``) is left alone.

    The handler stays installed once the service stops (it stops last,
    after the drain): rotating is harmless at any time, and a SIGUSR1 sent
    during the rest of the stop must not end the daemon either.

    Args:
        reactor: where the rotation runs; the signal handler only hands over
            to it (``callFromThread`` is safe to call from a signal handler).
        logfile: the file to rotate.
    """

    name = "log-rotation"

    def __init__(self, reactor: IReactorFromThreads, logfile: LogFile) -> None:
        self._reactor = reactor
        self._logfile = logfile

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        try:
            if not signal.getsignal(signal.SIGUSR1):  # SIG_DFL (0) or a handler set outside Python (None)
                signal.signal(signal.SIGUSR1, self._signal)
        except ValueError as error:  # not the main thread (embedded use)
            _log.warn("cannot handle SIGUSR1 ({error}); it would stop the daemon", error=error)

    def _signal(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self._logfile.rotate)
