"""KServe v2 against a real server: NVIDIA Triton (PyTriton) serving the bundled ONNX model with ONNX
Runtime on loopback, started by the test in its own process group and killed by PID.

- agreement: the demo clip's frames through the remote backend give the local backend's detections
  (same classes, boxes within 1 px, mask IoU >= 0.95);
- start-up checks: an unknown model, a package whose classes do not fit the server's outputs;
- faults: the server killed mid-stream and restarted (live frames fail with ``server_unavailable``,
  every_frame frames wait and all come out once it is back), a slow server trips the timeout.

Skipped when the PyTriton environment is not installed (``scripts/install-remote-servers.sh``), but
never in CI (``CI`` set): there a missing environment fails.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tests.remote.conftest import DEMO
from tests.support.servers import ServerProcess
from worker.errors import ModelError
from worker.frame import Frame
from worker.models.config import OnnxRuntimeConfig, RemoteModelConfig
from worker.models.evaluation import iter_frames
from worker.models.registry import BUNDLED_MODELS_DIR, ModelRegistry, load_backend
from worker.models.remote import bind_remote
from worker.models.remote.hold import HeldForServer
from worker.models.remote.kserve import KServeV2Backend
from worker.step.detections import Detections
from worker.step.executor import WorkflowRunner
from worker.step.postprocess import PostprocessParams, postprocess_frame
from worker.step.workflow import load_workflow

REPO = Path(__file__).resolve().parents[2]
CLIP = REPO / "worker" / "assets" / "demo_clip.mp4"


def _remote(url: str, **fields: Any) -> RemoteModelConfig:
    values: dict[str, Any] = {
        "backend": "remote",
        "protocol": "kserve_v2",
        "url": url,
        "retry_backoff_s": (0.01, 0.05),
        "probe_interval_s": (0.05, 0.5),
    }
    return RemoteModelConfig.model_validate(values | fields)


def _detections(model: Any, frames: list[np.ndarray]) -> list[Detections]:
    params = PostprocessParams(confidence=0.4, iou_threshold=0.5)
    return [postprocess_frame(r.predictions, r.prototypes, r.letterbox, params) for r in model.infer(frames)]


def _full_mask(d: Detections, j: int) -> np.ndarray:
    out = np.zeros(d.frame_shape, bool)
    crop, (ox, oy) = d.masks.crops[j], d.masks.offsets[j]
    out[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop
    return out


@pytest.fixture(scope="module")
def clip_frames() -> list[np.ndarray]:
    return list(iter_frames(CLIP, every=8, limit=30))


def test_remote_gives_the_local_detections_on_the_demo_clip(
    triton: ServerProcess, clip_frames: list[np.ndarray]
) -> None:
    local = load_backend(DEMO, OnnxRuntimeConfig(intra_op_threads=1))
    remote = KServeV2Backend(DEMO, "factory-parts/1", _remote(triton.url))
    try:
        assert remote.class_names == local.class_names and remote.input_size == local.input_size
        expected = _detections(local, clip_frames)
        actual: list[Detections] = []
        for start in range(0, len(clip_frames), 4):  # batches of 4: one request each
            actual.extend(_detections(remote, clip_frames[start : start + 4]))
    finally:
        remote.close()
        local.close()
    assert sum(len(d) for d in expected) > 60  # the comparison means something
    ious = []
    for exp, act in zip(expected, actual, strict=True):
        assert len(act) == len(exp)
        for j in range(len(exp)):
            k = int(np.argmin(np.abs(act.xyxy - exp.xyxy[j]).max(axis=1)))
            assert act.class_id[k] == exp.class_id[j]
            np.testing.assert_allclose(np.round(act.xyxy[k]), np.round(exp.xyxy[j]), atol=1.0)
            a, b = _full_mask(exp, j), _full_mask(act, k)
            union = (a | b).sum()
            ious.append(1.0 if union == 0 else (a & b).sum() / union)
    assert min(ious) >= 0.95


def test_through_the_registry_and_the_step_with_metrics(triton: ServerProcess) -> None:
    model_config = _remote(triton.url, max_concurrency=2)
    registry = ModelRegistry([BUNDLED_MODELS_DIR])
    runner = WorkflowRunner(load_workflow(_workflow()), registry, model_config=model_config)
    (model,) = runner.models.values()
    metrics = CollectorRegistry()
    health = _Health()
    bind_remote(model, _Metrics(metrics), health, "factory-parts/1")
    frames = [
        Frame("cam", i, 0.0, img, f"f{i}", {}) for i, img in enumerate(iter_frames(CLIP, every=30, limit=3))
    ]
    outcomes = runner.run_batch(frames).outcomes
    registry.close()
    assert all(o.error is None for o in outcomes)
    assert any(o.outputs and o.outputs["predictions"]["predictions"] for o in outcomes)
    server = triton.url
    assert metrics.get_sample_value("segstream_remote_request_seconds_count", {"server": server}) == 1
    sent = metrics.get_sample_value("segstream_remote_sent_bytes_total", {"server": server})
    assert sent is not None and sent > 3 * 3 * 480 * 480 * 4  # one batch of three FP32 tensors
    assert health.loaded == [True]


def _workflow() -> dict[str, Any]:
    return {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [
            {
                "type": "roboflow_core/roboflow_instance_segmentation_model@v4",
                "name": "seg",
                "images": "$inputs.image",
                "model_id": "factory-parts/1",
            }
        ],
        "outputs": [{"type": "JsonField", "name": "predictions", "selector": "$steps.seg.predictions"}],
    }


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry


class _Health:
    """What ``bind_remote`` needs of ``HealthState`` (readiness follows the server)."""

    def __init__(self) -> None:
        self.loaded: list[bool] = []
        self.changed = threading.Condition()

    def set_model_loaded(self, loaded: bool = True) -> None:
        with self.changed:
            self.loaded.append(loaded)
            self.changed.notify_all()

    def wait_for(self, value: bool, timeout: float = 120.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.loaded and self.loaded[-1] is value, timeout)


def test_an_unknown_model_and_a_package_that_does_not_fit_are_start_up_errors(
    triton: ServerProcess, tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match=r"/v2/models/no-such-model.*HTTP 400|HTTP 404"):
        KServeV2Backend(DEMO, "factory-parts/1", _remote(triton.url, model_name="no-such-model"))
    package = tmp_path / "factory-parts" / "1"
    shutil.copytree(DEMO, package)
    meta = json.loads((package / "metadata.json").read_text())
    meta["class_names"] = ["nut", "washer", "bolt"]  # the server's model has four
    meta.pop("recommended_parameters", None)
    (package / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(
        ModelError, match=r"predictions output has shape \(1, 40, 4725\), expected \(1, 39, N\)"
    ):
        # the declared channel axis is dynamic: the warm-up run's outputs are what is checked
        KServeV2Backend(package, "factory-parts/1", _remote(triton.url))


def _frames(source: str, count: int, start: int = 0) -> list[Frame]:
    image = next(iter(iter_frames(CLIP, every=1, limit=1)))
    return [Frame(source, start + i, 0.0, image, f"{source}:{start + i}", {}) for i in range(count)]


def test_server_killed_mid_stream_live_frames_fail_held_frames_come_out_once_it_is_back(
    fresh_triton: Callable[..., ServerProcess],
) -> None:
    server = fresh_triton()
    registry = ModelRegistry([BUNDLED_MODELS_DIR])
    config = _remote(server.url, timeout_s=10, breaker_failures=2, probe_interval_s=(0.05, 0.3))
    runner = WorkflowRunner(load_workflow(_workflow()), registry, model_config=config, held_sources={"line"})
    (model,) = runner.models.values()
    health = _Health()
    bind_remote(model, _Metrics(CollectorRegistry()), health, "factory-parts/1")
    try:
        before = runner.run_batch(_frames("cam", 1) + _frames("line", 1)).outcomes
        assert all(o.error is None for o in before)

        server.kill()  # SIGKILL to the server's process group, mid-stream
        live = runner.run_batch(_frames("cam", 3, start=1)).outcomes
        assert [o.error.reason if o.error else None for o in live] == ["server_unavailable"] * 3
        live = runner.run_batch(_frames("cam", 2, start=4)).outcomes  # the breaker opens
        assert [o.error.reason if o.error else None for o in live] == ["server_unavailable"] * 2
        assert health.wait_for(False)  # readiness follows the server

        # the batch returns at once (no model thread waits): held frames are marked for the loop
        mixed = runner.run_batch(_frames("cam", 1, start=9) + _frames("line", 4, start=1)).outcomes
        assert mixed[0].error is not None and type(mixed[0].error) is not HeldForServer
        assert mixed[0].error.reason == "server_unavailable"
        held = [o.error for o in mixed[1:]]
        assert all(isinstance(e, HeldForServer) and e.reason == "server_unavailable" for e in held)
        assert all(isinstance(e, HeldForServer) and e.model is model for e in held)

        server.restart()
        assert model.wait_available(180)  # what the inference loop waits on before running them again
        again = runner.run_batch([o.frame for o in mixed[1:]]).outcomes
        assert [o.error for o in again] == [None] * 4  # every held frame came out
        assert [o.frame.frame_number for o in again] == [1, 2, 3, 4]
        assert health.wait_for(True)
        after = runner.run_batch(_frames("cam", 2, start=10)).outcomes
        assert all(o.error is None for o in after)
    finally:
        registry.close()


def test_a_slow_server_trips_the_timeout_not_the_worker(
    fresh_triton: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    stall = tmp_path / "stall"
    server = fresh_triton(stall_file=stall)
    registry = ModelRegistry([BUNDLED_MODELS_DIR])
    config = _remote(server.url, timeout_s=1.0, retries=3, breaker_failures=5)
    runner = WorkflowRunner(load_workflow(_workflow()), registry, model_config=config)
    (model,) = runner.models.values()
    metrics = CollectorRegistry()
    bind_remote(model, _Metrics(metrics), _Health(), "factory-parts/1")
    try:
        assert all(o.error is None for o in runner.run_batch(_frames("cam", 1)).outcomes)
        stall.touch()  # the server stops answering (the model call waits while the file exists)
        slow = runner.run_batch(_frames("cam", 2, start=1)).outcomes
        assert [o.error.reason if o.error else None for o in slow] == ["remote_timeout"] * 2
        assert "no answer within 1.0 s" in str(slow[0].error)
        labels = {"server": server.url, "kind": "timeout"}
        assert metrics.get_sample_value("segstream_remote_errors_total", labels) == 1  # not retried
        stall.unlink()  # the server answers again: batches go through (polled: the server first
        # finishes the abandoned request, which on a loaded machine can outlast one more timeout)
        for attempt in range(30):
            after = runner.run_batch(_frames("cam", 1, start=3 + attempt)).outcomes
            if after[0].error is None:
                break
            assert after[0].error.reason == "remote_timeout"
        assert after[0].error is None
    finally:
        registry.close()
