"""The backend seam: the step sees only the protocol; ONNX Runtime and OpenVINO agree on the bundled model.

The agreement tests run the bundled demo model on frames of the demo clip through each backend and
compare the post-processed detections with ONNX Runtime FP32 (today's path): same count, same
classes, boxes within 1 px, mask IoU >= 0.98.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from tests.support.onnx_models import (
    build_segmentation_model,
    candidate_rows,
    package_metadata,
    save_model,
    write_model_package,
)
from worker.errors import ModelError
from worker.frame import Frame
from worker.models.backend import BackendInfo, RawSegmentation, SegmentationBackend
from worker.models.config import ModelRuntimeConfig, OnnxRuntimeConfig, OpenVinoConfig
from worker.models.evaluation import iter_frames
from worker.models.letterbox import compute_letterbox
from worker.models.onnx_backend import OnnxSegmentationModel, resolve_providers
from worker.models.openvino_backend import OpenVinoSegmentationModel, cpu_supports_bf16
from worker.models.package import ModelMetadata
from worker.models.registry import BUNDLED_MODELS_DIR, ModelRegistry, load_backend
from worker.step.detections import Detections
from worker.step.executor import WorkflowRunner
from worker.step.postprocess import PostprocessParams, postprocess_frame
from worker.step.workflow import load_workflow

ov = pytest.importorskip("openvino")

REPO = Path(__file__).resolve().parents[2]
DEMO = BUNDLED_MODELS_DIR / "factory-parts" / "1"
CLIP = REPO / "worker" / "assets" / "demo_clip.mp4"


# ----------------------------------------------------------------------------------------- the seam


class ListBackend:
    """A backend that is no engine at all: fixed candidates, for any frame (the protocol, nothing else)."""

    def __init__(self, model_id: str) -> None:
        self.model_id: str | None = model_id
        self.metadata = ModelMetadata(class_names=("gear", "cog"), input_size=(64, 64))
        self.input_size = (64, 64)
        self.calls: list[int] = []
        self.closed = False

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.metadata.class_names

    @property
    def info(self) -> BackendInfo:
        return BackendInfo("list", "fp32", ("none",), ("none",), "-")

    def infer(self, images: Sequence[np.ndarray]) -> list[RawSegmentation]:
        self.calls.append(len(images))
        rows = candidate_rows([[32, 32, 16, 16]], [[0.1, 0.8]])
        rows[4 + 2, 0] = 1.0
        protos = np.zeros((32, 16, 16), np.float32)
        protos[0] = 8.0
        return [
            RawSegmentation(rows, protos, compute_letterbox(image.shape[:2], self.input_size))
            for image in images
        ]

    def close(self) -> None:
        self.closed = True


class ListRegistry(ModelRegistry):
    def __init__(self) -> None:
        super().__init__([])
        self.backend = ListBackend("gears/1")

    def load(self, model_id: str, config: ModelRuntimeConfig | None = None) -> SegmentationBackend:
        assert model_id == "gears/1"
        return self.backend


def test_the_step_runs_any_object_that_follows_the_protocol() -> None:
    registry = ListRegistry()
    assert isinstance(registry.backend, SegmentationBackend)
    definition = {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [
            {
                "type": "roboflow_core/roboflow_instance_segmentation_model@v4",
                "name": "seg",
                "images": "$inputs.image",
                "model_id": "gears/1",
            }
        ],
        "outputs": [{"type": "JsonField", "name": "predictions", "selector": "$steps.seg.predictions"}],
    }
    runner = WorkflowRunner(load_workflow(definition), registry)
    frames = [Frame("cam", i, 0.0, np.zeros((64, 64, 3), np.uint8), f"f{i}", {}) for i in range(2)]
    outcomes = runner.run_batch(frames).outcomes
    assert registry.backend.calls == [2]
    (prediction,) = outcomes[0].outputs["predictions"]["predictions"]  # type: ignore[index]
    assert prediction["class"] == "cog" and prediction["confidence"] == pytest.approx(0.8)
    assert (prediction["x"], prediction["y"], prediction["width"], prediction["height"]) == (32, 32, 16, 16)


def test_the_step_imports_no_engine() -> None:
    source = (REPO / "worker" / "step" / "executor.py").read_text()
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    engines = {"onnxruntime", "openvino", "worker.models.onnx_backend", "worker.models.openvino_backend"}
    assert not imported & engines, imported & engines


# ----------------------------------------------------------------------- agreement on the bundled model


def _detections(model: SegmentationBackend, frames: list[np.ndarray]) -> list[Detections]:
    params = PostprocessParams(confidence=0.4, iou_threshold=0.5)
    return [postprocess_frame(r.predictions, r.prototypes, r.letterbox, params) for r in model.infer(frames)]


def _full_mask(d: Detections, j: int) -> np.ndarray:
    out = np.zeros(d.frame_shape, bool)
    crop, (ox, oy) = d.masks.crops[j], d.masks.offsets[j]
    out[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop
    return out


def _assert_same_detections(
    expected: Detections, actual: Detections, *, box_px: float, mask_iou: float
) -> None:
    assert len(actual) == len(expected)
    for j in range(len(expected)):
        # pair each expected detection with the actual one whose box is nearest
        k = int(np.argmin(np.abs(actual.xyxy - expected.xyxy[j]).max(axis=1)))
        assert actual.class_id[k] == expected.class_id[j]
        np.testing.assert_allclose(actual.xyxy[k], expected.xyxy[j], atol=box_px)
        a, b = _full_mask(expected, j), _full_mask(actual, k)
        union = (a | b).sum()
        assert union == 0 or (a & b).sum() / union >= mask_iou


@pytest.fixture(scope="module")
def clip_frames() -> list[np.ndarray]:
    return list(iter_frames(CLIP, every=40, limit=6))


@pytest.fixture(scope="module")
def ort_detections(clip_frames: list[np.ndarray]) -> list[Detections]:
    model = load_backend(DEMO, OnnxRuntimeConfig(intra_op_threads=1))
    dets = _detections(model, clip_frames)
    assert sum(len(d) for d in dets) > 20  # the comparison means something
    return dets


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_openvino_gives_the_same_detections_as_onnxruntime(
    clip_frames: list[np.ndarray], ort_detections: list[Detections], precision: str
) -> None:
    model = load_backend(DEMO, OpenVinoConfig(backend="openvino", threads=1, precision=precision))
    assert model.info.backend == "openvino"
    if precision != "auto":
        assert model.info.precision == precision
    for expected, actual in zip(ort_detections, _detections(model, clip_frames), strict=True):
        _assert_same_detections(expected, actual, box_px=1.0, mask_iou=0.98)


def test_openvino_several_requests_and_frame_sizes_match_one_by_one(clip_frames: list[np.ndarray]) -> None:
    model = OpenVinoSegmentationModel(
        DEMO, precision="fp32", threads=1, num_requests=2, input_size=(320, 320)
    )
    frames = [clip_frames[0], clip_frames[1][:360, :500], clip_frames[2][100:, 200:]]
    together = model.infer(frames)
    for frame, raw in zip(frames, together, strict=True):
        (alone,) = model.infer([frame])
        assert raw.letterbox == alone.letterbox and raw.prototypes.shape == (32, 80, 80)
        np.testing.assert_allclose(raw.predictions, alone.predictions, rtol=1e-4, atol=1e-3)


def test_openvino_compiled_model_cache(tmp_path: Path) -> None:
    first = OpenVinoSegmentationModel(DEMO, threads=1, cache_dir=tmp_path / "cache", warmup=False)
    assert not first.loaded_from_cache and any((tmp_path / "cache").iterdir())
    again = OpenVinoSegmentationModel(DEMO, threads=1, cache_dir=tmp_path / "cache", warmup=False)
    assert again.loaded_from_cache and again.info.details["cache"] == "loaded"


def test_openvino_reads_an_ultralytics_openvino_export(tmp_path: Path) -> None:
    rows = candidate_rows([[32, 32, 16, 16]], [[0.2, 0.9]])
    onnx_file = save_model(
        build_segmentation_model(2, candidates=rows, input_size=(64, 64)), tmp_path / "m.onnx"
    )
    folder = tmp_path / "best_openvino_model"
    folder.mkdir()
    ov.save_model(ov.convert_model(str(onnx_file)), str(folder / "best.xml"))
    # what Ultralytics writes beside the IR (its metadata_props as YAML)
    (folder / "metadata.yaml").write_text(
        "task: segment\nstride: 32\nbatch: 1\nimgsz:\n- 64\n- 64\nnames:\n  0: gear\n  1: cog\n"
    )
    model = load_backend(folder, OpenVinoConfig(backend="openvino", threads=1))
    assert model.class_names == ("gear", "cog") and model.input_size == (64, 64)
    (raw,) = model.infer([np.zeros((64, 64, 3), np.uint8)])
    assert raw.predictions[4 + 1, 0] == pytest.approx(0.9, abs=0.01)  # FP16 weights, BF16 maybe
    with pytest.raises(ModelError, match=r"use model\.backend: openvino"):
        load_backend(folder, OnnxRuntimeConfig())


def test_unknown_openvino_device_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match=r"device 'NPU9' is not available; this machine has \['CPU'"):
        OpenVinoSegmentationModel(DEMO, device="NPU9")


# ----------------------------------------------------------------------------------- ONNX Runtime providers


def _tiny(tmp_path: Path) -> Path:
    model = build_segmentation_model(2, input_size=(64, 64))
    return write_model_package(tmp_path / "p", model, package_metadata(["a", "b"], (64, 64)))


def test_unavailable_provider_is_an_error_naming_what_there_is(tmp_path: Path) -> None:
    config = OnnxRuntimeConfig(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ModelError) as info:
        load_backend(_tiny(tmp_path), config)
    message = str(info.value)
    assert "['CUDAExecutionProvider'] are not available" in message
    assert "CPUExecutionProvider" in message and "allow_fallback" in message and "segstream[gpu]" in message


def test_fallback_is_logged_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = OnnxRuntimeConfig(
        providers=[{"name": "TensorrtExecutionProvider", "options": {"trt_fp16_enable": True}}],
        allow_fallback=True,
    )
    with caplog.at_level(logging.WARNING, logger="worker.models.onnx_backend"):
        model = load_backend(_tiny(tmp_path), config)
    assert "falling back to ['CPUExecutionProvider']" in caplog.text
    assert isinstance(model, OnnxSegmentationModel)
    assert model.info.requested == ("TensorrtExecutionProvider",)
    assert model.info.used == ("CPUExecutionProvider",)


def test_provider_options_are_handed_over_as_onnx_runtime_takes_them() -> None:
    # the CPU provider has no options of its own to read back, so this checks what is handed to
    # InferenceSession(providers=..., provider_options=...): strings, booleans as 1/0, order kept
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = resolve_providers(
        [
            ("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_max_workspace_size": 1 << 30}),
            ("CUDAExecutionProvider", {"device_id": 1}),
            "CPUExecutionProvider",
        ],
        available,
    )
    assert chosen == [
        ("TensorrtExecutionProvider", {"trt_fp16_enable": "1", "trt_max_workspace_size": str(1 << 30)}),
        ("CUDAExecutionProvider", {"device_id": "1"}),
        ("CPUExecutionProvider", {}),
    ]
    with pytest.raises(ModelError, match="no execution providers requested"):
        resolve_providers([], available)


def test_closed_model_refuses_to_run(tmp_path: Path) -> None:
    model = load_backend(_tiny(tmp_path))
    model.close()
    with pytest.raises(ModelError, match="closed"):
        model.infer([np.zeros((8, 8, 3), np.uint8)])


def test_requested_and_used_providers_are_a_metric_label(tmp_path: Path) -> None:
    from worker.ops.metrics import Metrics

    config = OnnxRuntimeConfig(
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"], allow_fallback=True
    )
    info = load_backend(_tiny(tmp_path), config).info
    metrics = Metrics("demo")
    metrics.model_loaded("parts/1", info.backend, info.precision, info.requested, info.used)
    text = metrics.render()[0].decode()
    assert (
        'segstream_model_info{backend="onnxruntime",model_id="parts/1",precision="fp32",'
        'requested="CUDAExecutionProvider,CPUExecutionProvider",used="CPUExecutionProvider"} 1.0'
    ) in text


@pytest.mark.parametrize(
    ("name", "backend", "precision", "used"),
    [
        ("demo-openvino.yaml", "openvino", "bf16" if cpu_supports_bf16() else "fp32", ("CPU",)),
        ("demo-int8.yaml", "openvino", "int8", ("CPU",)),
        # no GPU here: TensorRT and CUDA are left out with a warning (allow_fallback), the CPU runs it
        ("gpu-camera.yaml", "onnxruntime", "fp32", ("CPUExecutionProvider",)),
    ],
)
def test_ready_pipelines_load_their_backend(
    name: str,
    backend: str,
    precision: str,
    used: tuple[str, ...],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from worker.config import load_pipeline

    monkeypatch.setenv("SEGSTREAM_CACHE_DIR", str(tmp_path / "cache"))
    pipeline = load_pipeline(REPO / "pipelines" / name)
    assert pipeline.model.backend == backend
    runner = WorkflowRunner(
        load_workflow(pipeline.workflow), ModelRegistry([BUNDLED_MODELS_DIR]), model_config=pipeline.model
    )
    (model,) = runner.models.values()
    assert model.info.backend == backend and model.info.precision == precision and model.info.used == used
