"""A sink that keeps what it receives in memory: for tests of other stages and for embedding.

It follows the same contract as the real sinks (refuses messages before ``start`` and after ``close``,
counts ``published``) and lets a test wait for a number of messages without sleeping.
"""

from __future__ import annotations

import asyncio

from worker.errors import SinkError
from worker.messages import ErrorReport, FrameResult
from worker.sinks.base import DEFAULT_CLOSE_TIMEOUT_S, SinkContextMixin
from worker.telemetry import NullTelemetry, Telemetry

__all__ = ["MemorySink"]


class MemorySink(SinkContextMixin):
    """Keep results and error reports in lists, in arrival order.

    Args:
        name: the sink's name.
        telemetry: receives ``published(kind)``.
        max_items: most results kept (the oldest are forgotten beyond it); None for no limit.
    """

    def __init__(
        self, name: str = "memory", *, telemetry: Telemetry | None = None, max_items: int | None = None
    ) -> None:
        self.name = name
        self.telemetry: Telemetry = telemetry or NullTelemetry()
        self.max_items = max_items
        self.results: list[FrameResult] = []
        self.errors: list[ErrorReport] = []
        self.results_total = 0  # counts survive max_items
        self.errors_total = 0
        self.flushes = 0
        self.started = False
        self.closed = False
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        if self.started or self.closed:
            raise SinkError(f"sink[{self.name}] was already started")
        self.started = True

    def _check_open(self) -> None:
        if not self.started or self.closed:
            raise SinkError(f"sink[{self.name}] is not open")

    async def publish_result(self, result: FrameResult) -> None:
        self._check_open()
        self.results.append(result)
        self.results_total += 1
        if self.max_items is not None and len(self.results) > self.max_items:
            del self.results[0]
        self.telemetry.published("result")
        async with self._changed:
            self._changed.notify_all()

    async def publish_error(self, report: ErrorReport) -> None:
        self._check_open()
        self.errors.append(report)
        self.errors_total += 1
        if self.max_items is not None and len(self.errors) > self.max_items:
            del self.errors[0]
        self.telemetry.published("error")
        async with self._changed:
            self._changed.notify_all()

    async def flush(self) -> None:
        self.flushes += 1

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> int:  # noqa: ASYNC109
        self.closed = True
        async with self._changed:
            self._changed.notify_all()
        return 0

    async def wait_for(self, *, results: int = 0, errors: int = 0, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until at least ``results`` results and ``errors`` error reports arrived.

        Raises:
            TimeoutError: not within ``timeout`` seconds (the message says what did arrive).
        """
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(
                    lambda: self.results_total >= results and self.errors_total >= errors
                )
        except TimeoutError:
            raise TimeoutError(
                f"sink[{self.name}]: waited {timeout} s for {results} results / {errors} errors, "
                f"got {self.results_total} / {self.errors_total}"
            ) from None
