"""Prometheus metrics: the ``Telemetry`` implementation the runtime hands to every stage.

One ``Metrics`` object per worker, with its own ``CollectorRegistry`` (no global registry, so tests and
several workers in one process never collide). Every ``Telemetry`` call is cheap: label children are
bound once per source / reason / target and cached in plain dicts, so the hot path is one dict lookup
and one locked add. Label values are bounded: source ids and targets come from the pipeline file,
reasons from the closed sets of ``worker.telemetry``; past ``max_label_values`` distinct values a label
collapses into ``"other"`` so a bug can never grow the series count without limit.

``METRICS`` declares every exported metric (name, type, labels, help text, the reasons a ``reason``
label takes); the collectors are built from it and ``docs/metrics.md`` is generated from it
(``python -m worker.ops.docs``; a test keeps the two equal).

Beside the Prometheus series, each source keeps plain totals (``SourceSnapshot``) updated in the same
call, which the preview page and the final log line read without touching the registry.

Example:
    >>> m = Metrics("line-3")
    >>> m.frame_received("cam1"); m.frames_processed("cam1")
    >>> b"segstream_frames_processed_total{source=\\"cam1\\"} 1.0" in m.render()[0]
    True
    >>> m.snapshot()["cam1"].processed
    1
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder

from worker.telemetry import (
    DROP_REASONS,
    ERROR_REASONS,
    LOSS_REASONS,
    SKIP_REASONS,
    DropReason,
    ErrorReason,
    LossReason,
    SkipReason,
)

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "LATENCY_BUCKETS",
    "METRICS",
    "OTHER",
    "SECONDS_BUCKETS",
    "MetricSpec",
    "Metrics",
    "SourceSnapshot",
]

log = logging.getLogger(__name__)

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
#: the label value that absorbs values past the cap (and, as a safety net, undeclared reasons)
OTHER = "other"

MetricKind = Literal["counter", "gauge", "histogram", "info"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One exported metric.

    Attributes:
        name: the family name (counters are exported with ``_total``, info with ``_info``).
        kind: the Prometheus type.
        labels: label names, in order.
        help: the HELP text, also the meaning column of ``docs/metrics.md``.
        reasons: the closed set of the ``reason`` label, all pre-created at 0 per source.
        buckets: histogram buckets.
    """

    name: str
    kind: MetricKind
    labels: tuple[str, ...]
    help: str
    reasons: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The sample name a scrape shows (``_total`` for counters, ``_info`` for info)."""
        return {"counter": f"{self.name}_total", "info": f"{self.name}_info"}.get(self.kind, self.name)


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "segstream_frames_received", "counter", ("source",),
        "Frames read from a source (decodable or not).",
    ),
    MetricSpec(
        "segstream_frames_processed", "counter", ("source",),
        "Frames the step processed and handed to the sinks.",
    ),
    MetricSpec(
        "segstream_frames_dropped", "counter", ("source", "reason"),
        "Frames that got no result because of a fault, by reason.", reasons=DROP_REASONS,
    ),
    MetricSpec(
        "segstream_frames_skipped", "counter", ("source", "reason"),
        "Frames read and deliberately not processed (policy, not a fault), by reason.",
        reasons=SKIP_REASONS,
    ),
    MetricSpec(
        "segstream_results_lost", "counter", ("source", "reason"),
        "Results of processed frames a sink could not deliver, per sink, by reason.",
        reasons=LOSS_REASONS,
    ),
    MetricSpec(
        "segstream_detections", "counter", ("source", "class"),
        "Detections in the published results, by source and class (the model's class names).",
    ),
    MetricSpec(
        "segstream_batch_size", "histogram", (), "Frames per model batch.", buckets=BATCH_SIZE_BUCKETS
    ),
    MetricSpec(
        "segstream_model_seconds", "histogram", (),
        "Model time per batch (pre-processing and inference), seconds.", buckets=SECONDS_BUCKETS,
    ),
    MetricSpec(
        "segstream_postprocess_seconds", "histogram", (),
        "Post-processing and serialization time per batch, seconds.", buckets=SECONDS_BUCKETS,
    ),
    MetricSpec(
        "segstream_e2e_latency_seconds", "histogram", ("source",),
        "Capture timestamp to result handed to the sinks, seconds.", buckets=LATENCY_BUCKETS,
    ),
    MetricSpec("segstream_queue_depth", "gauge", ("source",), "Frames waiting in a source's queue."),
    MetricSpec("segstream_source_connected", "gauge", ("source",), "1 while a source is connected / open."),
    MetricSpec("segstream_sources_connected", "gauge", (), "Sources currently connected."),
    MetricSpec(
        "segstream_outbox_depth", "gauge", (), "Messages waiting in the MQTT outbox (broker down or slow)."
    ),
    MetricSpec("segstream_broker_connected", "gauge", (), "1 while the MQTT broker is connected."),
    MetricSpec(
        "segstream_model_info", "gauge", ("model_id", "backend", "precision", "requested", "used"),
        "1 per loaded model: its backend (onnxruntime, openvino), precision (fp32, bf16, int8...), the "
        "execution providers / device asked for and those in use (comma-separated, in order).",
    ),
    MetricSpec(
        "segstream_reconnects", "counter", ("target",),
        "Reconnect attempts, by target (source:ID or broker).",
    ),
    MetricSpec(
        "segstream_published_messages", "counter", ("kind",),
        "Messages published, by kind (result, error, status).",
    ),
    MetricSpec(
        "segstream_publish_errors", "counter", ("reason",),
        "Publish attempts that failed, by reason (the message may be retried).",
    ),
    MetricSpec(
        "segstream_errors", "counter", ("reason",),
        "Errors of the worker itself (not of one frame), by reason; all pre-created at 0.",
        reasons=ERROR_REASONS,
    ),
    MetricSpec(
        "segstream_event_loop_lag_seconds", "gauge", (),
        "How late the event loop's last 1 s heartbeat woke up (blocking code shows here).",
    ),
    MetricSpec("segstream_build", "info", ("pipeline", "version"), "The worker's pipeline and version."),
)  # fmt: skip

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


class _Reasons:
    """The pre-bound children of one source's ``reason`` counter: exactly the declared reasons."""

    __slots__ = ("_bind", "_children", "_metric")

    def __init__(self, metric: str, bind: Callable[[str], Any], reasons: tuple[str, ...]) -> None:
        self._metric = metric
        self._bind = bind
        self._children: dict[str, Any] = {reason: bind(reason) for reason in reasons}

    def inc(self, reason: str, count: int) -> None:
        child = self._children.get(reason)
        if child is None:  # typing keeps this out; if a bug gets here it is counted, not lost
            log.error("%s: undeclared reason %r counted as %r", self._metric, reason, OTHER)
            child = self._children[reason] = self._bind(OTHER)
        child.inc(count)


@dataclass(frozen=True, slots=True)
class SourceSnapshot:
    """Totals of one source (for the preview page and the final log line; not for the hot path)."""

    received: int = 0
    processed: int = 0
    dropped: int = 0
    skipped: int = 0
    lost: int = 0
    latency_sum: float = 0.0
    latency_count: int = 0
    queue_depth: int = 0
    connected: bool = False


@dataclass(slots=True)
class _Source:
    """One source's bound Prometheus children and its plain totals (updated together, under ``lock``)."""

    received: Any
    processed: Any
    latency: Any
    queue_depth: Any
    connected: Any
    dropped: _Reasons
    skipped: _Reasons
    lost: _Reasons
    lock: threading.Lock = field(default_factory=threading.Lock)
    totals: dict[str, float] = field(default_factory=dict)
    is_connected: bool = False

    def add(self, key: str, amount: float) -> None:
        with self.lock:
            self.totals[key] = self.totals.get(key, 0) + amount

    def snapshot(self) -> SourceSnapshot:
        with self.lock:
            t = dict(self.totals)
            connected = self.is_connected
        return SourceSnapshot(
            received=int(t.get("received", 0)),
            processed=int(t.get("processed", 0)),
            dropped=int(t.get("dropped", 0)),
            skipped=int(t.get("skipped", 0)),
            lost=int(t.get("lost", 0)),
            latency_sum=float(t.get("latency_sum", 0.0)),
            latency_count=int(t.get("latency_count", 0)),
            queue_depth=int(t.get("queue_depth", 0)),
            connected=connected,
        )


def _collector(spec: MetricSpec, registry: CollectorRegistry) -> Any:
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, spec.labels, registry=registry)
    if spec.kind == "histogram":
        return Histogram(spec.name, spec.help, spec.labels, buckets=spec.buckets, registry=registry)
    return Info(spec.name, spec.help, registry=registry)


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
        c = {spec.name: _collector(spec, self.registry) for spec in METRICS}
        self._c = c
        c["segstream_build"].info({"pipeline": pipeline, "version": version})
        self._sources: dict[str, _Source] = {}
        self._sources_lock = threading.Lock()
        self._reconnects: _Children[Any] = self._children("segstream_reconnects")
        self._published: _Children[Any] = self._children("segstream_published_messages")
        self._publish_errors: _Children[Any] = self._children("segstream_publish_errors")
        self._detections: dict[tuple[str, str], Any] = {}  # (source, class) as called → child
        self._detection_classes: dict[str, set[str]] = {}  # exported source → class labels bound
        errors = c["segstream_errors"]
        self._errors = _Reasons("segstream_errors", errors.labels, ERROR_REASONS)
        for source in sources:
            self._source(source)

    def _children(self, name: str) -> _Children[Any]:
        return _Children(self._c[name].labels, self._limit, self._lock)

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
                s = self._bind_source(key)
                self._sources[key] = s
            return s

    def _bind_source(self, key: str) -> _Source:
        c = self._c

        def reasons(name: str, declared: tuple[str, ...]) -> _Reasons:
            return _Reasons(name, lambda reason: c[name].labels(key, reason), declared)

        return _Source(
            received=c["segstream_frames_received"].labels(key),
            processed=c["segstream_frames_processed"].labels(key),
            latency=c["segstream_e2e_latency_seconds"].labels(key),
            queue_depth=c["segstream_queue_depth"].labels(key),
            connected=c["segstream_source_connected"].labels(key),
            dropped=reasons("segstream_frames_dropped", DROP_REASONS),
            skipped=reasons("segstream_frames_skipped", SKIP_REASONS),
            lost=reasons("segstream_results_lost", LOSS_REASONS),
        )

    # -- Telemetry -----------------------------------------------------------------------------------

    def frame_received(self, source: str) -> None:
        s = self._source(source)
        s.received.inc()
        s.add("received", 1)

    def frame_dropped(self, source: str, reason: DropReason, count: int = 1) -> None:
        if count > 0:
            s = self._source(source)
            s.dropped.inc(reason, count)
            s.add("dropped", count)

    def frame_skipped(self, source: str, reason: SkipReason, count: int = 1) -> None:
        if count > 0:
            s = self._source(source)
            s.skipped.inc(reason, count)
            s.add("skipped", count)

    def frames_processed(self, source: str, count: int = 1) -> None:
        if count > 0:
            s = self._source(source)
            s.processed.inc(count)
            s.add("processed", count)

    def result_lost(self, source: str, reason: LossReason, count: int = 1) -> None:
        if count > 0:
            s = self._source(source)
            s.lost.inc(reason, count)
            s.add("lost", count)

    def queue_depth(self, source: str, depth: int) -> None:
        s = self._source(source)
        s.queue_depth.set(depth)
        with s.lock:
            s.totals["queue_depth"] = depth

    def source_connected(self, source: str, connected: bool) -> None:
        s = self._source(source)
        with self._sources_lock:
            if s.is_connected != connected:
                s.is_connected = connected
                s.connected.set(1 if connected else 0)
                self._c["segstream_sources_connected"].inc(1 if connected else -1)

    def reconnect(self, target: str) -> None:
        self._reconnects.get(target).inc()

    def batch_done(self, size: int, model_seconds: float, postprocess_seconds: float) -> None:
        self._c["segstream_batch_size"].observe(size)
        self._c["segstream_model_seconds"].observe(model_seconds)
        self._c["segstream_postprocess_seconds"].observe(postprocess_seconds)

    def e2e_latency(self, source: str, seconds: float) -> None:
        s = self._source(source)
        s.latency.observe(seconds)
        with s.lock:
            s.totals["latency_sum"] = s.totals.get("latency_sum", 0.0) + seconds
            s.totals["latency_count"] = s.totals.get("latency_count", 0) + 1

    def broker_connected(self, connected: bool) -> None:
        self._c["segstream_broker_connected"].set(1 if connected else 0)

    def outbox_depth(self, depth: int) -> None:
        self._c["segstream_outbox_depth"].set(depth)

    def published(self, kind: str) -> None:
        self._published.get(kind).inc()

    def publish_error(self, reason: str) -> None:
        self._publish_errors.get(reason).inc()

    def error(self, reason: ErrorReason) -> None:
        self._errors.inc(reason, 1)

    # -- beyond Telemetry ----------------------------------------------------------------------------

    def detections(self, source: str, class_name: str, count: int = 1) -> None:
        """``count`` published detections of ``class_name`` in a result of ``source``.

        Both labels are bounded: sources through the per-source cap, and past ``max_label_values``
        distinct class names (a model's classes, so only a bug gets there) a class counts as ``"other"``.
        """
        if count <= 0:
            return
        key = (source, class_name)
        child = self._detections.get(key)
        if child is None:
            child = self._detection_child(key)
        child.inc(count)

    def _detection_child(self, key: tuple[str, str]) -> Any:
        self._source(key[0])  # the source's own cap decides whether it is itself or "other"
        with self._sources_lock:
            source = key[0] if key[0] in self._sources else OTHER
        with self._lock:
            child = self._detections.get(key)
            if child is None:
                classes = self._detection_classes.setdefault(source, set())
                name = key[1] if key[1] in classes or len(classes) < self._limit - 1 else OTHER
                classes.add(name)
                child = self._c["segstream_detections"].labels(source, name)
                self._detections[key] = child
        return child

    def model_loaded(
        self, model_id: str, backend: str, precision: str, requested: Sequence[str], used: Sequence[str]
    ) -> None:
        """Export a loaded model's backend facts (``segstream_model_info``, value 1)."""
        self._c["segstream_model_info"].labels(
            model_id, backend, precision, ",".join(requested), ",".join(used)
        ).set(1)

    def loop_lag(self, seconds: float) -> None:
        """The event loop's heartbeat lag (set by ``HealthState.heartbeat``)."""
        self._c["segstream_event_loop_lag_seconds"].set(seconds)

    def source_ids(self) -> list[str]:
        """Source ids seen so far (or pre-created), in first-seen order."""
        with self._sources_lock:
            return list(self._sources)

    def snapshot(self) -> dict[str, SourceSnapshot]:
        """Per-source totals, from the plain counters kept beside the Prometheus series."""
        with self._sources_lock:
            sources = list(self._sources.items())
        return {source: s.snapshot() for source, s in sources}

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition text for an HTTP ``Accept`` header, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
