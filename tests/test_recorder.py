"""The run summary and the annotated video writer."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from worker.concurrency import BlockingPool
from worker.frame import Frame
from worker.messages import FrameResult
from worker.publisher import PublishedFrame
from worker.recorder import AnnotatedVideo, AnnotatedVideoWriter, RunSummary
from worker.step.detections import Detections, MaskCrops

NAMES = ("nut", "washer", "bolt")


@pytest.fixture
def held_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[AnnotatedVideoWriter, threading.Event]:
    """A writer with room for 2 frames whose thread starts writing only once the event is set."""
    gate = threading.Event()
    original = AnnotatedVideoWriter._run

    def held(self: AnnotatedVideoWriter) -> None:
        gate.wait(10)
        original(self)

    monkeypatch.setattr(AnnotatedVideoWriter, "_run", held)
    return AnnotatedVideoWriter(tmp_path / "a.avi", 25.0, NAMES, max_queue=2), gate


def _detections(shape: tuple[int, int] = (48, 64)) -> Detections:
    crop = np.ones((8, 10), bool)
    return Detections(
        xyxy=np.array([[4, 6, 14, 14], [30, 20, 40, 28]], np.float32),
        confidence=np.array([0.9, 0.5], np.float32),
        class_id=np.array([2, 0]),
        masks=MaskCrops([crop, crop], [[4, 6], [30, 20]]),
        frame_shape=shape,
    )


def test_summary_counts_and_renders() -> None:
    summary = RunSummary()
    summary.frames["cam"] += 3
    summary.batches = 2
    summary.model_seconds = 0.03
    summary.add_detections(_detections(), NAMES)
    summary.add_detections(_detections(), NAMES)
    summary.errors["decode_error"] += 1
    summary.annotated = ("out/a.mp4", 3, 1)
    d = summary.to_dict()
    assert d["frames"] == 3 and d["batches"] == 2 and d["model_ms_per_frame"] == 10.0
    assert d["detections_per_class"] == {"bolt": 2, "nut": 2}
    assert d["annotated_video"] == {"path": "out/a.mp4", "written": 3, "skipped": 1}
    text = summary.render()
    assert text.startswith("frames: 3 in ") and "(" in text and "2 batches" in text
    assert "detections per class: bolt=2, nut=2" in text
    assert "errors: decode_error=1" in text
    assert "annotated video: out/a.mp4 (3 frames, 1 skipped (the writer fell behind))" in text


def test_summary_of_an_empty_run() -> None:
    d = RunSummary().to_dict()
    assert d["frames"] == 0 and d["model_ms_per_frame"] is None and d["annotated_video"] is None
    assert "detections per class: none" in RunSummary().render()


def test_writer_writes_every_frame_it_is_offered(tmp_path: Path) -> None:
    path = tmp_path / "video" / "annotated.avi"
    writer = AnnotatedVideoWriter(path, 25.0, NAMES)
    image = np.full((48, 64, 3), 90, np.uint8)
    for i in range(6):
        writer.offer(image, _detections() if i % 2 else None)
    writer.close()
    assert (writer.written, writer.skipped) == (6, 0)
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == 6 and frames[0].shape == (48, 64, 3)
    # frames with detections carry drawings, the others are the plain image
    assert np.abs(frames[1].astype(int) - 90).max() > 60
    assert np.abs(frames[0].astype(int) - 90).max() < 30


def test_writer_skips_and_counts_when_it_falls_behind(
    held_writer: tuple[AnnotatedVideoWriter, threading.Event],
) -> None:
    writer, gate = held_writer
    image = np.zeros((48, 64, 3), np.uint8)
    for _ in range(5):
        writer.offer(image, None)
    gate.set()
    writer.close()
    assert (writer.written, writer.skipped) == (2, 3)


def test_try_put_reports_a_full_queue_without_counting(
    held_writer: tuple[AnnotatedVideoWriter, threading.Event],
) -> None:
    writer, gate = held_writer
    image = np.zeros((48, 64, 3), np.uint8)
    assert [writer.try_put(image, None) for _ in range(3)] == [True, True, False]
    gate.set()
    writer.close()
    assert (writer.written, writer.skipped) == (2, 0)


def test_put_waits_for_room_instead_of_skipping(
    held_writer: tuple[AnnotatedVideoWriter, threading.Event],
) -> None:
    writer, gate = held_writer
    image = np.zeros((48, 64, 3), np.uint8)
    putter = threading.Thread(target=lambda: [writer.put(image, None) for _ in range(5)])
    putter.start()
    putter.join(0.3)
    assert putter.is_alive()  # waiting for room, not skipping
    gate.set()
    putter.join(10)
    writer.close()
    assert (writer.written, writer.skipped) == (5, 0)


def _published(image: np.ndarray, source: str = "belt", n: int = 0) -> PublishedFrame:
    frame = Frame(source, n, 0.0, image)
    result = FrameResult("p", source, n, frame.frame_id, 0.0, "seg", None, None, {})
    return PublishedFrame(frame, result, None, NAMES, 0.0)


async def test_annotated_video_of_an_every_frame_source_waits_for_the_writer(
    held_writer: tuple[AnnotatedVideoWriter, threading.Event],
) -> None:
    writer, gate = held_writer  # room for 2 frames, not writing yet
    video = AnnotatedVideo(writer, "belt", waits=True, pool=BlockingPool("recorder", 1))
    image = np.zeros((48, 64, 3), np.uint8)

    async def publish() -> None:
        for n in range(5):
            await video.gate()  # what the publisher does before each result
            video.on_result(_published(image, n=n))
            video.on_result(_published(image, source="other", n=n))  # not recorded

    feeding = asyncio.create_task(publish())
    gate.set()  # the writer starts; whatever the interleaving, no frame may be skipped
    await feeding
    await video.aclose()
    assert (writer.written, writer.skipped) == (5, 0)


async def test_annotated_video_of_a_live_source_skips_when_the_writer_is_behind(
    held_writer: tuple[AnnotatedVideoWriter, threading.Event],
) -> None:
    writer, gate = held_writer
    video = AnnotatedVideo(writer, "belt", waits=False, pool=BlockingPool("recorder", 1))
    image = np.zeros((48, 64, 3), np.uint8)
    for n in range(5):
        await video.gate()
        video.on_result(_published(image, n=n))
    gate.set()
    await video.aclose()
    assert (writer.written, writer.skipped) == (2, 3)


def test_summary_counts_published_frames_per_source() -> None:
    summary = RunSummary()
    image = np.zeros((4, 4, 3), np.uint8)
    for source in ("a", "b", "a"):
        summary.on_result(_published(image, source=source))
    summary.add_batch(0.5, 0.25)
    assert summary.frames == {"a": 2, "b": 1}
    assert (summary.batches, summary.model_seconds, summary.postprocess_seconds) == (1, 0.5, 0.25)


def _codec_and_frames(path: Path) -> tuple[str, int]:
    cap = cv2.VideoCapture(str(path))
    codec = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode()
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    return codec, count


def test_a_webm_path_gives_vp8_which_browsers_play(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="worker.recorder")
    writer = AnnotatedVideoWriter(tmp_path / "annotated.webm", 25.0, NAMES)
    for _ in range(5):
        writer.offer(np.full((48, 64, 3), 90, np.uint8), _detections())
    writer.close()
    assert (writer.written, writer.skipped) == (5, 0)
    assert _codec_and_frames(tmp_path / "annotated.webm") == ("VP80", 5)
    assert "codec VP80" in caplog.text and not [r for r in caplog.records if r.levelname == "WARNING"]


def test_an_mp4_path_uses_h264_if_the_build_has_it_else_mp4v_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    probe = cv2.VideoWriter(
        str(tmp_path / "probe.mp4"), cv2.CAP_FFMPEG, cv2.VideoWriter.fourcc(*"avc1"), 25, (64, 48)
    )
    has_h264 = probe.isOpened()
    probe.release()
    writer = AnnotatedVideoWriter(tmp_path / "annotated.mp4", 25.0, NAMES)
    for _ in range(3):
        writer.offer(np.full((48, 64, 3), 90, np.uint8), None)
    writer.close()
    codec, frames = _codec_and_frames(tmp_path / "annotated.mp4")
    assert frames == 3
    if has_h264:
        assert codec in ("avc1", "h264", "H264") and "browsers do not play" not in caplog.text
    else:
        assert codec == "FMP4"  # how FFmpeg reads back the mp4v tag
        assert "no avc1 encoder" in caplog.text and ".webm" in caplog.text


def test_a_suffix_without_a_working_codec_is_an_error_not_a_dead_thread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = AnnotatedVideoWriter(tmp_path / "annotated.xyz", 25.0, NAMES)  # no container FFmpeg knows
    for _ in range(3):
        writer.put(np.full((48, 64, 3), 90, np.uint8), None)
    writer.close()
    assert (writer.written, writer.skipped) == (0, 3)
    assert "none of the codecs mp4v opens" in caplog.text
