"""The plain HTTP endpoints of the daemon port.

As in the Go daemon: ``/heartbeat`` (and anything under it) answers the
heartbeat JSON, ``/encoding`` the service's message encoding followed by a
newline, everything else 404.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from snet_daemon.frontend.gateway import HttpResponse

_NOT_FOUND = HttpResponse(404, b"404 page not found\n")


class DaemonRoutes:
    """The daemon's :class:`~snet_daemon.frontend.gateway.HttpRoutes`.

    Args:
        heartbeat: returns the heartbeat JSON object.
        encoding: returns ``proto`` or ``json``, from the (current) service
            metadata.
    """

    def __init__(
        self, heartbeat: Callable[[], Awaitable[dict[str, object]]], encoding: Callable[[], str] = lambda: "proto"
    ) -> None:
        self._heartbeat = heartbeat
        self._encoding = encoding

    async def respond(self, method: str, path: str) -> HttpResponse:
        segment = path.lstrip("/").split("/", 1)[0]
        if segment == "heartbeat":
            report = await self._heartbeat()
            return HttpResponse(200, json.dumps(report).encode(), "application/json")
        if segment == "encoding":
            return HttpResponse(200, f"{self._encoding()}\n".encode())
        return _NOT_FOUND
