"""The one retry policy: full-jitter delays, their ceilings, reset, and the attempt-rate floor."""

from __future__ import annotations

import asyncio
import itertools
import random
from contextlib import nullcontext, suppress
from typing import Any

import pytest

from tests.support.listener import counting_listener, most_attempts
from tests.support.waiting import wait_until
from worker.control import ControlListener
from worker.mqtt import BrokerConfig
from worker.queues import FrameQueue
from worker.retry import DEFAULT_MIN_INTERVAL_S, Backoff
from worker.sources.base import Backoff as ReExported
from worker.sources.mqtt import MqttSource, MqttSourceConfig
from worker.telemetry import RecordingTelemetry


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("min_s", "max_s", "ceilings"),
    [
        (0.5, 4.0, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]),
        (1.0, 1.0, [1.0, 1.0, 1.0]),
        (0.1, 0.25, [0.1, 0.2, 0.25, 0.25]),
    ],
)
def test_ceilings_double_up_to_the_cap(min_s: float, max_s: float, ceilings: list[float]) -> None:
    backoff = Backoff(min_s, max_s)
    assert [backoff.ceiling(n) for n in range(len(ceilings))] == pytest.approx(ceilings)
    assert backoff.ceiling(10_000) == max_s  # no overflow for a long outage


class RecordingRandom(random.Random):
    """Records the bounds of every ``uniform`` call (what full jitter draws from)."""

    def __init__(self) -> None:
        super().__init__(7)
        self.bounds: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.bounds.append((a, b))
        return super().uniform(a, b)


def test_each_delay_is_drawn_from_zero_to_the_ceiling() -> None:
    rng = RecordingRandom()
    backoff = Backoff(0.5, 4.0, rng=rng)
    delays = [backoff.next_delay() for _ in range(5)]
    assert rng.bounds == [(0.0, 0.5), (0.0, 1.0), (0.0, 2.0), (0.0, 4.0), (0.0, 4.0)]
    assert all(0.0 <= d <= hi for d, (_, hi) in zip(delays, rng.bounds, strict=True))
    assert backoff.attempt == 5
    backoff.reset()
    assert backoff.attempt == 0
    backoff.next_delay()
    assert rng.bounds[-1] == (0.0, 0.5)


def test_full_jitter_covers_the_whole_window() -> None:
    # not [ceiling/2, ceiling] nor [min/2, ceiling]: the low end of the window is used as well
    backoff = Backoff(1.0, 1.0, rng=random.Random(3))
    delays = [backoff.next_delay() for _ in range(2000)]
    assert min(delays) < 0.05 and max(delays) > 0.95
    assert sum(delays) / len(delays) == pytest.approx(0.5, abs=0.05)


def test_the_floor_spaces_attempts_whatever_the_delays() -> None:
    clock = FakeClock()
    backoff = Backoff(0.01, 0.01, clock=clock, min_interval_s=0.2)
    assert backoff.pace() == 0.0  # the first attempt goes at once
    assert backoff.pace() == pytest.approx(0.2)  # a retry right away waits for the floor
    clock.now += 0.2 + 0.05  # the loop slept what pace said, then 0.05 s more
    assert backoff.pace() == pytest.approx(0.15)  # booked 0.2 s after the previous booking
    clock.now += 1.0  # a long backoff delay: no extra wait
    assert backoff.pace() == 0.0
    backoff.reset()  # a success does not lift the floor
    assert backoff.pace() == pytest.approx(0.2)


def test_attempts_per_second_are_bounded_by_the_floor() -> None:
    clock = FakeClock()
    backoff = Backoff(0.001, 0.001, rng=random.Random(1), clock=clock)
    starts = []
    while clock.now < 110.0:  # a loop that follows the policy for 10 s of its clock
        clock.now += backoff.next_delay()
        clock.now += backoff.pace()
        starts.append(clock.now)
    assert len(starts) <= 10.0 / DEFAULT_MIN_INTERVAL_S + 1
    assert min(b - a for a, b in itertools.pairwise(starts)) >= DEFAULT_MIN_INTERVAL_S - 1e-9


def test_a_zero_floor_turns_it_off() -> None:
    backoff = Backoff(1.0, 2.0, clock=FakeClock(), min_interval_s=0.0)
    assert [backoff.pace() for _ in range(3)] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((0.5, 4.0), {}, nullcontext()),
        ((0.0, 1.0), {}, pytest.raises(ValueError, match="min_s")),
        ((-1.0, 1.0), {}, pytest.raises(ValueError, match="min_s")),
        ((2.0, 1.0), {}, pytest.raises(ValueError, match="max_s")),
        ((float("nan"), 1.0), {}, pytest.raises(ValueError, match="min_s")),
        ((0.5, 1.0), {"min_interval_s": -0.1}, pytest.raises(ValueError, match="min_interval_s")),
    ],
)
def test_bad_bounds_are_refused(args: tuple[float, float], kwargs: dict[str, Any], expected: Any) -> None:
    with expected:
        Backoff(*args, **kwargs)


def test_sources_base_re_exports_the_one_backoff() -> None:
    assert ReExported is Backoff


# ---- every reconnect loop keeps to the floor (against the test's own listener, a broker refusing logins)


def _refused_broker(port: int) -> BrokerConfig:
    # the smallest backoff a pipeline may set: only the attempt-rate floor bounds the rate
    return BrokerConfig(host="127.0.0.1", port=port, reconnect_min_s=0.001, reconnect_max_s=0.001)


async def test_the_mqtt_source_reconnects_at_most_at_the_floor_rate() -> None:
    async with counting_listener("refuse") as listener:
        source = MqttSource(MqttSourceConfig(id="cam", topic="frames"), _refused_broker(listener.port))
        queue = FrameQueue("cam", 4, "every_frame")
        loop = asyncio.get_running_loop()
        started = loop.time()
        task = asyncio.create_task(source.run(queue))
        await wait_until(lambda: len(listener.arrivals) >= 4, what="four connection attempts")
        elapsed = loop.time() - started
        await source.stop()
        await asyncio.wait_for(task, 10)
        assert len(listener.arrivals) <= most_attempts(loop.time() - started), (listener.arrivals, elapsed)


async def test_the_control_listener_reconnects_at_most_at_the_floor_rate() -> None:
    async with counting_listener("refuse") as listener:
        control = ControlListener(
            _refused_broker(listener.port),
            "segstream/p/control",
            lambda values: dict(values),
            dict,
            lambda message: None,
            RecordingTelemetry(),
            "w",
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        task = asyncio.create_task(control.run())
        await wait_until(lambda: len(listener.arrivals) >= 4, what="four connection attempts")
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        assert len(listener.arrivals) <= most_attempts(loop.time() - started), listener.arrivals
