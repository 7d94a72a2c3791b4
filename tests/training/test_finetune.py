"""Fine-tuning from a labelled dataset in the active-learning layout, the bundled model as the start."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

torch = pytest.importorskip("torch")

from training.data import TEST, eval_frame  # noqa: E402
from training.export import check_export  # noqa: E402
from training.finetune import DEFAULT_BASE, annotation_files, finetune, load_coco_dataset, load_onnx_weights  # noqa: E402
from training.model import SegNet  # noqa: E402
from worker.active_learning.dataset import DatasetWriter, Sample  # noqa: E402
from worker.models.onnx_backend import OnnxSegmentationModel  # noqa: E402
from worker.step.detections import Detections, MaskCrops  # noqa: E402

NAMES = ("nut", "washer", "bolt", "bracket")


def labelled_dataset(root: Path, frames: int, segmentation_format: str = "rle") -> Path:
    """Synthetic frames with their exact masks, written by the active-learning writer (as if labelled)."""
    writer = DatasetWriter(root, queue_size=frames, segmentation_format=segmentation_format)
    writer.start()
    for i in range(frames):
        scene = eval_frame(11, TEST, i, 160)
        crops, offsets, boxes = [], [], []
        for mask in scene.masks:
            ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            crops.append(mask[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1].astype(bool))
            offsets.append((xs[0], ys[0]))
            boxes.append((xs[0], ys[0], xs[-1] + 1, ys[-1] + 1))
        n = len(crops)
        det = Detections(
            xyxy=np.array(boxes, np.float32).reshape(n, 4),
            confidence=np.ones(n, np.float32),
            class_id=np.asarray(scene.class_ids, np.int64),
            masks=MaskCrops(crops, np.array(offsets, np.int64).reshape(n, 2)),
            frame_shape=scene.image.shape[:2],
        )
        meta = {"source": "synth", "frame_id": f"synth:{i}", "frame_number": i, "strategy": "unsure"}
        assert writer.try_put(Sample("parts", "al_batch", scene.image, det, NAMES, meta))
    assert writer.close(timeout=60) == 0
    return root / "parts"


def test_the_bundled_onnx_weights_load_back_into_the_network() -> None:
    net = SegNet(4)
    assert load_onnx_weights(net, DEFAULT_BASE / "weights.onnx") == 72
    diffs = check_export(net, DEFAULT_BASE / "weights.onnx")  # raises beyond 1e-3 of the output range
    assert diffs["output1"] < 1e-4 and diffs["output0"] < 1e-2


def test_coco_batches_become_training_arrays(tmp_path: Path) -> None:
    data = labelled_dataset(tmp_path / "dataset", 3)
    files = annotation_files([data])
    assert [f.parent.name for f in files] == ["al_batch"]
    ds, stats = load_coco_dataset(files, NAMES, size=160)
    assert len(ds) == 3 and ds.images.shape == (3, 160, 160, 3)
    assert stats["instances"] == int((ds.class_ids >= 0).sum()) > 0
    valid = ds.class_ids >= 0
    boxes = ds.boxes[valid]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes >= 0).all() and (boxes <= 160).all()
    assert ds.masks.shape[1:] == (40, 40) and ds.masks.max() == 255
    with pytest.raises(ValueError, match="is not a class of the model"):
        load_coco_dataset(files, ("gear", "sprocket", "bolt", "bracket"), size=160)


def test_polygon_exports_load_like_rle_ones(tmp_path: Path) -> None:
    rle, _ = load_coco_dataset(annotation_files([labelled_dataset(tmp_path / "rle", 3)]), NAMES, size=160)
    poly, _ = load_coco_dataset(
        annotation_files([labelled_dataset(tmp_path / "poly", 3, "polygon")]), NAMES, size=160
    )
    # the same parts of the same classes (in another order: a filled-in hole changes an area's rank)
    for a, b in zip(rle.class_ids, poly.class_ids, strict=True):
        assert sorted(a.tolist()) == sorted(b.tolist())
    assert (rle.class_ids >= 0).sum() > 0


def test_a_few_fine_tuning_steps_write_a_loadable_package(tmp_path: Path) -> None:
    data = labelled_dataset(tmp_path / "dataset", 4)
    meta = finetune([data], out=tmp_path / "pkg", steps=2, batch=2, size=160, precision="fp32", log_every=1)
    saved = json.loads((tmp_path / "pkg" / "metadata.json").read_text())
    assert saved == json.loads(json.dumps(meta))
    assert saved["class_names"] == list(NAMES) and "recommended_parameters" not in saved
    assert saved["provenance"]["steps"] == 2 and saved["provenance"]["data_stats"]["images"] == 4
    assert max(saved["provenance"]["export_check_max_abs_diff"].values()) < 1e-2
    model = OnnxSegmentationModel(tmp_path / "pkg", intra_op_threads=1)
    assert model.class_names == NAMES
    (raw,) = model.infer([np.zeros((90, 160, 3), np.uint8)])
    assert raw.predictions.shape[0] == 4 + 4 + 32
    # the weights moved from the start (a real step happened) but stayed a working network
    base = OnnxSegmentationModel(DEFAULT_BASE, intra_op_threads=1, input_size=model.input_size)
    frame = eval_frame(11, TEST, 0, 160).image
    tuned_out, base_out = model.infer([frame])[0].predictions, base.infer([frame])[0].predictions
    assert tuned_out.shape == base_out.shape and not np.array_equal(tuned_out, base_out)
    assert np.isfinite(tuned_out).all()


def test_the_clip_ground_truth_stands_in_for_a_labeller(tmp_path: Path) -> None:
    import cv2

    from training.label_from_clip import DEFAULT_GT, label_from_clip

    cap = cv2.VideoCapture(str(DEFAULT_GT.parent / "demo_clip.mp4"))
    writer = DatasetWriter(tmp_path, queue_size=4)
    writer.start()
    for n in range(3):
        ok, image = cap.read()
        assert ok
        meta = {"source": "belt", "frame_id": f"belt:{n}", "frame_number": n, "strategy": "unsure"}
        if n != 1:  # frame 1 is not sampled
            det = Detections.empty((720, 1280))
            assert writer.try_put(Sample("parts", "b", image, det, NAMES, meta))
    cap.release()
    assert writer.close(timeout=30) == 0
    (file,) = annotation_files([tmp_path])
    assert label_from_clip([file]) == 2
    ours = COCO(str(file))
    gt = COCO(str(DEFAULT_GT))
    for image in ours.imgs.values():
        frame = image["segstream"]["frame_number"]
        (gt_id,) = [i for i, g in gt.imgs.items() if g["frame_index"] == frame]
        want = sorted((a["bbox"], a["area"]) for a in gt.loadAnns(gt.getAnnIds(imgIds=gt_id)))
        got = sorted((a["bbox"], a["area"]) for a in ours.loadAnns(ours.getAnnIds(imgIds=image["id"])))
        assert got == want and got
