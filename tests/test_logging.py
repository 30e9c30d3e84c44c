"""Log output (snet_daemon.ops.logging): JSON lines, journal priorities, the level filter."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from twisted.logger import Logger, LogLevel, LogPublisher, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from snet_daemon.ops.logging import json_line, observer_for, writes_to_journal


def _logger(observer: Any) -> Logger:
    return Logger(namespace="snetd.test", observer=LogPublisher(observer))


def _failure() -> Failure:
    try:
        raise KeyError("boom-key")
    except KeyError:
        return Failure()
    raise AssertionError("unreachable")


def test_json_lines_are_plain_json_with_the_rendered_message() -> None:
    """One JSON object per line, readable by any JSON-lines reader: no RFC 7464 \\x1e in front,
    the message rendered, the level and logger by name, scalar fields kept."""
    out = io.StringIO()
    log = _logger(observer_for("info", True, out, journal=False))
    log.info("snetd {version} listening on {address}", version="1.0", address="127.0.0.1:7000", port=7000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("{")
    record = json.loads(lines[0])
    assert record["msg"] == "snetd 1.0 listening on 127.0.0.1:7000"
    assert record["level"] == "info"
    assert record["logger"] == "snetd.test"
    assert (record["version"], record["address"], record["port"]) == ("1.0", "127.0.0.1:7000", 7000)
    assert not [key for key in record if key.startswith("log_")]


def test_json_timestamp_is_iso8601_utc() -> None:
    """The event's own time, in UTC, to the millisecond (Go's default timestamp layout)."""
    record = json.loads(json_line({"log_time": 86400 * 365 + 0.25, "log_level": LogLevel.warn, "log_format": "x"}))
    assert record["timestamp"] == "1971-01-01T00:00:00.250Z"
    assert record["level"] == "warn"


def test_json_failure_carries_the_traceback_and_the_exception_message() -> None:
    """log.failure(...): the traceback is in "error", down to the exception and its message."""
    out = io.StringIO()
    _logger(observer_for("info", True, out, journal=False)).failure("lost {what}", _failure(), what="a call")
    record = json.loads(out.getvalue())
    assert record["msg"] == "lost a call"
    assert record["what"] == "a call"
    assert record["error"].startswith("Traceback")
    assert "KeyError: 'boom-key'" in record["error"]


def test_json_fields_that_are_not_scalars_are_left_out_and_nothing_raises() -> None:
    """Objects, non-finite floats, a broken time, a missing level, a failure that cannot render:
    the line is still valid JSON and says what it can."""

    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

        __str__ = __repr__

    class BrokenFailure:
        def getTraceback(self) -> str:
            raise RuntimeError("no traceback")

    event = {
        "log_format": "{count} bad",
        "log_time": "not a time",
        "log_failure": BrokenFailure(),
        "count": 3,
        "obj": Unprintable(),
        "pair": (1, 2),
        "ratio": float("nan"),
        "flag": True,
        "nothing": None,
        "msg": "an event field named like a line key",
    }
    record = json.loads(json_line(event))
    assert record["msg"] == "3 bad"
    assert record["level"] == "info"
    assert record["timestamp"].endswith("Z")
    assert "no traceback" in record["error"]
    assert (record["count"], record["ratio"], record["flag"], record["nothing"]) == (3, "nan", True, None)
    assert "obj" not in record
    assert "pair" not in record
    assert json.loads(json_line({"log_level": []}))["msg"].startswith("unloggable event: TypeError")
    line = json_line({"log_format": "caf\u00e9 \udc80", "log_level": LogLevel.info})
    assert line.isascii()
    assert json.loads(line)["msg"] == "caf\u00e9 \udc80"


def test_json_legacy_events_leave_out_their_bookkeeping() -> None:
    """twisted.python.log events (twistd's own lines) carry "message", "time", "isError",
    "system": the line has the text once, and none of them."""
    seen: list[dict[str, Any]] = []
    observer: Any = seen.append  # a plain callable is an ILogObserver; mypy-zope cannot tell
    globalLogPublisher.addObserver(observer)
    try:
        legacy_log.msg("Server Shut Down.")
    finally:
        globalLogPublisher.removeObserver(observer)
    record = json.loads(json_line(seen[-1]))
    assert record["msg"] == "Server Shut Down."
    assert not {"message", "time", "isError", "system"} & set(record)


def test_level_filter() -> None:
    """Events below log.level are not written."""
    out = io.StringIO()
    log = _logger(observer_for("warn", True, out, journal=False))
    log.info("quiet")
    log.warn("loud")
    assert [json.loads(line)["msg"] for line in out.getvalue().splitlines()] == ["loud"]


def test_journal_lines_start_with_their_syslog_priority() -> None:
    """For the journal every line, a traceback's included, starts with <N>: journald strips it and
    files the line at that priority (journalctl -p warning finds warnings and errors)."""
    out = io.StringIO()
    log = _logger(observer_for("debug", False, out, journal=True))
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    log.failure("f", _failure())
    lines = out.getvalue().splitlines()
    assert [line[:3] for line in lines[:5]] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert lines[4].endswith("[snetd.test#critical] f")
    assert len(lines) > 6
    assert all(line.startswith("<2>\t") for line in lines[5:])
    out = io.StringIO()
    _logger(observer_for("info", True, out, journal=True)).error("e")
    assert out.getvalue().startswith('<3>{"timestamp": ')


def test_no_priority_prefix_off_the_journal() -> None:
    """A terminal, a file or a pipe gets lines exactly as twistd writes them."""
    out = io.StringIO()
    _logger(observer_for("info", False, out, journal=False)).warn("w")
    assert out.getvalue().split(" ", 1)[1] == "[snetd.test#warn] w\n"


def test_writes_to_journal_compares_device_and_inode(tmp_path: Path) -> None:
    """$JOURNAL_STREAM (device:inode) names the stream that is the journal; only that one is."""
    with open(tmp_path / "stdout", "w") as stream, open(tmp_path / "other", "w") as other:
        status = os.fstat(stream.fileno())
        environ = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        assert writes_to_journal(stream, environ)
        assert not writes_to_journal(other, environ)
        assert not writes_to_journal(stream, {})
        assert not writes_to_journal(stream, {"JOURNAL_STREAM": "garbage"})
        assert not writes_to_journal(stream, {"JOURNAL_STREAM": "1:x"})
        assert not writes_to_journal(io.StringIO(), environ)
