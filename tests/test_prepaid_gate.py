"""The payment gate with free calls and prepaid calls, on fakes.

What the service sees (``snet-user-address``), what is charged when the
service fails or the client gives up, and the codes of the call-path
rejections.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.payments import signatures as sig
from snet_daemon.payments.gate import PaymentGate
from tests.support.aio import aio_test
from tests.support.payments import CLIENT_KEY, METHOD, PRICE
from tests.test_freecall import USER
from tests.test_freecall import World as FreeWorld
from tests.test_prepaid import CLIENT
from tests.test_prepaid import World as PrepaidWorld


@dataclass
class Call:
    """The parts of a ServerCall the gate uses."""

    metadata: tuple[tuple[str, str | bytes], ...]
    method: str = METHOD
    finished: bool = False


@dataclass
class Upstream:
    """Records forwarded metadata; fails or blocks on demand."""

    seen: list[dict[str, str | bytes]] = field(default_factory=list)
    fail: BaseException | None = None
    block: asyncio.Event | None = None

    async def forward(self, call: Any, metadata: Any) -> None:
        self.seen.append(dict(metadata))
        if self.block is not None:
            await self.block.wait()
        if self.fail is not None:
            raise self.fail


class Both:
    """A gate with escrow, free calls and prepaid calls over the fakes."""

    def __init__(self) -> None:
        self.prepaid = PrepaidWorld()
        self.free = FreeWorld()
        self.upstream = Upstream()
        daemon = self.prepaid.a
        self.gate = PaymentGate(
            self.upstream,
            daemon.ledger,
            self.free.free,
            (daemon.prepaid, daemon.tokens),
            lambda method: PRICE,
        )

    async def token(self, calls: int = 4) -> str:
        return str((await self.prepaid.a.get_token(1, calls * PRICE)).token)

    @staticmethod
    def prepaid_call(token: str | bytes, channel_id: int = 1) -> Call:
        raw = token.encode() if isinstance(token, str) else token
        return Call(
            (
                ("snet-payment-type", "prepaid-call"),
                ("snet-payment-channel-id", str(channel_id)),
                ("snet-payment-channel-nonce", "0"),
                ("snet-prepaid-auth-token-bin", raw),
            )
        )

    async def free_call(self) -> Call:
        token = await self.free.token()
        values = self.free.headers(token)
        return Call(tuple((key, value) for key, values_ in values.items() for value in values_))


async def refused(awaitable: Any) -> GrpcError:
    with pytest.raises(GrpcError) as info:
        await awaitable
    return info.value


@aio_test
async def test_prepaid_call_is_charged_and_names_the_token_holder() -> None:
    """A prepaid call reaches the service with snet-user-address; used grows by the price."""
    both = Both()
    token = await both.token()
    await both.gate(both.prepaid_call(token))  # type: ignore[arg-type]
    assert both.upstream.seen[-1]["snet-user-address"] == CLIENT
    assert await both.prepaid.a.usage(1) == (4 * PRICE, PRICE)


@aio_test
async def test_failed_prepaid_call_is_refunded() -> None:
    """The service fails: the call costs nothing."""
    both = Both()
    token = await both.token()
    both.upstream.fail = GrpcError(Status.UNAVAILABLE, "service down")
    with pytest.raises(GrpcError):
        await both.gate(both.prepaid_call(token))  # type: ignore[arg-type]
    assert await both.prepaid.a.usage(1) == (4 * PRICE, 0)


@aio_test
async def test_cancelled_prepaid_call_is_refunded() -> None:
    """The client goes away mid-call: the charge is given back."""
    both = Both()
    token = await both.token()
    both.upstream.block = asyncio.Event()
    task = asyncio.ensure_future(both.gate(both.prepaid_call(token)))  # type: ignore[arg-type]
    for _ in range(20):
        await asyncio.sleep(0)
    assert both.upstream.seen
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(20):
        await asyncio.sleep(0)
    assert await both.prepaid.a.usage(1) == (4 * PRICE, 0)


@aio_test
async def test_prepaid_call_answered_after_the_deadline_is_refunded() -> None:
    """The client was told the call failed (deadline): not charged."""
    both = Both()
    token = await both.token()
    call = both.prepaid_call(token)
    call.finished = True
    await both.gate(call)  # type: ignore[arg-type]
    assert await both.prepaid.a.usage(1) == (4 * PRICE, 0)


@aio_test
async def test_concurrent_prepaid_calls_on_one_channel() -> None:
    """Many calls on one channel run at once (no channel lock); only the planned ones pass."""
    both = Both()
    token = await both.token(calls=10)
    both.upstream.block = asyncio.Event()
    tasks = [asyncio.ensure_future(both.gate(both.prepaid_call(token))) for _ in range(12)]  # type: ignore[arg-type]
    for _ in range(50):
        await asyncio.sleep(0)
    assert len(both.upstream.seen) == 10  # ten in the service at the same time
    both.upstream.block.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    refused_calls = [r for r in results if isinstance(r, GrpcError)]
    assert len(refused_calls) == 2
    assert {r.status for r in refused_calls} == {Status.RESOURCE_EXHAUSTED}
    assert await both.prepaid.a.usage(1) == (10 * PRICE, 10 * PRICE)


@aio_test
async def test_prepaid_rejections_never_reach_the_service() -> None:
    """Another channel's token, a forged token, usage beyond planned, missing headers."""
    both = Both()
    token = await both.token(calls=1)
    other_channel = await refused(both.gate(both.prepaid_call(token, channel_id=2)))  # type: ignore[arg-type]
    assert (other_channel.status, other_channel.message) == (
        Status.UNAUTHENTICATED,
        "payload 1 used to generate the Token doesnt match expected values",
    )
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    bad = await refused(both.gate(both.prepaid_call(forged)))  # type: ignore[arg-type]
    assert bad.status == Status.UNAUTHENTICATED
    await both.gate(both.prepaid_call(token))  # type: ignore[arg-type]
    beyond = await refused(both.gate(both.prepaid_call(token)))  # type: ignore[arg-type]
    assert (beyond.status, beyond.message) == (Status.RESOURCE_EXHAUSTED, "Usage Exceeded on channel Id 1")
    missing = await refused(both.gate(Call((("snet-payment-type", "prepaid-call"), ("snet-payment-channel-id", "1")))))  # type: ignore[arg-type]
    assert (missing.status, missing.message) == (Status.INVALID_ARGUMENT, 'missing "snet-prepaid-auth-token-bin"')
    assert len(both.upstream.seen) == 1


@aio_test
async def test_expired_prepaid_token_is_unauthenticated() -> None:
    """A JWT past its expiry: UNAUTHENTICATED."""
    both = Both()
    token = await both.token()
    both.prepaid.clock.now += 3600
    error = await refused(both.gate(both.prepaid_call(token)))  # type: ignore[arg-type]
    assert (error.status, error.message) == (Status.UNAUTHENTICATED, "token has invalid claims: token is expired")


@aio_test
async def test_free_call_names_the_user_and_failure_gives_it_back() -> None:
    """A free call reaches the service as the user; a failed one is not counted."""
    both = Both()
    call = await both.free_call()
    both.upstream.fail = GrpcError(Status.INTERNAL, "boom")
    with pytest.raises(GrpcError):
        await both.gate(call)  # type: ignore[arg-type]
    assert both.upstream.seen[-1]["snet-user-address"] == USER
    token = await both.free.token()
    assert await both.free.available(token) == 2
    both.upstream.fail = None
    await both.gate(call)  # type: ignore[arg-type]
    assert await both.free.available(token) == 1


@aio_test
async def test_unknown_payment_type_is_still_refused() -> None:
    """Types the Go daemon does not know are INVALID_ARGUMENT; train-call is not built yet."""
    both = Both()
    error = await refused(both.gate(Call((("snet-payment-type", "job"),))))  # type: ignore[arg-type]
    assert error.status == Status.INVALID_ARGUMENT
    error = await refused(both.gate(Call((("snet-payment-type", "train-call"),))))  # type: ignore[arg-type]
    assert error.status == Status.UNIMPLEMENTED


def test_forwarded_holder_is_checksummed() -> None:
    """The token holder is forwarded checksummed, as Go's HexToAddress(...).Hex()."""
    from tests.test_prepaid import Clock, _tokens

    tokens = _tokens(Clock())
    assert tokens.verify(tokens.create(1, CLIENT.lower()), 1) == CLIENT
    assert tokens.verify(tokens.create(1, ""), 1) == "unknown"
    assert sig.checksum(sig.address_of(CLIENT_KEY)) == CLIENT
