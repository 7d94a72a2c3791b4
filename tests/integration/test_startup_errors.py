"""``segstream run`` with a start-up error never hangs: it exits within 5 s, non-zero, with one error line.

Each case runs ``python -m worker.cli run <file>`` as a real process. The JSONL case next to an MQTT
sink connected to a real broker is the one that used to hang: the MQTT sink, started first, was left
running when the JSONL sink failed, and ``asyncio.run``'s final cancellation could land while aiomqtt
waited for CONNACK, where Python 3.11's ``asyncio.wait_for`` loses it (the task then reconnects for ever).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.helpers import workflow_v4, write_video
from tests.support.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXIT_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def import_s() -> float:
    """How long this interpreter takes to start and import the worker now (a loaded machine: seconds);
    the 5 s run after that."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import worker.cli, worker.runtime"], check=True)
    return time.monotonic() - started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pipeline(tmp_path: Path, models_dir: Path, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "startup",
        "sources": [{"type": "video", "id": "file", "url": str(write_video(tmp_path / "clip.avi", 3))}],
        "workflow": workflow_v4(),
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "out" / "predictions.jsonl")}],
        "model": {"models_dir": str(models_dir), "intra_op_threads": 1},
        "http": {"host": "127.0.0.1", "port": 0},
        "print_summary": False,
    }
    doc.update(changes)
    return doc


def _run(tmp_path: Path, doc: dict[str, Any] | str, import_s: float) -> tuple[int, float, list[str]]:
    path = tmp_path / "pipeline.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=tmp_path,
        timeout=EXIT_WITHIN_S + 30,  # a hang fails below, with the time it took
        check=False,
    )
    took = time.monotonic() - started - import_s
    return proc.returncode, took, proc.stderr.decode().splitlines()


def _check(code: int, took: float, stderr: list[str], expected: str) -> None:
    assert took < EXIT_WITHIN_S, f"took {took:.1f} s after the imports: {stderr}"
    assert code == 1, stderr
    errors = [line for line in stderr if " ERROR " in line or line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert expected in errors[0], errors
    assert not any("Traceback" in line for line in stderr), stderr


def _unwritable(tmp_path: Path) -> Path:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    return not_a_dir / "out" / "predictions.jsonl"  # (root can write anywhere else)


def test_an_unwritable_jsonl_path(tmp_path: Path, models_dir: Path, import_s: float) -> None:
    doc = _pipeline(tmp_path, models_dir, sinks=[{"type": "jsonl", "path": str(_unwritable(tmp_path))}])
    _check(*_run(tmp_path, doc, import_s), "sink[jsonl]: cannot open output")


@pytest.mark.parametrize("attempt", range(3))
def test_an_unwritable_jsonl_path_after_an_mqtt_sink_that_connects(
    attempt: int, tmp_path: Path, models_dir: Path, mosquitto: MosquittoBroker, import_s: float
) -> None:
    doc = _pipeline(
        tmp_path,
        models_dir,
        broker={"host": mosquitto.host, "port": mosquitto.port},
        sinks=[{"type": "mqtt"}, {"type": "jsonl", "path": str(_unwritable(tmp_path))}],
        control={"enabled": False},
    )
    _check(*_run(tmp_path, doc, import_s), "sink[jsonl]: cannot open output")


def test_a_missing_model(tmp_path: Path, models_dir: Path, import_s: float) -> None:
    workflow = workflow_v4()
    workflow["steps"][0]["model_id"] = "no-such/1"
    doc = _pipeline(tmp_path, models_dir, workflow=workflow)
    _check(*_run(tmp_path, doc, import_s), "no-such/1")


def test_an_unreachable_broker_when_it_is_required(tmp_path: Path, models_dir: Path, import_s: float) -> None:
    doc = _pipeline(
        tmp_path,
        models_dir,
        broker={"host": "127.0.0.1", "port": _free_port(), "connect_timeout": 1.0},
        sinks=[{"type": "mqtt"}],
        broker_required=True,
    )
    _check(*_run(tmp_path, doc, import_s), "not reachable within 1 s (broker_required: true)")


def test_a_bad_pipeline_file(tmp_path: Path, models_dir: Path, import_s: float) -> None:
    doc = _pipeline(tmp_path, models_dir, batching={"max_batch_size": 0})
    _check(*_run(tmp_path, doc, import_s), "batching.max_batch_size")


def test_a_pipeline_file_that_is_not_yaml(tmp_path: Path, import_s: float) -> None:
    _check(*_run(tmp_path, "name: [unclosed\n", import_s), "invalid YAML")


def test_an_http_port_in_use(tmp_path: Path, models_dir: Path, import_s: float) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        doc = _pipeline(tmp_path, models_dir, http={"host": "127.0.0.1", "port": taken.getsockname()[1]})
        _check(*_run(tmp_path, doc, import_s), "worker failed: OSError")
