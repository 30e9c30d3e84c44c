"""A TCP forwarder that tests can cut, to take a dependency "down" and back.

Stopping the shared anvil would break the other tests of the process; the
daemon is pointed at this proxy instead, and the proxy is closed (refusing
connections and dropping the open ones) and reopened on the same port.
"""

from __future__ import annotations

import queue
import socket
import threading
import time


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; :meth:`down`/:meth:`up` cut it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        #: Seconds every reply (target to client) is held back: a request
        #: gets where it goes at once, its answer comes late.
        self.reply_delay = 0.0
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # close() alone does not stop a thread blocked in accept() on
            # Linux: the socket would keep accepting.  shutdown() wakes it.
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            if self.reply_delay:
                threading.Thread(target=self._delayed_pipe, args=(upstream, client), daemon=True).start()
            else:
                threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _shut(sink)

    def _delayed_pipe(self, source: socket.socket, sink: socket.socket) -> None:
        """Like :meth:`_pipe`, each chunk sent ``reply_delay`` after it came (order kept)."""
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def send() -> None:
            try:
                while True:
                    due, data = chunks.get()
                    time.sleep(max(0.0, due - time.monotonic()))
                    if not data:
                        return
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                _shut(sink)

        threading.Thread(target=send, daemon=True).start()
        try:
            while data := source.recv(65536):
                chunks.put((time.monotonic() + self.reply_delay, data))
        except OSError:
            pass
        finally:
            chunks.put((time.monotonic() + self.reply_delay, b""))


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
