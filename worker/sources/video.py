"""RTSP / HTTP cameras and video files through OpenCV's FFmpeg backend, one reader thread per source.

Each capture is opened with ``cv2.CAP_PROP_OPEN_TIMEOUT_MSEC`` and ``cv2.CAP_PROP_READ_TIMEOUT_MSEC``
so neither a dead camera nor a silent one blocks the reader forever. A read that fails on a live
source (or a capture that does not open) closes the capture and reconnects with capped, jittered
exponential backoff; the first failure of an outage is reported once on the error topic, every retry
counts ``reconnects_total{target="source:<id>"}``. A watchdog on the event loop notices a reader stuck
*inside* a capture call longer than ``watchdog_s`` (a hang the FFmpeg timeouts did not catch),
abandons that thread (it exits, releasing its capture, whenever the call returns) and starts a fresh
one, so one bad camera never stalls the others.

RTSP over TCP. OpenCV reads FFmpeg options from the *process-wide* environment variable
``OPENCV_FFMPEG_CAPTURE_OPTIONS`` (``key;value|key;value``) when a capture opens; there is no
per-capture way to pass them. Before each open segstream makes sure the variable contains
``rtsp_transport;tcp``, appending it to whatever the operator set (so operators can add e.g.
``analyzeduration;500000|probesize;65536`` for faster start-up, for all cameras of the process). All
segstream RTSP sources therefore use TCP; the option is ignored by other protocols and by files.

Files: ``every_frame`` by default (nothing dropped, the reader waits for the batcher); end of file
closes the queue unless ``loop: true``; ``realtime: true`` paces reading at the file's fps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from typing import Any, Literal
from urllib.parse import urlsplit

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from worker.frame import Frame
from worker.queues import FramePolicy, FrameQueue
from worker.sources.base import Backoff, ErrorCallback
from worker.sources.reader import ReaderContext, ReaderThread
from worker.telemetry import NullTelemetry, Telemetry

__all__ = ["FFMPEG_OPTIONS_ENV", "LIVE_SCHEMES", "VideoSource", "VideoSourceConfig", "ensure_rtsp_over_tcp"]

log = logging.getLogger(__name__)

FFMPEG_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
#: URL schemes of live streams (``latest`` by default, reconnect on read failure)
LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt"})
SOURCE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: frames per second assumed when a file does not say (pacing only)
_FALLBACK_FPS = 25.0
#: how many abandoned (hung) reader threads may linger before no new one is started
_MAX_ABANDONED = 2

_env_lock = threading.Lock()


def ensure_rtsp_over_tcp() -> str:
    """Make ``OPENCV_FFMPEG_CAPTURE_OPTIONS`` ask for RTSP over TCP, keeping the operator's options.

    Returns:
        The value now in the environment.
    """
    with _env_lock:
        current = os.environ.get(FFMPEG_OPTIONS_ENV, "")
        keys = {item.split(";", 1)[0].strip() for item in current.split("|") if item.strip()}
        if "rtsp_transport" not in keys:
            current = f"{current}|rtsp_transport;tcp" if current.strip() else "rtsp_transport;tcp"
            os.environ[FFMPEG_OPTIONS_ENV] = current
        return current


class VideoSourceConfig(BaseModel):
    """An RTSP/HTTP camera or a video file (anything FFmpeg opens).

    ``policy`` defaults to ``latest`` for live URLs and ``every_frame`` for files.
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["video"] = "video"
    id: str = Field(pattern=SOURCE_ID_PATTERN, description="source id (metric label, topic part)")
    url: str = Field(min_length=1, description="rtsp://, http(s)://, or a file path")
    policy: FramePolicy | None = None
    queue_size: int = Field(4, ge=1, le=4096)
    open_timeout_s: float = Field(10.0, gt=0, le=300)
    read_timeout_s: float = Field(5.0, gt=0, le=300)
    watchdog_s: float | None = Field(
        None, gt=0, le=3600, description="a capture call running longer than this is abandoned"
    )
    reconnect_min_s: float = Field(0.5, gt=0, le=600)
    reconnect_max_s: float = Field(30.0, gt=0, le=3600)
    loop: bool = Field(False, description="files: start again at the end instead of closing")
    realtime: bool = Field(False, description="files: read at the file's fps, like a camera")
    max_fps: float | None = Field(None, gt=0, le=1000, description="skip frames above this rate")

    @property
    def is_live(self) -> bool:
        """True for network streams, False for files."""
        return urlsplit(self.url).scheme.lower() in LIVE_SCHEMES

    @model_validator(mode="after")
    def _defaults_and_checks(self) -> VideoSourceConfig:
        if self.policy is None:
            self.policy = "latest" if self.is_live else "every_frame"
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must be <= reconnect_max_s")
        slowest = max(self.open_timeout_s, self.read_timeout_s)
        if self.watchdog_s is None:
            self.watchdog_s = slowest + 10.0
        elif self.watchdog_s <= slowest:
            raise ValueError(
                f"watchdog_s ({self.watchdog_s}) must exceed open_timeout_s and read_timeout_s ({slowest})"
            )
        if self.is_live and (self.loop or self.realtime):
            raise ValueError("loop and realtime apply to files only, not to live streams")
        return self


class VideoSource:
    """Reads one camera or video file in a thread named ``source[<id>].reader``."""

    def __init__(
        self,
        config: VideoSourceConfig,
        *,
        telemetry: Telemetry | None = None,
        on_error: ErrorCallback | None = None,
        pipeline: str = "",
    ) -> None:
        self.config = config
        self.telemetry: Telemetry = telemetry or NullTelemetry()
        self.on_error = on_error
        self.pipeline = pipeline
        self._frame_number = 0
        #: frames this source will deliver where known (a file read once, from its container), else None
        self.expected_frames: int | None = None
        # state-change log lines (kept across reader threads: a watchdog restart is a reconnect too)
        self._up = False  # "connected" / "reconnected" logged, no outage reported since
        self._ever_up = False
        self._down_since = 0.0  # monotonic, when the outage began
        self._stop_requested = asyncio.Event()
        self._abandoned: list[ReaderThread] = []

    @property
    def source_id(self) -> str:
        return self.config.id

    async def stop(self) -> None:
        self._stop_requested.set()

    async def run(self, queue: FrameQueue) -> None:
        loop = asyncio.get_running_loop()
        reader: ReaderThread | None = None
        join_timeout = self.config.open_timeout_s + self.config.read_timeout_s + 2.0
        try:
            while not self._stop_requested.is_set():
                self._abandoned = [t for t in self._abandoned if t.is_alive()]
                if len(self._abandoned) >= _MAX_ABANDONED:
                    await self._sleep_unless_stopped(1.0)
                    continue
                ctx = ReaderContext(self.source_id, self.pipeline, queue, loop, self.telemetry, self.on_error)
                reader = ReaderThread(ctx, self._produce)
                reader.start()
                if await self._supervise(reader):
                    reader.finished.result()  # re-raise a bug from the thread
                    return
                if self._stop_requested.is_set():
                    reader = None  # _supervise already waited for it
                    return
                # stuck inside a capture call: leave it, start a fresh reader
                ctx.stop.set()
                self._abandoned.append(reader)
                reader = None
                ctx.report(
                    "source_stalled",
                    f"reader stuck in a capture call for over {self.config.watchdog_s}s; restarting it",
                )
                if self._up:
                    self._up, self._down_since = False, time.monotonic()
                self.telemetry.reconnect(f"source:{self.source_id}")
        finally:
            if reader is not None and not reader.finished.done():
                await asyncio.shield(reader.stop_and_join(join_timeout))
            queue.close()
            self.telemetry.source_connected(self.source_id, False)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_requested.wait(), timeout=seconds)

    async def _supervise(self, reader: ReaderThread) -> bool:
        """Wait until the reader ends (True) or is stuck / asked to stop (False)."""
        watchdog_s = self.config.watchdog_s or 0.0
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(self._stop_requested.wait())
        waiters: set[asyncio.Future[Any]] = {reader.finished, stop_wait}
        try:
            while True:
                done, _ = await asyncio.wait(waiters, timeout=0.5)
                if reader.finished in done:
                    return True
                if stop_wait in done:
                    await reader.stop_and_join(self.config.open_timeout_s + self.config.read_timeout_s + 2.0)
                    return reader.finished.done()
                if reader.ctx.busy_for() > watchdog_s:
                    return False
        finally:
            stop_wait.cancel()

    # ---- the reader thread ------------------------------------------------------------------------

    def _open(self, ctx: ReaderContext) -> cv2.VideoCapture | None:
        if urlsplit(self.config.url).scheme.lower() in ("rtsp", "rtsps"):
            ensure_rtsp_over_tcp()
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(self.config.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(self.config.read_timeout_s * 1000),
        ]
        with ctx.busy():
            cap = cv2.VideoCapture(self.config.url, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def _produce(self, ctx: ReaderContext) -> None:
        cfg = self.config
        backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
        outage_reported = False
        while not ctx.stopping:
            cap = self._open(ctx)
            if ctx.stopping:
                if cap is not None:
                    cap.release()
                return
            if cap is None:
                outcome = "unavailable"
            else:
                self._announce(cap)
                self.telemetry.source_connected(self.source_id, True)
                try:
                    outcome, frames = self._read_pass(ctx, cap)
                finally:
                    cap.release()
                    self.telemetry.source_connected(self.source_id, False)
                if frames:
                    backoff.reset()
                    outage_reported = False
                if outcome in ("stopped", "closed"):
                    return
                if outcome == "eof":
                    if not cfg.loop:
                        log.info("source %s: end of file after frame %d", self.source_id, self._frame_number)
                        return
                    if frames:
                        continue
                    outcome = "empty"  # a file with no readable frame would loop forever: back off
            if not outage_reported:
                what = {
                    "unavailable": "cannot open",
                    "lost": "lost the stream of",
                    "empty": "no frame could be read from",
                }[outcome]
                ctx.report("source_unavailable", f"{what} {self._safe_url()}; retrying with backoff")
                outage_reported = True
                if self._up or not self._ever_up:
                    self._down_since = time.monotonic()
                self._up = False
            self.telemetry.reconnect(f"source:{self.source_id}")
            if ctx.wait(backoff.next_delay()) or ctx.wait(backoff.pace()):  # pace: the attempt-rate floor
                return

    def _announce(self, cap: cv2.VideoCapture) -> None:
        """One log line when the source comes up: the first time, and again after each outage."""
        if self._up:
            return  # a looping file reopened at its end, not a state change
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = cap.get(cv2.CAP_PROP_FPS)
        what = f"{width}x{height}, {fps:.1f} fps" if 0 < fps <= 1000 else f"{width}x{height}"
        if not self.config.is_live:
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            if count > 0:
                what += f", {count} frames"
                if not self.config.loop and self.expected_frames is None:
                    self.expected_frames = count
        if self._ever_up:
            down = time.monotonic() - self._down_since
            log.info(
                "source %s: reconnected to %s after %.1f s (%s)", self.source_id, self._safe_url(), down, what
            )
        else:
            log.info("source %s: connected to %s (%s)", self.source_id, self._safe_url(), what)
        self._up = self._ever_up = True

    def _read_pass(self, ctx: ReaderContext, cap: cv2.VideoCapture) -> tuple[str, int]:
        """Read until the stream fails, the file ends, or the reader must stop.

        Returns:
            (outcome, frames handed over): outcome is ``eof`` (file end), ``lost`` (live read failed),
            ``stopped`` or ``closed`` (queue closed).
        """
        cfg = self.config
        fail = "lost" if cfg.is_live else "eof"
        fps = cap.get(cv2.CAP_PROP_FPS)
        if not (0 < fps <= 1000):
            fps = _FALLBACK_FPS
        min_interval = 1.0 / cfg.max_fps if cfg.max_fps else 0.0
        started = time.monotonic()
        position = 0  # frames read in this pass (pacing)
        handed = 0
        last_emit = float("-inf")
        while not ctx.stopping:
            if cfg.realtime and ctx.wait(started + position / fps - time.monotonic()):
                break
            if min_interval and time.monotonic() - last_emit < min_interval:
                with ctx.busy():
                    ok = cap.grab()
                if not ok:
                    return fail, handed
                position += 1
                # read from the source, then skipped by policy: received = processed + dropped + skipped
                self.telemetry.frame_received(self.source_id)
                self.telemetry.frame_skipped(self.source_id, "max_fps")
                continue
            with ctx.busy():
                ok, image = cap.read()
            if not ok or image is None:
                return fail, handed
            position += 1
            if ctx.stopping:
                break
            frame = Frame(
                source_id=self.source_id,
                frame_number=self._frame_number,
                timestamp=time.time(),
                image=_as_bgr(image),
            )
            self._frame_number += 1
            self.telemetry.frame_received(self.source_id)
            last_emit = time.monotonic()
            if not ctx.put(frame):
                return ("closed" if ctx.handover.closed else "stopped"), handed
            handed += 1
        return "stopped", handed

    def _safe_url(self) -> str:
        """The URL without credentials (``rtsp://user:pass@cam`` → ``rtsp://cam``), for messages."""
        parts = urlsplit(self.config.url)
        if parts.password is None and parts.username is None:
            return self.config.url
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return parts._replace(netloc=netloc).geturl()


def _as_bgr(image: np.ndarray) -> np.ndarray:
    """OpenCV returns BGR uint8 for almost every stream; convert the rare gray/BGRA/16-bit frame."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.convertScaleAbs(image)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image
