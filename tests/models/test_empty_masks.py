"""One rule for every step version: a detection whose mask is empty after decoding is dropped.

The model emits a bolt (0.9) whose mask fills its box and a nut (0.057) whose mask coefficients are all
zero (no pixel above 0.5: an empty mask), as the issue's low-confidence bolt. At confidence 0.01 v1-v3
(polygons) and v4 (RLE) publish the bolt only, and the step's detections (annotations, summaries,
observers) hold the bolt only too.
"""

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
from worker.frame import Frame
from worker.models.registry import ModelRegistry
from worker.step.executor import WorkflowRunner
from worker.step.workflow import load_workflow

NAMES = ["bolt", "nut", "washer"]


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    coefficients = np.zeros((2, 32), np.float32)
    coefficients[0, 0] = 1.0  # the bolt: prototype 0 (+4 everywhere) fills its box; the nut: all zero
    protos = np.zeros((32, 16, 16), np.float32)
    protos[0] = 4.0
    rows = candidate_rows([[16, 16, 16, 16], [44, 44, 12, 20]], [[0.9, 0, 0], [0, 0.057, 0]], coefficients)
    model = build_segmentation_model(3, candidates=rows, prototypes=protos)
    write_model_package(tmp_path / "models" / "parts" / "1", model, package_metadata(NAMES, (64, 64)))
    return tmp_path / "models"


def _step(version: int) -> dict[str, Any]:
    step: dict[str, Any] = {
        "type": f"roboflow_core/roboflow_instance_segmentation_model@v{version}",
        "name": "seg",
        "images": "$inputs.image",
        "model_id": "parts/1",
    }
    if version <= 2:
        step["confidence"] = 0.01
    else:
        step |= {"confidence_mode": "custom", "custom_confidence": 0.01}
    return step


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_a_detection_with_an_empty_mask_is_dropped(models_dir: Path, version: int) -> None:
    definition = {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [_step(version)],
        "outputs": [{"type": "JsonField", "name": "out", "selector": "$steps.seg.predictions"}],
    }
    runner = WorkflowRunner(load_workflow(definition), ModelRegistry([models_dir]))
    (outcome,) = runner.run_batch([Frame("cam", 0, 0.0, np.zeros((64, 64, 3), np.uint8))]).outcomes
    assert outcome.error is None and outcome.outputs is not None
    predictions = outcome.outputs["out"]["predictions"]
    assert [p["class"] for p in predictions] == ["bolt"]
    assert outcome.detections["seg"].class_id.tolist() == [0]
    (bolt,) = predictions
    if version == 4:
        rle = {"size": bolt["rle_mask"]["size"], "counts": bolt["rle_mask"]["counts"].encode()}
        assert int(mask_utils.decode(rle).sum()) == 16 * 16
    else:
        assert len(bolt["points"]) >= 3
