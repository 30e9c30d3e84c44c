"""HTTP/2 flow control for what we send, shared by the front end and the upstream client.

Both sides queue a stream's bytes that the peer's flow-control windows do
not admit yet, and send them when a window update comes.

A stream h2 has just closed is still tracked by h2 for a while: its window
can be read, but ``send_data`` raises ``StreamClosedError``.  h2 parses every
frame of a read before we see any event, so a WINDOW_UPDATE followed by the
RST_STREAM (or END_STREAM) of the same stream in one read made us send on a
closed stream, and the exception dropped the whole connection: every other
call on it, and on the upstream side the daemon's one connection to the
service, which all clients share.  :func:`send_within_window` treats that
stream as gone.

Waking every blocked stream on each connection-level WINDOW_UPDATE or
SETTINGS frame let a client that keeps 1000 replies blocked spend 460 us of
the only event loop per 13-byte frame it sent.  :class:`WindowWaiters` files
each waiting stream under the window that stopped it, so an update wakes
only the streams it can help, and a connection-level one stops as soon as
the connection window is used up.

:class:`GracefulH2Connection` keeps a connection open after the peer's
GOAWAY, so the calls it still lets finish do.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

T = TypeVar("T")


class GracefulH2Connection(h2.connection.H2Connection):
    """h2's connection, kept open after the peer's GOAWAY.

    h2 4.x closes its state machine when a GOAWAY arrives and drops what was
    queued to send (python-hyper/h2#1181), so every later frame of the calls
    the peer still lets finish (those at or below the GOAWAY's last stream
    id, RFC 9113 §6.8) raised ProtocolError, and the connection was dropped
    with them.  A gRPC server shutting down gracefully, or retiring a
    connection at its ``max_connection_age``, does exactly that: GOAWAY, a
    PING it waits to see answered, a second GOAWAY naming the last stream it
    serves, then the replies; so does a client shutting its channel down
    gracefully (grpc-java, Netty) while its calls run.  Here a GOAWAY is only
    reported (``ConnectionTerminated``): whoever holds the connection opens
    or accepts no stream after it, and closes it once the calls are done.
    """

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def send_within_window(conn: h2.connection.H2Connection, stream_id: int, data: bytes, end_stream: bool = False) -> int:
    """Hand h2 as much of ``data`` as the flow-control windows allow.

    Returns how many bytes were taken; the caller keeps the rest until a
    window update.  With ``end_stream``, the frame carrying the last byte
    also ends the stream (a request in one frame, not a second, empty one
    to end it), so it ended exactly when all of ``data`` was taken.  On a
    stream h2 has closed (forgotten, or still tracked after a reset or both
    ends of it) there is no one to send to: all of ``data`` counts as taken.
    """
    try:
        window = conn.local_flow_control_window(stream_id)
        max_frame = conn.max_outbound_frame_size
        total = len(data)
        if total <= window and total <= max_frame:
            conn.send_data(stream_id, data, end_stream=end_stream)
            return total
        offset = 0
        while offset < total and window > 0:
            size = min(window, max_frame, total - offset)
            conn.send_data(stream_id, data[offset : offset + size], end_stream=end_stream and offset + size == total)
            offset += size
            window -= size
        return offset
    except h2.exceptions.StreamClosedError:
        return len(data)


def send_queued(conn: h2.connection.H2Connection, stream_id: int, pending: deque[bytes]) -> tuple[int, bool]:
    """Send queued chunks of one stream, oldest first, while the windows allow.

    A chunk sent in part keeps its rest at the head of ``pending``.  Returns
    the number of bytes sent and whether the queue is now empty.
    """
    sent_total = 0
    while pending:
        chunk = pending[0]
        sent = send_within_window(conn, stream_id, chunk)
        sent_total += sent
        if sent < len(chunk):
            pending[0] = chunk[sent:]
            return sent_total, False
        pending.popleft()
    return sent_total, True


class WindowWaiters(Generic[T]):
    """Senders whose queued bytes wait for window, filed by the window that stopped them.

    A sender h2 took less than everything from is filed with :meth:`wait`:
    under the connection window when that is used up, otherwise under its
    own stream's window.  Then:

    * a WINDOW_UPDATE for a stream wakes that stream's sender, one for the
      connection the senders the connection window stopped, oldest first,
      and only while that window lasts (:meth:`window_updated`);
    * a SETTINGS frame that grows ``INITIAL_WINDOW_SIZE`` grows every
      stream's window, so it wakes every sender, again only while the
      connection window lasts (``wake(..., everyone=True)``).

    A woken sender that still cannot send all is filed again.  So a
    connection-level update costs one step per sender that gets to send,
    plus at most one per sender that moves from the connection's list to its
    stream's, which it leaves only on an update of its own stream.

    Args:
        conn: the h2 connection the senders send on.
    """

    __slots__ = ("_conn", "_on_connection", "_on_stream")

    def __init__(self, conn: h2.connection.H2Connection) -> None:
        self._conn = conn
        self._on_connection: OrderedDict[int, T] = OrderedDict()
        self._on_stream: dict[int, T] = {}

    def __len__(self) -> int:
        return len(self._on_connection) + len(self._on_stream)

    def wait(self, stream_id: int, sender: T) -> None:
        """File ``sender`` of stream ``stream_id``, which could not send everything."""
        if self._conn.outbound_flow_control_window <= 0:
            self._on_connection[stream_id] = sender
        else:
            self._on_stream[stream_id] = sender

    def take(self, stream_id: int) -> T | None:
        """Unfile and return the sender of ``stream_id``, if it was waiting."""
        sender = self._on_stream.pop(stream_id, None)
        if sender is None:
            sender = self._on_connection.pop(stream_id, None)
        return sender

    def discard(self, stream_id: int) -> None:
        """Forget the sender of ``stream_id`` (its stream is gone)."""
        self._on_stream.pop(stream_id, None)
        self._on_connection.pop(stream_id, None)

    def clear(self) -> None:
        """Forget every sender (the connection is gone)."""
        self._on_stream.clear()
        self._on_connection.clear()

    def window_updated(self, stream_id: int, drain: Callable[[T], object]) -> None:
        """A WINDOW_UPDATE for ``stream_id`` (0: the connection): ``drain`` what waited for it."""
        if stream_id:
            sender = self.take(stream_id)
            if sender is not None:
                drain(sender)
        elif self._on_connection:
            self.wake(drain)

    def wake(self, drain: Callable[[T], object], everyone: bool = False) -> int:
        """Call ``drain`` on waiting senders while the connection window lasts.

        ``drain`` sends what it can and files its sender again with
        :meth:`wait` if something is left.  Without ``everyone``, only the
        senders the connection window stopped are woken.  Returns how many
        senders were woken.
        """
        waiting = self._on_connection
        if everyone and self._on_stream:
            waiting.update(self._on_stream)
            self._on_stream.clear()
        conn = self._conn
        woken = 0
        while waiting and conn.outbound_flow_control_window > 0:
            _, sender = waiting.popitem(last=False)
            woken += 1
            drain(sender)
        return woken


def initial_window_grew(event: h2.events.RemoteSettingsChanged) -> bool:
    """True when a peer's SETTINGS frame grew ``INITIAL_WINDOW_SIZE``: every stream may send more."""
    changed = event.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
    return changed is not None and changed.new_value > (changed.original_value or 0)
