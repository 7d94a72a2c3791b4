"""At-least-once end to end: an MQTT frame is acknowledged to the broker only once its result was."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.helpers import frame_json, jpeg_bytes, pipeline_config, running
from tests.sinks.helpers import Collector
from tests.support.mosquitto import MosquittoBroker, free_port
from tests.support.waiting import wait_until
from worker.mqtt import BrokerConfig, make_client
from worker.runtime import Worker
from worker.sinks.mqtt import MqttSink, MqttSinkConfig
from worker.supervisor import EXIT_UNDELIVERED

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_frames_whose_results_were_not_delivered_come_back(
    mosquitto: MosquittoBroker,
    broker_config: BrokerConfig,
    models_dir: Path,
    unique_topic: str,
    tmp_path: Path,
) -> None:
    frames_topic = f"{unique_topic}/frames"
    source = {
        "type": "mqtt",
        "id": "cam",
        "topic": frames_topic,
        "qos": 1,
        "policy": "every_frame",
        "client_id": "ack-after-delivery",
        "session_expiry_s": 300,
    }
    # first run: results go to a broker that is not there, so none is acknowledged
    config = pipeline_config(
        "ack",
        sources=[source],
        sinks=[{"type": "jsonl", "path": str(tmp_path / "first.jsonl")}],  # accepts: no confirmation
        broker=mosquitto,
        models_dir=models_dir,
        shutdown_grace_s=3,
    )
    nowhere = BrokerConfig(host="127.0.0.1", port=free_port(), reconnect_min_s=0.05, reconnect_max_s=0.2)
    unreachable = MqttSink(MqttSinkConfig(name="away"), pipeline="ack", broker=nowhere)
    first = await Worker.create(config, extra_sinks=[unreachable])
    count = 6
    task = asyncio.create_task(first.run())
    try:
        await wait_until(
            lambda: (s := first.metrics.snapshot().get("cam")) is not None and s.connected, "subscribed"
        )
        async with make_client(broker_config, identifier="camera") as camera:
            for n in range(count):
                await camera.publish(frames_topic, frame_json(jpeg_bytes(n), f"f{n}"), qos=1)
        await wait_until(lambda: sum(first.summary.frames.values()) >= count, "all processed")
        assert first.sources[0].pending_acks == count  # processed, results undelivered: not acknowledged
    finally:
        first.request_stop()
        code = await asyncio.wait_for(task, 30)
    assert code == EXIT_UNDELIVERED  # the results could not be delivered, and it says so
    # second run, same client id and a sink that delivers: the broker sends every frame again
    second = await Worker.create(
        pipeline_config(
            "ack", sources=[source], sinks=[{"type": "mqtt"}], broker=mosquitto, models_dir=models_dir
        )
    )
    async with (
        Collector(broker_config, "segstream/ack/+/predictions", identifier="results") as results,
        running(second),
    ):
        await wait_until(lambda: len(results.messages) >= count, f"{count} results")
        await wait_until(lambda: second.sources[0].pending_acks == 0, "every frame acknowledged")
    assert sorted(m.json()["frame_id"] for m in results.messages) == [f"f{n}" for n in range(count)]
