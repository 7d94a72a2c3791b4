"""The progress line of ``segstream run``: frames done / total, fps and ETA for sources of known length.

Shown only on a terminal (``stderr`` is a TTY) and never with ``log_format: json`` (that output is
JSON lines only); :func:`progress_stream` makes that decision, so tests can inject it. The line is
redrawn in place with ``\\r`` at most ``1 / min_interval_s`` times a second, ended with a newline when
the run ends. A log record written meanwhile first erases the line (a filter on the root logger's
handlers), and the next redraw puts it back below the record.

Known length: a video file read once (its container's frame count) and an image folder read once (its
file count), both exposed by the source as ``expected_frames`` once it opened. A frame is done when it
was processed, dropped or skipped. ``fps`` is the processed rate since the line started; ``ETA`` the
frames left at that rate::

    progress: 120/250 frames (48%), 23.5 fps, ETA 0:06
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TextIO

from worker.ops.metrics import SourceSnapshot

__all__ = ["ProgressLine", "progress_stream", "render_progress"]

_ERASE = "\r\x1b[K"


class _Sized(Protocol):
    @property
    def source_id(self) -> str: ...


def progress_stream(log_format: str, stream: TextIO) -> TextIO | None:
    """``stream`` when a progress line belongs there (a terminal, text logs), else None."""
    if log_format == "json":
        return None
    try:
        return stream if stream.isatty() else None
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return None


def render_progress(done: int, total: int, processed: int, elapsed_s: float) -> str:
    """One progress line (without ``\\r``): ``progress: 120/250 frames (48%), 23.5 fps, ETA 0:06``."""
    percent = int(100 * done / total) if total else 100
    fps = processed / elapsed_s if elapsed_s > 0 else 0.0
    left = max(0, total - done)
    if left == 0:
        eta = "0:00"
    elif fps > 0:
        seconds = int(left / fps + 0.5)
        hours, rest = divmod(seconds, 3600)
        eta = f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
    else:
        eta = "?"
    return f"progress: {done}/{total} frames ({percent}%), {fps:.1f} fps, ETA {eta}"


class _EraseFirst(logging.Filter):
    """On a log handler: erase the progress line before the record is written over it."""

    def __init__(self, line: ProgressLine) -> None:
        super().__init__()
        self._line = line

    def filter(self, record: logging.LogRecord) -> bool:
        self._line.erase()
        return True


class ProgressLine:
    """Draws the progress of ``sources`` (those with ``expected_frames``) on ``stream``.

    Args:
        stream: a terminal.
        sources: the pipeline's sources; those whose ``expected_frames`` stays None are not counted.
        snapshot: per-source totals (``Metrics.snapshot``).
        min_interval_s: the shortest time between two redraws.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        stream: TextIO,
        sources: Sequence[_Sized],
        snapshot: Callable[[], Mapping[str, SourceSnapshot]],
        *,
        min_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._sources = tuple(sources)
        self._snapshot = snapshot
        self._interval = min_interval_s
        self._clock = clock
        self._started = clock()
        self._last_draw = float("-inf")
        self._shown = False  # the line is on the screen (not erased since)
        self._filter = _EraseFirst(self)

    def counts(self) -> tuple[int, int, int] | None:
        """``(done, total, processed)`` over the sources of known length; None while none is known."""
        totals = {s.source_id: getattr(s, "expected_frames", None) for s in self._sources}
        known = {sid: n for sid, n in totals.items() if isinstance(n, int) and n > 0}
        if not known:
            return None
        snap = self._snapshot()
        done = processed = 0
        for sid in known:
            s = snap.get(sid, SourceSnapshot())
            done += s.processed + s.dropped + s.skipped
            processed += s.processed
        total = sum(known.values())
        return min(done, total), total, processed

    def draw(self, *, force: bool = False) -> bool:
        """Redraw the line unless the last redraw was under ``min_interval_s`` ago; True if drawn."""
        now = self._clock()
        if not force and now - self._last_draw < self._interval:
            return False
        counts = self.counts()
        if counts is None:
            return False
        done, total, processed = counts
        self._last_draw = now
        self._write(_ERASE + render_progress(done, total, processed, now - self._started))
        self._shown = True
        return True

    def erase(self) -> None:
        if self._shown:
            self._shown = False
            self._write(_ERASE)

    def finish(self) -> None:
        """The final state, and a newline so what follows starts on its own line."""
        if self.draw(force=True):
            self._write("\n")
            self._shown = False

    async def run(self) -> None:
        """Redraw every ``min_interval_s`` until cancelled; then draw the final line."""
        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(self._filter)
        try:
            while True:
                self.draw()
                await asyncio.sleep(self._interval)
        finally:
            for handler in handlers:
                handler.removeFilter(self._filter)
            self.finish()

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # the terminal went away: progress is not worth failing for
            pass
