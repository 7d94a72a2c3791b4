"""Outbox, topic templates, MemorySink, the config union and registry, and the package's exports."""

from __future__ import annotations

import asyncio
import importlib
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

import worker.sinks
from worker.errors import ConfigError, SinkError
from worker.messages import ErrorReport, FrameResult
from worker.mqtt import BrokerConfig
from worker.sinks import (
    SINK_REGISTRY,
    HttpSink,
    JsonlSink,
    MemorySink,
    MqttSink,
    Outbox,
    OutgoingMessage,
    Sink,
    SinkConfig,
    StdoutSink,
    TopicTemplate,
    build_sink,
)
from worker.telemetry import RecordingTelemetry


def message(source: str, n: int) -> OutgoingMessage:
    return OutgoingMessage(f"t/{source}", str(n).encode(), 1, False, "result", source)


def test_outbox_keeps_order_skips_sent_and_drops_oldest_on_overflow() -> None:
    telemetry = RecordingTelemetry()
    box = Outbox(3, telemetry)
    for n in range(3):
        box.put(message("a", n))
    seq0, first = box.next_unsent(set()) or (0, None)
    assert first == message("a", 0)
    seq1, second = box.next_unsent({seq0}) or (0, None)
    assert second == message("a", 1)
    box.put(message("b", 3))  # full: the oldest (in flight) goes
    assert len(box) == 3 and telemetry.lost == {("a", "outbox_overflow"): 1}
    assert box.ack(seq0) is None  # its late PUBACK finds nothing
    assert box.ack(seq1) == message("a", 1)
    assert [m.payload for m in box.take_all()] == [b"2", b"3"]
    assert len(box) == 0 and telemetry.outbox == 0


@pytest.mark.parametrize(
    ("template", "values", "expected", "expectation"),
    [
        ("s/{pipeline}/{source}", {"pipeline": "p", "source": "c"}, "s/p/c", nullcontext()),
        ("s/{source}/x", {"source": "c", "unused": "u"}, "s/c/x", nullcontext()),
        ("s/{source}", {"source": "c+1"}, None, pytest.raises(SinkError, match="wildcard")),
        ("s/{source}", {"source": "c#"}, None, pytest.raises(SinkError, match="wildcard")),
        ("s/{source}", {}, None, pytest.raises(SinkError, match="needs a value")),
        ("s/{model}", {}, None, pytest.raises(ValueError, match="unknown placeholder")),
        ("s/{source:>5}", {}, None, pytest.raises(ValueError, match="format specs")),
        ("s/{source", {}, None, pytest.raises(ValueError, match="topic template")),
        ("", {}, None, pytest.raises(ValueError, match="empty")),
    ],
)
def test_topic_template(
    template: str, values: dict[str, str], expected: str | None, expectation: AbstractContextManager[object]
) -> None:
    with expectation:
        assert TopicTemplate(template, {"pipeline", "source"}).format(**values) == expected


async def test_memory_sink_collects_and_lets_tests_wait() -> None:
    telemetry = RecordingTelemetry()
    sink = MemorySink(telemetry=telemetry, max_items=2)
    with pytest.raises(SinkError):
        await sink.publish_result(_result(0))  # not started
    async with sink:
        waiter = asyncio.create_task(sink.wait_for(results=3, errors=1, timeout=10))
        for n in range(3):
            await sink.publish_result(_result(n))
        await sink.publish_error(ErrorReport("p", "cam1", "bad_parameter", "confidence=2"))
        await waiter
        assert [r.frame_number for r in sink.results] == [1, 2]  # max_items keeps the newest
        with pytest.raises(TimeoutError, match="got 3 / 1"):
            await sink.wait_for(results=4, timeout=0.05)
    assert sink.closed and telemetry.published_count == {"result": 3, "error": 1}


def _result(n: int) -> FrameResult:
    return FrameResult("p", "cam1", n, f"cam1:{n}", 1.0, "seg", "i", "m/1", {})


@pytest.mark.parametrize(
    ("data", "cls"),
    [
        ({"type": "mqtt"}, MqttSink),
        ({"type": "jsonl", "path": "out.jsonl"}, JsonlSink),
        ({"type": "stdout", "mode": "summary"}, StdoutSink),
        ({"type": "http", "url": "https://mes.example/hook"}, HttpSink),
    ],
)
def test_build_sink_from_a_pipeline_entry(data: dict[str, object], cls: type) -> None:
    config = TypeAdapter(SinkConfig).validate_python(data)
    sink = build_sink(config, pipeline="p", broker=BrokerConfig(), telemetry=None)
    assert isinstance(sink, cls) and isinstance(sink, Sink)
    assert set(SINK_REGISTRY) == {"mqtt", "jsonl", "stdout", "http"}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"type": "kafka"}, "does not match any of the expected tags"),
        ({"type": "jsonl"}, "path"),
        ({"type": "jsonl", "path": "x", "pth": "y"}, "pth"),
        ({"type": "stdout", "mode": "loud"}, "mode"),
    ],
)
def test_bad_sink_entries_name_the_field(data: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        TypeAdapter(SinkConfig).validate_python(data)


def test_an_mqtt_sink_needs_broker_settings() -> None:
    config = TypeAdapter(SinkConfig).validate_python({"type": "mqtt"})
    with pytest.raises(ConfigError, match="broker"):
        build_sink(config, pipeline="p", broker=None, telemetry=None)


@pytest.mark.parametrize(
    "module",
    [
        "worker.batching",
        "worker.sinks",
        "worker.sinks.base",
        "worker.sinks.factory",
        "worker.sinks.lines",
        "worker.sinks.memory",
        "worker.sinks.mqtt",
        "worker.sinks.outbox",
    ],
)
def test_all_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__all__ and all(hasattr(mod, name) for name in mod.__all__)


def test_package_exports_every_public_sink_name() -> None:
    package_dir = Path(worker.sinks.__file__).parent
    for path in package_dir.glob("*.py"):
        if path.stem == "__init__":
            continue
        mod = importlib.import_module(f"worker.sinks.{path.stem}")
        # what a module exports is exported by the package, except helpers used by the line sinks
        missing = set(mod.__all__) - set(worker.sinks.__all__) - {"LineSink", "SinkContextMixin"}
        assert not missing, f"{path.stem}: {missing}"
