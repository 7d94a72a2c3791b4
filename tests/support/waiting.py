"""The one way tests wait for something that happens elsewhere: poll a predicate with a generous timeout.

A test never asserts on a sleep; it waits until what it expects is true, and fails (naming what it
waited for) only after a timeout long enough for a loaded machine::

    await wait_until(lambda: len(sink.results) == 3, "three results")
    result = await wait_until(lambda: cdp.evaluate("document.title"), "a title")  # async predicates too
    port = wait_until_sync(lambda: find_port(log_path), "the HTTP port", timeout=60)  # plain threads

Both return the predicate's first truthy value.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["DEFAULT_TIMEOUT_S", "wait_until", "wait_until_sync"]

T = TypeVar("T")

#: long enough for a loaded CI machine; a test that passes never waits for it
DEFAULT_TIMEOUT_S = 30.0


async def wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    what: str = "condition",
    *,
    timeout: float = DEFAULT_TIMEOUT_S,  # noqa: ASYNC109
    interval: float = 0.02,
) -> T:
    """Poll ``predicate()`` (awaited if it returns an awaitable) every ``interval`` s until truthy.

    Raises:
        AssertionError: not truthy within ``timeout`` s (the message names ``what``).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


def wait_until_sync(
    predicate: Callable[[], T],
    what: str = "condition",
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    interval: float = 0.02,
) -> T:
    """``wait_until`` for code outside an event loop (tests driving a subprocess or a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
