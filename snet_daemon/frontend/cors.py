"""CORS for browsers calling the daemon with gRPC-Web.

A pure policy object: the transports ask it which headers to add.  The
default, like the Go daemon's, allows any origin; operators can list the
origins of their web front ends in ``cors_allowed_origins`` instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from snet_daemon.frontend.grpcweb import EXPOSED_HEADERS

_ALLOWED_METHODS = "GET, POST, OPTIONS, HEAD"
_EXPOSED = ", ".join(EXPOSED_HEADERS)
_ALWAYS_EXPOSED = frozenset(EXPOSED_HEADERS)
_MAX_AGE = "600"


class CorsPolicy:
    """Which browser origins may call the daemon, and the headers that say so.

    Args:
        allowed_origins: ``"*"`` for any origin, or exact origins such as
            ``"https://app.example.com"`` (scheme, host and port; compared
            case-insensitively).
    """

    def __init__(self, allowed_origins: Sequence[str] = ("*",)) -> None:
        self.any_origin = "*" in allowed_origins
        self._origins = frozenset(o.rstrip("/").lower() for o in allowed_origins if o != "*")

    def allows(self, origin: str | None) -> bool:
        """True when a request from ``origin`` may be served.

        Requests without an ``Origin`` header come from non-browser clients,
        which CORS does not concern.
        """
        return origin is None or self.any_origin or origin.rstrip("/").lower() in self._origins

    def response_headers(self, origin: str | None, names: Iterable[str] = ()) -> list[tuple[str, str]]:
        """Headers for an actual (non-preflight) response to ``origin``.

        Args:
            names: the (lower-case) names of the other headers the response
                carries: a browser hides from scripts every response header
                not listed in ``Access-Control-Expose-Headers``, which would
                hide the service's metadata (initial metadata, and that of a
                trailers-only error, which travels as headers).  Like the Go
                daemon's grpcweb wrapper, every one is exposed.
        """
        if origin is None or not self.allows(origin):
            return []
        exposed = _EXPOSED
        extra = [name for name in dict.fromkeys(names) if name not in _ALWAYS_EXPOSED]
        if extra:
            exposed = ", ".join((_EXPOSED, *extra))
        if self.any_origin:
            return [
                ("access-control-allow-origin", "*"),
                ("access-control-expose-headers", exposed),
            ]
        return [
            ("access-control-allow-origin", origin),
            ("access-control-expose-headers", exposed),
            ("vary", "Origin"),
        ]

    def preflight(
        self, origin: str | None, request_headers: str | None, private_network: bool
    ) -> tuple[int, list[tuple[str, str]]]:
        """Answer an ``OPTIONS`` request.

        Returns:
            ``(http_status, headers)``: 204 with the CORS grant for an
            allowed origin (the requested headers are echoed, as browsers
            send ``x-grpc-web``, ``x-user-agent`` and the payment metadata
            headers), 204 without CORS headers for a plain ``OPTIONS``, and
            403 for an origin that is not allowed.
        """
        if origin is None:
            return 204, []
        if not self.allows(origin):
            return 403, []
        headers = [
            ("access-control-allow-origin", "*" if self.any_origin else origin),
            ("access-control-allow-methods", _ALLOWED_METHODS),
            ("access-control-allow-headers", request_headers or "*"),
            ("access-control-max-age", _MAX_AGE),
        ]
        if not self.any_origin:
            headers.append(("vary", "Origin"))
        if private_network:
            headers.append(("access-control-allow-private-network", "true"))
        return 204, headers
