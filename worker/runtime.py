"""The composition root: builds every stage from a pipeline file, runs them, stops them in order.

Start order: logging → model (the workflow's runner, loaded in a thread) → metrics, health, preview
and the HTTP server → sinks → control topic → queues and sources → batcher and inference. Stop order
is the reverse: ``/readyz`` turns not-ready, sources stop and close their queues, the batcher drains
what was already read (nothing read under ``every_frame`` is lost), in-flight batches finish and are
published, sinks deliver their outboxes (QoS 1 acknowledgements) and say ``offline``, the HTTP server
closes. The whole stop is bounded by ``shutdown_grace_s``.

Inference overlaps with everything else: up to ``inference_threads`` batches run in the model pool
while the next batch is gathered, and results are published strictly in batch order.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any

from worker import __version__
from worker.batching import Batcher
from worker.concurrency import BlockingPool, limit_blas_threads
from worker.config import PipelineConfig, load_pipeline
from worker.control import ControlListener
from worker.errors import ConfigError, SegstreamError
from worker.frame import Frame
from worker.http_server import HealthState, HttpServer, build_app
from worker.ids import make_worker_id
from worker.logging_setup import configure_logging
from worker.messages import ErrorReport, FrameResult
from worker.metrics import Metrics
from worker.models.registry import ModelRegistry, default_models_dirs
from worker.models.remote import bind_remote, release_remote
from worker.preview import PreviewHub
from worker.queues import FrameQueue
from worker.recorder import AnnotatedVideoWriter, RunSummary
from worker.sinks import Sink, build_sink
from worker.sources import Source, build_source
from worker.step.executor import BatchResult, WorkflowRunner

__all__ = ["Worker", "run_pipeline_file"]

log = logging.getLogger(__name__)


class Worker:
    """One running pipeline.

    Args:
        config: the validated pipeline file.
        models_dir: overrides the pipeline's ``model.models_dir``.
        metrics: a ``Metrics`` to report into (default: a new one with its own registry).
        extra_sinks: sinks added to the configured ones (tests, embedding).
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        models_dir: Path | None = None,
        metrics: Metrics | None = None,
        extra_sinks: list[Sink] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.worker_id = make_worker_id(
            config.name, prefix=config.broker.client_id if config.broker else None
        )
        self.workflow = config.workflow
        self._models_dir = models_dir or config.model.models_dir
        self.metrics = metrics or Metrics(
            config.name, version=__version__, sources=[s.id for s in config.sources]
        )
        # the broker is a readiness condition through the MQTT sinks (sources show in sources_attached)
        self.health = HealthState(broker_required=any(c.type == "mqtt" for c in config.sinks))
        self.preview = PreviewHub(enabled=config.http.preview, max_fps=config.http.preview_fps)
        self.preview.set_sources([s.id for s in config.sources])
        self.summary = RunSummary()
        self.runner: WorkflowRunner | None = None
        self.sinks: list[Sink] = []
        self._extra_sinks = list(extra_sinks or [])
        self.sources: list[Source] = []
        self.queues: list[FrameQueue] = []
        self.http_port: int | None = None
        self._stop = asyncio.Event()
        self._model_pool = BlockingPool("model", config.inference_threads)
        self._decode_pool = BlockingPool("decode", 2)
        self._recorder: AnnotatedVideoWriter | None = None
        self._primary_step = self.workflow.steps[0].name
        self.started = asyncio.Event()

    # ------------------------------------------------------------------------------------- control

    def request_stop(self) -> None:
        """Begin a graceful stop (SIGTERM/SIGINT): not ready at once, then drain and exit."""
        if not self._stop.is_set():
            log.info("stop requested: draining")
            self.health.begin_shutdown()
            self._stop.set()

    # ------------------------------------------------------------------------------------- building

    def _build_runner(self) -> WorkflowRunner:
        dirs = default_models_dirs(self._models_dir)
        held = [s.id for s in self.config.sources if s.policy == "every_frame"]
        return WorkflowRunner(
            self.workflow, ModelRegistry(dirs), model_config=self.config.model, held_sources=held
        )

    def _on_source_error(self, report: ErrorReport) -> None:
        """Called on the loop by sources for each bad payload or outage."""
        self.summary.errors[report.reason] += 1
        self._publish_error_soon(report)

    def _publish_error_soon(self, report: ErrorReport) -> None:
        for sink in self.sinks:
            task = asyncio.get_running_loop().create_task(self._publish_error(sink, report))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _publish_error(self, sink: Sink, report: ErrorReport) -> None:
        try:
            await sink.publish_error(report)
        except SegstreamError as exc:
            log.error("sink %s refused an error report: %s", sink.name, exc)
            self.metrics.publish_error("sink_refused")

    # ------------------------------------------------------------------------------------- running

    async def run(self) -> int:
        """Run until the inputs end or a stop is requested; returns the exit code."""
        self._background: set[asyncio.Task[Any]] = set()
        loop = asyncio.get_running_loop()
        limit_blas_threads(self.config.blas_threads)
        self.runner = await loop.run_in_executor(None, self._build_runner)
        for model_id, model in self.runner.models.items():
            info = model.info
            log.info("model %s: %s", model_id, info.summary())
            self.metrics.model_loaded(model_id, info.backend, info.precision, info.requested, info.used)
        self.health.set_model_loaded(True)
        for model_id, model in self.runner.models.items():
            bind_remote(model, self.metrics, self.health, model_id)
        async with AsyncExitStack() as stack:
            if self.config.http.enabled:
                app = build_app(self.metrics, self.health, self.preview)
                server = await stack.enter_async_context(
                    HttpServer(app, self.config.http.host, self.config.http.port)
                )
                self.http_port = server.port
            heartbeat = loop.create_task(
                self.health.heartbeat(on_lag=self.metrics.loop_lag), name="health.heartbeat"
            )
            self.sinks = [
                build_sink(
                    c,
                    pipeline=self.name,
                    broker=self.config.broker,
                    telemetry=self.metrics,
                    worker_id=self.worker_id,
                )
                for c in self.config.sinks
            ] + self._extra_sinks
            for sink in self.sinks:
                await sink.start()
            self._probe_broker()
            control = self._start_control(loop)
            self._start_recorder()
            ready = asyncio.Event()
            source_tasks: list[asyncio.Task[None]] = []
            for cfg in self.config.sources:
                queue = FrameQueue(cfg.id, cfg.queue_size, cfg.policy or "latest", self.metrics, ready)
                source = build_source(
                    cfg,
                    telemetry=self.metrics,
                    on_error=self._on_source_error,
                    pipeline=self.name,
                    broker=self.config.broker,
                    decode_pool=self._decode_pool,
                    worker_id=self.worker_id,
                )
                self.queues.append(queue)
                self.sources.append(source)
                self.health.source_attached(cfg.id, True)
                source_tasks.append(loop.create_task(source.run(queue), name=f"source[{cfg.id}]"))
            self.started.set()
            batch_task = loop.create_task(self._batch_loop(ready), name="batcher")
            stop_wait = loop.create_task(self._stop.wait(), name="stop.wait")
            await asyncio.wait([batch_task, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            code = await self._shutdown(batch_task, source_tasks)
            for task in (stop_wait, heartbeat, *([control] if control else [])):
                task.cancel()
            for task in (stop_wait, heartbeat, *([control] if control else [])):
                with suppress(asyncio.CancelledError):
                    await task
        release_remote(self.runner.models.values())  # batches still waiting for a server give up
        self._model_pool.shutdown(wait=False)
        self._decode_pool.shutdown(wait=False)
        self.preview.close()
        self._log_totals(code)
        if self.config.print_summary:
            print(self.summary.render(), file=sys.stderr, flush=True)
        return code

    async def _shutdown(self, batch_task: asyncio.Task[None], source_tasks: list[asyncio.Task[None]]) -> int:
        deadline = time.monotonic() + self.config.shutdown_grace_s
        self.health.begin_shutdown()
        for source in self.sources:
            with suppress(Exception):
                await asyncio.wait_for(source.stop(), timeout=max(0.1, deadline - time.monotonic()))
        for task in source_tasks:
            try:
                await asyncio.wait_for(task, timeout=max(0.1, deadline - time.monotonic()))
            except (TimeoutError, asyncio.CancelledError):
                log.warning("source task %s did not stop in time", task.get_name())
            except Exception:
                log.exception("source task %s failed", task.get_name())
        for queue in self.queues:
            queue.close()
        code = 0
        try:
            await asyncio.wait_for(batch_task, timeout=max(0.1, deadline - time.monotonic() - 1.0))
        except TimeoutError:
            log.error("in-flight frames not finished within the grace time; exiting anyway")
            code = 1
        if self._background:
            await asyncio.wait(self._background, timeout=max(0.1, deadline - time.monotonic()))
        undelivered = 0
        for sink in self.sinks:
            undelivered += await sink.close(max(0.5, deadline - time.monotonic()))
        if undelivered:
            log.error("%d messages could not be delivered before exit", undelivered)
        if self._recorder is not None:
            recorder = self._recorder
            await asyncio.get_running_loop().run_in_executor(None, recorder.close)
            self.summary.annotated = (str(recorder.path), recorder.written, recorder.skipped)
            if recorder.skipped:
                log.warning(
                    "annotated video %s: %d frames skipped (the writer fell behind)",
                    recorder.path,
                    recorder.skipped,
                )
        return code

    def _log_totals(self, code: int) -> None:
        """One final line per source (frames received = processed + dropped when nothing was lost)."""
        for source, totals in self.metrics.snapshot().items():
            log.info(
                "source %s: received=%d processed=%d dropped=%d",
                source,
                totals.received,
                totals.processed,
                totals.dropped,
            )
        log.info("worker stopped (exit code %d)", code)

    def _start_control(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[None] | None:
        if self.config.broker is None or not self.config.control.enabled:
            return None
        assert self.runner is not None
        listener = ControlListener(
            self.config.broker,
            self.config.control.topic.format(pipeline=self.name),
            self.runner.set_runtime_inputs,
            lambda: self.runner.runtime_inputs if self.runner else {},
            lambda message: self._publish_error_soon(
                ErrorReport(self.name, "control", "bad_control", message)
            ),
            self.metrics,
            self.worker_id,
        )
        self.control = listener
        return loop.create_task(listener.run(), name="control")

    def _start_recorder(self) -> None:
        video = self.config.annotated_video
        if video is None or self.runner is None:
            return
        source = video.source or self.config.sources[0].id
        model = next(iter(self.runner.models.values()))
        self._recorder = AnnotatedVideoWriter(video.path, video.fps, model.class_names)
        self._recorder_source = source
        policy = next((s.policy for s in self.config.sources if s.id == source), None)
        self._recorder_waits = policy == "every_frame"

    def _probe_broker(self) -> None:
        """Readiness reads the MQTT sinks' connection state when it is asked (connected: any sink)."""
        sinks = [s for s in self.sinks if hasattr(s, "connected")]
        self.health.set_broker_probe(lambda: any(bool(s.connected) for s in sinks))

    async def _batch_loop(self, ready: asyncio.Event) -> None:
        """Gather batches and keep up to ``inference_threads`` in the model pool; publish in order."""
        assert self.runner is not None
        runner = self.runner
        batcher = Batcher(
            self.queues, ready, self.config.batching.max_batch_size, self.config.batching.max_wait_ms
        )
        inflight: asyncio.Queue[asyncio.Future[BatchResult] | None] = asyncio.Queue(
            self.config.inference_threads
        )
        publisher = asyncio.get_running_loop().create_task(self._publish_loop(inflight), name="publisher")
        try:
            while True:
                self.health.batcher_waiting()
                batch = await batcher.next_batch()
                if not batch:
                    break
                self.health.batcher_progress()
                future = asyncio.ensure_future(self._model_pool.run(runner.run_batch, batch))
                await inflight.put(future)
        finally:
            await inflight.put(None)
            await publisher

    async def _publish_loop(self, inflight: asyncio.Queue[asyncio.Future[BatchResult] | None]) -> None:
        assert self.runner is not None
        class_names = {mid: m.class_names for mid, m in self.runner.models.items()}
        while (future := await inflight.get()) is not None:
            result = await future
            self.health.batcher_progress()
            self.metrics.batch_done(len(result.outcomes), result.model_seconds, result.postprocess_seconds)
            self.summary.batches += 1
            self.summary.model_seconds += result.model_seconds
            self.summary.postprocess_seconds += result.postprocess_seconds
            for outcome in result.outcomes:
                await self._publish_outcome(outcome, class_names)
            for sink in self.sinks:
                await sink.flush()

    async def _publish_outcome(self, outcome: Any, class_names: dict[str, tuple[str, ...]]) -> None:
        frame: Frame = outcome.frame
        source = frame.source_id
        if outcome.error is not None:
            reason = outcome.error.reason
            self.metrics.frame_dropped(source, reason)
            self.summary.errors[reason] += 1
            report = ErrorReport(
                self.name, source, reason, str(outcome.error), frame.frame_id, frame.frame_number
            )
            for sink in self.sinks:
                await self._publish_error(sink, report)
            return
        result = FrameResult(
            pipeline=self.name,
            source_id=source,
            frame_number=frame.frame_number,
            frame_id=frame.frame_id,
            timestamp=frame.timestamp,
            step=self._primary_step,
            inference_id=outcome.inference_id,
            model_id=outcome.model_id,
            outputs=outcome.outputs,
        )
        for sink in self.sinks:
            try:
                await sink.publish_result(result)
            except SegstreamError as exc:
                log.error("sink %s refused a result of %s: %s", sink.name, frame.frame_id, exc)
                self.metrics.publish_error("sink_refused")
        latency = max(0.0, time.time() - frame.timestamp)
        self.metrics.frames_processed(source)
        self.metrics.e2e_latency(source, latency)
        self.summary.frames[source] += 1
        detections = outcome.detections.get(self._primary_step)
        names = class_names.get(outcome.model_id or "", ())
        if detections is not None:
            self.summary.add_detections(detections, names)
        if self.preview.wants(source):
            self.preview.offer(source, frame.image, detections, names, latency_s=latency)
        if self._recorder is not None and source == self._recorder_source:
            recorder = self._recorder
            if not self._recorder_waits:
                recorder.offer(frame.image, detections)
            elif not recorder.try_put(frame.image, detections):
                # every_frame: the video waits for its writer, like the sinks (a thread hop only then)
                await asyncio.to_thread(recorder.put, frame.image, detections)


def _install_signal_handlers(worker: Worker) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, worker.request_stop)
            installed.append(sig)

    def remove() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return remove


async def run_worker(config: PipelineConfig, *, models_dir: Path | None = None) -> int:
    """Run one pipeline in the current event loop with signal handling."""
    worker = Worker(config, models_dir=models_dir)
    remove = _install_signal_handlers(worker)
    try:
        return await worker.run()
    finally:
        remove()


def run_pipeline_file(path: str | Path, *, models_dir: Path | None = None) -> int:
    """``segstream run``: load, validate and run a pipeline file; the process exit code."""
    try:
        config = load_pipeline(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    secrets = [p for p in [config.broker.resolved_password() if config.broker else None] if p]
    configure_logging(config.log_level, config.log_format, secrets=secrets)
    try:
        return asyncio.run(run_worker(config, models_dir=models_dir))
    except SegstreamError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
