"""Collect frames from every source's queue into one batch for the step.

A batch is complete as soon as ``max_batch_size`` frames are taken, or ``max_wait_ms`` after the
*oldest* frame of the batch arrived (its ``Frame.received_monotonic``), whichever comes first. Starting
the clock at the frame's arrival rather than at the moment the batcher takes it means a frame that
already waited in its queue while the previous batch ran the model is not made to wait again: under
load batches are cut at once, when idle a lone frame waits at most ``max_wait_ms`` for company.

The batcher never waits for a particular source: it takes what is queued now, round-robin, one frame
per source per round, starting each batch with the source after the last one served, so a busy camera
cannot starve a quiet one even when every batch fills up. It only awaits the queues' shared ``ready``
event (set on every ``put`` and ``close``), never a single queue.

Example::

    ready = asyncio.Event()
    queues = [FrameQueue("cam1", 8, "latest", ready=ready), FrameQueue("cam2", 8, "latest", ready=ready)]
    async for batch in Batcher(queues, ready, max_batch_size=4, max_wait_ms=20):
        results = await pool.run(runner.run_batch, batch)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from worker.frame import Frame
from worker.queues import FrameQueue

__all__ = ["Batcher"]


class Batcher:
    """Round-robin batching across per-source frame queues.

    Args:
        queues: one queue per source; all must share ``ready``.
        ready: the event the queues set on every put and on close.
        max_batch_size: most frames per batch (>= 1).
        max_wait_ms: longest time (ms, >= 0) the oldest frame of a batch waits for the batch to fill.

    Raises:
        ValueError: on a bad size or wait, or a queue that does not share ``ready``.

    Only one coroutine may consume a ``Batcher`` at a time (it clears ``ready``).
    """

    def __init__(
        self,
        queues: Sequence[FrameQueue],
        ready: asyncio.Event,
        max_batch_size: int,
        max_wait_ms: float,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        for queue in queues:
            if queue.ready is not ready:
                raise ValueError(
                    f"queue of source {queue.source_id!r} does not share the batcher's ready event"
                )
        self._queues = list(queues)
        self._ready = ready
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._next = 0  # index of the queue served first in the next round
        self._gathering: list[Frame] = []  # the batch ``next_batch`` is filling now
        self._paused: set[str] = set()  # sources not taken from (their frames wait for a server)

    def pause(self, source_id: str) -> None:
        """Take no frames of ``source_id`` until :meth:`resume`: its queue fills, its reader waits."""
        self._paused.add(source_id)

    def resume(self, source_id: str) -> None:
        """Take ``source_id``'s frames again (wakes a waiting ``next_batch``)."""
        self._paused.discard(source_id)
        self._ready.set()

    @property
    def gathering(self) -> list[Frame]:
        """Frames taken for the batch being filled (still there if ``next_batch`` was cancelled)."""
        return list(self._gathering)

    @property
    def exhausted(self) -> bool:
        """True when every queue is closed and empty: no batch will ever come again."""
        return all(queue.exhausted for queue in self._queues)

    def _take(self, batch: list[Frame]) -> None:
        """Move queued frames into ``batch``, one per source per round, until full or nothing is left."""
        count = len(self._queues)
        if count == 0:
            return
        while len(batch) < self.max_batch_size:
            took_any = False
            for offset in range(count):
                index = (self._next + offset) % count
                if self._queues[index].source_id in self._paused:
                    continue
                frame = self._queues[index].get_nowait()
                if frame is None:
                    continue
                batch.append(frame)
                took_any = True
                if len(batch) >= self.max_batch_size:
                    # the next batch starts with the source after this one
                    self._next = (index + 1) % count
                    return
            if not took_any:
                return

    async def next_batch(self) -> list[Frame]:
        """Wait for the next batch.

        Returns:
            1..``max_batch_size`` frames in round-robin order across sources, or ``[]`` once every
            queue is exhausted (closed and empty).
        """
        batch: list[Frame] = []
        self._gathering = batch
        deadline: float | None = None
        while True:
            # clear before looking: a put that happens after the look sets the event again
            self._ready.clear()
            self._take(batch)
            if len(batch) >= self.max_batch_size or self.exhausted:
                return self._done(batch)
            if not batch:
                await self._ready.wait()
                continue
            now = time.monotonic()
            if deadline is None:
                first_arrival = min(min(frame.received_monotonic for frame in batch), now)
                deadline = first_arrival + self.max_wait_s
            remaining = deadline - now
            if remaining <= 0:
                return self._done(batch)
            try:
                async with asyncio.timeout(remaining):
                    await self._ready.wait()
            except TimeoutError:
                self._take(batch)  # whatever arrived at the last moment, still bounded by the size
                return self._done(batch)

    def _done(self, batch: list[Frame]) -> list[Frame]:
        self._gathering = []
        return batch

    def __aiter__(self) -> AsyncIterator[list[Frame]]:
        return self

    async def __anext__(self) -> list[Frame]:
        batch = await self.next_batch()
        if not batch:
            raise StopAsyncIteration
        return batch
