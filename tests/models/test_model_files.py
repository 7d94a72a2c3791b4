"""Files as users have them: an ``.onnx`` export given as the model, in the pipeline and on the CLI.

``model.files`` binds a model id to a file (or package folder) anywhere; ``--model [ID=]PATH`` does the
same for ``infer``, ``validate`` and ``run`` (a bare PATH replaces the workflow's one model). Metadata
comes from the export's ``metadata_props``; a key that nothing gives is an error naming it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from tests.support.onnx_models import (
    build_end2end_model,
    build_segmentation_model,
    candidate_rows,
    end2end_rows,
    save_model,
    ultralytics_metadata_props,
)
from worker.cli import main
from worker.config import PipelineConfig
from worker.errors import ModelError
from worker.ids import model_id_problem
from worker.models.config import OnnxRuntimeConfig
from worker.models.package import load_model_metadata
from worker.models.registry import MODELS_DIR_ENV, ModelRegistry
from worker.step.executor import WorkflowRunner
from worker.step.workflow import load_workflow

REPO = Path(__file__).resolve().parents[2]
NAMES = ["bolt", "nut", "washer"]


@pytest.fixture(autouse=True)
def _no_models_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODELS_DIR_ENV, raising=False)


def _coefficients(n: int) -> np.ndarray:
    coefs = np.zeros((n, 32), np.float32)
    coefs[:, 0] = 1.0
    return coefs


def _protos() -> np.ndarray:
    protos = np.zeros((32, 16, 16), np.float32)
    protos[0] = 4.0
    return protos


@pytest.fixture
def classic_file(tmp_path: Path) -> Path:
    """``yolov8n-seg.onnx`` as exported: metadata only in metadata_props, a bolt (0.9) and a nut (0.6)."""
    rows = candidate_rows([[16, 16, 16, 16], [44, 44, 12, 20]], [[0.9, 0, 0], [0, 0.6, 0]], _coefficients(2))
    model = build_segmentation_model(
        3, candidates=rows, prototypes=_protos(), metadata_props=ultralytics_metadata_props(NAMES, (64, 64))
    )
    return save_model(model, tmp_path / "exports" / "yolov8n-seg.onnx")


@pytest.fixture
def end2end_file(tmp_path: Path) -> Path:
    """``yolo26n-seg.onnx`` as exported: an end-to-end head with a washer (0.8)."""
    rows = end2end_rows([[40, 8, 56, 24]], [0.8], [2], _coefficients(1), count=300)
    props = ultralytics_metadata_props(NAMES, (64, 64), end2end=True)
    model = build_end2end_model(rows, prototypes=_protos(), metadata_props=props)
    return save_model(model, tmp_path / "exports" / "yolo26n-seg.onnx")


def _workflow(model_id: str = "yolo/1", version: int = 4) -> dict[str, Any]:
    return {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [
            {
                "type": f"roboflow_core/roboflow_instance_segmentation_model@v{version}",
                "name": "seg",
                "images": "$inputs.image",
                "model_id": model_id,
                "confidence_mode": "custom",
                "custom_confidence": 0.4,
            }
        ],
        "outputs": [{"type": "JsonField", "name": "predictions", "selector": "$steps.seg.predictions"}],
    }


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), np.zeros((64, 64, 3), np.uint8))
    return path


def _classes(line: str) -> list[str]:
    return [p["class"] for p in json.loads(line)["predictions"]["predictions"]]


def test_model_files_bind_an_id_to_an_export_in_the_pipeline(classic_file: Path, end2end_file: Path) -> None:
    config = OnnxRuntimeConfig(files={"yolo/1": classic_file, "yolo/26": end2end_file})
    registry = ModelRegistry([])  # no models folder at all
    for model_id, expected in (("yolo/1", ["bolt", "nut"]), ("yolo/26", ["washer"])):
        runner = WorkflowRunner(load_workflow(_workflow(model_id)), registry, model_config=config)
        frame_image = np.zeros((64, 64, 3), np.uint8)
        from worker.frame import Frame

        (outcome,) = runner.run_batch([Frame("cam", 0, 0.0, frame_image)]).outcomes
        assert outcome.error is None
        assert [p["class"] for p in outcome.outputs["predictions"]["predictions"]] == expected  # type: ignore[index]


def test_model_files_in_a_pipeline_file_are_validated() -> None:
    doc = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
    doc["model"] = {"files": {"yolov8n-seg.onnx": "/x.onnx"}}
    with pytest.raises(ValidationError, match=r"files.*project/version"):
        PipelineConfig.model_validate(doc)


def test_a_bound_file_that_does_not_exist_is_named(tmp_path: Path) -> None:
    registry = ModelRegistry([], files={"yolo/1": tmp_path / "gone.onnx"})
    with pytest.raises(ModelError, match=r"'yolo/1' is bound to .*gone\.onnx, which does not exist"):
        registry.load("yolo/1")


def test_the_id_error_points_to_options_that_exist() -> None:
    problem = model_id_problem("yolo/yolov8n-seg.onnx")
    assert problem is not None and "model.files" in problem and "--model [ID=]PATH" in problem


def test_infer_with_a_bare_model_path_replaces_the_workflows_model(
    classic_file: Path, end2end_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(_workflow("parts/9")))  # an id no models folder has
    image = _image(tmp_path)
    assert main(["infer", str(workflow), str(image), "--model", str(classic_file)]) == 0
    assert _classes(capsys.readouterr().out) == ["bolt", "nut"]
    assert main(["infer", str(workflow), str(image), "--model", f"parts/9={end2end_file}"]) == 0
    assert _classes(capsys.readouterr().out) == ["washer"]
    assert main(["validate", str(workflow), "--model", str(end2end_file)]) == 0
    assert "valid (models: parts/9)" in capsys.readouterr().err
    # without --model the id is not found
    assert main(["validate", str(workflow)]) == 1
    assert "'parts/9' not found" in capsys.readouterr().err


def test_models_lists_the_layout(
    end2end_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "models" / "yolo" / "26"
    folder.mkdir(parents=True)
    (folder / end2end_file.name).write_bytes(end2end_file.read_bytes())
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["models", "--json", "--models-dir", str(tmp_path / "models")]) == 0
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["yolo/26"]["layout"] == "end2end" and rows["factory-parts/1"]["layout"] == "classic"
    # --model PATH expands ~ (the shell does not after ID=)
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(_workflow("parts/9")))
    home_path = "~/" + str((folder / end2end_file.name).relative_to(tmp_path))
    assert main(["validate", str(workflow), "--model", f"parts/9={home_path}"]) == 0


def test_a_bare_model_path_needs_a_workflow_with_one_model(classic_file: Path, tmp_path: Path) -> None:
    definition = _workflow("a/1")
    second = dict(definition["steps"][0], name="seg2", model_id="b/1")
    definition["steps"].append(second)
    workflow = tmp_path / "two.json"
    workflow.write_text(json.dumps(definition))
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "validate", str(workflow), "--model", str(classic_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 1
    assert "uses 2 models (a/1, b/1)" in proc.stderr and "--model ID=PATH" in proc.stderr
    assert (
        main(["validate", str(workflow), "--model", f"a/1={classic_file}", "--model", f"b/1={classic_file}"])
        == 0
    )
    assert main(["validate", str(workflow), "--model", f"a/1={tmp_path / 'none.onnx'}"]) == 1


def test_run_with_a_model_path(classic_file: Path, tmp_path: Path) -> None:
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 64))
    for _ in range(3):
        writer.write(np.zeros((64, 64, 3), np.uint8))
    writer.release()
    pipeline = {
        "name": "byom",
        "sources": [{"type": "video", "id": "clip", "url": str(clip)}],
        "workflow": _workflow("parts/9"),
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}],
        "http": {"enabled": False},
        "print_summary": False,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", str(path), "--model", str(classic_file)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        doc = json.loads(line)
        assert [p["class"] for p in doc["outputs"]["predictions"]["predictions"]] == ["bolt", "nut"]


@pytest.mark.parametrize(
    ("drop", "match"),
    [
        (
            "names",
            r"missing key 'class_names' in metadata\.json and 'names' in the ONNX file's metadata_props",
        ),
        ("task", None),
    ],
)
def test_metadata_props_alone_or_a_named_missing_key(tmp_path: Path, drop: str, match: str | None) -> None:
    props = ultralytics_metadata_props(NAMES, (64, 64))
    del props[drop]
    path = save_model(build_segmentation_model(3, metadata_props=props), tmp_path / "m.onnx")
    if match is None:
        assert load_model_metadata(path).class_names == tuple(NAMES)
    else:
        with pytest.raises(ModelError, match=match):
            load_model_metadata(path)


def test_dynamic_export_without_imgsz_names_the_key(tmp_path: Path) -> None:
    props = ultralytics_metadata_props(NAMES, (64, 64))
    del props["imgsz"]
    model = build_segmentation_model(3, dynamic_spatial=True, metadata_props=props)
    with pytest.raises(ModelError, match=r"'imgsz'"):
        load_model_metadata(save_model(model, tmp_path / "m.onnx"))


def test_a_detection_export_is_refused_by_its_task(tmp_path: Path) -> None:
    props = ultralytics_metadata_props(NAMES, (64, 64), task="detect")
    path = save_model(build_segmentation_model(3, metadata_props=props), tmp_path / "m.onnx")
    with pytest.raises(ModelError, match=r"task is 'detect'.*'segment'"):
        load_model_metadata(path)
