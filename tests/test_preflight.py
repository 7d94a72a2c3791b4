"""Start-up problems: ``validate`` lists them, ``run`` says so in one line and exits non-zero at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.helpers import workflow_v4
from worker.cli import main
from worker.config import PipelineConfig
from worker.preflight import problems

REPO = Path(__file__).resolve().parents[1]


def pipeline(**parts: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "pre",
        "sources": [{"type": "images", "id": "imgs", "path": str(REPO)}],
        "workflow": workflow_v4(),
        "sinks": [{"type": "stdout"}],
    }
    doc.update(parts)
    return doc


def check(doc: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    return problems(PipelineConfig.model_validate(doc), environ or {})


def test_a_clean_pipeline_has_no_problem() -> None:
    assert check(pipeline()) == []


def test_a_named_password_variable_that_is_not_set() -> None:
    doc = pipeline(broker={"host": "127.0.0.1", "password_env": "LINE_PW"}, sinks=[{"type": "mqtt"}])
    (problem,) = check(doc)
    assert "$LINE_PW" in problem and "not set" in problem
    assert check(doc, {"LINE_PW": "s3cret"}) == []


def test_a_username_without_any_password() -> None:
    doc = pipeline(broker={"host": "127.0.0.1", "username": "seg"}, sinks=[{"type": "mqtt"}])
    (problem,) = check(doc)
    assert "SEGSTREAM_MQTT_PASSWORD" in problem and "'seg'" in problem
    assert check(doc, {"SEGSTREAM_MQTT_PASSWORD": "x"}) == []


def test_a_password_file_or_tls_file_that_is_not_there(tmp_path: Path) -> None:
    broker = {
        "host": "h",
        "password_file": str(tmp_path / "pw"),
        "tls": {"ca_certs": str(tmp_path / "ca.pem")},
    }
    found = check(pipeline(broker=broker, sinks=[{"type": "mqtt"}]))
    assert len(found) == 2 and "password_file" in found[0] and "tls.ca_certs" in found[1]


def test_mqtt_without_a_broker_and_missing_files(tmp_path: Path) -> None:
    doc = pipeline(
        sources=[
            {"type": "video", "id": "clip", "url": str(tmp_path / "clip.mp4")},
            {"type": "images", "id": "imgs", "path": str(tmp_path / "nothing")},
            {"type": "video", "id": "cam", "url": "rtsp://10.0.0.9/unreachable"},  # live: retried, fine
        ],
        sinks=[{"type": "mqtt"}],
    )
    found = check(doc)
    assert any("'mqtt'" in p and "no broker" in p for p in found), found
    assert any("'clip'" in p and "does not exist" in p for p in found), found
    assert any("'imgs'" in p and "not a folder" in p for p in found), found
    assert not any("'cam'" in p for p in found)


def test_validate_lists_the_problems_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SEGSTREAM_MQTT_PASSWORD", raising=False)
    path = tmp_path / "p.yaml"
    doc = pipeline(broker={"host": "127.0.0.1", "username": "seg"}, sinks=[{"type": "mqtt"}])
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path), "--no-models"]) == 1
    assert "SEGSTREAM_MQTT_PASSWORD" in capsys.readouterr().err
    assert main(["validate", str(path), "--no-models", "--no-environment"]) == 0  # the file itself is fine
    monkeypatch.setenv("SEGSTREAM_MQTT_PASSWORD", "x")
    assert main(["validate", str(path), "--no-models"]) == 0


def test_run_says_so_in_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump(pipeline(sources=[{"type": "video", "id": "clip", "url": str(tmp_path / "x.mp4")}]))
    )
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {path}: source 'clip': video file {str(tmp_path / 'x.mp4')!r} does not exist"]
