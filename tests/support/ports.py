"""Free TCP ports for test servers."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now.

    Chosen below 32768, outside Linux's ephemeral range, so it cannot clash
    with the source port of an outgoing connection made later in the test.
    """
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")
