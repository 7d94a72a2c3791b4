"""The worker's one HTTP server: ``/metrics``, ``/healthz``, ``/readyz``, and the live preview's routes.

It runs in the worker's own event loop (``AppRunner`` + ``TCPSite``, never ``run_app``), with the shared
objects under typed ``web.AppKey`` keys::

    health = HealthState(broker_required=True)
    access = AccessPolicy("127.0.0.1")              # or access_policy(config.http)
    app = build_app(metrics, health, preview, access)
    async with HttpServer(app, "127.0.0.1", 9108) as server:   # server.port: the bound port
        ...

The probes answer what ``worker.ops.health`` reports (200 or 503, JSON); the preview's routes live in
``worker.ops.preview_routes``; who may reach what is ``worker.ops.access``. ``HttpServer`` refuses to
bind beyond loopback an app whose access policy was made for loopback, so an open preview can never be
exposed by mistake.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TYPE_CHECKING, Self

from aiohttp import web

from worker.ops.access import AccessPolicy, is_loopback_host
from worker.ops.health import HealthReport, HealthState
from worker.ops.metrics import Metrics
from worker.ops.preview import PreviewHub
from worker.ops.preview_routes import PreviewContext, add_preview_routes

if TYPE_CHECKING:
    from worker.config import HttpConfig

__all__ = ["ACCESS_KEY", "HEALTH_KEY", "METRICS_KEY", "HttpServer", "access_policy", "build_app"]

log = logging.getLogger(__name__)

METRICS_KEY = web.AppKey("metrics", Metrics)
HEALTH_KEY = web.AppKey("health", HealthState)
ACCESS_KEY = web.AppKey("access", AccessPolicy)
_NO_STORE = {"Cache-Control": "no-store"}


def _probe(report: HealthReport) -> web.Response:
    return web.json_response(report.to_dict(), status=200 if report.ok else 503, headers=_NO_STORE)


async def _healthz(request: web.Request) -> web.Response:
    request.app[ACCESS_KEY].check_probe(request)
    return _probe(request.app[HEALTH_KEY].liveness())


async def _readyz(request: web.Request) -> web.Response:
    request.app[ACCESS_KEY].check_probe(request)
    return _probe(request.app[HEALTH_KEY].readiness())


async def _metrics(request: web.Request) -> web.Response:
    request.app[ACCESS_KEY].check_probe(request)
    body, content_type = request.app[METRICS_KEY].render(request.headers.get("Accept"))
    # the exact Content-Type (with its version= parameter) is what Prometheus negotiates on
    return web.Response(body=body, headers={"Content-Type": content_type, **_NO_STORE})


def access_policy(config: HttpConfig) -> AccessPolicy:
    """The access policy of a pipeline's ``http`` section (reads the preview token now)."""
    return AccessPolicy(
        bind_host=config.host,
        token=config.resolved_preview_token(),
        allowed_origins=tuple(config.allowed_origins),
        open_probes=config.open_probes,
    )


def build_app(
    metrics: Metrics,
    health: HealthState,
    preview: PreviewHub | None = None,
    access: AccessPolicy | None = None,
) -> web.Application:
    """The aiohttp application; the runtime serves it with ``HttpServer`` in its own loop.

    Args:
        access: who may use the preview (default: a loopback server without a token).
    """
    access = access or AccessPolicy()
    app = web.Application()
    app[METRICS_KEY] = metrics
    app[HEALTH_KEY] = health
    app[ACCESS_KEY] = access
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    context = PreviewContext(
        hub=preview,
        pipeline=metrics.pipeline,
        totals=metrics.snapshot,
        ready=lambda: health.readiness().ok,
        access=access,
    )
    add_preview_routes(app, context)
    if preview is not None and preview.enabled and (problem := access.problem()) is not None:
        log.warning("%s", problem)
    return app


class HttpServer:
    """Serves ``app`` on ``host:port`` for the duration of an ``async with`` block (port 0: a free one).

    Raises:
        ValueError: ``host`` is beyond loopback but the app's ``AccessPolicy`` was made for loopback.
    """

    def __init__(
        self,
        app: web.Application,
        host: str = "127.0.0.1",
        port: int = 9108,
        *,
        shutdown_timeout: float = 2.0,
    ):
        access = app.get(ACCESS_KEY)
        if access is not None and access.loopback and not is_loopback_host(host):
            raise ValueError(
                f"refusing to serve on {host!r}: the app's access policy was made for a loopback bind "
                f"({access.bind_host!r}); build it with AccessPolicy({host!r}, token=...)"
            )
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
