"""A real aiohttp webhook server on 127.0.0.1 for the HTTP sink's tests: records every request, can
answer chosen statuses, stop (an outage) and start again on the same port, optionally over TLS."""

from __future__ import annotations

import json
import ssl
import subprocess
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support.messages import validate_message

__all__ = ["Request", "WebhookServer", "self_signed_certificate"]


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the server answered

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookServer:
    """Collects POSTs; answers 200 unless ``answer(status, ...)`` queued other statuses first.

    Every request body is validated against the schema named by its ``X-Segstream-Kind`` header; one
    that is not valid is answered 400 and listed in ``invalid`` (tests assert it stays empty).
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.requests: list[Request] = []
        self.invalid: list[str] = []
        self.port = 0
        self._answers: deque[tuple[int, dict[str, str]]] = deque()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def answer(self, status: int, count: int = 1, headers: dict[str, str] | None = None) -> None:
        """Answer the next ``count`` requests with ``status`` (and ``headers``)."""
        self._answers.extend([(status, headers or {})] * count)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status, headers = self._answers.popleft() if self._answers else (200, {})
        if status == 200:
            try:
                validate_message(request.headers.get("X-Segstream-Kind", "?"), body)
            except (AssertionError, ValueError) as exc:
                self.invalid.append(str(exc))
                status = 400
        self.requests.append(Request(request.path, dict(request.headers), body, status))
        return web.Response(status=status, headers=headers, text="ok" if status == 200 else "no")

    async def start(self) -> None:
        """Listen (again) on ``port`` (a free one the first time)."""
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Close the listener and every open connection: clients see refused connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def accepted(self, kind: str = "result") -> list[Request]:
        """Requests of ``kind`` answered 200 (their bodies valid), in arrival order."""
        return [r for r in self.requests if r.status == 200 and r.headers.get("X-Segstream-Kind") == kind]


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and localhost) and its key, made with ``openssl``."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key
