"""``segstream run`` as a real process: SIGTERM drains every frame that was read and exits 0 in time,
with ``/readyz`` turning 503 while it drains."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import http_get, make_models_dir, workflow_v4, write_video
from tests.support.messages import validate_line
from tests.support.waiting import wait_until_sync

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GRACE_S = 20.0


def _result_lines(path: Path) -> list[dict]:  # type: ignore[type-arg]
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    if lines and not path.read_text().endswith("\n"):
        lines = lines[:-1]  # a line being written
    return [doc for doc in map(validate_line, lines) if "outputs" in doc]


class ReadyzWatcher(threading.Thread):
    """Polls ``/readyz`` until the server is gone; keeps the sequence of distinct answers."""

    def __init__(self, port: int) -> None:
        super().__init__(name="readyz-watcher", daemon=True)
        self.port = port
        self.states: list[int | str] = []

    def run(self) -> None:
        while True:
            try:
                status, _ = http_get(self.port, "/readyz", timeout=2.0)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                self.states.append("gone")
                return
            if not self.states or self.states[-1] != status:
                self.states.append(status)
            time.sleep(0.005)


def test_sigterm_drains_every_read_frame_and_exits_zero(tmp_path: Path) -> None:
    # a file looped forever (only SIGTERM ends the run), every frame, and a model as slow as a real one
    # on a CPU (~0.1-0.2 s a frame): the queue is full and the reader waits for room when SIGTERM comes,
    # and draining the queue takes a while
    models = make_models_dir(tmp_path / "models", slow_channels=768)
    video = write_video(tmp_path / "clip.avi", frames=40)
    out = tmp_path / "out" / "predictions.jsonl"
    pipeline = {
        "name": "sigterm",
        "sources": [{"type": "video", "id": "belt", "url": str(video), "loop": True, "queue_size": 2}],
        "batching": {"max_batch_size": 1, "max_wait_ms": 0},
        "workflow": workflow_v4(),
        "sinks": [{"type": "jsonl", "path": str(out)}],
        "http": {"host": "127.0.0.1", "port": 0},
        "model": {"intra_op_threads": 1},
        "shutdown_grace_s": GRACE_S,
    }
    path = tmp_path / "sigterm.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run", str(path), "--models-dir", str(models)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=tmp_path,
        )
    try:
        match = wait_until_sync(
            lambda: re.search(r"http server listening on 127\.0\.0\.1:(\d+)", stderr_path.read_text()),
            "the HTTP server's port",
        )
        port = int(match.group(1))
        wait_until_sync(lambda: http_get(port, "/readyz")[0] == 200, "/readyz 200")
        assert http_get(port, "/healthz")[0] == 200
        wait_until_sync(lambda: len(_result_lines(out)) >= 3, "the first results")
        watcher = ReadyzWatcher(port)
        watcher.start()
        wait_until_sync(lambda: watcher.states, "a first /readyz answer")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=GRACE_S + 10)
        took = time.monotonic() - signalled
        watcher.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = stderr_path.read_text()
    assert code == 0, log[-3000:]
    assert took < GRACE_S, f"exit took {took:.1f} s"
    # ready, then not ready while draining, then gone
    assert watcher.states[0] == 200 and watcher.states[-1] == "gone", watcher.states
    assert 503 in watcher.states, watcher.states

    totals = re.search(r"source belt: received=(\d+) processed=(\d+) dropped=(\d+)", log)
    assert totals is not None, log[-3000:]
    received, processed, dropped = map(int, totals.groups())
    results = _result_lines(out)
    assert out.read_text().endswith("\n")
    assert (received, processed, dropped) == (len(results), len(results), 0), log[-3000:]
    assert [r["frame_number"] for r in results] == list(range(received))
    assert received >= 3 + 2  # what was written before SIGTERM, and a full queue
    assert "stop requested" in log
