"""The inference loop: batches from the ``Batcher``, run in the model pool, handed on in batch order.

Up to ``inflight`` batches run in the model pool at once while the next batch is gathered; results
leave strictly in the order the batches were cut. Two tasks in one ``TaskGroup`` (``gather`` and
``deliver``), so a failure of either ends both and ``run`` raises it: the caller (the supervisor)
treats that as a failed stage. Frames taken from the queues but never handed on stay listed in
``unanswered()``, so the shutdown can report them instead of losing them silently.

Frames of held (``every_frame``) sources whose inference server failed come back with
:class:`~worker.models.remote.hold.HeldForServer`: they are parked here, per source and in order,
not in the model pool; the source is paused in the batcher (its bounded queue fills and pushes back
on its reader) until its parked frames are through. A third task waits for the server's breaker to
close (in a thread of its own, not the model pool) and runs the parked frames again; if the server
fails again they stay parked. Other sources' batches keep flowing meanwhile. Later frames of a
source that has parked frames are parked behind them, so each source's results leave in order. When
the model is closed (``release_remote`` at exit) the parked frames are handed on with the failure's
reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from worker.batching import Batcher
from worker.concurrency import BlockingPool
from worker.frame import Frame
from worker.models.remote.hold import HeldForServer, HoldsForServer
from worker.step.executor import BatchResult, FrameOutcome

__all__ = ["InferenceLoop"]

log = logging.getLogger(__name__)


class InferenceLoop:
    """Gather → infer (in ``pool``) → ``deliver``, with at most ``inflight`` batches running.

    Args:
        batcher: where batches come from (``[]`` once every queue is exhausted: the loop ends).
        run_batch: the blocking inference of one batch (``WorkflowRunner.run_batch``).
        pool: the model pool ``run_batch`` runs in.
        inflight: batches in the pool at once (>= 1).
        deliver: awaited with each batch's result, in batch order (the publisher).
        on_waiting: called when the loop waits for frames (liveness: not a stall).
        on_progress: called when a batch starts or its result is handed on.
    """

    def __init__(
        self,
        batcher: Batcher,
        run_batch: Callable[[Sequence[Frame]], BatchResult],
        pool: BlockingPool,
        inflight: int,
        deliver: Callable[[BatchResult], Awaitable[None]],
        *,
        on_waiting: Callable[[], None],
        on_progress: Callable[[], None],
    ) -> None:
        if inflight < 1:
            raise ValueError(f"inflight must be >= 1, got {inflight}")
        self._batcher = batcher
        self._run_batch = run_batch
        self._pool = pool
        self._deliver = deliver
        self._on_waiting = on_waiting
        self._on_progress = on_progress
        self._running: asyncio.Queue[asyncio.Future[BatchResult] | None] = asyncio.Queue(inflight)
        self._taken: deque[list[Frame]] = deque()  # batches taken and not yet delivered, in order
        # per source, in order: outcomes waiting for a server (held) and the later ones behind them
        self._parked: dict[str, deque[FrameOutcome]] = {}
        self._parked_changed = asyncio.Event()
        self._delivering = asyncio.Lock()  # the in-order task and the parked task take turns
        self._gather_done = False

    @property
    def parked(self) -> int:
        """Frames parked for an unavailable server (held sources), all sources together."""
        return sum(len(outcomes) for outcomes in self._parked.values())

    def unanswered(self) -> list[Frame]:
        """Frames taken from the queues whose batch was not handed on (after a failure)."""
        parked = [o.frame for outcomes in self._parked.values() for o in outcomes]
        return [frame for batch in self._taken for frame in batch] + self._batcher.gathering + parked

    async def run(self) -> None:
        """Until the batcher is exhausted and every batch was delivered; raises what failed."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._gather(), name="inference.gather")
                group.create_task(self._deliver_in_order(), name="inference.deliver")
                group.create_task(self._run_parked(), name="inference.parked")
        except BaseExceptionGroup as group_error:
            # one stage failure, not a group: the first error is the cause, the rest are its echoes
            raise group_error.exceptions[0] from None
        finally:
            while not self._running.empty():
                future = self._running.get_nowait()
                if future is None:
                    continue
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: the failure that matters was already raised
                future.cancel()

    async def _gather(self) -> None:
        while True:
            self._on_waiting()
            batch = await self._batcher.next_batch()
            if not batch:
                await self._running.put(None)
                return
            self._on_progress()
            self._taken.append(batch)
            future = asyncio.ensure_future(self._pool.run(self._run_batch, batch))
            await self._running.put(future)

    async def _deliver_in_order(self) -> None:
        while (future := await self._running.get()) is not None:
            result = await future
            self._on_progress()
            ready = self._park(result.outcomes)
            if ready:
                async with self._delivering:
                    await self._deliver(self._with(result, ready))
            self._taken.popleft()
        self._gather_done = True
        self._parked_changed.set()

    def _park(self, outcomes: list[FrameOutcome]) -> list[FrameOutcome]:
        """Park held outcomes (and any behind parked ones of their source); the rest, to deliver."""
        ready: list[FrameOutcome] = []
        for outcome in outcomes:
            source = outcome.frame.source_id
            if isinstance(outcome.error, HeldForServer) or source in self._parked:
                if source not in self._parked:
                    self._parked[source] = deque()
                    self._batcher.pause(source)
                    log.warning(
                        "source %s: frames parked until the inference server is back (%s)",
                        source,
                        outcome.error,
                    )
                self._parked[source].append(outcome)
                self._parked_changed.set()
            else:
                ready.append(outcome)
        return ready

    @staticmethod
    def _with(result: BatchResult, outcomes: list[FrameOutcome]) -> BatchResult:
        if len(outcomes) == len(result.outcomes):
            return result
        return BatchResult(outcomes, result.model_seconds, result.postprocess_seconds)

    async def _run_parked(self) -> None:
        """Run parked frames again once their server is back; hand them on in each source's order."""
        while True:
            self._parked_changed.clear()
            if not self._parked:
                if self._gather_done:
                    return
                await self._parked_changed.wait()
                continue
            models = list(
                {
                    id(o.error.model): o.error.model
                    for outcomes in self._parked.values()
                    for o in outcomes
                    if isinstance(o.error, HeldForServer)
                }.values()
            )
            if any(model.closed for model in models):
                await self._give_up()
                continue
            back = [model for model in models if model.wait_available(0)]  # does not block
            for model in back:  # each server on its own: one that is down does not hold the others
                await self._retry_parked(model)
            if not back:
                # a thread of the default executor, not the model pool: other batches keep running
                await asyncio.to_thread(models[0].wait_available, 1.0)

    async def _retry_parked(self, model: HoldsForServer) -> None:
        """One pass over the frames parked for ``model``: run them, hand on what is through."""
        waiting = [
            (source, i)
            for source, outcomes in self._parked.items()
            for i, o in enumerate(outcomes)
            if isinstance(o.error, HeldForServer) and o.error.model is model
        ]
        size = self._batcher.max_batch_size
        timing = BatchResult([], 0.0, 0.0)
        failing = False
        # indices stay valid: the in-order task only appends to the deques, and nothing is released
        # (popped from the left) before the pass is over
        for start in range(0, len(waiting), size):
            chunk = waiting[start : start + size]
            frames = [self._parked[source][i].frame for source, i in chunk]
            self._on_progress()
            result = await self._pool.run(self._run_batch, frames)
            for (source, i), outcome in zip(chunk, result.outcomes, strict=True):
                self._parked[source][i] = outcome
            timing = BatchResult([], timing.model_seconds + result.model_seconds,
                                 timing.postprocess_seconds + result.postprocess_seconds)  # fmt: skip
            if any(isinstance(o.error, HeldForServer) for o in result.outcomes):
                failing = True  # the server is back but failing again: the rest stays parked
                break
        await self._release(timing)
        if failing:
            await asyncio.sleep(0.05)  # do not spin on a failing server

    async def _release(self, timing: BatchResult) -> None:
        """Hand on each source's leading parked outcomes that are through; resume emptied sources."""
        ready: list[FrameOutcome] = []
        for source in list(self._parked):
            outcomes = self._parked[source]
            while outcomes and not isinstance(outcomes[0].error, HeldForServer):
                ready.append(outcomes.popleft())
            if not outcomes:
                del self._parked[source]
                self._batcher.resume(source)
        if ready:
            async with self._delivering:
                await self._deliver(BatchResult(ready, timing.model_seconds, timing.postprocess_seconds))

    async def _give_up(self) -> None:
        """The model was closed (exit): parked frames end with their server failure's reason."""
        for outcomes in self._parked.values():
            for outcome in outcomes:
                if isinstance(outcome.error, HeldForServer) and outcome.error.model.closed:
                    outcome.error = outcome.error.given_up()
        await self._release(BatchResult([], 0.0, 0.0))
