"""HTTP sink (webhook): each result and error report is POSTed as JSON, through the bounded outbox.

For plants without an MQTT consumer: ``type: http`` POSTs every message to ``url`` (errors to
``error_url``, default the same URL), with the body exactly the message JSON (``worker/schemas/``) and
these headers::

    Content-Type: application/json
    X-Segstream-Kind: result | error
    Idempotency-Key: <hex digest of the body>     # the same on every retry of one message
    Authorization: Bearer <token>                 # when ``auth`` is set (header and scheme configurable)

Delivery (the same semantics as the MQTT sink): ``publish_result`` / ``publish_error`` only put the
message into the ``Outbox`` and return. One sender task takes the oldest undelivered messages, up to
``max_inflight`` at a time, POSTs them concurrently and removes each one when its response is a 2xx. A
connection error, a timeout, a 408/425/429 or a 5xx keeps the message and backs off (capped
exponential with full jitter, ``retry_min_s`` .. ``retry_max_s``; a ``Retry-After`` in seconds is
honoured up to ``retry_max_s``) before the next round, oldest first: delivery is **at least once** and
a receiver deduplicates with ``Idempotency-Key``. Any other status (4xx, a redirect) will never succeed
for that message: it is dropped, logged once per status code and counted
(``results_lost_total{reason="http_rejected"}``, ``publish_errors_total{reason="http_rejected"}``).

The outbox lives in memory and holds at most ``outbox_size`` messages; when full the oldest is dropped
and counted (``outbox_overflow``). An outage counts ``publish_errors_total{reason="http_unavailable"}``
once and ``reconnects_total{target="http:<name>"}`` per retry round, and logs one line when it starts
and one when it ends. ``close()`` delivers what it can within its timeout and counts the rest as
``shutdown_undelivered``.

Secrets: the auth token comes from an environment variable or a file (``auth.token_env`` /
``auth.token_file``), read at ``start()``, kept as ``SecretStr``, sent only in its header and never
logged; credentials in the URL itself are refused, and logs name the URL without its query string.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from worker import __version__
from worker.errors import SinkError
from worker.messages import ErrorReport, FrameResult
from worker.mqtt import TlsConfig
from worker.retry import Backoff
from worker.sinks.outbox import OutgoingMessage
from worker.sinks.outbox_sink import OutboxSink
from worker.telemetry import NullTelemetry, Telemetry

__all__ = ["HttpAuthConfig", "HttpSink", "HttpSinkConfig"]

log = logging.getLogger(__name__)

_RETRY_STATUSES = frozenset({408, 425, 429})
_HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"  # an RFC 9110 token


class HttpAuthConfig(BaseModel):
    """The auth header of every request; its secret from an environment variable or a file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    header: str = Field("Authorization", pattern=_HEADER_NAME, description="e.g. Authorization, X-Api-Key")
    scheme: str | None = Field(
        "Bearer",
        pattern=r"^[A-Za-z0-9._~+/-]+$",
        description='value "<scheme> <token>"; null: the token alone',
    )
    token_env: str | None = Field(None, description="environment variable holding the token")
    token_file: Path | None = Field(None, description="file holding the token (e.g. /run/secrets/webhook)")

    @model_validator(mode="after")
    def _one_source(self) -> HttpAuthConfig:
        if (self.token_env is None) == (self.token_file is None):
            raise ValueError("auth needs exactly one of token_env and token_file")
        return self

    def header_value(self) -> SecretStr:
        """The header's value.

        Raises:
            ValueError: the variable is unset or empty, or the file is empty.
            OSError: the file cannot be read.
        """
        if self.token_file is not None:
            token = self.token_file.read_text(encoding="utf-8").strip()
            where = f"file {self.token_file}"
        else:
            assert self.token_env is not None
            token = os.environ.get(self.token_env, "").strip()
            where = f"environment variable {self.token_env}"
        if not token:
            raise ValueError(f"the auth token ({where}) is empty or not set")
        if any(c in token for c in "\r\n"):
            raise ValueError(f"the auth token ({where}) spans several lines")
        return SecretStr(f"{self.scheme} {token}" if self.scheme else token)


def _check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {value!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not belong in the URL: use auth (token_env / token_file)")
    if parts.fragment:
        raise ValueError("a URL fragment (#...) is never sent; remove it")
    return value


def describe_url(url: str) -> str:
    """``scheme://host:port/path`` for logs: no query string (it may carry a token)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


class HttpSinkConfig(BaseModel):
    """``type: http``: POST each result (and error report) as JSON to a webhook."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["http"] = "http"
    name: str = Field("http", pattern=r"^[A-Za-z0-9_.-]+$")
    url: str = Field(description="where results are POSTed (http:// or https://)")
    error_url: str | None = Field(None, description="where error reports are POSTed (default: url)")
    send_errors: bool = Field(True, description="POST error reports too")
    auth: HttpAuthConfig | None = None
    tls: TlsConfig | None = Field(None, description="https: CA bundle, client certificate")
    timeout_s: float = Field(10.0, gt=0, le=300, description="per request, connection included")
    max_inflight: int = Field(4, ge=1, le=256, description="requests at once")
    outbox_size: int = Field(10_000, ge=1, le=10_000_000, description="messages kept while undelivered")
    retry_min_s: float = Field(0.5, gt=0, le=600)
    retry_max_s: float = Field(30.0, gt=0, le=3600)
    max_payload_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=1 << 30)

    @field_validator("url", "error_url")
    @classmethod
    def _check_urls(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value)

    @model_validator(mode="after")
    def _consistent(self) -> HttpSinkConfig:
        if self.retry_min_s > self.retry_max_s:
            raise ValueError("retry_min_s must be <= retry_max_s")
        if self.tls is not None and not any(
            urlsplit(u).scheme == "https" for u in (self.url, self.error_url) if u
        ):
            raise ValueError("tls applies to https:// URLs; url and error_url are http://")
        return self


class _Round:
    """What one round of requests found out."""

    def __init__(self) -> None:
        self.retry = False
        self.retry_after = 0.0
        self.problem = ""


class HttpSink(OutboxSink):
    """POST results and error reports to a webhook (see the module docstring for the guarantees).

    Args:
        config: the sink's settings.
        pipeline: the pipeline's name (logs).
        telemetry: published counts, outbox depth, drops, outages.
    """

    def __init__(self, config: HttpSinkConfig, *, pipeline: str, telemetry: Telemetry | None = None) -> None:
        super().__init__(
            name=config.name,
            telemetry=telemetry or NullTelemetry(),
            outbox_size=config.outbox_size,
            max_payload_bytes=config.max_payload_bytes,
            runner_role="sender",
        )
        self.config = config
        self.pipeline = pipeline
        self._error_url = config.error_url or config.url
        self._auth: tuple[str, SecretStr] | None = None
        self._ssl: ssl.SSLContext | None = None
        self._rejected_statuses: set[int] = set()
        #: False from a failed round until the next successful one
        self.reachable = False

    # ---- public interface -------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Read the auth token and TLS files (``start()``: a bad setting fails there)."""
        try:
            if self.config.auth is not None:
                self._auth = (self.config.auth.header, self.config.auth.header_value())
            if self.config.tls is not None:
                self._ssl = self.config.tls.context()
        except (OSError, ValueError) as exc:
            raise SinkError(f"sink[{self.name}]: bad settings: {exc}") from exc

    def _describe_target(self) -> str:
        return describe_url(self.config.url)

    async def publish_result(self, result: FrameResult) -> None:
        """Queue one result (returns at once; the server may be down)."""
        self._enqueue_post(self.config.url, result.to_json(), "result", result.source_id)

    async def publish_error(self, report: ErrorReport) -> None:
        """Queue one error report (unless ``send_errors`` is off)."""
        if self.config.send_errors:
            self._enqueue_post(self._error_url, report.to_json(), "error", report.source_id)
        else:
            self._check_accepting()

    def _enqueue_post(self, url: str, payload: bytes, kind: str, source: str) -> None:
        # the outbox's "topic" is the URL; qos/retain mean nothing here
        self._enqueue(OutgoingMessage(url, payload, 1, False, kind, source))

    # ---- sending ----------------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        headers = {"Content-Type": "application/json", "User-Agent": f"segstream/{__version__}"}
        connector = aiohttp.TCPConnector(limit=self.config.max_inflight, ssl=self._ssl or True)
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        return aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)

    async def _run(self) -> None:
        backoff = Backoff(self.config.retry_min_s, self.config.retry_max_s)
        outage_since: float | None = None
        retried_after_stop = False
        async with self._session() as session:
            while True:
                window = self._window()
                if not window:
                    if self._stopping.is_set():
                        return
                    self.outbox.changed.clear()
                    if not self._window():
                        await self.outbox.changed.wait()
                    continue
                round_ = _Round()
                await asyncio.gather(*(self._post(session, seq, message, round_) for seq, message in window))
                if not round_.retry:
                    if outage_since is not None:
                        log.warning(
                            "sink[%s]: %s reachable again after %.1f s; %d messages waiting",
                            self.name,
                            describe_url(self.config.url),
                            time.monotonic() - outage_since,
                            len(self.outbox),
                        )
                    outage_since = None
                    self.reachable = True
                    backoff.reset()
                    continue
                self.reachable = False
                if outage_since is None:  # one count and one log line per outage
                    outage_since = time.monotonic()
                    self.telemetry.publish_error("http_unavailable")
                    log.warning(
                        "sink[%s]: %s unavailable (%s); %d messages kept in the outbox, retrying",
                        self.name,
                        describe_url(self.config.url),
                        round_.problem,
                        len(self.outbox),
                    )
                self.telemetry.reconnect(f"http:{self.name}")
                if self._stopping.is_set() and not retried_after_stop:
                    retried_after_stop = True  # closing: one more try at once, then backoff to the timeout
                    await asyncio.sleep(backoff.pace())  # the attempt-rate floor holds even then
                    continue
                delay = min(self.config.retry_max_s, max(backoff.next_delay(), round_.retry_after))
                await asyncio.sleep(delay)
                await asyncio.sleep(backoff.pace())  # the attempt-rate floor (worker.retry)

    def _window(self) -> list[tuple[int, OutgoingMessage]]:
        """The oldest ``max_inflight`` messages in the outbox."""
        taken: list[tuple[int, OutgoingMessage]] = []
        seen: set[int] = set()
        while len(taken) < self.config.max_inflight:
            item = self.outbox.next_unsent(seen)
            if item is None:
                break
            seen.add(item[0])
            taken.append(item)
        return taken

    async def _post(
        self, session: aiohttp.ClientSession, seq: int, message: OutgoingMessage, round_: _Round
    ) -> None:
        headers = {
            "X-Segstream-Kind": message.kind,
            "Idempotency-Key": hashlib.blake2b(message.payload, digest_size=16).hexdigest(),
        }
        if self._auth is not None:
            headers[self._auth[0]] = self._auth[1].get_secret_value()
        try:
            async with session.post(
                message.topic, data=message.payload, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After", "")
                await response.read()  # drain, so the connection is reused
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            round_.retry = True
            round_.problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return
        if 200 <= status < 300:
            if self.outbox.ack(seq) is not None:  # None: dropped by overflow meanwhile (counted there)
                self.telemetry.published(message.kind)
            return
        if status >= 500 or status in _RETRY_STATUSES:
            round_.retry = True
            round_.problem = f"HTTP {status}"
            if retry_after.isdigit():
                round_.retry_after = max(round_.retry_after, float(retry_after))
            return
        # 4xx / 3xx: the server will never take this message
        if self.outbox.ack(seq) is not None:
            self.telemetry.result_lost(message.source, "http_rejected")
            self.telemetry.publish_error("http_rejected")
        if status not in self._rejected_statuses:
            self._rejected_statuses.add(status)
            log.warning(
                "sink[%s]: %s answered HTTP %d to a %s of source %r: dropped (further %d answers: debug)",
                self.name,
                describe_url(message.topic),
                status,
                message.kind,
                message.source,
                status,
            )
        else:
            log.debug(
                "sink[%s]: HTTP %d for a %s of source %r", self.name, status, message.kind, message.source
            )
