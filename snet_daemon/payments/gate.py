"""The payment gate in front of the service: no call passes unpaid.

Every call that is not for one of the daemon's own services comes here.
The ``snet-payment-type`` metadata chooses how it is paid (absent means
``escrow``, as in the Go daemon); the payment is taken before the call is
forwarded and given back if the call does not end OK, so a failed call
costs the client nothing.  The service receives the client's metadata
plus ``snet-user-address`` (the paying address).

* ``escrow``: :class:`~snet_daemon.payments.escrow.EscrowLedger` (the
  payment is recorded and the channel held, then the hold is dropped, or
  the previous state put back if the call failed);
* ``free-call``: :class:`~snet_daemon.payments.freecall.FreeCalls` (the
  user's count goes up before the call, down again if it fails);
* ``prepaid-call``: the token is checked
  (:class:`~snet_daemon.payments.tokens.PrepaidTokens`), the price charged
  against the channel's planned amount
  (:class:`~snet_daemon.payments.prepaid.PrepaidLedger`), refunded if the
  call fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.frontend.wire import Metadata
from snet_daemon.payments.escrow import (
    CHANNEL_ID,
    USER_ADDRESS,
    EscrowLedger,
    metadata_values,
    parse_escrow,
    parse_integer,
    single,
)
from snet_daemon.payments.freecall import FreeCalls
from snet_daemon.payments.prepaid import PREPAID_TOKEN, PrepaidLedger
from snet_daemon.payments.tokens import PrepaidTokens, TokenError

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
        free_calls: free calls (None: the type is refused as not supported).
        prepaid: the prepaid ledger and the token checker (None: likewise).
        price: the price of a call to a method (for prepaid calls).
    """

    def __init__(
        self,
        upstream: Forwarder,
        escrow: EscrowLedger,
        free_calls: FreeCalls | None = None,
        prepaid: tuple[PrepaidLedger, PrepaidTokens] | None = None,
        price: Callable[[str], int] | None = None,
    ) -> None:
        self._upstream = upstream
        self._escrow = escrow
        self._free_calls = free_calls
        self._prepaid = prepaid
        self._price = price

    async def __call__(self, call: ServerCall) -> None:
        values = metadata_values(call.metadata)
        raw_type = single(values, PAYMENT_TYPE)
        payment_type = "escrow" if raw_type is None else _text(raw_type)
        if payment_type == "escrow":
            await self._escrow_call(call, values)
        elif payment_type == "free-call" and self._free_calls is not None:
            await self._free_call(call, values, self._free_calls)
        elif payment_type == "prepaid-call" and self._prepaid is not None and self._price is not None:
            await self._prepaid_call(call, values, *self._prepaid, self._price)
        elif payment_type in _KNOWN_TYPES:
            raise GrpcError(Status.UNIMPLEMENTED, f'payment type "{payment_type}" is not supported by this daemon yet')
        else:
            raise GrpcError(Status.INVALID_ARGUMENT, f'unexpected "{PAYMENT_TYPE}", value: "{payment_type}"')

    async def _escrow_call(self, call: ServerCall, values: dict[str, list[str | bytes]]) -> None:
        payment = parse_escrow(values)
        ledger = self._escrow
        hold = await ledger.authorize(call.method, payment)
        metadata = _with_payer(call.metadata, hold.sender)
        try:
            await self._upstream.forward(call, metadata)
        except BaseException:
            # Failed, cancelled or timed out: the client is not charged.  The
            # refund must run even though this task is being cancelled.
            await _finish(ledger.release(hold))
            raise
        if call.finished:
            # The client already got a final status (its deadline passed as
            # the service answered): it was told the call failed, so it is
            # not charged.
            await _finish(ledger.release(hold))
            return
        ledger.commit(hold)

    async def _free_call(self, call: ServerCall, values: dict[str, list[str | bytes]], free_calls: FreeCalls) -> None:
        counted = await free_calls.authorize(values)
        metadata = _with_payer(call.metadata, counted.user_address)
        try:
            await self._upstream.forward(call, metadata)
        except BaseException:
            await _finish(free_calls.release(counted))
            raise
        if call.finished:
            await _finish(free_calls.release(counted))

    async def _prepaid_call(
        self,
        call: ServerCall,
        values: dict[str, list[str | bytes]],
        ledger: PrepaidLedger,
        tokens: PrepaidTokens,
        price_of: Callable[[str], int],
    ) -> None:
        raw_channel = single(values, CHANNEL_ID)
        if raw_channel is None:
            raise GrpcError(Status.INVALID_ARGUMENT, f'missing "{CHANNEL_ID}"')
        channel_id = parse_integer(CHANNEL_ID, _text(raw_channel))
        token = single(values, PREPAID_TOKEN)
        if token is None:
            raise GrpcError(Status.INVALID_ARGUMENT, f'missing "{PREPAID_TOKEN}"')
        try:
            price = price_of(call.method)
        except Exception as exc:
            raise GrpcError(Status.INTERNAL, f"internal error: {exc}") from None
        try:
            holder = tokens.verify(token, channel_id)
        except TokenError as exc:
            raise GrpcError(Status.UNAUTHENTICATED, str(exc)) from None
        await ledger.charge(channel_id, price)
        metadata = _with_payer(call.metadata, holder)
        try:
            await self._upstream.forward(call, metadata)
        except BaseException:
            await _finish(ledger.refund(channel_id, price))
            raise
        if call.finished:
            await _finish(ledger.refund(channel_id, price))


def _with_payer(metadata: Metadata, address: str) -> Metadata:
    """The call's metadata for the service, with ``snet-user-address`` set to the payer.

    One the client sent is dropped (as the Go daemon's ``Set`` replaces it):
    services trust this header to say who paid.
    """
    if any(key == USER_ADDRESS for key, _ in metadata):
        metadata = tuple(entry for entry in metadata if entry[0] != USER_ADDRESS)
    return (*metadata, (USER_ADDRESS, address))


async def _finish(step: Awaitable[None]) -> None:
    """Run a bookkeeping step to completion even if our task is cancelled.

    If the task is cancelled while waiting, the step carries on in the
    background and the cancellation (the client is gone) still propagates.
    """
    await asyncio.shield(asyncio.ensure_future(step))


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
