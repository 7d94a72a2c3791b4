"""Frames in over MQTT, predictions out over MQTT: ids, timestamps, RLE masks, runtime parameters
(per message and on the control topic) and one error report per bad payload, against a real mosquitto."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests.integration.helpers import MODEL_ID, frame_json, jpeg_bytes, pipeline_config, running
from tests.sinks.helpers import Collector, Received
from tests.support.mosquitto import MosquittoBroker
from tests.support.waiting import wait_until
from worker.mqtt import BrokerConfig, make_client
from worker.runtime import Worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def _mqtt_pipeline(
    name: str, mosquitto: MosquittoBroker, models_dir: Path, frames_topic: str, **source: Any
) -> Worker:
    config = pipeline_config(
        name,
        sources=[{"type": "mqtt", "id": "cam1", "topic": frames_topic, **source}],
        sinks=[{"type": "mqtt", "topic": "plant/{pipeline}/{source}/{step}/predictions"}],
        broker=mosquitto,
        models_dir=models_dir,
    )
    return await Worker.create(config)


def _by_frame_id(messages: list[Received]) -> dict[str, dict[str, Any]]:
    return {m.json()["frame_id"]: m.json() for m in messages}


def _classes(result: dict[str, Any]) -> list[str]:
    return [p["class"] for p in result["outputs"]["predictions"]["predictions"]]


async def test_jpeg_and_json_frames_give_predictions_with_ids_timestamps_and_rle_masks(
    mosquitto: MosquittoBroker, broker_config: BrokerConfig, models_dir: Path, unique_topic: str
) -> None:
    frames_topic = f"{unique_topic}/frames"
    worker = await _mqtt_pipeline("line1", mosquitto, models_dir, frames_topic)
    out_topic = "plant/line1/cam1/seg/predictions"
    async with (
        Collector(broker_config, "plant/#", identifier="results", persistent=False) as results,
        running(worker),
        make_client(broker_config, identifier="camera") as camera,
    ):
        sent_at = time.time()
        await camera.publish(frames_topic, jpeg_bytes(1), qos=1)
        await wait_until(lambda: len(results.on(out_topic)) == 1, "the raw JPEG's prediction")
        await camera.publish(
            frames_topic, frame_json(jpeg_bytes(2), frame_id="press-7/000042", timestamp=1.7e9), qos=1
        )
        await wait_until(lambda: len(results.on(out_topic)) == 2, "the JSON frame's prediction")
    assert {m.topic for m in results.messages if "predictions" in m.topic} == {out_topic}
    raw, tagged = (m.json() for m in results.on(out_topic))

    assert raw["source"] == "cam1" and raw["pipeline"] == "line1" and raw["step"] == "seg"
    assert (raw["frame_number"], raw["frame_id"]) == (0, "cam1:0")
    assert sent_at - 1 <= raw["timestamp"] <= raw["processed_at"] <= time.time()
    assert (tagged["frame_number"], tagged["frame_id"], tagged["timestamp"]) == (1, "press-7/000042", 1.7e9)
    assert raw["inference_id"] and tagged["inference_id"] and raw["inference_id"] != tagged["inference_id"]

    for result in (raw, tagged):
        assert result["model_id"] == MODEL_ID and result["outputs"]["model_id"] == MODEL_ID
        predictions = result["outputs"]["predictions"]
        assert predictions["image"] == {"width": 128, "height": 96}
        assert _classes(result) == ["bolt", "nut"]  # default confidence 0.4 removes the washer (0.3)
        for p in predictions["predictions"]:
            assert p["parent_id"] == result["frame_id"]
            rle = p["rle_mask"]
            assert rle["size"] == [96, 128]
            mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
            ys, xs = np.nonzero(mask)
            assert mask.sum() > 0
            # the mask fills the predicted box (the model's masks are the whole box)
            x0, y0 = p["x"] - p["width"] / 2, p["y"] - p["height"] / 2
            assert x0 - 1 <= xs.min() and xs.max() <= x0 + p["width"] + 1
            assert y0 - 1 <= ys.min() and ys.max() <= y0 + p["height"] + 1
            assert mask.sum() >= 0.8 * p["width"] * p["height"]
        bolt = predictions["predictions"][0]
        # 96x128 frame in a 64x64 input: scale 0.5, 8 px of padding on top; the bolt is 16x16 at (16, 16)
        assert (bolt["x"], bolt["y"], bolt["width"], bolt["height"]) == (32.0, 16.0, 32.0, 32.0)


async def test_parameters_per_message_and_on_the_control_topic(
    mosquitto: MosquittoBroker, broker_config: BrokerConfig, models_dir: Path, unique_topic: str
) -> None:
    frames_topic = f"{unique_topic}/frames"
    worker = await _mqtt_pipeline("line2", mosquitto, models_dir, frames_topic)
    out_topic = "plant/line2/cam1/seg/predictions"
    control_topic = "segstream/line2/control"
    sent = 0
    async with (
        Collector(broker_config, "#", identifier="everything", persistent=False) as seen,
        running(worker),
        make_client(broker_config, identifier="camera") as camera,
    ):

        async def frame(**parameters: Any) -> list[str]:
            nonlocal sent
            frame_id = f"f{sent}"
            sent += 1
            await camera.publish(frames_topic, frame_json(jpeg_bytes(sent), frame_id, **parameters), qos=1)
            await wait_until(
                lambda: frame_id in _by_frame_id(seen.on(out_topic)), f"prediction of {frame_id}"
            )
            return _classes(_by_frame_id(seen.on(out_topic))[frame_id])

        async def control(payload: bytes) -> dict[str, Any]:
            count = len(seen.on(f"{control_topic}/result"))
            await camera.publish(control_topic, payload, qos=1)
            await wait_until(lambda: len(seen.on(f"{control_topic}/result")) > count, "the control reply")
            return seen.on(f"{control_topic}/result")[-1].json()

        assert await frame() == ["bolt", "nut"]
        assert await frame(confidence=0.7) == ["bolt"]  # this message only
        assert await frame(confidence=0.2) == ["bolt", "nut", "washer"]
        assert await frame() == ["bolt", "nut"]

        reply = await control(b'{"inputs": {"confidence": 0.7}}')
        assert reply["ok"] is True and reply["applied"] == {"confidence": 0.7}
        assert reply["inputs"]["confidence"] == 0.7 and reply["worker"] == worker.worker_id
        assert await frame() == ["bolt"]
        assert await frame() == ["bolt"]
        assert await frame(confidence=0.2) == ["bolt", "nut", "washer"]  # a frame's own value wins

        errors_before = len(seen.on("segstream/line2/errors"))
        for bad in (b'{"inputs": {"confidence": 1.7}}', b'{"inputs": {"no_such_input": 1}}', b"not json"):
            reply = await control(bad)
            assert reply["ok"] is False and reply["error"] and "applied" not in reply
        await wait_until(
            lambda: len(seen.on("segstream/line2/errors")) == errors_before + 3, "three bad_control errors"
        )
        reports = [m.json() for m in seen.on("segstream/line2/errors")[errors_before:]]
        assert [r["reason"] for r in reports] == ["bad_control"] * 3
        assert "confidence" in reports[0]["error"] and "no_such_input" in reports[1]["error"]
        assert worker.runner.runtime_inputs == {"confidence": 0.7}
        assert await frame() == ["bolt"]  # nothing changed
    assert [m.json()["ok"] for m in seen.on(f"{control_topic}/result")] == [True, False, False, False]


async def test_each_bad_payload_gives_one_error_and_the_next_frame_goes_on(
    mosquitto: MosquittoBroker, broker_config: BrokerConfig, models_dir: Path, unique_topic: str
) -> None:
    frames_topic = f"{unique_topic}/frames"
    worker = await _mqtt_pipeline("line3", mosquitto, models_dir, frames_topic, max_payload_bytes=64 * 1024)
    out_topic = "plant/line3/cam1/seg/predictions"
    error_topic = "segstream/line3/errors"
    good = jpeg_bytes(5)
    rng = random.Random(7)
    bad_payloads = [
        (good[: len(good) // 2], "decode_error"),  # a JPEG cut in half
        (bytes([0x42]) + rng.randbytes(3000), "decode_error"),  # random bytes
        (good[:2] + rng.randbytes(100 * 1024), "oversize"),  # over max_payload_bytes
        (frame_json(good, "conf-1.7", confidence=1.7), "bad_parameter"),
    ]
    async with (
        Collector(broker_config, "#", identifier="everything", persistent=False) as seen,
        running(worker),
        make_client(broker_config, identifier="camera") as camera,
    ):
        for n, (payload, reason) in enumerate(bad_payloads):
            await camera.publish(frames_topic, payload, qos=1)
            await camera.publish(frames_topic, frame_json(good, f"good-{n}"), qos=1)
            await wait_until(
                lambda n=n: f"good-{n}" in _by_frame_id(seen.on(out_topic)), f"the frame after {reason}"
            )
            await wait_until(lambda n=n: len(seen.on(error_topic)) >= n + 1, f"the {reason} report")
        # one more good frame through the whole path: nothing else was reported meanwhile
        await camera.publish(frames_topic, frame_json(good, "last"), qos=1)
        await wait_until(lambda: "last" in _by_frame_id(seen.on(out_topic)), "the last frame")
    reports = [m.json() for m in seen.on(error_topic)]
    assert [r["reason"] for r in reports] == [reason for _, reason in bad_payloads]
    assert [r["frame_number"] for r in reports] == [0, 2, 4, 6]
    assert all(r["source"] == "cam1" and r["pipeline"] == "line3" and r["error"] for r in reports)
    assert [r["frame_id"] for r in reports] == ["cam1:0", "cam1:2", "cam1:4", "conf-1.7"]
    assert "custom_confidence" in reports[3]["error"]
    results = _by_frame_id(seen.on(out_topic))
    assert sorted(results) == ["good-0", "good-1", "good-2", "good-3", "last"]
    assert [results[f"good-{n}"]["frame_number"] for n in range(4)] == [1, 3, 5, 7]
    assert all(_classes(r) == ["bolt", "nut"] for r in results.values())
    assert json.loads(seen.on(error_topic)[0].payload)["timestamp"] > 0
