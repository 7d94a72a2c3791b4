"""/healthz and /readyz transitions, driven through HealthState, on a real server."""

from __future__ import annotations

import asyncio

import pytest

from tests.ops.conftest import ManualClock, ServeFactory
from worker.ops.health import HealthState
from worker.ops.metrics import Metrics


async def _probes(s: object) -> tuple[int, int, dict[str, object], dict[str, object]]:
    live_status, live = await s.get_json("/healthz")  # type: ignore[attr-defined]
    ready_status, ready = await s.get_json("/readyz")  # type: ignore[attr-defined]
    return live_status, ready_status, live, ready


async def test_lifecycle_starting_ready_broker_down_shutdown(serve: ServeFactory) -> None:
    clock = ManualClock()
    health = HealthState(stale_after_s=10.0, broker_required=True, clock=clock)
    async with serve(Metrics("p"), health) as s:
        # starting: live, not ready (no model, no broker, no source)
        live_s, ready_s, _, ready = await _probes(s)
        assert (live_s, ready_s) == (200, 503)
        assert set(ready["reasons"]) == {"model not loaded", "broker not connected", "no source attached"}

        health.set_model_loaded()
        health.source_attached("cam1")
        live_s, ready_s, _, ready = await _probes(s)
        assert ready_s == 503 and ready["reasons"] == ["broker not connected"]

        health.set_broker_connected(True)
        live_s, ready_s, _, ready = await _probes(s)
        assert (live_s, ready_s) == (200, 200)
        assert ready["status"] == "ok" and ready["checks"]["sources_attached"] == ["cam1"]

        # broker outage: not ready, still live (no restart storm)
        health.set_broker_connected(False)
        live_s, ready_s, live, ready = await _probes(s)
        assert (live_s, ready_s) == (200, 503)
        assert live["status"] == "ok" and ready["reasons"] == ["broker not connected"]
        health.set_broker_connected(True)
        assert (await _probes(s))[:2] == (200, 200)

        # the last source goes away: not ready
        health.source_attached("cam1", False)
        assert (await _probes(s))[:2] == (200, 503)
        health.source_attached("cam1")

        # SIGTERM: not ready first, still live while draining
        health.begin_shutdown()
        live_s, ready_s, _, ready = await _probes(s)
        assert (live_s, ready_s) == (200, 503) and ready["reasons"] == ["shutting down"]


async def test_broker_not_required_means_ready_without_broker(serve: ServeFactory) -> None:
    health = HealthState(broker_required=False)
    health.set_model_loaded()
    health.source_attached("file1")
    async with serve(Metrics("p"), health) as s:
        assert (await _probes(s))[:2] == (200, 200)


async def test_loop_heartbeat_stale_is_not_live(serve: ServeFactory) -> None:
    clock = ManualClock()
    health = HealthState(stale_after_s=5.0, clock=clock)
    async with serve(Metrics("p"), health) as s:
        clock.advance(4.9)
        assert (await _probes(s))[0] == 200
        clock.advance(0.2)  # 5.1 s since the last beat
        live_s, _, live, _ = await _probes(s)
        assert live_s == 503 and "event loop heartbeat" in live["reasons"][0]
        health.beat()
        assert (await _probes(s))[0] == 200


async def test_batcher_stuck_in_a_batch_is_not_live_but_idle_is(serve: ServeFactory) -> None:
    clock = ManualClock()
    health = HealthState(stale_after_s=5.0, clock=clock)
    async with serve(Metrics("p"), health) as s:
        health.batcher_waiting()  # no frames for a long time is fine
        clock.advance(60)
        health.beat()
        assert (await _probes(s))[0] == 200

        health.batcher_progress()  # a batch starts ... and never finishes
        clock.advance(3)
        health.beat()
        assert (await _probes(s))[0] == 200
        clock.advance(3)
        health.beat()
        live_s, _, live, _ = await _probes(s)
        assert live_s == 503 and live["reasons"] == ["batcher made no progress for 6.0s (limit 5.0s)"]

        health.batcher_progress()  # it finished
        assert (await _probes(s))[0] == 200


async def test_heartbeat_task_beats_and_reports_loop_lag() -> None:
    health = HealthState(stale_after_s=5.0)
    metrics = Metrics("p")
    before = health.last_heartbeat
    lags: list[float] = []

    def on_lag(lag: float) -> None:
        lags.append(lag)
        metrics.loop_lag(lag)

    task = asyncio.create_task(health.heartbeat(0.01, on_lag))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert health.last_heartbeat > before and lags and all(lag >= 0 for lag in lags)
    assert b"segstream_event_loop_lag_seconds " in metrics.render()[0]


async def test_heartbeat_beats_at_once_when_started_after_a_long_start_up() -> None:
    clock = ManualClock()
    health = HealthState(stale_after_s=5.0, clock=clock)
    clock.advance(60)  # e.g. a slow model load before the loop's tasks start
    assert not health.liveness().ok
    task = asyncio.create_task(health.heartbeat(10.0))
    await asyncio.sleep(0)
    assert health.liveness().ok
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_stale_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stale_after_s"):
        HealthState(stale_after_s=0)


def test_readiness_asks_the_broker_probe_at_each_check() -> None:
    state = {"up": True}
    health = HealthState(broker_required=True)
    health.set_model_loaded()
    health.source_attached("cam1")
    health.set_broker_probe(lambda: state["up"])
    assert health.readiness().ok and health.readiness().checks["broker_connected"] is True
    state["up"] = False  # the sink noticed an outage: the very next check says so, no polling lag
    report = health.readiness()
    assert not report.ok and report.reasons == ("broker not connected",)
    assert report.checks["broker_connected"] is False
    state["up"] = True
    assert health.readiness().ok
    health.set_broker_connected(False)  # a fixed state replaces the probe
    assert not health.readiness().ok


def _ready(health: HealthState) -> HealthState:
    health.set_model_loaded()
    return health


@pytest.mark.parametrize(
    ("mode", "alive", "ok", "reason"),
    [
        ("any", {"cam1": True, "cam2": True}, True, None),
        ("any", {"cam1": True, "cam2": False}, True, None),
        ("any", {"cam1": False, "cam2": False}, False, "no source attached"),
        ("any", {}, False, "no source attached"),  # declared but never attached
        ("all", {"cam1": True, "cam2": True}, True, None),
        ("all", {"cam1": True, "cam2": False}, False, "sources not alive: cam2 (http.ready_sources: all)"),
        ("all", {"cam1": True}, False, "sources not alive: cam2 (http.ready_sources: all)"),
        ("all", {"cam1": False, "cam2": False}, False, "no source attached"),
    ],
)
def test_readiness_counts_dead_sources_by_mode(
    mode: str, alive: dict[str, bool], ok: bool, reason: str | None
) -> None:
    health = _ready(HealthState(sources=["cam1", "cam2"], ready_sources=mode))  # type: ignore[arg-type]
    for source, up in alive.items():
        health.source_attached(source, up)
    report = health.readiness()
    assert report.ok is ok and report.reasons == ((reason,) if reason else ())
    assert report.checks["ready_sources"] == mode
    assert report.checks["sources_dead"] == sorted({"cam1", "cam2"} - {s for s, up in alive.items() if up})


async def test_a_dead_stage_makes_the_worker_unready_until_it_is_back(serve: ServeFactory) -> None:
    health = _ready(HealthState(sources=["cam1"]))
    health.source_attached("cam1", True)
    async with serve(Metrics("p"), health) as s:
        assert (await _probes(s))[:2] == (200, 200)
        health.stage_alive("control", True)
        health.stage_alive("batcher", True)
        assert (await _probes(s))[:2] == (200, 200)
        health.stage_alive("control", False)  # e.g. the control listener died
        live_s, ready_s, _, ready = await _probes(s)
        assert (live_s, ready_s) == (200, 503)  # still live: a restart would not bring it back sooner
        assert ready["reasons"] == ["stage control is down"]
        assert ready["checks"]["stages"] == {"batcher": True, "control": False}
        assert ready["checks"]["stages_down"] == ["control"]
        health.stage_alive("control", True)  # the supervisor restarted it
        assert (await _probes(s))[:2] == (200, 200)


def test_ready_sources_must_be_any_or_all() -> None:
    with pytest.raises(ValueError, match="ready_sources"):
        HealthState(ready_sources="most")  # type: ignore[arg-type]


def test_http_config_carries_ready_sources_into_health() -> None:
    from worker.config import HttpConfig

    assert HttpConfig().ready_sources == "any"
    assert HttpConfig(ready_sources="all").ready_sources == "all"
    with pytest.raises(ValueError, match="ready_sources"):
        HttpConfig(ready_sources="most")  # type: ignore[arg-type]
