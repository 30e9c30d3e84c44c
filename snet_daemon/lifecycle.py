"""A Twisted service container that stops its children in order.

``MultiService`` stops all its children in the same tick and waits for them
together, so no child can count on another one still running while it
stops.  The daemon's stop needs that: running calls drain first, and only
then may what they use close (the payment storage, the chain's JSON-RPC
pool, the metadata loader).
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

__all__ = ["OrderedMultiService"]

_log = Logger(namespace="snetd")


class OrderedMultiService(MultiService):
    """A ``MultiService`` whose children stop one at a time, the last added first.

    Children start in the order they were added, as in a ``MultiService``;
    each one stops only once the one added after it has finished stopping.
    So add a service after everything its stop (or its running) still
    needs.  A child whose stop fails is logged, and the ones before it
    still stop.

    Args:
        name: the service's name, if it has one.
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if name is not None:
            self.setName(name)  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        # Service's, not MultiService's: that one would stop every child at once.
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                _log.failure("stopping {service} failed", service=child.name or type(child).__name__)
