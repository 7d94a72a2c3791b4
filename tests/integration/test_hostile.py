"""Hostile input never stops the line (issue 12), end to end: the poison corpus through a real
mosquitto into a running worker, one message at a time, then valid frames queued behind them; the
same on the control topic (live and retained). The worker stays up, answers every bad message with
one error report (carrying the sender's frame id), and processes every valid frame."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import frame_json, jpeg_bytes, pipeline_config, running
from tests.sinks.helpers import Collector
from tests.support.mosquitto import MosquittoBroker
from tests.support.poison import CONTROL_POISON, FRAME_POISON, Poison, payload_variants
from tests.support.waiting import wait_until
from worker.mqtt import BrokerConfig, make_client
from worker.runtime import Worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: per-frame parameters that only the workflow can judge (the step, not the parser)
STEP_POISON = (
    Poison("unknown-parameter", frame_json(jpeg_bytes(1), "typo", confidnce=0.9), "bad_parameter", "typo"),
    Poison(
        "confidence-1e12", frame_json(jpeg_bytes(2), "c-1e12", confidence=10**12), "bad_parameter", "c-1e12"
    ),
    Poison(
        "confidence-string", frame_json(jpeg_bytes(3), "c-str", confidence="high"), "bad_parameter", "c-str"
    ),
)


async def hostile_worker(
    name: str, mosquitto: MosquittoBroker, models_dir: Path, frames_topic: str
) -> Worker:
    config = pipeline_config(
        name,
        sources=[
            {
                "type": "mqtt",
                "id": "cam1",
                "topic": frames_topic,
                "max_payload_bytes": 256 * 1024,
                "max_decoded_bytes": 16 * 1024 * 1024,  # the 48 MB PNG bomb is refused
                "max_inflight_bytes": 64 * 1024 * 1024,
            }
        ],
        sinks=[{"type": "mqtt", "topic": "plant/{pipeline}/{source}/predictions"}],
        broker=mosquitto,
        models_dir=models_dir,
    )
    return await Worker.create(config)


async def test_poison_frames_one_by_one_then_valid_frames_behind_them(
    mosquitto: MosquittoBroker, broker_config: BrokerConfig, models_dir: Path, unique_topic: str
) -> None:
    frames_topic = f"{unique_topic}/frames"
    worker = await hostile_worker("hostile1", mosquitto, models_dir, frames_topic)
    results_topic = "plant/hostile1/cam1/predictions"
    errors_topic = "segstream/hostile1/errors"
    poison = [*FRAME_POISON, *STEP_POISON]
    variants = payload_variants()
    async with (
        Collector(broker_config, "#", identifier="everything", persistent=False) as seen,
        running(worker) as task,
        make_client(broker_config, identifier="camera") as camera,
    ):
        for item in poison:  # one by one: each must be answered before the next is sent
            count = len(seen.on(errors_topic))
            await camera.publish(frames_topic, item.payload, qos=1)
            await wait_until(
                lambda count=count: len(seen.on(errors_topic)) > count, f"the report of {item.name}"
            )
            assert not task.done(), f"the worker stopped after {item.name}"
        # valid frames queued behind the poison: every one answered
        for n in range(5):
            await camera.publish(frames_topic, frame_json(jpeg_bytes(n), f"good-{n}"), qos=1)
        for payload, _ in variants.values():
            await camera.publish(frames_topic, payload, qos=1)
        expected = 5 + len(variants)
        await wait_until(lambda: len(seen.on(results_topic)) == expected, "every valid frame's result")
        assert worker.health.readiness().ok and not task.done()

    reports = [m.json() for m in seen.on(errors_topic)]
    assert len(reports) == len(poison)  # exactly one report per bad message
    for n, (item, report) in enumerate(zip(poison, reports, strict=True)):
        assert report["frame_number"] == n, item.name
        assert report["reason"] == item.reason, (item.name, report)
        assert report["frame_id"] == (item.frame_id or f"cam1:{n}"), (item.name, report)
        assert report["source"] == "cam1" and report["error"]
    results = [m.json() for m in seen.on(results_topic)]
    ids = [r["frame_id"] for r in results]
    assert ids[:5] == [f"good-{n}" for n in range(5)]
    assert {fid for _, fid in variants.values() if fid} <= set(ids) and len(set(ids)) == len(ids)
    assert all(r["outputs"]["predictions"]["predictions"] for r in results)
    # nothing was lost or left unacknowledged: no redelivery after the worker stopped
    snapshot = worker.metrics.snapshot()["cam1"]
    assert snapshot.received == len(poison) + expected
    assert snapshot.processed == expected and snapshot.dropped == len(poison)


async def test_poison_control_messages_live_and_retained_leave_the_listener_answering(
    mosquitto: MosquittoBroker, broker_config: BrokerConfig, models_dir: Path, unique_topic: str
) -> None:
    control_topic = "segstream/hostile2/control"
    replies_topic = f"{control_topic}/result"
    # a retained poison left on the broker: the worker meets it at every start
    async with make_client(broker_config, identifier="old-tool") as tool:
        await tool.publish(control_topic, CONTROL_POISON[0].payload, qos=1, retain=True)
    worker = await hostile_worker("hostile2", mosquitto, models_dir, f"{unique_topic}/frames")
    async with (
        Collector(broker_config, "#", identifier="everything", persistent=False) as seen,
        running(worker) as task,
        make_client(broker_config, identifier="operator") as operator,
    ):

        async def reply_to(payload: bytes, *, retain: bool = False) -> dict[str, Any]:
            count = len(seen.on(replies_topic))
            await operator.publish(control_topic, payload, qos=1, retain=retain)
            await wait_until(lambda: len(seen.on(replies_topic)) > count, "a control reply")
            return seen.on(replies_topic)[-1].json()

        await wait_until(lambda: len(seen.on(replies_topic)) == 1, "the refusal of the retained poison")
        assert "retained" in seen.on(replies_topic)[0].json()["error"]
        await operator.publish(control_topic, b"", qos=1, retain=True)  # cleared: no reply
        for item in CONTROL_POISON:
            reply = await reply_to(item.payload)
            assert reply["ok"] is False and item.reason in reply["error"], (item.name, reply)
            assert not task.done()
        for item in CONTROL_POISON[:3]:  # retained copies are refused as retained
            reply = await reply_to(item.payload, retain=True)
            assert reply["ok"] is False and "retained" in reply["error"]
        await operator.publish(control_topic, b"", qos=1, retain=True)
        ok = await reply_to(b'{"inputs": {"confidence": 0.7}}')
        assert ok["ok"] is True and ok["applied"] == {"confidence": 0.7}
        assert worker.runner is not None and worker.runner.runtime_inputs == {"confidence": 0.7}
        await wait_until(
            lambda: len(seen.on("segstream/hostile2/errors")) == 1 + len(CONTROL_POISON) + 3,
            "one bad_control report per refusal",
        )
    replies = [json.loads(m.payload) for m in seen.on(replies_topic)]
    assert [r["ok"] for r in replies] == [False] * (1 + len(CONTROL_POISON) + 3) + [True]
    assert {m.json()["reason"] for m in seen.on("segstream/hostile2/errors")} == {"bad_control"}
