"""How many client connections the daemon port keeps open, and which it lets go.

Every connection holds a file descriptor and about 18 KiB of the daemon's
memory (an idle HTTP/2 connection, measured).  Without a bound, a client
that opens connections and sends nothing on them (each kept until the idle
timeout, five minutes) could use up the process's file descriptors: then
the daemon can no longer reach etcd, the service or the chain, and every
call fails, paid ones included.  So the port keeps at most ``limit``
connections (``max_connections``).  At the limit a new connection takes the
place of the oldest idle one (no call in progress: an HTTP/2 connection
without open streams, an HTTP/1.1 one between requests, one that has not
yet shown its protocol), which is closed: gRPC clients reconnect by
themselves after a GOAWAY, so a legitimate client loses nothing.  Only when
every connection has a call in progress is the new one refused (closed at
once, before it reads anything; a gRPC client sees UNAVAILABLE and retries).
That is the choice of nginx (``worker_connections``, which reuses idle
keep-alive connections first) rather than Go's net/http (no bound), where
an operator learns of the problem when the process runs out of descriptors.

The descriptors themselves: a process started from a shell or by systemd
without ``LimitNOFILE`` gets a soft limit of 1,024.  As the Go runtime does
(since Go 1.19), the daemon raises its soft limit to the hard one at start,
and sizes the automatic connection limit from what it then has, keeping
room for its own descriptors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from twisted.logger import Logger

__all__ = ["ConnectionTable", "Tracked", "connection_limit", "open_file_limit", "raise_open_file_limit"]

_log = Logger(namespace="snetd.frontend")

#: The automatic limit, when the open-file limit allows it: about 180 MiB
#: of idle HTTP/2 connections.
AUTOMATIC_LIMIT: Final = 10_000
#: Descriptors kept for the daemon's own use (etcd, the service, the chain,
#: executables' pipes, logs), at least; an eighth of the limit if more.
_RESERVE: Final = 256
#: Seconds between two warnings that connections are being refused.
_WARN_EVERY: Final = 60.0


def open_file_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` in force (0: unknown, not a Unix)."""
    try:
        import resource
    except ImportError:
        return 0
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 2**31 - 1 if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit() -> None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit, as Go programs do at start.

    Only ``twistd snetd`` calls it: a test or program embedding the daemon
    keeps its own limits.  Executables the daemon runs per call inherit
    the raised limit (as they would under systemd's ``LimitNOFILE``).
    """
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):  # macOS refuses RLIM_INFINITY: keep what we have
            pass


def connection_limit(configured: int, open_files: int) -> tuple[int, str | None]:
    """The connection limit to use, and a warning for the operator if any.

    Args:
        configured: ``max_connections`` (0: automatic).
        open_files: the soft open-file limit (0: unknown).
    """
    room = 0 if open_files <= 0 else open_files - max(_RESERVE, open_files // 8)
    if configured == 0:
        if open_files <= 0:
            return AUTOMATIC_LIMIT, None
        return max(16, min(AUTOMATIC_LIMIT, room)), None
    if open_files > 0 and configured > room:
        return configured, (
            f"max_connections {configured} leaves too few of the {open_files} open files the process may have "
            f"for its own connections to etcd, the service and the chain; "
            f"raise LimitNOFILE (ulimit -n) or lower max_connections to {max(16, room)} or less"
        )
    return configured, None


class Tracked(Protocol):
    """A connection, as the table sees it."""

    def idle(self) -> bool:
        """Whether closing it now would cut no call short."""

    def evict(self) -> None:
        """Close it to make room (gracefully: HTTP/2 GOAWAY)."""


class ConnectionTable:
    """The open connections of one port, oldest first, bounded by ``limit``.

    Args:
        limit: most connections kept at once (at least 1).
        clock: seconds (for spacing the warnings).
    """

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        if limit < 1:
            raise ValueError("the connection limit must be at least 1")
        self.limit = limit
        self._clock = clock
        #: Insertion-ordered: the first idle one found is the oldest idle.
        self._open: dict[Tracked, None] = {}
        self._warned_at: float | None = None
        #: Connections closed to make room, and refused (for tests and logs).
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, conn: Tracked) -> bool:
        """Take ``conn`` in, closing an idle one if the table is full.

        Returns False when every connection has a call in progress: the
        caller then refuses ``conn``.
        """
        if len(self._open) >= self.limit:
            victim = next((c for c in self._open if c.idle()), None)
            if victim is None:
                self.refused += 1
                self._warn()
                return False
            # Out of the count at once: its descriptor is freed once it closes.
            del self._open[victim]
            self.evicted += 1
            victim.evict()
        self._open[conn] = None
        return True

    def release(self, conn: Tracked) -> None:
        """``conn`` closed (or was closed to make room)."""
        self._open.pop(conn, None)

    def _warn(self) -> None:
        now = self._clock()
        if self._warned_at is not None and now - self._warned_at < _WARN_EVERY:
            return
        self._warned_at = now
        _log.warn(
            "refusing client connections: {limit} are open, each with a call in progress "
            "(max_connections; {refused} refused so far)",
            limit=self.limit,
            refused=self.refused,
        )
