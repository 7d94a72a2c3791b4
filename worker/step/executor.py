"""Runs a workflow's segmentation steps on a batch of frames.

``WorkflowRunner`` is built once per pipeline (it loads the models and checks the definition
against them) and then called from the inference thread with one batch at a time. Per frame it
resolves the step's parameters (frame ``parameters`` > values set on the control topic > the
inputs' ``default_value``), runs the model once per (model, frame) even when several steps share a
model, post-processes, serializes, and assembles the workflow's declared outputs. A frame whose
parameters are bad, or whose inference fails, gets its own error; the rest of the batch goes on.

Models are loaded when the runner is built: every literal ``model_id`` and the ``default_value`` of
every input bound to a ``model_id``. A frame asking for any other model gets a ``ParameterError``
(loading a model on the frame path would stall every camera for seconds and let a message grow the
worker's memory without bound).

A model with an end-to-end head (``worker.models.layout``: YOLO26, ``nms=True`` exports) has done its
own NMS: the step's ``iou_threshold``, ``class_agnostic_nms`` and ``max_candidates`` have no effect on
it. That is logged once, when the model is loaded, not per frame.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.errors import ConfigError, ModelError, ParameterError, SegstreamError, StepError
from worker.frame import Frame
from worker.models.backend import RawSegmentation, SegmentationBackend
from worker.models.config import ModelRuntimeConfig
from worker.models.registry import ModelRegistry
from worker.models.remote.hold import detect_holding, infer_holding
from worker.models.remote.step_backend import RemoteStepBackend
from worker.step.detections import Detections
from worker.step.manifests import InstanceSegmentationStep
from worker.step.parameters import DEFAULT_CONFIDENCE, ResolvedStepParameters
from worker.step.postprocess import IGNORED_BY_END2END, PostprocessParams, drop_empty_masks, postprocess_raw
from worker.step.serialize import serialize_predictions
from worker.step.workflow import WorkflowDefinition, validate_runtime_inputs

__all__ = ["BatchResult", "FrameOutcome", "WorkflowRunner", "class_thresholds", "workflow_model_ids"]

log = logging.getLogger(__name__)

_PARAMS_CACHE_LIMIT = 256


#: per frame index: the step's resolved parameters, its model, its post-processing
_Resolved = dict[int, tuple[ResolvedStepParameters, SegmentationBackend, PostprocessParams]]
#: per (model id, frame index): the model's output for that frame, or its error
_RawCache = dict[tuple[str, int], RawSegmentation | Detections | SegstreamError]


@dataclass(slots=True)
class FrameOutcome:
    """What the workflow made of one frame.

    Attributes:
        frame: the input frame.
        outputs: the workflow's outputs (``{output name: JSON-ready value}``), or None on error.
        error: why the frame failed, or None.
        detections: ``{step name: Detections}`` (for the live preview and summaries).
        inference_id: the first step's inference id.
        model_id: the first step's resolved model id.
    """

    frame: Frame
    outputs: dict[str, Any] | None = None
    error: SegstreamError | None = None
    detections: dict[str, Detections] = field(default_factory=dict)
    inference_id: str | None = None
    model_id: str | None = None


@dataclass(slots=True)
class BatchResult:
    """One batch's outcomes (in input order) and where its time went."""

    outcomes: list[FrameOutcome]
    model_seconds: float
    postprocess_seconds: float


def class_thresholds(params: ResolvedStepParameters, model: SegmentationBackend) -> np.ndarray:
    """The per-class confidence thresholds, float32 ``(C,)``, for a step's confidence mode.

    ``custom``/``default`` give the resolved value for every class. ``best`` takes the model's
    ``recommended_parameters.per_class_confidence`` (by class name); classes missing there use
    ``recommended_parameters.confidence``; a model without recommended parameters uses 0.4.
    """
    names = model.class_names
    if params.confidence_mode != "best":
        value = DEFAULT_CONFIDENCE if params.confidence is None else params.confidence
        return np.full(len(names), value, dtype=np.float32)
    recommended = model.metadata.recommended_parameters
    if recommended is None:
        return np.full(len(names), DEFAULT_CONFIDENCE, dtype=np.float32)
    fallback = DEFAULT_CONFIDENCE if recommended.confidence is None else recommended.confidence
    per_class = recommended.per_class_confidence
    return np.array([per_class.get(name, fallback) for name in names], dtype=np.float32)


def workflow_model_ids(workflow: WorkflowDefinition) -> list[str]:
    """The model ids a runner loads for ``workflow``: literal ids and bound inputs' defaults, in order."""
    defaults = dict(workflow.parameter_defaults)
    ids: list[str] = []
    for step in workflow.steps:
        input_name = step.bindings.get("model_id")
        model_id = step.model_id if input_name is None else defaults.get(input_name)
        if isinstance(model_id, str) and model_id not in ids:
            ids.append(model_id)
    return ids


class WorkflowRunner:
    """Loads a workflow's models and runs the workflow on batches of frames.

    Args:
        workflow: the validated definition.
        registry: where models are found.
        model_config: the pipeline's ``model`` section: which backend loads the models, and how
            (default: ONNX Runtime with its defaults). The runner sees models only through the
            ``SegmentationBackend`` protocol.
        id_factory: makes inference and detection ids (uuid4 strings by default).
        held_sources: sources whose frames wait for an unavailable inference server (``every_frame``
            sources: backpressure) instead of failing with ``server_unavailable`` (live sources).

    Raises:
        ModelError: a model cannot be found or loaded.
        ConfigError: a literal (or default) ``class_filter`` names a class the model does not have.
    """

    def __init__(
        self,
        workflow: WorkflowDefinition,
        registry: ModelRegistry,
        *,
        model_config: ModelRuntimeConfig | None = None,
        id_factory: Callable[[], str] | None = None,
        held_sources: Collection[str] = (),
    ) -> None:
        self.workflow = workflow
        self._held_sources = frozenset(held_sources)
        self._registry = registry
        self._model_config = model_config
        self._new_id = id_factory or (lambda: str(uuid.uuid4()))
        self._steps: tuple[InstanceSegmentationStep, ...] = tuple(workflow.steps)
        self._defaults: dict[str, Any] = dict(workflow.parameter_defaults)
        self._defaults_lock = threading.Lock()
        self._models: dict[str, SegmentationBackend] = {}
        self._params_cache: dict[tuple[ResolvedStepParameters, str], PostprocessParams] = {}
        self._outputs = [(out.name, out.step_name, out.step_output) for out in workflow.outputs]
        for step in self._steps:
            for model_id in self._initial_model_ids(step):
                self._load(model_id, step)
        for step in self._steps:
            self._check_class_filter_at_load(step)

    # ----------------------------------------------------------------------------- set-up

    def _initial_model_ids(self, step: InstanceSegmentationStep) -> list[str]:
        input_name = step.bindings.get("model_id")
        if input_name is None:
            return [str(step.model_id)]
        default = self._defaults.get(input_name)
        return [default] if isinstance(default, str) else []

    def _load(self, model_id: str, step: InstanceSegmentationStep) -> SegmentationBackend:
        if model_id not in self._models:
            try:
                model = self._registry.load(model_id, self._model_config)
            except ModelError as exc:
                raise ModelError(f"step {step.name!r}: field 'model_id': {exc}", model_id=model_id) from exc
            self._models[model_id] = model
            if model.metadata.output_layout == "end2end":
                log.info(
                    "model %s has an end-to-end head (NMS done by the model, rows [N, 6 + 32]): the "
                    "step parameters %s have no effect on it",
                    model_id,
                    ", ".join(IGNORED_BY_END2END),
                )
        return self._models[model_id]

    def _check_class_filter_at_load(self, step: InstanceSegmentationStep) -> None:
        try:
            params = step.resolver.resolve(self._defaults, {})
        except ParameterError:
            return  # a selector with no default: checked per frame
        model = self._models.get(params.model_id)
        if model is not None:
            try:
                self._class_ids(params, model)
            except ParameterError as exc:
                raise ConfigError(str(exc), step=step.name, field="class_filter") from None

    @property
    def models(self) -> dict[str, SegmentationBackend]:
        """The loaded models by id."""
        return dict(self._models)

    @property
    def runtime_inputs(self) -> dict[str, Any]:
        """The current values of the workflow's parameter inputs (defaults + control-topic updates)."""
        with self._defaults_lock:
            return dict(self._defaults)

    def set_runtime_inputs(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Change input values for all following frames (the control topic), all or nothing.

        Returns:
            The accepted values.

        Raises:
            ParameterError: an unknown input, a refused value, a model that is not loaded or a class
                the model does not have; nothing is changed then.
        """
        accepted = validate_runtime_inputs(self.workflow, values)
        merged = {**self.runtime_inputs, **accepted}
        for step in self._steps:
            params = step.resolver.resolve(merged, {})
            self._class_ids(params, self._model_for(params))
        with self._defaults_lock:
            self._defaults = merged
        return accepted

    # ----------------------------------------------------------------------------- per frame

    def _model_for(self, params: ResolvedStepParameters) -> SegmentationBackend:
        model = self._models.get(params.model_id)
        if model is None:
            loaded = ", ".join(sorted(self._models)) or "none"
            raise ParameterError(
                f"step {params.step_name!r}: model {params.model_id!r} is not loaded by this worker "
                f"(loaded: {loaded}); models are loaded at start-up",
                step=params.step_name,
                field="model_id",
            )
        return model

    @staticmethod
    def _class_ids(params: ResolvedStepParameters, model: SegmentationBackend) -> np.ndarray | None:
        if params.class_filter is None:
            return None
        names = model.class_names
        unknown = [name for name in params.class_filter if name not in names]
        if unknown:
            raise ParameterError(
                f"step {params.step_name!r}: field 'class_filter': classes {unknown} do not exist in "
                f"the model's training set; model {params.model_id!r} has {list(names)}",
                step=params.step_name,
                field="class_filter",
            )
        return np.array([names.index(name) for name in params.class_filter], dtype=np.int64)

    def _postprocess_params(
        self, params: ResolvedStepParameters, model: SegmentationBackend
    ) -> PostprocessParams:
        key = (params, params.model_id)
        cached = self._params_cache.get(key)
        if cached is None:
            cached = PostprocessParams(
                confidence=class_thresholds(params, model),
                class_ids=self._class_ids(params, model),
                iou_threshold=params.iou_threshold,
                max_detections=params.max_detections,
                class_agnostic_nms=params.class_agnostic_nms,
                max_candidates=params.max_candidates,
                mask_decode_mode=params.mask_decode_mode,
                tradeoff_factor=params.tradeoff_factor,
            )
            if len(self._params_cache) >= _PARAMS_CACHE_LIMIT:
                self._params_cache.clear()
            self._params_cache[key] = cached
        return cached

    def _unknown_parameters(self, frame: Frame) -> ParameterError | None:
        """A per-frame parameter that names no ``WorkflowParameter`` input is refused, not ignored
        (a typo such as ``confidnce`` would otherwise run the frame with the default)."""
        if not frame.parameters:
            return None
        known = self.workflow.parameters
        unknown = sorted(name[:64] for name in frame.parameters if name not in known)
        if not unknown:
            return None
        return ParameterError(
            f"unknown per-frame parameter(s) {unknown}; the workflow's parameter inputs: "
            f"{', '.join(known) or 'none'}",
            field=unknown[0],
        )

    def run_batch(self, frames: Sequence[Frame]) -> BatchResult:
        """Run every step on every frame. Blocking: call it from the inference thread.

        Never raises for a problem of one frame: that frame's outcome carries the error.
        """
        outcomes = [FrameOutcome(frame=f) for f in frames]
        for outcome in outcomes:
            outcome.error = self._unknown_parameters(outcome.frame)
        defaults = self.runtime_inputs  # one snapshot for the whole batch
        # step results per frame: {step name: {output name: value}}
        step_values: list[dict[str, dict[str, Any]]] = [{} for _ in frames]
        model_seconds = 0.0
        post_seconds = 0.0
        raw_cache: _RawCache = {}
        for step in self._steps:
            resolved = self._resolve_step(step, outcomes, defaults)
            model_seconds += self._run_models(frames, resolved, raw_cache)
            started = time.perf_counter()
            for i, (params, model, post) in resolved.items():
                self._postprocess_frame(
                    step, outcomes[i], step_values[i], params, model, post, raw_cache[(params.model_id, i)]
                )
            post_seconds += time.perf_counter() - started
            # a server that runs the whole step answered for this step's parameters only
            for key in [k for k in raw_cache if isinstance(self._models[k[0]], RemoteStepBackend)]:
                del raw_cache[key]
        for i, outcome in enumerate(outcomes):
            if outcome.error is None:
                outcome.outputs = self._assemble(step_values[i])
            else:
                # the traceback holds this call's frame, whose locals hold the whole batch (images
                # included): a reference cycle only the cyclic collector would free, much later
                outcome.error.__traceback__ = None
        return BatchResult(outcomes, model_seconds, post_seconds)

    def _resolve_step(
        self, step: InstanceSegmentationStep, outcomes: Sequence[FrameOutcome], defaults: Mapping[str, Any]
    ) -> _Resolved:
        """The step's parameters, model and post-processing per frame not failed yet (by index).

        A frame whose parameters do not resolve gets the error as its outcome.
        """
        resolved: _Resolved = {}
        for i, outcome in enumerate(outcomes):
            if outcome.error is not None:
                continue
            try:
                params = step.resolver.resolve(defaults, outcome.frame.parameters)
                model = self._model_for(params)
                resolved[i] = (params, model, self._postprocess_params(params, model))
            except ParameterError as exc:
                outcome.error = exc
        return resolved

    def _run_models(self, frames: Sequence[Frame], resolved: _Resolved, raw_cache: _RawCache) -> float:
        """Fill ``raw_cache`` with one inference per (model, frame) it lacks; the seconds it took.

        Steps that use the same model share its outputs.
        """
        by_model: dict[str, list[int]] = {}
        for i, (params, _, _) in resolved.items():
            if (params.model_id, i) not in raw_cache:
                by_model.setdefault(params.model_id, []).append(i)
        seconds = 0.0
        for model_id, indices in by_model.items():
            started = time.perf_counter()
            model = self._models[model_id]
            raws: Sequence[RawSegmentation | Detections | SegstreamError]
            if isinstance(model, RemoteStepBackend):  # the server runs the step: per step
                step_params = [resolved[i][0] for i in indices]
                raws = detect_holding(model, [frames[i] for i in indices], step_params, self._held_sources)
            else:
                raws = self._infer(model, [frames[i] for i in indices])
            seconds += time.perf_counter() - started
            for i, output in zip(indices, raws, strict=True):
                raw_cache[(model_id, i)] = output
        return seconds

    def _postprocess_frame(
        self,
        step: InstanceSegmentationStep,
        outcome: FrameOutcome,
        values_by_step: dict[str, dict[str, Any]],
        params: ResolvedStepParameters,
        model: SegmentationBackend,
        post: PostprocessParams,
        raw: RawSegmentation | Detections | SegstreamError,
    ) -> None:
        """One frame's step outputs from the model's output, or the error as its outcome."""
        if isinstance(raw, SegstreamError):
            outcome.error = raw
            return
        try:
            if isinstance(raw, Detections):  # a remote backend post-processed already
                detections = drop_empty_masks(raw)
            else:
                detections = postprocess_raw(raw, post, len(model.class_names))
            predictions = serialize_predictions(
                detections,
                model.class_names,
                parent_id=outcome.frame.frame_id,
                mask_format="rle" if params.rle_masks else "polygon",
                id_factory=self._new_id,
            )
        except ValueError as exc:  # outputs the post-processing cannot take (a broken model)
            error = StepError(f"step {step.name!r}: post-processing failed: {exc}", step=step.name)
            error.reason = "postprocess_error"
            outcome.error = error
            return
        inference_id = self._new_id()
        values: dict[str, Any] = {"inference_id": inference_id, "predictions": predictions}
        if "model_id" in step.outputs:
            values["model_id"] = params.model_id
        values_by_step[step.name] = values
        outcome.detections[step.name] = detections
        if outcome.inference_id is None:
            outcome.inference_id = inference_id
            outcome.model_id = params.model_id

    def _infer(
        self, model: SegmentationBackend, frames: Sequence[Frame]
    ) -> list[RawSegmentation | SegstreamError]:
        """The batch in one run; if that fails, frame by frame so one bad frame fails alone.

        A remote backend's server failure is not the frames' fault: the batch is not split, held
        sources' frames wait for the server (``worker.models.remote.hold``), the others fail.
        """
        try:
            return list(infer_holding(model, frames, self._held_sources))
        except (ModelError, ValueError) as batch_error:
            if len(frames) == 1:
                return [_inference_error(batch_error, model)]
        results: list[RawSegmentation | SegstreamError] = []
        for frame in frames:
            try:
                results.append(model.infer([frame.image])[0])
            except (ModelError, ValueError) as exc:
                results.append(_inference_error(exc, model))
        return results

    def _assemble(self, values: dict[str, dict[str, Any]]) -> dict[str, Any]:
        outputs: dict[str, Any] = {}
        for name, step_name, step_output in self._outputs:
            step_result = values[step_name]
            outputs[name] = dict(step_result) if step_output is None else step_result[step_output]
        return outputs


def _inference_error(exc: Exception, model: SegmentationBackend) -> ModelError:
    error = exc if isinstance(exc, ModelError) else ModelError(f"inference failed: {exc}")
    error.model_id = model.model_id
    error.reason = "inference_error"
    return error
