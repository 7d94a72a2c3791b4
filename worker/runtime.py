"""The composition root: builds every stage from a pipeline file, runs them supervised, stops them in order.

Start order: logging → workflow and model (``Worker.create`` loads the runner in the model pool, so a
``Worker`` never exists without it) → metrics, health, preview → HTTP server → sinks (the publisher) →
the broker, when ``broker_required`` → the stages in one ``Supervisor``: the loop heartbeat, the control
topic, the sources, the inference loop (batcher → model → publisher).

Whatever ends the run — SIGTERM/SIGINT, the inputs ending, a stage failing for good — the same stop
sequence runs, bounded by ``shutdown_grace_s``: ``/readyz`` turns not-ready, sources stop and close their
queues, the inference loop drains what was already read (nothing read under ``every_frame`` is lost) and
publishes it, frames the failed stage can no longer answer get an error report each, the sinks deliver
their outboxes and say ``offline``, the HTTP server closes. The exit code says how it ended
(``worker.supervisor.EXIT_*``, listed in the README's operations section).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import TextIO

from worker import __version__
from worker.active_learning import build_sampler
from worker.batching import Batcher
from worker.concurrency import BlockingPool, limit_blas_threads
from worker.config import PipelineConfig, load_pipeline
from worker.control import ControlListener
from worker.errors import ConfigError, SegstreamError, SinkError
from worker.frame import Frame
from worker.ids import make_worker_id
from worker.inference import InferenceLoop
from worker.logging_setup import configure_logging
from worker.messages import ErrorReport
from worker.models.config import OnnxRuntimeConfig, OpenVinoConfig
from worker.models.registry import ModelRegistry, default_models_dirs
from worker.models.remote import bind_remote, release_remote
from worker.ops.health import HealthState
from worker.ops.http import HttpServer, access_policy, build_app
from worker.ops.metrics import Metrics
from worker.ops.preview import PreviewHub
from worker.preflight import problems as preflight_problems
from worker.progress import ProgressLine, progress_stream
from worker.publisher import PublishedFrame, Publisher
from worker.queues import FrameQueue
from worker.recorder import AnnotatedVideo, AnnotatedVideoWriter, RunSummary
from worker.retry import Backoff
from worker.sinks import MqttSink, Sink, build_sink
from worker.sources import (
    ImageFolderSourceConfig,
    Source,
    SourceConfig,
    VideoSourceConfig,
    build_source,
)
from worker.stations import StationInputs
from worker.step.executor import WorkflowRunner
from worker.step.workflow import WorkflowDefinition, validate_runtime_inputs
from worker.supervisor import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNDELIVERED,
    Supervisor,
    describe_exception,
)

__all__ = ["Worker", "run_pipeline_file", "run_worker"]

log = logging.getLogger(__name__)

#: restart delays of a failed source or control listener without broker settings, seconds
_RESTART_MIN_S, _RESTART_MAX_S = 0.5, 30.0


class _PreviewObserver:
    """The live preview as a result observer (annotates only while someone watches)."""

    def __init__(self, hub: PreviewHub) -> None:
        self._hub = hub

    def on_result(self, published: PublishedFrame) -> None:
        source = published.frame.source_id
        if self._hub.wants(source):
            self._hub.offer(
                source,
                published.frame.image,
                published.detections,
                published.class_names,
                latency_s=published.latency_s,
            )

    async def aclose(self) -> None:
        self._hub.close()


class _DetectionsCounter:
    """``segstream_detections_total{source,class}``: the published detections of each result, by class."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_result(self, published: PublishedFrame) -> None:
        detections = published.detections
        if detections is None or len(detections) == 0:
            return
        names = published.class_names
        source = published.frame.source_id
        for class_id, count in Counter(detections.class_id.tolist()).items():
            name = names[class_id] if 0 <= class_id < len(names) else str(class_id)
            self._metrics.detections(source, name, count)

    async def aclose(self) -> None:
        pass


class _Lane:
    """One source and its queue, and whether the source may be restarted after a failure."""

    def __init__(self, source: Source, queue: FrameQueue, restartable: bool) -> None:
        self.source = source
        self.queue = queue
        self.restartable = restartable

    async def run(self) -> None:
        try:
            await self.source.run(self.queue)
        except Exception:
            if self.restartable:
                self.queue.reopen()  # same step as the source's close: the batcher never sees it end
            raise


def _restartable(config: object) -> bool:
    """Live inputs start again after a failure; a finite file would be read again from its start."""
    if isinstance(config, VideoSourceConfig):
        return config.is_live or config.loop
    if isinstance(config, ImageFolderSourceConfig):
        return config.loop
    return True  # MQTT: unacknowledged frames are delivered again, nothing is read twice


class Worker:
    """One pipeline, built with every stage; ``run()`` runs it until it stops and returns the exit code.

    Build it with ``await Worker.create(config)``, which loads the workflow's models first.

    Args:
        config: the validated pipeline file.
        workflow: its validated workflow.
        runner: the workflow's runner, models loaded.
        model_pool: the pool ``runner`` runs in (``inference_threads`` threads); the worker shuts it down.
        metrics: a ``Metrics`` to report into (default: a new one with its own registry).
        extra_sinks: sinks added to the configured ones (tests, embedding).
        progress: a terminal to draw the progress line on (``segstream run``; see ``worker.progress``).
    """

    def __init__(
        self,
        config: PipelineConfig,
        workflow: WorkflowDefinition,
        runner: WorkflowRunner,
        model_pool: BlockingPool,
        *,
        metrics: Metrics | None = None,
        extra_sinks: Sequence[Sink] = (),
        progress: TextIO | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.runner = runner
        self.metrics = metrics or Metrics(
            config.name, version=__version__, sources=[s.id for s in config.sources]
        )
        # the broker is a readiness condition through the MQTT sinks (sources show in sources_attached)
        self.health = HealthState(
            broker_required=any(c.type == "mqtt" for c in config.sinks),
            sources=[s.id for s in config.sources],
            ready_sources=config.http.ready_sources,
        )
        for model_id, model in runner.models.items():
            info = model.info
            height, width = model.input_size
            names = tuple(model.class_names)
            log.info(
                "model %s: %s, input %dx%d, %d classes (%s)",
                model_id,
                info.summary(),
                width,
                height,
                len(names),
                ", ".join(names),
                extra={"model_id": model_id, "backend": info.backend, "providers": ",".join(info.used)},
            )
            self.metrics.model_loaded(model_id, info.backend, info.precision, info.requested, info.used)
        self.health.set_model_loaded(True)
        for model_id, model in runner.models.items():
            bind_remote(model, self.metrics, self.health, model_id)
        self.preview = PreviewHub(enabled=config.http.preview, max_fps=config.http.preview_fps)
        self.preview.set_sources([s.id for s in config.sources])
        self.summary = RunSummary()
        self.http_port: int | None = None
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._model_pool = model_pool
        self._decode_pool = BlockingPool("decode", 2)
        self._grace_s = config.shutdown_grace_s
        self._deadline = 0.0  # of the stop sequence, once it began (monotonic)

        prefix = config.broker.client_id if config.broker else None
        self.worker_id = make_worker_id(config.name, prefix=prefix)  # one per process: every client
        ready = asyncio.Event()  # set by every queue on each put and close: the batcher waits on it
        self.publisher = self._build_publisher(workflow, extra_sinks)
        # the control topic can address one station of an MQTT source that takes it from the topic
        self.station_inputs: StationInputs | None = None
        if any(getattr(c, "source_id", None) for c in config.sources):
            self.station_inputs = StationInputs(lambda values: validate_runtime_inputs(workflow, values))
        self._lanes = [self._build_lane(cfg, ready) for cfg in config.sources]
        self.recorder = self._build_recorder()
        if self.recorder is not None:
            self.publisher.add_observer(self.recorder, gate=self.recorder.gate)
        self.active_learning = build_sampler(
            config.active_learning,
            workflow.steps,
            {mid: m.class_names for mid, m in runner.models.items()},
            runtime_inputs=lambda: runner.runtime_inputs,
            pipeline=self.name,
            registry=self.metrics.registry,
            version=__version__,
        )
        if self.active_learning is not None:  # closed by the publisher, after the last result
            self.publisher.add_observer(self.active_learning)
            self.health.set_detail("active_learning", self.active_learning.status)
        self.inference = InferenceLoop(
            Batcher(
                [lane.queue for lane in self._lanes],
                ready,
                config.batching.max_batch_size,
                config.batching.max_wait_ms,
            ),
            runner.run_batch,
            model_pool,
            config.inference_threads,
            self.publisher.publish_batch,
            on_waiting=self.health.batcher_waiting,
            on_progress=self.health.batcher_progress,
        )
        self.control = self._build_control()
        self.progress = (
            None
            if progress is None
            else ProgressLine(progress, [lane.source for lane in self._lanes], self.metrics.snapshot)
        )

    @classmethod
    async def create(
        cls,
        config: PipelineConfig,
        *,
        models_dir: Path | None = None,
        metrics: Metrics | None = None,
        extra_sinks: Sequence[Sink] = (),
        progress: TextIO | None = None,
    ) -> Worker:
        """Validate the workflow, load its models (in the model pool), build the worker.

        Raises:
            ConfigError: the workflow or the pipeline's settings are invalid.
            ModelError: a model cannot be found or loaded.
        """
        workflow = config.workflow
        if config.broker_required and not any(c.type == "mqtt" for c in config.sinks):
            raise ConfigError("broker_required needs an mqtt sink", field="broker_required")
        limit_blas_threads(config.blas_threads)
        pool = BlockingPool("model", config.inference_threads)
        try:
            dirs = default_models_dirs(models_dir or config.model.models_dir)
            held = [s.id for s in config.sources if s.policy == "every_frame"]  # wait for a remote server
            runner = await pool.run(
                WorkflowRunner, workflow, ModelRegistry(dirs), model_config=config.model, held_sources=held
            )
            return cls(
                config, workflow, runner, pool, metrics=metrics, extra_sinks=extra_sinks, progress=progress
            )
        except BaseException:
            pool.shutdown(wait=False)
            raise

    @property
    def sinks(self) -> tuple[Sink, ...]:
        return self.publisher.sinks

    @property
    def sources(self) -> tuple[Source, ...]:
        return tuple(lane.source for lane in self._lanes)

    def request_stop(self) -> None:
        """Begin a graceful stop (SIGTERM/SIGINT): not ready at once, then drain and exit."""
        if not self._stop.is_set():
            log.info("stop requested: draining")
            self.health.begin_shutdown()
            self._stop.set()

    # ------------------------------------------------------------------------------------- building

    def _build_publisher(self, workflow: WorkflowDefinition, extra_sinks: Sequence[Sink]) -> Publisher:
        sinks = [
            build_sink(
                c,
                pipeline=self.name,
                broker=self.config.broker,
                telemetry=self.metrics,
                worker_id=self.worker_id,
            )
            for c in self.config.sinks
        ]
        return Publisher(
            self.name,
            [*sinks, *extra_sinks],
            telemetry=self.metrics,
            summary=self.summary,
            primary_step=workflow.steps[0].name,
            class_names={mid: tuple(m.class_names) for mid, m in self.runner.models.items()},
            observers=[self.summary, _DetectionsCounter(self.metrics), _PreviewObserver(self.preview)],
        )

    def _build_lane(self, cfg: SourceConfig, ready: asyncio.Event) -> _Lane:
        queue = FrameQueue(cfg.id, cfg.queue_size, cfg.policy or "latest", self.metrics, ready)
        source = build_source(
            cfg,
            telemetry=self.metrics,
            on_error=self.publisher.report_soon,
            pipeline=self.name,
            broker=self.config.broker,
            decode_pool=self._decode_pool,
            worker_id=self.worker_id,
            deliver_error=self.publisher.report_soon,
            station_inputs=self.station_inputs,
        )
        return _Lane(source, queue, _restartable(cfg))

    def _build_recorder(self) -> AnnotatedVideo | None:
        video = self.config.annotated_video
        if video is None:
            return None
        source = video.source or self.config.sources[0].id
        model = next(iter(self.runner.models.values()))
        policy = next((s.policy for s in self.config.sources if s.id == source), None)
        writer = AnnotatedVideoWriter(video.path, video.fps, model.class_names)
        pool = BlockingPool("recorder", 1)
        return AnnotatedVideo(writer, source, waits=policy == "every_frame", pool=pool)

    def _build_control(self) -> ControlListener | None:
        if self.config.broker is None or not self.config.control.enabled:
            return None
        runner = self.runner
        return ControlListener(
            self.config.broker,
            self.config.control.topic.format(pipeline=self.name),
            runner.set_runtime_inputs,
            lambda: runner.runtime_inputs,
            lambda message: self.publisher.report_soon(
                ErrorReport(pipeline=self.name, source_id="control", reason="bad_control", message=message)
            ),
            self.metrics,
            self.worker_id,
            policy=self.config.control,
            apply_station=self.station_inputs.set if self.station_inputs is not None else None,
        )

    def _backoff(self) -> Backoff:
        broker = self.config.broker
        if broker is None:
            return Backoff(_RESTART_MIN_S, _RESTART_MAX_S)
        return Backoff(broker.reconnect_min_s, max(broker.reconnect_min_s, broker.reconnect_max_s))

    # ------------------------------------------------------------------------------------- running

    async def run(self) -> int:
        """Run until the inputs end, a stop is requested or a stage fails for good; the exit code."""
        try:
            code = await self._run()
        except SegstreamError as exc:  # start-up: a sink, the broker, the HTTP port ...
            log.error("%s", exc)
            code = EXIT_FAILED
        except Exception as exc:
            while isinstance(exc, ExceptionGroup) and exc.exceptions:
                exc = exc.exceptions[0]  # a TaskGroup's: the first is the cause
            log.error("worker failed: %s", describe_exception(exc))
            log.debug("worker failed", exc_info=exc)
            code = EXIT_FAILED
        finally:
            release_remote(self.runner.models.values())  # batches still waiting for a server give up
            self._model_pool.shutdown(wait=False)
            self._decode_pool.shutdown(wait=False)
        self._log_totals(code)
        if self.config.print_summary:
            if self.config.log_format == "json":  # nothing but JSON: the summary is one record
                log.info("run summary", extra={"summary": self.summary.to_dict()})
            else:
                print(self.summary.render(), file=sys.stderr, flush=True)
        return code

    async def _run(self) -> int:
        undelivered: list[int] = []
        async with AsyncExitStack() as stack:
            if self.config.http.enabled:
                app = build_app(self.metrics, self.health, self.preview, access_policy(self.config.http))
                server = await stack.enter_async_context(
                    HttpServer(app, self.config.http.host, self.config.http.port)
                )
                self.http_port = server.port
            await self.publisher.start(close_timeout=min(self._grace_s, 2.0))  # nothing to deliver yet
            stack.push_async_callback(self._close_publisher, undelivered)
            self.health.set_broker_probe(self.publisher.broker_connected)
            await self._require_broker()
            supervisor = Supervisor(
                self._stop, backoff=self._backoff, on_failure=lambda _: self.metrics.error("stage_failed")
            )
            async with supervisor:
                tasks = self._start_stages(supervisor)
                self.started.set()
                await self._stop.wait()
                finished = await self._drain(supervisor, tasks)
        if supervisor.failures:
            return EXIT_FAILED
        if not finished or any(undelivered):
            return EXIT_UNDELIVERED
        return EXIT_OK

    async def _close_publisher(self, undelivered: list[int]) -> None:
        deadline = self._deadline or time.monotonic() + self._grace_s
        undelivered.append(await self.publisher.aclose(max(0.5, deadline - time.monotonic())))
        if self.recorder is not None:
            writer = self.recorder.writer
            self.summary.annotated = (str(writer.path), writer.written, writer.skipped)
            if writer.skipped:
                log.warning(
                    "annotated video %s: %d frames skipped (the writer fell behind)",
                    writer.path,
                    writer.skipped,
                )

    async def _require_broker(self) -> None:
        """``broker_required``: every MQTT sink connected within ``broker.connect_timeout``, else fail."""
        if not self.config.broker_required or self.config.broker is None:
            return
        timeout = self.config.broker.connect_timeout
        sinks = [s for s in self.publisher.sinks if isinstance(s, MqttSink)]
        connected = await asyncio.gather(*(s.wait_connected(timeout) for s in sinks))
        if not all(connected):
            raise SinkError(
                f"broker {self.config.broker.describe()} not reachable within {timeout:g} s "
                "(broker_required: true)"
            )

    def _start_stages(self, supervisor: Supervisor) -> _Stages:
        supervisor.background("health.heartbeat", lambda: self.health.heartbeat(on_lag=self.metrics.loop_lag))
        if self.progress is not None:
            supervisor.background("progress", self.progress.run)
        control = None
        if self.control is not None:
            control = supervisor.restartable(
                "control",
                self.control.run,
                on_up=lambda: self.health.stage_alive("control", True),
                on_down=lambda: self.health.stage_alive("control", False),
            )
        sources = [self._start_lane(supervisor, lane) for lane in self._lanes]
        inference = supervisor.critical(
            "inference", self._infer, on_down=lambda: self.health.stage_alive("inference", False)
        )
        return _Stages(control, sources, inference)

    def _start_lane(self, supervisor: Supervisor, lane: _Lane) -> asyncio.Task[None]:
        sid = lane.source.source_id
        name = f"source[{sid}]"
        if lane.restartable:
            return supervisor.restartable(
                name,
                lane.run,
                on_up=lambda: self.health.source_attached(sid, True),
                on_down=lambda: self.health.source_attached(sid, False),
            )
        self.health.source_attached(sid, True)
        return supervisor.critical(name, lane.run, on_down=lambda: self.health.source_attached(sid, False))

    async def _infer(self) -> None:
        await self.inference.run()
        self._stop.set()  # every input ended and every frame was published

    async def _drain(self, supervisor: Supervisor, stages: _Stages) -> bool:
        """The stop sequence up to the sinks; False when frames were left unfinished at the deadline."""
        self._deadline = time.monotonic() + self._grace_s
        self.health.begin_shutdown()
        for lane in self._lanes:
            with suppress(Exception):
                await asyncio.wait_for(lane.source.stop(), timeout=self._left(0.1))
        await _finish(stages.sources, self._left(0.1), "source task %s did not stop in time")
        for lane in self._lanes:
            lane.queue.close()
        finished = await _finish([stages.inference], self._left(0.1, reserve=1.0), "")
        if not finished:
            log.error("in-flight frames not finished within the grace time; exiting anyway")
        if supervisor.failures or not finished:
            await self._report_unanswered()
        if stages.control is not None:
            stages.control.cancel()
        return finished

    async def _report_unanswered(self) -> None:
        """After a failure: each frame that will get no result gets an error report instead."""
        await self.publisher.report_unprocessed(
            self.inference.unanswered(), "inference_error", "the worker stopped before this frame's result"
        )
        left: list[Frame] = []
        while True:
            for lane in self._lanes:
                while (frame := lane.queue.get_nowait()) is not None:
                    left.append(frame)
            if all(lane.queue.exhausted for lane in self._lanes) or self._left(0.0) == 0.0:
                break
            await asyncio.sleep(0.01)  # a put that waited for room adds its frame when it runs
        await self.publisher.report_unprocessed(
            left, "shutdown_unprocessed", "the worker stopped before processing this frame"
        )

    def _left(self, floor: float, reserve: float = 0.0) -> float:
        return max(floor, self._deadline - time.monotonic() - reserve)

    def _log_totals(self, code: int) -> None:
        """One final line per source (received = processed + dropped + skipped when nothing was lost)."""
        for source, totals in self.metrics.snapshot().items():
            log.info(
                "source %s: received=%d processed=%d dropped=%d skipped=%d",
                source,
                totals.received,
                totals.processed,
                totals.dropped,
                totals.skipped,
            )
        log.info("worker stopped (exit code %d)", code)


class _Stages:
    """The supervised tasks the stop sequence waits for (the heartbeat is cancelled by the supervisor)."""

    def __init__(
        self,
        control: asyncio.Task[None] | None,
        sources: list[asyncio.Task[None]],
        inference: asyncio.Task[None],
    ) -> None:
        self.control = control
        self.sources = sources
        self.inference = inference


async def _finish(tasks: Sequence[asyncio.Task[None]], timeout: float, late: str) -> bool:  # noqa: ASYNC109
    """Wait up to ``timeout`` s for ``tasks``; cancel (and log with ``late``) those still running."""
    if not tasks:
        return True
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        if late:
            log.warning(late, task.get_name())
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    return not pending


class _StopSignals:
    """SIGTERM/SIGINT handlers for the whole run: before the worker exists (the model may take a while
    to load) a signal is remembered and the worker stops as soon as it starts."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._installed: list[signal.Signals] = []
        self._worker: Worker | None = None
        self.received = False

    def __enter__(self) -> _StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with suppress(NotImplementedError, RuntimeError):
                self._loop.add_signal_handler(sig, self._on_signal)
                self._installed.append(sig)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)

    def attach(self, worker: Worker) -> None:
        self._worker = worker
        if self.received:
            worker.request_stop()

    def _on_signal(self) -> None:
        self.received = True
        if self._worker is not None:
            self._worker.request_stop()
        else:
            log.info("stop requested while starting: the worker stops once it has started")


async def run_worker(
    config: PipelineConfig, *, models_dir: Path | None = None, progress: TextIO | None = None
) -> int:
    """Build and run one pipeline in the current event loop with signal handling; the exit code.

    ``progress``: a terminal for the progress line of sources of known length (None: no line).
    """
    with _StopSignals() as signals:
        try:
            worker = await Worker.create(config, models_dir=models_dir, progress=progress)
        except SegstreamError as exc:
            log.error("%s", _one_line(exc))
            return EXIT_FAILED
        except Exception as exc:  # a bug, or a library error nobody turned into a SegstreamError
            log.error("start-up failed: %s", describe_exception(exc))
            log.debug("start-up failed", exc_info=exc)
            return EXIT_FAILED
        signals.attach(worker)
        return await worker.run()


def run_pipeline_file(
    path: str | Path, *, models_dir: Path | None = None, model_files: Mapping[str, Path] | None = None
) -> int:
    """``segstream run``: load, validate and run a pipeline file; the process exit code.

    ``model_files`` (``--model``) bind model ids to files, over the file's ``model.files``.
    """
    try:
        config = load_pipeline(path)
        preview_token = config.http.resolved_preview_token()
    except ConfigError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    found = preflight_problems(config)
    for problem in found:  # what would otherwise retry forever: say so and stop
        print(f"error: {path}: {problem}", file=sys.stderr)
    if found:
        return EXIT_FAILED
    if model_files:
        local = config.model
        if not isinstance(local, OnnxRuntimeConfig | OpenVinoConfig):
            print(f"error: --model needs a local model backend, not {local.backend}", file=sys.stderr)
            return EXIT_FAILED
        files = {**local.files, **model_files}
        config = config.model_copy(update={"model": local.model_copy(update={"files": files})})
    broker_password = config.broker.resolved_password() if config.broker else None
    secrets = [p for p in [broker_password, preview_token] if p]
    configure_logging(config.log_level, config.log_format, secrets=secrets)
    progress = progress_stream(config.log_format, sys.stderr)
    return asyncio.run(run_worker(config, models_dir=models_dir, progress=progress))


def _one_line(exc: BaseException) -> str:
    """A multi-line message (a validation error per field) as one line."""
    text = ""
    for part in filter(None, (line.strip() for line in str(exc).splitlines())):
        text += ("" if not text else " " if text.endswith(":") else "; ") + part
    return text
