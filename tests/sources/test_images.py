"""ImageFolderSource: sorted files, corrupt/oversized files reported and skipped, EOF, loop, pacing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.sources.conftest import Consumer, ErrorSink, running
from tests.support.waiting import wait_until
from worker.queues import FrameQueue
from worker.sources.images import ImageFolderSource, ImageFolderSourceConfig
from worker.telemetry import RecordingTelemetry


def fill(folder: Path, names: list[str], size: tuple[int, int] = (8, 6)) -> None:
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        img = np.full((size[1], size[0], 3), 20 * (i + 1), np.uint8)
        ok, buf = cv2.imencode(Path(name).suffix, img)
        assert ok
        (folder / name).write_bytes(buf.tobytes())


async def test_reads_sorted_reports_bad_files_and_closes(tmp_path: Path, errors: ErrorSink) -> None:
    folder = tmp_path / "imgs"
    fill(folder, ["b.png", "a.jpg", "d.png"])
    (folder / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    fill(folder, ["e_big.png"], size=(200, 100))
    (folder / "notes.txt").write_text("ignored")
    telemetry = RecordingTelemetry()
    cfg = ImageFolderSourceConfig(id="imgs", path=folder, max_image_pixels=10_000)
    source = ImageFolderSource(cfg, telemetry=telemetry, on_error=errors, pipeline="p")
    queue = FrameQueue("imgs", 1, "every_frame")
    consumer = Consumer(queue, delay=0.005)
    await asyncio.wait_for(asyncio.gather(source.run(queue), consumer.run()), 30)
    assert queue.closed
    # a.jpg, b.png, d.png in name order; c.jpg (corrupt) and e_big.png (too many pixels) skipped
    assert [f.frame_number for f in consumer.frames] == [0, 1, 3]
    assert [round(float(f.image.mean())) for f in consumer.frames][1:] == [20, 60]
    assert [(r.reason, r.frame_number) for r in errors.reports] == [("decode_error", 2), ("oversize", 4)]
    assert "c.jpg" in errors.reports[0].message and "e_big.png" in errors.reports[1].message
    assert telemetry.dropped == {("imgs", "decode_error"): 1, ("imgs", "oversize"): 1}
    assert telemetry.received["imgs"] == 5  # the bad files were read too: received = queued + dropped


async def test_loop_and_fps_pacing(tmp_path: Path) -> None:
    fill(tmp_path / "f", ["1.png", "2.png"])
    cfg = ImageFolderSourceConfig(id="loop", path=tmp_path / "f", loop=True, fps=40)
    source = ImageFolderSource(cfg)
    queue = FrameQueue("loop", 2, "every_frame")
    started = time.monotonic()
    async with running(source, queue) as consumer:
        await wait_until(lambda: len(consumer.frames) >= 9, what="9 frames")
    assert time.monotonic() - started >= 8 / 40 - 0.02
    assert [round(float(f.image.mean())) for f in consumer.frames[:4]] == [20, 40, 20, 40]
    assert queue.closed


async def test_empty_folder_is_reported_and_ends(tmp_path: Path, errors: ErrorSink) -> None:
    (tmp_path / "empty").mkdir()
    source = ImageFolderSource(ImageFolderSourceConfig(id="e", path=tmp_path / "empty"), on_error=errors)
    queue = FrameQueue("e", 1, "every_frame")
    await asyncio.wait_for(source.run(queue), 10)
    assert queue.closed and errors.reasons() == ["source_unavailable"]


def test_config_rejects_unknown_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Extra inputs"):
        ImageFolderSourceConfig.model_validate({"id": "x", "path": str(tmp_path), "recursive": True})
