"""``/metrics``, ``/healthz`` and ``/readyz`` of a real run: a video file and MQTT frames (some bad) through
the whole pipeline, the broker missing at start, going away and coming back, then a stop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.integration.helpers import (
    frame_json,
    http_get,
    jpeg_bytes,
    metric_value,
    parse_metrics,
    pipeline_config,
    write_video,
)
from tests.support.messages import validate_line
from tests.support.mosquitto import MosquittoBroker
from tests.support.waiting import wait_until
from worker.mqtt import BrokerConfig, make_client
from worker.runtime import Worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def _get(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, port, path)


async def _status(port: int, path: str) -> int:
    return (await _get(port, path))[0]


async def test_metrics_and_probes_through_a_run(
    mosquitto: MosquittoBroker,
    broker_config: BrokerConfig,
    models_dir: Path,
    tmp_path: Path,
    unique_topic: str,
) -> None:
    frames_topic = f"{unique_topic}/frames"
    video = write_video(tmp_path / "clip.avi", frames=30)
    config = pipeline_config(
        "metrics",
        sources=[
            {"type": "video", "id": "file", "url": str(video)},
            {"type": "mqtt", "id": "cam", "topic": frames_topic, "max_payload_bytes": 64 * 1024},
        ],
        sinks=[{"type": "mqtt"}, {"type": "jsonl", "path": str(tmp_path / "out.jsonl")}],
        broker=mosquitto,
        models_dir=models_dir,
    )
    worker = await Worker.create(config)
    assert not worker.health.readiness().ok  # starting: no source yet
    mosquitto.stop()  # the broker is not there when the worker starts
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.http_port is not None or task.done(), "the HTTP server")
        port = worker.http_port
        assert port is not None
        status, body = await _get(port, "/readyz")
        assert status == 503 and "broker not connected" in json.loads(body)["reasons"]
        assert await _status(port, "/healthz") == 200  # alive while it waits for the broker

        mosquitto.start()
        await wait_until(lambda: worker.health.readiness().ok, "ready once the broker is up")
        assert await _status(port, "/readyz") == 200
        await wait_until(lambda: worker.metrics.snapshot()["cam"].connected, "the MQTT source subscribed")

        good = jpeg_bytes(3)
        async with make_client(broker_config, identifier="camera") as camera:
            for payload in (
                good,
                good[: len(good) // 2],  # corrupt JPEG
                good,
                good[:2] + bytes(100 * 1024),  # oversize
                frame_json(good, "bad-parameter", confidence=1.7),
                good,
            ):
                await camera.publish(frames_topic, payload, qos=1)

        def settled() -> bool:
            snap = worker.metrics.snapshot()
            return snap["file"].processed == 30 and snap["cam"].processed + snap["cam"].dropped == 6

        await wait_until(settled, "every frame processed or dropped")
        samples = parse_metrics((await _get(port, "/metrics"))[1])
        for source, received, processed in (("file", 30, 30), ("cam", 6, 3)):
            assert metric_value(samples, "segstream_frames_received_total", source=source) == received
            assert metric_value(samples, "segstream_frames_processed_total", source=source) == processed
            dropped = metric_value(samples, "segstream_frames_dropped_total", source=source)
            assert received == processed + dropped, source
        for reason in ("decode_error", "oversize", "bad_parameter"):
            assert metric_value(samples, "segstream_frames_dropped_total", source="cam", reason=reason) == 1
        assert metric_value(samples, "segstream_frames_dropped_total", source="file") == 0
        assert metric_value(samples, "segstream_batch_size_count") >= 1
        assert metric_value(samples, "segstream_e2e_latency_seconds_count", source="file") == 30
        assert metric_value(samples, "segstream_broker_connected") == 1

        mosquitto.stop()  # the broker goes away: not ready, still alive
        await wait_until(lambda: not worker.health.readiness().ok, "not ready without the broker")
        status, body = await _get(port, "/readyz")
        assert status == 503 and "broker not connected" in json.loads(body)["reasons"]
        assert await _status(port, "/healthz") == 200
        mosquitto.start()
        await wait_until(lambda: worker.health.readiness().ok, "ready again")
        assert await _status(port, "/readyz") == 200
        samples = parse_metrics((await _get(port, "/metrics"))[1])
        assert metric_value(samples, "segstream_reconnects_total") >= 1

        worker.request_stop()  # what SIGTERM does: not ready at once, then drain and exit
        assert not worker.health.readiness().ok
        assert "shutting down" in worker.health.readiness().reasons
        assert await asyncio.wait_for(task, timeout=30) == 0
    finally:
        worker.request_stop()
        if not task.done():
            await asyncio.wait_for(task, timeout=30)
    with pytest.raises(OSError):
        await _get(port, "/healthz")  # the server is gone
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    results = [doc for doc in map(validate_line, lines) if "outputs" in doc]
    assert sorted(r["frame_number"] for r in results if r["source"] == "file") == list(range(30))
