"""The MQTT sink's reconnects follow the one retry policy, shutdown included (issue 12 item 5).

The "broker" is the test's own TCP listener on 127.0.0.1, which counts every connection: one that
closes each connection at once, and one that reads the CONNECT and answers CONNACK "bad user name or
password" (what a broker refusing the worker's login does). Before the fix, a sink closing with the
broker down retried with no delay at all (28,413 attempts in 10 s).
"""

from __future__ import annotations

import asyncio
from typing import Literal

import pytest

from tests.support.listener import counting_listener, most_attempts
from tests.support.waiting import wait_until
from tests.support.webhook import WebhookServer
from worker.messages import FrameResult
from worker.mqtt import BrokerConfig
from worker.sinks import HttpSink, HttpSinkConfig, MqttSink, MqttSinkConfig
from worker.telemetry import RecordingTelemetry


def _result(n: int) -> FrameResult:
    return FrameResult(
        pipeline="p",
        source_id="cam1",
        frame_number=n,
        frame_id=f"cam1:{n}",
        timestamp=1_700_000_000.0 + n,
        step="seg",
        inference_id=f"inf-{n}",
        model_id="factory-parts/1",
        outputs={"predictions": {"image": {}, "predictions": []}},
    )


@pytest.mark.parametrize("mode", ["close", "refuse"])
async def test_shutdown_with_the_broker_down_keeps_to_the_backoff(
    mode: Literal["close", "refuse"],
) -> None:
    telemetry = RecordingTelemetry()
    async with counting_listener(mode) as listener:
        # the smallest backoff a pipeline may set: the attempt-rate floor is what bounds the rate
        broker = BrokerConfig(
            host="127.0.0.1",
            port=listener.port,
            reconnect_min_s=0.01,
            reconnect_max_s=0.01,
            connect_timeout=1,
        )
        sink = MqttSink(MqttSinkConfig(), pipeline="p", broker=broker, telemetry=telemetry, worker_id="w")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await sink.start()
        await wait_until(lambda: len(listener.arrivals) >= 2, what="two connection attempts")
        for n in range(3):
            await sink.publish_result(_result(n))
        closing = loop.time()
        undelivered = await sink.close(timeout=2.0)
        closed = loop.time()
        assert not sink.connected and undelivered == 3
        during_close = listener.between(closing, closed)
        assert 1 <= during_close <= most_attempts(closed - closing), (during_close, closed - closing)
        total = len(listener.arrivals)
        assert total <= most_attempts(closed - started), (total, closed - started)
    assert telemetry.lost[("cam1", "shutdown_undelivered")] == 3


async def test_the_http_sink_retries_at_most_at_the_floor_rate() -> None:
    server = WebhookServer()
    await server.start()
    try:
        server.answer(503, count=10_000)  # unavailable, whatever happens
        sink = HttpSink(
            HttpSinkConfig(url=f"{server.url}/results", retry_min_s=0.001, retry_max_s=0.001, timeout_s=5),
            pipeline="p",
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        await sink.start()
        await sink.publish_result(_result(0))
        await wait_until(lambda: len(server.requests) >= 3, what="three retries")
        assert await sink.close(timeout=1.0) == 1
        elapsed = loop.time() - started
    finally:
        await server.stop()
    assert len(server.requests) <= most_attempts(elapsed), (len(server.requests), elapsed)
