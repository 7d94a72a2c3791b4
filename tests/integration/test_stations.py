"""Station identity on one MQTT subscription: the station from the topic in results, errors and metrics;
an allow-list; the control topic addressing one station."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.helpers import frame_json, jpeg_bytes, pipeline_config, running
from tests.sinks.helpers import Collector
from tests.support.mosquitto import MosquittoBroker
from tests.support.waiting import wait_until
from worker.mqtt import BrokerConfig, make_client
from worker.runtime import Worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def make_worker(mosquitto: MosquittoBroker, models_dir: Path, base: str, **source: object) -> Worker:
    config = pipeline_config(
        "stations",
        sources=[
            {
                "type": "mqtt",
                "id": "line",
                "topic": f"{base}/frames/+",
                "source_id": "{topic[2]}",
                "qos": 1,
                "policy": "every_frame",
                **source,
            }
        ],
        sinks=[{"type": "mqtt"}],
        broker=mosquitto,
        models_dir=models_dir,
    )
    return await Worker.create(config)


async def test_the_station_comes_from_the_topic_and_the_allow_list_bounds_it(
    mosquitto: MosquittoBroker, broker_config: BrokerConfig, models_dir: Path, unique_topic: str
) -> None:
    base = unique_topic.replace("/", "-")
    worker = await make_worker(mosquitto, models_dir, base, stations=["st1", "st2"])
    async with (
        Collector(broker_config, "segstream/stations/#", identifier="out") as out,
        running(worker),
        make_client(broker_config, identifier="camera") as camera,
    ):
        for n, station in enumerate(["st1", "st2", "intruder", "st2"]):
            await camera.publish(f"{base}/frames/{station}", frame_json(jpeg_bytes(n), f"f{n}"), qos=1)
        await wait_until(
            lambda: len([m for m in out.messages if m.topic.split("/")[2] != "status"]) >= 4, "4 answers"
        )
    results = [m for m in out.messages if m.topic.endswith("/predictions")]
    assert sorted((m.topic, m.json()["source"], m.json()["topic"]) for m in results) == [
        ("segstream/stations/st1/predictions", "st1", f"{base}/frames/st1"),
        ("segstream/stations/st2/predictions", "st2", f"{base}/frames/st2"),
        ("segstream/stations/st2/predictions", "st2", f"{base}/frames/st2"),
    ]
    assert {m.json()["idempotency_key"] for m in results} == {"st1/f0", "st2/f1", "st2/f3"}
    (error,) = [m.json() for m in out.messages if m.topic.endswith("/errors")]
    assert error["reason"] == "unknown_station" and error["topic"] == f"{base}/frames/intruder"
    assert error["source"] == "line"
    totals = worker.metrics.snapshot()
    assert totals["st1"].processed == 1 and totals["st2"].processed == 2  # per-station series
    assert totals["line"].dropped == 1  # the refused station counts under the source's own id


async def test_the_control_topic_can_address_one_station(
    mosquitto: MosquittoBroker, broker_config: BrokerConfig, models_dir: Path, unique_topic: str
) -> None:
    base = unique_topic.replace("/", "-")
    worker = await make_worker(mosquitto, models_dir, base)
    async with (
        Collector(broker_config, "segstream/stations/#", identifier="out") as out,
        running(worker),
        make_client(broker_config, identifier="camera") as camera,
    ):
        # the test model scores 0.9, 0.6 and 0.3: two detections at the default confidence 0.4
        control = {"station": "st2", "inputs": {"confidence": 0.95}}
        await camera.publish("segstream/stations/control", json.dumps(control), qos=1)
        await wait_until(lambda: out.on("segstream/stations/control/result"), "the control reply")
        reply = out.on("segstream/stations/control/result")[0].json()
        assert reply["ok"] is True and reply["station"] == "st2", reply
        for n, station in enumerate(["st1", "st2"]):
            await camera.publish(f"{base}/frames/{station}", frame_json(jpeg_bytes(n), f"f{n}"), qos=1)
        await wait_until(
            lambda: len([m for m in out.messages if m.topic.endswith("/predictions")]) >= 2, "results"
        )
        refused = {"station": "st2", "inputs": {"confidence": 7}}
        await camera.publish("segstream/stations/control", json.dumps(refused), qos=1)
        await wait_until(lambda: len(out.on("segstream/stations/control/result")) >= 2, "the refusal")
    counts = {
        m.json()["source"]: len(m.json()["outputs"]["predictions"]["predictions"])
        for m in out.messages
        if m.topic.endswith("/predictions")
    }
    assert counts == {"st1": 2, "st2": 0}
    assert out.on("segstream/stations/control/result")[1].json()["ok"] is False
    assert worker.runner.runtime_inputs.get("confidence", 0.4) == 0.4  # the pipeline-wide value is untouched
