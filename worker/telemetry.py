"""What the stages report as they work, decoupled from how it is exported.

Every stage (sources, batcher, step runner, sinks, runtime) receives one ``Telemetry`` object from the
composition root and calls it; the Prometheus ``worker.ops.metrics.Metrics`` implements it, tests can
use ``RecordingTelemetry``. Label values are bounded: source ids and target names from the pipeline
file, reasons from the closed sets below, never frame or detection ids.

What happens to a frame a source read is exactly one of three things, so that per source::

    received = processed + Σ dropped + Σ skipped      (up to the frames still in flight)

- **processed** (``frames_processed``): the step produced its result and handed it to the sinks;
- **dropped** (``frame_dropped``, a ``DropReason``): a *fault* — the frame got no result (an
  undecodable payload, a bad parameter, an inference failure, a lost MQTT frame);
- **skipped** (``frame_skipped``, a ``SkipReason``): *policy* — the pipeline chose not to process it
  (``max_fps`` on a video source, ``stale``: a ``latest`` queue replaced it by a newer frame).

A result lost after the hand-off (``result_lost``, a ``LossReason``) is counted per sink: the frame
was processed, its message did not arrive.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from typing import Literal, Protocol, get_args

__all__ = [
    "DROP_REASONS",
    "ERROR_REASONS",
    "LOSS_REASONS",
    "REASON_HELP",
    "SKIP_REASONS",
    "DropReason",
    "ErrorReason",
    "LossReason",
    "NullTelemetry",
    "RecordingTelemetry",
    "SkipReason",
    "Telemetry",
    "drop_reason",
]

#: Faults: a frame that was read got no result (``REASON_HELP`` says what each one means).
DropReason = Literal[
    "decode_error",
    "oversize",
    "bad_parameter",
    "step_error",
    "invalid_model_id",
    "model_error",
    "inference_error",
    "postprocess_error",
    "mqtt_queue_full",
    "mqtt_duplicate",
    "internal_error",
    "unknown_station",
    "shutdown_unprocessed",
    "server_unavailable",
    "remote_timeout",
    "remote_error",
]
#: Policy: a frame that was read and deliberately not processed.
SkipReason = Literal["max_fps", "stale"]
#: A processed frame's message that a sink could not deliver (counted per sink).
LossReason = Literal[
    "outbox_overflow", "payload_too_large", "shutdown_undelivered", "sink_io_error", "http_rejected"
]

#: Errors of the worker itself, not of one frame (``segstream_errors_total``).
ErrorReason = Literal["stage_failed"]

DROP_REASONS: tuple[DropReason, ...] = get_args(DropReason)
SKIP_REASONS: tuple[SkipReason, ...] = get_args(SkipReason)
LOSS_REASONS: tuple[LossReason, ...] = get_args(LossReason)
ERROR_REASONS: tuple[ErrorReason, ...] = get_args(ErrorReason)

#: what each reason means (``docs/metrics.md`` is generated from this; a test keeps the keys equal to
#: the three sets)
REASON_HELP: dict[str, str] = {
    "decode_error": "the payload or file is not a readable image or frame message",
    "oversize": "the payload, file or decoded image is over a configured limit",
    "bad_parameter": "a per-frame runtime parameter the step does not accept (or a model not loaded)",
    "step_error": "the step refused the frame for another reason",
    "invalid_model_id": "a per-frame `model_id` that is not a safe `project/version`",
    "model_error": "the model could not be resolved or run for this frame",
    "inference_error": "the model failed on the frame",
    "postprocess_error": "the model's outputs could not be post-processed",
    "mqtt_queue_full": "a QoS 0 frame arrived while the MQTT client's incoming queue was full",
    "mqtt_duplicate": "the broker resent a frame this source already queued (not processed twice)",
    "internal_error": "an unexpected error while handling this one message (a bug; the source goes on)",
    "unknown_station": "an MQTT frame whose topic gives no allowed station (`source_id` from the topic, "
    "`stations`, `max_stations`); counted under the source's own id",
    "shutdown_unprocessed": "still queued or in inference when the worker stopped after a failure",
    "server_unavailable": "a live frame while the remote inference server is down (its circuit is open)",
    "remote_timeout": "the remote inference server did not answer within `timeout_s`",
    "remote_error": "the remote inference server refused the request or answered with an error",
    "max_fps": "a video source read the frame faster than its `max_fps`",
    "stale": "a `latest` source's queue (or its reader's hand-over) replaced the frame by a newer one",
    "outbox_overflow": "the MQTT outbox was full while the broker was away; its oldest message went",
    "payload_too_large": "the message is larger than the sink's `max_payload_bytes`",
    "shutdown_undelivered": "still in the outbox when the shutdown grace time ran out",
    "sink_io_error": "a JSON Lines file could not be written",
    "stage_failed": "a supervised stage (a source, inference, the control listener) raised; it is restarted",
    "http_rejected": "the webhook answered 3xx or 4xx (not 408/425/429): it will never take the message",
}

_BY_CLASS: tuple[tuple[str, DropReason], ...] = (
    ("FrameDecodeError", "decode_error"),
    ("ParameterError", "bad_parameter"),
    ("ModelError", "model_error"),
)


def drop_reason(error: BaseException) -> DropReason:
    """The ``DropReason`` of an error that cost a frame its result.

    Its ``reason`` attribute when that is one of ``DROP_REASONS`` (every error the worker raises on a
    frame sets one, checked by a test over the source), else the closest by class: ``decode_error``
    for a ``FrameDecodeError``, ``bad_parameter``, ``model_error``, and ``step_error`` for the rest.

    Example:
        >>> from worker.errors import ParameterError
        >>> drop_reason(ParameterError("confidence=2"))
        'bad_parameter'
    """
    reason = getattr(error, "reason", None)
    for known in DROP_REASONS:
        if reason == known:
            return known
    names = {cls.__name__ for cls in type(error).__mro__}
    return next((r for name, r in _BY_CLASS if name in names), "step_error")


class Telemetry(Protocol):
    """Events of the data path. Every method must be cheap, thread-safe and never raise."""

    def frame_received(self, source: str) -> None: ...
    def frame_dropped(self, source: str, reason: DropReason, count: int = 1) -> None: ...
    def frame_skipped(self, source: str, reason: SkipReason, count: int = 1) -> None: ...
    def frames_processed(self, source: str, count: int = 1) -> None: ...
    def result_lost(self, source: str, reason: LossReason, count: int = 1) -> None: ...
    def queue_depth(self, source: str, depth: int) -> None: ...
    def source_connected(self, source: str, connected: bool) -> None: ...
    def reconnect(self, target: str) -> None: ...
    def batch_done(self, size: int, model_seconds: float, postprocess_seconds: float) -> None: ...
    def e2e_latency(self, source: str, seconds: float) -> None: ...
    def broker_connected(self, connected: bool) -> None: ...
    def outbox_depth(self, depth: int) -> None: ...
    def published(self, kind: str) -> None: ...
    def publish_error(self, reason: str) -> None: ...
    def error(self, reason: ErrorReason) -> None: ...


class NullTelemetry:
    """Telemetry that records nothing."""

    def frame_received(self, source: str) -> None:
        pass

    def frame_dropped(self, source: str, reason: DropReason, count: int = 1) -> None:
        pass

    def frame_skipped(self, source: str, reason: SkipReason, count: int = 1) -> None:
        pass

    def frames_processed(self, source: str, count: int = 1) -> None:
        pass

    def result_lost(self, source: str, reason: LossReason, count: int = 1) -> None:
        pass

    def queue_depth(self, source: str, depth: int) -> None:
        pass

    def source_connected(self, source: str, connected: bool) -> None:
        pass

    def reconnect(self, target: str) -> None:
        pass

    def batch_done(self, size: int, model_seconds: float, postprocess_seconds: float) -> None:
        pass

    def e2e_latency(self, source: str, seconds: float) -> None:
        pass

    def broker_connected(self, connected: bool) -> None:
        pass

    def outbox_depth(self, depth: int) -> None:
        pass

    def published(self, kind: str) -> None:
        pass

    def publish_error(self, reason: str) -> None:
        pass

    def error(self, reason: ErrorReason) -> None:
        pass


class RecordingTelemetry(NullTelemetry):
    """Telemetry that counts events in memory (tests).

    Unlike ``Metrics`` it refuses a reason outside the closed sets (``ValueError``), so a test that
    drives a stage through it catches a reason that was never declared.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received: Counter[str] = Counter()
        self.processed: Counter[str] = Counter()
        self.dropped: Counter[tuple[str, str]] = Counter()
        self.skipped: Counter[tuple[str, str]] = Counter()
        self.lost: Counter[tuple[str, str]] = Counter()
        self.reconnects: Counter[str] = Counter()
        self.published_count: Counter[str] = Counter()
        self.publish_errors: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.connected: dict[str, bool] = {}
        self.broker_up: bool | None = None
        self.batches: list[tuple[int, float, float]] = []
        self.latencies: defaultdict[str, list[float]] = defaultdict(list)
        self.depths: dict[str, int] = {}
        self.outbox: int = 0

    def accounted(self, source: str) -> int:
        """``processed + Σ dropped + Σ skipped`` of ``source`` (equals ``received`` when nothing is in
        flight)."""
        with self._lock:
            dropped = sum(n for (s, _), n in self.dropped.items() if s == source)
            skipped = sum(n for (s, _), n in self.skipped.items() if s == source)
            return self.processed[source] + dropped + skipped

    def frame_received(self, source: str) -> None:
        with self._lock:
            self.received[source] += 1

    def frame_dropped(self, source: str, reason: DropReason, count: int = 1) -> None:
        _check(reason, DROP_REASONS)
        with self._lock:
            self.dropped[(source, reason)] += count

    def frame_skipped(self, source: str, reason: SkipReason, count: int = 1) -> None:
        _check(reason, SKIP_REASONS)
        with self._lock:
            self.skipped[(source, reason)] += count

    def frames_processed(self, source: str, count: int = 1) -> None:
        with self._lock:
            self.processed[source] += count

    def result_lost(self, source: str, reason: LossReason, count: int = 1) -> None:
        _check(reason, LOSS_REASONS)
        with self._lock:
            self.lost[(source, reason)] += count

    def queue_depth(self, source: str, depth: int) -> None:
        self.depths[source] = depth

    def source_connected(self, source: str, connected: bool) -> None:
        self.connected[source] = connected

    def reconnect(self, target: str) -> None:
        with self._lock:
            self.reconnects[target] += 1

    def batch_done(self, size: int, model_seconds: float, postprocess_seconds: float) -> None:
        with self._lock:
            self.batches.append((size, model_seconds, postprocess_seconds))

    def e2e_latency(self, source: str, seconds: float) -> None:
        with self._lock:
            self.latencies[source].append(seconds)

    def broker_connected(self, connected: bool) -> None:
        self.broker_up = connected

    def outbox_depth(self, depth: int) -> None:
        self.outbox = depth

    def published(self, kind: str) -> None:
        with self._lock:
            self.published_count[kind] += 1

    def publish_error(self, reason: str) -> None:
        with self._lock:
            self.publish_errors[reason] += 1

    def error(self, reason: ErrorReason) -> None:
        _check(reason, ERROR_REASONS)
        with self._lock:
            self.errors[reason] += 1


def _check(reason: str, allowed: tuple[str, ...]) -> None:
    if reason not in allowed:
        raise ValueError(f"reason {reason!r} is not one of {', '.join(allowed)}")
