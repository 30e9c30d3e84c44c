"""Run asyncio coroutines as tests and fixtures under pytest-twisted.

The daemon's logic is asyncio coroutines (the reactor is Twisted's asyncio
reactor).  pytest-twisted drives ``async def`` tests as Deferred coroutines,
which cannot await asyncio futures ("Task got bad yield"); these decorators
run the test body as an asyncio Task instead and hand pytest-twisted a
Deferred to wait on.

    @aio_test
    async def test_something() -> None:
        await asyncio.sleep(0)

    @aio_fixture
    async def storage() -> AsyncIterator[MemoryStorage]:
        yield MemoryStorage(...)

:func:`wait_for` polls a condition from such a test.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred

P = ParamSpec("P")
T = TypeVar("T")


def run(awaitable: Awaitable[T]) -> Deferred[T]:
    """A Deferred for ``awaitable`` running as an asyncio Task."""
    return Deferred.fromFuture(asyncio.ensure_future(awaitable))


def aio_test(fn: Callable[P, Awaitable[T]]) -> Callable[P, Any]:
    """Mark an ``async def`` test whose body uses asyncio."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return await run(fn(*args, **kwargs))

    return pytest_twisted.ensureDeferred(wrapper)  # type: ignore[no-any-return]


def aio_fixture(fn: Callable[P, AsyncIterator[T]] | None = None, **fixture_kwargs: Any) -> Any:
    """Like ``pytest_twisted.async_yield_fixture`` for asyncio generators."""

    def decorate(gen_fn: Callable[P, AsyncIterator[T]]) -> Any:
        @functools.wraps(gen_fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
            agen = gen_fn(*args, **kwargs)
            value = await run(agen.__anext__())
            yield value
            try:
                await run(agen.__anext__())
            except StopAsyncIteration:
                pass

        return pytest_twisted.async_yield_fixture(**fixture_kwargs)(wrapper)

    return decorate(fn) if fn is not None else decorate


async def wait_for(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``predicate`` every 10 ms until true, failing after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def turns(n: int = 50) -> None:
    """Let the event loop run ``n`` turns: callbacks and tasks woken meanwhile run."""
    for _ in range(n):
        await asyncio.sleep(0)
