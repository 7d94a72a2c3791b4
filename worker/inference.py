"""The inference loop: batches from the ``Batcher``, run in the model pool, handed on in batch order.

Up to ``inflight`` batches run in the model pool at once while the next batch is gathered; results
leave strictly in the order the batches were cut. Two tasks in one ``TaskGroup`` (``gather`` and
``deliver``), so a failure of either ends both and ``run`` raises it: the caller (the supervisor)
treats that as a failed stage. Frames taken from the queues but never handed on stay listed in
``unanswered()``, so the shutdown can report them instead of losing them silently.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from worker.batching import Batcher
from worker.concurrency import BlockingPool
from worker.frame import Frame
from worker.step.executor import BatchResult

__all__ = ["InferenceLoop"]


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

    def unanswered(self) -> list[Frame]:
        """Frames taken from the queues whose batch was not handed on (after a failure)."""
        return [frame for batch in self._taken for frame in batch] + self._batcher.gathering

    async def run(self) -> None:
        """Until the batcher is exhausted and every batch was delivered; raises what failed."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._gather(), name="inference.gather")
                group.create_task(self._deliver_in_order(), name="inference.deliver")
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
            await self._deliver(result)
            self._taken.popleft()
