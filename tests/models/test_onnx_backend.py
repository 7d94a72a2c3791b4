from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests.support.onnx_models import (
    NUM_COEFFICIENTS,
    build_segmentation_model,
    candidate_rows,
    package_metadata,
    save_model,
    ultralytics_metadata_props,
    write_model_package,
)
from worker.errors import ModelError
from worker.models.letterbox import compute_letterbox
from worker.models.onnx_backend import OnnxSegmentationModel, RawSegmentation

NAMES = ["bolt", "nut"]
C = len(NAMES)
ROWS = candidate_rows(
    boxes_cxcywh=[[32, 32, 16, 16], [10, 20, 8, 4], [50, 40, 20, 30]],
    class_scores=[[0.9, 0.1], [0.2, 0.6], [0.05, 0.3]],
    coefficients=np.arange(3 * NUM_COEFFICIENTS, dtype=np.float32).reshape(3, NUM_COEFFICIENTS) / 100,
)
PROTOS = np.random.default_rng(0).normal(size=(NUM_COEFFICIENTS, 16, 16)).astype(np.float32)


def _frames() -> list[np.ndarray]:
    """Frames of different sizes and contents: landscape, portrait, square, tiny, 1080p."""
    rng = np.random.default_rng(7)
    shapes = [(48, 80), (90, 30), (64, 64), (3, 5), (1080, 1920)]
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]


def _package(tmp_path: Path, name: str = "pkg", **model_kwargs: Any) -> Path:
    model_kwargs.setdefault("candidates", ROWS)
    model_kwargs.setdefault("prototypes", PROTOS)
    model = build_segmentation_model(C, input_size=(64, 64), **model_kwargs)
    doc = package_metadata(NAMES, None if model_kwargs.get("dynamic_spatial") else (64, 64))
    if model_kwargs.get("dynamic_spatial"):
        doc["input_size"] = [64, 64]
    return write_model_package(tmp_path / name, model, doc)


def _input_dependent(
    tmp_path: Path, name: str = "dep", *, session_batch: int | None = 16, **kwargs: Any
) -> OnnxSegmentationModel:
    gain = np.zeros_like(ROWS)
    gain[4:6] = 1.0  # class scores grow with the frame's mean brightness
    gain[0] = 10.0  # and so does cx
    folder = _package(tmp_path, name, input_gain=gain, prototype_gain=np.linspace(0.5, 2.0, 32), **kwargs)
    return OnnxSegmentationModel(folder, intra_op_threads=1, session_batch=session_batch)


def test_constant_outputs_pass_through(tmp_path: Path) -> None:
    model = OnnxSegmentationModel(_package(tmp_path), intra_op_threads=1, inter_op_threads=1)
    assert model.class_names == ("bolt", "nut") and model.num_classes == 2
    assert model.input_size == (64, 64) and model.input_name == "images" and model.dynamic_batch
    frames = _frames()
    results = model.infer(frames)
    assert len(results) == len(frames)
    for frame, result in zip(frames, results, strict=True):
        assert isinstance(result, RawSegmentation)
        assert result.predictions.shape == (4 + C + 32, 3) and result.predictions.dtype == np.float32
        np.testing.assert_array_equal(result.predictions, ROWS)
        assert result.prototypes.shape == (32, 16, 16) and result.prototypes.dtype == np.float32
        np.testing.assert_array_equal(result.prototypes, PROTOS)
        assert result.letterbox == compute_letterbox(frame.shape[:2], (64, 64))


def test_batch_of_different_sizes_equals_each_frame_alone(tmp_path: Path) -> None:
    model = _input_dependent(tmp_path)
    frames = _frames()
    batched = model.infer(frames)
    alone = [model.infer([frame])[0] for frame in frames]
    means = []
    for b, a in zip(batched, alone, strict=True):
        np.testing.assert_allclose(b.predictions, a.predictions, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b.prototypes, a.prototypes, rtol=1e-6, atol=1e-6)
        assert b.letterbox == a.letterbox
        means.append(float(b.predictions[4, 0] - ROWS[4, 0]))
    # the outputs really depend on each frame: the batch did not repeat one frame
    assert len({round(m, 4) for m in means}) == len(frames)


def test_static_batch_models_run_in_chunks(tmp_path: Path) -> None:
    dynamic = _input_dependent(tmp_path, "dynamic")
    frames = _frames()
    expected = dynamic.infer(frames)
    for batch in (1, 2):
        static = _input_dependent(tmp_path, f"static{batch}", dynamic_batch=False, static_batch=batch)
        assert not static.dynamic_batch
        got = static.infer(frames)  # 5 frames: chunks of `batch`, the last one padded
        assert len(got) == len(frames)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g.predictions, e.predictions, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(g.prototypes, e.prototypes, rtol=1e-6, atol=1e-6)


def test_session_batch_splits_a_batch_into_session_runs(tmp_path: Path) -> None:
    whole = _input_dependent(tmp_path, "whole")
    frames = _frames()
    expected = whole.infer(frames)
    for session_batch, runs in ((1, 5), (2, 3), (4, 2), (8, 1)):
        model = _input_dependent(tmp_path, f"sb{session_batch}", session_batch=session_batch)
        sizes: list[int] = []
        run = model._run

        def counting(batch: np.ndarray, run: Any = run, sizes: list[int] = sizes) -> Any:
            sizes.append(batch.shape[0])
            return run(batch)

        model._run = counting  # type: ignore[method-assign]
        got = model.infer(frames)
        assert len(sizes) == runs and sum(sizes) == len(frames) and max(sizes) <= session_batch
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g.predictions, e.predictions, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(g.prototypes, e.prototypes, rtol=1e-6, atol=1e-6)
            assert g.letterbox == e.letterbox


def test_session_batch_default_follows_the_session_threads(tmp_path: Path) -> None:
    folder = _package(tmp_path)
    # one CPU thread: frame by frame (a batch only adds cache pressure); more threads: whole batches
    assert OnnxSegmentationModel(folder, intra_op_threads=1).session_batch == 1
    assert OnnxSegmentationModel(folder, intra_op_threads=2).session_batch is None
    assert OnnxSegmentationModel(folder, intra_op_threads=0).session_batch is None
    assert OnnxSegmentationModel(folder, intra_op_threads=1, session_batch=4).session_batch == 4
    static = _input_dependent(tmp_path, "static", dynamic_batch=False, static_batch=2, session_batch=None)
    assert static.session_batch == 2  # a fixed-batch model runs its own batch size
    with pytest.raises(ValueError, match="session_batch"):
        OnnxSegmentationModel(folder, session_batch=0)


def test_prototypes_show_the_frame_where_the_letterbox_put_it(tmp_path: Path) -> None:
    folder = _package(tmp_path, prototypes=np.zeros((32, 16, 16), np.float32), prototype_gain=np.ones(32))
    model = OnnxSegmentationModel(folder, intra_op_threads=1)
    white = np.full((32, 64, 3), 255, np.uint8)  # 2:1 landscape -> rows 16..47 of the 64x64 input
    result = model.infer([white])[0]
    x0, y0, x1, y1 = result.letterbox.content_region((16, 16))
    assert (x0, y0, x1, y1) == (0, 4, 16, 12)
    np.testing.assert_allclose(result.prototypes[:, 4:12, :], 1.0, atol=1e-6)
    np.testing.assert_allclose(result.prototypes[:, :4, :], 114 / 255, atol=1e-6)
    np.testing.assert_allclose(result.prototypes[:, 12:, :], 114 / 255, atol=1e-6)


def test_thread_and_graph_options_applied(tmp_path: Path) -> None:
    model = OnnxSegmentationModel(_package(tmp_path), intra_op_threads=2, inter_op_threads=3)
    options = model.session_options
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 3
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert model.providers == ["CPUExecutionProvider"]
    sequential = OnnxSegmentationModel(_package(tmp_path, "p2"), intra_op_threads=1, inter_op_threads=1)
    assert sequential.session_options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert sequential.session_options.intra_op_num_threads == 1
    with pytest.raises(ValueError, match="thread counts"):
        OnnxSegmentationModel(_package(tmp_path, "p3"), intra_op_threads=-1)


def test_input_size_override(tmp_path: Path) -> None:
    dynamic = OnnxSegmentationModel(
        _package(tmp_path, "dyn", dynamic_spatial=True), intra_op_threads=1, input_size=(128, 96)
    )
    assert dynamic.metadata.dynamic_input and dynamic.input_size == (128, 96)
    frame = np.zeros((100, 50, 3), np.uint8)
    result = dynamic.infer([frame])[0]
    assert result.prototypes.shape == (32, 32, 24)
    assert result.letterbox == compute_letterbox((100, 50), (128, 96))
    with pytest.raises(ValueError, match="multiples of stride"):
        OnnxSegmentationModel(_package(tmp_path, "dyn2", dynamic_spatial=True), input_size=(100, 96))
    with pytest.raises(ModelError, match="fixed"):
        OnnxSegmentationModel(_package(tmp_path, "fixed"), input_size=(128, 128))


def test_ultralytics_onnx_file_loads_directly(tmp_path: Path) -> None:
    props = ultralytics_metadata_props(NAMES, (64, 64))
    weights = save_model(
        build_segmentation_model(C, candidates=ROWS, metadata_props=props), tmp_path / "m.onnx"
    )
    model = OnnxSegmentationModel(weights, intra_op_threads=1)
    assert model.class_names == tuple(NAMES) and model.weights_path == weights
    np.testing.assert_array_equal(model.infer([np.zeros((10, 10, 3), np.uint8)])[0].predictions, ROWS)


def test_layout_mismatch_found_at_load_time(tmp_path: Path) -> None:
    model = build_segmentation_model(3)  # 4 + 3 + 32 channels
    folder = write_model_package(tmp_path / "p", model, package_metadata(NAMES, (64, 64)))
    with pytest.raises(ModelError, match="39 channels but 2 class names") as info:
        OnnxSegmentationModel(folder, model_id="parts/1")
    assert info.value.model_id == "parts/1"


def test_layout_mismatch_behind_dynamic_dims_found_by_warmup(tmp_path: Path) -> None:
    model = build_segmentation_model(3, hide_channel_count=True)
    folder = write_model_package(tmp_path / "p", model, package_metadata(NAMES, (64, 64)))
    with pytest.raises(ModelError, match=r"predictions output has shape \(1, 39, 1\)"):
        OnnxSegmentationModel(folder)
    lazy = OnnxSegmentationModel(folder, warmup=False)
    with pytest.raises(ModelError, match="expected"):
        lazy.infer([np.zeros((8, 8, 3), np.uint8)])


def test_session_errors_become_model_errors(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "weights.onnx").write_bytes(b"\x08\x07garbage")
    (folder / "metadata.json").write_text('{"class_names": ["a"]}')
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        OnnxSegmentationModel(folder)
    with pytest.raises(
        ModelError, match=r"execution providers \[.NoSuchExecutionProvider.\] are not available"
    ):
        OnnxSegmentationModel(_package(tmp_path), providers=("NoSuchExecutionProvider",))
    with pytest.raises(ModelError, match="does not exist"):
        OnnxSegmentationModel(tmp_path / "missing")


def test_bad_frames_and_empty_batch(tmp_path: Path) -> None:
    model = OnnxSegmentationModel(_package(tmp_path), intra_op_threads=1)
    assert model.infer([]) == []
    with pytest.raises(ValueError, match="uint8"):
        model.infer([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="H, W, 3"):
        model.infer([np.zeros((8, 8), np.uint8)])


def test_concurrent_calls_from_threads_are_independent(tmp_path: Path) -> None:
    model = _input_dependent(tmp_path)
    frames = _frames()
    expected = [model.infer([f])[0] for f in frames]
    failures: list[BaseException] = []

    def work(order: list[int]) -> None:
        try:
            for _ in range(5):
                got = model.infer([frames[i] for i in order])
                for i, g in zip(order, got, strict=True):
                    np.testing.assert_allclose(g.predictions, expected[i].predictions, rtol=1e-6, atol=1e-6)
                    np.testing.assert_allclose(g.prototypes, expected[i].prototypes, rtol=1e-6, atol=1e-6)
        except BaseException as exc:  # collected and re-raised in the test thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(order,)) for order in ([0, 1, 2, 3, 4], [4, 2, 0], [3, 1])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not failures, failures
