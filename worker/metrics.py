"""Prometheus metrics: the ``Telemetry`` implementation the runtime hands to every stage.

One ``Metrics`` object per worker, with its own ``CollectorRegistry`` (no global registry, so tests and
several workers in one process never collide). Every ``Telemetry`` call is cheap: label children are
bound once per source / reason / target and cached in plain dicts, so the hot path is one dict lookup
and one locked add. Label values are bounded: source ids, drop reasons and targets come from the pipeline
file and the code, never from frame or detection ids; past ``max_label_values`` distinct values a label
collapses into ``"other"`` so a bug can never grow the series count without limit.

The exported names and labels are documented in ``docs/metrics.md``.

Example:
    >>> m = Metrics("line-3")
    >>> m.frame_received("cam1"); m.frames_processed("cam1")
    >>> b"segstream_frames_processed_total{source=\\"cam1\\"} 1.0" in m.render()[0]
    True
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "DROP_REASONS",
    "LATENCY_BUCKETS",
    "SECONDS_BUCKETS",
    "Metrics",
    "SourceSnapshot",
]

#: drop reasons pre-created per source at 0, so ``rate()`` and alerts see the series from the start
DROP_REASONS = ("stale", "decode_error", "oversize", "inference_error", "outbox_overflow")
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SECONDS_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    30.0,
)
OTHER = "other"

C = TypeVar("C")


class _Children(Generic[C]):
    """Cache of bound label children for a one-label metric, with a cap on distinct values."""

    __slots__ = ("_bind", "_cache", "_limit", "_lock")

    def __init__(self, bind: Callable[[str], C], limit: int, lock: threading.Lock) -> None:
        self._bind = bind
        self._cache: dict[str, C] = {}
        self._limit = limit
        self._lock = lock

    def get(self, value: str) -> C:
        child = self._cache.get(value)
        if child is None:
            child = self._slow(value)
        return child

    def _slow(self, value: str) -> C:
        with self._lock:
            child = self._cache.get(value)
            if child is None:
                key = value if len(self._cache) < self._limit - 1 else OTHER
                child = self._cache.get(key)
                if child is None:
                    child = self._bind(key)
                    self._cache[key] = child
        return child


@dataclass(slots=True)
class _Source:
    received: Any
    processed: Any
    latency: Any
    queue_depth: Any
    connected: Any
    dropped: _Children[Any]
    is_connected: bool = False


@dataclass(frozen=True, slots=True)
class SourceSnapshot:
    """Totals of one source, read from the registry (for the preview page; not for the hot path)."""

    received: float = 0.0
    processed: float = 0.0
    dropped: float = 0.0
    latency_sum: float = 0.0
    latency_count: float = 0.0
    queue_depth: float = 0.0
    connected: bool = False


class Metrics:
    """Prometheus implementation of ``worker.telemetry.Telemetry``.

    Args:
        pipeline: the pipeline's name (exported once, in ``segstream_build_info``).
        version: the worker's version string.
        sources: source ids to pre-create (their series exist at 0 before the first frame).
        max_label_values: cap on distinct values of one label before values collapse into ``"other"``.
    """

    def __init__(
        self,
        pipeline: str,
        *,
        version: str = "",
        sources: Iterable[str] = (),
        max_label_values: int = 256,
    ) -> None:
        if max_label_values < 1:
            raise ValueError(f"max_label_values must be >= 1, got {max_label_values}")
        self.pipeline = pipeline
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._limit = max_label_values
        r = self.registry
        self._received = Counter(
            "segstream_frames_received", "Frames read from a source.", ["source"], registry=r
        )
        self._processed = Counter(
            "segstream_frames_processed",
            "Frames the step processed and handed to the sinks.",
            ["source"],
            registry=r,
        )
        self._dropped = Counter(
            "segstream_frames_dropped",
            "Frames dropped before a result was published, by reason.",
            ["source", "reason"],
            registry=r,
        )
        self._batch_size = Histogram(
            "segstream_batch_size", "Frames per model batch.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self._model_seconds = Histogram(
            "segstream_model_seconds",
            "Model time per batch (pre-processing and inference), seconds.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self._post_seconds = Histogram(
            "segstream_postprocess_seconds",
            "Post-processing and serialization time per batch, seconds.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self._latency = Histogram(
            "segstream_e2e_latency_seconds",
            "Capture to published (or handed to the sink), seconds.",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._queue_depth = Gauge(
            "segstream_queue_depth", "Frames waiting in a source's queue.", ["source"], registry=r
        )
        self._source_connected = Gauge(
            "segstream_source_connected", "1 while a source is connected / open.", ["source"], registry=r
        )
        self._sources_connected = Gauge(
            "segstream_sources_connected", "Sources currently connected.", registry=r
        )
        self._outbox = Gauge("segstream_outbox_depth", "Messages waiting in the sink outbox.", registry=r)
        self._broker = Gauge(
            "segstream_broker_connected", "1 while the MQTT broker is connected.", registry=r
        )
        self._model_info = Gauge(
            "segstream_model_info",
            "1 per loaded model: its backend, precision, the execution providers/devices asked for and "
            "those in use.",
            ["model_id", "backend", "precision", "requested", "used"],
            registry=r,
        )
        self._reconnects = Counter(
            "segstream_reconnects",
            "Reconnect attempts, by target (source id or broker).",
            ["target"],
            registry=r,
        )
        self._published = Counter(
            "segstream_published_messages",
            "Messages published, by kind (result, error, status).",
            ["kind"],
            registry=r,
        )
        self._publish_errors = Counter(
            "segstream_publish_errors", "Publishes that failed, by reason.", ["reason"], registry=r
        )
        self._errors = Counter(
            "segstream_errors", "Errors reported by the stages, by reason.", ["reason"], registry=r
        )
        self._loop_lag = Gauge(
            "segstream_event_loop_lag_seconds",
            "How late the event loop's last heartbeat woke up.",
            registry=r,
        )
        Info("segstream_build", "The worker's pipeline and version.", registry=r).info(
            {"pipeline": pipeline, "version": version}
        )
        self._sources: dict[str, _Source] = {}
        self._reconnect_children: _Children[Any] = _Children(self._reconnects.labels, self._limit, self._lock)
        self._published_children: _Children[Any] = _Children(self._published.labels, self._limit, self._lock)
        self._publish_error_children: _Children[Any] = _Children(
            self._publish_errors.labels, self._limit, self._lock
        )
        self._error_children: _Children[Any] = _Children(self._errors.labels, self._limit, self._lock)
        self._sources_lock = threading.Lock()
        for source in sources:
            self._source(source)

    # -- per-source children -------------------------------------------------------------------------

    def _source(self, source: str) -> _Source:
        s = self._sources.get(source)
        if s is None:
            s = self._new_source(source)
        return s

    def _new_source(self, source: str) -> _Source:
        with self._sources_lock:
            s = self._sources.get(source)
            if s is not None:
                return s
            key = source if len(self._sources) < self._limit - 1 else OTHER
            s = self._sources.get(key)
            if s is None:
                dropped_for = self._dropped.labels
                s = _Source(
                    received=self._received.labels(key),
                    processed=self._processed.labels(key),
                    latency=self._latency.labels(key),
                    queue_depth=self._queue_depth.labels(key),
                    connected=self._source_connected.labels(key),
                    dropped=_Children(functools.partial(dropped_for, key), self._limit, self._lock),
                )
                for reason in DROP_REASONS:
                    s.dropped.get(reason)
                self._sources[key] = s
            return s

    # -- Telemetry -----------------------------------------------------------------------------------

    def frame_received(self, source: str) -> None:
        self._source(source).received.inc()

    def frame_dropped(self, source: str, reason: str, count: int = 1) -> None:
        if count > 0:
            self._source(source).dropped.get(reason).inc(count)

    def frames_processed(self, source: str, count: int = 1) -> None:
        if count > 0:
            self._source(source).processed.inc(count)

    def queue_depth(self, source: str, depth: int) -> None:
        self._source(source).queue_depth.set(depth)

    def source_connected(self, source: str, connected: bool) -> None:
        s = self._source(source)
        with self._sources_lock:
            if s.is_connected != connected:
                s.is_connected = connected
                s.connected.set(1 if connected else 0)
                self._sources_connected.inc(1 if connected else -1)

    def reconnect(self, target: str) -> None:
        self._reconnect_children.get(target).inc()

    def model_loaded(
        self, model_id: str, backend: str, precision: str, requested: Sequence[str], used: Sequence[str]
    ) -> None:
        """Export a loaded model's backend facts (``segstream_model_info``, value 1)."""
        self._model_info.labels(model_id, backend, precision, ",".join(requested), ",".join(used)).set(1)

    def batch_done(self, size: int, model_seconds: float, postprocess_seconds: float) -> None:
        self._batch_size.observe(size)
        self._model_seconds.observe(model_seconds)
        self._post_seconds.observe(postprocess_seconds)

    def e2e_latency(self, source: str, seconds: float) -> None:
        self._source(source).latency.observe(seconds)

    def broker_connected(self, connected: bool) -> None:
        self._broker.set(1 if connected else 0)

    def outbox_depth(self, depth: int) -> None:
        self._outbox.set(depth)

    def published(self, kind: str) -> None:
        self._published_children.get(kind).inc()

    def publish_error(self, reason: str) -> None:
        self._publish_error_children.get(reason).inc()

    def error(self, reason: str) -> None:
        self._error_children.get(reason).inc()

    # -- beyond Telemetry ----------------------------------------------------------------------------

    def loop_lag(self, seconds: float) -> None:
        """The event loop's heartbeat lag (set by ``HealthState.heartbeat``)."""
        self._loop_lag.set(seconds)

    def source_ids(self) -> list[str]:
        """Source ids seen so far (or pre-created), in first-seen order."""
        with self._sources_lock:
            return list(self._sources)

    def snapshot(self) -> dict[str, SourceSnapshot]:
        """Per-source totals read from the registry (a scrape's worth of work: for the preview page)."""
        acc: dict[str, dict[str, float]] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                source = sample.labels.get("source")
                if source is None:
                    continue
                row = acc.setdefault(source, {})
                name = sample.name
                if name == "segstream_frames_received_total":
                    row["received"] = sample.value
                elif name == "segstream_frames_processed_total":
                    row["processed"] = sample.value
                elif name == "segstream_frames_dropped_total":
                    row["dropped"] = row.get("dropped", 0.0) + sample.value
                elif name == "segstream_e2e_latency_seconds_sum":
                    row["latency_sum"] = sample.value
                elif name == "segstream_e2e_latency_seconds_count":
                    row["latency_count"] = sample.value
                elif name == "segstream_queue_depth":
                    row["queue_depth"] = sample.value
                elif name == "segstream_source_connected":
                    row["connected"] = sample.value
        return {
            source: SourceSnapshot(
                received=row.get("received", 0.0),
                processed=row.get("processed", 0.0),
                dropped=row.get("dropped", 0.0),
                latency_sum=row.get("latency_sum", 0.0),
                latency_count=row.get("latency_count", 0.0),
                queue_depth=row.get("queue_depth", 0.0),
                connected=row.get("connected", 0.0) > 0,
            )
            for source, row in acc.items()
        }

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition text for an HTTP ``Accept`` header, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
