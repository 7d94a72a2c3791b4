"""One blocking reader in its own named thread, supervised from the event loop.

A ``ReaderThread`` runs ``produce(ctx)`` in a thread named ``source[<id>].reader``. ``produce`` does the
blocking work (``cv2.VideoCapture.read``, ``cv2.imread``) and hands frames over with ``ctx.put`` (see
``ThreadHandover``); it wraps each blocking call in ``ctx.busy()`` so the supervisor can tell a thread
that waits for room in the queue (fine) from one stuck inside a capture call (a hung camera). Errors go
through ``ctx.report``, which calls the runtime's ``on_error`` on the event loop, never in the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from worker.frame import Frame
from worker.messages import ErrorReport
from worker.queues import FrameQueue
from worker.sources.base import ErrorCallback, ThreadHandover
from worker.telemetry import Telemetry

__all__ = ["ReaderContext", "ReaderThread"]

log = logging.getLogger(__name__)


class ReaderContext:
    """What ``produce`` gets: the stop flag, the hand-over, busy tracking and error reporting."""

    def __init__(
        self,
        source_id: str,
        pipeline: str,
        queue: FrameQueue,
        loop: asyncio.AbstractEventLoop,
        telemetry: Telemetry,
        on_error: ErrorCallback | None,
    ) -> None:
        self.source_id = source_id
        self.pipeline = pipeline
        self.telemetry = telemetry
        self.stop = threading.Event()
        self.handover = ThreadHandover(queue, loop, self.stop, telemetry)
        self._loop = loop
        self._on_error = on_error
        self._busy_since: float | None = None

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()

    def put(self, frame: Frame) -> bool:
        """Hand a frame over; False means: stop reading (stopped, or the queue is closed)."""
        return self.handover.put(frame)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the reader must stop."""
        return self.stop.wait(max(0.0, seconds))

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Mark a blocking call (open/read) so the watchdog can see how long it has been running."""
        self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None

    def busy_for(self) -> float:
        """Seconds the current blocking call has been running (0 when none is)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def report(
        self,
        reason: str,
        message: str,
        *,
        frame_id: str | None = None,
        frame_number: int | None = None,
    ) -> None:
        """Send an ``ErrorReport`` to ``on_error`` (on the event loop) and log one line."""
        log.warning("source %s: %s (%s)", self.source_id, message, reason)
        if self._on_error is None:
            return
        report = ErrorReport(
            pipeline=self.pipeline,
            source_id=self.source_id,
            reason=reason,
            message=message,
            frame_id=frame_id,
            frame_number=frame_number,
        )
        with contextlib.suppress(RuntimeError):  # loop closed: the worker is exiting
            self._loop.call_soon_threadsafe(self._on_error, report)


class ReaderThread:
    """Runs ``produce(ctx)`` in a daemon thread; ``finished`` resolves (on the loop) when it returns.

    An exception escaping ``produce`` is a bug: it is set on ``finished`` so the awaiting task fails.
    """

    def __init__(self, ctx: ReaderContext, produce: Callable[[ReaderContext], None]) -> None:
        self.ctx = ctx
        self._produce = produce
        self._loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._main, name=f"source[{ctx.source_id}].reader", daemon=True
        )

    @property
    def name(self) -> str:
        return self._thread.name

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        error: BaseException | None = None
        try:
            self._produce(self.ctx)
        except BaseException as exc:  # handed to the awaiting task, which re-raises it
            error = exc
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._resolve, error)

    def _resolve(self, error: BaseException | None) -> None:
        if self.finished.done():
            return
        if error is None:
            self.finished.set_result(None)
        else:
            self.finished.set_exception(error)

    async def stop_and_join(self, wait_s: float) -> bool:
        """Ask the thread to stop and wait for it (up to ``wait_s`` s); True if it ended."""
        self.ctx.stop.set()
        done, _ = await asyncio.wait({self.finished}, timeout=wait_s)
        if done:
            self._thread.join(timeout=1.0)  # it has returned; this only reaps it
            return True
        log.error("%s did not stop within %.1fs; abandoning it", self.name, wait_s)
        return False
