"""The worker's one HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` and the live preview.

It runs in the worker's own event loop (``AppRunner`` + ``TCPSite``, never ``run_app``), with the shared
objects under typed ``web.AppKey`` keys::

    health = HealthState(broker_required=True)
    app = build_app(metrics, health, preview)
    async with HttpServer(app, "0.0.0.0", 9108) as server:   # server.port: the bound port
        ...

Liveness (``/healthz``) asks only "does the worker make progress": the loop heartbeat is fresh and a
running batch is not stuck. It never depends on the broker, so a broker outage cannot cause a restart
storm. Readiness (``/readyz``) asks "is it doing its job": model loaded, broker connected when the
pipeline uses one, at least one source attached, and not shutting down (the first thing SIGTERM flips).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import cv2
from aiohttp import WSMsgType, web

from worker.metrics import Metrics
from worker.preview import PREVIEW_PAGE, PreviewHub

__all__ = [
    "HEALTH_KEY",
    "METRICS_KEY",
    "PREVIEW_KEY",
    "HealthReport",
    "HealthState",
    "HttpServer",
    "build_app",
]

log = logging.getLogger(__name__)


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
        clock: monotonic clock (tests pass their own).
    """

    stale_after_s: float = 30.0
    broker_required: bool = False
    clock: Callable[[], float] = time.monotonic
    model_loaded: bool = False
    broker_probe: Callable[[], bool] = field(default=lambda: False, repr=False)
    shutting_down: bool = False
    sources_attached: frozenset[str] = frozenset()
    stages_down: frozenset[str] = frozenset()
    last_heartbeat: float = field(default=math.nan)
    last_batcher_progress: float = math.nan
    batcher_idle: bool = True
    loop_lag_s: float = 0.0
    details: dict[str, Callable[[], Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0, got {self.stale_after_s}")
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

    def source_attached(self, source: str, attached: bool = True) -> None:
        # rebind instead of mutating: probes may read the set from another thread
        if attached:
            self.sources_attached = self.sources_attached | {source}
        else:
            self.sources_attached = self.sources_attached - {source}

    def stage_alive(self, name: str, alive: bool) -> None:
        """A supervised stage (e.g. ``"control"``, ``"inference"``) is running or down; down: not ready."""
        if alive:
            self.stages_down = self.stages_down - {name}
        else:
            self.stages_down = self.stages_down | {name}

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
        reasons = []
        if self.shutting_down:
            reasons.append("shutting down")
        if not self.model_loaded:
            reasons.append("model not loaded")
        broker_up = bool(self.broker_probe())
        if self.broker_required and not broker_up:
            reasons.append("broker not connected")
        if not self.sources_attached:
            reasons.append("no source attached")
        stages_down = self.stages_down
        reasons.extend(f"stage {name} is down" for name in sorted(stages_down))
        checks = {
            "shutting_down": self.shutting_down,
            "model_loaded": self.model_loaded,
            "broker_required": self.broker_required,
            "broker_connected": broker_up,
            "sources_attached": sorted(self.sources_attached),
            "stages_down": sorted(stages_down),
            **{name: probe() for name, probe in self.details.items()},
        }
        return HealthReport(not reasons, checks, tuple(reasons))


METRICS_KEY = web.AppKey("metrics", Metrics)
HEALTH_KEY = web.AppKey("health", HealthState)
PREVIEW_KEY = web.AppKey("preview", PreviewHub)
_SOCKETS_KEY: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("preview_sockets")


def _probe(report: HealthReport) -> web.Response:
    return web.json_response(
        report.to_dict(), status=200 if report.ok else 503, headers={"Cache-Control": "no-store"}
    )


async def _healthz(request: web.Request) -> web.Response:
    return _probe(request.app[HEALTH_KEY].liveness())


async def _readyz(request: web.Request) -> web.Response:
    return _probe(request.app[HEALTH_KEY].readiness())


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS_KEY].render(request.headers.get("Accept"))
    # the exact Content-Type (with its version= parameter) is what Prometheus negotiates on
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


def _hub(request: web.Request) -> PreviewHub:
    hub = request.app.get(PREVIEW_KEY)
    if hub is None or not hub.enabled:
        raise web.HTTPNotFound(text="the live preview is off (http.preview: true in the pipeline file)")
    return hub


def _sources_payload(app: web.Application) -> dict[str, Any]:
    metrics, health, hub = app[METRICS_KEY], app[HEALTH_KEY], app.get(PREVIEW_KEY)
    totals = metrics.snapshot()
    preview = {s.source: s for s in hub.stats()} if hub is not None else {}
    ids = list(dict.fromkeys([*preview, *(k for k in totals if k != "other")]))
    rows = []
    for source in ids:
        t, p = totals.get(source), preview.get(source)
        latency = p.latency_s if p is not None else None
        if latency is None and t is not None and t.latency_count:
            latency = t.latency_sum / t.latency_count
        rows.append(
            {
                "id": source,
                "fps": round(p.fps, 2) if p is not None else 0.0,
                "latency_ms": None if latency is None else round(latency * 1000.0, 1),
                "received": int(t.received) if t else 0,
                "processed": int(t.processed) if t else 0,
                "dropped": int(t.dropped) if t else 0,
                "queue_depth": int(t.queue_depth) if t else 0,
                "connected": bool(t.connected) if t else False,
            }
        )
    return {
        "type": "stats",
        "pipeline": metrics.pipeline,
        "ready": health.readiness().ok,
        "viewers": hub.viewers if hub is not None else 0,
        "sources": rows,
    }


async def _index(request: web.Request) -> web.Response:
    hub = request.app.get(PREVIEW_KEY)
    if hub is None or not hub.enabled:
        return web.Response(text="segstream worker: /metrics /healthz /readyz (live preview off)\n")
    return web.Response(
        body=PREVIEW_PAGE, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-store"}
    )


async def _api_sources(request: web.Request) -> web.Response:
    return web.json_response(_sources_payload(request.app), headers={"Cache-Control": "no-store"})


async def _snapshot(request: web.Request) -> web.Response:
    hub = _hub(request)
    source = request.match_info["source"]
    if source not in hub.sources():
        raise web.HTTPNotFound(text=f"no source {source!r}")
    hub.touch(source)
    deadline = time.monotonic() + 3.0
    while (encoded := await hub.frame(source)) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        hub.touch(source)
    if encoded is None:
        raise web.HTTPServiceUnavailable(text=f"no frame from {source!r} yet", headers={"Retry-After": "1"})
    return web.Response(
        body=encoded.jpeg,
        content_type="image/jpeg",
        headers={"Cache-Control": "no-store", "X-Frame-Seq": str(encoded.seq)},
    )


async def _send_frames(ws: web.WebSocketResponse, app: web.Application, hub: PreviewHub) -> None:
    loop = asyncio.get_running_loop()
    sent: dict[str, int] = {}
    next_stats = 0.0
    interval = 0.5 / hub.max_fps
    try:
        while not ws.closed:
            if loop.time() >= next_stats:
                await ws.send_json(_sources_payload(app))
                next_stats = loop.time() + 1.0
            for source in hub.sources():
                if hub.latest_seq(source) <= sent.get(source, 0):
                    continue
                try:
                    encoded = await hub.frame(source)
                except (ValueError, RuntimeError, cv2.error) as exc:
                    log.warning("preview: cannot render %s: %s", source, exc, extra={"source": source})
                    sent[source] = hub.latest_seq(source)
                    continue
                if encoded is None or encoded.seq <= sent.get(source, 0):
                    continue
                meta = {"type": "frame", "source": source, "seq": encoded.seq, "width": encoded.width}
                meta |= {"height": encoded.height, "detections": encoded.detections}
                await ws.send_json(meta)
                await ws.send_bytes(encoded.jpeg)
                sent[source] = encoded.seq
            await asyncio.sleep(interval)
    except ConnectionError:
        pass  # the viewer went away mid-send
    finally:
        await ws.close()


async def _preview_ws(request: web.Request) -> web.WebSocketResponse:
    hub = _hub(request)
    # timeout: how long close() waits for the viewer's close frame (a hung browser must not stall shutdown)
    ws = web.WebSocketResponse(timeout=2.0, heartbeat=20.0, max_msg_size=1 << 16)
    await ws.prepare(request)
    sockets = request.app[_SOCKETS_KEY]
    sockets.add(ws)
    try:
        with hub.viewer():
            sender = asyncio.create_task(_send_frames(ws, request.app, hub), name="http.preview.sender")
            try:
                async for msg in ws:  # the page sends nothing; this loop ends when it goes away
                    if msg.type == WSMsgType.ERROR:
                        break
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
    finally:
        sockets.discard(ws)
    return ws


async def _close_sockets(app: web.Application) -> None:
    sockets = app[_SOCKETS_KEY]
    for ws in list(sockets):
        await ws.close(code=1001, message=b"server shutdown")


def build_app(metrics: Metrics, health: HealthState, preview: PreviewHub | None = None) -> web.Application:
    """The aiohttp application; the runtime serves it with ``HttpServer`` in its own loop."""
    app = web.Application()
    app[METRICS_KEY] = metrics
    app[HEALTH_KEY] = health
    if preview is not None:
        app[PREVIEW_KEY] = preview
    app[_SOCKETS_KEY] = weakref.WeakSet()
    app.on_shutdown.append(_close_sockets)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/", _index)
    app.router.add_get("/api/sources", _api_sources)
    app.router.add_get("/preview/ws", _preview_ws)
    app.router.add_get("/preview/{source}.jpg", _snapshot)
    return app


class HttpServer:
    """Serves ``app`` on ``host:port`` for the duration of an ``async with`` block (port 0: a free one)."""

    def __init__(
        self, app: web.Application, host: str = "0.0.0.0", port: int = 9108, *, shutdown_timeout: float = 2.0
    ):
        self.app = app
        self.host = host
        self.port = port
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
        )

    async def __aenter__(self) -> Self:
        await self._runner.setup()
        try:
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self.port = int(self._runner.addresses[0][1])
        log.info("http server listening on %s:%d", self.host, self.port)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._runner.cleanup()
