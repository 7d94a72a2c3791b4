"""The publisher: outcomes to results or error reports, observers, gates, sinks that refuse or fail."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from worker.errors import SinkError, StepError
from worker.frame import Frame
from worker.messages import ErrorReport, FrameResult
from worker.publisher import PublishedFrame, Publisher
from worker.recorder import RunSummary
from worker.sinks import JsonlSink, JsonlSinkConfig, MemorySink
from worker.step.executor import BatchResult, FrameOutcome
from worker.telemetry import RecordingTelemetry


def _frame(n: int, source: str = "cam", timestamp: float = 100.0) -> Frame:
    return Frame(source, n, timestamp, np.zeros((4, 4, 3), np.uint8))


def _ok(n: int, source: str = "cam") -> FrameOutcome:
    return FrameOutcome(_frame(n, source), outputs={"n": n}, inference_id=f"i{n}", model_id="parts/1")


class Watcher:
    def __init__(self, log: list[str] | None = None) -> None:
        self.seen: list[PublishedFrame] = []
        self.closed = False
        self.log = log if log is not None else []

    def on_result(self, published: PublishedFrame) -> None:
        self.seen.append(published)
        self.log.append(f"observe {published.frame.frame_number}")

    async def aclose(self) -> None:
        self.closed = True


def _publisher(
    sinks: list[MemorySink], telemetry: RecordingTelemetry, summary: RunSummary, **kw: object
) -> Publisher:
    return Publisher(
        "line",
        sinks,
        telemetry=telemetry,
        summary=summary,
        primary_step="seg",
        class_names={"parts/1": ("bolt", "nut")},
        clock=lambda: 100.25,
        **kw,  # type: ignore[arg-type]
    )


async def test_a_batch_becomes_results_and_reports_in_order_then_a_flush() -> None:
    telemetry, summary, sink, watcher = RecordingTelemetry(), RunSummary(), MemorySink(), Watcher()
    publisher = _publisher([sink], telemetry, summary, observers=[summary, watcher])
    await publisher.start()
    failed = FrameOutcome(_frame(1), error=StepError("confidence out of range"))
    await publisher.publish_batch(BatchResult([_ok(0), failed, _ok(2)], 0.5, 0.25))

    assert [(r.frame_number, r.step, r.outputs, r.model_id) for r in sink.results] == [
        (0, "seg", {"n": 0}, "parts/1"),
        (2, "seg", {"n": 2}, "parts/1"),
    ]
    (report,) = sink.errors
    assert (report.frame_id, report.frame_number, report.reason) == ("cam:1", 1, StepError.reason)
    assert sink.flushes == 1
    assert telemetry.processed["cam"] == 2
    assert telemetry.dropped[("cam", StepError.reason)] == 1
    assert telemetry.latencies["cam"] == [0.25, 0.25]
    assert telemetry.batches == [(3, 0.5, 0.25)]
    assert summary.frames["cam"] == 2 and summary.errors[StepError.reason] == 1 and summary.batches == 1
    assert [(p.frame.frame_number, p.class_names, p.latency_s) for p in watcher.seen] == [
        (0, ("bolt", "nut"), 0.25),
        (2, ("bolt", "nut"), 0.25),
    ]
    assert watcher.seen[0].result is sink.results[0]
    assert await publisher.aclose(1.0) == 0
    assert sink.closed and watcher.closed


async def test_gates_are_awaited_before_each_result_reaches_the_observers() -> None:
    order: list[str] = []
    watcher = Watcher(order)

    async def gate() -> None:
        order.append("gate")

    publisher = _publisher(
        [MemorySink()], RecordingTelemetry(), RunSummary(), observers=[watcher], gates=[gate]
    )
    await publisher.start()
    await publisher.publish_batch(BatchResult([_ok(0), _ok(1)], 0.0, 0.0))
    assert order == ["gate", "observe 0", "gate", "observe 1"]
    await publisher.aclose(1.0)


async def test_a_sink_refusing_a_message_is_counted_and_the_others_still_get_it() -> None:
    telemetry, good = RecordingTelemetry(), MemorySink("good")
    closed = MemorySink("closed")
    publisher = _publisher([closed, good], telemetry, RunSummary())
    await publisher.start()
    await closed.close()  # from now on it refuses everything with SinkError
    await publisher.publish_outcome(_ok(0))
    await publisher.report(ErrorReport("line", "cam", "decode_error", "not an image"))
    assert len(good.results) == 1 and len(good.errors) == 1
    assert telemetry.publish_errors["sink_refused"] == 2
    await publisher.aclose(1.0)


async def test_report_soon_is_delivered_before_the_sinks_close() -> None:
    sink = MemorySink()
    summary = RunSummary()
    publisher = _publisher([sink], RecordingTelemetry(), summary)
    await publisher.start()
    publisher.report_soon(ErrorReport("line", "cam", "oversize", "too big"))
    assert summary.errors["oversize"] == 1
    await publisher.aclose(5.0)
    assert [e.reason for e in sink.errors] == ["oversize"]


async def test_unprocessed_frames_get_one_report_each_and_count_as_dropped() -> None:
    telemetry, sink = RecordingTelemetry(), MemorySink()
    publisher = _publisher([sink], telemetry, RunSummary())
    await publisher.start()
    await publisher.report_unprocessed([_frame(3), _frame(4)], "shutdown_unprocessed", "stopped")
    assert [(e.frame_id, e.reason) for e in sink.errors] == [
        ("cam:3", "shutdown_unprocessed"),
        ("cam:4", "shutdown_unprocessed"),
    ]
    assert telemetry.dropped[("cam", "shutdown_unprocessed")] == 2
    await publisher.aclose(1.0)


async def test_a_sink_that_cannot_start_closes_the_ones_already_started(tmp_path: Path) -> None:
    first = MemorySink("first")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    broken = JsonlSink(JsonlSinkConfig(path=not_a_dir / "out.jsonl"))
    last = MemorySink("last")
    publisher = Publisher(
        "line",
        [first, broken, last],
        telemetry=RecordingTelemetry(),
        summary=RunSummary(),
        primary_step="seg",
        class_names={},
    )
    with pytest.raises(SinkError, match="cannot open output"):
        await publisher.start()
    assert first.closed and not last.started
    assert await publisher.aclose(1.0) == 0  # nothing left to close


async def test_broker_connected_reads_the_sinks_that_have_a_broker() -> None:
    class BrokerSink(MemorySink):
        up = False

        @property
        def connected(self) -> bool | None:
            return self.up

    plain, broker = MemorySink(), BrokerSink()
    assert plain.connected is None
    publisher = _publisher([plain, broker], RecordingTelemetry(), RunSummary())
    assert not publisher.broker_connected()
    broker.up = True
    assert publisher.broker_connected()
    assert not _publisher([plain], RecordingTelemetry(), RunSummary()).broker_connected()


async def test_a_result_message_keeps_the_frame_ids_and_timestamp() -> None:
    sink = MemorySink()
    publisher = _publisher([sink], RecordingTelemetry(), RunSummary())
    await publisher.start()
    outcome = FrameOutcome(
        Frame("cam", 7, 99.5, np.zeros((2, 2, 3), np.uint8), frame_id="sender-7"),
        outputs={},
        model_id="parts/1",
    )
    await publisher.publish_outcome(outcome)
    (result,) = sink.results
    assert isinstance(result, FrameResult)
    assert (result.frame_id, result.frame_number, result.timestamp, result.pipeline) == (
        "sender-7",
        7,
        99.5,
        "line",
    )
    await asyncio.wait_for(publisher.aclose(1.0), 5)
