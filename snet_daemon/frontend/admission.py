"""How many client connections the daemon port keeps open, and which it lets go.

Every connection holds a file descriptor and about 18 KiB of the daemon's
memory (an idle HTTP/2 connection, measured).  Without a bound, a client
that opens connections and sends nothing on them (each kept until the idle
timeout, five minutes) could use up the process's file descriptors: then
the daemon can no longer reach etcd, the service or the chain, and every
call fails, paid ones included.  So the port keeps at most ``limit``
connections (``max_connections``).  At the limit a new connection takes the
place of an idle one, which is closed (HTTP/2: GOAWAY, after which gRPC
clients reconnect by themselves); only when every connection has a call in
progress is the new one refused (closed at once, before it reads anything;
a gRPC client sees UNAVAILABLE and retries).  That is the choice of nginx
(``worker_connections``, which reuses idle keep-alive connections first)
rather than Go's net/http (no bound), where an operator learns of the
problem when the process runs out of descriptors.  Both are logged, at most
once a minute each.

Which connection is idle, and which goes first:

* A call is in progress from the moment the client has sent a whole
  request message (or ended its side, or we began a reply) until its stream
  ends; on HTTP/1.1 from the moment the whole request has arrived until its
  response is finished.  A client that opens streams and sends no message
  on them, or sends a request a byte at a time, holds nothing against
  newcomers.  What such a connection was still sending is refused (HTTP/2
  ``REFUSED_STREAM``, which gRPC clients retry on a new connection) or, on
  HTTP/1.1, which has no way to say so, lost with the connection.
* Connections that never had a call in :data:`FIRST_CALL_GRACE` seconds
  go first, oldest first: a flood of silent connections takes its own
  places, not those of clients that called and keep their connection for
  the next call.  Then those idle the longest; then newcomers still within
  the grace (a legitimate client connects and calls at once, and is not
  closed to make room for the connection after it while older idle ones
  are there).
* The protocols report each change (:meth:`ConnectionTable.busy`,
  :meth:`ConnectionTable.idle`), so choosing a victim or refusing costs the
  same with ten or ten thousand connections open: a scan of the table for
  each newcomer cost about 1 ms of the event loop at 10,000.

The descriptors themselves: a process started from a shell or by systemd
without ``LimitNOFILE`` gets a soft limit of 1,024.  As the Go runtime does
(since Go 1.19), the daemon raises its soft limit to the hard one at start,
and sizes the automatic connection limit from what it then has, keeping
room for its own descriptors.  Unlike Go, which puts the original limit
back for the processes it starts, the executables of ``process`` services
and the embedded etcd inherit the raised limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from twisted.logger import Logger

__all__ = [
    "FIRST_CALL_GRACE",
    "ConnectionTable",
    "Tracked",
    "connection_limit",
    "open_file_limit",
    "raise_open_file_limit",
]

_log = Logger(namespace="snetd.frontend")

#: The automatic limit, when the open-file limit allows it: about 180 MiB
#: of idle HTTP/2 connections.
AUTOMATIC_LIMIT: Final = 10_000
#: Descriptors kept for the daemon's own use (etcd, the service, the chain,
#: executables' pipes, logs), at least; an eighth of the limit if more.
_RESERVE: Final = 256
#: Seconds a new connection has to begin its first call before it counts
#: as silent (see the module docstring): a few round trips, a TLS handshake.
FIRST_CALL_GRACE: Final = 2.0
#: Seconds between two warnings that connections are being refused (or
#: closed to make room).
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

    def evict(self) -> None:
        """Close it to make room (gracefully: HTTP/2 GOAWAY)."""


class ConnectionTable:
    """The open connections of one port, bounded by ``limit``.

    Args:
        limit: most connections kept at once (at least 1).
        clock: seconds (for spacing the warnings).
    """

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        if limit < 1:
            raise ValueError("the connection limit must be at least 1")
        self.limit = limit
        self._clock = clock
        #: Never had a call, oldest first -> when admitted.
        self._fresh: dict[Tracked, float] = {}
        #: Had calls, none now; idle the longest first.
        self._idle: dict[Tracked, None] = {}
        #: A call in progress.
        self._busy: set[Tracked] = set()
        self._warned_at: dict[str, float] = {}
        #: Connections closed to make room, and refused (for tests and logs).
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._fresh) + len(self._idle) + len(self._busy)

    def admit(self, conn: Tracked) -> bool:
        """Take ``conn`` in, closing an idle one if the table is full.

        Returns False when every connection has a call in progress: the
        caller then refuses ``conn``.
        """
        now = self._clock()
        if len(self) >= self.limit:
            pool: dict[Tracked, float] | dict[Tracked, None] = self._fresh
            oldest = next(iter(self._fresh.values()), now)
            if (not self._fresh or now - oldest < FIRST_CALL_GRACE) and self._idle:
                pool = self._idle
            if not pool:
                self.refused += 1
                self._warn(
                    "refusing client connections: {limit} are open, each with a call in progress "
                    "(max_connections; {count} refused so far)",
                    self.refused,
                )
                return False
            # Out of the count at once: its descriptor is freed once it closes.
            victim = next(iter(pool))
            del pool[victim]
            self.evicted += 1
            self._warn(
                "{limit} client connections are open (max_connections): idle ones are closed to make room "
                "for new ones ({count} so far)",
                self.evicted,
            )
            victim.evict()
        self._fresh[conn] = now
        return True

    def busy(self, conn: Tracked) -> None:
        """A call began on ``conn``, which had none."""
        if conn in self._fresh:
            del self._fresh[conn]
        elif conn in self._idle:
            del self._idle[conn]
        else:
            return  # closed already, or busy already
        self._busy.add(conn)

    def idle(self, conn: Tracked) -> None:
        """The last call on ``conn`` ended."""
        if conn in self._busy:
            self._busy.discard(conn)
            self._idle[conn] = None

    def release(self, conn: Tracked) -> None:
        """``conn`` closed (or was closed to make room)."""
        self._fresh.pop(conn, None)
        self._idle.pop(conn, None)
        self._busy.discard(conn)

    def _warn(self, text: str, count: int) -> None:
        now = self._clock()
        last = self._warned_at.get(text)
        if last is not None and now - last < _WARN_EVERY:
            return
        self._warned_at[text] = now
        _log.warn(text, limit=self.limit, count=count)
