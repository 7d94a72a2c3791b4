"""received = processed + dropped + skipped: faults and policy skips kept apart, end to end and per stage.

A real Worker (the test model, a MemorySink) runs three finite sources to their end: a video file read
with a ``max_fps`` so low that every frame after the first is skipped by policy, a video file under the
``latest`` policy with a one-frame queue (stale frames may be replaced, depending on speed: whatever
happens, the totals must add up), and an image folder with one undecodable file (a fault). At unit level a
``latest`` FrameQueue replaces frames as a ``stale`` skip, never as a drop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.integration.helpers import (
    make_models_dir,
    metric_value,
    parse_metrics,
    pipeline_config,
    write_video,
)
from worker.frame import Frame
from worker.queues import FrameQueue
from worker.runtime import Worker
from worker.sinks.memory import MemorySink
from worker.telemetry import RecordingTelemetry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FRAMES = 12


async def test_every_frame_read_is_processed_dropped_or_skipped(tmp_path: Path) -> None:
    models = make_models_dir(tmp_path / "models")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), np.full((48, 64, 3), 40 * i, np.uint8))
    (images / "3_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    config = pipeline_config(
        "identity",
        sources=[
            # 0.001 fps: the first frame is emitted, every later one is read and skipped (max_fps)
            {
                "type": "video",
                "id": "paced",
                "url": str(write_video(tmp_path / "a.avi", FRAMES)),
                "max_fps": 0.001,
            },
            {
                "type": "video",
                "id": "latest",
                "url": str(write_video(tmp_path / "b.avi", FRAMES)),
                "policy": "latest",
                "queue_size": 1,
            },
            {"type": "images", "id": "folder", "path": str(images), "pattern": "*.png"},
        ],
        sinks=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}],
        models_dir=models,
        http={"enabled": False},
    )
    memory = MemorySink()
    worker = await Worker.create(config, extra_sinks=[memory])
    code = await asyncio.wait_for(worker.run(), timeout=90)
    assert code == 0

    totals = worker.metrics.snapshot()
    scrape = parse_metrics(worker.metrics.render()[0].decode())
    for source in ("paced", "latest", "folder"):
        t = totals[source]
        assert t.received == t.processed + t.dropped + t.skipped, (source, t)
        # the scrape says the same, series by series
        received = metric_value(scrape, "segstream_frames_received_total", source=source)
        processed = metric_value(scrape, "segstream_frames_processed_total", source=source)
        dropped = metric_value(scrape, "segstream_frames_dropped_total", source=source)
        skipped = metric_value(scrape, "segstream_frames_skipped_total", source=source)
        assert (received, processed, dropped, skipped) == (t.received, t.processed, t.dropped, t.skipped)
    paced = totals["paced"]
    assert (paced.received, paced.processed, paced.dropped) == (FRAMES, 1, 0)
    assert (
        metric_value(scrape, "segstream_frames_skipped_total", source="paced", reason="max_fps") == FRAMES - 1
    )
    latest = totals["latest"]
    assert latest.received == FRAMES and latest.dropped == 0 and latest.processed >= 1
    assert (
        metric_value(scrape, "segstream_frames_skipped_total", source="latest", reason="stale")
        == latest.skipped
    )
    folder = totals["folder"]
    assert (folder.received, folder.processed, folder.skipped) == (4, 3, 0)
    assert metric_value(scrape, "segstream_frames_dropped_total", source="folder", reason="decode_error") == 1
    # every processed frame reached the sink, and the fault was reported there too
    assert memory.results_total == sum(t.processed for t in totals.values())
    assert [r.reason for r in memory.errors] == ["decode_error"]


def _frame(n: int) -> Frame:
    return Frame(source_id="cam", frame_number=n, timestamp=0.0, image=np.zeros((2, 2, 3), np.uint8))


async def test_a_latest_queue_replacing_a_frame_is_a_stale_skip_not_a_drop() -> None:
    telemetry = RecordingTelemetry()
    queue = FrameQueue("cam", 2, "latest", telemetry)
    for n in range(5):
        telemetry.frame_received("cam")
        await queue.put(_frame(n))
    assert telemetry.skipped == {("cam", "stale"): 3} and not telemetry.dropped
    taken = [queue.get_nowait(), queue.get_nowait()]
    assert [f.frame_number for f in taken if f is not None] == [3, 4]  # the freshest stay
    telemetry.frames_processed("cam", 2)
    assert telemetry.accounted("cam") == telemetry.received["cam"] == 5


def test_recording_telemetry_refuses_an_undeclared_reason() -> None:
    telemetry = RecordingTelemetry()
    with pytest.raises(ValueError, match="not one of"):
        telemetry.frame_dropped("cam", "stale")  # type: ignore[arg-type]  # a skip, not a fault
    with pytest.raises(ValueError, match="not one of"):
        telemetry.frame_skipped("cam", "decode_error")  # type: ignore[arg-type]
