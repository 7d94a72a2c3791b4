"""The shipped demo model: loads through the worker's backend, spec layout, accuracy on fresh frames."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from training.data import TEST
from training.evaluate import (
    DEFAULT_PACKAGE,
    clip_seed_spread,
    coco_eval,
    detections_to_coco,
    predict,
    synthetic_set,
)
from worker.models.onnx_backend import OnnxSegmentationModel
from worker.models.package import load_model_metadata
from worker.step.postprocess import PostprocessParams

CLASSES = ("nut", "washer", "bolt", "bracket")


@pytest.fixture(scope="module")
def model() -> OnnxSegmentationModel:
    return OnnxSegmentationModel(DEFAULT_PACKAGE, intra_op_threads=2, inter_op_threads=1)


def test_package_files_and_metadata() -> None:
    weights = DEFAULT_PACKAGE / "weights.onnx"
    assert weights.stat().st_size <= 10 * 1024 * 1024
    meta = load_model_metadata(DEFAULT_PACKAGE)
    assert meta.class_names == CLASSES
    # trained at 320x320; run by default at the size chosen on validation frames (training.evaluate)
    assert meta.input_size == (480, 480) and meta.pad_value == 114 and meta.dynamic_input
    rec = meta.recommended_parameters
    assert rec is not None and rec.confidence is not None
    assert set(rec.per_class_confidence) == set(CLASSES)
    assert all(0.05 <= t <= 0.95 for t in rec.per_class_confidence.values())
    raw = json.loads((DEFAULT_PACKAGE / "metadata.json").read_text())
    assert raw["provenance"]["seed"] == 0 and raw["provenance"]["train_minutes"] > 0
    evaluation = raw["provenance"]["evaluation"]
    # what `python -m training.evaluate --input-sizes ... --write --clip-seeds 1 2 3 4 5 6` measured
    # for these weights at 480: held-out 0.934 / 0.750, clip 0.919, the clip's design with six other
    # seeds 0.822-0.965; the targets are 0.92 / 0.75 / 0.85. These floors catch a package
    # whose weights and recorded metrics went apart.
    assert evaluation["input_size"] == [480, 480]
    assert evaluation["held_out"]["frames"] >= 300
    assert evaluation["held_out"]["segm_accurate"]["map50"] >= 0.92
    assert evaluation["held_out"]["segm_accurate"]["map"] >= 0.75
    assert evaluation["clip"]["frames"] == 250
    assert evaluation["clip"]["segm_accurate"]["map50"] >= 0.85
    assert evaluation["clip_seeds"]["summary"]["mean_map50"] >= 0.85


def test_onnx_metadata_props_are_ultralytics_style() -> None:
    props = {p.key: p.value for p in onnx.load(str(DEFAULT_PACKAGE / "weights.onnx")).metadata_props}
    assert props["names"] == "{0: 'nut', 1: 'washer', 2: 'bolt', 3: 'bracket'}"
    # the default input size, as in metadata.json (trained at 320: provenance.input_size_trained)
    assert props["imgsz"] == "[480, 480]"
    assert props["stride"] == "32" and props["task"] == "segment"


@pytest.mark.parametrize(("size", "anchors"), [((320, 320), 2100), ((640, 640), 8400), ((256, 448), 2352)])
def test_outputs_have_the_spec_layout_at_several_input_sizes(size: tuple[int, int], anchors: int) -> None:
    m = OnnxSegmentationModel(DEFAULT_PACKAGE, intra_op_threads=2, input_size=size, warmup=False)
    raws = m.infer([np.zeros((720, 1280, 3), np.uint8), np.zeros((300, 300, 3), np.uint8)])
    h, w = size
    for raw in raws:
        assert raw.predictions.shape == (4 + 4 + 32, anchors)
        assert raw.prototypes.shape == (32, h // 4, w // 4)
        scores = raw.predictions[4:8]
        assert scores.min() >= 0.0 and scores.max() <= 1.0  # already sigmoid


def test_segm_map50_on_fresh_frames(model: OnnxSegmentationModel) -> None:
    images, gt = synthetic_set(20261128, TEST, 30)  # a seed that neither training nor evaluation uses
    (dets,) = predict(
        model, images, [PostprocessParams(confidence=0.01, iou_threshold=0.5, max_detections=100)]
    )
    assert sum(len(d) for d in dets) > 0
    report = coco_eval(gt, detections_to_coco(dets, [im["id"] for im in gt["images"]]), "segm")
    assert report["map50"] >= 0.85, report


def test_clip_seed_spread_scores_freshly_made_clips(model: OnnxSegmentationModel) -> None:
    # two short clips (5 frames each) of the demo clip's design with seeds other than the shipped one
    spread = clip_seed_spread(model, [7, 8], seconds=0.2)
    assert set(spread) == {"7", "8", "summary"}
    scores = [spread[s]["map50"] for s in ("7", "8")]
    assert all(0.0 <= v <= 1.0 for v in scores) and max(scores) >= 0.5, spread
    summary = spread["summary"]
    assert summary["min_map50"] == min(scores) and summary["max_map50"] == max(scores)
    assert summary["mean_map50"] == pytest.approx(sum(scores) / 2)
