"""A corpus of the layouts Ultralytics emits, built with the ``onnx`` helper API (no Ultralytics needed).

Each model carries ``metadata_props`` as an Ultralytics export writes them and is loaded as the file it
is (no ``metadata.json``, any file name), through both backends. Classic layouts: static, non-square,
dynamic (batch and spatial axes), static batch 4, FP16. End-to-end heads (YOLO26, ``nms=True``):
static, dynamic, FP16, and a 264-class model whose 4 + C + 32 = 300 equals its row count. The
end-to-end models emit known rows, so boxes and masks are checked against hand-computed values.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.onnx_models import (
    build_end2end_model,
    build_segmentation_model,
    candidate_rows,
    end2end_rows,
    package_metadata,
    save_model,
    ultralytics_metadata_props,
    write_model_package,
)
from worker.errors import ModelError
from worker.frame import Frame
from worker.models.config import ModelRuntimeConfig, OnnxRuntimeConfig, OpenVinoConfig
from worker.models.layout import determine_layout
from worker.models.package import load_model_metadata
from worker.models.registry import ModelRegistry, load_backend
from worker.models.signature import ModelSignature
from worker.step.executor import WorkflowRunner
from worker.step.postprocess import PostprocessParams, postprocess_raw
from worker.step.workflow import load_workflow

pytest.importorskip("openvino")

NAMES = ["bolt", "nut", "washer"]
BACKENDS: dict[str, ModelRuntimeConfig] = {
    "onnxruntime": OnnxRuntimeConfig(intra_op_threads=1),
    "openvino": OpenVinoConfig(backend="openvino", threads=1, precision="fp32"),
}


def _prototypes(size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """Prototype 0: +1 left of input x = 24, -1 right of it; prototype 1: +1 everywhere."""
    h, w = size[0] // 4, size[1] // 4
    protos = np.zeros((32, h, w), np.float32)
    protos[0] = -1.0
    protos[0][:, :6] = 1.0  # cells 0..5 cover input x in [0, 24)
    protos[1] = 1.0
    return protos


def _coefficients(*which: int) -> np.ndarray:
    coefs = np.zeros((len(which), 32), np.float32)
    for row, k in enumerate(which):
        if k >= 0:
            coefs[row, k] = 1.0
    return coefs


#: three known rows: a nut cut at x = 24 by prototype 0, a bolt filling its box, a washer with an
#: empty mask (all coefficients 0), then zero padding as the models emit it
ROWS = end2end_rows(
    [[8, 16, 40, 48], [30, 0, 60, 20], [0, 0, 10, 10]],
    [0.9, 0.5, 0.3],
    [1, 0, 2],
    _coefficients(0, 1, -1),
    count=300,
)


def _params(**fields: Any) -> PostprocessParams:
    return PostprocessParams(**{"confidence": 0.25, **fields})


def _detect(model: Any, image: np.ndarray, **fields: Any) -> Any:
    (raw,) = model.infer([image])
    return raw, postprocess_raw(raw, _params(**fields), len(model.class_names))


# --------------------------------------------------------------------------------- classic layouts

CLASSIC_VARIANTS: dict[str, dict[str, Any]] = {
    "static-64": {},
    "non-square-64x96": {"input_size": (64, 96)},
    "dynamic": {"dynamic_spatial": True, "dynamic_batch": True},
    "static-batch-4": {"dynamic_batch": False, "static_batch": 4},
    "fp16": {"half": True},
    "hidden-channels": {"hide_channel_count": True},
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("variant", sorted(CLASSIC_VARIANTS))
def test_classic_exports_load_as_exported(tmp_path: Path, variant: str, backend: str) -> None:
    options = dict(CLASSIC_VARIANTS[variant])
    size = options.pop("input_size", (64, 64))
    rows = candidate_rows([[16, 24, 16, 16]], [[0.1, 0.8, 0.0]], _coefficients(1))
    model = build_segmentation_model(
        3,
        candidates=rows,
        prototypes=_prototypes(size),
        input_size=size,
        metadata_props=ultralytics_metadata_props(NAMES, size, batch=options.get("static_batch", 1)),
        **options,
    )
    path = save_model(model, tmp_path / "yolo11n-seg.onnx")  # the file as exported, no metadata.json
    loaded = load_backend(path, BACKENDS[backend])
    assert loaded.metadata.output_layout == "classic" and loaded.class_names == tuple(NAMES)
    frames = [np.full((*size, 3), 114, np.uint8)] * 2
    raws = loaded.infer(frames)
    for raw in raws:
        assert raw.layout == "classic"
        dets = postprocess_raw(raw, _params(), 3)
        assert dets.class_id.tolist() == [1]
        np.testing.assert_allclose(dets.xyxy, [[8, 16, 24, 32]], atol=1e-4)
        assert dets.masks.crops[0].all() and dets.masks.crops[0].shape == (16, 16)


# ----------------------------------------------------------------------------- end-to-end layouts

E2E_VARIANTS: dict[str, dict[str, Any]] = {
    "static": {"dynamic_batch": False},
    "dynamic": {"dynamic_spatial": True, "dynamic_batch": True},
    "dynamic-rows": {"dynamic_batch": True, "hide_row_count": True},
    "fp16": {"half": True},
}


@pytest.mark.parametrize("declared", ["end2end", "nms"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("variant", sorted(E2E_VARIANTS))
def test_end2end_rows_decode_to_hand_computed_boxes_and_masks(
    tmp_path: Path, variant: str, backend: str, declared: str
) -> None:
    flag = {"end2end": True} if declared == "end2end" else {"nms": True}
    model = build_end2end_model(
        ROWS,
        prototypes=_prototypes(),
        metadata_props=ultralytics_metadata_props(NAMES, (64, 64), **flag),
        **E2E_VARIANTS[variant],
    )
    loaded = load_backend(save_model(model, tmp_path / "yolo26n-seg.onnx"), BACKENDS[backend])
    assert loaded.metadata.output_layout == "end2end"
    # a 32x64 frame: scale 1, 16 px of padding above and below (input y = frame y + 16)
    image = np.zeros((32, 64, 3), np.uint8)
    raw, dets = _detect(loaded, image)
    assert raw.layout == "end2end" and raw.predictions.shape == (300, 38)
    # the washer (0.3) has an empty mask: dropped; the nut first (0.9), then the bolt (0.5)
    assert dets.class_id.tolist() == [1, 0]
    np.testing.assert_allclose(dets.confidence, [0.9, 0.5], rtol=1e-3)
    np.testing.assert_allclose(dets.xyxy, [[8, 0, 40, 32], [30, 0, 60, 4]], atol=1e-3)
    nut, bolt = (dets.masks.paste(i, (32, 64)) for i in range(2))
    expected_nut = np.zeros((32, 64), bool)
    expected_nut[0:32, 8:24] = True  # the box's pixels left of input x = 24 (prototype 0 > 0)
    expected_bolt = np.zeros((32, 64), bool)
    expected_bolt[0:4, 30:60] = True  # the box (input y 0..20) clipped to the frame (frame y 0..4)
    assert np.array_equal(nut, expected_nut) and np.array_equal(bolt, expected_bolt)


def test_end2end_step_parameters_apply_to_rows(tmp_path: Path) -> None:
    model = build_end2end_model(
        ROWS,
        prototypes=_prototypes(),
        metadata_props=ultralytics_metadata_props(NAMES, (64, 64), end2end=True),
    )
    loaded = load_backend(save_model(model, tmp_path / "m.onnx"), BACKENDS["onnxruntime"])
    image = np.zeros((64, 64, 3), np.uint8)
    assert _detect(loaded, image, confidence=0.6)[1].class_id.tolist() == [1]
    assert _detect(loaded, image, class_ids=np.array([0]))[1].class_id.tolist() == [0]
    assert _detect(loaded, image, max_detections=1)[1].class_id.tolist() == [1]
    # per-class thresholds (confidence_mode best): the nut needs 0.95
    assert _detect(loaded, image, confidence=np.array([0.25, 0.95, 0.25], np.float32))[
        1
    ].class_id.tolist() == [0]
    # no effect: NMS and its candidate limit were the model's (the two boxes overlap: IoU > 0)
    same = _detect(loaded, image, iou_threshold=0.0, class_agnostic_nms=True, max_candidates=1)[1]
    assert same.class_id.tolist() == [1, 0]
    for mode in ("fast", "tradeoff", "accurate"):
        dets = _detect(loaded, image, mask_decode_mode=mode, tradeoff_factor=0.5)[1]
        assert int(dets.masks.crops[0].sum()) == 16 * 32  # the nut's 16 columns left of x = 24


def test_a_264_class_end2end_model_is_not_read_as_classic(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(264)]  # 4 + 264 + 32 = 300 = the row count
    rows = end2end_rows([[8, 16, 40, 48]], [0.8], [263], _coefficients(1), count=300)
    props = ultralytics_metadata_props(names, (64, 64), end2end=True)
    model = build_end2end_model(rows, prototypes=_prototypes(), metadata_props=props)
    path = save_model(model, tmp_path / "yolo26-264.onnx")
    for backend in BACKENDS.values():
        loaded = load_backend(path, backend)
        assert loaded.metadata.output_layout == "end2end"
        _, dets = _detect(loaded, np.zeros((64, 64, 3), np.uint8))
        assert dets.class_id.tolist() == [263]
        np.testing.assert_allclose(dets.xyxy, [[8, 16, 40, 48]], atol=1e-3)
    # without the declaration the shapes [1, 300, 38] fit both layouts: refused, never guessed
    bare = build_end2end_model(rows, prototypes=_prototypes())
    folder = write_model_package(tmp_path / "bare", bare, package_metadata(names, (64, 64)))
    with pytest.raises(ModelError, match=r"fits both layouts.*end2end"):
        load_model_metadata(folder)
    # declared in metadata.json, it loads
    write_model_package(tmp_path / "declared", bare, package_metadata(names, (64, 64), end2end=True))
    assert load_model_metadata(tmp_path / "declared").output_layout == "end2end"


def test_undeclared_layout_comes_from_unambiguous_shapes(tmp_path: Path) -> None:
    e2e = build_end2end_model(ROWS, prototypes=_prototypes())
    write_model_package(tmp_path / "e2e", e2e, package_metadata(NAMES, (64, 64)))
    assert load_model_metadata(tmp_path / "e2e").output_layout == "end2end"
    classic = build_segmentation_model(3)
    write_model_package(tmp_path / "classic", classic, package_metadata(NAMES, (64, 64)))
    assert load_model_metadata(tmp_path / "classic").output_layout == "classic"
    # declared end2end: false wins over shapes that would fit end2end
    write_model_package(tmp_path / "no", e2e, package_metadata(NAMES, (64, 64), end2end=False))
    with pytest.raises(ModelError, match=r"300 channels but 3 class names need 4 \+ 3 \+ 32 = 39"):
        load_model_metadata(tmp_path / "no")


def _signature(*outputs: tuple[Any, ...]) -> ModelSignature:
    names = tuple(f"output{i}" for i in range(len(outputs)))
    return ModelSignature("images", (1, 3, 64, 64), names, tuple(outputs))


@pytest.mark.parametrize(
    ("outputs", "declared", "match"),
    [
        # a detection-only end-to-end export: no prototypes
        (((1, 300, 6),), True, r"'output0': \[1, 300, 6\]} are not a segmentation head.*supported: classic"),
        # a pose head with prototypes-like rank: rows of 57 columns, declared end-to-end
        (((1, 300, 57), (1, 32, 16, 16)), True, r"\[1, 300, 57\], not \[B, N, 38\]"),
        # neither layout, undeclared: the shapes and the two layouts are named
        (
            ((1, 40, 8400), (1, 32, 16, 16)),
            None,
            r"\[1, 40, 8400\] fits no layout.*end2end \[B, N, 6 \+ 32 = 38\]",
        ),
        (((1, 39, 100), (1, 16, 16, 16)), None, r"32 prototype channels, got 16"),
    ],
)
def test_layouts_that_are_neither_are_refused(outputs: Any, declared: bool | None, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        determine_layout(_signature(*outputs), 3, declared)


def test_end2end_class_ids_must_match_the_class_names(tmp_path: Path) -> None:
    rows = end2end_rows([[8, 16, 40, 48]], [0.8], [7], _coefficients(1), count=10)
    model = build_end2end_model(
        rows, metadata_props=ultralytics_metadata_props(NAMES, (64, 64), end2end=True)
    )
    loaded = load_backend(save_model(model, tmp_path / "m.onnx"), BACKENDS["onnxruntime"])
    (raw,) = loaded.infer([np.zeros((64, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"class \[7.0\] outside the model's 3 class names"):
        postprocess_raw(raw, _params(), 3)


def test_ignored_parameters_are_reported_once_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = build_end2end_model(
        ROWS,
        prototypes=_prototypes(),
        metadata_props=ultralytics_metadata_props(NAMES, (64, 64), end2end=True),
    )
    save_model(model, tmp_path / "models" / "yolo" / "26" / "yolo26n-seg.onnx")
    definition = {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [
            {
                "type": "roboflow_core/roboflow_instance_segmentation_model@v2",
                "name": "seg",
                "images": "$inputs.image",
                "model_id": "yolo/26",
                "confidence": 0.25,
            }
        ],
        "outputs": [{"type": "JsonField", "name": "out", "selector": "$steps.seg.predictions"}],
    }
    with caplog.at_level(logging.INFO, logger="worker.step.executor"):
        runner = WorkflowRunner(load_workflow(definition), ModelRegistry([tmp_path / "models"]))
        for n in range(3):
            frames = [Frame("cam", n, 0.0, np.zeros((64, 64, 3), np.uint8))]
            (outcome,) = runner.run_batch(frames).outcomes
            assert outcome.error is None
            assert [p["class"] for p in outcome.outputs["out"]["predictions"]] == ["nut", "bolt"]
    notes = [r for r in caplog.records if "end-to-end head" in r.getMessage()]
    assert len(notes) == 1
    assert all(
        name in notes[0].getMessage() for name in ("iou_threshold", "class_agnostic_nms", "max_candidates")
    )


def test_an_end2end_head_computed_like_yolo26_runs_on_both_backends(tmp_path: Path) -> None:
    from tests.support.onnx_models import build_end2end_head_model
    from worker.models.openvino_backend import materialize_sliced_gathers

    # 6 candidates (x1, y1, x2, y2 in input pixels); the head keeps the best 3 by their best class score
    boxes = np.array(
        [[8, 16, 40, 48], [30, 0, 60, 20], [0, 0, 10, 10], [1, 1, 5, 5], [2, 2, 6, 6], [3, 3, 7, 7]]
    )
    scores = np.zeros((6, 3), np.float32)
    scores[[0, 1, 2, 3, 4, 5], [1, 0, 2, 0, 1, 2]] = [0.9, 0.5, 0.3, 0.05, 0.04, 0.2]
    coefs = np.zeros((6, 32), np.float32)
    coefs[0, 0] = coefs[1, 1] = coefs[5, 1] = 1.0
    candidates = np.concatenate([boxes, scores, coefs], axis=1).T.astype(np.float32)
    props = ultralytics_metadata_props(NAMES, (64, 64), end2end=True)
    model = build_end2end_head_model(candidates, 3, max_det=3, prototypes=_prototypes(), metadata_props=props)
    path = save_model(model, tmp_path / "yolo26n-seg.onnx")
    results = {}
    for name, config in BACKENDS.items():
        loaded = load_backend(path, config)
        raw, dets = _detect(loaded, np.zeros((64, 64, 3), np.uint8), confidence=0.1)
        # rows best first: the nut (0.9), the bolt (0.5), the washer (0.3); then post-processing:
        # the washer at 0.3 passes but its mask is empty (no coefficients): dropped
        np.testing.assert_allclose(raw.predictions[:, 4], [0.9, 0.5, 0.3], rtol=1e-6)
        assert raw.predictions[:, 5].tolist() == [1.0, 0.0, 2.0]
        assert dets.class_id.tolist() == [1, 0]
        np.testing.assert_allclose(dets.xyxy, [[8, 16, 40, 48], [30, 0, 60, 20]], atol=1e-4)
        results[name] = [dets.masks.paste(i, (64, 64)) for i in range(len(dets))]
    assert all(np.array_equal(a, b) for a, b in zip(results["onnxruntime"], results["openvino"], strict=True))
    assert int(results["onnxruntime"][0].sum()) == 16 * 32
    import openvino as ov

    graph = ov.Core().read_model(str(path))
    assert materialize_sliced_gathers(graph) == 3  # boxes, scores and coefficients
