"""COCO evaluation through the worker's own code (backend → ``postprocess_raw`` → RLE as published).

Used by ``segstream quantize`` (accuracy of an INT8 package against its float model), by
``benchmarks/backends.py`` and by ``training/evaluate.py``:

- :func:`predict`: a backend over frames, post-processed with one or several parameter sets;
- :func:`detections_to_coco`: COCO results (bbox xywh, RLE from the crops exactly as the v4 step
  encodes them, score);
- :func:`coco_eval`: pycocotools ``COCOeval`` mAP50 and mAP50:95, overall and per class;
- :func:`detections_as_ground_truth`: one model's detections as COCO ground truth, to score another
  model's *agreement* with it when there is no real ground truth;
- :func:`frames_for_ground_truth`: the frames of a video (``frame_index``) or an image folder
  (``file_name``) that a COCO file's images name.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from worker.errors import ModelError
from worker.models.backend import SegmentationBackend
from worker.step.detections import Detections
from worker.step.postprocess import PostprocessParams, postprocess_raw
from worker.step.rle import encode_crop

__all__ = [
    "EVAL_PARAMS",
    "IMAGE_SUFFIXES",
    "coco_eval",
    "detections_as_ground_truth",
    "detections_to_coco",
    "frames_for_ground_truth",
    "iter_frames",
    "predict",
    "run_cocoeval",
]

#: evaluation post-processing: a low confidence floor (mAP integrates over it), NMS IoU 0.5,
#: 100 detections per frame, accurate masks
EVAL_PARAMS = PostprocessParams(confidence=0.01, iou_threshold=0.5, max_detections=100)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def predict(
    model: SegmentationBackend,
    images: Iterable[np.ndarray],
    params: Sequence[PostprocessParams] = (EVAL_PARAMS,),
    *,
    batch: int = 8,
) -> list[list[Detections]]:
    """Run the model over ``images`` in batches and post-process each frame with every ``params``.

    Returns:
        ``out[k][i]``: detections of frame ``i`` with ``params[k]``.
    """
    out: list[list[Detections]] = [[] for _ in params]
    chunk: list[np.ndarray] = []

    def flush() -> None:
        for raw in model.infer(chunk):
            for k, p in enumerate(params):
                out[k].append(postprocess_raw(raw, p, len(model.class_names)))
        chunk.clear()

    for img in images:
        chunk.append(img)
        if len(chunk) == batch:
            flush()
    if chunk:
        flush()
    return out


def detections_to_coco(dets: Sequence[Detections], image_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO results (category id = class id + 1; RLE from the crops as the v4 step encodes them)."""
    results = []
    for image_id, d in zip(image_ids, dets, strict=True):
        for j in range(len(d)):
            x1, y1, x2, y2 = (float(v) for v in d.xyxy[j])
            crop, (ox, oy) = d.masks.crops[j], d.masks.offsets[j]
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(d.class_id[j]) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "segmentation": encode_crop(crop, (int(ox), int(oy)), d.frame_shape),
                    "score": float(d.confidence[j]),
                }
            )
    return results


def detections_as_ground_truth(
    dets: Sequence[Detections], class_names: Sequence[str], *, min_confidence: float = 0.25
) -> dict[str, Any]:
    """A model's detections (those at ``min_confidence`` or above) as COCO ground truth, ids 1..n."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, d in enumerate(dets, start=1):
        height, width = d.frame_shape
        images.append({"id": image_id, "width": int(width), "height": int(height)})
        for result in detections_to_coco([d], [image_id]):
            if result["score"] < min_confidence:
                continue
            rle = dict(result["segmentation"])
            area = float(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))
            if area <= 0:
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": result["category_id"],
                    "segmentation": rle,
                    "bbox": result["bbox"],
                    "area": area,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def run_cocoeval(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    iou_type: str,
    iou_thrs: Sequence[float] | None = None,
) -> COCOeval:
    """``COCOeval`` evaluated and accumulated (pycocotools' prints silenced)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results) if results else COCO()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if iou_thrs is not None:
            ev.params.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
    return ev


def coco_eval(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> dict[str, Any]:
    """mAP50 and mAP50:95 overall and per class (area all, 100 detections per image).

    Args:
        gt: COCO ground truth dict (its ``categories`` name the classes).
        results: COCO results.
        iou_type: ``"bbox"`` or ``"segm"``.

    Returns:
        ``{"map50", "map", "per_class": {name: {"map50", "map"}}}``.
    """
    names = {c["id"]: c["name"] for c in gt["categories"]}
    if not results:
        zero = {"map50": 0.0, "map": 0.0}
        return {**zero, "per_class": {n: dict(zero) for n in names.values()}}
    ev = run_cocoeval(gt, results, iou_type)
    prec = ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K)

    def mean(p: np.ndarray) -> float:
        p = p[p > -1]
        return float(p.mean()) if p.size else float("nan")

    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        per_class[names[cat_id]] = {"map50": mean(prec[0, :, k]), "map": mean(prec[:, :, k])}
    return {"map50": mean(prec[0]), "map": mean(prec), "per_class": per_class}


def iter_frames(path: Path, *, every: int = 1, limit: int | None = None) -> Iterator[np.ndarray]:
    """BGR frames of a video or an image folder (by name): every ``every``-th, at most ``limit``.

    Raises:
        ModelError: the path cannot be read, or holds no frames.
    """
    path = Path(path)
    count = 0
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for index, file in enumerate(files):
            if index % every or (limit is not None and count >= limit):
                continue
            image = cv2.imread(str(file), cv2.IMREAD_COLOR)
            if image is None:
                raise ModelError(f"{file}: not a readable image")
            count += 1
            yield image
    elif path.is_file():
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise ModelError(f"{path}: not a readable video")
        try:
            index = 0
            while limit is None or count < limit:
                ok, image = cap.read()
                if not ok:
                    break
                if index % every == 0:
                    count += 1
                    yield image
                index += 1
        finally:
            cap.release()
    else:
        raise ModelError(f"{path} is neither a video file nor an image folder")
    if count == 0:
        raise ModelError(f"{path}: no frames (images: {', '.join(IMAGE_SUFFIXES)})")


def frames_for_ground_truth(path: Path, gt: dict[str, Any]) -> list[np.ndarray]:
    """The frames a COCO file's images name, in the order of ``gt["images"]``.

    A video: images carry ``frame_index`` (the demo clip's COCO file does). An image folder:
    images are found by ``file_name``.

    Raises:
        ModelError: a frame the ground truth names is not there.
    """
    path = Path(path)
    images = gt.get("images") or []
    if path.is_dir():
        out = []
        for image in images:
            file = path / str(image["file_name"])
            frame = cv2.imread(str(file), cv2.IMREAD_COLOR) if file.is_file() else None
            if frame is None:
                raise ModelError(f"ground truth image {file} is missing or unreadable")
            out.append(frame)
        return out
    if any("frame_index" not in image for image in images):
        raise ModelError(f"ground truth for the video {path} must give each image a 'frame_index'")
    wanted = {int(image["frame_index"]) for image in images}
    found: dict[int, np.ndarray] = {}
    last = max(wanted, default=-1)
    for index, frame in enumerate(iter_frames(path, limit=last + 1)):
        if index in wanted:
            found[index] = frame
    missing = sorted(wanted - set(found))
    if missing:
        raise ModelError(f"{path} has no frames {missing[:5]} that the ground truth names")
    return [found[int(image["frame_index"])] for image in images]
