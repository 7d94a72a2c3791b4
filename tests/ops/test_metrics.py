"""Metrics driven through the Telemetry calls, scraped over HTTP and parsed like Prometheus does; the
per-source totals beside them; the closed reason sets against every reason the code uses."""

from __future__ import annotations

import ast
import inspect
import random
from collections import defaultdict
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.ops.conftest import ServeFactory
from worker.ops.health import HealthState
from worker.ops.metrics import METRICS, OTHER, Metrics
from worker.telemetry import (
    DROP_REASONS,
    ERROR_REASONS,
    LOSS_REASONS,
    REASON_HELP,
    SKIP_REASONS,
    DropReason,
    LossReason,
    SkipReason,
    Telemetry,
    drop_reason,
)

REQUIRED = {
    "segstream_frames_received": ("counter", {"source"}),
    "segstream_frames_processed": ("counter", {"source"}),
    "segstream_frames_dropped": ("counter", {"source", "reason"}),
    "segstream_frames_skipped": ("counter", {"source", "reason"}),
    "segstream_results_lost": ("counter", {"source", "reason"}),
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
    "segstream_detections": ("counter", {"source", "class"}),
}
REASONED = {
    "segstream_frames_dropped_total": DROP_REASONS,
    "segstream_frames_skipped_total": SKIP_REASONS,
    "segstream_results_lost_total": LOSS_REASONS,
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
    expected: dict[str, dict[tuple[str, str], int]] = {name: defaultdict(int) for name in REASONED}
    # every frame received ends up processed, dropped or skipped for exactly one reason
    for _ in range(500):
        source = rng.choice(["cam1", "cam2"])
        telemetry.frame_received(source)
        expected_received[source] += 1
        draw = rng.random()
        if draw < 0.6:
            telemetry.frames_processed(source)
            expected_processed[source] += 1
            telemetry.e2e_latency(source, rng.uniform(0.02, 0.4))
            if rng.random() < 0.1:  # and sometimes its message is lost at a sink afterwards
                loss: LossReason = rng.choice(LOSS_REASONS)
                telemetry.result_lost(source, loss)
                expected["segstream_results_lost_total"][(source, loss)] += 1
        elif draw < 0.8:
            drop: DropReason = rng.choice(DROP_REASONS)
            telemetry.frame_dropped(source, drop)
            expected["segstream_frames_dropped_total"][(source, drop)] += 1
        else:
            skip: SkipReason = rng.choice(SKIP_REASONS)
            telemetry.frame_skipped(source, skip)
            expected["segstream_frames_skipped_total"][(source, skip)] += 1
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
        by_reason = {
            name: {r: _value(families, name, source=source, reason=r) for r in reasons}
            for name, reasons in REASONED.items()
        }
        assert received == expected_received[source]
        assert processed == expected_processed[source]
        for name, reasons in REASONED.items():
            assert by_reason[name] == {r: expected[name][(source, r)] for r in reasons}, name
        dropped = sum(by_reason["segstream_frames_dropped_total"].values())
        skipped = sum(by_reason["segstream_frames_skipped_total"].values())
        assert received == processed + dropped + skipped
        snap = metrics.snapshot()[source]  # the plain totals agree with the scrape
        assert (snap.received, snap.processed, snap.dropped, snap.skipped) == (
            received,
            processed,
            dropped,
            skipped,
        )
        assert snap.lost == sum(by_reason["segstream_results_lost_total"].values())
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


def test_series_exist_at_zero_for_declared_sources_and_every_reason() -> None:
    families = _families(Metrics("p", sources=["cam9"]).render()[0].decode())
    assert _value(families, "segstream_frames_received_total", source="cam9") == 0
    for name, reasons in REASONED.items():
        present = {
            s.labels["reason"]
            for f in families.values()
            for s in f.samples  # type: ignore[attr-defined]
            if s.name == name and s.labels["source"] == "cam9"
        }
        assert present == set(reasons), name  # exactly the closed set, all at 0
        assert all(_value(families, name, source="cam9", reason=r) == 0 for r in reasons)


def test_worker_errors_are_a_closed_set_at_zero_from_start_up() -> None:
    m = Metrics("p")
    families = _families(m.render()[0].decode())
    assert {r: _value(families, "segstream_errors_total", reason=r) for r in ERROR_REASONS} == dict.fromkeys(
        ERROR_REASONS, 0
    )
    m.error("stage_failed")
    m.error("stage_failed")
    families = _families(m.render()[0].decode())
    assert _value(families, "segstream_errors_total", reason="stage_failed") == 2


def test_an_undeclared_reason_is_counted_as_other_not_lost(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics("p", sources=["cam1"])
    m.frame_dropped("cam1", "made_up")  # type: ignore[arg-type]
    m.frame_dropped("cam1", "made_up")  # type: ignore[arg-type]
    families = _families(m.render()[0].decode())
    assert _value(families, "segstream_frames_dropped_total", source="cam1", reason=OTHER) == 2
    assert m.snapshot()["cam1"].dropped == 2
    assert "undeclared reason 'made_up'" in caplog.text


def test_label_values_are_bounded() -> None:
    metrics = Metrics("p", max_label_values=4)
    for i in range(50):  # a bug that labels by frame id must not grow the series count
        metrics.frame_received(f"frame-{i}")
        metrics.publish_error(f"reason-{i}")
    families = _families(metrics.render()[0].decode())
    sources = {s.labels["source"] for s in families["segstream_frames_received"].samples}  # type: ignore[attr-defined]
    reasons = {s.labels["reason"] for s in families["segstream_publish_errors"].samples}  # type: ignore[attr-defined]
    assert len(sources) == 4 and "other" in sources
    assert len(reasons) == 4 and "other" in reasons
    total = sum(s.value for s in families["segstream_frames_received"].samples if s.name.endswith("_total"))  # type: ignore[attr-defined]
    assert total == 50  # nothing lost, only folded


def test_detections_are_counted_per_source_and_class_with_bounded_labels() -> None:
    metrics = Metrics("p", sources=["cam1"], max_label_values=4)
    metrics.detections("cam1", "bolt", 3)
    metrics.detections("cam1", "bolt")
    metrics.detections("cam1", "nut", 0)  # nothing to count: no series
    for i in range(20):  # a bug that labels by instance must not grow the series count
        metrics.detections("cam1", f"class-{i}", 2)
    families = _families(metrics.render()[0].decode())
    samples = [s for s in families["segstream_detections"].samples if s.name.endswith("_total")]  # type: ignore[attr-defined]
    by_class = {s.labels["class"]: s.value for s in samples if s.labels["source"] == "cam1"}
    assert by_class["bolt"] == 4 and "nut" not in by_class
    assert len(by_class) == 4 and "other" in by_class
    assert sum(by_class.values()) == 4 + 20 * 2  # nothing lost, only folded


def test_registries_are_independent() -> None:
    a, b = Metrics("a"), Metrics("b")
    a.frame_received("cam1")
    fa, fb = _families(a.render()[0].decode()), _families(b.render()[0].decode())
    assert _value(fa, "segstream_frames_received_total", source="cam1") == 1
    assert not [s for s in fb["segstream_frames_received"].samples if s.labels.get("source") == "cam1"]  # type: ignore[attr-defined]


def test_snapshot_keeps_plain_totals_per_source() -> None:
    m = Metrics("p")
    m.frame_received("cam1")
    m.frame_dropped("cam1", "oversize", 3)
    m.frame_dropped("cam1", "decode_error")
    m.frame_skipped("cam1", "stale", 2)
    m.e2e_latency("cam1", 0.25)
    m.e2e_latency("cam1", 0.75)
    m.queue_depth("cam1", 5)
    m.source_connected("cam1", True)
    snap = m.snapshot()["cam1"]
    assert (snap.received, snap.dropped, snap.skipped, snap.latency_count, snap.latency_sum) == (
        1,
        4,
        2,
        2,
        1.0,
    )
    assert (snap.queue_depth, snap.connected) == (5, True)


def test_the_metric_table_is_what_the_registry_exports() -> None:
    m = Metrics("p", sources=["cam1"])
    m.model_loaded("parts/1", "onnxruntime", "fp32", ["CPUExecutionProvider"], ["CPUExecutionProvider"])
    m.reconnect("broker")
    m.published("result")
    m.publish_error("timeout")
    m.detections("cam1", "bolt")
    kinds = {
        f.name: (f.type, {k for s in f.samples if not s.name.endswith("_created") for k in s.labels} - {"le"})
        for f in m.registry.collect()
    }
    declared = {spec.name: (spec.kind, set(spec.labels)) for spec in METRICS}
    assert kinds == declared


def test_drop_reason_maps_every_error_into_the_closed_set() -> None:
    from worker.errors import FrameDecodeError, ModelError, ParameterError, SinkError, StepError
    from worker.models.registry import InvalidModelIdError

    assert drop_reason(FrameDecodeError("x", reason="oversize")) == "oversize"
    assert drop_reason(ParameterError("x")) == "bad_parameter"
    assert drop_reason(StepError("x")) == "step_error"
    assert drop_reason(InvalidModelIdError("x")) == "invalid_model_id"
    assert drop_reason(ModelError("x")) == "model_error"
    odd = ModelError("x")
    odd.reason = "something_new"
    assert drop_reason(odd) == "model_error"  # by class when the reason is not declared
    assert drop_reason(SinkError("x")) == "step_error"
    assert drop_reason(ValueError("x")) == "step_error"


def test_the_telemetry_signatures_carry_the_closed_sets() -> None:
    hints = {name: get_type_hints(getattr(Telemetry, name)) for name in ("frame_dropped", "frame_skipped")}
    assert get_args(hints["frame_dropped"]["reason"]) == DROP_REASONS
    assert get_args(hints["frame_skipped"]["reason"]) == SKIP_REASONS
    assert get_args(get_type_hints(Telemetry.result_lost)["reason"]) == LOSS_REASONS
    assert set(SKIP_REASONS) == {"max_fps", "stale"}
    assert get_args(get_type_hints(Telemetry.error)["reason"]) == ERROR_REASONS
    every = (*DROP_REASONS, *SKIP_REASONS, *LOSS_REASONS, *ERROR_REASONS)
    assert len(set(every)) == len(every)  # no reason in two sets
    assert set(REASON_HELP) == set(every)


_WORKER = Path(__file__).resolve().parents[2] / "worker"
_REASON_CALLS = {
    "frame_dropped": DROP_REASONS,
    "frame_skipped": SKIP_REASONS,
    "result_lost": LOSS_REASONS,
    "report_unprocessed": DROP_REASONS,
}


def _reasons_in_source() -> list[tuple[str, str, str]]:
    """(place, kind, reason) for every literal reason the worker's code passes or assigns."""
    found = []
    for path in sorted(_WORKER.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            place = f"{path.relative_to(_WORKER.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                name = (
                    node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                )
                args = [*node.args[1:2], *(k.value for k in node.keywords if k.arg == "reason")]
                if name in _REASON_CALLS:
                    found += [(place, name, a.value) for a in args if isinstance(a, ast.Constant)]
                elif name == "FrameDecodeError":
                    found += [
                        (place, "frame_dropped", k.value.value)
                        for k in node.keywords
                        if k.arg == "reason" and isinstance(k.value, ast.Constant)
                    ]
            elif isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Constant):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(getattr(t, "attr", getattr(t, "id", None)) == "reason" for t in targets):
                    found.append((place, "error_reason", node.value.value))
    return found


def test_every_reason_the_code_uses_is_declared() -> None:
    found = _reasons_in_source()
    calls = [(p, k, r) for p, k, r in found if k in _REASON_CALLS]
    assert len(calls) >= 12, calls  # the scan sees the call sites (sources, queues, sinks)
    for place, kind, reason in calls:
        assert reason in _REASON_CALLS[kind], f"{place}: {kind}({reason!r}) is not declared"
    # the reasons errors carry: those that reach a dropped frame are in the set; the rest never do
    # (SegstreamError's own "error" and the config/source/sink errors never cost a frame its result)
    not_frame = {"error", "config_error", "source_error", "sink_error", "quantization_refused"}
    frame_errors = {r for _, k, r in found if k == "error_reason"} - not_frame
    assert frame_errors <= set(DROP_REASONS), frame_errors - set(DROP_REASONS)
