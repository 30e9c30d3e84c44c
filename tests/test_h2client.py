"""The upstream HTTP/2 client's connection, driven frame by frame (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
from twisted.internet.testing import StringTransport

from snet_daemon.upstream.h2client import H2Upstream, UpstreamConnection
from tests.support.aio import aio_test


class _Pool:
    """The bits of H2Upstream a connection calls back."""

    endpoint = "http://service.test:5000"

    def __init__(self) -> None:
        self.loop = asyncio.get_event_loop()
        self.capacity_changes = 0

    def capacity_changed(self) -> None:
        self.capacity_changes += 1

    def connection_lost(self, conn: Any) -> None:
        pass


def _server_bytes(*frames: str) -> bytes:
    """Frames a gRPC server would send: its preface, then GOAWAY and/or PING."""
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(h2.connection.H2Connection(h2.config.H2Configuration(client_side=True)).data_to_send() or b"")
    data = server.data_to_send()
    for name in frames:
        if name == "goaway":
            server.close_connection()
            data += server.data_to_send()
    if "ping" in frames:
        # A PING after GOAWAY: h2 on our side refuses it with ProtocolError.
        data += b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
    return data


@aio_test
async def test_connection_that_errs_takes_no_new_streams() -> None:
    """After a protocol error (GOAWAY then PING in one read), the connection refuses new streams at once."""
    pool = _Pool()
    conn = UpstreamConnection(pool)  # type: ignore[arg-type]
    transport = StringTransport()
    conn.makeConnection(transport)  # type: ignore[no-untyped-call]
    assert conn.has_capacity()
    conn.dataReceived(_server_bytes("goaway", "ping"))
    assert conn.draining
    assert not conn.has_capacity()
    assert transport.disconnecting
    assert pool.capacity_changes >= 1


@aio_test
async def test_start_on_a_closed_connection_reports_failure() -> None:
    """Opening a stream on a connection h2 considers closed returns False instead of raising."""
    pool = _Pool()
    conn = UpstreamConnection(pool)  # type: ignore[arg-type]
    conn.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
    conn._conn.close_connection()  # what h2 does after the service's GOAWAY
    relay_like: Any = type("R", (), {"conn": None, "sid": 0})()
    assert conn.start(relay_like, [(":method", "POST"), (":path", "/a.B/C")]) is False
    assert conn.draining
    assert conn.idle()


def test_authority_omits_default_ports() -> None:
    """The :authority header carries the port only when it is not the scheme's default."""
    loop = asyncio.new_event_loop()
    try:
        assert H2Upstream(None, "svc", 80, "http://svc", loop)._authority == "svc"
        assert H2Upstream(None, "svc", 443, "https://svc", loop, tls=True)._authority == "svc"
        assert H2Upstream(None, "svc", 5000, "http://svc:5000", loop)._authority == "svc:5000"
    finally:
        loop.close()
