"""The remote client against a real aiohttp server of the test's own: retries, timeout, breaker, key.

The server's behaviour is scripted per test (status codes, a handler that never answers in time),
but it is a real HTTP server on loopback: the client's sockets, pool, timeouts and headers are real.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from tests.remote.conftest import ThreadedApp
from tests.support.mosquitto import free_port
from worker.errors import ConfigError
from worker.models.remote.client import (
    RemoteClient,
    RemoteError,
    RemoteTimeoutError,
    ServerUnavailableError,
    redact_url,
)
from worker.models.remote.config import RemoteModelConfig


def _config(url: str, **fields: object) -> RemoteModelConfig:
    values: dict[str, object] = {
        "backend": "remote",
        "protocol": "kserve_v2",
        "url": url,
        "retry_backoff_s": (0.01, 0.02),
        "probe_interval_s": (0.01, 0.05),
    }
    return RemoteModelConfig.model_validate(values | fields)


def _client(config: RemoteModelConfig) -> RemoteClient:
    return RemoteClient(config, health_path="/v2/health/ready", rng=random.Random(0))


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_503_is_retried_with_backoff_then_succeeds() -> None:
    statuses = [503, 503, 200]
    seen: list[int] = []

    async def infer(request: web.Request) -> web.Response:
        seen.append(len(await request.read()))
        return web.Response(status=statuses[len(seen) - 1], body=b"ok")

    app = web.Application()
    app.router.add_post("/infer", infer)
    with ThreadedApp(app) as server:
        client = _client(_config(server.url, retries=2))
        registry = CollectorRegistry()
        client.use_metrics(registry)
        try:
            response = client.request("POST", "/infer", body=b"x" * 100)
        finally:
            client.close()
    assert response.status == 200 and response.body == b"ok"
    assert seen == [100, 100, 100]
    server_label = redact_url(server.url)
    assert _sample(registry, "segstream_remote_errors_total", server=server_label, kind="http_503") == 2
    assert _sample(registry, "segstream_remote_sent_bytes_total", server=server_label) == 300
    assert _sample(registry, "segstream_remote_request_seconds_count", server=server_label) == 1
    assert _sample(registry, "segstream_remote_requests_in_flight", server=server_label) == 0


def test_a_4xx_is_not_retried_and_names_the_status() -> None:
    calls: list[int] = []

    async def infer(request: web.Request) -> web.Response:
        calls.append(1)
        return web.Response(status=400, text="bad input shape")

    app = web.Application()
    app.router.add_post("/infer", infer)
    with ThreadedApp(app) as server:
        client = _client(_config(server.url, retries=3, breaker_failures=1))
        try:
            with pytest.raises(RemoteError, match="HTTP 400: bad input shape") as info:
                client.request("POST", "/infer", body=b"x")
            assert client.available  # the server answered: it is there, the breaker stays closed
        finally:
            client.close()
    assert not isinstance(info.value, ServerUnavailableError)
    assert calls == [1]


def test_a_timeout_is_not_retried_opens_the_breaker_and_the_probe_closes_it() -> None:
    release = asyncio.Event()
    infer_calls: list[int] = []
    healthy = {"ready": False}

    async def infer(request: web.Request) -> web.Response:
        infer_calls.append(1)
        await release.wait()  # never answers within the client's timeout
        return web.Response(body=b"late")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200 if healthy["ready"] else 503)

    app = web.Application()
    app.router.add_post("/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    with ThreadedApp(app) as server:
        client = _client(_config(server.url, timeout_s=0.2, retries=3, breaker_failures=1))
        states: list[bool] = []
        client.add_listener(states.append)
        try:
            with pytest.raises(RemoteTimeoutError, match=r"no answer within 0\.2 s"):
                client.request("POST", "/infer", body=b"x")
            assert infer_calls == [1]  # not retried
            assert not client.available
            with pytest.raises(ServerUnavailableError, match="circuit breaker open"):
                client.request("POST", "/infer", body=b"x")
            assert infer_calls == [1]  # nothing sent while open
            assert not client.wait_available(0.05)
            healthy["ready"] = True
            assert client.wait_available(30.0)
            assert states == [True, False, True]
        finally:
            server.call(release.set)
            client.close()


def test_a_closed_port_is_server_unavailable_after_the_retries() -> None:
    client = _client(_config(f"http://127.0.0.1:{free_port()}", retries=2, breaker_failures=5))
    registry = CollectorRegistry()
    client.use_metrics(registry)
    try:
        with pytest.raises(ServerUnavailableError, match="ClientConnectorError"):
            client.request("GET", "/v2/health/ready")
        assert client.available  # one failed call of five
    finally:
        client.close()
    assert _sample(registry, "segstream_remote_errors_total", server=client.server, kind="connection") == 3


def test_the_api_key_is_sent_as_a_bearer_token_and_never_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    secret = "sk-remote-0123456789"
    monkeypatch.setenv("RACK_KEY", secret)
    seen: list[str] = []

    async def infer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.Response(status=401, text=f"who is {secret}?")  # a server that echoes the key

    app = web.Application()
    app.router.add_post("/infer", infer)
    caplog.set_level(logging.DEBUG)
    with ThreadedApp(app) as server:
        config = _config(server.url, api_key_env="RACK_KEY")
        client = _client(config)
        try:
            with pytest.raises(RemoteError) as info:
                client.request("POST", "/infer", body=b"x")
        finally:
            client.close()
    assert seen == [f"Bearer {secret}"]
    assert secret not in str(info.value) and "who is ***?" in str(info.value)
    assert secret not in caplog.text
    assert secret not in repr(config) and secret not in config.model_dump_json()
    key_file = tmp_path / "key"
    key_file.write_text(f"{secret}\n")
    config = _config("http://127.0.0.1:1", api_key_file=key_file)
    key = config.api_key()
    assert key is not None and key.get_secret_value() == secret and secret not in repr(key)


def test_key_and_tls_settings_are_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$NOT_SET_KEY is not set"):
        _config("http://h:1", api_key_env="NOT_SET_KEY").api_key()
    with pytest.raises(ConfigError, match="cannot read"):
        _config("http://h:1", api_key_file=tmp_path / "missing").api_key()
    with pytest.raises(ValueError, match="not both"):
        _config("http://h:1", api_key_env="A", api_key_file=tmp_path / "k")
    with pytest.raises(ValueError, match="https"):
        _config("http://h:1", tls={"verify": False})
    with pytest.raises(ValueError, match="go together"):
        _config("https://h:1", tls={"cert_file": tmp_path / "c"})
    with pytest.raises(ValueError, match="url"):
        _config("ftp://h:1")
    assert redact_url("https://user:pw@rack:8000/base?key=s") == "https://rack:8000/base"
