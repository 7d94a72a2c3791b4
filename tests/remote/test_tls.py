"""``model.tls`` against a real TLS server: an aiohttp HTTPS reverse proxy in front of real Triton.

The certificates are made by the test with the ``openssl`` CLI: a CA, a server certificate for
127.0.0.1 signed by it, one for another host name, and a client certificate (mutual TLS). The
backend checks the model's metadata at start-up, so a TLS failure is a ``ModelError`` there.
"""

from __future__ import annotations

import io
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from tests.remote.conftest import DEMO, ThreadedApp
from tests.support.servers import ServerProcess
from worker.errors import ModelError
from worker.models.config import RemoteModelConfig
from worker.models.evaluation import iter_frames
from worker.models.remote.kserve import KServeV2Backend

CLIP = Path(__file__).resolve().parents[2] / "worker" / "assets" / "demo_clip.mp4"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(name: str, san: str, ca: Path, cwd: Path, client: bool = False) -> tuple[Path, Path]:
    key, csr, cert, ext = (cwd / f"{name}{s}" for s in (".key", ".csr", ".pem", ".ext"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-subj", f"/CN={name}",
             "-out", str(csr), cwd=cwd)  # fmt: skip
    usage = "clientAuth" if client else "serverAuth"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key")),
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert),
             cwd=cwd)  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out",
                 f"{ca}.pem", "-days", "2", "-subj", f"/CN=segstream test {ca}", cwd=d)  # fmt: skip
    server, server_key = _signed("server", "IP:127.0.0.1", d / "ca.pem", d)
    wrong, wrong_key = _signed("wrong", "DNS:other.example", d / "ca.pem", d)
    client, client_key = _signed("client", "DNS:worker", d / "ca.pem", d, client=True)
    return {
        "ca": d / "ca.pem",
        "other_ca": d / "other-ca.pem",
        "server": server,
        "server_key": server_key,
        "wrong": wrong,
        "wrong_key": wrong_key,
        "client": client,
        "client_key": client_key,
    }


SESSION = web.AppKey("session", aiohttp.ClientSession)


def _proxy_app(upstream: str) -> web.Application:
    """Forward every request to ``upstream`` (Triton's plain HTTP port) and its answer back."""

    async def forward(request: web.Request) -> web.Response:
        session: aiohttp.ClientSession = request.app[SESSION]
        body = await request.read()
        hop = ("host", "content-length", "transfer-encoding", "connection")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        async with session.request(
            request.method,
            upstream + request.path_qs,
            data=io.BytesIO(body) if body else None,
            headers=headers,
        ) as answer:
            payload = await answer.read()
            keep = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length",
                    "transfer-encoding", "content-encoding", "connection")}  # fmt: skip
            return web.Response(status=answer.status, body=payload, headers=keep)

    async def session_context(app: web.Application) -> Any:
        app[SESSION] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app[SESSION].close()

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.cleanup_ctx.append(session_context)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def _server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(client_ca))
    return context


@pytest.fixture
def proxy(triton: ServerProcess, pki: dict[str, Path]) -> Iterator[ThreadedApp]:
    with ThreadedApp(_proxy_app(triton.url), _server_context(pki["server"], pki["server_key"])) as app:
        yield app


def _config(url: str, **tls: Any) -> RemoteModelConfig:
    values: dict[str, Any] = {
        "backend": "remote",
        "protocol": "kserve_v2",
        "url": url,
        "retries": 0,
        "breaker_failures": 5,
        "timeout_s": 30,
    }
    if tls:
        values["tls"] = tls
    return RemoteModelConfig.model_validate(values)


def _image() -> np.ndarray:
    return next(iter(iter_frames(CLIP, every=1, limit=1)))


def test_the_client_with_the_ca_file_runs_the_model_through_the_tls_proxy(
    proxy: ThreadedApp, triton: ServerProcess, pki: dict[str, Path]
) -> None:
    backend = KServeV2Backend(DEMO, "factory-parts/1", _config(proxy.url, ca_file=pki["ca"]))
    plain = KServeV2Backend(DEMO, "factory-parts/1", _config(triton.url))
    try:
        (raw,) = backend.infer([_image()])
        (direct,) = plain.infer([_image()])
        np.testing.assert_array_equal(raw.predictions, direct.predictions)  # the same answer over TLS
    finally:
        backend.close()
        plain.close()


@pytest.mark.parametrize("tls", [None, "other_ca"])
def test_a_server_certificate_the_client_does_not_trust_fails_clearly_at_start_up(
    proxy: ThreadedApp, pki: dict[str, Path], tls: str | None
) -> None:
    config = _config(proxy.url) if tls is None else _config(proxy.url, ca_file=pki[tls])
    with pytest.raises(ModelError, match=r"TLS failed: .*certificate verify failed"):
        KServeV2Backend(DEMO, "factory-parts/1", config)


def test_a_certificate_for_another_host_name_fails_clearly_at_start_up(
    triton: ServerProcess, pki: dict[str, Path]
) -> None:
    context = _server_context(pki["wrong"], pki["wrong_key"])
    with (
        ThreadedApp(_proxy_app(triton.url), context) as app,
        pytest.raises(ModelError, match=r"TLS failed: .*(IP address mismatch|hostname)"),
    ):
        KServeV2Backend(DEMO, "factory-parts/1", _config(app.url, ca_file=pki["ca"]))


def test_mutual_tls_needs_the_client_certificate(triton: ServerProcess, pki: dict[str, Path]) -> None:
    context = _server_context(pki["server"], pki["server_key"], client_ca=pki["ca"])
    with ThreadedApp(_proxy_app(triton.url), context) as app:
        with pytest.raises(ModelError, match=r"TLS failed|Server disconnected"):
            KServeV2Backend(DEMO, "factory-parts/1", _config(app.url, ca_file=pki["ca"]))
        config = _config(app.url, ca_file=pki["ca"], cert_file=pki["client"], key_file=pki["client_key"])
        backend = KServeV2Backend(DEMO, "factory-parts/1", config)
        try:
            assert len(backend.infer([_image()])) == 1
        finally:
            backend.close()
