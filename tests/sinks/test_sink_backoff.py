"""The MQTT sink's reconnects follow the one retry policy, shutdown included (issue 12 item 5).

The "broker" is the test's own TCP listener on 127.0.0.1, which counts every connection: one that
closes each connection at once, and one that reads the CONNECT and answers CONNACK "bad user name or
password" (what a broker refusing the worker's login does). Before the fix, a sink closing with the
broker down retried with no delay at all (28,413 attempts in 10 s).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import pytest

from tests.sinks.helpers import wait_until
from worker.messages import FrameResult
from worker.mqtt import BrokerConfig
from worker.retry import DEFAULT_MIN_INTERVAL_S
from worker.sinks import MqttSink, MqttSinkConfig
from worker.telemetry import RecordingTelemetry

#: MQTT v5 CONNACK: session present 0, reason 0x86 "Bad User Name or Password", no properties
CONNACK_BAD_PASSWORD = bytes([0x20, 0x03, 0x00, 0x86, 0x00])


@dataclass
class CountingListener:
    """Accepts TCP connections on 127.0.0.1 and records when each arrived (loop time)."""

    mode: Literal["close", "refuse"]
    arrivals: list[float] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.arrivals.append(asyncio.get_running_loop().time())
        try:
            if self.mode == "refuse":
                await _read_packet(reader)
                writer.write(CONNACK_BAD_PASSWORD)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def between(self, start: float, end: float) -> int:
        return sum(1 for t in self.arrivals if start <= t <= end)


async def _read_packet(reader: asyncio.StreamReader) -> bytes:
    """One MQTT control packet (fixed header, variable-length remaining length, body)."""
    await reader.readexactly(1)
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    return await reader.readexactly(length)


@asynccontextmanager
async def counting_listener(mode: Literal["close", "refuse"]) -> AsyncIterator[CountingListener]:
    listener = CountingListener(mode)
    server = await asyncio.start_server(listener.handle, "127.0.0.1", 0)
    listener.port = server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()


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


def _most_attempts(window_s: float) -> int:
    """Attempts at least ``DEFAULT_MIN_INTERVAL_S`` apart that can land in a window of ``window_s``,
    plus one already on its way when the window opened."""
    return int(window_s / DEFAULT_MIN_INTERVAL_S) + 2


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
        assert 1 <= during_close <= _most_attempts(closed - closing), (during_close, closed - closing)
        total = len(listener.arrivals)
        assert total <= _most_attempts(closed - started), (total, closed - started)
    assert telemetry.dropped[("cam1", "shutdown_undelivered")] == 3
