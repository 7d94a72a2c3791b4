"""Who may reach what, against the real aiohttp server: the default loopback bind, the preview token
when bound beyond loopback (bound to 0.0.0.0, reached through 127.0.0.1), the WebSocket's Origin, the
Host check that stops DNS rebinding, and the probes that stay open."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.integration.helpers import make_models_dir, pipeline_config, running, write_video
from worker.config import HttpConfig
from worker.errors import ConfigError
from worker.ops.access import COOKIE_NAME, AccessPolicy, is_loopback_host
from worker.ops.health import HealthState
from worker.ops.http import HttpServer, access_policy, build_app
from worker.ops.metrics import Metrics
from worker.ops.preview import PreviewHub
from worker.runtime import Worker

TOKEN = "s3cret-preview-token-0123456789"
PREVIEW_PATHS = ("/", "/api/sources", "/preview/cam1.jpg")
PROBES = ("/metrics", "/healthz", "/readyz")


@asynccontextmanager
async def served(access: AccessPolicy, host: str) -> AsyncIterator[tuple[str, int, PreviewHub]]:
    """The real app with a preview hub, bound to ``host`` on a free port; yields the base URL via
    127.0.0.1, the port and the hub."""
    hub = PreviewHub()
    hub.set_sources(["cam1"])
    try:
        async with HttpServer(
            build_app(Metrics("p", sources=["cam1"]), HealthState(), hub, access), host, 0
        ) as s:
            yield f"http://127.0.0.1:{s.port}", s.port, hub
    finally:
        hub.close()


async def _status(session: aiohttp.ClientSession, url: str, **kwargs: object) -> int:
    async with session.get(url, allow_redirects=False, **kwargs) as resp:  # type: ignore[arg-type]
        return resp.status


async def _ws_status(session: aiohttp.ClientSession, url: str, **kwargs: object) -> int:
    """101 when the upgrade is accepted (and the first stats message arrives), else the HTTP status."""
    try:
        ws = await session.ws_connect(url, **kwargs)  # type: ignore[arg-type]
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    try:
        first = await ws.receive_json(timeout=10)
        assert first["type"] == "stats"
        return 101
    finally:
        await ws.close()


# -- the default bind ---------------------------------------------------------------------------------


async def test_the_default_bind_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGSTREAM_HTTP_HOST", raising=False)
    config = HttpConfig()
    assert config.host == "127.0.0.1" and access_policy(config).loopback
    server = HttpServer(build_app(Metrics("p"), HealthState()), port=0)
    async with server:
        assert server.host == "127.0.0.1"
        assert {addr[0] for addr in server._runner.addresses} == {"127.0.0.1"}
    monkeypatch.setenv("SEGSTREAM_HTTP_HOST", "0.0.0.0")  # what the container image sets
    assert HttpConfig().host == "0.0.0.0" and HttpConfig(host="127.0.0.1").host == "127.0.0.1"


def test_an_open_app_cannot_be_bound_beyond_loopback() -> None:
    app = build_app(Metrics("p"), HealthState(), PreviewHub())  # default policy: loopback, no token
    with pytest.raises(ValueError, match=r"refusing to serve on '0\.0\.0\.0'"):
        HttpServer(app, "0.0.0.0", 0)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        *[("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True), ("localhost", True)],
        *[("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.7", False), ("cam.example", False)],
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


# -- beyond loopback: the token -------------------------------------------------------------------------


async def test_without_a_token_the_preview_is_refused_beyond_loopback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with (
        served(AccessPolicy("0.0.0.0"), "0.0.0.0") as (base, _, hub),
        aiohttp.ClientSession() as session,
    ):
        for path in PREVIEW_PATHS:
            assert await _status(session, base + path) == 403, path
        assert await _ws_status(session, base + "/preview/ws") == 403
        assert await _status(session, base + "/?token=" + TOKEN) == 401  # no token to match
        for path in PROBES:  # probes and scrapers are not affected
            assert await _status(session, base + path) in (200, 503), path
        async with session.get(base + "/") as resp:
            assert "preview_token" in await resp.text()  # says what to configure
        assert hub.viewers == 0 and not hub.wants("cam1")  # nothing was watched
    assert "no preview token is set" in caplog.text


async def test_the_token_as_bearer_or_once_as_a_query_that_sets_a_cookie(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    access = AccessPolicy("0.0.0.0", token=TOKEN)
    async with served(access, "0.0.0.0") as (base, port, _):
        async with aiohttp.ClientSession() as anonymous:
            for path in PREVIEW_PATHS:
                assert await _status(anonymous, base + path) == 401, path
            wrong = {"Authorization": "Bearer " + TOKEN[:-1] + "x"}
            assert await _status(anonymous, base + "/api/sources", headers=wrong) == 401
            assert await _status(anonymous, base + "/?token=nope") == 401
            assert await _ws_status(anonymous, base + "/preview/ws") == 401
            bearer = {"Authorization": "Bearer " + TOKEN}
            assert await _status(anonymous, base + "/api/sources", headers=bearer) == 200
            assert await _status(anonymous, base + "/", headers=bearer) == 200
            assert await _ws_status(anonymous, base + "/preview/ws", headers=bearer) == 101
            for path in PROBES:
                assert await _status(anonymous, base + path) in (200, 503), path

        # a browser: /?token=... once, then the cookie carries it (also on the WebSocket)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            async with browser.get(base + "/?token=" + TOKEN, allow_redirects=False) as resp:
                assert resp.status == 303 and resp.headers["Location"] == "/"
                cookie = resp.cookies[COOKIE_NAME]
                assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
                assert TOKEN not in cookie.value and len(cookie.value) == 64
            assert await _status(browser, base + "/") == 200
            assert await _status(browser, base + "/api/sources") == 200
            same_origin = f"http://127.0.0.1:{port}"
            assert await _ws_status(browser, base + "/preview/ws", origin=same_origin) == 101

        # a forged cookie does not pass
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as forger:
            forger.cookie_jar.update_cookies({COOKIE_NAME: "0" * 64})
            assert await _status(forger, base + "/api/sources") == 401
    assert TOKEN not in caplog.text


async def test_probes_can_be_put_behind_the_token() -> None:
    access = AccessPolicy("0.0.0.0", token=TOKEN, open_probes=False)
    async with served(access, "0.0.0.0") as (base, _, _), aiohttp.ClientSession() as session:
        for path in PROBES:
            assert await _status(session, base + path) == 401, path
            bearer = {"Authorization": "Bearer " + TOKEN}
            assert await _status(session, base + path, headers=bearer) in (200, 503), path


# -- the WebSocket's Origin -----------------------------------------------------------------------------


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
async def test_the_websocket_refuses_a_foreign_origin(bind: str) -> None:
    token = TOKEN if bind == "0.0.0.0" else None
    access = AccessPolicy(bind, token=token, allowed_origins=["https://ops.example.com"])
    headers = {"Authorization": "Bearer " + TOKEN} if token else {}
    async with served(access, bind) as (base, port, hub), aiohttp.ClientSession() as session:
        url = base + "/preview/ws"
        for foreign in ("http://evil.example", f"http://evil.example:{port}", "null", "http://127.0.0.1:1"):
            assert await _ws_status(session, url, origin=foreign, headers=headers) == 403, foreign
        assert hub.viewers == 0
        assert await _ws_status(session, url, origin=f"http://127.0.0.1:{port}", headers=headers) == 101
        assert await _ws_status(session, url, origin="https://ops.example.com", headers=headers) == 101
        assert await _ws_status(session, url, headers=headers) == 101  # not a browser: no Origin


async def test_loopback_without_a_token_refuses_foreign_host_names() -> None:
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends its own Host."""
    async with served(AccessPolicy(), "127.0.0.1") as (base, port, _), aiohttp.ClientSession() as session:
        for path in PREVIEW_PATHS[:2]:
            assert await _status(session, base + path, headers={"Host": f"evil.example:{port}"}) == 403
            assert await _status(session, base + path, headers={"Host": f"localhost:{port}"}) == 200
            assert await _status(session, base + path) == 200
        assert await _status(session, base + "/?token=anything") == 200  # no token asked, none checked
        rebound = {"Host": f"evil.example:{port}"}
        assert (
            await _ws_status(
                session, base + "/preview/ws", origin=f"http://evil.example:{port}", headers=rebound
            )
            == 403
        )
        assert await _status(session, base + "/metrics", headers=rebound) == 200  # probes stay open


# -- configuration ---------------------------------------------------------------------------------------


def test_the_token_comes_from_the_file_else_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SEGSTREAM_PREVIEW_TOKEN", raising=False)
    assert HttpConfig().resolved_preview_token() is None
    monkeypatch.setenv("SEGSTREAM_PREVIEW_TOKEN", TOKEN)
    assert HttpConfig().resolved_preview_token() == TOKEN
    assert access_policy(HttpConfig(host="127.0.0.1")).token_required  # a token set is always asked
    monkeypatch.setenv("OTHER_TOKEN", "x" * 20)
    assert HttpConfig(preview_token_env="OTHER_TOKEN").resolved_preview_token() == "x" * 20
    secret = tmp_path / "token"
    secret.write_text("from-the-file-0123456789\n")
    assert HttpConfig(preview_token_file=secret).resolved_preview_token() == "from-the-file-0123456789"
    monkeypatch.setenv("SEGSTREAM_PREVIEW_TOKEN", "short")
    with pytest.raises(ConfigError, match="at least 16 characters") as info:
        HttpConfig().resolved_preview_token()
    assert "short" not in str(info.value)  # the secret is not echoed
    with pytest.raises(ConfigError, match="preview_token_file"):
        HttpConfig(preview_token_file=tmp_path / "missing").resolved_preview_token()


def test_allowed_origins_are_checked() -> None:
    assert HttpConfig(allowed_origins=["https://ops.example.com:8443"]).allowed_origins
    for bad in ("ops.example.com", "https://ops.example.com/path", "ftp://x"):
        with pytest.raises(ValueError, match="not an origin"):
            HttpConfig(allowed_origins=[bad])
    with pytest.raises(ValueError, match="at least 16"):
        AccessPolicy("0.0.0.0", token="short")


# -- the worker wires it -------------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_worker_bound_beyond_loopback_guards_its_preview(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEGSTREAM_PREVIEW_TOKEN", TOKEN)
    config = pipeline_config(
        "guarded",
        sources=[
            {"type": "video", "id": "cam1", "url": str(write_video(tmp_path / "a.avi", 8)), "loop": True}
        ],
        sinks=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}],
        models_dir=make_models_dir(tmp_path / "models"),
        http={"host": "0.0.0.0", "port": 0, "preview": True},
    )
    worker = await Worker.create(config)
    async with running(worker), aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{worker.http_port}"
        assert await _status(session, base + "/readyz") == 200  # probes stay open
        assert await _status(session, base + "/api/sources") == 401
        assert await _status(session, base + "/", headers={"Authorization": "Bearer " + TOKEN}) == 200
        url, bearer = base + "/preview/ws", {"Authorization": "Bearer " + TOKEN}
        assert await _ws_status(session, url, origin="http://evil.example", headers=bearer) == 403
        assert await _ws_status(session, url, headers=bearer) == 101
