"""Bounded per-source frame queues with a drop policy, and the signal the batcher waits on.

``latest`` (live cameras): ``put`` never waits; when the queue is full the *oldest* frame is replaced
and counted as a policy skip, ``frames_skipped_total{reason="stale"}`` (not a fault), so the batcher
always sees the freshest frames.
``every_frame`` (files, lossless MQTT): ``put`` waits for room — backpressure, nothing dropped.

All methods run on the event loop; reader threads hand frames over with
``asyncio.run_coroutine_threadsafe(queue.put(frame), loop)``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Literal

from worker.frame import Frame
from worker.telemetry import NullTelemetry, Telemetry

__all__ = ["FramePolicy", "FrameQueue", "QueueClosed"]

FramePolicy = Literal["latest", "every_frame"]


class QueueClosed(Exception):
    """Raised by ``put`` on a closed queue."""


class FrameQueue:
    """A bounded FIFO of frames from one source.

    Args:
        source_id: the source's id (metric label).
        maxsize: capacity (>= 1).
        policy: ``"latest"`` replaces the oldest frame when full (a ``stale`` skip);
            ``"every_frame"`` makes ``put`` wait.
        telemetry: where skips and depth are reported.
        ready: an event set whenever a frame is put or the queue closes (shared by the batcher's queues).
    """

    def __init__(
        self,
        source_id: str,
        maxsize: int,
        policy: FramePolicy,
        telemetry: Telemetry | None = None,
        ready: asyncio.Event | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        if policy not in ("latest", "every_frame"):
            raise ValueError(f"policy must be 'latest' or 'every_frame', got {policy!r}")
        self.source_id = source_id
        self.maxsize = maxsize
        self.policy: FramePolicy = policy
        self.telemetry: Telemetry = telemetry or NullTelemetry()
        self.ready = ready or asyncio.Event()
        self._items: deque[Frame] = deque()
        self._not_full = asyncio.Event()
        self._not_full.set()
        self._closed = False
        self._waiting_puts = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        """True once the source said it will put no more frames."""
        return self._closed

    @property
    def exhausted(self) -> bool:
        """Closed, empty, and no ``put`` still waiting: nothing more will ever come out."""
        return self._closed and not self._items and not self._waiting_puts

    async def put(self, frame: Frame) -> None:
        """Add a frame (waits for room under ``every_frame``; replaces the oldest under ``latest``)."""
        if self._closed:
            raise QueueClosed(f"queue of source {self.source_id!r} is closed")
        if self.policy == "latest":
            if len(self._items) >= self.maxsize:
                self._items.popleft()
                self.telemetry.frame_skipped(self.source_id, "stale")
        else:
            self._waiting_puts += 1
            try:
                # closed while waiting: the frame was already read, so it is kept (nothing read under
                # every_frame is lost); the queue then exceeds maxsize by at most one frame per waiter
                while len(self._items) >= self.maxsize and not self._closed:
                    self._not_full.clear()
                    await self._not_full.wait()
            finally:
                self._waiting_puts -= 1
        self._items.append(frame)
        self.telemetry.queue_depth(self.source_id, len(self._items))
        self.ready.set()

    def get_nowait(self) -> Frame | None:
        """The oldest frame, or None when empty."""
        if not self._items:
            return None
        frame = self._items.popleft()
        self._not_full.set()
        self.telemetry.queue_depth(self.source_id, len(self._items))
        return frame

    def reopen(self) -> None:
        """Accept puts again after ``close``: the supervisor restarting a source that failed.

        A source closes its queue when ``run`` ends, also by an exception; the supervisor reopens it
        in the same step of the event loop (no ``await`` in between), so the batcher never sees the
        queue exhausted while its source is restarted.
        """
        self._closed = False

    def close(self) -> None:
        """No new ``put`` is accepted; frames already queued, and those of puts already waiting for
        room (``every_frame``), can still be taken."""
        self._closed = True
        self._not_full.set()
        self.ready.set()
