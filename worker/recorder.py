"""Optional outputs of a run besides the sinks: an annotated video and a run summary."""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from worker.annotate import annotate
from worker.step.detections import Detections

__all__ = ["AnnotatedVideoWriter", "RunSummary"]


class AnnotatedVideoWriter:
    """Writes annotated frames of one source to a video file, in its own thread.

    The frame path only enqueues into a bounded queue; annotation and encoding happen in the writer
    thread. ``offer`` never waits (live sources: when the writer falls behind, frames are skipped and
    counted in ``skipped``); ``put`` waits for room (every-frame sources: the video has every frame).

    Args:
        path: output file (``.mp4`` is written with the ``mp4v`` codec, ``.avi`` with MJPG).
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

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            image, detections = item
            frame = annotate(image, detections, self.class_names) if detections is not None else image
            if self._writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fourcc = cv2.VideoWriter.fourcc(*("MJPG" if self.path.suffix == ".avi" else "mp4v"))
                height, width = frame.shape[:2]
                self._writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (width, height))
            self._writer.write(frame)
            self.written += 1
        if self._writer is not None:
            self._writer.release()


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
