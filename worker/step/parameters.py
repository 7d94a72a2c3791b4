"""Step parameter values: their types, and their resolution per frame.

Every parameter of the instance segmentation step except ``name``, ``type`` and ``images`` can be a
literal or a selector ``$inputs.<name>`` bound at run time. This module holds:

- the value type of each parameter (one table, :data:`PARAMETER_TYPES`, shared by all versions: a
  field has the same type in every version that has it), used both when a step definition is loaded
  and when a selector is resolved, so a value is accepted or refused the same way in both places;
- :class:`ResolvedStepParameters`, the concrete values a step runs one frame with;
- :class:`StepResolver`, built once per step at load time, which knows which fields are selectors and
  resolves them cheaply per frame (a literal-only step resolves to one cached object);
- :func:`resolve_step_parameters`, the per-frame entry point.

Values are checked strictly: ``"0.5"`` is not a float and ``1`` is not a bool (JSON and YAML give real
types; a string where a number belongs is a mistake worth reporting). Integers are accepted where a
float is expected.

Example:
    >>> resolver = StepResolver("seg", 4, {"model_id": "parts/1", "confidence_mode": "custom",
    ...                                    "custom_confidence": "$inputs.conf"})
    >>> resolver.resolve({"conf": 0.4}, {"conf": 0.7}).confidence
    0.7
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Protocol

from pydantic import AfterValidator, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from worker.documents import describe
from worker.errors import ParameterError
from worker.ids import model_id_problem
from worker.step.defaults import DEFAULT_CONFIDENCE, STEP_DEFAULTS, ConfidenceMode, MaskDecodeMode

__all__ = [
    "DEFAULT_CONFIDENCE",
    "INPUT_SELECTOR_RE",
    "PARAMETER_TYPES",
    "ConfidenceMode",
    "MaskDecodeMode",
    "ResolvedStepParameters",
    "StepResolver",
    "input_selector_name",
    "resolve_step_parameters",
]

#: ``$inputs.<name>``: the only selector a step parameter may hold.
INPUT_SELECTOR_RE: Final = re.compile(r"\$inputs\.([^.\s$]+)")


def input_selector_name(value: object) -> str | None:
    """The input name of a ``$inputs.<name>`` selector, or ``None`` if ``value`` is not one.

    Example:
        >>> input_selector_name("$inputs.confidence"), input_selector_name(0.4)
        ('confidence', None)
    """
    if isinstance(value, str):
        match = INPUT_SELECTOR_RE.fullmatch(value)
        if match:
            return match.group(1)
    return None


def _check_model_id(value: str) -> str:
    problem = model_id_problem(value)
    if problem is not None:
        raise PydanticCustomError("model_id_format", "{problem}", {"problem": problem, "value": value})
    return value


def _empty_filter_is_no_filter(value: list[str] | None) -> list[str] | None:
    # The Workflows UI writes [] for an untouched list; an empty filter would drop every detection.
    return value or None


ZeroToOne = Annotated[float, Field(ge=0.0, le=1.0, strict=True, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
#: upper bounds of the counts (the reference only says > 0): far above any model's candidates (8,400
#: at 640 px), low enough that a hostile value cannot size an allocation (``max_detections: 1e12``)
MAX_DETECTIONS_LIMIT: Final = 10_000
MAX_CANDIDATES_LIMIT: Final = 100_000
DetectionCount = Annotated[int, Field(gt=0, le=MAX_DETECTIONS_LIMIT, strict=True)]
CandidateCount = Annotated[int, Field(gt=0, le=MAX_CANDIDATES_LIMIT, strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]
NonEmptyStr = Annotated[str, Field(min_length=1, strict=True)]
ModelId = Annotated[str, Field(strict=True), AfterValidator(_check_model_id)]
ClassFilter = Annotated[
    list[NonEmptyStr] | None, Field(strict=True), AfterValidator(_empty_filter_is_no_filter)
]

#: The literal value type of every parameter that accepts a selector.
PARAMETER_TYPES: Final[Mapping[str, Any]] = {
    "model_id": ModelId,
    "confidence": ZeroToOne,
    "confidence_mode": ConfidenceMode,
    "custom_confidence": ZeroToOne | None,
    "class_filter": ClassFilter,
    "iou_threshold": ZeroToOne,
    "max_detections": DetectionCount,
    "class_agnostic_nms": StrictBool,
    "max_candidates": CandidateCount,
    "mask_decode_mode": MaskDecodeMode,
    "tradeoff_factor": ZeroToOne,
    "disable_active_learning": StrictBool,
    "active_learning_target_dataset": NonEmptyStr | None,
    "enforce_dense_masks_in_inference_models": StrictBool,
}

_ADAPTERS: Final[dict[str, TypeAdapter[Any]]] = {
    name: TypeAdapter(annotation) for name, annotation in PARAMETER_TYPES.items()
}


@dataclass(frozen=True, slots=True)
class ResolvedStepParameters:
    """The concrete values one step runs one frame with (no selectors left).

    Attributes:
        step_name: the step's ``name``.
        version: 1..4.
        model_id: resolved ``"project/version"``.
        confidence_mode: ``"custom"`` (v1/v2 always: their ``confidence`` is a custom threshold),
            ``"default"`` or ``"best"``.
        confidence: the threshold for ``custom`` (v1/v2 ``confidence``, v3/v4 ``custom_confidence``)
            and ``default`` (:data:`DEFAULT_CONFIDENCE`); ``None`` for ``best``, whose thresholds
            come from the model's metadata.
        class_filter: class names to keep, or ``None`` for all classes (an empty list is ``None``).
        iou_threshold: NMS IoU threshold in [0, 1].
        max_detections: > 0.
        class_agnostic_nms: NMS over all classes together.
        max_candidates: > 0, candidates kept before NMS.
        mask_decode_mode: ``"accurate"``, ``"tradeoff"`` or ``"fast"``.
        tradeoff_factor: in [0, 1].
        disable_active_learning: active learning off.
        active_learning_target_dataset: the dataset name; when not given, the project part of
            ``model_id`` (spec section 7).
        enforce_dense_masks_in_inference_models: ``True`` for v4, which lacks the field.
        rle_masks: predictions are serialized as COCO RLE (v4) rather than polygons (v1-v3).
    """

    step_name: str
    version: int
    model_id: str
    confidence_mode: ConfidenceMode
    confidence: float | None
    class_filter: tuple[str, ...] | None
    iou_threshold: float
    max_detections: int
    class_agnostic_nms: bool
    max_candidates: int
    mask_decode_mode: MaskDecodeMode
    tradeoff_factor: float
    disable_active_learning: bool
    active_learning_target_dataset: str
    enforce_dense_masks_in_inference_models: bool
    rle_masks: bool


class StepResolver:
    """Resolves one step's parameters per frame; built once, when the step is loaded.

    Args:
        step_name: the step's ``name`` (used in errors).
        version: 1..4.
        values: the step's parameter fields as loaded: literals already validated, selectors as
            ``"$inputs.<name>"`` strings. Fields the version lacks are absent.

    Raises:
        ValueError: ``version`` is not 1..4.
    """

    __slots__ = ("_bindings", "_fixed", "_literals", "step_name", "version")

    def __init__(self, step_name: str, version: int, values: Mapping[str, Any]) -> None:
        if version not in (1, 2, 3, 4):
            raise ValueError(f"version must be 1..4, got {version}")
        self.step_name = step_name
        self.version = version
        self._bindings: tuple[tuple[str, str], ...] = tuple(
            (field, name)
            for field, value in values.items()
            if (name := input_selector_name(value)) is not None
        )
        bound = {field for field, _ in self._bindings}
        self._literals = {field: value for field, value in values.items() if field not in bound}
        self._fixed: ResolvedStepParameters | None = None
        if not self._bindings:
            self._fixed = self._build(self._literals, origin={})

    @property
    def bindings(self) -> dict[str, str]:
        """Fields given as selectors: ``{field: input_name}`` (empty for a literal-only step)."""
        return dict(self._bindings)

    def check_value(self, field: str, value: Any, input_name: str) -> Any:
        """Validate a value for ``field`` that came from ``$inputs.<input_name>``.

        Returns:
            The value as the step uses it (an int given for a float becomes a float, ``[]`` for
            ``class_filter`` becomes ``None``).

        Raises:
            ParameterError: wrong type or out of range; names the step, the field and the input.
        """
        try:
            return _ADAPTERS[field].validate_python(value)
        except ValidationError as exc:
            raise ParameterError(
                f"step {self.step_name!r}: field {field!r} bound to $inputs.{input_name}: "
                f"{describe(exc, value, limit=3)}",
                step=self.step_name,
                field=field,
            ) from None

    @staticmethod
    def refusal(field: str, value: Any) -> str | None:
        """Why ``field`` refuses ``value``, or ``None`` if it accepts it.

        Example:
            >>> StepResolver.refusal("max_detections", 0)
            'Input should be greater than 0 (got 0)'
        """
        try:
            _ADAPTERS[field].validate_python(value)
        except ValidationError as exc:
            return describe(exc, value, limit=3)
        return None

    def resolve(
        self, defaults: Mapping[str, Any], frame_parameters: Mapping[str, Any]
    ) -> ResolvedStepParameters:
        """Concrete values for one frame.

        Args:
            defaults: ``{input_name: value}``: the workflow's ``default_value`` of each
                parameter input (and any value set at run time over it).
            frame_parameters: the frame's own ``{input_name: value}``; wins over ``defaults``.
                Names the step does not bind are ignored.

        Returns:
            The resolved parameters (the same cached object every time for a literal-only step).

        Raises:
            ParameterError: a bound input has no value, or its value is refused.
        """
        if self._fixed is not None:
            return self._fixed
        values = dict(self._literals)
        origin: dict[str, str] = {}
        for field, input_name in self._bindings:
            if input_name in frame_parameters:
                value = frame_parameters[input_name]
            elif input_name in defaults:
                value = defaults[input_name]
            else:
                raise ParameterError(
                    f"step {self.step_name!r}: field {field!r} is bound to $inputs.{input_name}, "
                    f"which has no value: the frame does not set it and the input has no default_value",
                    step=self.step_name,
                    field=field,
                )
            values[field] = self.check_value(field, value, input_name)
            origin[field] = input_name
        return self._build(values, origin)

    def _build(self, values: Mapping[str, Any], origin: Mapping[str, str]) -> ResolvedStepParameters:
        values = {**STEP_DEFAULTS, **values}  # a field the definition left out takes the one default
        if self.version <= 2:
            mode: ConfidenceMode = "custom"
            confidence: float | None = values["confidence"]
        else:
            mode = values["confidence_mode"]
            custom = values["custom_confidence"]
            if mode == "custom" and custom is None:
                blame = "custom_confidence" if "custom_confidence" in origin else "confidence_mode"
                source = f" (from $inputs.{origin[blame]})" if blame in origin else ""
                raise ParameterError(
                    f"step {self.step_name!r}: field {blame!r}{source}: confidence_mode 'custom' "
                    f"requires custom_confidence, which is null",
                    step=self.step_name,
                    field=blame,
                )
            confidence = {"custom": custom, "default": DEFAULT_CONFIDENCE, "best": None}[mode]
        model_id: str = values["model_id"]
        class_filter = values["class_filter"]
        dataset = values["active_learning_target_dataset"] or model_id.split("/", 1)[0]
        return ResolvedStepParameters(
            step_name=self.step_name,
            version=self.version,
            model_id=model_id,
            confidence_mode=mode,
            confidence=None if confidence is None else float(confidence),
            class_filter=None if class_filter is None else tuple(class_filter),
            iou_threshold=float(values["iou_threshold"]),
            max_detections=values["max_detections"],
            class_agnostic_nms=values["class_agnostic_nms"],
            max_candidates=values["max_candidates"],
            mask_decode_mode=values["mask_decode_mode"],
            tradeoff_factor=float(values["tradeoff_factor"]),
            disable_active_learning=values["disable_active_learning"],
            active_learning_target_dataset=dataset,
            enforce_dense_masks_in_inference_models=values["enforce_dense_masks_in_inference_models"],
            rle_masks=self.version == 4,
        )


class _HasResolver(Protocol):
    @property
    def resolver(self) -> StepResolver: ...


def resolve_step_parameters(
    step: _HasResolver,
    workflow_inputs_defaults: Mapping[str, Any],
    frame_parameters: Mapping[str, Any],
) -> ResolvedStepParameters:
    """Resolve a loaded step's parameters for one frame.

    Args:
        step: a step definition from :mod:`worker.step.manifests` (it carries its resolver).
        workflow_inputs_defaults: ``{input_name: value}`` of the workflow's parameter inputs
            (``WorkflowDefinition.parameter_defaults``, plus values set at run time).
        frame_parameters: the frame's ``$inputs.*`` bindings (``Frame.parameters``); they win.

    Returns:
        Concrete values for every field.

    Raises:
        ParameterError: a selector has no value, or its value has the wrong type or is out of
            range; the message names the step, the field and the input.
    """
    return step.resolver.resolve(workflow_inputs_defaults, frame_parameters)
