"""Fixtures for the operations tests: a real aiohttp server on a free 127.0.0.1 port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import aiohttp
import numpy as np
import pytest

from worker.ops.health import HealthState
from worker.ops.http import HttpServer, build_app
from worker.ops.metrics import Metrics
from worker.ops.preview import PreviewHub
from worker.step.detections import Detections, MaskCrops


def make_detections(
    frame_shape: tuple[int, int], boxes: list[tuple[int, int, int, int]], cls: list[int]
) -> Detections:
    """Detections whose masks are the inner half (in each direction) of each box."""
    crops, offsets = [], []
    for x1, y1, x2, y2 in boxes:
        crop = np.zeros((y2 - y1, x2 - x1), bool)
        h, w = crop.shape
        crop[h // 4 : h - h // 4, w // 4 : w - w // 4] = True
        crops.append(crop)
        offsets.append((x1, y1))
    return Detections(
        xyxy=np.array(boxes, np.float32).reshape(-1, 4),
        confidence=np.linspace(0.9, 0.5, len(boxes)).astype(np.float32),
        class_id=np.array(cls, np.int64),
        masks=MaskCrops(crops, np.array(offsets).reshape(-1, 2)),
        frame_shape=frame_shape,
    )


class ManualClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Served:
    """A running server and a client session pointed at it."""

    def __init__(self, server: HttpServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.base = f"http://127.0.0.1:{server.port}"

    async def get(self, path: str, **kwargs: object) -> tuple[int, bytes, aiohttp.typedefs.LooseHeaders]:
        async with self.session.get(self.base + path, **kwargs) as resp:  # type: ignore[arg-type]
            return resp.status, await resp.read(), resp.headers

    async def get_json(self, path: str) -> tuple[int, dict[str, object]]:
        async with self.session.get(self.base + path) as resp:
            return resp.status, await resp.json()


ServeFactory = Callable[..., AbstractAsyncContextManager[Served]]


@pytest.fixture
def serve() -> ServeFactory:
    """``async with serve(metrics, health, preview) as s:`` — the real app on 127.0.0.1, port 0."""

    @asynccontextmanager
    async def _serve(
        metrics: Metrics, health: HealthState, preview: PreviewHub | None = None
    ) -> AsyncIterator[Served]:
        async with (
            HttpServer(build_app(metrics, health, preview), "127.0.0.1", 0) as server,
            aiohttp.ClientSession() as session,
        ):
            yield Served(server, session)

    return _serve
