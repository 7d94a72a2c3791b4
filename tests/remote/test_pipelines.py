"""The ready remote pipelines validate, and a whole worker runs with the remote backend.

The ``--no-models`` checks need no server. With Triton up, ``segstream validate`` loads the model
through the server (its metadata checked at start-up) and ``segstream run`` processes a folder of the
demo clip's frames end to end: every frame's result line is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import yaml

from tests.support.servers import ServerProcess
from worker.models.evaluation import iter_frames

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
    result = _cli("validate", "--no-models", str(REPO / "pipelines" / name))
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
