"""The supervisor: restarts with backoff, critical failures stop the worker, nothing outlives it."""

from __future__ import annotations

import asyncio

import pytest

from worker.ops.health import HealthState
from worker.supervisor import Supervisor, describe_exception


class FixedBackoff:
    """Delays from a list (0 = at once); counts resets."""

    max_s = 10.0

    def __init__(self, *delays: float) -> None:
        self.delays = list(delays)
        self.given: list[float] = []
        self.resets = 0

    def next_delay(self) -> float:
        delay = self.delays.pop(0) if self.delays else 0.0
        self.given.append(delay)
        return delay

    def reset(self) -> None:
        self.resets += 1

    def pace(self) -> float:
        return 0.0


async def test_a_restartable_stage_runs_again_after_each_failure_until_it_returns() -> None:
    stop = asyncio.Event()
    runs: list[str] = []
    events: list[str] = []
    backoff = FixedBackoff(0.0, 0.0)

    async def flaky() -> None:
        runs.append("run")
        if len(runs) < 3:
            raise RuntimeError(f"failure {len(runs)}")

    async with Supervisor(stop, backoff=lambda: backoff) as supervisor:
        task = supervisor.restartable(
            "source[cam]", flaky, on_up=lambda: events.append("up"), on_down=lambda: events.append("down")
        )
    assert task.done() and task.exception() is None
    assert runs == ["run"] * 3
    assert events == ["up", "down", "up", "down", "up"]
    assert supervisor.restarts["source[cam]"] == 2
    assert supervisor.failures == []  # restarted: not a failure of the worker
    assert not stop.is_set()
    assert backoff.given == [0.0, 0.0]


async def test_a_restart_waiting_for_its_backoff_gives_up_when_the_worker_stops() -> None:
    stop = asyncio.Event()
    failed = asyncio.Event()

    async def fails() -> None:
        failed.set()
        raise RuntimeError("down")

    async with Supervisor(stop, backoff=lambda: FixedBackoff(3600.0)) as supervisor:
        task = supervisor.restartable("control", fails)
        await failed.wait()
        stop.set()
    assert task.done() and supervisor.restarts["control"] == 1


async def test_a_stage_that_ran_longer_than_the_backoff_cap_restarts_from_the_shortest_delay() -> None:
    now = [0.0]
    backoff = FixedBackoff()
    runs = 0

    async def fails_later() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            now[0] += 60.0  # it ran a minute before failing (the cap is 10 s)
            raise RuntimeError("late failure")
        if runs == 2:
            raise RuntimeError("early failure")

    async with Supervisor(asyncio.Event(), backoff=lambda: backoff, clock=lambda: now[0]) as supervisor:
        supervisor.restartable("source[cam]", fails_later)
    assert runs == 3 and backoff.resets == 1


async def test_a_critical_failure_is_recorded_and_sets_the_stop() -> None:
    stop = asyncio.Event()
    down: list[str] = []
    counted: list[str] = []

    async def breaks() -> None:
        raise TypeError("bug")

    async with Supervisor(stop, backoff=FixedBackoff, on_failure=counted.append) as supervisor:
        supervisor.critical("inference", breaks, on_down=lambda: down.append("inference"))
        await stop.wait()
    assert [(f.stage, type(f.error)) for f in supervisor.failures] == [("inference", TypeError)]
    assert down == ["inference"] and counted == ["inference"]


async def test_background_stages_are_cancelled_when_the_supervisor_exits() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    async with Supervisor(asyncio.Event(), backoff=FixedBackoff) as supervisor:
        task = supervisor.background("health.heartbeat", forever)
        await started.wait()
    assert task.cancelled()
    assert supervisor.failures == []


async def test_an_error_in_the_body_cancels_every_stage() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def source() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(BaseExceptionGroup) as info:
        async with Supervisor(asyncio.Event(), backoff=FixedBackoff) as supervisor:
            supervisor.restartable("source[cam]", source)
            await started.wait()
            raise ValueError("the stop sequence broke")
    assert info.group_contains(ValueError)
    assert cancelled.is_set()


def test_describe_exception_is_one_line_with_the_place_it_was_raised() -> None:
    def inner() -> None:
        raise KeyError("a\nb")

    try:
        inner()
    except KeyError as exc:
        text = describe_exception(exc)
    assert "\n" not in text
    assert text.startswith("KeyError: 'a\\nb' (at tests/test_supervisor.py:")
    assert text.endswith(" in inner)")


def test_a_stage_down_makes_the_worker_unready_until_it_is_back() -> None:
    health = HealthState()
    health.set_model_loaded()
    health.source_attached("cam")
    assert health.readiness().ok
    health.stage_alive("control", False)
    report = health.readiness()
    assert not report.ok
    assert report.reasons == ("stage control is down",)
    assert report.checks["stages_down"] == ["control"]
    health.stage_alive("control", True)
    assert health.readiness().ok
