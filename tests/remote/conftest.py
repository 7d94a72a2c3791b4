"""Fixtures of the remote-backend tests: a real aiohttp server of the test's own, and real Triton."""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.mosquitto import free_port
from tests.support.servers import (
    KSERVE_PYTHON_ENV,
    ROBOFLOW_PYTHON_ENV,
    ServerProcess,
    kserve_python,
    roboflow_python,
    start_kserve,
    start_roboflow,
)
from worker.models.registry import BUNDLED_MODELS_DIR

DEMO = BUNDLED_MODELS_DIR / "factory-parts" / "1"


class ThreadedApp:
    """An aiohttp application served on 127.0.0.1 from its own thread and loop (the client blocks)."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"
        self._ssl = ssl_context
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner = web.AppRunner(app)

    def __enter__(self) -> ThreadedApp:
        self._thread.start()

        async def start() -> None:
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl).start()

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the server's loop (to set its asyncio events)."""
        self.loop.call_soon_threadsafe(fn)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _need_kserve() -> None:
    if kserve_python() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install the PyTriton environment (scripts/install-remote-servers.sh)")
        pytest.skip(f"PyTriton not installed: scripts/install-remote-servers.sh or ${KSERVE_PYTHON_ENV}")


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Triton serving the bundled demo model as ``factory-parts`` (one per test module)."""
    _need_kserve()
    server = start_kserve(tmp_path_factory.mktemp("triton"), model=DEMO, name="factory-parts")
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def fresh_triton(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start Triton servers of the test's own (killed at the end)."""
    _need_kserve()
    started: list[ServerProcess] = []

    def start(**kwargs: object) -> ServerProcess:
        server = start_kserve(tmp_path, model=DEMO, name="factory-parts", **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def _need_roboflow() -> None:
    if roboflow_python() is None:
        if os.environ.get("SEGSTREAM_REQUIRE_ROBOFLOW"):  # make test warns, not fails, if it cannot install
            pytest.fail("inference-cpu is required: scripts/install-remote-servers.sh roboflow")
        pytest.skip(
            "inference-cpu not installed: scripts/install-remote-servers.sh roboflow, "
            f"or set ${ROBOFLOW_PYTHON_ENV}"
        )


@pytest.fixture(scope="module")
def roboflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The Roboflow inference server serving the bundled demo model as ``factory-parts/1``."""
    _need_roboflow()
    server = start_roboflow(tmp_path_factory.mktemp("roboflow"), model=DEMO, model_id="factory-parts/1")
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def fresh_roboflow(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start Roboflow inference servers of the test's own (killed at the end)."""
    _need_roboflow()
    started: list[ServerProcess] = []

    def start(**kwargs: object) -> ServerProcess:
        server = start_roboflow(tmp_path, model=DEMO, model_id="factory-parts/1", **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
