"""Remote inference against local on this machine: frames/s, latency, and the protocol's overhead.

Cases (the servers run on loopback, started here in their own environments, as the tests do):

- ``local``: ONNX Runtime FP32 on the CPU, ``--threads`` intra-op threads (the baseline);
- ``kserve_v2``: NVIDIA Triton (PyTriton) hosting the same ``weights.onnx`` with ONNX Runtime
  (``--threads`` threads), segstream's ``remote`` backend with ``protocol: kserve_v2``;
- ``roboflow``: the Roboflow inference server (``inference-cpu``) serving the same package as a local
  model package, ``protocol: roboflow`` (PNG frames: lossless); ``roboflow-jpeg``: the same with
  ``image_format: jpeg`` (quality 90).

Each case runs the demo clip's frames through the step (``WorkflowRunner.run_batch``: pre-processing,
inference, post-processing, serialization; v4 step, custom confidence 0.4) in batches of ``--batch``,
in rounds whose case order rotates (a load spike hits all cases alike). Frames/s is frames over wall
time, latency the wall time of one batch (median and p95 over all batches of all rounds).

Overhead per frame, measured in the same run on the same frames: the request bytes per frame (the
client's ``segstream_remote_sent_bytes_total`` over frames) and the serialization ms per frame,
timed in-process outside the request: for KServe v2 building the binary request from the letterboxed
tensor plus reading the outputs from the answer (``encode_infer_request`` + ``decode_infer_response``
on a real answer); for Roboflow the PNG + base64 + JSON of the request plus mapping the answer's
predictions (RLE decode) to detections.

On loopback the server shares this machine's CPUs with the worker, so a remote case cannot be faster
than local here: what is measured is the protocol's cost. On a real rack the server's GPU does the
inference and the worker's CPU only letterboxes, (de)serializes and post-processes.

The last line sums up: ``kserve_v2/local=<ratio> roboflow/local=<ratio> roboflow-jpeg/local=<ratio>``
(frames/s ratios; ``n/a`` for a server that is not installed).

Usage::

    python -m benchmarks.remote [--frames 24] [--rounds 3] [--batch 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from benchmarks._common import DEFAULT_CLIP, percentile, print_header, read_clip
from tests.support.servers import ServerProcess, kserve_python, roboflow_python, start_kserve, start_roboflow
from worker.concurrency import limit_blas_threads
from worker.frame import Frame
from worker.models.config import OnnxRuntimeConfig, RemoteModelConfig
from worker.models.letterbox import letterbox_batch
from worker.models.registry import BUNDLED_MODELS_DIR, ModelRegistry
from worker.models.remote import bind_remote
from worker.models.remote.kserve import KServeV2Backend, decode_infer_response, encode_infer_request
from worker.models.remote.roboflow import RoboflowBackend
from worker.step.executor import WorkflowRunner
from worker.step.workflow import load_workflow

MODEL_ID = "factory-parts/1"
PACKAGE = BUNDLED_MODELS_DIR / "factory-parts" / "1"
WORKFLOW: dict[str, Any] = {
    "version": "1.0",
    "inputs": [{"type": "WorkflowImage", "name": "image"}],
    "steps": [
        {
            "type": "roboflow_core/roboflow_instance_segmentation_model@v4",
            "name": "seg",
            "images": "$inputs.image",
            "model_id": MODEL_ID,
            "confidence_mode": "custom",
            "custom_confidence": 0.4,
        }
    ],
    "outputs": [{"type": "JsonField", "name": "predictions", "selector": "$steps.seg.predictions"}],
}


@dataclass
class Case:
    name: str
    runner: WorkflowRunner
    metrics: CollectorRegistry | None = None
    server: str | None = None
    fps: list[float] = field(default_factory=list)
    batch_s: list[float] = field(default_factory=list)
    frames_done: int = 0
    serialization_ms: float = float("nan")

    def bytes_per_frame(self) -> float:
        if self.metrics is None or not self.frames_done:
            return float("nan")
        sent = self.metrics.get_sample_value("segstream_remote_sent_bytes_total", {"server": self.server})
        return float(sent or 0.0) / self.frames_done


def _run_round(case: Case, frames: list[Frame], batch: int) -> None:
    started = time.perf_counter()
    for start in range(0, len(frames), batch):
        t0 = time.perf_counter()
        outcomes = case.runner.run_batch(frames[start : start + batch]).outcomes
        case.batch_s.append(time.perf_counter() - t0)
        failed = [o.error for o in outcomes if o.error is not None]
        if failed:
            raise SystemExit(f"error: {case.name}: {failed[0]}")
    case.fps.append(len(frames) / (time.perf_counter() - started))
    case.frames_done += len(frames)


def _median_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def _kserve_serialization_ms(model: KServeV2Backend, images: list[np.ndarray]) -> float:
    batch, _ = letterbox_batch(images, model.input_size, model.metadata.pad_value)
    names = (model._pred_name, model._proto_name)
    body, headers = encode_infer_request(model.signature.input_name, batch, names)
    answer = model.client.request("POST", f"{model._model_path}/infer", body=body, headers=headers)
    encode = _median_ms(lambda: encode_infer_request(model.signature.input_name, batch, names))
    decode = _median_ms(lambda: decode_infer_response(answer.body, answer.headers))
    return (encode + decode) / len(images)


def _roboflow_serialization_ms(model: RoboflowBackend, images: list[np.ndarray]) -> float:
    params = {"confidence": 0.4, "response_mask_format": "rle"}
    body = model._request_body(images, params)
    headers = {"Content-Type": "application/json"}
    answer = model.client.request("POST", "/infer/instance_segmentation", body=body, headers=headers)
    answers = json.loads(answer.body)
    answers = answers if isinstance(answers, list) else [answers]
    encode = _median_ms(lambda: model._request_body(images, params))
    decode = _median_ms(
        lambda: [model._detections(a, im.shape[:2]) for a, im in zip(answers, images, strict=True)]
    )
    return (encode + decode) / len(images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, worker and servers")
    args = parser.parse_args()
    print_header(
        f"remote vs local: {args.frames} demo-clip frames through the v4 step in batches of {args.batch}, "
        f"{args.rounds} rounds (rotating order), servers on loopback"
    )
    limit_blas_threads(1)
    images = read_clip(DEFAULT_CLIP, args.frames * 4)[::4][: args.frames]
    frames = [Frame("belt", i, 0.0, image, f"belt:{i}", {}) for i, image in enumerate(images)]
    workdir = Path(tempfile.mkdtemp(prefix="segstream-bench-remote-"))
    registry = ModelRegistry([BUNDLED_MODELS_DIR])
    workflow = load_workflow(WORKFLOW)
    servers: list[ServerProcess] = []
    cases = [
        Case(
            "local",
            WorkflowRunner(workflow, registry, model_config=OnnxRuntimeConfig(intra_op_threads=args.threads)),
        )
    ]
    unavailable: list[str] = []
    try:
        for name, python, start in (
            (
                "kserve_v2",
                kserve_python(),
                lambda: start_kserve(workdir, model=PACKAGE, name="factory-parts"),
            ),
            (
                "roboflow",
                roboflow_python(),
                lambda: start_roboflow(workdir, model=PACKAGE, model_id=MODEL_ID),
            ),
        ):
            if python is None:
                unavailable.append(name)
                print(f"{name}: not available (scripts/install-remote-servers.sh)")
                continue
            server = start()
            servers.append(server)
            variants = [(name, "png")] + ([("roboflow-jpeg", "jpeg")] if name == "roboflow" else [])
            for case_name, image_format in variants:
                config = RemoteModelConfig(
                    backend="remote",
                    protocol=name,  # type: ignore[arg-type]
                    url=server.url,
                    timeout_s=120,
                    max_concurrency=1,
                    image_format=image_format,  # type: ignore[arg-type]
                )
                runner = WorkflowRunner(workflow, registry, model_config=config)
                metrics = CollectorRegistry()
                (model,) = runner.models.values()
                bind_remote(model, type("M", (), {"registry": metrics})(), _NoHealth(), MODEL_ID)
                cases.append(Case(case_name, runner, metrics, server.url))
        for case in cases:  # warm-up: one batch each, not counted
            case.runner.run_batch(frames[: args.batch])
            if case.metrics is not None:
                case.frames_done = 0
                case.metrics = _fresh(case)
        for round_index in range(args.rounds):
            order = cases[round_index % len(cases) :] + cases[: round_index % len(cases)]
            for case in order:
                _run_round(case, frames, args.batch)
        for case in cases:
            model = next(iter(case.runner.models.values()))
            sample = images[: args.batch]
            if isinstance(model, KServeV2Backend):
                case.serialization_ms = _kserve_serialization_ms(model, sample)
            elif isinstance(model, RoboflowBackend):
                case.serialization_ms = _roboflow_serialization_ms(model, sample)
    finally:
        registry.close()
        for server in servers:
            server.kill()

    head = f"{'case':<10} {'frames/s':>9} {'batch ms p50':>13} {'p95':>8} {'bytes/frame':>12}"
    print(f"{head} {'serial. ms/frame':>17}")
    for case in cases:
        p50, p95 = (percentile(case.batch_s, q) * 1000 for q in (50, 95))
        row = f"{case.name:<10} {statistics.median(case.fps):9.2f} {p50:13.1f} {p95:8.1f}"
        print(f"{row} {case.bytes_per_frame():12.0f} {case.serialization_ms:17.2f}")
    local_fps = statistics.median(cases[0].fps)
    ratios = []
    for name in ("kserve_v2", "roboflow", "roboflow-jpeg"):
        case = next((c for c in cases if c.name == name), None)
        ratios.append(
            f"{name}/local={statistics.median(case.fps) / local_fps:.2f}" if case else f"{name}/local=n/a"
        )
    print(" ".join(ratios))
    return 0


class _NoHealth:
    def set_model_loaded(self, loaded: bool = True) -> None:
        pass


def _fresh(case: Case) -> CollectorRegistry:
    """Rebind the case's client to a new registry so the warm-up's bytes are not counted."""
    registry = CollectorRegistry()
    model = next(iter(case.runner.models.values()))
    model.client.use_metrics(registry)
    return registry


if __name__ == "__main__":
    raise SystemExit(main())
