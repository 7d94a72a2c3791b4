"""VideoSource: files (every_frame, EOF, loop, pacing) and a real RTSP server (reconnect, timeouts)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from tests.sources.conftest import Consumer, ErrorSink, running
from tests.support.rtsp import RtspServer
from tests.support.waiting import wait_until
from worker.queues import FrameQueue
from worker.sources.video import FFMPEG_OPTIONS_ENV, VideoSource, VideoSourceConfig, ensure_rtsp_over_tcp
from worker.telemetry import RecordingTelemetry


def write_clip(path: Path, n: int, size: tuple[int, int] = (64, 48), fps: float = 20.0) -> Path:
    """An MJPEG AVI whose frame i is uniformly grey at level 10 + 20 * i (mod 240)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((size[1], size[0], 3), 10 + (20 * i) % 240, np.uint8))
    writer.release()
    return path


def reader_threads(source_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"source[{source_id}].reader"]


# ---- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "policy", "error"),
    [
        ({"url": "rtsp://10.0.0.5/stream"}, "latest", None),
        ({"url": "http://cam/mjpg"}, "latest", None),
        ({"url": "/data/clip.mp4"}, "every_frame", None),
        ({"url": "/data/clip.mp4", "policy": "latest"}, "latest", None),
        ({"url": "rtsp://cam/s", "loop": True}, None, "files only"),
        ({"url": "rtsp://cam/s", "read_timeout_s": 5, "watchdog_s": 4}, None, "watchdog_s"),
        ({"url": "/c.mp4", "reconnect_min_s": 5, "reconnect_max_s": 1}, None, "reconnect_min_s"),
        ({"url": "/c.mp4", "fps": 3}, None, "Extra inputs"),
        ({"url": "/c.mp4", "id": "bad/id"}, None, "pattern"),
    ],
)
def test_config(data: dict[str, object], policy: str | None, error: str | None) -> None:
    data = {"id": "cam1", **data}
    if error:
        with pytest.raises(ValidationError, match=error):
            VideoSourceConfig.model_validate(data)
    else:
        assert VideoSourceConfig.model_validate(data).policy == policy


def test_rtsp_over_tcp_is_added_to_the_operators_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FFMPEG_OPTIONS_ENV, raising=False)
    assert ensure_rtsp_over_tcp() == "rtsp_transport;tcp"
    monkeypatch.setenv(FFMPEG_OPTIONS_ENV, "probesize;32768")
    assert ensure_rtsp_over_tcp() == "probesize;32768|rtsp_transport;tcp"
    assert os.environ[FFMPEG_OPTIONS_ENV] == "probesize;32768|rtsp_transport;tcp"
    monkeypatch.setenv(FFMPEG_OPTIONS_ENV, "rtsp_transport;udp")
    assert ensure_rtsp_over_tcp() == "rtsp_transport;udp"  # the operator's explicit choice wins


# ---- files ------------------------------------------------------------------------------------------


async def test_file_every_frame_reads_all_frames_in_order_and_closes(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.avi", 12)
    telemetry = RecordingTelemetry()
    source = VideoSource(VideoSourceConfig(id="file", url=str(clip)), telemetry=telemetry)
    queue = FrameQueue("file", 2, "every_frame", telemetry)
    consumer = Consumer(queue, delay=0.01)  # slower than the reader: backpressure, no drop
    await asyncio.wait_for(asyncio.gather(source.run(queue), consumer.run()), 30)
    assert queue.closed
    assert [f.frame_number for f in consumer.frames] == list(range(12))
    levels = [float(f.image.mean()) for f in consumer.frames]
    assert levels == sorted(levels) and levels[-1] - levels[0] > 150
    assert consumer.frames[0].image.shape == (48, 64, 3) and consumer.frames[0].frame_id == "file:0"
    assert consumer.max_depth <= 2
    assert telemetry.received["file"] == 12 and not telemetry.dropped
    assert not reader_threads("file")


async def test_file_loop_goes_on_until_stopped(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.avi", 5)
    source = VideoSource(VideoSourceConfig(id="loop", url=str(clip), loop=True))
    queue = FrameQueue("loop", 4, "every_frame")
    async with running(source, queue) as consumer:
        await wait_until(lambda: len(consumer.frames) >= 12, what="three passes")
    numbers = [f.frame_number for f in consumer.frames]
    assert numbers == list(range(len(numbers)))
    # frame 5 is the first frame again
    assert abs(consumer.frames[5].image.mean() - consumer.frames[0].image.mean()) < 3
    assert queue.closed and not reader_threads("loop")


async def test_realtime_paces_at_the_files_fps(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.avi", 10, fps=20.0)
    source = VideoSource(VideoSourceConfig(id="rt", url=str(clip), realtime=True))
    queue = FrameQueue("rt", 16, "every_frame")
    consumer = Consumer(queue)
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(source.run(queue), consumer.run()), 30)
    assert len(consumer.frames) == 10
    assert time.monotonic() - started >= 9 / 20.0 - 0.02  # frame 9 is due 0.45 s after frame 0


async def test_max_fps_skips_frames_and_counts_them(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.avi", 10, fps=20.0)
    telemetry = RecordingTelemetry()
    cfg = VideoSourceConfig(id="cap", url=str(clip), realtime=True, max_fps=5)
    source = VideoSource(cfg, telemetry=telemetry)
    queue = FrameQueue("cap", 16, "every_frame")
    consumer = Consumer(queue)
    await asyncio.wait_for(asyncio.gather(source.run(queue), consumer.run()), 30)
    # 0.5 s of video at 5 fps: frames 0, 4, 8 (±1 for scheduling jitter)
    assert 2 <= len(consumer.frames) <= 4
    # every frame is read (received); those above max_fps are policy skips, not faults
    assert telemetry.skipped[("cap", "max_fps")] == 10 - len(consumer.frames) and not telemetry.dropped
    assert telemetry.received["cap"] == 10 == telemetry.accounted("cap") + len(consumer.frames)


async def test_missing_file_is_reported_once_and_retried_until_stopped(
    tmp_path: Path, errors: ErrorSink
) -> None:
    telemetry = RecordingTelemetry()
    cfg = VideoSourceConfig(
        id="nofile", url=str(tmp_path / "missing.mp4"), reconnect_min_s=0.02, reconnect_max_s=0.05
    )
    source = VideoSource(cfg, telemetry=telemetry, on_error=errors, pipeline="p")
    queue = FrameQueue("nofile", 2, "every_frame")
    async with running(source, queue):
        await wait_until(lambda: telemetry.reconnects["source:nofile"] >= 3, what="retries")
    assert errors.reasons() == ["source_unavailable"]
    assert errors.reports[0].pipeline == "p" and "missing.mp4" in errors.reports[0].message
    assert queue.closed and not reader_threads("nofile")


async def test_cancelling_run_joins_the_reader_under_backpressure(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.avi", 20)
    source = VideoSource(VideoSourceConfig(id="bp", url=str(clip)))
    queue = FrameQueue("bp", 1, "every_frame")  # nobody consumes: the reader waits for room
    task = asyncio.create_task(source.run(queue))
    await wait_until(lambda: len(queue) == 1, what="a queued frame")
    await asyncio.sleep(0.1)
    assert len(reader_threads("bp")) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert queue.closed and not reader_threads("bp")


# ---- a real RTSP server -----------------------------------------------------------------------------


def rtsp_config(source_id: str, url: str, **kw: object) -> VideoSourceConfig:
    defaults: dict[str, object] = {
        "open_timeout_s": 5.0,
        "read_timeout_s": 2.0,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
    }
    return VideoSourceConfig(id=source_id, url=url, **{**defaults, **kw})


@pytest.mark.integration
async def test_rtsp_frames_are_read(rtsp_servers: Callable[..., RtspServer]) -> None:
    server = rtsp_servers(path="/cam1")
    telemetry = RecordingTelemetry()
    source = VideoSource(rtsp_config("cam1", server.url), telemetry=telemetry)
    queue = FrameQueue("cam1", 2, "latest", telemetry)
    async with running(source, queue) as consumer:
        await wait_until(lambda: len(consumer.frames) >= 10, what="10 frames")
        assert telemetry.connected["cam1"] is True
    assert consumer.frames[0].image.shape == (120, 160, 3)
    numbers = [f.frame_number for f in consumer.frames]
    assert numbers == sorted(numbers)
    assert "rtsp_transport;tcp" in os.environ[FFMPEG_OPTIONS_ENV]
    assert telemetry.connected["cam1"] is False and not reader_threads("cam1")


@pytest.mark.integration
async def test_rtsp_camera_killed_and_restarted_reconnects_while_another_keeps_running(
    rtsp_servers: Callable[..., RtspServer], errors: ErrorSink
) -> None:
    cam_a, cam_b = rtsp_servers(path="/a"), rtsp_servers(path="/b")
    telemetry = RecordingTelemetry()
    src_a = VideoSource(rtsp_config("a", cam_a.url), telemetry=telemetry, on_error=errors)
    src_b = VideoSource(rtsp_config("b", cam_b.url), telemetry=telemetry, on_error=errors)
    q_a, q_b = FrameQueue("a", 2, "latest", telemetry), FrameQueue("b", 2, "latest", telemetry)
    async with running(src_a, q_a) as got_a, running(src_b, q_b) as got_b:
        await wait_until(lambda: len(got_a.frames) >= 5 and len(got_b.frames) >= 5, what="both cameras")
        cam_a.kill()
        await wait_until(lambda: telemetry.reconnects["source:a"] >= 1, what="camera a's outage noticed")
        a_during, b_during = telemetry.received["a"], len(got_b.frames)
        await wait_until(lambda: len(got_b.frames) >= b_during + 10, what="camera b going on alone")
        assert telemetry.received["a"] == a_during  # nothing read from a while it is down
        cam_a.start()  # same port
        await wait_until(lambda: telemetry.received["a"] >= a_during + 5, what="camera a back")
        await wait_until(lambda: got_a.frames[-1].frame_number >= a_during + 4, what="its frames queued")
    assert errors.reasons() == ["source_unavailable"] and errors.reports[0].source_id == "a"
    assert telemetry.reconnects["source:b"] == 0
    numbers = [f.frame_number for f in got_a.frames]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


@pytest.mark.integration
async def test_rtsp_frozen_camera_hits_the_read_timeout_and_recovers(
    rtsp_servers: Callable[..., RtspServer], errors: ErrorSink
) -> None:
    server = rtsp_servers(path="/frozen")
    telemetry = RecordingTelemetry()
    cfg = rtsp_config("frozen", server.url, read_timeout_s=1.0, open_timeout_s=1.5)
    source = VideoSource(cfg, telemetry=telemetry, on_error=errors)
    queue = FrameQueue("frozen", 2, "latest", telemetry)
    async with running(source, queue) as consumer:
        await wait_until(lambda: len(consumer.frames) >= 3, what="first frames")
        server.pause()  # TCP stays up, nothing is sent: only the read timeout notices
        try:
            await wait_until(lambda: telemetry.reconnects["source:frozen"] >= 1, what="read timeout")
        finally:
            server.resume()
        before = len(consumer.frames)
        await wait_until(lambda: len(consumer.frames) >= before + 3, what="frames after the freeze")
    assert "source_unavailable" in errors.reasons()


class HangingFirstOpen(VideoSource):
    """A capture whose first open hangs past every FFmpeg timeout (as a wedged driver can)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.release_hang = threading.Event()
        self.opens = 0

    def _open(self, ctx):  # type: ignore[no-untyped-def]
        self.opens += 1
        if self.opens == 1:
            with ctx.busy():
                self.release_hang.wait(30)
            return None
        return super()._open(ctx)


async def test_watchdog_abandons_a_hung_reader_and_starts_a_fresh_one(
    tmp_path: Path, errors: ErrorSink
) -> None:
    clip = write_clip(tmp_path / "clip.avi", 6)
    telemetry = RecordingTelemetry()
    cfg = VideoSourceConfig(id="hung", url=str(clip), open_timeout_s=0.2, read_timeout_s=0.2, watchdog_s=0.6)
    source = HangingFirstOpen(cfg, telemetry=telemetry, on_error=errors)
    queue = FrameQueue("hung", 8, "every_frame")
    consumer = Consumer(queue)
    await asyncio.wait_for(asyncio.gather(source.run(queue), consumer.run()), 30)
    assert [f.frame_number for f in consumer.frames] == list(range(6))  # from the second reader
    assert errors.reasons() == ["source_stalled"] and telemetry.reconnects["source:hung"] == 1
    assert len(reader_threads("hung")) == 1  # the abandoned one is still stuck
    source.release_hang.set()
    await wait_until(lambda: not reader_threads("hung"), what="the abandoned reader to exit")
    assert len(consumer.frames) == 6  # it handed nothing over after being abandoned


DEMO_CLIP = Path(__file__).resolve().parents[2] / "worker" / "assets" / "demo_clip.mp4"


@pytest.mark.integration
@pytest.mark.skipif(not DEMO_CLIP.exists(), reason="demo clip not built")
async def test_rtsp_serving_the_demo_clip(rtsp_servers: Callable[..., RtspServer]) -> None:
    server = rtsp_servers(path="/clip", file=DEMO_CLIP)
    reference = cv2.VideoCapture(str(DEMO_CLIP))
    size = (int(reference.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(reference.get(cv2.CAP_PROP_FRAME_WIDTH)))
    reference.release()
    source = VideoSource(rtsp_config("clip", server.url))
    queue = FrameQueue("clip", 4, "latest")
    async with running(source, queue) as consumer:
        await wait_until(lambda: len(consumer.frames) >= 5, what="clip frames over RTSP")
    assert consumer.frames[0].image.shape[:2] == size
