"""Helpers for the end-to-end tests: a test model package, pipeline files, a running worker, scraping.

The model is a tiny YOLOv8-seg layout ONNX graph with known outputs (``tests.support.onnx_models``):
on every frame it proposes a bolt (0.9), a nut (0.6) and a washer (0.3) whose masks fill their boxes,
so a confidence of 0.4 keeps bolt and nut and 0.7 keeps only the bolt.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
from onnx import helper, numpy_helper

from tests.support.onnx_models import (
    build_segmentation_model,
    candidate_rows,
    package_metadata,
    write_model_package,
)
from tests.support.waiting import wait_until
from worker.config import PipelineConfig
from worker.runtime import Worker

__all__ = [
    "BOXES",
    "CLASSES",
    "MODEL_ID",
    "frame_json",
    "http_get",
    "jpeg_bytes",
    "make_models_dir",
    "metric_value",
    "parse_metrics",
    "pipeline_config",
    "running",
    "workflow_v4",
    "write_video",
]

MODEL_ID = "parts/1"
CLASSES = ["bolt", "nut", "washer"]
# cx, cy, w, h in the 64x64 model input
BOXES = [[16, 16, 16, 16], [44, 44, 12, 20], [48, 12, 8, 8]]
SCORES = [[0.9, 0.05, 0.0], [0.1, 0.6, 0.0], [0.0, 0.0, 0.3]]


def make_models_dir(root: Path, *, slow_channels: int = 0) -> Path:
    """Write the test model package ``parts/1`` under ``root`` and return ``root``.

    ``slow_channels`` > 0 adds a 7x7 convolution with that many output channels over a 256x256 input
    (its result is multiplied by 0, so the outputs do not change): inference then costs what a real
    model costs on a CPU (tens to hundreds of ms), for tests of what happens while frames wait.
    """
    coefficients = np.zeros((3, 32), np.float32)
    coefficients[:, 0] = 1.0  # prototype 0 is +8 everywhere: each mask fills its box
    prototypes = np.zeros((32, 16, 16), np.float32)
    prototypes[0] = 8.0
    model = build_segmentation_model(
        3,
        candidates=candidate_rows(BOXES, SCORES, coefficients),
        prototypes=prototypes,
        input_size=(256, 256) if slow_channels else (64, 64),
    )
    if slow_channels:
        model = _with_busy_work(model, slow_channels)
    size = (256, 256) if slow_channels else (64, 64)
    write_model_package(root / "parts" / "1", model, package_metadata(CLASSES, size))
    return root


def _with_busy_work(model: onnx.ModelProto, channels: int) -> onnx.ModelProto:
    """``output0 += 0 * mean(conv7x7(images))``: real work whose result does not change the outputs."""
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["output0_plain" if name == "output0" else name for name in node.output]
    weights = np.random.default_rng(0).standard_normal((channels, 3, 7, 7)).astype(np.float32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(weights, "busy_weights"),
            numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "busy_shape"),
            numpy_helper.from_array(np.array(0.0, np.float32), "busy_zero"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Conv", ["images", "busy_weights"], ["busy_conv"], pads=[3, 3, 3, 3]),
            helper.make_node("ReduceMean", ["busy_conv"], ["busy_mean"], keepdims=1),
            helper.make_node("Reshape", ["busy_mean", "busy_shape"], ["busy_flat"]),
            helper.make_node("Mul", ["busy_flat", "busy_zero"], ["busy_nothing"]),
            helper.make_node("Add", ["output0_plain", "busy_nothing"], ["output0"]),
        ]
    )
    onnx.checker.check_model(model)
    return model


def workflow_v4(confidence: float = 0.4) -> dict[str, Any]:
    """A v4 workflow (RLE masks) whose confidence is the runtime input ``$inputs.confidence``."""
    return {
        "version": "1.0",
        "inputs": [
            {"type": "WorkflowImage", "name": "image"},
            {"type": "WorkflowParameter", "name": "confidence", "default_value": confidence},
        ],
        "steps": [
            {
                "type": "roboflow_core/roboflow_instance_segmentation_model@v4",
                "name": "seg",
                "images": "$inputs.image",
                "model_id": MODEL_ID,
                "confidence_mode": "custom",
                "custom_confidence": "$inputs.confidence",
            }
        ],
        "outputs": [
            {"type": "JsonField", "name": "predictions", "selector": "$steps.seg.predictions"},
            {"type": "JsonField", "name": "model_id", "selector": "$steps.seg.model_id"},
        ],
    }


def pipeline_config(
    name: str,
    *,
    sources: list[dict[str, Any]],
    sinks: list[dict[str, Any]],
    broker: Any = None,
    models_dir: Path | None = None,
    **extra: Any,
) -> PipelineConfig:
    """A validated pipeline: HTTP on a free loopback port, no summary, a short grace time."""
    doc: dict[str, Any] = {
        "name": name,
        "sources": sources,
        "sinks": sinks,
        "workflow": workflow_v4(),
        "http": {"host": "127.0.0.1", "port": 0},
        "print_summary": False,
        "shutdown_grace_s": 15,
        "batching": {"max_batch_size": 4, "max_wait_ms": 5},
    }
    if broker is not None:
        doc["broker"] = {
            "host": broker.host,
            "port": broker.port,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.5,
        }
    if models_dir is not None:
        doc["model"] = {"models_dir": str(models_dir), "intra_op_threads": 1}
    doc.update(extra)
    return PipelineConfig.model_validate(doc)


@asynccontextmanager
async def running(worker: Worker, *, ready: bool = True) -> AsyncIterator[asyncio.Task[int]]:
    """Run ``worker`` as a task; wait until it is started (and ready, with every MQTT source
    subscribed and the control topic listened to); on exit stop it and check it exits with 0."""
    task = asyncio.create_task(worker.run(), name=f"worker[{worker.name}]")

    def up() -> bool:
        if task.done():
            return True
        if not worker.started.is_set():
            return False
        if not ready:
            return True
        if not worker.health.readiness().ok:
            return False
        snapshot = worker.metrics.snapshot()
        mqtt_sources = [s.id for s in worker.config.sources if s.type == "mqtt"]
        if not all(snapshot.get(s) and snapshot[s].connected for s in mqtt_sources):
            return False
        control = worker.control
        return control is None or control.subscribed.is_set()

    try:
        await wait_until(up, f"worker {worker.name} to start")
        if task.done():
            task.result()  # raises what stopped it
            raise AssertionError(f"worker {worker.name} ended at start-up")
        yield task
    finally:
        worker.request_stop()
        code = await asyncio.wait_for(task, timeout=worker.config.shutdown_grace_s + 15)
    assert code == 0, f"worker {worker.name} exited with {code}"


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (96, 128)) -> bytes:
    """A JPEG of ``size`` (h, w) with smooth, seed-dependent content."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(xx * 2 + seed) % 256, (yy * 2 + 3 * seed) % 256, (xx + yy) % 256], axis=-1)
    ok, buffer = cv2.imencode(".jpg", image.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buffer.tobytes()


def frame_json(
    image: bytes, frame_id: str | None = None, timestamp: float | None = None, **parameters: Any
) -> bytes:
    """A JSON frame payload (base64 image, frame id, timestamp, per-frame parameters)."""
    doc: dict[str, Any] = {"image": base64.b64encode(image).decode()}
    if frame_id is not None:
        doc["frame_id"] = frame_id
    if timestamp is not None:
        doc["timestamp"] = timestamp
    if parameters:
        doc["parameters"] = parameters
    return json.dumps(doc).encode()


def write_video(path: Path, frames: int, size: tuple[int, int] = (120, 160), fps: float = 25.0) -> Path:
    """An MJPG ``.avi`` of ``frames`` frames whose content changes per frame."""
    h, w = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), f"cannot write {path}"
    for i in range(frames):
        image = np.full((h, w, 3), (i * 7) % 256, np.uint8)
        cv2.putText(image, str(i), (10, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
        writer.write(image)
    writer.release()
    return path


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """``(status, body)`` of a GET on 127.0.0.1 (blocking: call through ``asyncio.to_thread``)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples ``(name, labels, value)`` of a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise AssertionError(f"unparseable metrics line: {line!r}")
        name, labels, value = match.groups()
        samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return samples


def metric_value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))
