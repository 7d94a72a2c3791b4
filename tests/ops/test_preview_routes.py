"""The preview's routes on a real server: index, source stats, snapshots, preview off, the page as
package data; the ops modules' exports."""

from __future__ import annotations

import ast
import asyncio
import importlib
from pathlib import Path

import aiohttp
import cv2
import numpy as np
import pytest

from tests.ops.conftest import ServeFactory, make_detections
from worker.ops.health import HealthState
from worker.ops.http import HttpServer, build_app
from worker.ops.metrics import Metrics
from worker.ops.preview import PreviewHub


async def test_preview_off_serves_a_plain_index_and_no_preview_routes(serve: ServeFactory) -> None:
    async with serve(Metrics("p"), HealthState(), PreviewHub(enabled=False)) as s:
        status, body, _ = await s.get("/")
        assert status == 200 and b"live preview off" in body
        assert (await s.get("/preview/cam1.jpg"))[0] == 404
        assert (await s.get("/preview/ws"))[0] == 404
    async with serve(Metrics("p"), HealthState()) as s:  # no hub at all
        assert b"live preview off" in (await s.get("/"))[1]


async def test_page_sources_json_and_snapshot(serve: ServeFactory) -> None:
    metrics = Metrics("line-3", sources=["cam1"])
    metrics.frame_received("cam1")
    metrics.frames_processed("cam1")
    metrics.e2e_latency("cam1", 0.2)
    metrics.frame_dropped("cam1", "decode_error", 2)
    metrics.frame_skipped("cam1", "stale", 3)
    hub = PreviewHub(max_width=200)
    hub.set_sources(["cam1"])
    try:
        async with serve(metrics, HealthState(), hub) as s:
            status, body, headers = await s.get("/")
            assert status == 200 and headers["Content-Type"].startswith("text/html")
            assert b"/preview/ws" in body and b"segstreamFrames" in body

            status, payload = await s.get_json("/api/sources")
            assert status == 200 and payload["pipeline"] == "line-3" and payload["ready"] is False
            (row,) = payload["sources"]
            assert (row["id"], row["received"], row["processed"], row["dropped"]) == ("cam1", 1, 1, 2)
            assert row["skipped"] == 3
            assert row["latency_ms"] == 200.0  # from the metrics until the hub sees frames

            assert (await s.get("/preview/nope.jpg"))[0] == 404
            # no frame yet: the snapshot request makes the hub want frames, then waits for one
            assert not hub.wants("cam1")
            waiting = s.get("/preview/cam1.jpg")
            task = asyncio.create_task(waiting)
            for _ in range(100):
                if hub.wants("cam1"):
                    break
                await asyncio.sleep(0.01)
            assert hub.wants("cam1")
            image = np.full((100, 400, 3), 30, np.uint8)
            hub.offer("cam1", image, make_detections((100, 400), [(100, 20, 200, 80)], [0]), ["bolt"])
            status, jpeg, headers = await task
            assert status == 200 and headers["Content-Type"] == "image/jpeg" and headers["X-Frame-Seq"] == "1"
            decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            assert decoded.shape == (50, 200, 3)
    finally:
        hub.close()


PAGE = Path(__file__).resolve().parents[2] / "worker" / "ops" / "preview.html"


async def test_the_page_is_the_package_html_file(serve: ServeFactory) -> None:
    page = PAGE
    hub = PreviewHub()
    async with serve(Metrics("p"), HealthState(), hub) as s:
        status, body, _ = await s.get("/")
    assert status == 200 and body == page.read_bytes()
    assert (
        body.startswith(b"<!doctype html>")
        and b'new WebSocket(scheme + location.host + "/preview/ws")' in body
    )
    hub.close()


def test_the_old_ops_modules_are_gone() -> None:
    # (the shared venv's editable install would still import them from another checkout)
    worker = Path(__file__).resolve().parents[2] / "worker"
    assert not [m for m in ("metrics.py", "http_server.py", "preview.py") if (worker / m).exists()]


def _imports(module: str) -> set[str]:
    path = Path(__file__).resolve().parents[2] / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("worker.ops.health", {"aiohttp", "worker.ops.preview", "worker.ops.http", "worker.ops.metrics"}),
        ("worker.ops.metrics", {"aiohttp", "worker.ops.health", "worker.ops.preview"}),
        ("worker.ops.preview", {"aiohttp", "worker.ops.health", "worker.ops.http"}),
        ("worker.ops.preview_routes", {"worker.ops.health", "worker.ops.http"}),
        ("worker.ops.access", {"worker.ops.health", "worker.ops.preview", "worker.ops.metrics"}),
    ],
)
def test_no_ops_module_mixes_health_http_and_preview(module: str, forbidden: set[str]) -> None:
    assert not _imports(module) & forbidden


@pytest.mark.parametrize(
    "module",
    [
        "worker.ops",
        "worker.ops.access",
        "worker.ops.docs",
        "worker.ops.health",
        "worker.ops.http",
        "worker.ops.metrics",
        "worker.ops.preview",
        "worker.ops.preview_routes",
        "worker.telemetry",
        "worker.annotate",
        "worker.logging_setup",
    ],
)
def test_all_lists_exactly_the_public_names(module: str) -> None:
    mod = importlib.import_module(module)
    public = {
        name
        for name, value in vars(mod).items()
        if not name.startswith("_") and getattr(value, "__module__", module) == module and callable(value)
    }
    assert set(mod.__all__) >= public, public - set(mod.__all__)
    for name in mod.__all__:
        assert hasattr(mod, name), name


async def test_shutdown_closes_connected_preview_viewers_promptly() -> None:
    hub = PreviewHub()
    hub.set_sources(["cam1"])
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        server = HttpServer(build_app(Metrics("p"), HealthState(), hub), "127.0.0.1", 0)
        async with server:
            ws = await session.ws_connect(f"http://127.0.0.1:{server.port}/preview/ws")
            first = await ws.receive_json(timeout=5)
            assert first["type"] == "stats" and first["sources"][0]["id"] == "cam1"
            assert hub.viewers == 1
            started = loop.time()
        assert loop.time() - started < 3.0
        msg = await ws.receive(timeout=5)
        assert msg.type in {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING}
        await ws.close()
    assert hub.viewers == 0
    hub.close()
