"""A folder of images, read in name order in a reader thread (``every_frame`` by default).

Each file is read (size-limited), its header checked against ``max_image_pixels`` and decoded (see
``worker.sources.decode``). A file that cannot be read or decoded is reported on the error topic
(``decode_error`` or ``oversize``), counted in ``frames_dropped_total``, and the next file goes on.
After the last file the queue is closed, unless ``loop: true``. ``fps`` paces reading like a camera.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from worker.errors import FrameDecodeError
from worker.frame import Frame
from worker.queues import FramePolicy, FrameQueue
from worker.sources.base import ErrorCallback
from worker.sources.decode import decode_image
from worker.sources.reader import ReaderContext, ReaderThread
from worker.sources.video import SOURCE_ID_PATTERN
from worker.telemetry import NullTelemetry, Telemetry

__all__ = ["ImageFolderSource", "ImageFolderSourceConfig"]

log = logging.getLogger(__name__)


class ImageFolderSourceConfig(BaseModel):
    """A folder of JPEG/PNG images, processed in sorted file-name order."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["images"] = "images"
    id: str = Field(pattern=SOURCE_ID_PATTERN)
    path: Path
    pattern: str = Field("*", min_length=1, description="glob of the files to read, e.g. '*.jpg'")
    extensions: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
    policy: FramePolicy = "every_frame"
    queue_size: int = Field(4, ge=1, le=4096)
    loop: bool = False
    fps: float | None = Field(None, gt=0, le=1000, description="pace reading at this rate")
    max_file_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    max_image_pixels: int = Field(40_000_000, ge=1, le=500_000_000)


class ImageFolderSource:
    """Reads the images of one folder in a thread named ``source[<id>].reader``."""

    def __init__(
        self,
        config: ImageFolderSourceConfig,
        *,
        telemetry: Telemetry | None = None,
        on_error: ErrorCallback | None = None,
        pipeline: str = "",
    ) -> None:
        self.config = config
        self.telemetry: Telemetry = telemetry or NullTelemetry()
        self.on_error = on_error
        self.pipeline = pipeline
        self._reader: ReaderThread | None = None
        self._frame_number = 0
        #: frames this source will deliver where known (the files of a folder read once), else None
        self.expected_frames: int | None = None

    @property
    def source_id(self) -> str:
        return self.config.id

    def files(self) -> list[Path]:
        """The files that will be read, sorted by name."""
        exts = {e.lower() for e in self.config.extensions}
        return sorted(
            p for p in self.config.path.glob(self.config.pattern) if p.is_file() and p.suffix.lower() in exts
        )

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.ctx.stop.set()

    async def run(self, queue: FrameQueue) -> None:
        loop = asyncio.get_running_loop()
        ctx = ReaderContext(self.source_id, self.pipeline, queue, loop, self.telemetry, self.on_error)
        self._reader = ReaderThread(ctx, self._produce)
        self._reader.start()
        try:
            await asyncio.shield(self._reader.finished)
        finally:
            if not self._reader.finished.done():
                await asyncio.shield(self._reader.stop_and_join(10.0))
            queue.close()
        self._reader.finished.result()

    def _produce(self, ctx: ReaderContext) -> None:
        cfg = self.config
        interval = 1.0 / cfg.fps if cfg.fps else 0.0
        next_due = time.monotonic()
        while not ctx.stopping:
            files = self.files()
            if not files:
                ctx.report("source_unavailable", f"no image matches {cfg.pattern!r} in {cfg.path}")
                return
            if self._frame_number == 0:  # the first pass: one line
                log.info(
                    "source %s: opened %s (%d files matching %r%s)",
                    self.source_id,
                    cfg.path,
                    len(files),
                    cfg.pattern,
                    ", looping" if cfg.loop else "",
                )
                self.expected_frames = None if cfg.loop else len(files)
            for path in files:
                if interval and ctx.wait(next_due - time.monotonic()):
                    return
                next_due = max(next_due + interval, time.monotonic())
                number = self._frame_number
                self._frame_number += 1
                self.telemetry.frame_received(self.source_id)  # a bad file too: it is dropped, below
                try:
                    with ctx.busy():
                        image = self._load(path)
                except FrameDecodeError as exc:
                    self.telemetry.frame_dropped(self.source_id, exc.reason)
                    ctx.report(exc.reason, f"{path.name}: {exc}", frame_number=number)
                    continue
                frame = Frame(
                    source_id=self.source_id, frame_number=number, timestamp=time.time(), image=image
                )
                if not ctx.put(frame):
                    return
            if not cfg.loop:
                log.info("source %s: read all %d files of %s", self.source_id, len(files), cfg.path)
                return

    def _load(self, path: Path) -> np.ndarray:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise FrameDecodeError(f"cannot read: {exc}", source_id=self.source_id) from exc
        if size > self.config.max_file_bytes:
            raise FrameDecodeError(
                f"file of {size} bytes exceeds max_file_bytes={self.config.max_file_bytes}",
                source_id=self.source_id,
                reason="oversize",
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FrameDecodeError(f"cannot read: {exc}", source_id=self.source_id) from exc
        return decode_image(data, max_pixels=self.config.max_image_pixels)
