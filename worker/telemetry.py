"""What the stages report as they work, decoupled from how it is exported.

Every stage (sources, batcher, step runner, sinks, runtime) receives one ``Telemetry`` object from the
composition root and calls it; the Prometheus ``Metrics`` object implements it, tests can use
``RecordingTelemetry``. Label values are bounded: source ids, drop reasons and target names from the
pipeline file, never frame or detection ids.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from typing import Protocol

__all__ = ["NullTelemetry", "RecordingTelemetry", "Telemetry"]


class Telemetry(Protocol):
    """Events of the data path. Every method must be cheap, thread-safe and never raise."""

    def frame_received(self, source: str) -> None: ...
    def frame_dropped(self, source: str, reason: str, count: int = 1) -> None: ...
    def frames_processed(self, source: str, count: int = 1) -> None: ...
    def queue_depth(self, source: str, depth: int) -> None: ...
    def source_connected(self, source: str, connected: bool) -> None: ...
    def reconnect(self, target: str) -> None: ...
    def batch_done(self, size: int, model_seconds: float, postprocess_seconds: float) -> None: ...
    def e2e_latency(self, source: str, seconds: float) -> None: ...
    def broker_connected(self, connected: bool) -> None: ...
    def outbox_depth(self, depth: int) -> None: ...
    def published(self, kind: str) -> None: ...
    def publish_error(self, reason: str) -> None: ...
    def error(self, reason: str) -> None: ...


class NullTelemetry:
    """Telemetry that records nothing."""

    def frame_received(self, source: str) -> None:
        pass

    def frame_dropped(self, source: str, reason: str, count: int = 1) -> None:
        pass

    def frames_processed(self, source: str, count: int = 1) -> None:
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

    def error(self, reason: str) -> None:
        pass


class RecordingTelemetry(NullTelemetry):
    """Telemetry that counts events in memory (tests, the demo's summary)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received: Counter[str] = Counter()
        self.processed: Counter[str] = Counter()
        self.dropped: Counter[tuple[str, str]] = Counter()
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

    def frame_received(self, source: str) -> None:
        with self._lock:
            self.received[source] += 1

    def frame_dropped(self, source: str, reason: str, count: int = 1) -> None:
        with self._lock:
            self.dropped[(source, reason)] += count

    def frames_processed(self, source: str, count: int = 1) -> None:
        with self._lock:
            self.processed[source] += count

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

    def error(self, reason: str) -> None:
        with self._lock:
            self.errors[reason] += 1
