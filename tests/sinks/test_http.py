"""HttpSink against a real aiohttp server on 127.0.0.1: bodies and headers, auth from env/file (never
logged), retries and rejections, an outage (nothing lost within the outbox bound, overflow counted in
the Prometheus metrics), TLS, shutdown."""

from __future__ import annotations

import logging
import ssl
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.integration.helpers import metric_value, parse_metrics
from tests.support.waiting import wait_until
from tests.support.webhook import WebhookServer, self_signed_certificate
from worker.errors import SinkError
from worker.messages import ErrorReport, FrameResult
from worker.ops.metrics import Metrics
from worker.sinks import HttpSink, HttpSinkConfig
from worker.telemetry import RecordingTelemetry

TOKEN = "s3cret-t0ken-value"


def result(source: str, n: int) -> FrameResult:
    return FrameResult(
        "line-3",
        source,
        n,
        f"{source}:{n}",
        1_700_000_000.0 + n,
        "seg",
        f"inf-{n}",
        "factory-parts/1",
        {
            "predictions": {"image": {"width": 4, "height": 4}, "predictions": []},
            "model_id": "factory-parts/1",
        },
    )


def config(url: str, **overrides: Any) -> HttpSinkConfig:
    return HttpSinkConfig.model_validate(
        {"url": f"{url}/results", "retry_min_s": 0.02, "retry_max_s": 0.2, "timeout_s": 5, **overrides}
    )


def frame_ids(server: WebhookServer, kind: str = "result") -> list[str]:
    return [r.json()["frame_id"] for r in server.accepted(kind)]


@pytest.fixture
async def server() -> Any:
    webhook = WebhookServer()
    await webhook.start()
    yield webhook
    await webhook.stop()
    assert not webhook.invalid, webhook.invalid


async def test_results_and_errors_are_posted_as_their_json_with_auth_from_the_environment(
    server: WebhookServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("WEBHOOK_TOKEN", TOKEN)
    telemetry = RecordingTelemetry()
    cfg = config(server.url, error_url=f"{server.url}/errors", auth={"token_env": "WEBHOOK_TOKEN"})
    sent = [result("cam1", 0), result("cam2", 1)]
    report = ErrorReport("line-3", "cam1", "decode_error", "bad JPEG", "cam1:2", 2)
    async with HttpSink(cfg, pipeline="line-3", telemetry=telemetry) as sink:
        for message in sent:
            await sink.publish_result(message)
        await sink.publish_error(report)
        await wait_until(lambda: len(server.requests) == 3, what="three POSTs")
    assert sorted(r.body for r in server.accepted("result")) == sorted(m.to_json() for m in sent)
    (error,) = server.accepted("error")
    assert error.path == "/errors" and error.body == report.to_json()
    for request in server.requests:
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        assert request.headers["Content-Type"] == "application/json"
        assert len(request.headers["Idempotency-Key"]) == 32
    assert len({r.headers["Idempotency-Key"] for r in server.requests}) == 3
    assert telemetry.published_count == {"result": 2, "error": 1}
    assert TOKEN not in caplog.text


async def test_auth_from_a_file_with_another_header(server: WebhookServer, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    cfg = config(server.url, auth={"token_file": str(secret), "header": "X-Api-Key", "scheme": None})
    async with HttpSink(cfg, pipeline="p") as sink:
        await sink.publish_result(result("cam1", 0))
        await wait_until(lambda: len(server.accepted()) == 1, what="the POST")
    assert (
        server.requests[0].headers["X-Api-Key"] == TOKEN and "Authorization" not in server.requests[0].headers
    )


async def test_retryable_answers_are_retried_and_other_4xx_are_dropped_and_counted(
    server: WebhookServer, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry = RecordingTelemetry()
    server.answer(503, 2)
    server.answer(429, 1, headers={"Retry-After": "0"})
    async with HttpSink(config(server.url, max_inflight=1), pipeline="p", telemetry=telemetry) as sink:
        await sink.publish_result(result("cam1", 0))
        await wait_until(lambda: frame_ids(server) == ["cam1:0"], what="delivery after three refusals")
        assert [r.status for r in server.requests] == [503, 503, 429, 200]
        assert len({r.headers["Idempotency-Key"] for r in server.requests}) == 1  # one message, retried
        assert telemetry.publish_errors["http_unavailable"] == 1  # one outage
        assert telemetry.reconnects["http:http"] == 3

        server.answer(400, 1)  # this message is refused for good; the next one goes through
        await sink.publish_result(result("cam1", 1))
        await sink.publish_result(result("cam1", 2))
        await wait_until(lambda: frame_ids(server) == ["cam1:0", "cam1:2"], what="the message after a 400")
    assert [r.status for r in server.requests[4:]] == [400, 200]
    assert telemetry.lost == Counter({("cam1", "http_rejected"): 1})
    assert telemetry.publish_errors["http_rejected"] == 1
    assert "answered HTTP 400" in caplog.text


async def test_an_outage_loses_nothing_within_the_outbox_and_counts_the_overflow(
    server: WebhookServer,
) -> None:
    metrics = Metrics("line-3", sources=["cam1"])
    bound = 20
    cfg = config(server.url, outbox_size=bound, max_inflight=4)
    async with HttpSink(cfg, pipeline="line-3", telemetry=metrics) as sink:
        for n in range(5):
            await sink.publish_result(result("cam1", n))
        await wait_until(lambda: len(server.accepted()) == 5, what="the first five")

        await server.stop()  # down: every message waits in the outbox
        for n in range(5, 5 + bound):
            await sink.publish_result(result("cam1", n))
        await wait_until(lambda: not sink.reachable, what="the sink to notice the outage")
        await server.start()  # same port
        await wait_until(
            lambda: len(set(frame_ids(server))) == 5 + bound, timeout=30, what="all after the outage"
        )
        assert sorted(set(frame_ids(server)), key=lambda f: int(f.split(":")[1])) == [
            f"cam1:{n}" for n in range(5 + bound)
        ]

        await server.stop()  # down again, and more than the outbox holds
        first = 5 + bound
        for n in range(first, first + bound + 7):
            await sink.publish_result(result("cam1", n))
        await server.start()
        newest = {f"cam1:{n}" for n in range(first + 7, first + bound + 7)}
        await wait_until(
            lambda: newest <= set(frame_ids(server)), timeout=30, what="the newest after overflow"
        )
        assert await sink.close(10) == 0
    delivered = set(frame_ids(server))
    assert not {f"cam1:{n}" for n in range(first, first + 7)} & delivered  # the 7 oldest were dropped
    samples = parse_metrics(metrics.render()[0].decode())
    overflow = metric_value(samples, "segstream_results_lost_total", source="cam1", reason="outbox_overflow")
    assert overflow == 7
    assert metric_value(samples, "segstream_publish_errors_total", reason="http_unavailable") == 2
    published = metric_value(samples, "segstream_published_messages_total", kind="result")
    assert published == len(delivered) == 5 + bound + bound  # each delivered message counted once


async def test_tls_with_the_servers_certificate_authority(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = WebhookServer(ssl_context=context)
    await server.start()
    try:
        trusted = config(server.url, tls={"ca_certs": str(cert)})
        async with HttpSink(trusted, pipeline="p") as sink:
            await sink.publish_result(result("cam1", 0))
            await wait_until(lambda: frame_ids(server) == ["cam1:0"], what="the POST over TLS")

        telemetry = RecordingTelemetry()  # the system CAs do not know this certificate: never sent
        async with HttpSink(config(server.url), pipeline="p", telemetry=telemetry) as sink:
            await sink.publish_result(result("cam1", 1))
            await wait_until(lambda: telemetry.reconnects["http:http"] >= 2, what="failed TLS handshakes")
            assert len(sink.outbox) == 1
            assert await sink.close(0.5) == 1
        assert telemetry.lost == Counter({("cam1", "shutdown_undelivered"): 1})
        assert frame_ids(server) == ["cam1:0"]
    finally:
        await server.stop()


async def test_close_with_the_server_down_returns_what_was_not_delivered(server: WebhookServer) -> None:
    await server.stop()
    telemetry = RecordingTelemetry()
    sink = HttpSink(config(server.url), pipeline="p", telemetry=telemetry)
    await sink.start()
    for n in range(3):
        await sink.publish_result(result("cam1", n))
    assert await sink.close(0.5) == 3
    assert telemetry.lost == Counter({("cam1", "shutdown_undelivered"): 3})
    with pytest.raises(SinkError, match="closed"):
        await sink.publish_result(result("cam1", 4))


async def test_bad_secrets_fail_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    for auth, why in (
        ({"token_env": "NO_SUCH_TOKEN"}, "empty or not set"),
        ({"token_file": str(tmp_path / "missing")}, "No such file"),
    ):
        sink = HttpSink(config("http://127.0.0.1:9", auth=auth), pipeline="p")
        with pytest.raises(SinkError, match=why):
            await sink.start()
        await sink.close(0.1)


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({"url": "ftp://host/x"}, "http:// or https://"),
        ({"url": "https://user:pw@host/x"}, "credentials do not belong in the URL"),
        ({"url": "http://host/x", "tls": {}}, "tls applies to https://"),
        ({"url": "http://host/x", "auth": {}}, "exactly one of token_env and token_file"),
        ({"url": "http://host/x", "retry_min_s": 5, "retry_max_s": 1}, "retry_min_s must be <="),
        ({"url": "http://host/x", "headers": {}}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_the_problem(doc: dict[str, Any], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        HttpSinkConfig.model_validate(doc)
