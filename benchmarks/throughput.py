"""Throughput of the demo model on the demo clip, three ways in the same run.

(a) ``bare``: ONNX Runtime alone on pre-decoded, pre-letterboxed input tensors (``session.run`` in a
    loop): the ceiling of one synchronous stream. Its session is built as the worker builds one
    (spinning off, graph optimisation on) with ``--intra-op-threads`` (default 0: ONNX Runtime's
    own choice, one thread per physical core, what a plain script gets).
(b) ``loop``: what a user's own synchronous script does, one thing after the other: read frames
    with OpenCV -> ``WorkflowRunner.run_batch`` (letterbox, inference, post-processing, predictions
    JSON) -> wrap each in the worker's result message -> write one JSON line per frame to a file.
    Same session settings as (a).
(c) ``pipeline``: the real worker (``worker.runtime.Worker``) on the demo pipeline with a file
    source and the JSONL sink: reader thread -> bounded queue -> batcher -> model threads -> sink,
    with the demo pipeline's own ``model.intra_op_threads`` and ``inference_threads`` (batches in
    flight at once), unless ``--pipeline-intra-op-threads`` / ``--inference-threads`` say otherwise.
    Each single-threaded session runs a batch frame by frame (``model.session_batch``, see
    ``worker.models.onnx_backend``; ``--pipeline-session-batch`` sets it).
    The settings of each are printed first.

Each runs over the same first ``--frames`` frames of the clip, at batch sizes 1 and 4, with the
model at its native input size and at 640x640 (the network is fully convolutional; a 640 input costs
about what real YOLO-seg models cost). Frames/s = frames / wall time from the start (capture opened,
model already loaded and warmed up) to the last frame's result written; for (c) a counting sink
stops the worker after ``--frames`` results and the time of the last one is taken.

The last line sums up: ``pipeline/loop`` at the native size and ``pipeline/bare@640``, each the
smaller of the two batch sizes' ratios (targets >= 1.2 and >= 0.9).

Usage::

    python -m benchmarks.throughput [--frames 100] [--untrained] [--models-dir DIR] [--model-id ID]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks._common import (
    DEFAULT_CLIP,
    add_model_arguments,
    demo_pipeline_document,
    iter_clip,
    print_header,
    read_clip,
    resolve_models_dir,
    run_counted_pipeline,
)
from worker.concurrency import limit_blas_threads
from worker.config import PipelineConfig
from worker.frame import Frame
from worker.messages import FrameResult
from worker.models.letterbox import letterbox_batch
from worker.models.onnx_backend import OnnxSegmentationModel
from worker.models.registry import ModelRegistry, default_models_dirs, load_backend
from worker.step.executor import WorkflowRunner
from worker.step.workflow import load_workflow

TARGET_PIPELINE_OVER_LOOP = 1.2
TARGET_PIPELINE_OVER_BARE_640 = 0.9
#: distinct pre-letterboxed tensors kept for (a); the frames cycle through them
_BARE_DISTINCT = 32


@dataclass(frozen=True)
class Case:
    input_size: int
    batch: int
    native: bool

    @property
    def label(self) -> str:
        size = f"{self.input_size}x{self.input_size}" + (" (native)" if self.native else "")
        return f"input {size}, batch {self.batch}"


def _build_runner(config: PipelineConfig, models_dir: Path | None) -> WorkflowRunner:
    registry = ModelRegistry(default_models_dirs(models_dir))
    return WorkflowRunner(load_workflow(config.workflow), registry, model_config=config.model)


def run_bare(model: OnnxSegmentationModel, images: list[np.ndarray], case: Case, frames: int) -> float:
    """(a): ``session.run`` on pre-letterboxed ``[B, 3, h, w]`` tensors; frames/s."""
    session = ort.InferenceSession(
        str(model.weights_path), sess_options=model.session_options, providers=model.providers
    )
    size = (case.input_size, case.input_size)
    pad = model.metadata.pad_value
    distinct = images[: max(case.batch, min(len(images), _BARE_DISTINCT))]
    batches = []
    for start in range(0, len(distinct) - case.batch + 1, case.batch):
        tensor, _ = letterbox_batch(distinct[start : start + case.batch], size, pad)
        batches.append(np.ascontiguousarray(tensor))
    name = session.get_inputs()[0].name
    session.run(None, {name: batches[0]})  # warm-up, as the backend does at load
    runs = -(-frames // case.batch)
    start = time.perf_counter()
    for i in range(runs):
        session.run(None, {name: batches[i % len(batches)]})
    return runs * case.batch / (time.perf_counter() - start)


def run_loop(config: PipelineConfig, models_dir: Path | None, clip: Path, frames: int, out: Path) -> float:
    """(b): read -> step -> serialize -> write a line, one after the other; frames/s."""
    runner = _build_runner(config, models_dir)
    batch_size = config.batching.max_batch_size
    step = runner.workflow.steps[0].name
    written = 0
    start = time.perf_counter()
    with out.open("wb") as sink:
        batch: list[Frame] = []
        for number, image in enumerate(iter_clip(clip, frames)):
            batch.append(Frame("belt", number, time.time(), image))
            if len(batch) < batch_size and number + 1 < frames:
                continue
            result = runner.run_batch(batch)
            for outcome in result.outcomes:
                if outcome.error is not None:
                    raise RuntimeError(f"frame {outcome.frame.frame_id} failed: {outcome.error}")
                message = FrameResult(
                    pipeline=config.name,
                    source_id=outcome.frame.source_id,
                    frame_number=outcome.frame.frame_number,
                    frame_id=outcome.frame.frame_id,
                    timestamp=outcome.frame.timestamp,
                    step=step,
                    inference_id=outcome.inference_id,
                    model_id=outcome.model_id,
                    outputs=outcome.outputs,
                )
                sink.write(
                    json.dumps({"kind": "result", **message.to_dict()}, separators=(",", ":")).encode()
                )
                sink.write(b"\n")
                written += 1
            sink.flush()
            batch = []
    elapsed = time.perf_counter() - start
    if written != frames:
        raise RuntimeError(f"loop wrote {written} results, expected {frames}")
    return frames / elapsed


def _config(
    args: argparse.Namespace, case: Case, native: int, clip: Path, jsonl: Path, *, baseline: bool
) -> PipelineConfig:
    """The pipeline of (c), or (``baseline``) the settings (a) and (b) build their session from."""
    doc = demo_pipeline_document(
        model_id=args.model_id,
        sources=[{"type": "video", "id": "belt", "url": str(clip), "queue_size": 8}],
        sinks=[{"type": "jsonl", "path": str(jsonl)}],
        max_batch_size=case.batch,
        input_size=None if case.input_size == native else case.input_size,
        intra_op_threads=args.intra_op_threads if baseline else args.pipeline_intra_op_threads,
        inference_threads=1 if baseline else args.inference_threads,
    )
    if not baseline and args.pipeline_session_batch is not None:
        doc["model"]["session_batch"] = args.pipeline_session_batch
    return PipelineConfig.model_validate(doc)


def _describe(name: str, model: OnnxSegmentationModel, inference_threads: int | None = None) -> None:
    options = model.session_options
    spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
    extra = (
        "" if inference_threads is None else f", inference_threads={inference_threads} (batches in flight)"
    )
    print(
        f"{name}: intra_op_threads={options.intra_op_num_threads} (0 = one per physical core), "
        f"inter_op_threads={options.inter_op_num_threads}, spinning={'on' if spinning == '1' else 'off'}, "
        f"session_batch={model.session_batch or 'whole batch'}, {model.providers[0]}{extra}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP, help="video file (default: the demo clip)")
    parser.add_argument(
        "--frames", type=int, default=100, help="frames per measurement (from the clip's start)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--large-size", type=int, default=640, help="the second input size (square)")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="(a) and (b): ONNX Runtime intra-op threads (0: its default, one per physical core: what a "
        "single synchronous stream runs best with)",
    )
    parser.add_argument(
        "--pipeline-intra-op-threads",
        type=int,
        default=None,
        help="(c): ONNX Runtime intra-op threads (default: the demo pipeline's)",
    )
    parser.add_argument(
        "--pipeline-session-batch",
        type=int,
        default=None,
        help="(c): most frames per ONNX Runtime call (default: the backend's choice, 1 for a "
        "single-threaded session; a number >= the batch size runs whole batches, as before)",
    )
    parser.add_argument(
        "--inference-threads",
        type=int,
        default=None,
        help="(c): batches in flight at once (default: the demo pipeline's)",
    )
    args = parser.parse_args(argv)
    print_header("throughput: (a) bare ONNX Runtime, (b) synchronous loop, (c) full pipeline")
    models_dir = resolve_models_dir(args)

    unused = Path("unused.jsonl")
    probe = _build_runner(_config(args, Case(0, 1, True), 0, args.clip, unused, baseline=True), models_dir)
    model = next(iter(probe.models.values()))
    native = model.input_size[0]
    pipeline_probe = _config(args, Case(0, 1, True), 0, args.clip, unused, baseline=False)
    # the worker caps the BLAS threads of the whole process when it starts (``blas_threads``); the
    # same cap applies to (a) and (b) from the start, so the ratios measure overlap, not that setting
    limit_blas_threads(pipeline_probe.blas_threads)
    print(
        f"ONNX Runtime {ort.__version__}; BLAS threads (numpy, OpenCV): {pipeline_probe.blas_threads}, "
        "for all three"
    )
    _describe("(a), (b)", model)
    _describe(
        "(c)",
        _build_runner(pipeline_probe, models_dir).models[model.model_id],
        pipeline_probe.inference_threads,
    )
    images = read_clip(args.clip, min(args.frames, 64))
    if args.frames > 250:
        print("note: the demo clip has 250 frames; (b) and (c) read what the clip has")
    print(f"clip: {args.clip.name}, {images[0].shape[1]}x{images[0].shape[0]}, {args.frames} frames per run")
    cases = [
        Case(size, batch, size == native) for size in (native, args.large_size) for batch in args.batch_sizes
    ]
    ratios: dict[Case, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="segstream-throughput-") as tmp:
        for case in cases:
            config = _config(args, case, native, args.clip, Path(tmp) / "pipeline.jsonl", baseline=False)
            base = _config(args, case, native, args.clip, Path(tmp) / "pipeline.jsonl", baseline=True)
            sized = model
            if case.input_size != native:
                sized = load_backend(model.package_path, base.model, model_id=model.model_id)
                assert isinstance(sized, OnnxSegmentationModel)  # (a) needs its session's settings
            bare = run_bare(sized, images, case, args.frames)
            loop = run_loop(base, models_dir, args.clip, args.frames, Path(tmp) / "loop.jsonl")
            pipe = asyncio.run(run_counted_pipeline(config, models_dir, args.frames)).fps
            ratios[case] = (pipe / loop, pipe / bare)
            print(
                f"{case.label:<32} (a) bare {bare:6.1f} fps  (b) loop {loop:6.1f} fps  "
                f"(c) pipeline {pipe:6.1f} fps   pipeline/loop={pipe / loop:.2f} "
                f"pipeline/bare={pipe / bare:.2f}  loop/bare={loop / bare:.2f}",
                flush=True,
            )
    over_loop = min(r[0] for c, r in ratios.items() if c.native)
    over_bare = [r[1] for c, r in ratios.items() if c.input_size == args.large_size]
    over_bare_640 = min(over_bare) if over_bare else float("nan")
    ok = over_loop >= TARGET_PIPELINE_OVER_LOOP and over_bare_640 >= TARGET_PIPELINE_OVER_BARE_640
    print(
        f"targets: pipeline/loop >= {TARGET_PIPELINE_OVER_LOOP} at the native size, pipeline/bare >= "
        f"{TARGET_PIPELINE_OVER_BARE_640} at {args.large_size} (worst batch size of each): "
        f"{'PASS' if ok else 'FAIL'}"
    )
    print(f"pipeline/loop={over_loop:.2f} pipeline/bare@{args.large_size}={over_bare_640:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
