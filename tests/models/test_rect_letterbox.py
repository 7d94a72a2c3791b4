"""``model.letterbox: rect``: a dynamic-axes model runs each batch at the smallest stride-multiple
rectangle holding its frames (both backends); a fixed-size model refuses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.onnx_models import (
    build_segmentation_model,
    candidate_rows,
    save_model,
    ultralytics_metadata_props,
)
from worker.errors import ModelError
from worker.models.config import ModelRuntimeConfig, OnnxRuntimeConfig, OpenVinoConfig
from worker.models.letterbox import rect_input_size
from worker.models.registry import load_backend
from worker.step.postprocess import PostprocessParams, postprocess_raw

pytest.importorskip("openvino")

NAMES = ["bolt", "nut", "washer"]


def _configs(letterbox: str) -> dict[str, ModelRuntimeConfig]:
    return {
        "onnxruntime": OnnxRuntimeConfig(intra_op_threads=1, session_batch=2, letterbox=letterbox),  # type: ignore[arg-type]
        "openvino": OpenVinoConfig(
            backend="openvino", threads=1, session_batch=2, precision="fp32", letterbox=letterbox
        ),  # type: ignore[arg-type]
    }


def test_rect_input_size() -> None:
    assert rect_input_size([(1080, 1920)], (480, 480), 32) == (288, 480)
    assert rect_input_size([(1080, 1920)], (640, 640), 32) == (384, 640)
    assert rect_input_size([(480, 480)], (480, 480), 32) == (480, 480)
    # a batch takes the largest of its frames' rectangles
    assert rect_input_size([(1080, 1920), (1920, 1080)], (480, 480), 32) == (480, 480)
    assert rect_input_size([(100, 150)], (480, 480), 32) == (320, 480)


def _dynamic_model(tmp_path: Path) -> Path:
    coefs = np.zeros((1, 32), np.float32)
    coefs[0, 0] = 1.0
    protos = np.full((32, 32, 32), 1.0, np.float32)
    rows = candidate_rows([[64, 48, 32, 32]], [[0.9, 0, 0]], coefs)
    model = build_segmentation_model(
        3,
        candidates=rows,
        prototypes=protos,
        input_size=(128, 128),
        dynamic_spatial=True,
        metadata_props=ultralytics_metadata_props(NAMES, (128, 128)),
    )
    return save_model(model, tmp_path / "dynamic.onnx")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_rect_runs_a_wide_frame_at_a_smaller_input(tmp_path: Path, backend: str) -> None:
    path = _dynamic_model(tmp_path)
    wide = np.zeros((72, 128, 3), np.uint8)
    square_model = load_backend(path, _configs("square")[backend])
    rect_model = load_backend(path, _configs("rect")[backend])
    (square,) = square_model.infer([wide])
    (rect,) = rect_model.infer([wide])
    assert square.letterbox.input_size == (128, 128) and square.prototypes.shape == (32, 32, 32)
    assert rect.letterbox.input_size == (96, 128) and rect.prototypes.shape == (32, 24, 32)
    assert rect.letterbox.pad_y == 12 and square.letterbox.pad_y == 28
    params = PostprocessParams(confidence=0.5)
    # the same input-pixel box maps back through each geometry
    np.testing.assert_allclose(postprocess_raw(rect, params, 3).xyxy, [[48, 20, 80, 52]], atol=1e-4)
    np.testing.assert_allclose(postprocess_raw(square, params, 3).xyxy, [[48, 4, 80, 36]], atol=1e-4)
    # frames run together (session_batch 2) share one rectangle; a later run gets its own
    tall = np.zeros((128, 72, 3), np.uint8)
    assert [r.letterbox.input_size for r in rect_model.infer([wide, tall])] == [(128, 128)] * 2
    assert rect_model.infer([wide])[0].letterbox.input_size == (96, 128)


def test_rect_needs_dynamic_axes(tmp_path: Path) -> None:
    model = build_segmentation_model(3, metadata_props=ultralytics_metadata_props(NAMES, (64, 64)))
    path = save_model(model, tmp_path / "fixed.onnx")
    for config in _configs("rect").values():
        with pytest.raises(ModelError, match="letterbox: rect needs a model with dynamic spatial axes"):
            load_backend(path, config)
