"""Supervision of the worker's stages: one ``asyncio.TaskGroup``, restarts with backoff, exit codes.

Every long-running loop of a worker (sources, the control listener, the inference loop, the loop
heartbeat) runs as a task of one ``Supervisor``, so none can outlive the worker::

    async with Supervisor(stop, backoff=lambda: Backoff(0.5, 30.0)) as supervisor:
        supervisor.background("health.heartbeat", health.heartbeat)
        supervisor.restartable("control", listener.run, on_up=..., on_down=...)
        supervisor.critical("inference", inference.run)
        await stop.wait()          # set by SIGTERM, the end of the inputs, or a critical failure
        ...                        # the shutdown sequence (the caller's)
    # here every stage task is done; background tasks were cancelled

A stage fails when its coroutine raises ``Exception``:

- a **restartable** stage (a source, the control listener) is marked down (``on_down``), logged in
  one line and started again after a delay of the ``Backoff`` (full jitter, never faster than its
  attempt-rate floor); a stage that ran for longer than the backoff's cap before failing starts again
  from the shortest delay;
- a **critical** stage (the inference loop: batcher, model, publisher) cannot be restarted without
  losing track of frames in flight: it is marked down, logged in one line, recorded in ``failures``
  and the stop event is set, so the caller's shutdown sequence runs and the process exits non-zero.

A stage whose coroutine *returns* is finished (a file source at its end); ``CancelledError`` is never
caught. Failures are logged as one ``ERROR`` line naming the stage, the exception and where it was
raised; the traceback follows at ``DEBUG``.

Exit codes of ``segstream run`` (``EXIT_*``): 0 a clean stop (SIGTERM/SIGINT or the inputs ended,
everything delivered); 1 an error (start-up failed, or a stage failed for good); 2 a usage error (the
command line); 3 the stop was not clean (messages undelivered or frames unfinished at the end of the
grace time).
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNDELIVERED",
    "EXIT_USAGE",
    "RetryDelay",
    "StageFailure",
    "Supervisor",
    "describe_exception",
]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNDELIVERED = 3

StageFactory = Callable[[], Awaitable[None]]


class RetryDelay(Protocol):
    """What the supervisor needs of a backoff (``worker.retry.Backoff``)."""

    @property
    def max_s(self) -> float: ...

    def next_delay(self) -> float: ...

    def reset(self) -> None: ...

    def pace(self) -> float: ...


@dataclass(frozen=True, slots=True)
class StageFailure:
    """A stage that failed for good."""

    stage: str
    error: BaseException


def describe_exception(exc: BaseException) -> str:
    """``TypeError: boom (at worker/step/executor.py:240 in run_batch)``: one line, no traceback."""
    text = f"{type(exc).__name__}: {exc}".rstrip(": ").replace("\n", " ")
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {_short_path(last.filename)}:{last.lineno} in {last.name})"
    return text


def _short_path(filename: str) -> str:
    for marker in ("/worker/", "/tests/", "/benchmarks/", "/site-packages/"):
        index = filename.rfind(marker)
        if index >= 0:
            return filename[index + 1 :]
    return filename


class Supervisor:
    """Runs stage coroutines in one ``TaskGroup``; restarts or records their failures.

    Args:
        stop: set by the supervisor when a critical stage fails (the caller also sets it on SIGTERM
            or when the inputs end); a restart waiting for its backoff gives up when it is set.
        backoff: makes one backoff per restartable stage.
        on_failure: called on the loop for every stage failure (restartable or not), e.g. to count it.
        clock: monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        stop: asyncio.Event,
        *,
        backoff: Callable[[], RetryDelay],
        on_failure: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stop = stop
        self._backoff = backoff
        self._on_failure = on_failure or (lambda stage: None)
        self._clock = clock
        self._group = asyncio.TaskGroup()
        self._background: list[asyncio.Task[None]] = []
        self.failures: list[StageFailure] = []
        self.restarts: Counter[str] = Counter()

    async def __aenter__(self) -> Self:
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._background:
            task.cancel()
        await self._group.__aexit__(exc_type, exc, tb)

    # ------------------------------------------------------------------------------------- stages

    def background(self, name: str, factory: StageFactory) -> asyncio.Task[None]:
        """A helper loop that runs until the supervisor exits (then it is cancelled); a failure of it
        is critical."""
        task = self.critical(name, factory)
        self._background.append(task)
        return task

    def critical(
        self, name: str, factory: StageFactory, *, on_down: Callable[[], None] | None = None
    ) -> asyncio.Task[None]:
        """A stage that cannot be restarted: its failure is recorded and stops the worker."""
        return self._group.create_task(self._run_critical(name, factory, on_down), name=name)

    def restartable(
        self,
        name: str,
        factory: StageFactory,
        *,
        on_up: Callable[[], None] | None = None,
        on_down: Callable[[], None] | None = None,
    ) -> asyncio.Task[None]:
        """A stage started again (after a backoff delay) each time it fails; done once it returns."""
        return self._group.create_task(
            self._run_restartable(name, factory, on_up or _nothing, on_down or _nothing), name=name
        )

    # ------------------------------------------------------------------------------------- running

    async def _run_critical(
        self, name: str, factory: StageFactory, on_down: Callable[[], None] | None
    ) -> None:
        try:
            await factory()
        except Exception as exc:
            self._log_failure(name, exc, "the worker stops")
            self.failures.append(StageFailure(name, exc))
            if on_down is not None:
                on_down()
            self._stop.set()

    async def _run_restartable(
        self, name: str, factory: StageFactory, on_up: Callable[[], None], on_down: Callable[[], None]
    ) -> None:
        backoff = self._backoff()
        while True:
            started = self._clock()
            on_up()
            try:
                await factory()
                return
            except Exception as exc:
                on_down()
                if self._clock() - started > backoff.max_s:
                    backoff.reset()  # it ran well for a while: this is a new problem
                delay = max(backoff.next_delay(), backoff.pace())  # pace: the attempt-rate floor
                self.restarts[name] += 1
                self._log_failure(name, exc, f"restarting it in {delay:.1f} s")
            if await self._stopped_within(delay):
                return

    async def _stopped_within(self, delay: float) -> bool:
        try:
            async with asyncio.timeout(delay):
                await self._stop.wait()
        except TimeoutError:
            return False
        return True

    def _log_failure(self, name: str, exc: Exception, consequence: str) -> None:
        log.error("stage %s failed: %s; %s", name, describe_exception(exc), consequence)
        log.debug("stage %s failed", name, exc_info=exc)
        self._on_failure(name)


def _nothing() -> None:
    pass
