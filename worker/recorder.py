"""Optional outputs of a run besides the sinks: an annotated video and a run summary.

Both are result observers (``worker.publisher.ResultObserver``): the publisher hands them every
published frame. ``AnnotatedVideo`` adapts an ``AnnotatedVideoWriter`` (a thread that annotates and
encodes) to that interface for one source.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from worker.annotate import annotate
from worker.concurrency import BlockingPool
from worker.step.detections import Detections

if TYPE_CHECKING:
    from worker.publisher import PublishedFrame

log = logging.getLogger(__name__)

__all__ = ["VIDEO_CODECS", "AnnotatedVideo", "AnnotatedVideoWriter", "RunSummary", "open_video_writer"]


#: codecs tried in order, by file suffix; the first is what browsers play, a later one a fallback.
#: What OpenCV 5.1's pip wheel (its bundled FFmpeg, avcodec 63.1) opens: VP80 and VP90 into .webm,
#: VP90 and mp4v into .mp4, MJPG into .avi; no H.264 encoder (avc1 / H264 do not open). VP9 costs
#: ~8x VP8's encoding time at 720p, so .webm is VP8.
VIDEO_CODECS: dict[str, tuple[str, ...]] = {
    ".webm": ("VP80", "VP90"),
    ".mkv": ("VP80", "VP90"),
    ".mp4": ("avc1", "mp4v"),
    ".m4v": ("avc1", "mp4v"),
    ".mov": ("avc1", "mp4v"),
    ".avi": ("MJPG",),
}
#: codecs browsers do not play (a warning names the alternative)
_NOT_FOR_BROWSERS = frozenset({"mp4v", "MJPG"})


def open_video_writer(path: Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    """A ``cv2.VideoWriter`` for ``path`` with the first codec of its suffix that this build opens.

    Logs the codec chosen (a warning when browsers cannot play it).

    Raises:
        OSError: no codec of the suffix opens (an unknown suffix, or a build without them).
    """
    codecs = VIDEO_CODECS.get(path.suffix.lower(), ("mp4v",))
    for codec in codecs:
        writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter.fourcc(*codec), fps, size)
        if writer.isOpened():
            if codec in _NOT_FOR_BROWSERS and codec != codecs[0]:
                log.warning(
                    "annotated video %s: no %s encoder in this OpenCV build; writing %s, which browsers "
                    "do not play (a .webm path gives VP8, which they do)",
                    path,
                    codecs[0],
                    codec,
                )
            else:
                log.info("annotated video %s: codec %s", path, codec)
            return writer
        writer.release()
    raise OSError(
        f"annotated video {path}: none of the codecs {', '.join(codecs)} opens in this OpenCV build"
    )


class AnnotatedVideoWriter:
    """Writes annotated frames of one source to a video file, in its own thread.

    The frame path only enqueues into a bounded queue; annotation and encoding happen in the writer
    thread. ``offer`` never waits (live sources: when the writer falls behind, frames are skipped and
    counted in ``skipped``); ``put`` waits for room (every-frame sources: the video has every frame).

    Args:
        path: output file; its suffix picks the codec (``video_codecs``): ``.webm`` VP8 (browsers
            play it), ``.mp4`` H.264 where the OpenCV build has an encoder, else ``mp4v`` with a
            warning (browsers do not play it), ``.avi`` MJPG.
        fps: the video's frame rate.
        class_names: names in class id order.
        max_queue: frames waiting for the writer at most.
    """

    def __init__(self, path: Path, fps: float, class_names: Sequence[str], max_queue: int = 16) -> None:
        self.path = path
        self.fps = fps
        self.class_names = list(class_names)
        self.written = 0
        self.skipped = 0
        self._queue: queue.Queue[tuple[np.ndarray, Detections | None] | None] = queue.Queue(max_queue)
        self._writer: cv2.VideoWriter | None = None
        self._thread = threading.Thread(target=self._run, name="recorder.annotated", daemon=True)
        self._thread.start()

    def try_put(self, image: np.ndarray, detections: Detections | None) -> bool:
        """Enqueue a frame if there is room; False (nothing counted) when the writer is behind."""
        try:
            self._queue.put_nowait((image, detections))
        except queue.Full:
            return False
        return True

    def offer(self, image: np.ndarray, detections: Detections | None) -> None:
        """Enqueue a frame, or skip it (counted in ``skipped``) when the writer is behind."""
        if not self.try_put(image, detections):
            self.skipped += 1

    def put(self, image: np.ndarray, detections: Detections | None) -> None:
        """Enqueue a frame, waiting for room (blocking: call it from a thread). For sources whose
        every frame is processed, so the video has every frame too; skipped only if the writer died."""
        while self._thread.is_alive():
            try:
                self._queue.put((image, detections), timeout=0.5)
                return
            except queue.Full:
                continue
        self.skipped += 1

    @property
    def full(self) -> bool:
        """The writer is behind: ``try_put`` would fail now."""
        return self._queue.full()

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued and release the file (blocking: call it from a thread)."""
        deadline = time.monotonic() + timeout
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=max(0.0, min(0.5, deadline - time.monotonic())))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    return
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            image, detections = item
            frame = annotate(image, detections, self.class_names) if detections is not None else image
            if self._writer is None:
                height, width = frame.shape[:2]
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._writer = open_video_writer(self.path, self.fps, (width, height))
                except OSError as exc:
                    log.error("%s; no annotated video", exc)
                    self.skipped += 1
                    while self._queue.get() is not None:  # keep taking frames: nobody waits on us
                        self.skipped += 1
                    return
            self._writer.write(frame)
            self.written += 1
        if self._writer is not None:
            self._writer.release()


class AnnotatedVideo:
    """The annotated video of one source, as a result observer.

    For a source whose every frame is processed (``waits``) the video gets every frame too: ``gate``
    (the publisher awaits it before each result) waits, in ``pool``, until the writer has room for
    the frame kept back when it was behind; for a live source a frame the writer has no room for is
    skipped and counted.

    Args:
        writer: the video writer (its thread is already running).
        source: the id of the source recorded.
        waits: every frame (True) or skip when behind (False).
        pool: where waiting for room and the final close happen (never on the event loop).
        close_timeout_s: the longest the final close may take.
    """

    def __init__(
        self,
        writer: AnnotatedVideoWriter,
        source: str,
        *,
        waits: bool,
        pool: BlockingPool,
        close_timeout_s: float = 30.0,
    ) -> None:
        self.writer = writer
        self.source = source
        self.waits = waits
        self._pool = pool
        self._close_timeout_s = close_timeout_s
        self._held: tuple[np.ndarray, Detections | None] | None = None

    def on_result(self, published: PublishedFrame) -> None:
        if published.frame.source_id != self.source:
            return
        image, detections = published.frame.image, published.detections
        if not self.waits:
            self.writer.offer(image, detections)
            return
        if self._held is None and self.writer.try_put(image, detections):
            return
        if self._held is not None:  # two results with no gate between them: the older one is lost
            self.writer.skipped += 1
        self._held = (image, detections)  # the gate hands it over before the next result

    async def gate(self) -> None:
        """Hand over the frame kept back, waiting (in the pool) for room: a thread hop only then."""
        if self._held is not None:
            image, detections = self._held
            self._held = None
            await self._pool.run(self.writer.put, image, detections)

    async def aclose(self) -> None:
        await self.gate()
        await self._pool.run(self.writer.close, self._close_timeout_s)
        self._pool.shutdown(wait=False)


@dataclass
class RunSummary:
    """Counts kept while a pipeline runs, printed when it ends."""

    started: float = field(default_factory=time.monotonic)
    frames: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    detections: Counter[str] = field(default_factory=Counter)
    model_seconds: float = 0.0
    postprocess_seconds: float = 0.0
    batches: int = 0
    #: ``(path, frames written, frames skipped)`` of the annotated video, once it is closed
    annotated: tuple[str, int, int] | None = None

    def on_result(self, published: PublishedFrame) -> None:
        """A result observer: frames per source and detections per class."""
        self.frames[published.frame.source_id] += 1
        if published.detections is not None:
            self.add_detections(published.detections, published.class_names)

    async def aclose(self) -> None:
        pass

    def add_batch(self, model_seconds: float, postprocess_seconds: float) -> None:
        self.batches += 1
        self.model_seconds += model_seconds
        self.postprocess_seconds += postprocess_seconds

    def add_detections(self, detections: Detections, class_names: Sequence[str]) -> None:
        for class_id in detections.class_id.tolist():
            self.detections[class_names[class_id]] += 1

    def to_dict(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        total = sum(self.frames.values())
        return {
            "frames": total,
            "frames_per_source": dict(self.frames),
            "errors": dict(self.errors),
            "detections_per_class": dict(sorted(self.detections.items())),
            "seconds": round(elapsed, 2),
            "fps": round(total / elapsed, 2) if elapsed > 0 else 0.0,
            "batches": self.batches,
            "model_ms_per_frame": round(1000 * self.model_seconds / total, 2) if total else None,
            "postprocess_ms_per_frame": round(1000 * self.postprocess_seconds / total, 2) if total else None,
            "annotated_video": (
                None
                if self.annotated is None
                else dict(zip(("path", "written", "skipped"), self.annotated, strict=True))
            ),
        }

    def render(self) -> str:
        d = self.to_dict()
        lines = [
            f"frames: {d['frames']} in {d['seconds']} s ({d['fps']} fps, {d['batches']} batches)",
            f"model: {d['model_ms_per_frame']} ms/frame, "
            f"post-processing: {d['postprocess_ms_per_frame']} ms/frame",
            "detections per class: "
            + (", ".join(f"{k}={v}" for k, v in d["detections_per_class"].items()) or "none"),
        ]
        if d["errors"]:
            lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in d["errors"].items()))
        if self.annotated is not None:
            path, written, skipped = self.annotated
            behind = f", {skipped} skipped (the writer fell behind)" if skipped else ""
            lines.append(f"annotated video: {path} ({written} frames{behind})")
        return "\n".join(lines)
