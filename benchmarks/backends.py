"""Every backend and precision available here, on the demo clip, alternated in one process.

Cases (those this machine can run; the others are listed as not available):

- ``ort``: ONNX Runtime FP32, CPU provider (today's default; the baseline of every ratio);
- ``openvino``: OpenVINO at precision ``auto`` (BF16 on a CPU with native BF16, else FP32);
- ``openvino-fp32``: OpenVINO forced to FP32;
- ``int8``: the INT8 package (``--int8-model-id``, default ``factory-parts/1-int8``, made by
  ``segstream quantize``) on OpenVINO;
- ``ort-cuda``: ONNX Runtime with the CUDA provider (only where this ONNX Runtime has it).

Each case runs the clip's frames through ``SegmentationBackend.infer`` one frame at a time (the
backend's letterbox and engine, ``--threads`` threads each), in rounds: round r runs every case once
over the frames, the order of the cases rotating from round to round, so a load spike from the
other processes on the machine hits all cases alike. Frames/s is frames over wall time; CPU ms per
frame is the process CPU time over frames (all the engine's threads included); both are medians
over the rounds. Accuracy: every frame of the clip, post-processed as ``training/evaluate.py`` does
(confidence 0.01, NMS IoU 0.5, 100 detections, accurate masks) and scored with COCOeval (segm mAP50
and mAP50:95) against ``demo_clip_coco.json``.

``--pipeline-frames N`` also runs the whole worker (``worker.runtime.Worker`` on the demo pipeline:
file source, batcher, two model threads, JSONL sink) on each of ``ort``, ``openvino`` and ``int8``,
alternated over ``--pipeline-rounds``, and prints its frames/s (first result to the N-th).

The last line sums up: ``openvino/ort=<speed-up> int8/ort=<speed-up> openvino_map50_drop=<d>
int8_map50_drop=<d> openvino_cpu/ort=<r> int8_cpu/ort=<r>`` (speed-ups from frames/s, then from CPU
time per frame, which a loaded machine disturbs less; drops = ort's segm mAP50 minus the case's).
Targets: openvino >= 1.5x within 0.005 mAP50; int8 >= 1.8x within 0.01.

Usage::

    python -m benchmarks.backends [--frames 60] [--rounds 5] [--threads 1] [--input-size 480]
                                  [--pipeline-frames 120 --pipeline-rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from benchmarks._common import (
    DEFAULT_CLIP,
    DEFAULT_MODEL_ID,
    REPO,
    demo_pipeline_document,
    print_header,
    read_clip,
    run_counted_pipeline,
)
from worker.concurrency import limit_blas_threads
from worker.config import PipelineConfig
from worker.errors import ModelError
from worker.models.backend import SegmentationBackend
from worker.models.config import OnnxRuntimeConfig, OpenVinoConfig, ProviderConfig
from worker.models.evaluation import coco_eval, detections_to_coco, frames_for_ground_truth, predict
from worker.models.registry import ModelRegistry, default_models_dirs

GT_FILE = REPO / "worker" / "assets" / "demo_clip_coco.json"
TARGETS = {"openvino": (1.5, 0.005), "int8": (1.8, 0.01)}


@dataclass
class Case:
    name: str
    model: SegmentationBackend
    fps: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    map50: float = float("nan")
    map: float = float("nan")


def _cases(args: argparse.Namespace) -> tuple[list[Case], list[str]]:
    registry = ModelRegistry(default_models_dirs(args.models_dir))
    size = (args.input_size, args.input_size) if args.input_size else None
    wanted: list[tuple[str, str, Callable[[], SegmentationBackend]]] = [
        (
            "ort",
            args.model_id,
            lambda: registry.load(
                args.model_id, OnnxRuntimeConfig(intra_op_threads=args.threads, input_size=size)
            ),
        ),
        (
            "openvino",
            args.model_id,
            lambda: registry.load(
                args.model_id, OpenVinoConfig(backend="openvino", threads=args.threads, input_size=size)
            ),
        ),
        (
            "openvino-fp32",
            args.model_id,
            lambda: registry.load(
                args.model_id,
                OpenVinoConfig(backend="openvino", threads=args.threads, precision="fp32", input_size=size),
            ),
        ),
        (
            "int8",
            args.int8_model_id,
            lambda: registry.load(
                args.int8_model_id, OpenVinoConfig(backend="openvino", threads=args.threads, input_size=size)
            ),
        ),
    ]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        cuda = (ProviderConfig(name="CUDAExecutionProvider"),)
        wanted.append(
            (
                "ort-cuda",
                args.model_id,
                lambda: registry.load(args.model_id, OnnxRuntimeConfig(providers=cuda, input_size=size)),
            )
        )
    cases, missing = [], []
    for name, model_id, load in wanted:
        try:
            cases.append(Case(name, load()))
        except ModelError as exc:
            missing.append(f"{name} ({model_id}): {exc}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        missing.append(f"ort-cuda: this ONNX Runtime has no CUDA provider ({ort.get_available_providers()})")
    return cases, missing


def _pipelines(args: argparse.Namespace, available: set[str]) -> None:
    """The demo pipeline (two model threads, one engine thread each) on each backend, alternated."""
    models = {
        "ort": (args.model_id, {"intra_op_threads": 1}),
        "openvino": (args.model_id, {"backend": "openvino", "threads": 1}),
        "int8": (args.int8_model_id, {"backend": "openvino", "threads": 1}),
    }
    models = {k: v for k, v in models.items() if k in available}
    fps: dict[str, list[float]] = {name: [] for name in models}
    with tempfile.TemporaryDirectory(prefix="segstream-backends-") as tmp:
        for r in range(args.pipeline_rounds):
            names = list(models)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                model_id, section = models[name]
                doc = demo_pipeline_document(
                    model_id=model_id,
                    sources=[{"type": "video", "id": "belt", "url": str(args.clip), "queue_size": 8}],
                    sinks=[{"type": "jsonl", "path": str(Path(tmp) / f"{name}.jsonl")}],
                    max_batch_size=4,
                    input_size=args.input_size,
                )
                doc["model"] = {
                    **section,
                    **({"input_size": doc["model"]["input_size"]} if args.input_size else {}),
                }
                config = PipelineConfig.model_validate(doc)
                run = asyncio.run(run_counted_pipeline(config, args.models_dir, args.pipeline_frames))
                fps[name].append(run.fps)
    base = statistics.median(fps["ort"])
    print(
        f"\nwhole worker (demo pipeline, 2 model threads x 1 engine thread), {args.pipeline_frames} frames:"
    )
    for name, values in fps.items():
        median = statistics.median(values)
        print(f"  pipeline {name:>9}: {median:6.1f} frames/s  ({median / base:.2f}x ort)  runs {values}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    ap.add_argument("--int8-model-id", default=f"{DEFAULT_MODEL_ID}-int8")
    ap.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    ap.add_argument("--frames", type=int, default=60, help="frames per timed round (from the clip's start)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="engine threads of every case")
    ap.add_argument("--input-size", type=int, default=None, help="square input size (default: the model's)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the COCOeval pass")
    ap.add_argument("--pipeline-frames", type=int, default=0, help="also run the whole worker (0: no)")
    ap.add_argument("--pipeline-rounds", type=int, default=2)
    args = ap.parse_args(argv)
    print_header("backends: every backend/precision available, alternated, on the demo clip")
    limit_blas_threads(1)
    cases, missing = _cases(args)
    for case in cases:
        print(f"{case.name:>14}: {case.model.info.summary()}, input {case.model.input_size}")
    for line in missing:
        print(f"not available: {line}")
    frames = read_clip(args.clip, args.frames)
    for case in cases:  # warm-up, outside the timing
        case.model.infer(frames[:2])
    for r in range(args.rounds):
        order = cases[r % len(cases) :] + cases[: r % len(cases)]
        for case in order:
            wall, cpu = time.perf_counter(), time.process_time()
            for frame in frames:
                case.model.infer([frame])
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            case.fps.append(len(frames) / wall)
            case.cpu_ms.append(1000 * cpu / len(frames))
    if not args.no_accuracy:
        gt = json.loads(GT_FILE.read_text())
        gt_frames = frames_for_ground_truth(args.clip, gt)
        ids = [im["id"] for im in gt["images"]]
        for case in cases:
            (dets,) = predict(case.model, gt_frames, batch=1)
            segm = coco_eval(gt, detections_to_coco(dets, ids), "segm")
            case.map50, case.map = segm["map50"], segm["map"]
    base = cases[0]
    base_fps = statistics.median(base.fps)
    print(
        f"\n{args.frames} frames x {args.rounds} rounds (alternated), {args.threads} thread(s) per engine; "
        f"accuracy on all {len(gt_frames) if not args.no_accuracy else 0} clip frames"
    )
    columns = ("case", "precision", "frames/s", "CPU ms/frame", "segm mAP50", "segm mAP50:95")
    print("| " + " | ".join((*columns, "frames/s vs ort", "CPU time vs ort", "mAP50 drop")) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary: dict[str, tuple[float, float]] = {}
    cpu_ratio: dict[str, float] = {}
    base_cpu = statistics.median(base.cpu_ms)
    for case in cases:
        fps, cpu = statistics.median(case.fps), statistics.median(case.cpu_ms)
        ratio, drop = fps / base_fps, base.map50 - case.map50
        summary[case.name] = (ratio, drop)
        cpu_ratio[case.name] = base_cpu / cpu
        print(
            f"| {case.name} | {case.model.info.precision} | {fps:.1f} | {cpu:.1f} | {case.map50:.4f} | "
            f"{case.map:.4f} | {ratio:.2f}x | {base_cpu / cpu:.2f}x | {drop:+.4f} |"
        )
    verdicts = []
    for name, (speed, max_drop) in TARGETS.items():
        if name in summary:
            ratio, drop = summary[name]
            ok = ratio >= speed and drop <= max_drop
            verdicts.append(f"{name}: >= {speed}x within {max_drop}: {'PASS' if ok else 'FAIL'}")
    print("targets: " + "; ".join(verdicts))
    if args.pipeline_frames:
        _pipelines(args, {c.name for c in cases})
    parts = [f"{n}/ort={summary[n][0]:.2f}" for n in ("openvino", "int8") if n in summary]
    parts += [f"{n}_map50_drop={summary[n][1]:.3f}" for n in ("openvino", "int8") if n in summary]
    # CPU time per frame is steadier than wall time on a machine shared with other jobs
    parts += [f"{n}_cpu/ort={cpu_ratio[n]:.2f}" for n in ("openvino", "int8") if n in cpu_ratio]
    print(" ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
