"""By-hand check of a CUDA / TensorRT machine (not run in CI: no GPU there). NOT RUN in this project yet.

What it checks, on the bundled model and the demo clip, with the GPU build of ONNX Runtime
(``pip install 'segstream[gpu]'``):

1. the providers this ONNX Runtime has (``CUDAExecutionProvider`` / ``TensorrtExecutionProvider``);
2. the model loads with ``pipelines/gpu-camera.yaml``'s ``model`` section and the providers the
   session really uses (``info.used``) include the GPU one (exit 1 otherwise: a silent CPU fallback);
3. the detections on 8 clip frames equal ONNX Runtime CPU FP32's: same classes, boxes within 1 px,
   mask IoU >= 0.98 (FP16 TensorRT engines may move a borderline box; the report says which);
4. frames/s of CPU and GPU, batch 1 and 8, side by side.

Usage (on the GPU machine)::

    python -m benchmarks.gpu_check [--frames 64] [--no-tensorrt]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

from benchmarks._common import DEFAULT_CLIP, DEMO_PIPELINE, print_header, read_clip
from worker.config import load_pipeline
from worker.models.config import OnnxRuntimeConfig, ProviderConfig
from worker.models.registry import BUNDLED_MODELS_DIR, load_backend
from worker.step.postprocess import PostprocessParams, postprocess_frame

GPU_PIPELINE = DEMO_PIPELINE.parent / "gpu-camera.yaml"
PACKAGE = BUNDLED_MODELS_DIR / "factory-parts" / "1"


def _dets(model, frames):  # type: ignore[no-untyped-def]
    params = PostprocessParams(confidence=0.4, iou_threshold=0.5)
    return [postprocess_frame(r.predictions, r.prototypes, r.letterbox, params) for r in model.infer(frames)]


def _fps(model, frames, batch: int) -> float:  # type: ignore[no-untyped-def]
    model.infer(frames[:batch])
    start = time.perf_counter()
    for i in range(0, len(frames) - batch + 1, batch):
        model.infer(frames[i : i + batch])
    return (len(frames) // batch * batch) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--no-tensorrt", action="store_true", help="CUDA provider only")
    args = ap.parse_args(argv)
    print_header("GPU check: providers, detections vs CPU, frames/s")
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}: {available}")
    if "CUDAExecutionProvider" not in available:
        print("FAIL: no CUDAExecutionProvider; install onnxruntime-gpu (pip install 'segstream[gpu]')")
        return 1
    section = load_pipeline(GPU_PIPELINE).model
    assert isinstance(section, OnnxRuntimeConfig)
    if args.no_tensorrt:
        section = section.model_copy(
            update={"providers": tuple(p for p in section.providers if p.name != "TensorrtExecutionProvider")}
        )
    section = section.model_copy(update={"allow_fallback": False})  # a missing GPU provider must fail here
    gpu = load_backend(PACKAGE, section)
    cpu = load_backend(PACKAGE, OnnxRuntimeConfig(providers=(ProviderConfig(name="CPUExecutionProvider"),)))
    print(f"gpu: {gpu.info.summary()}")
    if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(gpu.info.used):
        print("FAIL: the session does not use a GPU provider")
        return 1
    frames = read_clip(DEFAULT_CLIP, args.frames)
    worst_box, worst_iou, mismatched = 0.0, 1.0, 0
    for expected, actual in zip(_dets(cpu, frames[:8]), _dets(gpu, frames[:8]), strict=True):
        if len(expected) != len(actual) or (np.sort(expected.class_id) != np.sort(actual.class_id)).any():
            mismatched += 1
            continue
        for j in range(len(expected)):
            k = int(np.argmin(np.abs(actual.xyxy - expected.xyxy[j]).max(axis=1)))
            worst_box = max(worst_box, float(np.abs(actual.xyxy[k] - expected.xyxy[j]).max()))
            a, b = expected.masks.crops[j], actual.masks.crops[k]
            if a.shape == b.shape and (a | b).any():
                worst_iou = min(worst_iou, float((a & b).sum() / (a | b).sum()))
    print(
        f"vs CPU on 8 frames: frames with other detections {mismatched}, worst box {worst_box:.2f} px, "
        f"worst mask IoU {worst_iou:.3f}"
    )
    for batch in (1, 8):
        print(
            f"batch {batch}: cpu {_fps(cpu, frames, batch):.1f} frames/s, gpu {_fps(gpu, frames, batch):.1f}"
        )
    ok = mismatched == 0 and worst_box <= 1.0 and worst_iou >= 0.98
    print("PASS" if ok else "FAIL (see above; FP16 engines may differ slightly)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
