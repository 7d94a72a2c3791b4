"""Fixtures of the source tests: RTSP servers, a recording error sink, polling."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.support.rtsp import RtspServer, rtsp_server_available
from worker.frame import Frame
from worker.messages import ErrorReport
from worker.queues import FrameQueue
from worker.sources import Source


@functools.cache
def _rtsp_unavailable() -> str | None:
    return rtsp_server_available()


@pytest.fixture
def rtsp_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., RtspServer]]:
    """Start RTSP servers (each its own process, own port); all are stopped after the test.

    Also sets short FFmpeg probing options so captures open in a fraction of a second
    (``rtsp_transport;tcp`` is appended by the source itself).
    """
    reason = _rtsp_unavailable()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "analyzeduration;300000|probesize;32768")
    servers: list[RtspServer] = []

    def make(**kwargs: object) -> RtspServer:
        server = RtspServer(tmp_path, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


class ErrorSink:
    """Collects the ``ErrorReport``s a source hands to ``on_error``."""

    def __init__(self) -> None:
        self.reports: list[ErrorReport] = []

    def __call__(self, report: ErrorReport) -> None:
        self.reports.append(report)

    def reasons(self) -> list[str]:
        return [r.reason for r in self.reports]


@pytest.fixture
def errors() -> ErrorSink:
    return ErrorSink()


class Consumer:
    """Takes frames out of a queue (optionally slowly) until it is exhausted or cancelled; acknowledges
    each frame it took as the publisher does once the frame's result was delivered (``ack``)."""

    def __init__(self, queue: FrameQueue, delay: float = 0.0) -> None:
        self.queue = queue
        self.delay = delay
        self.frames: list[Frame] = []
        self.max_depth = 0

    async def run(self) -> None:
        while not self.queue.exhausted:
            self.max_depth = max(self.max_depth, len(self.queue))
            frame = self.queue.get_nowait()
            if frame is None:
                self.queue.ready.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.queue.ready.wait(), 0.05)
                continue
            self.frames.append(frame)
            if self.delay:
                await asyncio.sleep(self.delay)
            if frame.ack is not None:
                frame.ack()


@contextlib.asynccontextmanager
async def running(source: Source, queue: FrameQueue, delay: float = 0.0) -> AsyncIterator[Consumer]:
    consumer = Consumer(queue, delay)
    async with asyncio.TaskGroup() as tg:
        src_task = tg.create_task(source.run(queue), name=f"source[{source.source_id}]")
        tg.create_task(consumer.run())
        try:
            yield consumer
        finally:
            await source.stop()
            await asyncio.wait_for(asyncio.shield(src_task), 30)
