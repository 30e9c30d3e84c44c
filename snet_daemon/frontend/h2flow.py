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
"""

from __future__ import annotations

import h2.connection
import h2.exceptions


def send_within_window(conn: h2.connection.H2Connection, stream_id: int, data: bytes) -> int:
    """Hand h2 as much of ``data`` as the flow-control windows allow.

    Returns how many bytes were taken; the caller keeps the rest until a
    window update.  On a stream h2 has closed (forgotten, or still tracked
    after a reset or both ends of it) there is no one to send to: all of
    ``data`` counts as taken.
    """
    try:
        window = conn.local_flow_control_window(stream_id)
        max_frame = conn.max_outbound_frame_size
        total = len(data)
        if total <= window and total <= max_frame:
            conn.send_data(stream_id, data)
            return total
        offset = 0
        while offset < total and window > 0:
            size = min(window, max_frame, total - offset)
            conn.send_data(stream_id, data[offset : offset + size])
            offset += size
            window -= size
        return offset
    except h2.exceptions.StreamClosedError:
        return len(data)
