"""The live preview page in real headless Chromium, driven over the DevTools protocol.

The hub is fed synthetic frames and detections (real annotation and JPEG code); the page must show one
tile per source, and the images must keep updating. A screenshot is saved in the test's tmp folder.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest

from tests.ops.conftest import ServeFactory, make_detections
from tests.support.waiting import wait_until
from worker.ops.health import HealthState
from worker.ops.metrics import Metrics
from worker.ops.preview import PreviewHub

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/install-system-deps.sh)"),
]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
    "--remote-debugging-address=127.0.0.1",
    "--window-size=1280,800",
]


class Cdp:
    """The smallest DevTools protocol client: one page target, request/response by id."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._next = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        msg_id = self._next
        await self._ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self._ws.receive_json(), timeout=15)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg["result"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[tuple[Cdp, asyncio.subprocess.Process]]:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the renderer and zygote go with it
    )
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            if proc.returncode is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode}")
            await asyncio.sleep(0.1)
        else:
            raise TimeoutError("chromium did not open its DevTools port in 30 s")
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20) as ws:
                yield Cdp(ws), proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


async def _feed(hub: PreviewHub, metrics: Metrics, sources: list[str]) -> None:
    """Synthetic 'processed frames': a moving box per source, with its mask and detection."""
    n = 0
    while True:
        for k, source in enumerate(sources):
            x = 20 + (n * 7) % 200
            image = np.full((240, 320, 3), 40 + 60 * k, np.uint8)
            cv2.rectangle(image, (x, 60), (x + 80, 180), (200, 200, 200), -1)
            metrics.frame_received(source)
            metrics.frames_processed(source)
            metrics.e2e_latency(source, 0.05)
            if hub.wants(source):
                dets = make_detections((240, 320), [(x, 60, x + 80, 180)], [k])
                hub.offer(source, image, dets, ["bolt", "nut"], latency_s=0.05)
            else:
                hub.offer(source, image, None, [], latency_s=0.05)
        n += 1
        await asyncio.sleep(0.04)


async def _wait_for(cdp: Cdp, expression: str, within_s: float = 20.0) -> Any:
    return await wait_until(
        lambda: cdp.evaluate(expression), f"the page to satisfy {expression}", timeout=within_s
    )


# every tile shows a frame rate and a latency from a stats message
STATS_SHOWN = """[...document.querySelectorAll('.tile')].every(t => /\\nfps \\d/.test(t.innerText)
  && /\\nlatency 50 ms\\n/.test(t.innerText))"""

TILE_STATE = """JSON.stringify([...document.querySelectorAll('.tile')].map(t => ({
  source: t.dataset.source, frames: Number(t.dataset.frames), seq: Number(t.dataset.seq),
  width: t.querySelector('img').naturalWidth, height: t.querySelector('img').naturalHeight,
  text: t.innerText})))"""


async def test_preview_page_shows_a_live_tile_per_source(serve: ServeFactory, tmp_path: Path) -> None:
    sources = ["cam1", "cam2"]
    metrics = Metrics("line-3", sources=sources)
    health = HealthState()
    hub = PreviewHub(max_fps=10.0, max_width=320)
    hub.set_sources(sources)
    metrics.frame_dropped("cam2", "decode_error", 3)
    metrics.frame_skipped("cam2", "stale", 4)
    async with serve(metrics, health, hub) as s:
        feeder = asyncio.create_task(_feed(hub, metrics, sources), name="test.feeder")
        try:
            assert not hub.wants("cam1")  # nobody watching yet
            async with chromium(tmp_path / "profile") as (cdp, _proc):
                await cdp.call("Page.enable")
                await cdp.call("Page.navigate", url=s.base + "/")
                await _wait_for(cdp, "document.querySelectorAll('.tile').length === 2")
                await _wait_for(
                    cdp,
                    "[...document.querySelectorAll('.tile')].every(t => Number(t.dataset.frames) >= 2"
                    " && t.querySelector('img').naturalWidth > 0)",
                )
                assert hub.viewers == 1 and hub.wants("cam1")
                before = {t["source"]: t for t in json.loads(await cdp.evaluate(TILE_STATE))}
                # the images keep updating: poll until every tile shows newer frames than before (no
                # fixed sleep, whatever the machine's speed), with the stats of a later stats message
                newer = " && ".join(
                    f"Number(document.querySelector('.tile[data-source=\"{source}\"]').dataset.seq) > "
                    f"{before[source]['seq']}"
                    for source in sources
                )
                await _wait_for(cdp, newer)
                await _wait_for(cdp, STATS_SHOWN)
                after = {t["source"]: t for t in json.loads(await cdp.evaluate(TILE_STATE))}
                assert sorted(after) == sources
                for source in sources:
                    assert after[source]["frames"] > before[source]["frames"], source  # the image updates
                    assert after[source]["seq"] > before[source]["seq"], source
                    assert (after[source]["width"], after[source]["height"]) == (320, 240)
                    stats = dict(line.split(" ", 1) for line in after[source]["text"].splitlines()[1:])
                    assert float(stats["fps"]) > 0 and stats["latency"] == "50 ms", stats
                    assert int(stats["processed"]) > 0 and stats["detections"] == "1", stats
                cam1, cam2 = after["cam1"]["text"], after["cam2"]["text"]
                assert "\ndropped 3\n" in cam2 and "\nskipped 4\n" in cam2
                assert "\ndropped 0\n" in cam1 and "\nskipped 0\n" in cam1
                shot = await cdp.call("Page.captureScreenshot", format="png")
                png = tmp_path / "preview.png"
                png.write_bytes(base64.b64decode(shot["data"]))
                image = cv2.imread(str(png))
                assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
            # the browser is gone: the page's WebSocket closes and the hub stops keeping frames
            await wait_until(lambda: hub.viewers == 0, "the page's WebSocket to close")
            assert not hub.wants("cam1")
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            hub.close()
