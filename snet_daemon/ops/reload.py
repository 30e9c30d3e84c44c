"""``SIGHUP``: reload what can be reloaded, and never die of it.

The default action of ``SIGHUP`` is to end the process at once: no drain, no
refunds, and systemd counts a death by ``SIGHUP`` as a clean exit, so
``Restart=on-failure`` does not bring the daemon back.  Operators send it
out of habit ("reload your configuration"), and a terminal closing sends it
too.  So the daemon always handles it, whatever its configuration: the
handler runs every reload the composition root registered (today the
metadata) and, when there is none, says so in the log.

One handler for the whole process, owned here rather than by the component
that happens to reload, so that whether ``SIGHUP`` is survivable does not
depend on which components this configuration builds.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

__all__ = ["SighupReload"]

_log = Logger(namespace="snetd")


class SighupReload(Service):
    """Handles ``SIGHUP`` while running: each registered reload is started.

    Args:
        reactor: where the reloads run; the signal handler only hands over
            to it (``callFromThread`` is safe to call from a signal handler).
        reloads: ``(what, start)`` pairs: ``what`` names the reload in the
            log, ``start`` begins it and returns at once (reloads run in the
            background and report their own outcome).  Empty: ``SIGHUP`` is
            logged as having nothing to reload.
    """

    name = "sighup"

    def __init__(self, reactor: IReactorFromThreads, reloads: Sequence[tuple[str, Callable[[], object]]]) -> None:
        self._reactor = reactor
        self._reloads = tuple(reloads)
        self._installed = False
        self._previous: Any = signal.SIG_DFL

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        # A plain signal handler, not loop.add_signal_handler: asyncio's
        # version replaces the signal wakeup fd through which Twisted learns
        # that child processes exited (service executables, embedded etcd),
        # and it needs a running loop, which twistd has not started yet here.
        try:
            self._previous = signal.signal(signal.SIGHUP, self._signal)
        except (ValueError, OSError) as exc:  # not the main thread (embedded use)
            _log.warn("cannot handle SIGHUP ({error}); it would stop the daemon", error=exc)
            return
        self._installed = True

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._installed:
            # Stopping starts the drain of running calls, which the other
            # services do meanwhile: the default action (exit) would cut it
            # short, so a SIGHUP from here on is ignored instead.
            previous = self._previous
            signal.signal(signal.SIGHUP, signal.SIG_IGN if previous in (signal.SIG_DFL, None) else previous)
            self._installed = False

    def _signal(self, signum: int, frame: object) -> None:
        """The signal handler: hand over to the reactor safely."""
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Start every registered reload (what ``SIGHUP`` does)."""
        if not self._reloads:
            _log.info("SIGHUP: nothing to reload")
            return
        for what, start in self._reloads:
            _log.info("SIGHUP: reloading {what}", what=what)
            try:
                start()
            except Exception:  # one failing reload must not stop the others
                _log.failure("SIGHUP: reloading {what} failed", what=what)
