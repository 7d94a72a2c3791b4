"""What every source shares: the ``Source`` interface, the error callback, thread hand-over.

``Backoff`` lives in :mod:`worker.retry` (the one retry policy) and is re-exported here.

A source produces ``Frame`` objects into one ``FrameQueue`` (built by the runtime from the source's
``policy`` and ``queue_size``). ``run`` goes on until cancelled or ``stop()``ped, or until a finite
input (a video file, an image folder) ends; it never raises for recoverable problems (a camera or
broker that goes away, a corrupt payload): it reports them through ``on_error`` and telemetry, backs
off and retries. Whenever ``run`` returns or is cancelled the queue is closed (no more frames come).

Blocking readers (OpenCV) run in their own thread and hand frames over with ``ThreadHandover``:
under ``every_frame`` the thread waits until the queue took the frame (backpressure reaches the
reader); under ``latest`` it never waits (the queue drops the oldest frame; if the event loop itself
falls behind, the reader drops the frame and counts it as ``stale``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from worker.frame import Frame
from worker.messages import ErrorReport
from worker.queues import FrameQueue, QueueClosed
from worker.retry import Backoff
from worker.telemetry import Telemetry

__all__ = ["Backoff", "ErrorCallback", "Source", "ThreadHandover"]

#: what a source calls with each problem it wants on the error topic (the runtime publishes it)
ErrorCallback = Callable[[ErrorReport], None]


@runtime_checkable
class Source(Protocol):
    """A producer of frames for one queue."""

    @property
    def source_id(self) -> str: ...

    async def run(self, queue: FrameQueue) -> None:
        """Produce frames into ``queue`` until cancelled, stopped, or the input ends; then close it."""
        ...

    async def stop(self) -> None:
        """Ask ``run`` to finish: it returns soon after, with its thread joined and resources released."""
        ...


class ThreadHandover:
    """Hands frames from a reader thread to a ``FrameQueue`` on the event loop.

    ``put`` is called in the reader thread. It returns True when the frame was handed over (or dropped
    under ``latest``), False when the reader must stop (the queue is closed or ``stop`` is set).

    Args:
        queue: the source's queue.
        loop: the event loop that owns the queue.
        stop: set when the reader must end; checked while waiting for room.
        telemetry: where frames dropped because the loop fell behind are counted.
        max_pending: under ``latest``, how many hand-overs may wait for the loop before new frames are
            dropped (bounds memory if the loop stalls).
    """

    def __init__(
        self,
        queue: FrameQueue,
        loop: asyncio.AbstractEventLoop,
        stop: threading.Event,
        telemetry: Telemetry,
        max_pending: int = 2,
    ) -> None:
        self._queue = queue
        self._loop = loop
        self._stop = stop
        self._telemetry = telemetry
        self._max_pending = max_pending
        self._pending: deque[concurrent.futures.Future[None]] = deque()
        self.closed = False

    def put(self, frame: Frame) -> bool:
        if self.closed or self._stop.is_set():
            return False
        if self._queue.policy == "every_frame":
            return self._put_waiting(frame)
        return self._put_latest(frame)

    def _submit(self, frame: Frame) -> concurrent.futures.Future[None] | None:
        try:
            return asyncio.run_coroutine_threadsafe(self._queue.put(frame), self._loop)
        except RuntimeError:  # the loop is closed: the worker is going away
            self.closed = True
            return None

    def _put_waiting(self, frame: Frame) -> bool:
        future = self._submit(frame)
        if future is None:
            return False
        while True:
            try:
                future.result(timeout=0.1)
                return True
            except concurrent.futures.TimeoutError:
                if self._stop.is_set():
                    # the reader stops, but the frame it already read is not thrown away: its put
                    # stays pending on the loop and enters the queue when there is room, or when the
                    # queue is closed (FrameQueue keeps frames of puts waiting at close)
                    return False
            except (QueueClosed, concurrent.futures.CancelledError):
                self.closed = True
                return False

    def _put_latest(self, frame: Frame) -> bool:
        while self._pending and self._pending[0].done():
            done = self._pending.popleft()
            if not done.cancelled() and isinstance(done.exception(), QueueClosed):
                self.closed = True
                return False
        if len(self._pending) >= self._max_pending:
            self._telemetry.frame_skipped(self._queue.source_id, "stale")
            return True
        future = self._submit(frame)
        if future is None:
            return False
        self._pending.append(future)
        return True
