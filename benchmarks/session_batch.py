"""Frames per ``session.run`` for single-threaded CPU sessions side by side (``model.session_batch``).

The demo pipeline runs ``inference_threads: 2`` batches at once, each on its own single-threaded
ONNX Runtime session. This times exactly that: two threads, each calling ``OnnxSegmentationModel
.infer`` on real demo-clip frames with its own single-threaded model, for each ``session_batch``
(frames per ``session.run``) while every call gets a batch of ``--batch`` frames. The baseline is
``session_batch = --batch`` (the whole batch in one call, what the backend did before). Arms are
alternated ``--repeats`` times; medians of the wall time per frame (both threads together).

Usage::

    python -m benchmarks.session_batch [--batch 4] [--sizes 480 640] [--frames 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from benchmarks._common import DEFAULT_CLIP, print_header, read_clip
from worker.models.onnx_backend import OnnxSegmentationModel
from worker.models.registry import ModelRegistry, default_models_dirs

MODEL_ID = "factory-parts/1"


def _side_by_side(models: list[OnnxSegmentationModel], frames: list, batch: int, per_thread: int) -> float:
    """Wall ms per frame for ``len(models)`` threads, each running ``per_thread`` frames in batches."""

    def work(model: OnnxSegmentationModel) -> None:
        for start in range(0, per_thread, batch):
            model.infer(frames[start : start + batch])

    threads = [threading.Thread(target=work, args=(m,)) for m in models]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (time.perf_counter() - t0) * 1000 / (per_thread * len(models))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="frames per infer() call (the pipeline's batch)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[480, 640], help="square input sizes")
    ap.add_argument("--frames", type=int, default=48, help="frames per thread per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="sessions side by side")
    a = ap.parse_args(argv)
    print_header("session_batch: single-threaded sessions side by side, frames per session.run")
    path = ModelRegistry(default_models_dirs(None)).resolve(MODEL_ID)
    frames = read_clip(DEFAULT_CLIP, a.frames)
    arms = sorted({1, 2, a.batch})
    worst = 0.0
    for size in a.sizes:
        models = {
            sb: [
                OnnxSegmentationModel(path, intra_op_threads=1, input_size=(size, size), session_batch=sb)
                for _ in range(a.threads)
            ]
            for sb in arms
        }
        times: dict[int, list[float]] = {sb: [] for sb in arms}
        for sb in arms:  # warm-up: each session once at its batch
            _side_by_side(models[sb], frames, a.batch, a.batch)
        for _ in range(a.repeats):
            for sb in arms:
                times[sb].append(_side_by_side(models[sb], frames, a.batch, a.frames))
        med = {sb: statistics.median(v) for sb, v in times.items()}
        base = med[a.batch]
        cells = "  ".join(f"session_batch {sb}: {med[sb]:.1f} ms/frame" for sb in arms)
        print(f"input {size}x{size}, batch {a.batch}, {a.threads} sessions side by side: {cells}")
        ratio = base / med[1]
        worst = ratio if not worst else min(worst, ratio)
        print(f"  whole-batch/frame-by-frame={ratio:.2f} (>1: frame by frame is faster)")
    print(f"whole-batch/frame-by-frame={worst:.2f} (smallest over sizes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
