"""Speed of the bundled demo model (``factory-parts/1``) with ONNX Runtime on the CPU.

For each input size (the package's default, the 320x320 it was trained at, and 640x640) and batch
size (1 and 4), on real frames of
the demo clip (1280x720):

- ``network``: ``session.run`` alone on pre-letterboxed float32 input (the model's own cost);
- ``backend``: ``OnnxSegmentationModel.infer`` (letterbox of the BGR frames + ``session.run``);
- ``post``: ``postprocess_frame`` with the step's defaults (confidence 0.4, IoU 0.3) per
  ``mask_decode_mode`` (native size only).

Times are medians over ``--repeats`` runs, reported per frame (a batch of 4 divided by 4).
ONNX Runtime uses ``--threads`` intra-op threads (default 2), no spinning, as the worker does.

Usage::

    python -m benchmarks.model [--threads 2] [--repeats 30] [--package DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from benchmarks._common import DEFAULT_CLIP, print_header
from worker.models.letterbox import letterbox_batch
from worker.models.onnx_backend import OnnxSegmentationModel
from worker.step.postprocess import PostprocessParams, postprocess_frame

DEFAULT_PACKAGE = Path(__file__).resolve().parents[1] / "worker" / "bundled_models" / "factory-parts" / "1"


def _median_ms(fn: Callable[[], object], repeats: int, per: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000 / per


def _clip_frames(n: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(DEFAULT_CLIP))
    frames = []
    try:
        while len(frames) < n:
            ok, img = cap.read()
            if not ok:
                break
            frames.append(img)
    finally:
        cap.release()
    if len(frames) < n:
        raise SystemExit(f"{DEFAULT_CLIP}: only {len(frames)} frames")
    return frames


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="ONNX Runtime CPU speed of the bundled demo model.")
    ap.add_argument("--package", type=Path, default=DEFAULT_PACKAGE)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args(argv)
    print_header(__doc__.split("\n\n")[0])
    size_mb = (a.package / "weights.onnx").stat().st_size / 1e6
    frames = _clip_frames(8)
    print(f"model: {a.package} ({size_mb:.1f} MB), {a.threads} intra-op threads, median of {a.repeats}")
    print(f"{'input':>9} {'batch':>5} {'network ms/frame':>17} {'backend ms/frame':>17}")
    native = OnnxSegmentationModel(a.package, intra_op_threads=a.threads, warmup=False).input_size
    for size in sorted({native, (320, 320), (640, 640)}):
        model = OnnxSegmentationModel(
            a.package, intra_op_threads=a.threads, inter_op_threads=1, input_size=size
        )
        session = model._session  # the worker's own session, same options
        for batch in (1, 4):
            chunk = frames[:batch]
            tensor, _ = letterbox_batch(chunk, size, model.metadata.pad_value)
            net = _median_ms(
                lambda t=tensor, s=session, n=model.input_name: s.run(None, {n: t}), a.repeats, batch
            )
            backend = _median_ms(lambda c=chunk, m=model: m.infer(c), a.repeats, batch)
            print(f"{size[0]:>4}x{size[1]:<4} {batch:>5} {net:>17.2f} {backend:>17.2f}", flush=True)
        if size == native:
            raws = model.infer(frames[:4])
            counts = []
            for mode in ("accurate", "tradeoff", "fast"):
                params = PostprocessParams(mask_decode_mode=mode, tradeoff_factor=0.5)
                ms = _median_ms(
                    lambda p=params, rs=raws: [
                        postprocess_frame(r.predictions, r.prototypes, r.letterbox, p) for r in rs
                    ],
                    a.repeats,
                    len(raws),
                )
                counts = [
                    len(postprocess_frame(r.predictions, r.prototypes, r.letterbox, params)) for r in raws
                ]
                print(f"post {mode:>9}: {ms:.2f} ms/frame (1280x720 frames, {counts} instances)", flush=True)


if __name__ == "__main__":
    main()
