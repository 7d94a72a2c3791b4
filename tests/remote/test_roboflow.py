"""The Roboflow inference server's HTTP API against the real server (``inference-cpu``) serving the
bundled model as a local model package, started by the test on loopback and killed by PID.

The server runs the whole model itself (its own letterbox, NMS and mask decoding), so boxes and
classes must agree with the local step, and masks are compared by their measured IoU: the server
decodes masks with its own upsampling (``inference_models``' YOLOv8 post-processing crops and
resizes the prototype masks with torch's bilinear interpolation at image resolution) where segstream
follows the reference block's decode, so mask edges differ by design (mean IoU about 0.89 for RLE on
the demo clip, measured below; polygons are the RLE masks' outer contours re-filled: about 0.84).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tests.remote.test_kserve import CLIP, _full_mask, _Health, _Metrics
from tests.support.servers import ServerProcess
from worker.errors import ModelError
from worker.frame import Frame
from worker.models.config import OnnxRuntimeConfig, RemoteModelConfig
from worker.models.evaluation import iter_frames
from worker.models.registry import BUNDLED_MODELS_DIR, ModelRegistry
from worker.models.remote import bind_remote
from worker.models.remote.hold import HeldForServer
from worker.models.remote.roboflow import decode_rle, rle_to_crop
from worker.step.executor import WorkflowRunner
from worker.step.rle import encode_crop
from worker.step.workflow import load_workflow


def _remote(url: str, **fields: Any) -> RemoteModelConfig:
    values: dict[str, Any] = {
        "backend": "remote",
        "protocol": "roboflow",
        "url": url,
        "timeout_s": 120,
        "image_format": "png",  # lossless: the server sees the pixels the local step sees
        "retry_backoff_s": (0.01, 0.05),
        "probe_interval_s": (0.05, 0.5),
    }
    return RemoteModelConfig.model_validate(values | fields)


def _workflow(version: int) -> dict[str, Any]:
    step: dict[str, Any] = {
        "type": f"roboflow_core/roboflow_instance_segmentation_model@v{version}",
        "name": "seg",
        "images": "$inputs.image",
        "model_id": "factory-parts/1",
    }
    if version >= 3:  # v3/v4 default to "best": thresholds that resolve on each side from its own
        step |= {"confidence_mode": "custom", "custom_confidence": 0.4}
    else:
        step |= {"confidence": 0.4}
    return {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [step],
        "outputs": [{"type": "JsonField", "name": "predictions", "selector": "$steps.seg.predictions"}],
    }


def test_decode_rle_inverts_the_step_encoder() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    rle = encode_crop(crop, (int(xs.min()), int(ys.min())), mask.shape)
    np.testing.assert_array_equal(decode_rle(rle["counts"], rle["size"]), mask)
    got, offset = rle_to_crop(rle["counts"], rle["size"])
    assert offset == (int(xs.min()), int(ys.min()))
    np.testing.assert_array_equal(got, crop)
    empty, _ = rle_to_crop(encode_crop(np.zeros((0, 0), bool), (0, 0), (4, 5))["counts"], (4, 5))
    assert empty.size == 0
    with pytest.raises(ValueError, match="add up"):
        decode_rle(rle["counts"], (37, 54))


@pytest.mark.parametrize(("version", "mean_iou"), [(4, 0.85), (1, 0.80)])
def test_remote_gives_the_local_detections_on_the_demo_clip(
    roboflow_server: ServerProcess, version: int, mean_iou: float
) -> None:
    frames = [
        Frame("cam", i, 0.0, img, f"f{i}", {}) for i, img in enumerate(iter_frames(CLIP, every=8, limit=24))
    ]
    registry = ModelRegistry([BUNDLED_MODELS_DIR])
    try:
        local = WorkflowRunner(
            load_workflow(_workflow(version)), registry, model_config=OnnxRuntimeConfig(intra_op_threads=1)
        )
        remote = WorkflowRunner(
            load_workflow(_workflow(version)), registry, model_config=_remote(roboflow_server.url)
        )
        expected, actual = [], []
        for start in range(0, len(frames), 4):  # one request per batch of four
            expected += local.run_batch(frames[start : start + 4]).outcomes
            actual += remote.run_batch(frames[start : start + 4]).outcomes
    finally:
        registry.close()
    key = "rle_mask" if version == 4 else "points"
    ious = []
    for exp, act in zip(expected, actual, strict=True):
        assert act.error is None, act.error
        assert act.outputs is not None and exp.outputs is not None
        predictions = act.outputs["predictions"]["predictions"]
        assert all(key in p and p["parent_id"] == act.frame.frame_id for p in predictions)
        assert set(predictions[0]) == set(exp.outputs["predictions"]["predictions"][0])  # same fields
        e, a = exp.detections["seg"], act.detections["seg"]
        assert len(a) == len(e)
        for j in range(len(e)):
            k = int(np.argmin(np.abs(a.xyxy - e.xyxy[j]).max(axis=1)))
            assert a.class_id[k] == e.class_id[j]
            # the server's boxes are whole pixels
            np.testing.assert_allclose(a.xyxy[k], np.round(e.xyxy[j]), atol=1.0)
            x, y = _full_mask(e, j), _full_mask(a, k)
            ious.append((x & y).sum() / max((x | y).sum(), 1))
    assert len(ious) > 150
    print(f"roboflow v{version}: mask IoU mean {np.mean(ious):.3f} min {np.min(ious):.3f} over {len(ious)}")
    assert np.mean(ious) >= mean_iou


def test_an_unknown_model_id_is_a_start_up_error(roboflow_server: ServerProcess) -> None:
    registry = ModelRegistry([BUNDLED_MODELS_DIR])
    # offline, the server cannot resolve an id that is no local package: it answers 503
    with pytest.raises(ModelError, match=r"model no-such/9: .*HTTP (4\d\d|503)"):
        registry.load("factory-parts/1", _remote(roboflow_server.url, model_name="no-such/9"))
    registry.close()


def test_server_killed_mid_stream_live_frames_fail_held_frames_come_out_once_it_is_back(
    fresh_roboflow: Callable[..., ServerProcess],
) -> None:
    server = fresh_roboflow()
    registry = ModelRegistry([BUNDLED_MODELS_DIR])
    config = _remote(server.url, breaker_failures=1, probe_interval_s=(0.1, 1.0))
    runner = WorkflowRunner(load_workflow(_workflow(4)), registry, model_config=config, held_sources={"line"})
    (model,) = runner.models.values()
    health = _Health()
    metrics = CollectorRegistry()
    bind_remote(model, _Metrics(metrics), health, "factory-parts/1")
    image = next(iter(iter_frames(CLIP, every=1, limit=1)))
    try:
        assert runner.run_batch([Frame("cam", 0, 0.0, image)]).outcomes[0].error is None
        server.kill()
        live = runner.run_batch([Frame("cam", i, 0.0, image) for i in (1, 2)]).outcomes
        assert [o.error.reason if o.error else None for o in live] == ["server_unavailable"] * 2
        assert health.wait_for(False)
        # the batch returns at once (no model thread waits): held frames are marked for the loop
        held = runner.run_batch([Frame("line", i, 0.0, image) for i in range(3)]).outcomes
        assert all(isinstance(o.error, HeldForServer) and o.error.model is model for o in held)
        assert all(o.error is not None and o.error.reason == "server_unavailable" for o in held)
        assert not health.wait_for(True, timeout=1.0)
        server.restart(timeout=300.0)
        assert model.wait_available(300)  # what the inference loop waits on before running them again
        again = runner.run_batch([o.frame for o in held]).outcomes
        assert [o.error for o in again] == [None] * 3
        assert health.wait_for(True)
    finally:
        registry.close()
    labels = {"server": server.url, "kind": "connection"}
    assert (metrics.get_sample_value("segstream_remote_errors_total", labels) or 0) >= 1
