"""What ``segstream run`` prints: JSON and nothing else in JSON-log mode, the start-up and source lines.

Each run is a real ``python -m worker.cli run <file>`` process on a short clip with the test model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.helpers import CLASSES, MODEL_ID, workflow_v4, write_video
from tests.support.waiting import wait_until
from worker.queues import FrameQueue
from worker.sources.video import VideoSource, VideoSourceConfig
from worker.telemetry import NullTelemetry

pytestmark = [pytest.mark.integration]

FRAMES = 6


def _pipeline(tmp_path: Path, models_dir: Path, **changes: Any) -> Path:
    doc: dict[str, Any] = {
        "name": "output",
        "sources": [{"type": "video", "id": "file", "url": str(write_video(tmp_path / "clip.avi", FRAMES))}],
        "workflow": workflow_v4(),
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "out" / "predictions.jsonl")}],
        "model": {"models_dir": str(models_dir), "intra_op_threads": 1},
        "http": {"host": "127.0.0.1", "port": 0},
        **changes,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(path: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=path.parent,
        timeout=120,
        check=False,
    )


def test_json_mode_prints_nothing_but_json_and_the_summary_is_one_record(
    tmp_path: Path, models_dir: Path
) -> None:
    proc = _run(_pipeline(tmp_path, models_dir, log_format="json", print_summary=True))
    stderr = proc.stderr.decode().splitlines()
    assert proc.returncode == 0, stderr
    assert proc.stdout == b""
    records = [json.loads(line) for line in stderr]  # fails on any line that is not JSON
    assert all(isinstance(r, dict) and {"ts", "level", "logger", "msg"} <= r.keys() for r in records)

    summaries = [r for r in records if r["msg"] == "run summary"]
    assert len(summaries) == 1, stderr
    summary = summaries[0]["summary"]
    assert summary["frames"] == FRAMES and summary["frames_per_source"] == {"file": FRAMES}
    assert set(summary["detections_per_class"]) <= set(CLASSES) and summary["detections_per_class"]

    (model,) = [r for r in records if r["msg"].startswith(f"model {MODEL_ID}:")]
    assert model["backend"] == "onnxruntime" and "CPUExecutionProvider" in model["providers"]
    assert "input 64x64" in model["msg"] and f"{len(CLASSES)} classes ({', '.join(CLASSES)})" in model["msg"]

    connected = [r for r in records if r["msg"].startswith("source file: connected to ")]
    assert len(connected) == 1 and f"{FRAMES} frames" in connected[0]["msg"], stderr


def test_text_mode_prints_the_summary_as_text(tmp_path: Path, models_dir: Path) -> None:
    proc = _run(_pipeline(tmp_path, models_dir, print_summary=True))
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert f"frames: {FRAMES} in " in stderr and "detections per class: " in stderr
    assert "run summary" not in stderr


class _Reconnects(NullTelemetry):
    def __init__(self) -> None:
        self.count = 0

    def reconnect(self, target: str) -> None:
        self.count += 1


async def test_a_source_logs_connected_lost_and_reconnected_once_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A looping file removed while it is read, then put back: one line when it first opens, one for
    the outage (however many retries), one when it opens again; none at each loop's reopening."""
    clip = write_video(tmp_path / "clip.avi", FRAMES)
    config = VideoSourceConfig(
        type="video", id="cam", url=str(clip), loop=True, reconnect_min_s=0.01, reconnect_max_s=0.05
    )
    telemetry = _Reconnects()
    source = VideoSource(config, telemetry=telemetry)
    queue = FrameQueue("cam", 1, "latest")  # never full: the reader loops freely
    caplog.set_level(logging.INFO, logger="worker.sources")

    def said(text: str) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name.startswith("worker.sources") and text in r.getMessage()
        ]

    task = asyncio.create_task(source.run(queue))
    try:
        await wait_until(lambda: said("source cam: connected to"), "the first open")
        hidden = clip.rename(tmp_path / "hidden.avi")  # the next reopening, at the loop's end, fails
        await wait_until(lambda: telemetry.count >= 3, "three reconnect attempts")
        hidden.rename(clip)
        await wait_until(lambda: said("reconnected to"), "the reconnection")
    finally:
        await source.stop()
        await asyncio.wait_for(task, timeout=30)
    assert len(said(": connected to")) == 1 and f"{FRAMES} frames" in said(": connected to")[0]
    lost = said("cannot open")
    assert len(lost) == 1 and "source_unavailable" in lost[0] and str(clip) in lost[0], lost
    assert len(said("reconnected to")) == 1
    assert source.expected_frames is None  # a looping file has no end


async def test_a_file_read_once_knows_its_length(tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.avi", FRAMES)
    source = VideoSource(VideoSourceConfig(type="video", id="f", url=str(clip)))
    queue = FrameQueue("f", FRAMES + 1, "every_frame")
    await asyncio.wait_for(source.run(queue), timeout=30)
    assert source.expected_frames == FRAMES


def _run_on_a_terminal(path: Path) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal; what the terminal received (``\\r\\n`` line ends)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=path.parent,
        )
        os.close(slave)
        slave = -1
        received = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal's last writer
                break
            if not chunk:
                break
            received += chunk
        code = proc.wait(timeout=120)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return code, received.decode()


def test_run_draws_progress_on_a_terminal(tmp_path: Path, models_dir: Path) -> None:
    code, text = _run_on_a_terminal(_pipeline(tmp_path, models_dir))
    assert code == 0, text
    lines = text.split("\r\n")
    final = [line for line in lines if "progress: " in line]
    assert final, text
    # the last state, drawn in place (\r, erase) and ended with a newline: every frame done
    assert final[-1].rpartition("\r\x1b[K")[2].startswith(f"progress: {FRAMES}/{FRAMES} frames (100%), ")
    assert final[-1].endswith("ETA 0:00")


def test_no_progress_in_json_mode_even_on_a_terminal(tmp_path: Path, models_dir: Path) -> None:
    code, text = _run_on_a_terminal(_pipeline(tmp_path, models_dir, log_format="json", print_summary=True))
    assert code == 0, text
    assert "progress: " not in text and "\x1b[K" not in text
    records = [json.loads(line) for line in text.split("\r\n") if line]  # nothing but JSON
    assert any(r["msg"] == "run summary" for r in records)
