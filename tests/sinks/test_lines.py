"""JSONL and stdout sinks: valid lines, kinds, order, flushing, failures."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.support.messages import validate_line
from worker.errors import SinkError
from worker.messages import ErrorReport, FrameResult
from worker.sinks import JsonlSink, JsonlSinkConfig, StdoutSink, StdoutSinkConfig
from worker.sinks.lines import count_detections
from worker.telemetry import RecordingTelemetry


def result(source: str, n: int, detections: int = 2) -> FrameResult:
    predictions = [{"class": "bolt", "confidence": 0.9, "rle": {"size": [4, 4], "counts": "04"}}] * detections
    return FrameResult(
        pipeline="line-3",
        source_id=source,
        frame_number=n,
        frame_id=f"{source}:{n}",
        timestamp=100.0 + n,
        step="seg",
        inference_id=f"inf-{n}",
        model_id="factory-parts/1",
        outputs={"predictions": {"image": {"width": 4, "height": 4}, "predictions": predictions}},
        processed_at=100.25 + n,
    )


def error(n: int) -> ErrorReport:
    return ErrorReport("line-3", "cam1", "decode_error", "bad JPEG", frame_id=f"cam1:{n}", frame_number=n)


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def test_jsonl_writes_one_valid_line_per_message_in_order(tmp_path: Path) -> None:
    telemetry = RecordingTelemetry()
    path = tmp_path / "out" / "line-3.jsonl"
    sink = JsonlSink(JsonlSinkConfig(path=path), telemetry=telemetry)
    await sink.start()
    await sink.publish_result(result("cam1", 0))
    await sink.publish_error(error(1))
    await sink.publish_result(result("cam2", 0))
    assert path.read_bytes() == b""  # buffered until the end of the batch
    await sink.flush()
    lines = read_lines(path)
    assert [(line["kind"], line["frame_id"]) for line in lines] == [
        ("result", "cam1:0"),
        ("error", "cam1:1"),
        ("result", "cam2:0"),
    ]
    assert lines[0] == {"kind": "result", **result("cam1", 0).to_dict()}
    assert lines[1]["reason"] == "decode_error"
    assert await sink.close(5) == 0
    assert telemetry.published_count == {"result": 2, "error": 1}
    with pytest.raises(SinkError):
        await sink.publish_result(result("cam1", 2))


async def test_jsonl_appends_and_can_send_errors_elsewhere(tmp_path: Path) -> None:
    path, errors = tmp_path / "results.jsonl", tmp_path / "errors.jsonl"
    path.write_bytes(b'{"kind":"result","frame_id":"old"}\n')
    async with JsonlSink(JsonlSinkConfig(path=path, errors_path=errors)) as sink:
        await sink.publish_result(result("cam1", 0))
        await sink.publish_error(error(1))
    assert [line["frame_id"] for line in read_lines(path)] == ["old", "cam1:0"]  # close flushed
    assert [(line["kind"], line["frame_id"]) for line in read_lines(errors)] == [("error", "cam1:1")]


@pytest.mark.parametrize(
    ("mode", "results", "errors"),
    [
        ("append", ["old", "cam1:0", "cam1:0"], ["old", "cam1:0", "cam1:1"]),
        ("overwrite", ["cam1:0"], ["cam1:1"]),
    ],
)
async def test_jsonl_mode_appends_or_starts_the_files_afresh(
    tmp_path: Path, mode: str, results: list[str], errors: list[str]
) -> None:
    path, errors_path = tmp_path / "results.jsonl", tmp_path / "errors.jsonl"
    for file in (path, errors_path):
        file.write_bytes(b'{"kind":"result","frame_id":"old"}\n')  # left by an earlier run
    config = JsonlSinkConfig.model_validate({"path": path, "errors_path": errors_path, "mode": mode})
    for run in range(2):  # two runs of the worker
        async with JsonlSink(config) as sink:
            await sink.publish_result(result("cam1", 0))
            await sink.publish_error(error(run))
    assert [line["frame_id"] for line in read_lines(path)] == results
    assert [line["frame_id"] for line in read_lines(errors_path)] == errors
    validate_line(errors_path.read_text().splitlines()[-1])


def test_jsonl_mode_is_checked() -> None:
    with pytest.raises(ValidationError, match="'append' or 'overwrite'"):
        JsonlSinkConfig.model_validate({"path": "x.jsonl", "mode": "truncate"})


async def test_jsonl_flushes_by_itself_past_flush_bytes(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    async with JsonlSink(JsonlSinkConfig(path=path, flush_bytes=1)) as sink:
        await sink.publish_result(result("cam1", 0))
        assert len(read_lines(path)) == 1


async def test_jsonl_write_failure_raises_and_counts(tmp_path: Path) -> None:
    telemetry = RecordingTelemetry()
    sink = JsonlSink(JsonlSinkConfig(path=Path("/dev/full")), telemetry=telemetry)  # ENOSPC on write
    await sink.start()
    await sink.publish_result(result("cam1", 0))
    with pytest.raises(SinkError, match="write failed"):
        await sink.flush()
    assert telemetry.lost[("cam1", "sink_io_error")] == 1
    assert telemetry.publish_errors["io_error"] == 1
    assert await sink.close(5) == 0  # nothing left buffered


async def test_jsonl_cannot_open_is_a_sink_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SinkError, match="cannot open"):
        await JsonlSink(JsonlSinkConfig(path=tmp_path / "file" / "below.jsonl")).start()


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("full", {"kind": "result", **result("cam1", 3).to_dict()}),
        (
            "summary",
            {
                "kind": "result",
                "source": "cam1",
                "frame_number": 3,
                "frame_id": "cam1:3",
                "model_id": "factory-parts/1",
                "detections": 2,
                "latency_ms": 250.0,
            },
        ),
    ],
)
async def test_stdout_prints_one_compact_line(mode: str, expected: dict[str, object]) -> None:
    stream = io.BytesIO()
    async with StdoutSink(StdoutSinkConfig.model_validate({"mode": mode}), stream=stream) as sink:
        await sink.publish_result(result("cam1", 3))
        await sink.flush()
        text = stream.getvalue()
        assert text.endswith(b"\n") and text.count(b"\n") == 1 and b" " not in text.split(b'"bad')[0]
        assert json.loads(text) == expected
    assert not stream.closed  # stdout is not ours to close


@pytest.mark.parametrize(
    ("outputs", "count"),
    [
        ({}, 0),
        ({"predictions": {"predictions": [{}, {}, {}]}}, 3),
        ({"a": {"predictions": [{}]}, "b": {"predictions": [{}]}, "model_id": "x/1"}, 2),
        ({"predictions": {"predictions": "not a list"}}, 0),
    ],
)
def test_count_detections(outputs: dict[str, object], count: int) -> None:
    assert count_detections(outputs) == count
