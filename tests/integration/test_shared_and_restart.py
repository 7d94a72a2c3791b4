"""Two workers sharing one frames topic, and a broker restart in the middle of a stream."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.integration.helpers import frame_json, jpeg_bytes, pipeline_config, running, write_video
from tests.sinks.helpers import Collector, PersistentMosquitto
from tests.support.mosquitto import MosquittoBroker
from tests.support.waiting import wait_until
from worker.mqtt import BrokerConfig, make_client
from worker.runtime import Worker
from worker.sinks.mqtt import MqttSink

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _frame_ids(collector: Collector, topic_part: str = "/predictions") -> Counter[str]:
    return Counter(m.json()["frame_id"] for m in collector.messages if m.topic.endswith(topic_part))


async def test_two_workers_in_one_shared_group_split_the_frames_exactly_once(
    mosquitto: MosquittoBroker, broker_config: BrokerConfig, models_dir: Path, unique_topic: str
) -> None:
    frames_topic = f"{unique_topic}/frames"
    workers = []
    for replica in ("a", "b"):
        config = pipeline_config(
            "shared",
            sources=[{"type": "mqtt", "id": "line", "topic": frames_topic, "shared_group": "segmenters"}],
            sinks=[{"type": "mqtt", "status_topic": "segstream/{pipeline}/status/{worker}"}],
            broker=mosquitto,
            models_dir=models_dir,
        )
        # replicas differ by client id prefix (in a cluster: the pod's host name does it)
        broker = config.broker.model_copy(update={"client_id": f"replica-{replica}"})  # type: ignore[union-attr]
        workers.append(await Worker.create(config.model_copy(update={"broker": broker})))
    count = 60
    async with (
        Collector(broker_config, "segstream/shared/+/predictions", identifier="results") as results,
        running(workers[0]),
        running(workers[1]),
        make_client(broker_config, identifier="camera") as camera,
    ):
        for n in range(count):
            await camera.publish(frames_topic, frame_json(jpeg_bytes(n), f"f{n:03d}"), qos=1)
        await wait_until(lambda: len(results.messages) >= count, f"{count} predictions")
        # both workers are done: nothing more is on its way
        await wait_until(lambda: sum(sum(w.summary.frames.values()) for w in workers) >= count, "summaries")
    ids = _frame_ids(results)
    assert sorted(ids) == [f"f{n:03d}" for n in range(count)]
    assert set(ids.values()) == {1}, f"duplicated: {[i for i, c in ids.items() if c > 1]}"
    per_worker = [sum(w.summary.frames.values()) for w in workers]
    assert sum(per_worker) == count and min(per_worker) > 0, per_worker


async def test_broker_restart_mid_stream_loses_no_prediction(
    tmp_path: Path, models_dir: Path, unique_topic: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broker").mkdir()
    broker = PersistentMosquitto(tmp_path / "broker")
    broker.start()
    broker_config = broker.config()
    frames_topic = f"{unique_topic}/frames"
    # a file read at its frame rate keeps producing results while the broker is down
    video = write_video(tmp_path / "clip.avi", frames=50, fps=25.0)
    config = pipeline_config(
        "restart",
        sources=[
            {"type": "mqtt", "id": "cam", "topic": frames_topic, "qos": 1, "policy": "every_frame"},
            {"type": "video", "id": "file", "url": str(video), "realtime": True},
        ],
        sinks=[{"type": "mqtt"}],
        broker=broker,
        models_dir=models_dir,
    )
    worker = await Worker.create(config)
    outbox_while_down: list[int] = []
    try:
        async with (
            Collector(broker_config, "segstream/restart/+/predictions", identifier="results") as results,
            running(worker),
        ):
            sink = next(s for s in worker.sinks if isinstance(s, MqttSink))
            async with make_client(broker_config, identifier="camera") as camera:
                for n in range(20):
                    await camera.publish(frames_topic, frame_json(jpeg_bytes(n), f"a{n}"), qos=1)
            await wait_until(lambda: _frame_ids(results)["a0"] > 0, "the first MQTT frame's prediction")
            await wait_until(lambda: len(_frame_ids(results)) >= 25, "some file frames' predictions")

            broker.stop()
            await wait_until(lambda: not sink.connected, "the sink to notice the outage")
            processed_at_stop = worker.metrics.snapshot()["file"].processed
            await wait_until(
                lambda: worker.metrics.snapshot()["file"].processed >= processed_at_stop + 5,
                "file frames processed while the broker is down",
            )
            outbox_while_down.append(len(sink.outbox))
            assert not worker.health.readiness().ok  # not ready without the broker ...
            assert worker.health.liveness().ok  # ... but alive

            broker.start()
            await wait_until(lambda: worker.health.readiness().ok, "ready again after the restart")
            await wait_until(lambda: worker.metrics.snapshot()["cam"].connected, "the MQTT source back")
            async with make_client(broker_config, identifier="camera") as camera:
                for n in range(10):
                    await camera.publish(frames_topic, frame_json(jpeg_bytes(n), f"b{n}"), qos=1)
            expected = {f"a{n}" for n in range(20)} | {f"b{n}" for n in range(10)}
            expected |= {f"file:{n}" for n in range(50)}
            await wait_until(lambda: expected <= set(_frame_ids(results)), "every prediction", timeout=60)
    finally:
        broker.stop()
    ids = _frame_ids(results)
    assert set(ids) == expected
    assert outbox_while_down[0] > 0  # results made during the outage waited in the outbox
    # QoS 1 is at-least-once: a result whose PUBACK died with the broker is sent again (same inference
    # id); a frame whose PUBACK died is delivered again and processed again (a new inference id)
    inference_ids: dict[str, set[str]] = {}
    for m in results.messages:
        inference_ids.setdefault(m.json()["frame_id"], set()).add(m.json()["inference_id"])
    resent = {f: c for f, c in ids.items() if c > 1 and len(inference_ids[f]) == 1}
    reprocessed = {f: c for f, c in ids.items() if len(inference_ids[f]) > 1}
    with capsys.disabled():
        print(
            f"\nbroker restart: {len(ids)} frames, duplicates: results re-sent {resent or 'none'}, "
            f"frames processed again {reprocessed or 'none'}"
        )
