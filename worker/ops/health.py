"""What the probes report: liveness and readiness, from state the runtime and the stages update.

No HTTP here (``worker.ops.http`` serves the two reports as ``/healthz`` and ``/readyz``)::

    health = HealthState(broker_required=True, sources=["cam1", "cam2"], ready_sources="all")
    health.set_model_loaded()
    health.source_attached("cam1", True)     # the source's task runs
    health.stage_alive("control", True)      # a supervised stage that readiness also needs
    health.readiness().ok

Liveness asks only "does the worker make progress": the loop heartbeat is fresh and a running batch is
not stuck. It never depends on the broker or a camera, so an outage cannot cause a restart storm.
Readiness asks "is it doing its job": model loaded, broker connected when the pipeline uses one, its
sources alive (``any``: at least one; ``all``: every declared one), every reported stage alive, and
not shutting down (the first thing SIGTERM flips).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["HealthReport", "HealthState", "ReadySources"]

#: how many of the pipeline's sources must be alive for readiness
ReadySources = Literal["any", "all"]


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The answer of one probe."""

    ok: bool
    checks: dict[str, Any]
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "fail", "checks": self.checks, "reasons": list(self.reasons)}


@dataclass
class HealthState:
    """What the probes report, updated by the runtime and the stages (cheap, thread-safe setters).

    Args:
        stale_after_s: liveness fails when the loop heartbeat, or a running batch, is older than this.
        broker_required: readiness needs the broker (``broker_probe``; pipelines with MQTT sinks).
        sources: the pipeline's source ids; a declared source that is not alive counts as dead.
        ready_sources: ``any`` (default): ready while at least one source is alive; ``all``: every
            declared source must be alive.
        clock: monotonic clock (tests pass their own).
    """

    stale_after_s: float = 30.0
    broker_required: bool = False
    sources: Iterable[str] = ()
    ready_sources: ReadySources = "any"
    clock: Callable[[], float] = time.monotonic
    model_loaded: bool = False
    broker_probe: Callable[[], bool] = field(default=lambda: False, repr=False)
    shutting_down: bool = False
    last_heartbeat: float = field(default=math.nan)
    last_batcher_progress: float = math.nan
    batcher_idle: bool = True
    loop_lag_s: float = 0.0
    details: dict[str, Callable[[], Any]] = field(default_factory=dict, repr=False)
    # rebound, never mutated: probes may read them from another thread
    _sources: dict[str, bool] = field(default_factory=dict, init=False, repr=False)
    _stages: dict[str, bool] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0, got {self.stale_after_s}")
        if self.ready_sources not in ("any", "all"):
            raise ValueError(f"ready_sources must be 'any' or 'all', got {self.ready_sources!r}")
        self.sources = tuple(self.sources)
        self._sources = dict.fromkeys(self.sources, False)
        if math.isnan(self.last_heartbeat):
            self.last_heartbeat = self.clock()  # start-up counts as a beat

    # -- setters -------------------------------------------------------------------------------------

    def set_model_loaded(self, loaded: bool = True) -> None:
        self.model_loaded = loaded

    def set_broker_connected(self, connected: bool) -> None:
        """A fixed broker state (for callers that track it themselves)."""
        self.broker_probe = lambda: connected

    def set_broker_probe(self, probe: Callable[[], bool]) -> None:
        """Read the broker state from ``probe`` at each readiness check (no polling lag).

        The runtime passes its MQTT sinks' own connection state, so readiness turns false the
        moment a sink has noticed an outage.
        """
        self.broker_probe = probe

    def source_attached(self, source: str, alive: bool = True) -> None:
        """A source's task runs (``True``) or has ended or failed for good (``False``: dead)."""
        self._sources = {**self._sources, source: alive}

    def stage_alive(self, name: str, alive: bool) -> None:
        """A supervised stage (``"control"``, ``"inference"`` ...) runs, or is down: readiness fails
        while any stage reported here is down."""
        self._stages = {**self._stages, name: alive}

    def set_detail(self, name: str, probe: Callable[[], Any]) -> None:
        """Add ``probe()`` (JSON-ready) to readiness checks under ``name``; it does not change readiness."""
        self.details = {**self.details, name: probe}

    def begin_shutdown(self) -> None:
        """SIGTERM: readiness turns false at once, before anything else stops."""
        self.shutting_down = True

    def beat(self) -> None:
        """The event loop ran (called by ``heartbeat``)."""
        self.last_heartbeat = self.clock()

    def batcher_progress(self) -> None:
        """The batcher started or finished a batch: a batch running longer than the limit is a stall."""
        self.last_batcher_progress = self.clock()
        self.batcher_idle = False

    def batcher_waiting(self) -> None:
        """The batcher waits for frames: however long that takes, it is not stalled."""
        self.last_batcher_progress = self.clock()
        self.batcher_idle = True

    async def heartbeat(self, interval_s: float = 1.0, on_lag: Callable[[float], None] | None = None) -> None:
        """Beat every ``interval_s`` and measure how late the loop wakes (runs until cancelled)."""
        loop = asyncio.get_running_loop()
        self.beat()  # start-up work before the first beat (model loading) is not a stall
        while True:
            start = loop.time()
            await asyncio.sleep(interval_s)
            self.loop_lag_s = max(0.0, loop.time() - start - interval_s)
            self.beat()
            if on_lag is not None:
                on_lag(self.loop_lag_s)

    # -- probes --------------------------------------------------------------------------------------

    def liveness(self) -> HealthReport:
        now = self.clock()
        heartbeat_age = now - self.last_heartbeat
        batcher_age = None if math.isnan(self.last_batcher_progress) else now - self.last_batcher_progress
        reasons = []
        if heartbeat_age > self.stale_after_s:
            reasons.append(f"event loop heartbeat is {heartbeat_age:.1f}s old (limit {self.stale_after_s}s)")
        if batcher_age is not None and not self.batcher_idle and batcher_age > self.stale_after_s:
            reasons.append(f"batcher made no progress for {batcher_age:.1f}s (limit {self.stale_after_s}s)")
        checks = {
            "heartbeat_age_s": round(heartbeat_age, 3),
            "batcher_age_s": None if batcher_age is None else round(batcher_age, 3),
            "batcher_idle": self.batcher_idle,
            "loop_lag_s": round(self.loop_lag_s, 4),
        }
        return HealthReport(not reasons, checks, tuple(reasons))

    def readiness(self) -> HealthReport:
        sources, stages = self._sources, self._stages
        alive = sorted(s for s, up in sources.items() if up)
        dead = sorted(s for s, up in sources.items() if not up)
        dead_stages = sorted(name for name, up in stages.items() if not up)
        broker_up = bool(self.broker_probe())
        reasons = []
        if self.shutting_down:
            reasons.append("shutting down")
        if not self.model_loaded:
            reasons.append("model not loaded")
        if self.broker_required and not broker_up:
            reasons.append("broker not connected")
        if not alive:
            reasons.append("no source attached")
        elif dead and self.ready_sources == "all":
            reasons.append(f"sources not alive: {', '.join(dead)} (http.ready_sources: all)")
        reasons.extend(f"stage {name} is down" for name in dead_stages)
        checks = {
            "shutting_down": self.shutting_down,
            "model_loaded": self.model_loaded,
            "broker_required": self.broker_required,
            "broker_connected": broker_up,
            "ready_sources": self.ready_sources,
            "sources_attached": alive,
            "sources_dead": dead,
            "stages": dict(sorted(stages.items())),
            "stages_down": dead_stages,
            **{name: probe() for name, probe in self.details.items()},
        }
        return HealthReport(not reasons, checks, tuple(reasons))
