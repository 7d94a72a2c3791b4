"""Fixtures of the source tests: RTSP servers, a recording error sink, polling."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.rtsp import RtspServer, rtsp_server_available
from worker.messages import ErrorReport


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


async def wait_for(condition: Callable[[], bool], within_s: float = 20.0, what: str = "condition") -> None:
    """Poll ``condition`` until it is true; fail after ``within_s`` seconds (generous: loaded CI)."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.02)
