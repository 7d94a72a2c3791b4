"""The ready remote pipelines validate, and a whole worker runs with the remote backend.

The ``--no-models`` checks need no server. With Triton up, ``segstream validate`` loads the model
through the server (its metadata checked at start-up) and ``segstream run`` processes a folder of the
demo clip's frames end to end: every frame's result line is written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import pytest
import yaml

from tests.support.mosquitto import free_port
from tests.support.servers import ServerProcess
from worker.models.evaluation import iter_frames
from worker.supervisor import EXIT_UNDELIVERED

REPO = Path(__file__).resolve().parents[2]
CLIP = REPO / "worker" / "assets" / "demo_clip.mp4"
PIPELINES = ["remote-kserve.yaml", "remote-roboflow.yaml"]


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    environment = os.environ | {"PYTHONPATH": str(REPO)} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize("name", PIPELINES)
def test_the_remote_pipelines_validate(name: str) -> None:
    # the examples name their deployment's folders and secrets: check the files, not this machine
    result = _cli("validate", "--no-models", "--no-environment", str(REPO / "pipelines" / name))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stderr


def test_validate_loads_the_model_through_the_server(triton: ServerProcess) -> None:
    result = _cli(
        "validate",
        str(REPO / "pipelines" / "remote-kserve.yaml"),
        env={"SEGSTREAM_INFERENCE_URL": triton.url},
    )
    assert result.returncode == 0, result.stderr
    assert "valid (models: factory-parts/1)" in result.stderr


def test_a_worker_runs_the_demo_frames_through_the_server(triton: ServerProcess, tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, image in enumerate(iter_frames(CLIP, every=25, limit=6)):
        cv2.imwrite(str(frames / f"{i:03d}.png"), image)
    pipeline = yaml.safe_load((REPO / "pipelines" / "remote-kserve.yaml").read_text())
    pipeline["sources"] = [{"type": "images", "id": "belt", "path": str(frames)}]  # every_frame
    pipeline["sinks"] = [{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}]
    pipeline["http"] = {"enabled": False}
    pipeline["model"]["url"] = triton.url
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    result = _cli("run", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    results = [
        line for line in lines if line.get("kind", "result") == "result" and "predictions" in str(line)
    ]
    assert len(results) == 6
    assert sorted(line["frame_number"] for line in results) == list(range(6))


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _poll(condition: Callable[[], bool], what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_worker_holds_every_frame_through_a_server_outage(
    fresh_triton: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Triton killed mid-stream and restarted: not ready meanwhile, then every frame's result once."""
    server = fresh_triton()
    frames = tmp_path / "frames"
    frames.mkdir()
    count = 20
    for i, image in enumerate(iter_frames(CLIP, every=10, limit=count)):
        cv2.imwrite(str(frames / f"{i:03d}.png"), image)
    port = free_port()
    out = tmp_path / "out.jsonl"
    pipeline = yaml.safe_load((REPO / "pipelines" / "remote-kserve.yaml").read_text())
    pipeline["sources"] = [{"type": "images", "id": "belt", "path": str(frames), "fps": 4}]  # every_frame
    pipeline["sinks"] = [{"type": "jsonl", "path": str(out)}]
    pipeline["http"] = {"host": "127.0.0.1", "port": port}
    pipeline["model"] |= {"url": server.url, "timeout_s": 30, "breaker_failures": 1}
    pipeline["model"]["probe_interval_s"] = [0.1, 0.5]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    environment = os.environ | {"PYTHONPATH": str(REPO)}
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run", str(path)],
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:

        def results() -> list[dict[str, Any]]:
            if not out.exists():
                return []
            lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
            return [line for line in lines if "frame_number" in line and "error" not in line]

        _poll(lambda: len(results()) >= 3, "the first results")
        server.kill()  # SIGKILL, mid-stream
        available = 'segstream_remote_available{server="' + server.url + '"} 0.0'
        _poll(lambda: available in _get(f"http://127.0.0.1:{port}/metrics")[1], "the breaker to open")
        assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 503  # readiness follows the server
        assert worker.poll() is None  # the worker waits; it did not crash
        server.restart()
        assert worker.wait(300) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(30)
    numbers = sorted(line["frame_number"] for line in results())
    assert numbers == list(range(count))  # every frame, once


def test_sigterm_while_frames_wait_for_a_dead_server_exits_after_the_grace_time(
    fresh_triton: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = fresh_triton()
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, image in enumerate(iter_frames(CLIP, every=10, limit=12)):
        cv2.imwrite(str(frames / f"{i:03d}.png"), image)
    port = free_port()
    out = tmp_path / "out.jsonl"
    pipeline = yaml.safe_load((REPO / "pipelines" / "remote-kserve.yaml").read_text())
    pipeline["sources"] = [{"type": "images", "id": "belt", "path": str(frames), "fps": 4}]
    pipeline["sinks"] = [{"type": "jsonl", "path": str(out)}]
    pipeline["http"] = {"host": "127.0.0.1", "port": port}
    pipeline["model"] |= {"url": server.url, "breaker_failures": 1}
    pipeline["shutdown_grace_s"] = 2
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run", str(path)],
            cwd=tmp_path,
            env=os.environ | {"PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        _poll(lambda: out.exists() and len(out.read_text().splitlines()) >= 2, "the first results")
        server.kill()  # for good
        available = 'segstream_remote_available{server="' + server.url + '"} 0.0'
        _poll(lambda: available in _get(f"http://127.0.0.1:{port}/metrics")[1], "the breaker to open")
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(120)  # the held batch does not keep the process alive
        except subprocess.TimeoutExpired:
            worker.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack into the log
            worker.wait(30)
            raise AssertionError((tmp_path / "worker.log").read_text()[-8000:]) from None
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(30)
    log_text = (tmp_path / "worker.log").read_text()
    assert code == EXIT_UNDELIVERED, log_text[-3000:]  # the held frame never finished
    assert "inference_error=1" in log_text, log_text[-3000:]  # and was answered with an error report


def _metric(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text ``text`` (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and line.split("}")[0] == f"{name}{{{want}":
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_server_outage_parks_every_frame_frames_without_stalling_a_live_source(
    fresh_triton: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Whole worker, one model thread, Triton killed mid-stream and restarted.

    ``belt`` (every_frame) is parked out of the model pool while the server is down; the live ``cam``
    keeps flowing meanwhile (its frames are dropped and counted as ``server_unavailable``: progress,
    not a stall); after the restart every belt frame's result comes out exactly once and cam gets
    results again.
    """
    server = fresh_triton()
    frames = tmp_path / "frames"
    frames.mkdir()
    count = 20
    for i, image in enumerate(iter_frames(CLIP, every=10, limit=count)):
        cv2.imwrite(str(frames / f"{i:03d}.png"), image)
    port = free_port()
    out = tmp_path / "out.jsonl"
    pipeline = yaml.safe_load((REPO / "pipelines" / "remote-kserve.yaml").read_text())
    pipeline["sources"] = [
        {"type": "images", "id": "belt", "path": str(frames), "fps": 4, "queue_size": 2},  # every_frame
        {"type": "images", "id": "cam", "path": str(frames), "fps": 8, "loop": True, "policy": "latest"},
    ]
    pipeline["inference_threads"] = 1  # a frame waiting inside the model pool would stall cam
    pipeline["sinks"] = [{"type": "jsonl", "path": str(out)}]
    pipeline["http"] = {"host": "127.0.0.1", "port": port}
    pipeline["model"] |= {"url": server.url, "timeout_s": 30, "breaker_failures": 1}
    pipeline["model"]["probe_interval_s"] = [0.1, 0.5]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    log_path = tmp_path / "worker.log"
    environment = os.environ | {"PYTHONPATH": str(REPO)}
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run", str(path)],
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )

    def lines() -> list[dict[str, Any]]:
        if not out.exists():
            return []
        return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]

    def results(source: str) -> list[dict[str, Any]]:
        return [line for line in lines() if line.get("source") == source and line.get("kind") == "result"]

    def cam_dropped() -> float:
        text = _get(f"http://127.0.0.1:{port}/metrics")[1]
        return _metric(text, "segstream_frames_dropped_total", source="cam", reason="server_unavailable")

    try:
        _poll(lambda: len(results("belt")) >= 3 and len(results("cam")) >= 1, "the first results")
        server.kill()  # SIGKILL, mid-stream
        available = 'segstream_remote_available{server="' + server.url + '"} 0.0'
        _poll(lambda: available in _get(f"http://127.0.0.1:{port}/metrics")[1], "the breaker to open")
        before = cam_dropped()
        _poll(lambda: cam_dropped() >= before + 5, "cam to go on while belt waits for the server")
        assert worker.poll() is None
        belt_during = len(results("belt"))
        server.restart()
        _poll(lambda: len(results("belt")) >= count, "every belt frame after the restart", timeout=300)
        cam_after = len(results("cam"))
        _poll(lambda: len(results("cam")) > cam_after, "cam's results after the restart")
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(120)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(30)
    assert code == 0, log_path.read_text()[-3000:]
    assert belt_during < count  # the outage did hold belt back
    assert "source belt: frames parked" in log_path.read_text()
    numbers = [line["frame_number"] for line in results("belt")]
    assert sorted(numbers) == list(range(count))  # every frame, exactly once
    assert numbers == sorted(numbers)  # and in the source's order
    belt_errors = [line for line in lines() if line.get("source") == "belt" and line.get("kind") != "result"]
    assert belt_errors == []  # belt's frames were held, never dropped
