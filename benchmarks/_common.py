"""Helpers shared by the throughput, latency and overhead benchmarks.

- The model: ``--models-dir`` / ``--model-id`` pick a package the way the worker does (the bundled
  ``factory-parts/1`` by default); ``--untrained`` instead builds the demo network's architecture
  (``training.model.SegNet``, fixed seed, random weights) and exports it to a package with the same
  ``metadata.json`` layout in a cache folder. An untrained network costs the same per inference but
  finds (almost) nothing, so post-processing and serialization are cheaper than with the trained one.
- The pipeline: every benchmark starts from ``pipelines/demo.yaml`` (its workflow, batching and model
  settings) and replaces sources, sinks and the HTTP section, so it measures what the demo runs.
- Thread settings: the pipeline runs with the demo's own ``model.intra_op_threads`` and
  ``inference_threads`` unless a benchmark's ``--intra-op-threads`` / ``--inference-threads`` override
  them (written into the pipeline document, never changed behind the worker's back).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from worker.config import PipelineConfig, read_document
from worker.errors import ModelError, SinkError
from worker.messages import ErrorReport, FrameResult
from worker.models.registry import ModelRegistry, default_models_dirs
from worker.ops.metrics import Metrics

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_MODEL_ID",
    "DEMO_PIPELINE",
    "REPO",
    "CountingSink",
    "PipelineRun",
    "add_model_arguments",
    "add_thread_arguments",
    "build_untrained_package",
    "demo_pipeline_document",
    "iter_clip",
    "percentile",
    "print_header",
    "read_clip",
    "resolve_models_dir",
    "run_counted_pipeline",
]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CLIP = REPO / "worker" / "assets" / "demo_clip.mp4"
DEMO_PIPELINE = REPO / "pipelines" / "demo.yaml"
DEFAULT_MODEL_ID = "factory-parts/1"
UNTRAINED_CACHE = Path(tempfile.gettempdir()) / "segstream-bench-untrained"


def print_header(description: str) -> None:
    """The exact command, the machine, and what is measured: the first lines of every benchmark."""
    argv = [Path(sys.executable).name, "-m", _module_name(), *sys.argv[1:]]
    print(f"$ {shlex.join(argv)}")
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(description, flush=True)


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return str(spec.name)
    path = Path(sys.argv[0]).resolve()
    try:
        return ".".join(path.relative_to(REPO).with_suffix("").parts)
    except ValueError:
        return str(path)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--models-dir``, ``--model-id``, ``--untrained``."""
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="model packages folder (default: $SEGSTREAM_MODELS_DIR, then the bundled models)",
    )
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="model package id (project/version)")
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="use an untrained network of the demo model's architecture (same cost per inference, "
        "no detections) exported to a cache folder; for when the trained package is not there yet",
    )


def add_thread_arguments(parser: argparse.ArgumentParser) -> None:
    """``--intra-op-threads`` and ``--inference-threads`` for the pipeline (default: the demo's)."""
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=None,
        help="ONNX Runtime intra-op threads (default: the demo's)",
    )
    parser.add_argument(
        "--inference-threads", type=int, default=None, help="batches in flight at once (default: the demo's)"
    )


def build_untrained_package(root: Path, model_id: str, *, seed: int = 0, size: int = 320) -> Path:
    """Export a randomly initialised ``SegNet`` to ``root/<model_id>/`` (weights.onnx + metadata.json).

    The package is reused when it already exists for the same seed and size.

    Returns:
        The package folder.
    """
    package = root / model_id
    meta_path = package / "metadata.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("provenance", {}).get("untrained_seed") == seed and meta.get("input_size") == [
            size,
            size,
        ]:
            return package
    import torch  # only here: the trained package needs no torch

    from training.data import PAD_VALUE
    from training.export import export_onnx
    from training.model import SegNet
    from training.synth import CLASS_NAMES

    torch.manual_seed(seed)
    net = SegNet(len(CLASS_NAMES)).eval()
    package.mkdir(parents=True, exist_ok=True)
    export_onnx(net, package / "weights.onnx", class_names=CLASS_NAMES, input_size=(size, size))
    meta = {
        "schema_version": 1,
        "class_names": list(CLASS_NAMES),
        "input_size": [size, size],
        "pad_value": PAD_VALUE,
        "stride": 32,
        "task": "segment",
        "dynamic_input": True,
        "provenance": {"untrained_seed": seed, "note": "random weights, benchmarks only"},
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return package


def resolve_models_dir(args: argparse.Namespace) -> Path | None:
    """The models folder to hand the worker; checks that ``args.model_id`` is found there.

    Exits with a message when the model is missing (and ``--untrained`` was not given).
    """
    if args.untrained:
        build_untrained_package(UNTRAINED_CACHE, args.model_id)
        print(f"model: UNTRAINED {args.model_id} (random weights, seed 0) in {UNTRAINED_CACHE}")
        return UNTRAINED_CACHE
    registry = ModelRegistry(default_models_dirs(args.models_dir))
    try:
        path = registry.resolve(args.model_id)
    except ModelError as exc:
        raise SystemExit(
            f"error: {exc}\n(pass --untrained to benchmark an untrained network instead)"
        ) from exc
    print(f"model: {args.model_id} from {path}")
    return args.models_dir


def demo_pipeline_document(
    *,
    model_id: str,
    sources: list[dict[str, Any]],
    sinks: list[dict[str, Any]],
    max_batch_size: int,
    input_size: int | None,
    intra_op_threads: int | None = None,
    inference_threads: int | None = None,
    http: dict[str, Any] | None = None,
    broker: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """``pipelines/demo.yaml`` with the benchmark's sources, sinks, batch size, model and threads.

    The workflow (step version, confidence mode, mask decode mode) stays the demo's; the annotated
    video and the summary are switched off (they are not part of a worker's steady state).
    """
    doc = read_document(DEMO_PIPELINE)
    for step in doc["workflow"]["steps"]:
        step["model_id"] = model_id
    doc["sources"] = sources
    doc["sinks"] = sinks
    doc["batching"] = {**doc.get("batching", {}), "max_batch_size": max_batch_size}
    doc.pop("annotated_video", None)
    doc["print_summary"] = False
    doc["log_level"] = "WARNING"
    model = dict(doc.get("model") or {})
    if intra_op_threads is not None:
        model["intra_op_threads"] = intra_op_threads
    if inference_threads is not None:
        doc["inference_threads"] = inference_threads
    if input_size is not None:
        model["input_size"] = [input_size, input_size]
    doc["model"] = model
    doc["http"] = http if http is not None else {"enabled": False}
    if broker is not None:
        doc["broker"] = broker
    doc.update(extra)
    PipelineConfig.model_validate(doc)  # fail here, naming the field, not inside a benchmark
    return doc


def iter_clip(path: Path, limit: int | None = None) -> Iterator[np.ndarray]:
    """The clip's BGR frames, in order, at most ``limit``."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise SystemExit(f"error: cannot open {path}")
    try:
        count = 0
        while limit is None or count < limit:
            ok, image = cap.read()
            if not ok:
                return
            count += 1
            yield image
    finally:
        cap.release()


def read_clip(path: Path, limit: int | None = None) -> list[np.ndarray]:
    """All (or the first ``limit``) frames of the clip in memory."""
    frames = list(iter_clip(path, limit))
    if not frames:
        raise SystemExit(f"error: no frames in {path}")
    return frames


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    """Median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


class CountingSink:
    """An extra sink for a ``Worker``: timestamps every result and asks the worker to stop after ``limit``.

    It implements the ``worker.sinks.Sink`` interface; the pipeline's own sinks still get every
    message, this one only watches. ``first_at`` / ``last_at`` are ``time.perf_counter()`` values.
    """

    name = "bench-counter"
    connected = None  # no broker

    def __init__(self, limit: int | None = None, on_limit: Any = None) -> None:
        self.limit = limit
        self.on_limit = on_limit
        self.results = 0
        self.errors = 0
        self.first_at: float | None = None
        self.limit_at: float | None = None
        self._open = False

    async def start(self) -> None:
        self._open = True

    async def publish_result(self, result: FrameResult) -> None:
        if not self._open:
            raise SinkError(f"sink[{self.name}] is not open")
        now = time.perf_counter()
        self.results += 1
        if self.first_at is None:
            self.first_at = now
        if self.limit is not None and self.results == self.limit:
            self.limit_at = now
            if self.on_limit is not None:
                self.on_limit()

    async def publish_error(self, report: ErrorReport) -> None:
        self.errors += 1

    async def flush(self) -> None:
        pass

    async def close(self, timeout: float = 10.0) -> int:  # noqa: ASYNC109
        self._open = False
        return 0


@dataclass(frozen=True)
class PipelineRun:
    """One counted worker run: frames/s over the wall time and the process CPU seconds per frame."""

    fps: float
    cpu_ms_per_frame: float


async def run_counted_pipeline(
    config: PipelineConfig,
    models_dir: Path | None,
    frames: int,
    *,
    metrics: Metrics | None = None,
    during: Callable[[Any], Awaitable[None]] | None = None,
) -> PipelineRun:
    """Run a ``Worker`` until ``frames`` results; time from its sources starting to the last result.

    Args:
        config: the pipeline (its sources must yield at least ``frames`` frames).
        models_dir: handed to the worker.
        frames: results to wait for; a counting sink then asks the worker to stop.
        metrics: handed to the worker (default: its own ``Metrics``).
        during: a coroutine function given the running worker, run from the start until the worker
            stops (e.g. a scraper); it is cancelled then.

    Raises:
        RuntimeError: the worker failed or stopped before ``frames`` results.
    """
    from worker.runtime import Worker  # the runtime pulls in every stage; only the runs need it

    counter = CountingSink(limit=frames)
    worker = await Worker.create(config, models_dir=models_dir, extra_sinks=[counter], metrics=metrics)
    counter.on_limit = worker.request_stop
    run = asyncio.create_task(worker.run(), name="worker")
    started = asyncio.create_task(worker.started.wait())
    await asyncio.wait([run, started], return_when=asyncio.FIRST_COMPLETED)
    start, cpu_start = time.perf_counter(), time.process_time()
    side = asyncio.create_task(during(worker)) if during is not None and not run.done() else None
    try:
        code = await run
    finally:
        started.cancel()
        if side is not None:
            side.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await side
    cpu = time.process_time() - cpu_start
    if code != 0 or counter.limit_at is None:
        raise RuntimeError(
            f"pipeline exited with {code} after {counter.results} results ({counter.errors} errors)"
        )
    return PipelineRun(frames / (counter.limit_at - start), 1000.0 * cpu / frames)
