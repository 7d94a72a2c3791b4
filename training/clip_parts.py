"""Which physical parts of the demo clip the model misses, and the clip's score without split parts.

Usage::

    python -m training.clip_parts --confidence 0.4

The clip shows about 50 parts riding the belt, each in about 60 frames, so its mAP is decided by
a few dozen parts. This links the clip's ground-truth instances from frame to frame into *tracks*
(same class, box shifted by the belt speed), runs the package at its default input size through
the worker's code, and prints each track's recall (mask IoU 0.5, COCOeval's matching), worst
first. It also scores the clip with the instances whose visible mask falls into several sizeable
pieces (a part seen on both sides of another one) marked ``iscrowd``, i.e. ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from training.evaluate import (
    DEFAULT_ASSETS,
    DEFAULT_PACKAGE,
    detections_to_coco,
    eval_params,
    load_clip,
    predict,
)
from training.synth import CLASS_NAMES
from worker.models.onnx_backend import OnnxSegmentationModel

__all__ = ["clip_speed", "link_tracks", "mark_split_instances", "matched_at_50", "track_report"]


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def clip_speed(gt: dict[str, Any]) -> float:
    """The belt speed (pixels per frame) that ``training.make_clip`` recorded in the ground truth;
    6 for a clip written before it recorded one (the speed it used then)."""
    return float(gt.get("info", {}).get("speed_px_per_frame", 6.0))


def link_tracks(
    gt: dict[str, Any], *, speed: float | None = None, min_iou: float = 0.3
) -> list[list[dict[str, Any]]]:
    """Group ground-truth instances into tracks, one per physical part.

    An instance joins the track of the previous frame's instance of the same class whose box,
    shifted ``speed`` pixels to the right (default: the speed recorded in ``gt``), overlaps it most
    (box IoU above ``min_iou``); otherwise it starts a track. Frames are taken in ``image_id`` order.
    """
    if speed is None:
        speed = clip_speed(gt)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    tracks: list[list[dict[str, Any]]] = []
    prev: list[tuple[int, dict[str, Any]]] = []
    for image in sorted(gt["images"], key=lambda im: im["id"]):
        used: set[int] = set()
        current: list[tuple[int, dict[str, Any]]] = []
        for a in by_image.get(image["id"], []):
            best, best_k = min_iou, None
            for k, (_, p) in enumerate(prev):
                if k in used or p["category_id"] != a["category_id"]:
                    continue
                x, y, w, h = p["bbox"]
                iou = _box_iou(a["bbox"], (x + speed, y, w, h))
                if iou > best:
                    best, best_k = iou, k
            if best_k is None:
                tid = len(tracks)
                tracks.append([a])
            else:
                used.add(best_k)
                tid = prev[best_k][0]
                tracks[tid].append(a)
            current.append((tid, a))
        prev = current
    return tracks


def _cocoeval(gt: dict[str, Any], results: list[dict[str, Any]], iou: float | None = None) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results)) if results else COCO()
        ev = COCOeval(coco_gt, coco_dt, "segm")
        if iou is not None:
            ev.params.iouThrs = np.array([iou])
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def matched_at_50(gt: dict[str, Any], results: list[dict[str, Any]]) -> dict[int, bool]:
    """Whether COCOeval matches each ground-truth instance (by id) at mask IoU 0.5."""
    if not results:
        return {a["id"]: False for a in gt["annotations"]}
    ev = _cocoeval(gt, results, iou=0.5)
    out: dict[int, bool] = {}
    for e in ev.evalImgs:
        if e is None or e["aRng"] != ev.params.areaRng[0]:
            continue
        for gid, match in zip(e["gtIds"], e["gtMatches"][0], strict=True):
            out[int(gid)] = bool(match > 0)
    return out


def track_report(tracks: list[list[dict[str, Any]]], matched: dict[int, bool]) -> list[dict[str, Any]]:
    """Per track: class, frames, instances, recall and misses; most misses first."""
    rows = []
    for tid, track in enumerate(tracks):
        hits = [matched.get(a["id"], False) for a in track]
        rows.append(
            {
                "track": tid,
                "class": CLASS_NAMES[track[0]["category_id"] - 1],
                "first_frame": track[0]["image_id"] - 1,
                "last_frame": track[-1]["image_id"] - 1,
                "instances": len(track),
                "recall": float(np.mean(hits)),
                "missed": len(hits) - int(sum(hits)),
                "median_area": int(np.median([a["area"] for a in track])),
            }
        )
    rows.sort(key=lambda r: (-r["missed"], r["track"]))
    return rows


def mark_split_instances(gt: dict[str, Any], *, min_piece: float = 0.05) -> tuple[dict[str, Any], int]:
    """A copy of ``gt`` with instances of several pieces (each >= ``min_piece`` of the mask) as iscrowd."""
    out = copy.deepcopy(gt)
    n = 0
    for a in out["annotations"]:
        seg = a["segmentation"]
        counts = seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]
        m = mask_utils.decode({"size": seg["size"], "counts": counts})
        _, _, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        if int((stats[1:, cv2.CC_STAT_AREA] >= min_piece * max(a["area"], 1)).sum()) >= 2:
            a["iscrowd"] = 1
            n += 1
    return out, n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, default=DEFAULT_PACKAGE)
    ap.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    ap.add_argument("--confidence", type=float, default=0.4, help="confidence for the per-part recall")
    ap.add_argument(
        "--speed", type=float, default=None, help="belt speed, pixels per frame (default: the clip's own)"
    )
    ap.add_argument("--top", type=int, default=12, help="tracks to print")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)

    model = OnnxSegmentationModel(a.package, intra_op_threads=a.threads, inter_op_threads=1)
    frames, gt = load_clip(a.assets)
    floor = min(0.01, a.confidence)
    (dets,) = predict(model, frames, [eval_params("accurate", 0.0, floor, 0.5)])
    ids = [im["id"] for im in gt["images"]]
    results = detections_to_coco(dets, ids)
    kept = [r for r in results if r["score"] >= a.confidence]
    tracks = link_tracks(gt, speed=a.speed)
    rows = track_report(tracks, matched_at_50(gt, kept))
    total = sum(r["missed"] for r in rows)
    size = "x".join(str(v) for v in model.input_size)
    print(
        f"{len(tracks)} tracks, {len(gt['annotations'])} instances, input {size}, confidence "
        f"{a.confidence}: {total} missed at mask IoU 0.5"
    )
    for r in rows[: a.top]:
        print(
            f"  track {r['track']:3d} {r['class']:8s} frames {r['first_frame']:3d}-{r['last_frame']:3d} "
            f"instances {r['instances']:3d} recall {r['recall']:.2f} missed {r['missed']:3d} "
            f"median area {r['median_area']}"
        )
    ev = _cocoeval(gt, results)
    print(f"clip segm mAP50 {ev.stats[1]:.3f}, mAP50:95 {ev.stats[0]:.3f}")
    split_gt, n = mark_split_instances(gt)
    ev = _cocoeval(split_gt, results)
    print(
        f"with the {n} instances in several pieces ignored (iscrowd): mAP50 {ev.stats[1]:.3f}, "
        f"mAP50:95 {ev.stats[0]:.3f}"
    )


if __name__ == "__main__":
    main()
