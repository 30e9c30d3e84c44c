"""Send on a TCP connection at once instead of at the event loop's next turn.

Twisted's ``transport.write`` never sends: it buffers the data, asks the
event loop to watch the socket for writability (with the asyncio reactor,
an ``epoll_ctl``), sends on the next turn of the loop, then stops watching
(a second ``epoll_ctl``).  Our HTTP/2 connections already gather a whole
turn's frames into one write, so that detour is pure overhead: two system
calls and a loop pass per write, on each of a call's connections (client,
service, etcd).  Measured with ``benchmarks/paid.py`` (16 in flight, same
session): the paid daemon spent 435-454 us per call with :func:`send_now`
against 487-493 without, the unpaid one 216 against 218-224; paid calls/s
went up 7 %.

:func:`send_now` sends straight from the socket when nothing is waiting in
the transport's buffer (so order is kept) and the connection is open and
not closing; whatever the kernel does not take at once, and everything on
any other transport (TLS, test transports), goes through
``transport.write`` as before, with its flow control and error handling.
A send that fails (peer gone) hands the data to ``transport.write`` too:
Twisted's next write attempt meets the same error and reports the
connection lost as it always does.

It reads four attributes of Twisted's ``FileDescriptor`` that are not
part of its public interface (``dataBuffer``, ``offset``,
``_tempDataLen``, ``_writeDisconnected``); if a Twisted release drops one,
:data:`_SUPPORTED` is False and every write takes the ordinary path.
``tests/test_sendnow.py`` checks both paths on real sockets.
"""

from __future__ import annotations

from typing import Final

from twisted.internet import abstract, tcp
from twisted.internet.interfaces import ITransport


def _supported() -> bool:
    """Whether this Twisted's TCP connections keep the buffer state we read."""
    instance_names = abstract.FileDescriptor.__init__.__code__.co_names
    return (
        all(hasattr(tcp.Connection, name) for name in ("dataBuffer", "offset", "_writeDisconnected"))
        and "_tempDataLen" in instance_names
    )


_SUPPORTED: Final = _supported()


def send_now(transport: ITransport, data: bytes) -> None:
    """Write ``data`` to ``transport``, sending it at once when that is safe."""
    if (
        _SUPPORTED
        and isinstance(transport, tcp.Connection)
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, or the peer is gone: Twisted's path handles both
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
