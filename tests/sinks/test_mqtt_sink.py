"""MqttSink against a real mosquitto: topics, QoS, status and Will, outages, overflow, shutdown."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.sinks.helpers import Collector, PersistentMosquitto
from tests.support.mosquitto import MosquittoBroker
from tests.support.waiting import wait_until
from worker.errors import SinkError
from worker.messages import ErrorReport, FrameResult
from worker.mqtt import BrokerConfig
from worker.sinks import MqttSink, MqttSinkConfig
from worker.telemetry import RecordingTelemetry

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def result(
    source: str, n: int, *, step: str = "seg", outputs: dict[str, object] | None = None
) -> FrameResult:
    return FrameResult(
        pipeline="line-3",
        source_id=source,
        frame_number=n,
        frame_id=f"{source}:{n}",
        timestamp=1_700_000_000.0 + n,
        step=step,
        inference_id=f"inf-{source}-{n}",
        model_id="factory-parts/1",
        outputs=outputs if outputs is not None else {"predictions": {"image": {}, "predictions": []}},
    )


def sink_config(prefix: str, **overrides: object) -> MqttSinkConfig:
    return MqttSinkConfig.model_validate(
        {
            "topic": prefix + "/{pipeline}/{source}/{step}",
            "error_topic": prefix + "/{pipeline}/errors",
            "status_topic": prefix + "/{pipeline}/status",
            **overrides,
        }
    )


async def test_results_errors_and_status_reach_their_topics(
    mosquitto: MosquittoBroker, unique_topic: str
) -> None:
    broker = mosquitto.config()
    telemetry = RecordingTelemetry()
    sink = MqttSink(sink_config(unique_topic), pipeline="line-3", broker=broker, telemetry=telemetry)
    async with Collector(broker, f"{unique_topic}/#", persistent=False) as seen:
        await sink.start()
        assert await sink.wait_connected(20)
        for n in range(3):
            await sink.publish_result(result("cam1", n))
        await sink.publish_result(result("cam2", 0, step="seg2"))
        await sink.publish_error(
            ErrorReport("line-3", "cam1", "decode_error", "bad JPEG", frame_id="cam1:3", frame_number=3)
        )
        await wait_until(lambda: len(seen.messages) >= 6, what="6 messages")  # 4 results, 1 error, online

        by_topic = Counter(m.topic for m in seen.messages)
        assert by_topic == {
            f"{unique_topic}/line-3/cam1/seg": 3,
            f"{unique_topic}/line-3/cam2/seg2": 1,
            f"{unique_topic}/line-3/errors": 1,
            f"{unique_topic}/line-3/status": 1,
        }
        cam1 = [m for m in seen.messages if m.topic.endswith("/cam1/seg")]
        assert all(m.qos == 1 for m in cam1)
        assert [m.json()["frame_number"] for m in cam1] == [0, 1, 2]  # in order
        first = cam1[0].json()
        assert first["source"] == "cam1" and first["frame_id"] == "cam1:0"
        assert first["inference_id"] == "inf-cam1-0" and first["model_id"] == "factory-parts/1"
        assert first["timestamp"] == 1_700_000_000.0 and "predictions" in first["outputs"]
        error = seen.on(f"{unique_topic}/line-3/errors")[0].json()
        assert (error["source"], error["frame_id"], error["reason"]) == ("cam1", "cam1:3", "decode_error")

        assert await sink.close(10) == 0
        assert telemetry.published_count == {"result": 4, "error": 1}
        assert telemetry.outbox == 0 and telemetry.broker_up is False

    # a newcomer gets the retained status: offline after a clean close
    async with Collector(
        broker, f"{unique_topic}/line-3/status", identifier="late", persistent=False
    ) as late:
        await wait_until(lambda: late.messages, what="retained status")
        status = late.messages[0]
        assert status.retain
        assert status.json()["status"] == "offline" and status.json()["reason"] == "shutdown"
        assert status.json()["worker"] == sink.worker_id
    with pytest.raises(SinkError, match="closed"):
        await sink.publish_result(result("cam1", 9))


async def test_online_status_is_retained(mosquitto: MosquittoBroker, unique_topic: str) -> None:
    broker = mosquitto.config()
    async with MqttSink(sink_config(unique_topic), pipeline="line-3", broker=broker) as sink:
        assert await sink.wait_connected(20)
        async with Collector(broker, sink.status_topic, persistent=False) as seen:
            await wait_until(lambda: seen.messages, what="retained online")
            assert seen.messages[0].retain
            assert seen.messages[0].json()["status"] == "online"


SINK_PROCESS = """
import asyncio, sys
from worker.mqtt import BrokerConfig
from worker.sinks import MqttSink, MqttSinkConfig

async def main():
    cfg = MqttSinkConfig(status_topic=sys.argv[3] + "/{pipeline}/status")
    sink = MqttSink(cfg, pipeline="line-3", broker=BrokerConfig(host=sys.argv[1], port=int(sys.argv[2])),
                    worker_id="doomed")
    await sink.start()
    await sink.wait_connected(30)
    print("connected", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_last_will_says_offline_when_the_worker_vanishes(
    mosquitto: MosquittoBroker, unique_topic: str
) -> None:
    """The Will is the broker's job: kill a worker process (no DISCONNECT) and watch the status topic."""
    broker = mosquitto.config()
    status_topic = f"{unique_topic}/line-3/status"
    async with Collector(broker, status_topic, persistent=False) as seen:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SINK_PROCESS,
            mosquitto.host,
            str(mosquitto.port),
            unique_topic,
            stdout=subprocess.DEVNULL,
            cwd=REPO_ROOT,
        )
        try:
            await wait_until(
                lambda: any(m.json()["status"] == "online" for m in seen.messages),
                "online from worker",
                timeout=30,
            )
            assert seen.messages[0].json()["worker"] == "doomed"
            proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker publishes the Will
            await wait_until(lambda: len(seen.messages) >= 2, "the Last Will", timeout=30)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        will = seen.messages[1]
        assert will.json() == {
            "status": "offline",
            "worker": "doomed",
            "pipeline": "line-3",
            "reason": "connection_lost",
        }
    async with Collector(broker, status_topic, identifier="late", persistent=False) as late:
        await wait_until(lambda: late.messages, what="retained Will")
        assert late.messages[0].retain and late.messages[0].json()["status"] == "offline"


async def test_results_published_while_the_broker_restarts_all_arrive(
    tmp_path: Path, unique_topic: str
) -> None:
    server = PersistentMosquitto(tmp_path)
    server.start()
    try:
        broker = server.config()
        telemetry = RecordingTelemetry()
        topic = f"{unique_topic}/line-3/cam1/seg"
        async with Collector(broker, topic) as seen:
            sink = MqttSink(sink_config(unique_topic), pipeline="line-3", broker=broker, telemetry=telemetry)
            await sink.start()
            assert await sink.wait_connected(20)
            for n in range(100):
                await sink.publish_result(result("cam1", n))
                await asyncio.sleep(0.002)  # a frame rate
            for n in range(100, 140):  # a burst, then kill the broker while some are unacknowledged
                await sink.publish_result(result("cam1", n))
            for _ in range(10_000):
                if sink.inflight:
                    break
                await asyncio.sleep(0)
            inflight_at_stop = sink.inflight
            server.stop()  # blocks the loop: no PUBACK can be processed before the broker is gone
            assert inflight_at_stop > 0
            for n in range(140, 240):
                await sink.publish_result(result("cam1", n))
                await asyncio.sleep(0.002)
            await wait_until(lambda: not sink.connected, what="sink sees the outage")
            assert telemetry.broker_up is False
            assert len(sink.outbox) >= 100 + inflight_at_stop
            server.start()
            for n in range(240, 300):
                await sink.publish_result(result("cam1", n))
                await asyncio.sleep(0.002)
            await wait_until(
                lambda: len({m.json()["frame_number"] for m in seen.messages}) == 300,
                "300 frames",
                timeout=60,
            )
            numbers = [m.json()["frame_number"] for m in seen.messages]
            duplicates = len(numbers) - len(set(numbers))
            print(f"broker restart: {inflight_at_stop} in flight at the stop, {duplicates} duplicates")
            assert set(numbers) == set(range(300))
            assert telemetry.reconnects["broker:sink"] >= 1
            await wait_until(lambda: len(sink.outbox) == 0, what="empty outbox")
            assert await sink.close(10) == 0
            assert not any(reason == "outbox_overflow" for _, reason in telemetry.lost)
    finally:
        server.stop()


async def test_outbox_overflow_drops_the_oldest_and_counts(tmp_path: Path, unique_topic: str) -> None:
    server = PersistentMosquitto(tmp_path)
    server.start()
    try:
        broker = server.config()
        telemetry = RecordingTelemetry()
        topic = f"{unique_topic}/line-3/+/seg"
        async with Collector(broker, topic) as seen:
            server.stop()  # the sink starts while the broker is down: results wait in the outbox
            sink = MqttSink(
                sink_config(unique_topic, outbox_size=5),
                pipeline="line-3",
                broker=broker,
                telemetry=telemetry,
            )
            await sink.start()
            for n in range(10):
                await sink.publish_result(result("cam1", n))
            for n in range(2):
                await sink.publish_result(result("cam2", n))
            assert len(sink.outbox) == 5 and telemetry.outbox == 5
            assert telemetry.lost == {("cam1", "outbox_overflow"): 7}
            server.start()
            await wait_until(lambda: len(seen.messages) >= 5, "the 5 newest results", timeout=30)
            assert await sink.close(10) == 0
            got = sorted((m.json()["source"], m.json()["frame_number"]) for m in seen.messages)
            assert got == [("cam1", 7), ("cam1", 8), ("cam1", 9), ("cam2", 0), ("cam2", 1)]
    finally:
        server.stop()


async def test_close_with_the_broker_down_returns_within_the_timeout(
    mosquitto: MosquittoBroker, unique_topic: str
) -> None:
    telemetry = RecordingTelemetry()
    sink = MqttSink(
        sink_config(unique_topic), pipeline="line-3", broker=mosquitto.config(), telemetry=telemetry
    )
    await sink.start()
    assert await sink.wait_connected(20)
    mosquitto.stop()
    for n in range(3):
        await sink.publish_result(result("cam1", n))
    started = time.monotonic()
    undelivered = await sink.close(timeout=1.0)
    elapsed = time.monotonic() - started
    assert undelivered == 3
    assert elapsed < 1.0 + 1.5  # the timeout, plus slack for a loaded machine
    assert telemetry.lost[("cam1", "shutdown_undelivered")] == 3
    assert telemetry.outbox == 0 and telemetry.broker_up is False


async def test_payload_over_the_limit_is_refused_and_counted(
    mosquitto: MosquittoBroker, unique_topic: str
) -> None:
    telemetry = RecordingTelemetry()
    config = sink_config(unique_topic, max_payload_bytes=2048)
    async with MqttSink(config, pipeline="line-3", broker=mosquitto.config(), telemetry=telemetry) as sink:
        with pytest.raises(SinkError, match="max_payload_bytes"):
            await sink.publish_result(result("cam1", 0, outputs={"blob": "x" * 4096}))
        assert len(sink.outbox) == 0
        assert telemetry.lost[("cam1", "payload_too_large")] == 1


async def test_username_and_password_from_the_environment(
    tmp_path: Path, unique_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = MosquittoBroker(tmp_path, username="line", password="s3cret")
    server.start()
    try:
        broker = BrokerConfig(
            host=server.host, port=server.port, username="line", password_env="SINK_TEST_PW"
        )
        monkeypatch.setenv("SINK_TEST_PW", "wrong")
        async with MqttSink(sink_config(unique_topic), pipeline="p", broker=broker) as refused:
            assert not await refused.wait_connected(1.0)
        monkeypatch.setenv("SINK_TEST_PW", "s3cret")
        async with MqttSink(sink_config(unique_topic), pipeline="p", broker=broker) as sink:
            assert await sink.wait_connected(20)
    finally:
        server.stop()


async def test_unreadable_password_file_fails_at_start(tmp_path: Path) -> None:
    broker = BrokerConfig(password_file=tmp_path / "missing")
    sink = MqttSink(MqttSinkConfig(), pipeline="p", broker=broker)
    with pytest.raises(SinkError, match="bad broker settings"):
        await sink.start()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("topic", "a/{pipeline}/{camera}", "unknown placeholder"),
        ("topic", "a/+/{source}", "wildcard"),
        ("error_topic", "a/{step}/errors", "unknown placeholder"),
        ("status_topic", "a/#", "wildcard"),
        ("topic", "a/{source!r}", "conversions"),
        ("qos", 3, "qos"),
        ("outbox_size", 0, "outbox_size"),
        ("retian", True, "retian"),
    ],
)
def test_bad_config_names_the_field(field: str, value: object, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        MqttSinkConfig.model_validate({field: value})


async def test_a_source_id_with_a_wildcard_cannot_make_a_topic(mosquitto: MosquittoBroker) -> None:
    async with MqttSink(MqttSinkConfig(), pipeline="p", broker=mosquitto.config()) as sink:
        with pytest.raises(SinkError, match="wildcard"):
            await sink.publish_result(result("cam+1", 0))


def test_status_topic_and_client_id_follow_the_worker_id() -> None:
    sink = MqttSink(MqttSinkConfig(), pipeline="p", broker=BrokerConfig(), worker_id="w1")
    assert sink.status_topic == "segstream/p/status/w1"  # one retained status per worker
    assert sink.client_id == "w1-sink-mqtt"
