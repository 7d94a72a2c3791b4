"""The live preview's HTTP routes: the page, the per-source numbers, snapshots and the WebSocket.

``add_preview_routes`` mounts them on the worker's one aiohttp app (``worker.ops.http.build_app``
calls it); every route passes the ``AccessPolicy`` first (token, ``Host``, the WebSocket's
``Origin``):

| route | what |
|---|---|
| ``/`` | the page (``worker/ops/preview.html``), or a one-line index while the preview is off |
| ``/api/sources`` | the numbers the page shows, as JSON |
| ``/preview/{source}.jpg`` | the latest annotated frame of one source (a viewer for the hub's lease) |
| ``/preview/ws`` | frames (a JSON header, then the JPEG) and stats once a second |

The numbers come from the worker's plain per-source totals (``Metrics.snapshot``) and the hub's
frame-rate estimates, never from the Prometheus registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
from aiohttp import WSMsgType, web

from worker.ops.access import AccessPolicy
from worker.ops.metrics import SourceSnapshot
from worker.ops.preview import PreviewHub, SourcePreviewStats, preview_page

__all__ = ["PREVIEW_KEY", "PreviewContext", "add_preview_routes", "sources_payload"]

log = logging.getLogger(__name__)

_NO_STORE = {"Cache-Control": "no-store"}
_SNAPSHOT_WAIT_S = 3.0


@dataclass(frozen=True)
class PreviewContext:
    """What the preview routes read: the hub (None: no preview), the totals and readiness."""

    hub: PreviewHub | None
    pipeline: str
    totals: Callable[[], Mapping[str, SourceSnapshot]]
    ready: Callable[[], bool]
    access: AccessPolicy
    sockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)

    @property
    def enabled(self) -> bool:
        return self.hub is not None and self.hub.enabled


PREVIEW_KEY = web.AppKey("preview", PreviewContext)


def _row(source: str, t: SourceSnapshot | None, p: SourcePreviewStats | None) -> dict[str, Any]:
    latency = p.latency_s if p is not None else None
    if latency is None and t is not None and t.latency_count:
        latency = t.latency_sum / t.latency_count
    t = t or SourceSnapshot()
    return {
        "id": source,
        "fps": round(p.fps, 2) if p is not None else 0.0,
        "latency_ms": None if latency is None else round(latency * 1000.0, 1),
        "received": t.received,
        "processed": t.processed,
        "dropped": t.dropped,
        "skipped": t.skipped,
        "queue_depth": t.queue_depth,
        "connected": t.connected,
    }


def sources_payload(ctx: PreviewContext) -> dict[str, Any]:
    """The ``stats`` message: one row per source (the hub's sources first, then any other seen)."""
    totals = ctx.totals()
    preview = {s.source: s for s in ctx.hub.stats()} if ctx.hub is not None else {}
    ids = list(dict.fromkeys([*preview, *(k for k in totals if k != "other")]))
    return {
        "type": "stats",
        "pipeline": ctx.pipeline,
        "ready": ctx.ready(),
        "viewers": ctx.hub.viewers if ctx.hub is not None else 0,
        "sources": [_row(source, totals.get(source), preview.get(source)) for source in ids],
    }


def _hub(request: web.Request) -> tuple[PreviewContext, PreviewHub]:
    ctx = request.app[PREVIEW_KEY]
    if ctx.hub is None or not ctx.hub.enabled:
        raise web.HTTPNotFound(text="the live preview is off (http.preview: true in the pipeline file)")
    return ctx, ctx.hub


async def _index(request: web.Request) -> web.Response:
    ctx = request.app[PREVIEW_KEY]
    if not ctx.enabled:
        return web.Response(text="segstream worker: /metrics /healthz /readyz (live preview off)\n")
    login = ctx.access.login(request)
    if login is not None:
        return login
    ctx.access.check_preview(request)
    return web.Response(body=preview_page(), content_type="text/html", charset="utf-8", headers=_NO_STORE)


async def _api_sources(request: web.Request) -> web.Response:
    ctx = request.app[PREVIEW_KEY]
    ctx.access.check_preview(request)
    return web.json_response(sources_payload(ctx), headers=_NO_STORE)


async def _snapshot(request: web.Request) -> web.Response:
    ctx, hub = _hub(request)
    ctx.access.check_preview(request)
    source = request.match_info["source"]
    if source not in hub.sources():
        raise web.HTTPNotFound(text=f"no source {source!r}")
    hub.touch(source)
    deadline = time.monotonic() + _SNAPSHOT_WAIT_S
    while (encoded := await hub.frame(source)) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        hub.touch(source)
    if encoded is None:
        raise web.HTTPServiceUnavailable(text=f"no frame from {source!r} yet", headers={"Retry-After": "1"})
    return web.Response(
        body=encoded.jpeg,
        content_type="image/jpeg",
        headers={**_NO_STORE, "X-Frame-Seq": str(encoded.seq)},
    )


async def _send_new_frames(ws: web.WebSocketResponse, hub: PreviewHub, sent: dict[str, int]) -> None:
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


async def _sender(ws: web.WebSocketResponse, ctx: PreviewContext, hub: PreviewHub) -> None:
    loop = asyncio.get_running_loop()
    sent: dict[str, int] = {}
    next_stats = 0.0
    interval = 0.5 / hub.max_fps
    try:
        while not ws.closed:
            if loop.time() >= next_stats:
                await ws.send_json(sources_payload(ctx))
                next_stats = loop.time() + 1.0
            await _send_new_frames(ws, hub, sent)
            await asyncio.sleep(interval)
    except ConnectionError:
        pass  # the viewer went away mid-send
    finally:
        await ws.close()


async def _preview_ws(request: web.Request) -> web.WebSocketResponse:
    ctx, hub = _hub(request)
    ctx.access.check_websocket(request)  # before the upgrade: a refused page gets a plain 403
    # timeout: how long close() waits for the viewer's close frame (a hung browser must not stall shutdown)
    ws = web.WebSocketResponse(timeout=2.0, heartbeat=20.0, max_msg_size=1 << 16)
    await ws.prepare(request)
    ctx.sockets.add(ws)
    try:
        with hub.viewer():
            sender = asyncio.create_task(_sender(ws, ctx, hub), name="http.preview.sender")
            try:
                async for msg in ws:  # the page sends nothing; this loop ends when it goes away
                    if msg.type == WSMsgType.ERROR:
                        break
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
    finally:
        ctx.sockets.discard(ws)
    return ws


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[PREVIEW_KEY].sockets):
        await ws.close(code=1001, message=b"server shutdown")


def add_preview_routes(app: web.Application, ctx: PreviewContext) -> None:
    """Mount the preview routes on ``app`` (they answer 404 while the hub is off or absent)."""
    app[PREVIEW_KEY] = ctx
    app.on_shutdown.append(_close_sockets)
    app.router.add_get("/", _index)
    app.router.add_get("/api/sources", _api_sources)
    app.router.add_get("/preview/ws", _preview_ws)
    app.router.add_get("/preview/{source}.jpg", _snapshot)
