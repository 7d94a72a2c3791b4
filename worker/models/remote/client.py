"""One HTTP client per inference server: bounded concurrency, timeout, retries, circuit breaker.

The step calls its model from the model threads, blocking; the client runs one aiohttp session on
its own event-loop thread and each call waits for its request there
(``asyncio.run_coroutine_threadsafe``). So one connection pool and one concurrency bound
(``max_concurrency``) serve every model thread of the worker, and the pipeline's event loop never
waits on the server.

Failures:

- **retried** (idempotent: the server did not take the request): connection refused or reset,
  the server closing the connection before answering, HTTP 502/503/504; up to ``retries`` times with
  backoff (``worker.sources.base.Backoff``, full jitter);
- **not retried**: a TLS failure (untrusted certificate, wrong host name, refused client
  certificate), a timeout (the server may still be working on it: retrying doubles its load), any
  other HTTP error (4xx: our request is wrong; 500: the model failed on it);
- **circuit breaker**: ``breaker_failures`` consecutive failed calls (after their retries) open it.
  While open every call fails at once with :class:`ServerUnavailableError` (no request is sent) and
  a probe (``health_path``) runs with backoff; the first probe that succeeds closes it, wakes the
  callers waiting in :meth:`RemoteClient.wait_available` and tells the listeners (readiness).

Metrics (``segstream_remote_*``, labelled by server): request latency histogram, requests in flight,
errors by kind, bytes sent and received, breaker state. The API key goes in a header and is never
logged; URLs are logged without credentials.
"""

from __future__ import annotations

import asyncio
import io
import logging
import random
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.errors import ModelError
from worker.models.remote.config import RemoteModelConfig
from worker.sources.base import Backoff

__all__ = [
    "RemoteClient",
    "RemoteError",
    "RemoteMetrics",
    "RemoteResponse",
    "RemoteTimeoutError",
    "ServerBackend",
    "ServerUnavailableError",
]

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({502, 503, 504})
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class RemoteError(ModelError):
    """The inference server failed a request; not the frame's fault (the batch is not split)."""

    reason = "remote_error"


class RemoteTimeoutError(RemoteError):
    """The server did not answer within ``timeout_s``."""

    reason = "remote_timeout"


class ServerUnavailableError(RemoteError):
    """The server cannot be reached (the circuit breaker is open, or connecting failed)."""

    reason = "server_unavailable"


@dataclass(frozen=True, slots=True)
class RemoteResponse:
    """An HTTP answer: status, headers, body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def redact_url(url: str) -> str:
    """The URL without user:password@ and without a query string (which may hold a key)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class RemoteMetrics:
    """The ``segstream_remote_*`` collectors, on the worker's Prometheus registry (one per worker)."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, RemoteMetrics]] = (
        weakref.WeakKeyDictionary()
    )
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.latency = Histogram(
            "segstream_remote_request_seconds",
            "Inference server requests, send to last byte, seconds (successful requests).",
            ["server"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "segstream_remote_requests_in_flight", "Requests waiting on the server.", ["server"], registry=r
        )
        self.errors = Counter(
            "segstream_remote_errors", "Failed requests by kind.", ["server", "kind"], registry=r
        )
        self.bytes_sent = Counter(
            "segstream_remote_sent_bytes", "Request bodies sent to the server.", ["server"], registry=r
        )
        self.bytes_received = Counter(
            "segstream_remote_received_bytes", "Response bodies from the server.", ["server"], registry=r
        )
        self.available = Gauge(
            "segstream_remote_available",
            "1 while the server's circuit breaker is closed, 0 while it is open.",
            ["server"],
            registry=r,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> RemoteMetrics:
        """The collectors on ``registry``, created once (several models can share a worker)."""
        with cls._lock:
            metrics = cls._by_registry.get(registry)
            if metrics is None:
                metrics = cls(registry)
                cls._by_registry[registry] = metrics
            return metrics


class RemoteClient:
    """A blocking facade over one aiohttp session on a private event-loop thread.

    Args:
        config: the ``model`` section (url, timeout, concurrency, retries, breaker, key, TLS).
        health_path: what the breaker probes while open (``/v2/health/ready`` for KServe v2).
        bearer: send the API key as ``Authorization: Bearer`` (KServe v2); the Roboflow API takes it
            in the request instead (:attr:`api_key`).
        rng: random source of the backoffs (tests pass a seeded one).
    """

    def __init__(
        self,
        config: RemoteModelConfig,
        *,
        health_path: str,
        bearer: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.base_url = config.url.rstrip("/")
        self.server = redact_url(self.base_url)
        self._health_path = health_path
        self._rng = rng or random.Random()
        key = config.api_key()
        self.api_key = key
        # no response compression: a server that gzips megabytes of float tensors spends more CPU
        # than the rack's network saves (Triton does when asked; aiohttp asks by default)
        self._headers: dict[str, str] = {"Accept-Encoding": "identity"}
        if key is not None and bearer:
            self._headers["Authorization"] = f"Bearer {key.get_secret_value()}"
        self._ssl = _ssl_context(config)
        self.metrics = RemoteMetrics(None)
        self._failures = 0
        self._state_lock = threading.Lock()
        self._available = threading.Event()
        self._available.set()
        self._listeners: list[Callable[[bool], None]] = []
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="remote-client", daemon=True)
        self._thread.start()
        self._session: aiohttp.ClientSession = self._call(self._open(), timeout=10.0)
        self._semaphore: asyncio.Semaphore = self._call(self._make_semaphore(), timeout=10.0)

    # ----------------------------------------------------------------------------- wiring

    def use_metrics(self, registry: CollectorRegistry) -> None:
        """Report into the worker's registry from now on."""
        self.metrics = RemoteMetrics.for_registry(registry)
        self.metrics.available.labels(self.server).set(1 if self.available else 0)

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(available)`` now and on every breaker change (from the client's thread)."""
        self._listeners.append(listener)
        listener(self.available)

    @property
    def available(self) -> bool:
        """False while the circuit breaker is open."""
        return self._available.is_set()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def wait_available(self, timeout: float) -> bool:
        """Block until the breaker is closed (True) or ``timeout`` passes / the client closes (False)."""
        if self._closed:
            return False
        return self._available.wait(timeout) and not self._closed

    # ----------------------------------------------------------------------------- requests

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        probe: bool = False,
    ) -> RemoteResponse:
        """One request (with its retries); a 2xx answer, or an exception.

        Raises:
            ServerUnavailableError: the breaker is open, or the server could not be reached.
            RemoteTimeoutError: no answer within ``timeout_s``.
            RemoteError: the server answered with an error status (the message has its text).
        """
        if self._closed:
            raise RemoteError(f"{self.server}: the client was closed")
        if not probe and not self.available:
            self._count_error("breaker_open")
            raise ServerUnavailableError(f"{self.server}: server unavailable (circuit breaker open)")
        # the loop's own timeout bounds the request; this one only guards against a dead loop thread
        budget = self.config.timeout_s * (self.config.retries + 1) + self.config.retry_backoff_s[1] * (
            self.config.retries + 1
        )
        response: RemoteResponse = self._call(
            self._request(method, path, body, headers, params, probe), timeout=budget + 5.0
        )
        return response

    def _call(self, coroutine: Any, *, timeout: float) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise RemoteTimeoutError(f"{self.server}: no answer within {timeout:.1f} s") from None

    async def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self.config.max_concurrency, ssl=self._ssl)
        return aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            auto_decompress=True,
        )

    async def _make_semaphore(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(self.config.max_concurrency)

    async def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        probe: bool,
    ) -> RemoteResponse:
        low, high = self.config.retry_backoff_s
        backoff = Backoff(low, high, rng=self._rng)
        attempts = 1 if probe else self.config.retries + 1
        for attempt in range(attempts):
            try:
                response = await self._once(method, path, body, headers, params)
            except ServerUnavailableError:
                if attempt + 1 < attempts:
                    await asyncio.sleep(backoff.next_delay())
                    continue
                if not probe:
                    self._failed()
                raise
            except RemoteError:
                if not probe:
                    self._failed()
                raise
            if response.status in _RETRY_STATUS and attempt + 1 < attempts:
                self._count_error(f"http_{response.status}")
                await asyncio.sleep(backoff.next_delay())
                continue
            if response.status >= 400:
                self._count_error(f"http_{response.status}")
                text = self._redact(response.body[:300].decode("utf-8", "replace"))
                if response.status in _RETRY_STATUS:
                    if not probe:
                        self._failed()
                    raise ServerUnavailableError(f"{self.server}{path}: HTTP {response.status}: {text}")
                self._succeeded()  # the server is there; the request was wrong
                raise RemoteError(f"{self.server}{path}: HTTP {response.status}: {text}")
            self._succeeded()
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
    ) -> RemoteResponse:
        url = f"{self.base_url}{path}"
        async with self._semaphore:
            gauge = self.metrics.in_flight.labels(self.server)
            gauge.inc()
            started = time.perf_counter()
            try:
                # a stream, not bytes: aiohttp writes a large body in chunks
                data = io.BytesIO(body) if body is not None else None
                async with self._session.request(
                    method, url, data=data, headers=headers, params=params
                ) as response:
                    payload = await response.read()
                    result = RemoteResponse(response.status, dict(response.headers), payload)
            except TimeoutError:
                self._count_error("timeout")
                raise RemoteTimeoutError(
                    f"{self.server}{path}: no answer within {self.config.timeout_s} s"
                ) from None
            except aiohttp.ClientSSLError as exc:
                # not transient (a certificate the client does not trust, the wrong host name, a
                # client certificate the server refuses): not retried, said plainly at start-up
                self._count_error("tls")
                raise RemoteError(f"{self.server}{path}: TLS failed: {exc}") from None
            except (aiohttp.ClientConnectionError, OSError) as exc:
                self._count_error("connection")
                raise ServerUnavailableError(f"{self.server}{path}: {type(exc).__name__}: {exc}") from None
            except aiohttp.ClientError as exc:
                self._count_error("client")
                raise RemoteError(f"{self.server}{path}: {type(exc).__name__}: {exc}") from None
            finally:
                gauge.dec()
            if body:
                self.metrics.bytes_sent.labels(self.server).inc(len(body))
            self.metrics.bytes_received.labels(self.server).inc(len(payload))
            if result.status < 400:
                self.metrics.latency.labels(self.server).observe(time.perf_counter() - started)
            return result

    def _redact(self, text: str) -> str:
        """A server's error text without the API key (a server may echo the request)."""
        if self.api_key is not None:
            text = text.replace(self.api_key.get_secret_value(), "***")
        return text

    def _count_error(self, kind: str) -> None:
        self.metrics.errors.labels(self.server, kind).inc()

    # ----------------------------------------------------------------------------- breaker

    def _succeeded(self) -> None:
        with self._state_lock:
            self._failures = 0

    def _failed(self) -> None:
        with self._state_lock:
            self._failures += 1
            trip = self._failures >= self.config.breaker_failures and self._available.is_set()
            if trip:
                self._available.clear()
        if trip:
            log.warning(
                "inference server %s unavailable after %d failed requests; probing %s",
                self.server,
                self._failures,
                self._health_path,
            )
            self._set_state(False)
            if self._probe is None or self._probe.done():
                self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        low, high = self.config.probe_interval_s
        backoff = Backoff(low, high, rng=self._rng)
        while not self._closed:
            await asyncio.sleep(backoff.next_delay())
            try:
                await self._request("GET", self._health_path, None, None, None, True)
            except RemoteError:
                continue
            with self._state_lock:
                self._failures = 0
                self._available.set()
            log.info("inference server %s is back", self.server)
            self._set_state(True)
            return

    def _set_state(self, available: bool) -> None:
        self.metrics.available.labels(self.server).set(1 if available else 0)
        for listener in list(self._listeners):
            try:
                listener(available)
            except Exception:  # a listener must not break the client
                log.exception("remote availability listener failed")

    # ----------------------------------------------------------------------------- life cycle

    def close(self) -> None:
        """Close the session and stop the loop thread; waiting callers are released."""
        if self._closed:
            return
        self._closed = True
        self._available.set()  # wake wait_available (it returns False: closed)

        async def _shutdown() -> None:
            if self._probe is not None:
                self._probe.cancel()
            await self._session.close()

        try:
            asyncio.run_coroutine_threadsafe(_shutdown(), self._loop).result(5.0)
        except Exception:  # pragma: no cover - best effort at shutdown
            log.debug("remote client shutdown", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()


def _ssl_context(config: RemoteModelConfig) -> ssl.SSLContext | bool:
    tls = config.tls
    if tls is None:
        return True  # aiohttp's default verification for https, unused for http
    if not tls.verify:
        log.warning("model.tls.verify is false: the inference server's certificate is not checked")
        return False
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


def bind_client(client: RemoteClient, registry: object, on_available: object = None) -> None:
    """Point a client's metrics at the worker's registry and add an availability listener."""
    if isinstance(registry, CollectorRegistry):
        client.use_metrics(registry)
    if callable(on_available):
        client.add_listener(on_available)


class ServerBackend:
    """What every remote backend exposes about its server: the client, availability, metrics.

    Subclasses set ``_client`` and ``_closed`` in ``__init__``.
    """

    _client: RemoteClient
    _closed: bool

    @property
    def client(self) -> RemoteClient:
        """The server's HTTP client (breaker state, listeners, metrics)."""
        return self._client

    @property
    def closed(self) -> bool:
        """Whether the backend was closed."""
        return self._closed

    def wait_available(self, timeout: float) -> bool:
        """Block until the server's breaker is closed (True), or ``timeout`` / close (False)."""
        return self._client.wait_available(timeout)

    def bind(self, registry: object, on_available: object = None) -> None:
        """Report into the worker's metrics registry; call ``on_available(bool)`` on changes."""
        bind_client(self._client, registry, on_available)
