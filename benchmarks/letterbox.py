"""``model.letterbox``: square against rect on the demo clip (speed and accuracy), one process, alternated.

The bundled model (``factory-parts/1``) has dynamic input axes, so both modes run the same weights:

- ``square``: every 1280x720 frame padded into the model's 480x480 input (the default);
- ``rect``: the smallest stride-multiple rectangle holding the frame, 288x480 (Ultralytics' predictor
  with ``auto=True``): 40 % fewer input pixels.

Speed: the clip's first ``--frames`` frames through ``SegmentationBackend.infer`` one frame at a time
plus post-processing (the step's defaults: confidence 0.4, accurate masks), ONNX Runtime on the CPU with
``--threads`` threads, in ``--rounds`` rounds whose case order alternates (a load spike from other
processes hits both alike); frames/s over wall time and CPU ms per frame (process CPU time: all
engine threads), medians over the rounds. Accuracy: every frame of the clip with ground truth,
post-processed as ``training/evaluate.py`` does (confidence 0.01, NMS IoU 0.5, 100 detections, accurate
masks), scored with COCOeval (bbox and segm mAP50, mAP50:95) against ``demo_clip_coco.json``.

The last line sums up: ``rect/square fps=<r> cpu=<r> segm_map_drop=<d> bbox_map_drop=<d>``.

Usage::

    python -m benchmarks.letterbox [--frames 60] [--rounds 3] [--threads 1] [--model-id factory-parts/1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks._common import DEFAULT_CLIP, DEFAULT_MODEL_ID, REPO, print_header, read_clip
from worker.concurrency import limit_blas_threads
from worker.models.backend import SegmentationBackend
from worker.models.config import OnnxRuntimeConfig
from worker.models.evaluation import coco_eval, detections_to_coco, frames_for_ground_truth, predict
from worker.models.registry import ModelRegistry, default_models_dirs
from worker.step.postprocess import PostprocessParams, postprocess_raw

GT_FILE = REPO / "worker" / "assets" / "demo_clip_coco.json"
STEP_PARAMS = PostprocessParams()  # the step's defaults


@dataclass
class Case:
    name: str
    model: SegmentationBackend
    fps: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=60, help="frames per timing round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args(argv)
    print_header("letterbox: model.letterbox square vs rect on the demo clip (ONNX Runtime, CPU)")
    limit_blas_threads(1)
    registry = ModelRegistry(default_models_dirs())
    cases = [
        Case(
            mode,
            registry.load(args.model_id, OnnxRuntimeConfig(intra_op_threads=args.threads, letterbox=mode)),
        )
        for mode in ("square", "rect")
    ]
    frames = read_clip(DEFAULT_CLIP, args.frames)
    for case in cases:
        (raw,) = case.model.infer(frames[:1])
        print(
            f"{case.name:>7}: frame {frames[0].shape[1]}x{frames[0].shape[0]} runs at input "
            f"{raw.letterbox.input_size}"
        )
    num_classes = len(cases[0].model.class_names)
    for r in range(args.rounds):
        for case in cases[r % 2 :] + cases[: r % 2]:
            wall, cpu = time.perf_counter(), time.process_time()
            for frame in frames:
                (raw,) = case.model.infer([frame])
                postprocess_raw(raw, STEP_PARAMS, num_classes)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            case.fps.append(len(frames) / wall)
            case.cpu_ms.append(1000 * cpu / len(frames))
    gt_count = 0
    if not args.no_accuracy:
        gt = json.loads(GT_FILE.read_text())
        gt_frames = frames_for_ground_truth(DEFAULT_CLIP, gt)
        gt_count = len(gt_frames)
        ids = [im["id"] for im in gt["images"]]
        for case in cases:
            (dets,) = predict(case.model, gt_frames, batch=1)
            results = detections_to_coco(dets, ids)
            for kind in ("bbox", "segm"):
                scores = coco_eval(gt, results, kind)
                case.accuracy[f"{kind}_map50"], case.accuracy[f"{kind}_map"] = scores["map50"], scores["map"]
    print(
        f"\n{args.frames} frames x {args.rounds} rounds (alternated), {args.threads} thread(s); "
        f"accuracy on {gt_count} clip frames"
    )
    print("| letterbox | frames/s | CPU ms/frame | bbox mAP50 | bbox mAP50:95 | segm mAP50 | segm mAP50:95 |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        acc = case.accuracy
        print(
            f"| {case.name} | {statistics.median(case.fps):.1f} | {statistics.median(case.cpu_ms):.1f} | "
            + " | ".join(
                f"{acc.get(k, float('nan')):.4f}"
                for k in ("bbox_map50", "bbox_map", "segm_map50", "segm_map")
            )
            + " |"
        )
    square, rect = cases
    fps = statistics.median(rect.fps) / statistics.median(square.fps)
    cpu = statistics.median(square.cpu_ms) / statistics.median(rect.cpu_ms)
    drops = {k: square.accuracy.get(k, 0.0) - rect.accuracy.get(k, 0.0) for k in ("segm_map", "bbox_map")}
    print(
        f"rect/square fps={fps:.2f} cpu={cpu:.2f} segm_map_drop={drops['segm_map']:+.4f} "
        f"bbox_map_drop={drops['bbox_map']:+.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
