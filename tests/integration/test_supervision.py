"""Whatever ends a run, the stop sequence runs: an exception in inference, a failing source, a failing
control listener; restartable stages come back, the others stop the worker with a non-zero exit."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.integration.helpers import metric_value, parse_metrics, pipeline_config, running, write_video
from tests.sinks.helpers import Collector
from tests.support.mosquitto import MosquittoBroker
from tests.support.waiting import wait_until
from worker.control import ControlListener
from worker.frame import Frame
from worker.mqtt import BrokerConfig
from worker.ops.health import HealthState
from worker.queues import FrameQueue
from worker.runtime import Worker, _StopSignals
from worker.sinks import MemorySink
from worker.sources.video import VideoSource
from worker.step.executor import BatchResult, WorkflowRunner
from worker.supervisor import EXIT_FAILED, EXIT_OK, EXIT_UNDELIVERED

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_exception_in_inference_closes_the_sinks_says_offline_and_exits_non_zero(
    mosquitto: MosquittoBroker,
    broker_config: BrokerConfig,
    models_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(self: WorkflowRunner, frames: Sequence[Frame]) -> BatchResult:
        raise TypeError("run_batch is broken")

    monkeypatch.setattr(WorkflowRunner, "run_batch", broken)
    video = write_video(tmp_path / "clip.avi", frames=6)
    config = pipeline_config(
        "crash",
        sources=[{"type": "video", "id": "file", "url": str(video), "queue_size": 2}],
        sinks=[{"type": "mqtt"}],
        broker=mosquitto,
        models_dir=models_dir,
    )
    memory = MemorySink()
    async with Collector(broker_config, "segstream/crash/#", identifier="watch", persistent=False) as seen:
        worker = await Worker.create(config, extra_sinks=[memory])
        with caplog.at_level(logging.INFO):
            code = await asyncio.wait_for(worker.run(), timeout=60)

        def status() -> list[str]:
            return [m.json()["status"] for m in seen.on(f"segstream/crash/status/{worker.worker_id}")]

        await wait_until(lambda: status()[-1:] == ["offline"], "the offline status")
        await wait_until(
            lambda: len(seen.on("segstream/crash/errors")) == len(memory.errors), "error reports"
        )

    assert code == EXIT_FAILED
    assert memory.closed
    assert status() == ["online", "offline"]
    assert seen.on(f"segstream/crash/status/{worker.worker_id}")[-1].json()["reason"] == "shutdown"
    assert not worker.health.readiness().ok
    # one error line says what failed and where
    errors = _errors(caplog)
    assert len(errors) == 1, errors
    assert errors[0].startswith("stage inference failed: TypeError: run_batch is broken (at tests/"), errors
    # every frame that was read got an error report instead of a result (none silently lost)
    received = int(worker.metrics.snapshot()["file"].received)
    assert received >= 1
    assert memory.results == []
    assert len(memory.errors) == received
    assert {e.reason for e in memory.errors} <= {"inference_error", "shutdown_unprocessed"}
    assert sorted(e.frame_number for e in memory.errors) == list(range(received))


async def test_a_failed_live_source_is_restarted_and_detached_meanwhile(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = VideoSource.run
    calls = 0

    async def fails_once(self: VideoSource, queue: FrameQueue) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            queue.close()  # what a source does whenever its run ends
            raise RuntimeError("reader bug")
        await run(self, queue)

    attached: list[tuple[str, bool]] = []
    source_attached = HealthState.source_attached

    def record(self: HealthState, source: str, alive: bool = True) -> None:
        attached.append((source, alive))
        source_attached(self, source, alive)

    monkeypatch.setattr(VideoSource, "run", fails_once)
    monkeypatch.setattr(HealthState, "source_attached", record)
    video = write_video(tmp_path / "clip.avi", frames=5)
    config = pipeline_config(
        "restart",
        sources=[{"type": "video", "id": "file", "url": str(video), "loop": True}],
        sinks=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}],
        models_dir=models_dir,
    )
    memory = MemorySink()
    worker = await Worker.create(config, extra_sinks=[memory])
    with caplog.at_level(logging.INFO):
        async with running(worker):  # exits 0 after the stop
            await memory.wait_for(results=3, timeout=60)
    assert calls == 2
    assert attached[:3] == [("file", True), ("file", False), ("file", True)]
    errors = _errors(caplog)
    assert len(errors) == 1 and errors[0].startswith("stage source[file] failed: RuntimeError: reader bug")
    assert "restarting it in" in errors[0]
    assert memory.closed
    samples = parse_metrics(worker.metrics.render()[0].decode())
    assert metric_value(samples, "segstream_errors_total", reason="stage_failed") == 1


async def test_a_failed_file_source_cannot_be_restarted_and_stops_the_worker(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def fails(self: VideoSource, queue: FrameQueue) -> None:
        queue.close()
        raise RuntimeError("reader bug")

    monkeypatch.setattr(VideoSource, "run", fails)
    video = write_video(tmp_path / "clip.avi", frames=5)
    config = pipeline_config(
        "file-fails",
        sources=[{"type": "video", "id": "file", "url": str(video)}],
        sinks=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}],
        models_dir=models_dir,
    )
    memory = MemorySink()
    worker = await Worker.create(config, extra_sinks=[memory])
    with caplog.at_level(logging.INFO):
        code = await asyncio.wait_for(worker.run(), timeout=60)
    assert code == EXIT_FAILED
    assert memory.closed
    errors = _errors(caplog)
    assert len(errors) == 1 and "stage source[file] failed: RuntimeError: reader bug" in errors[0], errors
    assert "the worker stops" in errors[0]


async def test_a_failed_control_listener_is_restarted_and_unready_meanwhile(
    mosquitto: MosquittoBroker,
    models_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = ControlListener.run
    calls = 0

    async def fails_once(self: ControlListener) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("listener bug")
        await run(self)

    stages: list[tuple[str, bool]] = []
    stage_alive = HealthState.stage_alive

    def record(self: HealthState, name: str, alive: bool) -> None:
        stages.append((name, alive))
        stage_alive(self, name, alive)

    monkeypatch.setattr(ControlListener, "run", fails_once)
    monkeypatch.setattr(HealthState, "stage_alive", record)
    video = write_video(tmp_path / "clip.avi", frames=5)
    config = pipeline_config(
        "control-restart",
        sources=[{"type": "video", "id": "file", "url": str(video), "loop": True}],
        sinks=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}],
        broker=mosquitto,
        models_dir=models_dir,
    )
    worker = await Worker.create(config)
    with caplog.at_level(logging.INFO):
        async with running(worker):  # waits until the (restarted) listener is subscribed
            assert calls == 2
            assert stages == [("control", True), ("control", False), ("control", True)]
            assert worker.health.readiness().ok
    errors = _errors(caplog)
    assert len(errors) == 1 and errors[0].startswith("stage control failed: ValueError: listener bug"), errors


async def test_the_inputs_ending_is_a_clean_stop(models_dir: Path, tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", frames=4)
    config = pipeline_config(
        "ends",
        sources=[{"type": "video", "id": "file", "url": str(video)}],
        sinks=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}],
        models_dir=models_dir,
    )
    memory = MemorySink()
    worker = await Worker.create(config, extra_sinks=[memory])
    assert await asyncio.wait_for(worker.run(), timeout=60) == EXIT_OK
    assert memory.closed and len(memory.results) == 4 and memory.errors == []


async def test_messages_left_undelivered_at_the_end_exit_with_3(
    mosquitto: MosquittoBroker, models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    video = write_video(tmp_path / "clip.avi", frames=4)
    config = pipeline_config(
        "undelivered",
        sources=[{"type": "video", "id": "file", "url": str(video)}],
        sinks=[{"type": "mqtt"}],
        broker=mosquitto,
        models_dir=models_dir,
        shutdown_grace_s=1.0,
    )
    memory = MemorySink()
    worker = await Worker.create(config, extra_sinks=[memory])
    mosquitto.stop()  # the results have nowhere to go
    with caplog.at_level(logging.INFO):
        code = await asyncio.wait_for(worker.run(), timeout=60)
    assert len(memory.results) == 4  # processed and published to the sinks ...
    assert code == EXIT_UNDELIVERED  # ... but the MQTT sink could not deliver them
    assert any("could not be delivered before exit" in message for message in _errors(caplog))


async def test_a_bug_in_the_stop_sequence_still_closes_the_sinks(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: Worker, *args: object) -> bool:
        raise RuntimeError("stop sequence bug")

    monkeypatch.setattr(Worker, "_drain", broken)
    video = write_video(tmp_path / "clip.avi", frames=3)
    config = pipeline_config(
        "drain-bug",
        sources=[{"type": "video", "id": "file", "url": str(video)}],
        sinks=[{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}],
        models_dir=models_dir,
    )
    memory = MemorySink()
    worker = await Worker.create(config, extra_sinks=[memory])
    with caplog.at_level(logging.INFO):
        code = await asyncio.wait_for(worker.run(), timeout=60)
    assert code == EXIT_FAILED
    assert memory.closed
    errors = _errors(caplog)
    assert len(errors) == 1 and errors[0].startswith("worker failed: RuntimeError: stop sequence bug"), errors


async def test_a_signal_while_the_worker_starts_stops_it_once_it_has_started() -> None:
    stops: list[str] = []

    class Started:
        def request_stop(self) -> None:
            stops.append("stop")

    with _StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)  # while the model loads: no worker yet
        await wait_until(lambda: signals.received, "the signal")
        assert stops == []
        signals.attach(Started())  # type: ignore[arg-type]
        assert stops == ["stop"]
        os.kill(os.getpid(), signal.SIGINT)
        await wait_until(lambda: len(stops) == 2, "the second signal")
