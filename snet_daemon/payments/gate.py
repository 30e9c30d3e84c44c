"""The payment gate in front of the service: no call passes unpaid.

Every call that is not for one of the daemon's own services comes here.
The ``snet-payment-type`` metadata chooses how it is paid (absent means
``escrow``, as in the Go daemon); the payment is held before the call is
forwarded, recorded when the service answers OK, and released otherwise,
so a failed call costs the client nothing.  The service receives the
client's metadata plus ``snet-user-address`` (the paying address).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Final, Protocol

from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.frontend.wire import Metadata
from snet_daemon.payments.escrow import USER_ADDRESS, EscrowLedger, metadata_values, parse_escrow, single

PAYMENT_TYPE: Final = "snet-payment-type"
#: Payment types the Go daemon knows; those not built yet are refused clearly.
_KNOWN_TYPES: Final = frozenset({"escrow", "free-call", "prepaid-call", "train-call"})


class Forwarder(Protocol):
    """Relays a call to the service with the given metadata."""

    async def forward(self, call: ServerCall, metadata: Metadata) -> None: ...


class PaymentGate:
    """The handler for every paid method.

    Args:
        upstream: forwards calls to the service.
        escrow: the escrow ledger.
    """

    def __init__(self, upstream: Forwarder, escrow: EscrowLedger) -> None:
        self._upstream = upstream
        self._escrow = escrow

    async def __call__(self, call: ServerCall) -> None:
        values = metadata_values(call.metadata)
        raw_type = single(values, PAYMENT_TYPE)
        payment_type = "escrow" if raw_type is None else _text(raw_type)
        if payment_type == "escrow":
            await self._escrow_call(call, values)
        elif payment_type in _KNOWN_TYPES:
            raise GrpcError(Status.UNIMPLEMENTED, f'payment type "{payment_type}" is not supported by this daemon yet')
        else:
            raise GrpcError(Status.INVALID_ARGUMENT, f'unexpected "{PAYMENT_TYPE}", value: "{payment_type}"')

    async def _escrow_call(self, call: ServerCall, values: dict[str, list[str | bytes]]) -> None:
        payment = parse_escrow(values)
        ledger = self._escrow
        hold = await ledger.authorize(call.method, payment)
        metadata = (*call.metadata, (USER_ADDRESS, hold.sender))
        try:
            await self._upstream.forward(call, metadata)
        except BaseException:
            # Failed, cancelled or timed out: the client is not charged.  The
            # release must run even though this task is being cancelled.
            await _finish(ledger.release(hold))
            raise
        if call.finished:
            # The client already got a final status (its deadline passed as
            # the service answered): it was told the call failed, so it is
            # not charged.
            await _finish(ledger.release(hold))
            return
        await _finish(ledger.commit(hold))


async def _finish(step: Awaitable[None]) -> None:
    """Run a bookkeeping step to completion even if our task is cancelled.

    If the task is cancelled while waiting, the step carries on in the
    background and the cancellation (the client is gone) still propagates.
    """
    await asyncio.shield(asyncio.ensure_future(step))


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
