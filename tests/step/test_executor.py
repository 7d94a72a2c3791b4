"""WorkflowRunner: a real ONNX model with known outputs, end to end through the step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests.support.onnx_models import (
    build_segmentation_model,
    candidate_rows,
    package_metadata,
    write_model_package,
)
from worker.errors import ConfigError, ParameterError
from worker.frame import Frame
from worker.models.registry import ModelRegistry
from worker.step.executor import WorkflowRunner
from worker.step.workflow import load_workflow

TYPE = "roboflow_core/roboflow_instance_segmentation_model@v{}"
CLASSES = ["bolt", "nut", "washer"]

# 64x64 input; three candidates: a bolt (0.9), a nut (0.6) overlapping nothing, a washer (0.3).
BOXES = [[16, 16, 16, 16], [44, 44, 12, 20], [48, 12, 8, 8]]
SCORES = [[0.9, 0.05, 0.0], [0.1, 0.6, 0.0], [0.0, 0.0, 0.3]]


def _coefficients() -> np.ndarray:
    coefs = np.zeros((3, 32), np.float32)
    coefs[:, 0] = 1.0  # prototype 0 is +8 everywhere: each mask fills its box
    return coefs


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    protos = np.zeros((32, 16, 16), np.float32)
    protos[0] = 8.0
    model = build_segmentation_model(
        3,
        candidates=candidate_rows(BOXES, SCORES, _coefficients()),
        prototypes=protos,
        input_size=(64, 64),
    )
    meta = package_metadata(
        CLASSES,
        (64, 64),
        recommended_parameters={"confidence": 0.5, "per_class_confidence": {"washer": 0.25}},
    )
    write_model_package(tmp_path / "models" / "parts" / "1", model, meta)
    write_model_package(tmp_path / "models" / "parts" / "2", model, package_metadata(CLASSES, (64, 64)))
    return tmp_path / "models"


def workflow(version: int = 4, inputs: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    step = {"type": TYPE.format(version), "name": "seg", "images": "$inputs.image", "model_id": "parts/1"}
    return {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}, *(inputs or [])],
        "steps": [step | fields],
        "outputs": [{"type": "JsonField", "name": "out", "selector": "$steps.seg.*"}],
    }


def runner(models_dir: Path, definition: dict[str, Any]) -> WorkflowRunner:
    return WorkflowRunner(load_workflow(definition), ModelRegistry([models_dir]))


def frame(n: int = 0, shape: tuple[int, int] = (128, 128), **parameters: Any) -> Frame:
    return Frame("cam", n, 0.0, np.zeros((*shape, 3), np.uint8), parameters=parameters)


def classes(outcome_outputs: dict[str, Any]) -> list[str]:
    return [p["class"] for p in outcome_outputs["out"]["predictions"]["predictions"]]


def test_v4_outputs_rle_masks_that_decode_to_the_instance_masks(models_dir: Path) -> None:
    run = runner(models_dir, workflow(4, confidence_mode="custom", custom_confidence=0.4))
    result = run.run_batch([frame(0, (128, 256)), frame(1, (256, 128))])
    assert result.model_seconds > 0 and result.postprocess_seconds > 0
    for outcome in result.outcomes:
        assert outcome.error is None and outcome.outputs is not None
        out = outcome.outputs["out"]
        assert set(out) == {"inference_id", "predictions", "model_id"}
        assert out["model_id"] == "parts/1" and outcome.model_id == "parts/1"
        assert out["inference_id"] == outcome.inference_id
        preds = out["predictions"]
        h, w = outcome.frame.image.shape[:2]
        assert preds["image"] == {"width": w, "height": h}
        assert [p["class"] for p in preds["predictions"]] == ["bolt", "nut"]
        dets = outcome.detections["seg"]
        for i, p in enumerate(preds["predictions"]):
            assert p["parent_id"] == outcome.frame.frame_id
            rle = {"size": p["rle_mask"]["size"], "counts": p["rle_mask"]["counts"].encode()}
            decoded = mask_utils.decode(rle).astype(bool)
            assert np.array_equal(decoded, dets.masks.paste(i, (h, w)))
            assert decoded.sum() > 0


def test_v1_has_polygons_and_no_model_id_output(models_dir: Path) -> None:
    run = runner(models_dir, workflow(1, confidence=0.5))
    (outcome,) = run.run_batch([frame()]).outcomes
    assert outcome.outputs is not None
    out = outcome.outputs["out"]
    assert set(out) == {"inference_id", "predictions"}
    bolt, _nut = out["predictions"]["predictions"]
    assert bolt["class"] == "bolt" and len(bolt["points"]) >= 3
    # the bolt's box: 16x16 at (16, 16) in a 64 input; 128x128 frame -> scale 2
    assert (bolt["x"], bolt["y"], bolt["width"], bolt["height"]) == (32.0, 32.0, 32.0, 32.0)


def test_frame_parameters_bind_inputs_and_a_bad_value_fails_only_that_frame(models_dir: Path) -> None:
    definition = workflow(
        4,
        inputs=[{"type": "WorkflowParameter", "name": "conf", "default_value": 0.4}],
        confidence_mode="custom",
        custom_confidence="$inputs.conf",
    )
    run = runner(models_dir, definition)
    result = run.run_batch([frame(0), frame(1, conf=0.8), frame(2, conf=1.7), frame(3, conf=0.1)])
    ok0, ok1, bad, ok3 = result.outcomes
    assert classes(ok0.outputs) == ["bolt", "nut"]  # type: ignore[arg-type]
    assert classes(ok1.outputs) == ["bolt"]  # type: ignore[arg-type]
    assert isinstance(bad.error, ParameterError) and bad.outputs is None
    assert "custom_confidence" in str(bad.error) and "conf" in str(bad.error)
    assert classes(ok3.outputs) == ["bolt", "nut", "washer"]  # type: ignore[arg-type]


def test_an_unknown_per_frame_parameter_fails_that_frame_instead_of_being_ignored(models_dir: Path) -> None:
    definition = workflow(
        4,
        inputs=[{"type": "WorkflowParameter", "name": "conf", "default_value": 0.4}],
        confidence_mode="custom",
        custom_confidence="$inputs.conf",
    )
    result = runner(models_dir, definition).run_batch([frame(0, confidnce=0.9), frame(1, conf=0.8)])
    typo, ok = result.outcomes
    assert isinstance(typo.error, ParameterError) and typo.outputs is None
    assert "['confidnce']" in str(typo.error) and "conf" in str(typo.error)
    assert classes(ok.outputs) == ["bolt"]  # type: ignore[arg-type]


def test_best_mode_uses_the_models_per_class_thresholds(models_dir: Path) -> None:
    # recommended: 0.5 for every class but washer (0.25): bolt 0.9 and washer 0.3 pass, nut 0.6 passes
    (outcome,) = runner(models_dir, workflow(4)).run_batch([frame()]).outcomes
    assert classes(outcome.outputs) == ["bolt", "nut", "washer"]  # type: ignore[arg-type]
    # a model without recommended parameters uses 0.4: the washer (0.3) goes
    (outcome,) = runner(models_dir, workflow(4, model_id="parts/2")).run_batch([frame()]).outcomes
    assert classes(outcome.outputs) == ["bolt", "nut"]  # type: ignore[arg-type]


def test_unknown_class_in_a_literal_filter_fails_at_load(models_dir: Path) -> None:
    with pytest.raises(ConfigError, match="training set") as info:
        runner(models_dir, workflow(4, class_filter=["bolt", "gear"]))
    assert info.value.step == "seg" and info.value.field == "class_filter"


def test_unknown_class_from_a_frame_fails_that_frame(models_dir: Path) -> None:
    definition = workflow(
        3,
        inputs=[{"type": "WorkflowParameter", "name": "classes"}],
        class_filter="$inputs.classes",
        confidence_mode="default",
    )
    run = runner(models_dir, definition)
    bad, ok, no_value = run.run_batch(
        [frame(0, classes=["gear"]), frame(1, classes=["nut"]), frame(2)]
    ).outcomes
    assert isinstance(bad.error, ParameterError) and "gear" in str(bad.error)
    assert classes(ok.outputs) == ["nut"]  # type: ignore[arg-type]
    assert isinstance(no_value.error, ParameterError) and "no value" in str(no_value.error)


def test_control_updates_apply_to_following_frames_and_are_all_or_nothing(models_dir: Path) -> None:
    definition = workflow(
        4,
        inputs=[
            {"type": "WorkflowParameter", "name": "conf", "default_value": 0.4},
            {"type": "WorkflowParameter", "name": "classes", "default_value": None},
        ],
        confidence_mode="custom",
        custom_confidence="$inputs.conf",
        class_filter="$inputs.classes",
    )
    run = runner(models_dir, definition)
    assert run.set_runtime_inputs({"conf": 0.2, "classes": ["washer", "nut"]}) == {
        "conf": 0.2,
        "classes": ["washer", "nut"],
    }
    (outcome,) = run.run_batch([frame()]).outcomes
    assert classes(outcome.outputs) == ["nut", "washer"]  # type: ignore[arg-type]
    for bad in ({"conf": 2.0}, {"classes": ["gear"]}, {"nope": 1}, {"conf": 0.95, "classes": ["gear"]}):
        with pytest.raises(ParameterError):
            run.set_runtime_inputs(bad)
    assert run.runtime_inputs == {"conf": 0.2, "classes": ["washer", "nut"]}


def test_a_model_not_loaded_at_start_is_refused_per_frame(models_dir: Path) -> None:
    definition = workflow(
        4,
        inputs=[{"type": "WorkflowParameter", "name": "model", "default_value": "parts/1"}],
        model_id="$inputs.model",
    )
    run = runner(models_dir, definition)
    ok, other = run.run_batch([frame(0), frame(1, model="parts/2")]).outcomes
    assert ok.error is None
    assert isinstance(other.error, ParameterError) and "not loaded" in str(other.error)


def test_two_steps_on_one_model_infer_once_per_frame(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    definition = workflow(4)
    definition["steps"].append(
        {"type": TYPE.format(2), "name": "seg2", "images": "$inputs.image", "model_id": "parts/1"}
    )
    definition["outputs"].append(
        {"type": "JsonField", "name": "polys", "selector": "$steps.seg2.predictions"}
    )
    run = runner(models_dir, definition)
    model = run.models["parts/1"]
    calls: list[int] = []
    original = model.infer
    monkeypatch.setattr(model, "infer", lambda images: calls.append(len(images)) or original(images))
    (outcome,) = run.run_batch([frame()]).outcomes
    assert calls == [1]
    assert outcome.outputs is not None and "points" in outcome.outputs["polys"]["predictions"][0]


def test_missing_model_is_a_clear_error_at_start(models_dir: Path) -> None:
    with pytest.raises(Exception, match="not found") as info:
        runner(models_dir, workflow(4, model_id="parts/9"))
    assert "seg" in str(info.value) and "parts/1" in str(info.value)
