"""Metrics driven through the Telemetry calls, scraped over HTTP and parsed like Prometheus does."""

from __future__ import annotations

import inspect
import random
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from tests.ops.conftest import ServeFactory
from worker.http_server import HealthState
from worker.metrics import DROP_REASONS, Metrics
from worker.telemetry import Telemetry

REQUIRED = {
    "segstream_frames_received": ("counter", {"source"}),
    "segstream_frames_processed": ("counter", {"source"}),
    "segstream_frames_dropped": ("counter", {"source", "reason"}),
    "segstream_batch_size": ("histogram", set()),
    "segstream_model_seconds": ("histogram", set()),
    "segstream_postprocess_seconds": ("histogram", set()),
    "segstream_e2e_latency_seconds": ("histogram", {"source"}),
    "segstream_queue_depth": ("gauge", {"source"}),
    "segstream_outbox_depth": ("gauge", set()),
    "segstream_sources_connected": ("gauge", set()),
    "segstream_broker_connected": ("gauge", set()),
    "segstream_reconnects": ("counter", {"target"}),
    "segstream_published_messages": ("counter", {"kind"}),
    "segstream_publish_errors": ("counter", {"reason"}),
    "segstream_errors": ("counter", {"reason"}),
}


def _families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict[str, object], sample: str, **labels: str) -> float:
    """The value of the one sample named ``sample`` with ``labels`` (in any family)."""
    for family in families.values():
        for s in family.samples:  # type: ignore[attr-defined]
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise KeyError(f"{sample}{labels}")


def test_metrics_implements_every_telemetry_method_with_the_same_signature() -> None:
    for name, member in inspect.getmembers(Telemetry, inspect.isfunction):
        if name.startswith("_"):
            continue
        impl = getattr(Metrics, name)
        assert inspect.signature(impl) == inspect.signature(member), name


async def test_scrape_names_labels_and_conservation(serve: ServeFactory) -> None:
    metrics = Metrics("line-3", version="0.1.0", sources=["cam1", "cam2"])
    telemetry: Telemetry = metrics
    rng = random.Random(7)
    expected_received: dict[str, int] = defaultdict(int)
    expected_processed: dict[str, int] = defaultdict(int)
    expected_dropped: dict[tuple[str, str], int] = defaultdict(int)
    # every frame received ends up processed or dropped for exactly one reason
    for _ in range(500):
        source = rng.choice(["cam1", "cam2"])
        telemetry.frame_received(source)
        expected_received[source] += 1
        if rng.random() < 0.7:
            telemetry.frames_processed(source)
            expected_processed[source] += 1
            telemetry.e2e_latency(source, rng.uniform(0.02, 0.4))
        else:
            reason = rng.choice(DROP_REASONS)
            telemetry.frame_dropped(source, reason)
            expected_dropped[(source, reason)] += 1
    telemetry.batch_done(4, 0.031, 0.004)
    telemetry.batch_done(2, 0.020, 0.003)
    telemetry.queue_depth("cam1", 3)
    telemetry.outbox_depth(17)
    telemetry.source_connected("cam1", True)
    telemetry.source_connected("cam2", True)
    telemetry.source_connected("cam2", False)
    telemetry.source_connected("cam2", False)  # repeated state changes nothing
    telemetry.broker_connected(True)
    telemetry.reconnect("broker")
    telemetry.reconnect("cam2")
    telemetry.reconnect("cam2")
    telemetry.published("result")
    telemetry.publish_error("timeout")
    telemetry.error("bad_parameter")

    async with serve(metrics, HealthState()) as s:
        status, body, headers = await s.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = _families(body.decode())

    for name, (kind, labels) in REQUIRED.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, name  # type: ignore[attr-defined]
        for sample in family.samples:  # type: ignore[attr-defined]
            assert set(sample.labels) - {"le"} == labels, (name, sample)

    for source in ("cam1", "cam2"):
        received = _value(families, "segstream_frames_received_total", source=source)
        processed = _value(families, "segstream_frames_processed_total", source=source)
        dropped = {
            reason: _value(
                families,
                "segstream_frames_dropped_total",
                source=source,
                reason=reason,
            )
            for reason in DROP_REASONS
        }
        assert received == expected_received[source]
        assert processed == expected_processed[source]
        assert dropped == {r: expected_dropped[(source, r)] for r in DROP_REASONS}
        assert received == processed + sum(dropped.values())
        count = _value(families, "segstream_e2e_latency_seconds_count", source=source)
        assert count == processed

    assert _value(families, "segstream_batch_size_count") == 2
    assert _value(families, "segstream_batch_size_sum") == 6
    assert _value(families, "segstream_batch_size_bucket", le="2.0") == 1
    assert abs(_value(families, "segstream_model_seconds_sum") - 0.051) < 1e-9
    assert _value(families, "segstream_queue_depth", source="cam1") == 3
    assert _value(families, "segstream_outbox_depth") == 17
    assert _value(families, "segstream_sources_connected") == 1
    assert _value(families, "segstream_broker_connected") == 1
    assert _value(families, "segstream_reconnects_total", target="cam2") == 2
    assert _value(families, "segstream_published_messages_total", kind="result") == 1
    assert _value(families, "segstream_build_info", pipeline="line-3", version="0.1.0") == 1


async def test_openmetrics_is_negotiated(serve: ServeFactory) -> None:
    metrics = Metrics("p")
    metrics.frame_received("cam1")
    async with serve(metrics, HealthState()) as s:
        status, body, headers = await s.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_series_exist_at_zero_for_declared_sources_and_reasons() -> None:
    families = _families(Metrics("p", sources=["cam9"]).render()[0].decode())
    assert _value(families, "segstream_frames_received_total", source="cam9") == 0
    for reason in DROP_REASONS:
        value = _value(families, "segstream_frames_dropped_total", source="cam9", reason=reason)
        assert value == 0


def test_label_values_are_bounded() -> None:
    metrics = Metrics("p", max_label_values=4)
    for i in range(50):  # a bug that labels by frame id must not grow the series count
        metrics.frame_received(f"frame-{i}")
        metrics.error(f"reason-{i}")
    families = _families(metrics.render()[0].decode())
    sources = {s.labels["source"] for s in families["segstream_frames_received"].samples}  # type: ignore[attr-defined]
    reasons = {s.labels["reason"] for s in families["segstream_errors"].samples}  # type: ignore[attr-defined]
    assert len(sources) == 4 and "other" in sources
    assert len(reasons) == 4 and "other" in reasons
    total = sum(s.value for s in families["segstream_frames_received"].samples if s.name.endswith("_total"))  # type: ignore[attr-defined]
    assert total == 50  # nothing lost, only folded


def test_registries_are_independent() -> None:
    a, b = Metrics("a"), Metrics("b")
    a.frame_received("cam1")
    fa, fb = _families(a.render()[0].decode()), _families(b.render()[0].decode())
    assert _value(fa, "segstream_frames_received_total", source="cam1") == 1
    assert not [s for s in fb["segstream_frames_received"].samples if s.labels.get("source") == "cam1"]  # type: ignore[attr-defined]


def test_snapshot_sums_drops_per_source() -> None:
    m = Metrics("p")
    m.frame_received("cam1")
    m.frame_dropped("cam1", "stale", 3)
    m.frame_dropped("cam1", "decode_error")
    m.e2e_latency("cam1", 0.25)
    m.e2e_latency("cam1", 0.75)
    snap = m.snapshot()["cam1"]
    assert (snap.received, snap.dropped, snap.latency_count, snap.latency_sum) == (1, 4, 2, 1.0)
