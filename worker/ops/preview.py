"""The live preview hub: the latest frame and detections per source, kept only while someone watches.

No HTTP here: ``worker.ops.preview_routes`` serves the hub, and the page itself is package data,
``worker/ops/preview.html`` (``preview_page()``).

The runtime calls ``offer`` for every processed frame. While no viewer is connected ``offer`` only
updates a frame-rate estimate and returns: nothing is copied, annotated or encoded, so a closed preview
page costs nothing. While a viewer is connected (a WebSocket from the page, or a snapshot request in the
last few seconds) ``offer`` keeps a reference to the newest frame; annotation and JPEG encoding happen
lazily, in one named thread, when a viewer asks, at most ``max_fps`` times per second per source, and
one encoding is shared by all viewers.

Example:
    >>> hub = PreviewHub(max_fps=5)
    >>> hub.set_sources(["cam1"])
    >>> hub.wants("cam1")
    False
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

from worker.annotate import DetectionsLike, annotate, fit_width
from worker.concurrency import BlockingPool

__all__ = ["EncodedFrame", "PreviewHub", "SourcePreviewStats", "preview_page"]


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """One annotated JPEG of a source."""

    source: str
    seq: int
    jpeg: bytes
    width: int
    height: int
    detections: int


@dataclass(frozen=True, slots=True)
class SourcePreviewStats:
    """What the preview page shows per source besides the image."""

    source: str
    fps: float
    latency_s: float | None
    frames: int
    seq: int


@dataclass(slots=True)
class _Slot:
    seq: int = 0
    image: npt.NDArray[np.uint8] | None = None
    detections: DetectionsLike | None = None
    class_names: Sequence[str] = ()
    offered: int = 0
    last_offer: float = -math.inf
    fps: float = 0.0
    latency_s: float | None = None
    lease_until: float = -math.inf
    encoded: EncodedFrame | None = None
    encoded_at: float = -math.inf
    encoding: asyncio.Future[EncodedFrame | None] | None = field(default=None, repr=False)


class PreviewHub:
    """Latest frame + detections per source, annotated and JPEG-encoded on demand.

    Args:
        enabled: a disabled hub never wants frames (``/`` then says the preview is off).
        max_fps: most annotated frames per second per source.
        max_width: frames wider than this are downscaled before encoding.
        jpeg_quality: 1..100.
        lease_s: how long a snapshot request counts as a viewer.
        clock: monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        max_fps: float = 5.0,
        max_width: int = 960,
        jpeg_quality: int = 75,
        lease_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < max_fps <= 60:
            raise ValueError(f"max_fps must be in (0, 60], got {max_fps}")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
        if max_width < 16:
            raise ValueError(f"max_width must be >= 16, got {max_width}")
        self.enabled = enabled
        self.max_fps = max_fps
        self.max_width = max_width
        self.jpeg_quality = jpeg_quality
        self.lease_s = lease_s
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._viewers = 0
        self._pool: BlockingPool | None = None

    # -- producer side (runtime) ---------------------------------------------------------------------

    def set_sources(self, sources: Iterable[str]) -> None:
        """Declare the pipeline's sources so the page lists them before their first frame."""
        with self._lock:
            for source in sources:
                self._slots.setdefault(source, _Slot())

    def sources(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def wants(self, source: str) -> bool:
        """True only while a viewer is connected (the caller may skip building the offer otherwise)."""
        if not self.enabled:
            return False
        if self._viewers > 0:
            return True
        slot = self._slots.get(source)
        return slot is not None and self._clock() < slot.lease_until

    def offer(
        self,
        source: str,
        image: npt.NDArray[np.uint8],
        detections: DetectionsLike | None,
        class_names: Sequence[str],
        *,
        latency_s: float | None = None,
    ) -> None:
        """Report a processed frame. Keeps a reference to it only while someone watches.

        ``image`` and ``detections`` must not be modified afterwards (the runtime hands over frames it
        no longer touches). Thread-safe; never blocks on encoding.
        """
        now = self._clock()
        with self._lock:
            slot = self._slots.get(source)
            if slot is None:
                slot = self._slots[source] = _Slot()
            dt = now - slot.last_offer
            if dt > 0 and math.isfinite(dt):
                inst = 1.0 / dt
                # EWMA over about 1 s of frames; a long gap resets it.
                alpha = min(1.0, dt) if dt < 5.0 else 1.0
                slot.fps = inst if slot.offered == 0 else slot.fps + alpha * (inst - slot.fps)
            slot.last_offer = now
            slot.offered += 1
            if latency_s is not None:
                slot.latency_s = (
                    latency_s if slot.latency_s is None else 0.8 * slot.latency_s + 0.2 * latency_s
                )
            if not self.enabled or not (self._viewers > 0 or now < slot.lease_until):
                if slot.image is not None:  # release memory once nobody watches
                    slot.image, slot.detections, slot.encoded = None, None, None
                return
            slot.seq += 1
            slot.image = image
            slot.detections = detections
            slot.class_names = class_names

    # -- viewer side (HTTP handlers) -----------------------------------------------------------------

    @contextlib.contextmanager
    def viewer(self) -> Iterator[None]:
        """Count a connected viewer (the page's WebSocket) for as long as the block runs."""
        with self._lock:
            self._viewers += 1
        try:
            yield
        finally:
            with self._lock:
                self._viewers -= 1

    @property
    def viewers(self) -> int:
        return self._viewers

    def touch(self, source: str) -> None:
        """A snapshot request: count as a viewer of ``source`` for ``lease_s`` seconds."""
        with self._lock:
            slot = self._slots.get(source)
            if slot is not None:
                slot.lease_until = self._clock() + self.lease_s

    def stats(self) -> list[SourcePreviewStats]:
        now = self._clock()
        with self._lock:
            return [
                SourcePreviewStats(
                    source=source,
                    # a source that went quiet shows 0 fps rather than its last rate
                    fps=slot.fps if now - slot.last_offer < max(2.0, 3.0 / max(slot.fps, 1e-6)) else 0.0,
                    latency_s=slot.latency_s,
                    frames=slot.offered,
                    seq=slot.seq,
                )
                for source, slot in self._slots.items()
            ]

    def latest_seq(self, source: str) -> int:
        slot = self._slots.get(source)
        return 0 if slot is None or slot.image is None else slot.seq

    async def frame(self, source: str) -> EncodedFrame | None:
        """The newest annotated JPEG of ``source`` (None before its first watched frame).

        Re-encodes at most ``max_fps`` times per second; concurrent callers share one encoding.
        """
        slot = self._slots.get(source)
        if slot is None:
            return None
        while True:
            if slot.encoding is not None:
                await asyncio.wait({slot.encoding})  # shared encoding; never cancels it, never raises
                continue
            with self._lock:
                image, dets, names, seq = slot.image, slot.detections, slot.class_names, slot.seq
            if image is None:
                return slot.encoded
            if slot.encoded is not None and slot.encoded.seq == seq:
                return slot.encoded
            wait = slot.encoded_at + 1.0 / self.max_fps - self._clock()
            if slot.encoded is not None and wait > 0:
                return slot.encoded  # rate limit: the caller polls again later
            break
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[EncodedFrame | None] = loop.create_future()
        slot.encoding = fut
        try:
            encoded = await self._pool_run(self._render, source, seq, image, dets, names)
            slot.encoded, slot.encoded_at = encoded, self._clock()
            fut.set_result(encoded)
            return encoded
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-check the slot instead of re-raising
            raise
        finally:
            slot.encoding = None

    async def _pool_run(self, func: Callable[..., EncodedFrame], *args: object) -> EncodedFrame:
        if self._pool is None:
            self._pool = BlockingPool("preview", 1)
        return await self._pool.run(func, *args)

    def _render(
        self,
        source: str,
        seq: int,
        image: npt.NDArray[np.uint8],
        detections: DetectionsLike | None,
        class_names: Sequence[str],
    ) -> EncodedFrame:
        drawn = image if detections is None else annotate(image, detections, class_names)
        drawn = fit_width(drawn, self.max_width)
        ok, buf = cv2.imencode(".jpg", drawn, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for source {source!r}")
        return EncodedFrame(
            source=source,
            seq=seq,
            jpeg=buf.tobytes(),
            width=int(drawn.shape[1]),
            height=int(drawn.shape[0]),
            detections=0 if detections is None else len(detections),
        )

    def close(self) -> None:
        """Stop the encoding thread (the runtime calls this on shutdown)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


@functools.cache
def preview_page() -> bytes:
    """The page served at ``/`` (``worker/ops/preview.html``, package data): one tile per source,
    frames pushed over one WebSocket, stats once a second; source ids are inserted as text only."""
    return importlib.resources.files("worker.ops").joinpath("preview.html").read_bytes()
