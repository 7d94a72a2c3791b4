"""The active-learning sampler: a result observer that picks frames for labelling.

For every published frame (``on_result``, on the event loop) the sampler resolves the primary step's
``disable_active_learning`` and ``active_learning_target_dataset`` for that frame (literals or
``$inputs.*`` selectors, through the step's own resolver; the dataset defaults to the project part
of ``model_id``), runs the configured strategies in order on the frame's detections, checks the
batch and the limits (the dataset's, then the first matching strategy with credit left, as in the
reference), and hands the frame to the :class:`~worker.active_learning.dataset.DatasetWriter`
without blocking. The cost on the loop is a few numpy operations and a dict lookup per frame; image
encoding, RLE and file writes happen in the writer's thread.

The sampler is a ``worker.publisher.ResultObserver``: the runtime adds it to the publisher's
observers, which hands it every ``PublishedFrame`` and closes it after the last result.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from worker.active_learning.config import NAME_PATTERN, ActiveLearningConfig
from worker.active_learning.dataset import DatasetWriter, Sample
from worker.active_learning.limits import WindowLimiter, batch_name
from worker.active_learning.metrics import precreate, register_metrics
from worker.active_learning.strategies import Strategy, compile_strategies, unknown_classes
from worker.errors import ConfigError, ParameterError
from worker.frame import Frame
from worker.messages import FrameResult
from worker.step.detections import Detections
from worker.step.manifests import InstanceSegmentationStep
from worker.step.parameters import input_selector_name, resolve_step_parameters

__all__ = ["ActiveLearningSampler", "PublishedFrameLike", "build_sampler"]

log = logging.getLogger(__name__)

_NAME = re.compile(NAME_PATTERN)
_NO_CONF = np.zeros(0, np.float32)
_NO_CLASS = np.zeros(0, np.int64)
OTHER = "other"


class PublishedFrameLike(Protocol):
    """What the sampler reads of a ``worker.publisher.PublishedFrame``."""

    @property
    def frame(self) -> Frame: ...
    @property
    def result(self) -> FrameResult: ...
    @property
    def detections(self) -> Detections | None: ...
    @property
    def class_names(self) -> tuple[str, ...]: ...


class ActiveLearningSampler:
    """Samples the primary step's frames into the local dataset (a ``ResultObserver``).

    Args:
        config: the ``active_learning`` section.
        step: the step whose fields decide (the workflow's first step).
        class_names: ``{model_id: class names}`` of the loaded models (strategies' class subsets are
            checked against each at start-up).
        runtime_inputs: the workflow inputs' current values (``WorkflowRunner.runtime_inputs``).
        pipeline: the pipeline's name (in each image's metadata).
        registry: where the samples counter is registered (``Metrics.registry``); ``None``: a new one.
        writer: the dataset writer (default: one built from ``config``).
        clock: Unix seconds, for limits and batch names.
        rng: source of the strategies' draws (default ``random.Random(config.seed)``).
        version: the worker's version (COCO ``info``).

    Raises:
        ConfigError: a strategy's ``selected_class_names`` names a class a model does not have.
    """

    def __init__(
        self,
        config: ActiveLearningConfig,
        *,
        step: InstanceSegmentationStep,
        class_names: Mapping[str, Sequence[str]],
        runtime_inputs: Callable[[], Mapping[str, Any]] = dict,
        pipeline: str = "",
        registry: CollectorRegistry | None = None,
        writer: DatasetWriter | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        version: str = "",
    ) -> None:
        self.config = config
        self._step = step
        self._pipeline = pipeline
        self._runtime_inputs = runtime_inputs
        self._clock = clock
        self._draw = (rng or random.Random(config.seed)).random
        self._strategies: dict[str, tuple[Strategy, ...]] = {}
        for model_id, names in class_names.items():
            for index, strategy_config in enumerate(config.sampling_strategies):
                unknown = unknown_classes(strategy_config, names)
                if unknown:
                    raise ConfigError(
                        f"active_learning: strategy {strategy_config.name!r}: selected_class_names "
                        f"{unknown} do not exist in the model's training set; model {model_id!r} has "
                        f"{list(names)}",
                        field=f"active_learning.sampling_strategies[{index}].selected_class_names",
                    )
            self._strategies[model_id] = compile_strategies(config.sampling_strategies, names)
        self._class_names = {mid: tuple(names) for mid, names in class_names.items()}
        self._dataset_limits = config.limits.as_dict()
        self._strategy_limits = {s.name: s.window_limits() for s in config.sampling_strategies}
        self._limiter = WindowLimiter(clock)
        self._counter: Counter = register_metrics(registry or CollectorRegistry())
        self._children: dict[tuple[str, str, str], Any] = {}
        self._datasets: set[str] = set()
        batching = config.batching_strategy
        self._prefix = batching.batches_name_prefix
        self._interval = batching.recreation_interval
        self._writer = writer or DatasetWriter(
            config.root,
            queue_size=config.queue_size,
            max_image_size=config.max_image_size,
            jpeg_quality=config.jpeg_compression_level,
            persist_predictions=config.persist_predictions,
            segmentation_format=config.segmentation_format,
            max_batch_images=batching.max_batch_images,
            on_outcome=self._written,
            report_interval_s=config.error_report_interval_s,
            clock=clock,
            version=version,
        )
        self._fixed = self._fixed_fields(step)
        if self._fixed is not None and not self._fixed[0]:
            precreate(self._counter, [self._fixed[1]], [s.name for s in config.sampling_strategies])

    # -------------------------------------------------------------------------------- set-up

    def _fixed_fields(self, step: InstanceSegmentationStep) -> tuple[bool, str] | None:
        """``(disabled, dataset)`` when no selector can change them per frame, else ``None``."""
        if {"disable_active_learning", "active_learning_target_dataset", "model_id"} & set(step.bindings):
            return None
        try:
            params = resolve_step_parameters(step, self._runtime_inputs(), {})
        except ParameterError:  # another field's selector has no default: resolve per frame then
            return None
        return params.disable_active_learning, params.active_learning_target_dataset

    def start(self) -> None:
        """Start the writer thread."""
        self._writer.start()

    @property
    def writer(self) -> DatasetWriter:
        return self._writer

    def status(self) -> dict[str, Any]:
        """JSON-ready state for the readiness details."""
        return {**self._writer.status(), "datasets": sorted(self._datasets)}

    # -------------------------------------------------------------------------------- per frame

    def _count(self, dataset: str, strategy: str, outcome: str) -> None:
        key = (dataset, strategy, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._counter.labels(dataset, strategy, outcome)
        child.inc()

    def _written(self, sample: Sample, outcome: str) -> None:
        """Writer thread: a sample's final outcome."""
        self._count(sample.dataset, str(sample.metadata.get("strategy", "")), outcome)

    def _accept_dataset(self, dataset: str) -> bool:
        if dataset in self._datasets:
            return True
        if not _NAME.fullmatch(dataset) or len(self._datasets) >= self.config.max_datasets:
            return False
        self._datasets.add(dataset)
        precreate(self._counter, [dataset], [s.name for s in self.config.sampling_strategies])
        return True

    def _decide_fields(self, frame: Frame) -> tuple[bool, str]:
        if self._fixed is not None:
            return self._fixed
        params = resolve_step_parameters(self._step, self._runtime_inputs(), frame.parameters)
        return params.disable_active_learning, params.active_learning_target_dataset

    def on_result(self, published: PublishedFrameLike) -> None:
        """Decide for one published frame; never blocks (the write is queued or dropped)."""
        if not self.config.enabled:
            return
        frame = published.frame
        try:
            disabled, dataset = self._decide_fields(frame)
        except ParameterError:  # the control topic changed an input since the frame ran: skip it
            return
        if disabled:
            return
        model_id = published.result.model_id or ""
        strategies = self._strategies.get(model_id)
        if strategies is None:  # a model loaded after start-up cannot happen; be safe
            return
        det = published.detections
        conf, cls = (det.confidence, det.class_id) if det is not None else (_NO_CONF, _NO_CLASS)
        matching = [s for s in strategies if s.matches(conf, cls, self._draw)]
        if not matching:
            return
        if not self._accept_dataset(dataset):
            self._count(OTHER, matching[0].name, "refused")
            return
        now = self._clock()
        batch = batch_name(self._prefix, self._interval, now)
        if self._writer.batch_full(dataset, batch):
            self._count(dataset, matching[0].name, "batch_full")
            return
        chosen = ticket = None
        for strategy in matching:
            ticket = self._limiter.acquire(
                [
                    (dataset, self._dataset_limits),
                    ((dataset, strategy.name), self._strategy_limits[strategy.name]),
                ]
            )
            if ticket is not None:
                chosen = strategy
                break
        if chosen is None or ticket is None:
            self._count(dataset, matching[0].name, "limited")
            return
        result = published.result
        sample = Sample(
            dataset=dataset,
            batch=batch,
            image=frame.image,
            detections=det,
            class_names=tuple(published.class_names) or self._class_names.get(model_id, ()),
            metadata={
                "pipeline": self._pipeline,
                "source": frame.source_id,
                "frame_id": frame.frame_id,
                "frame_number": frame.frame_number,
                "capture_time": frame.timestamp,
                "strategy": chosen.name,
                "inference_id": result.inference_id,
                "model_id": result.model_id,
            },
            outputs=result.outputs,
        )
        if not self._writer.try_put(sample):
            self._limiter.release(ticket)
            self._count(dataset, chosen.name, "dropped")

    async def aclose(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Write what is queued (within ``timeout``) and stop the writer."""
        left = await asyncio.to_thread(self._writer.close, timeout)
        if left:
            log.warning("active learning: %d samples not written before exit", left)


def build_sampler(
    config: ActiveLearningConfig | None,
    steps: Sequence[InstanceSegmentationStep],
    class_names: Mapping[str, Sequence[str]],
    *,
    runtime_inputs: Callable[[], Mapping[str, Any]],
    pipeline: str,
    registry: CollectorRegistry,
    version: str = "",
) -> ActiveLearningSampler | None:
    """The sampler for a pipeline, or ``None`` when there is nothing to sample (started by the caller).

    A step that enables active learning without an ``active_learning`` section gets a warning: no
    samples are collected then. Only the first step's frames are sampled.
    """
    primary = steps[0]
    enabled_somewhere = any(
        s.disable_active_learning is False or input_selector_name(s.disable_active_learning) is not None
        for s in steps
    )
    if config is None or not config.enabled:
        if enabled_somewhere:
            log.warning(
                "a step enables active learning but the pipeline has no (enabled) active_learning section: "
                "no samples are collected"
            )
        return None
    if not enabled_somewhere:
        log.info("active_learning is configured but every step has disable_active_learning: true")
    for extra in steps[1:]:
        if extra.disable_active_learning is False:
            log.warning(
                "step %r enables active learning: only the first step's frames are sampled", extra.name
            )
    return ActiveLearningSampler(
        config,
        step=primary,
        class_names=class_names,
        runtime_inputs=runtime_inputs,
        pipeline=pipeline,
        registry=registry,
        version=version,
    )
