"""Evaluate a model package with COCOeval and write its recommended confidence thresholds.

Usage::

    python -m training.evaluate --package worker/bundled_models/factory-parts/1 \
        --input-sizes 320 384 416 448 480 512 --write

Everything goes through the worker's own code: a ``SegmentationBackend`` (letterbox + batched
inference; ``--backend`` picks ONNX Runtime or OpenVINO) and ``postprocess_frame`` (thresholds, NMS,
crop-based mask decoding), masks encoded with ``worker.step.rle.encode_crop`` exactly as the v4 step
publishes them.

- Held-out frames: ``--frames`` generated frames of stream ``[--seed, TEST]`` (never used in
  training), at their original sizes (320x320 squares and 640x360 wide frames).
- The demo clip: every frame of ``worker/assets/demo_clip.mp4`` against ``demo_clip_coco.json``.
- Other clips (``--clip-seeds``): the same clip design with other seeds, written by
  ``training.make_clip`` into a temporary folder and scored the same way (segm, ``accurate``).
  A clip has one belt, one exposure and one light for all its frames, so one clip's score moves
  with its seed far more than the held-out score does; this shows by how much.
- bbox and segm mAP50 and mAP50:95 (pycocotools ``COCOeval``), overall and per class, for each
  ``mask_decode_mode`` (bbox results do not depend on the mode; they are reported once).
- Input size (``--input-sizes``): the network is fully convolutional, so it can run at another
  input than it was trained at; each size is tried on the validation frames and the best segm
  mAP50:95 becomes the package's default ``input_size`` (``--write``); thresholds and metrics are
  then measured at that size, and ``--write`` also puts it in the ONNX file's ``imgsz``.
- Recommended thresholds: on ``--val-frames`` frames of stream ``[--val-seed, VAL]``, for each
  class the confidence that maximises F1 of mask matches at IoU 0.5 (and one over all classes).
  ``--write`` stores them in the package's ``metadata.json`` as ``recommended_parameters`` (used by
  ``confidence_mode: best``) together with the metrics under ``provenance.evaluation``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from training.data import TEST, VAL, eval_frame
from training.make_clip import CLIP_FILE, GT_FILE, coco_categories, make_clip
from training.synth import CLASS_NAMES
from worker.models.backend import SegmentationBackend
from worker.models.config import OnnxRuntimeConfig, OpenVinoConfig
from worker.models.evaluation import coco_eval as _coco_eval
from worker.models.evaluation import detections_to_coco, predict, run_cocoeval
from worker.models.registry import load_backend
from worker.step.postprocess import PostprocessParams

__all__ = [
    "MODES",
    "clip_seed_spread",
    "coco_eval",
    "detections_to_coco",
    "eval_params",
    "f1_thresholds",
    "load_clip",
    "predict",
    "scenes_to_coco",
    "set_onnx_imgsz",
    "synthetic_set",
]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PACKAGE = REPO / "worker" / "bundled_models" / "factory-parts" / "1"
DEFAULT_ASSETS = REPO / "worker" / "assets"
MODES: tuple[tuple[str, float], ...] = (("accurate", 0.0), ("tradeoff", 0.5), ("fast", 0.0))


def synthetic_set(seed: int, purpose: int, n: int) -> tuple[list[np.ndarray], dict[str, Any]]:
    """``n`` generated frames (BGR, original sizes) of stream ``[seed, purpose]`` and their COCO GT."""
    images, masks, classes = [], [], []
    for i in range(n):
        scene = eval_frame(seed, purpose, i)
        images.append(scene.image)
        masks.append(scene.masks)
        classes.append(scene.class_ids)
    return images, scenes_to_coco([im.shape[:2] for im in images], masks, classes)


def scenes_to_coco(
    shapes: Sequence[tuple[int, int]], masks: Sequence[Sequence[np.ndarray]], classes: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """COCO ground truth (image ids 1..n, category id = class id + 1) from full-frame bool masks."""
    images, anns = [], []
    for i, ((h, w), ms, cs) in enumerate(zip(shapes, masks, classes, strict=True), start=1):
        images.append({"id": i, "width": int(w), "height": int(h)})
        for m, c in zip(ms, cs, strict=True):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(c) + 1,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": int(m.sum()),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    return {"images": images, "annotations": anns, "categories": coco_categories()}


def load_clip(assets: Path = DEFAULT_ASSETS) -> tuple[Iterator[np.ndarray], dict[str, Any]]:
    """The demo clip's frames (a lazy iterator, BGR) and its COCO ground truth."""
    gt = json.loads((Path(assets) / GT_FILE).read_text())

    def frames() -> Iterator[np.ndarray]:
        cap = cv2.VideoCapture(str(Path(assets) / CLIP_FILE))
        try:
            while True:
                ok, img = cap.read()
                if not ok:
                    return
                yield img
        finally:
            cap.release()

    return frames(), gt


def coco_eval(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> dict[str, Any]:
    """mAP50 and mAP50:95 overall and per class (``worker.models.evaluation.coco_eval``)."""
    return _coco_eval(gt, results, iou_type)


def f1_thresholds(gt: dict[str, Any], results: list[dict[str, Any]]) -> tuple[float, dict[str, float]]:
    """Confidence thresholds that maximise F1 (mask IoU >= 0.5 matches), overall and per class.

    Returns:
        ``(overall, {class name: threshold})``; classes without ground truth are left out.
    """
    ev = run_cocoeval(gt, results, "segm", iou_thrs=[0.5])
    scores: dict[int, list[np.ndarray]] = {c: [] for c in ev.params.catIds}
    matched: dict[int, list[np.ndarray]] = {c: [] for c in ev.params.catIds}
    n_gt = dict.fromkeys(ev.params.catIds, 0)
    all_area = ev.params.areaRng[0]
    for e in ev.evalImgs:
        if e is None or e["aRng"] != all_area:
            continue
        c = e["category_id"]
        keep = ~np.asarray(e["dtIgnore"][0], bool)
        scores[c].append(np.asarray(e["dtScores"], np.float64)[keep])
        matched[c].append(np.asarray(e["dtMatches"][0], np.float64)[keep] > 0)
        n_gt[c] += int((~np.asarray(e["gtIgnore"], bool)).sum())

    def best(s: np.ndarray, m: np.ndarray, total: int) -> float:
        if total == 0 or s.size == 0:
            return 0.5
        order = np.argsort(-s, kind="stable")
        s, m = s[order], m[order]
        tp = np.cumsum(m)
        precision = tp / np.arange(1, s.size + 1)
        recall = tp / total
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        # the threshold must keep everything up to the best index: only positions where the
        # next score is lower can be cut at
        cut = np.append(s[1:] < s[:-1], True)
        i = int(np.argmax(np.where(cut, f1, -1)))
        return float(np.floor(s[i] * 1000) / 1000)

    per_class = {}
    for c in ev.params.catIds:
        if n_gt[c]:
            s = np.concatenate(scores[c]) if scores[c] else np.zeros(0)
            m = np.concatenate(matched[c]) if matched[c] else np.zeros(0, bool)
            per_class[CLASS_NAMES[c - 1]] = best(s, m, n_gt[c])
    s_all = np.concatenate([np.concatenate(v) for v in scores.values() if v] or [np.zeros(0)])
    m_all = np.concatenate([np.concatenate(v) for v in matched.values() if v] or [np.zeros(0, bool)])
    return best(s_all, m_all, sum(n_gt.values())), per_class


def eval_params(mode: str, factor: float, confidence: float, iou: float) -> PostprocessParams:
    """Post-processing settings for evaluation (at most 100 detections per frame)."""
    return PostprocessParams(
        confidence=confidence,
        iou_threshold=iou,
        max_detections=100,
        mask_decode_mode=mode,  # type: ignore[arg-type]
        tradeoff_factor=factor,
    )


def evaluate_set(
    model: SegmentationBackend,
    images: Iterable[np.ndarray],
    gt: dict[str, Any],
    *,
    modes: Sequence[tuple[str, float]] = MODES,
    confidence: float = 0.01,
    iou: float = 0.5,
) -> dict[str, Any]:
    """bbox metrics and segm metrics per mask decode mode on one image set."""
    params = [eval_params(m, f, confidence, iou) for m, f in modes]
    t0 = time.monotonic()
    dets = predict(model, images, params)
    ids = [im["id"] for im in gt["images"]]
    report: dict[str, Any] = {"frames": len(ids), "instances": len(gt["annotations"])}
    for (mode, factor), d in zip(modes, dets, strict=True):
        results = detections_to_coco(d, ids[: len(d)])
        if "bbox" not in report:
            report["bbox"] = coco_eval(gt, results, "bbox")
        key = f"segm_{mode}" + (f"_{factor:g}" if mode == "tradeoff" else "")
        report[key] = coco_eval(gt, results, "segm")
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


def format_table(name: str, report: dict[str, Any]) -> str:
    """A markdown table of one set's metrics (rows: overall and each class)."""
    cols = [k for k in report if k == "bbox" or k.startswith("segm_")]
    head = "| " + name + " | " + " | ".join(f"{c} mAP50 | {c} mAP50:95" for c in cols) + " |"
    sep = "|---" * (1 + 2 * len(cols)) + "|"
    rows = [head, sep]
    for cls in ("all", *CLASS_NAMES):
        cells = []
        for c in cols:
            r = (
                report[c]
                if cls == "all"
                else report[c]["per_class"].get(cls, {"map50": float("nan"), "map": float("nan")})
            )
            cells.append(f"{r['map50']:.3f} | {r['map']:.3f}")
        rows.append(f"| {cls} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="COCO evaluation of a model package through the worker's code.")
    ap.add_argument("--package", type=Path, default=DEFAULT_PACKAGE)
    ap.add_argument(
        "--assets", type=Path, default=DEFAULT_ASSETS, help="folder with the demo clip and its GT"
    )
    ap.add_argument("--seed", type=int, default=1, help="seed of the held-out test frames")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--val-seed", type=int, default=2, help="seed of the validation frames (thresholds)")
    ap.add_argument("--val-frames", type=int, default=300)
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument(
        "--clip-seeds",
        type=int,
        nargs="+",
        default=[],
        help="also generate the demo clip with these seeds and score each (segm, accurate)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--backend",
        choices=("onnxruntime", "openvino"),
        default="onnxruntime",
        help="engine (openvino runs at precision auto: BF16 where the CPU has it)",
    )
    ap.add_argument("--write", action="store_true", help="write thresholds and metrics into metadata.json")
    ap.add_argument("--report", type=Path, default=REPO / "training" / "runs" / "evaluation.json")
    ap.add_argument(
        "--input-sizes",
        type=int,
        nargs="+",
        default=None,
        help="square input sizes to try on the validation frames; the best (segm mAP50:95, accurate "
        "masks) becomes the package's default input size (the network is fully convolutional)",
    )
    a = ap.parse_args(argv)

    evaluation: dict[str, Any] = {
        "iou_threshold_nms": 0.5,
        "confidence_floor": 0.01,
        "max_detections": 100,
        "tradeoff_factor": 0.5,
    }

    images, gt = synthetic_set(a.val_seed, VAL, a.val_frames)
    size: tuple[int, int] | None = None
    if a.input_sizes:
        sweep = {}
        for s in a.input_sizes:
            m = _load(a, (s, s))
            r = evaluate_set(m, images, gt, modes=(("accurate", 0.0),))
            sweep[s] = {"segm_map": r["segm_accurate"]["map"], "segm_map50": r["segm_accurate"]["map50"]}
            print(
                f"validation at input {s}x{s}: segm mAP50 {sweep[s]['segm_map50']:.3f}, "
                f"mAP50:95 {sweep[s]['segm_map']:.3f}",
                flush=True,
            )
        best = max(sweep, key=lambda s: (round(sweep[s]["segm_map"], 3), sweep[s]["segm_map50"], -s))
        size = (best, best)
        evaluation["input_size_selection"] = {
            "chosen": best,
            "by": "segm mAP50:95 (accurate) on the validation frames",
            "validation": {str(k): v for k, v in sweep.items()},
        }
        print(f"default input size: {best}x{best}", flush=True)
    model = _load(a, size)
    evaluation["input_size"] = list(model.input_size)
    (val_dets,) = predict(model, images, [eval_params("accurate", 0.0, 0.01, 0.5)])
    overall, per_class = f1_thresholds(gt, detections_to_coco(val_dets, [im["id"] for im in gt["images"]]))
    print(f"F1-optimal thresholds on {a.val_frames} validation frames: {overall} {per_class}", flush=True)

    images, gt = synthetic_set(a.seed, TEST, a.frames)
    evaluation["held_out"] = {"seed": a.seed, **evaluate_set(model, images, gt)}
    print(format_table(f"held-out ({a.frames} frames)", evaluation["held_out"]), flush=True)
    if not a.no_clip:
        frames, clip_gt = load_clip(a.assets)
        evaluation["clip"] = evaluate_set(model, frames, clip_gt)
        print(format_table("demo clip", evaluation["clip"]), flush=True)
    if a.clip_seeds:
        evaluation["clip_seeds"] = clip_seed_spread(model, a.clip_seeds)

    a.report.parent.mkdir(parents=True, exist_ok=True)
    a.report.write_text(json.dumps({"thresholds": [overall, per_class], **evaluation}, indent=2))
    if a.write:
        path = a.package / "metadata.json"
        meta = json.loads(path.read_text())
        meta["recommended_parameters"] = {"confidence": overall, "per_class_confidence": per_class}
        meta["input_size"] = list(model.input_size)  # the thresholds and metrics hold at this size
        meta.setdefault("provenance", {})["evaluation"] = _compact(evaluation)
        meta["provenance"]["thresholds"] = {
            "method": "per-class F1-optimal confidence, mask IoU 0.5, accurate masks",
            "frames": a.val_frames,
            "seed": a.val_seed,
        }
        path.write_text(json.dumps(meta, indent=2) + "\n")
        set_onnx_imgsz(a.package / "weights.onnx", model.input_size)
        print(f"wrote recommended_parameters and metrics to {path}, imgsz {list(model.input_size)}")


def _load(a: argparse.Namespace, size: tuple[int, int] | None) -> SegmentationBackend:
    if a.backend == "openvino":
        return load_backend(a.package, OpenVinoConfig(backend="openvino", threads=a.threads, input_size=size))
    return load_backend(a.package, OnnxRuntimeConfig(intra_op_threads=a.threads, input_size=size))


def clip_seed_spread(
    model: SegmentationBackend, seeds: Sequence[int], *, seconds: float = 10.0
) -> dict[str, Any]:
    """Segm (``accurate``) mAP50 and mAP50:95 of the demo clip made with each of ``seeds``
    (``seconds`` long), and their minimum, mean and maximum mAP50 under ``"summary"``."""
    out: dict[str, Any] = {}
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="segstream-clip-") as tmp:
            make_clip(Path(tmp), seed, seconds=seconds)
            frames, gt = load_clip(Path(tmp))
            r = evaluate_set(model, frames, gt, modes=(("accurate", 0.0),))["segm_accurate"]
        out[str(seed)] = {"map50": r["map50"], "map": r["map"]}
        print(f"clip seed {seed}: segm mAP50 {r['map50']:.3f}, mAP50:95 {r['map']:.3f}", flush=True)
    m50 = [v["map50"] for v in out.values()]
    out["summary"] = {"min_map50": min(m50), "mean_map50": float(np.mean(m50)), "max_map50": max(m50)}
    print(f"{len(seeds)} clips: segm mAP50 min {min(m50):.3f}, mean {np.mean(m50):.3f}, max {max(m50):.3f}")
    return out


def set_onnx_imgsz(path: Path, size: tuple[int, int]) -> None:
    """Write the default input size into the ONNX file's ``imgsz`` too (Ultralytics-style loaders read it)."""
    import onnx  # the training extra

    model = onnx.load(str(path))
    for entry in model.metadata_props:
        if entry.key == "imgsz":
            entry.value = str([int(v) for v in size])
            break
    else:
        entry = model.metadata_props.add()
        entry.key, entry.value = "imgsz", str([int(v) for v in size])
    onnx.save(model, str(path))


def _compact(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _compact(v) for k, v in x.items()}
    return x


if __name__ == "__main__":
    main()
