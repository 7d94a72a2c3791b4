"""Step definitions of ``roboflow_core/roboflow_instance_segmentation_model@v1..v4``.

A step definition written for the reference Workflows block loads here unchanged: same type
identifiers (v1 also answers to ``RoboflowInstanceSegmentationModel`` and
``InstanceSegmentationModel``), same fields per version, same defaults (the one table,
:data:`worker.step.defaults.STEP_DEFAULTS`), ``images`` with the alias
``image``. Every parameter field holds a literal or a selector ``$inputs.<name>``; literals are checked
at load time with the same rules that check a selector's value per frame
(:data:`worker.step.parameters.PARAMETER_TYPES`). Unknown fields are refused (``extra="forbid"``).

Use :func:`parse_step` to load one step from a dict (errors become :class:`ConfigError` naming the step
and the field), or :data:`StepDefinition` (a union discriminated on ``type``) inside a larger model.

Example:
    >>> step = parse_step({"type": "roboflow_core/roboflow_instance_segmentation_model@v4",
    ...                    "name": "seg", "image": "$inputs.image", "model_id": "parts/1"})
    >>> step.version, step.confidence_mode, step.outputs, step.serializes_rle
    (4, 'best', ('inference_id', 'predictions', 'model_id'), True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainValidator,
    PrivateAttr,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, ErrorDetails, PydanticCustomError, core_schema

from worker.documents import config_error, problem_details
from worker.step.defaults import STEP_DEFAULTS, ConfidenceMode, MaskDecodeMode
from worker.step.parameters import INPUT_SELECTOR_RE, PARAMETER_TYPES, StepResolver

__all__ = [
    "STEP_CLASSES",
    "STEP_OUTPUTS",
    "STEP_TAGS",
    "STEP_TYPES",
    "ExplainedStep",
    "InstanceSegmentationStep",
    "InstanceSegmentationV1",
    "InstanceSegmentationV2",
    "InstanceSegmentationV3",
    "InstanceSegmentationV4",
    "StepDefinition",
    "parse_step",
    "serializes_rle",
    "step_errors",
    "step_outputs",
]

TYPE_PREFIX: Final = "roboflow_core/roboflow_instance_segmentation_model@v"
#: Outputs each version produces, in the reference block's order.
STEP_OUTPUTS: Final[Mapping[int, tuple[str, ...]]] = {
    1: ("inference_id", "predictions"),
    2: ("inference_id", "predictions", "model_id"),
    3: ("inference_id", "predictions", "model_id"),
    4: ("inference_id", "predictions", "model_id"),
}


class _Ref:
    """Schema of a parameter field: a literal checked as ``literal_type``, or ``$inputs.<name>``.

    Any string starting with ``$`` is a selector; one that is not ``$inputs.<name>`` is refused, so a
    misspelt selector is never taken for a literal (e.g. a dataset name).
    """

    def __init__(self, literal_type: Any) -> None:
        self.literal_type = literal_type

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        literal_schema = handler.generate_schema(self.literal_type)

        def validate(value: Any, validate_literal: Callable[[Any], Any]) -> Any:
            if isinstance(value, str) and value.startswith("$"):
                if INPUT_SELECTOR_RE.fullmatch(value):
                    return value
                raise PydanticCustomError(
                    "selector",
                    "a selector must be '$inputs.<name>' (a step reads workflow inputs only)",
                    {"value": value},
                )
            return validate_literal(value)

        return core_schema.no_info_wrap_validator_function(
            validate,
            literal_schema,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda value: value),
        )

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """The literal's schema, or a ``$inputs.<name>`` selector string."""
        return {"anyOf": [handler(schema), _SELECTOR_JSON_SCHEMA]}


#: JSON schema of a ``$inputs.<name>`` selector (the pipeline schema accepts one wherever a step does)
_SELECTOR_JSON_SCHEMA: Final[dict[str, str]] = {"type": "string", "pattern": r"^\$inputs\.[^.\s$]+$"}


def _ref(field: str) -> _Ref:
    return _Ref(PARAMETER_TYPES[field])


def _check_images(value: Any) -> Any:
    if not (isinstance(value, str) and INPUT_SELECTOR_RE.fullmatch(value)):
        raise PydanticCustomError(
            "images_selector",
            "images must be a selector '$inputs.<name>' of a WorkflowImage input",
            {"value": value},
        )
    return value


def _check_name(value: Any) -> Any:
    if not isinstance(value, str) or not value or any(c in value for c in ".$") or value != value.strip():
        raise PydanticCustomError(
            "step_name",
            "a step name must be a non-empty string without '.', '$' or surrounding spaces",
            {"value": value},
        )
    return value


def _image_alias_in_schema(schema: dict[str, Any]) -> None:
    """The JSON schema accepts ``image`` for ``images``, as validation does (one of them, required)."""
    properties = schema.get("properties", {})
    if "images" not in properties:
        return
    properties["image"] = {**properties["images"], "description": "Alias of images."}
    required = schema.get("required", [])
    if "images" in required:
        required.remove("images")
        schema["oneOf"] = [{"required": ["images"]}, {"required": ["image"]}]


class InstanceSegmentationStep(BaseModel):
    """Base of the four versions: the fields every version has, and what a loaded step offers.

    Attributes:
        version: 1..4 (class attribute).
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, json_schema_extra=_image_alias_in_schema
    )

    version: ClassVar[int]

    name: Annotated[
        str,
        PlainValidator(_check_name, json_schema_input_type=str),
        Field(description="Unique name of the step."),
    ]
    images: Annotated[
        str,
        PlainValidator(_check_images, json_schema_input_type=str),
        Field(
            validation_alias=AliasChoices("images", "image"),
            description="Selector of the WorkflowImage input, e.g. '$inputs.image' (alias: image).",
        ),
    ]
    model_id: Annotated[str, _ref("model_id"), Field(description="'project/version' or a selector.")]
    class_filter: Annotated[list[str] | str | None, _ref("class_filter")] = STEP_DEFAULTS["class_filter"]
    iou_threshold: Annotated[float | str, _ref("iou_threshold")] = STEP_DEFAULTS["iou_threshold"]
    max_detections: Annotated[int | str, _ref("max_detections")] = STEP_DEFAULTS["max_detections"]
    class_agnostic_nms: Annotated[bool | str, _ref("class_agnostic_nms")] = STEP_DEFAULTS[
        "class_agnostic_nms"
    ]
    max_candidates: Annotated[int | str, _ref("max_candidates")] = STEP_DEFAULTS["max_candidates"]
    mask_decode_mode: Annotated[MaskDecodeMode | str, _ref("mask_decode_mode")] = STEP_DEFAULTS[
        "mask_decode_mode"
    ]
    tradeoff_factor: Annotated[float | str, _ref("tradeoff_factor")] = STEP_DEFAULTS["tradeoff_factor"]
    disable_active_learning: Annotated[bool | str, _ref("disable_active_learning")] = STEP_DEFAULTS[
        "disable_active_learning"
    ]
    active_learning_target_dataset: Annotated[str | None, _ref("active_learning_target_dataset")] = (
        STEP_DEFAULTS["active_learning_target_dataset"]
    )

    _resolver: StepResolver = PrivateAttr()

    @model_validator(mode="after")
    def _build_resolver(self) -> InstanceSegmentationStep:
        self._check_fields()
        values = {field: getattr(self, field) for field in self.parameter_fields()}
        self._resolver = StepResolver(self.name, self.version, values)
        return self

    def _check_fields(self) -> None:
        """Cross-field checks of a version (overridden)."""

    @classmethod
    def parameter_fields(cls) -> tuple[str, ...]:
        """Names of the fields that take a literal or a selector, for this version."""
        return tuple(name for name in cls.model_fields if name in PARAMETER_TYPES)

    @property
    def resolver(self) -> StepResolver:
        """The per-frame resolver of this step (see :mod:`worker.step.parameters`)."""
        return self._resolver

    @property
    def bindings(self) -> dict[str, str]:
        """Parameter fields given as selectors: ``{field: input_name}``."""
        return self._resolver.bindings

    @property
    def image_input(self) -> str:
        """Name of the input ``images`` points at."""
        return self.images.split(".", 1)[1]

    @property
    def outputs(self) -> tuple[str, ...]:
        """Names of the outputs this version produces."""
        return STEP_OUTPUTS[self.version]

    @property
    def serializes_rle(self) -> bool:
        """``True`` when predictions are COCO RLE (v4), ``False`` for polygons (v1-v3)."""
        return self.version == 4


class _ThresholdV1V2(InstanceSegmentationStep):
    confidence: Annotated[float | str, _ref("confidence")] = STEP_DEFAULTS["confidence"]
    enforce_dense_masks_in_inference_models: Annotated[
        bool | str, _ref("enforce_dense_masks_in_inference_models")
    ] = STEP_DEFAULTS["enforce_dense_masks_in_inference_models"]


class _ConfidenceModeV3V4(InstanceSegmentationStep):
    confidence_mode: Annotated[ConfidenceMode | str, _ref("confidence_mode")] = STEP_DEFAULTS[
        "confidence_mode"
    ]
    custom_confidence: Annotated[float | str | None, _ref("custom_confidence")] = STEP_DEFAULTS[
        "custom_confidence"
    ]

    def _check_fields(self) -> None:
        if self.confidence_mode == "custom" and self.custom_confidence is None:
            raise PydanticCustomError(
                "custom_confidence_required",
                "confidence_mode 'custom' requires custom_confidence (a float in [0, 1] or a selector)",
            )


class InstanceSegmentationV1(_ThresholdV1V2):
    """``roboflow_core/roboflow_instance_segmentation_model@v1`` (polygon masks, no model_id output)."""

    version: ClassVar[int] = 1
    type: Literal[
        "roboflow_core/roboflow_instance_segmentation_model@v1",
        "RoboflowInstanceSegmentationModel",
        "InstanceSegmentationModel",
    ]


class InstanceSegmentationV2(_ThresholdV1V2):
    """``roboflow_core/roboflow_instance_segmentation_model@v2`` (polygon masks)."""

    version: ClassVar[int] = 2
    type: Literal["roboflow_core/roboflow_instance_segmentation_model@v2"]


class InstanceSegmentationV3(_ConfidenceModeV3V4):
    """``roboflow_core/roboflow_instance_segmentation_model@v3`` (confidence modes, polygon masks)."""

    version: ClassVar[int] = 3
    type: Literal["roboflow_core/roboflow_instance_segmentation_model@v3"]
    enforce_dense_masks_in_inference_models: Annotated[
        bool | str, _ref("enforce_dense_masks_in_inference_models")
    ] = STEP_DEFAULTS["enforce_dense_masks_in_inference_models"]


class InstanceSegmentationV4(_ConfidenceModeV3V4):
    """``roboflow_core/roboflow_instance_segmentation_model@v4`` (confidence modes, COCO RLE masks)."""

    version: ClassVar[int] = 4
    type: Literal["roboflow_core/roboflow_instance_segmentation_model@v4"]


#: Step class per version.
STEP_CLASSES: Final[Mapping[int, type[InstanceSegmentationStep]]] = {
    1: InstanceSegmentationV1,
    2: InstanceSegmentationV2,
    3: InstanceSegmentationV3,
    4: InstanceSegmentationV4,
}
#: Every accepted ``type`` value and the version it selects.
STEP_TYPES: Final[Mapping[str, int]] = {
    "RoboflowInstanceSegmentationModel": 1,
    "InstanceSegmentationModel": 1,
    **{f"{TYPE_PREFIX}{version}": version for version in STEP_CLASSES},
}
_SUPPORTED = ", ".join(repr(name) for name in STEP_TYPES)


def _step_tag(value: Any) -> str | None:
    step_type = value.get("type") if isinstance(value, Mapping) else getattr(value, "type", None)
    version = STEP_TYPES.get(step_type) if isinstance(step_type, str) else None
    return None if version is None else f"v{version}"


#: Any version's step definition, chosen by ``type`` (an unknown type lists the supported ones).
StepDefinition = Annotated[
    Annotated[InstanceSegmentationV1, Tag("v1")]
    | Annotated[InstanceSegmentationV2, Tag("v2")]
    | Annotated[InstanceSegmentationV3, Tag("v3")]
    | Annotated[InstanceSegmentationV4, Tag("v4")],
    Discriminator(
        _step_tag,
        custom_error_type="unsupported_step_type",
        custom_error_message=f"unsupported step type; supported types: {_SUPPORTED}",
    ),
]
STEP_TAGS: Final = frozenset(f"v{version}" for version in STEP_CLASSES)


def step_outputs(step_type: str) -> tuple[str, ...]:
    """Outputs of the step ``type`` (``KeyError`` for an unsupported type)."""
    return STEP_OUTPUTS[STEP_TYPES[step_type]]


def serializes_rle(step_type: str) -> bool:
    """``True`` when the step ``type`` serializes masks as COCO RLE (v4), ``False`` for polygons."""
    return STEP_TYPES[step_type] == 4


def _explain(error: Mapping[str, Any], step_type: Any) -> str:
    """Message of one pydantic error of a step, rewritten where pydantic's own is unhelpful."""
    kind = error["type"]
    field = str(error["loc"][0]) if error["loc"] else ""
    if kind == "extra_forbidden":
        version = STEP_TYPES.get(step_type) if isinstance(step_type, str) else None
        if version is None:
            return f"unknown field {field!r}"
        allowed = [*sorted(STEP_CLASSES[version].model_fields), "image (alias of images)"]
        return f"not accepted by {step_type!r}; accepted fields: {', '.join(allowed)}"
    if kind == "literal_error" and field == "type":
        return f"unsupported step type {error['input']!r}; supported types: {_SUPPORTED}"
    if kind == "custom_confidence_required":
        return str(error["msg"])
    value = repr(error["input"])
    return f"{error['msg']} (got {value[:77] + '...' if len(value) > 80 else value})"


def step_errors(errors: Iterable[ErrorDetails], raw: Any) -> list[tuple[str | None, str, str]]:
    """``(step, field, message)`` for each pydantic error of a step validated from ``raw``.

    Args:
        errors: ``ValidationError.errors()`` of validating one step (locations relative to the
            step; a leading version tag is dropped).
        raw: the data that was validated (to name the step even when its fields are invalid).
    """
    name = raw.get("name") if isinstance(raw, Mapping) else None
    step_type = raw.get("type") if isinstance(raw, Mapping) else None
    result = []
    for error in errors:
        loc = list(error["loc"])
        if loc and loc[0] in STEP_TAGS:
            loc = loc[1:]
        if error["type"] == "unsupported_step_type":
            loc = ["type"]
        elif error["type"] == "custom_confidence_required":
            loc = ["custom_confidence"]
        # drop pydantic's per-type tags of a union ("list[...]", "function-wrap[...]")
        parts = [part for part in loc if "[" not in str(part)]
        field = str(parts[0]) if parts else "<step>"
        if error["type"] == "unsupported_step_type":
            message = f"unsupported step type {step_type!r}; supported types: {_SUPPORTED}"
        else:
            message = _explain({**error, "loc": tuple(loc)}, step_type)
        if len(parts) > 1:  # inside a list: say which item
            message = "".join(f"[{part}]" for part in parts[1:]) + f" {message}"
        result.append((name if isinstance(name, str) else None, field, message))
    return result


def _explained(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Validate one step; its errors become problems named by the step and the field."""
    try:
        return handler(value)
    except ValidationError as exc:
        found = step_errors(exc.errors(), value)
        details = [problem_details(step, field, message, value=value) for step, field, message in found]
        raise ValidationError.from_exception_data("step", details) from None


#: A step definition whose errors name the step and the field (:func:`worker.documents.problems`).
ExplainedStep = Annotated[StepDefinition, WrapValidator(_explained)]


def parse_step(data: Mapping[str, Any]) -> InstanceSegmentationStep:
    """Load one step definition, of any version.

    Args:
        data: the step as in a workflow definition (``{"type": ..., "name": ..., ...}``).

    Returns:
        An :class:`InstanceSegmentationV1` .. :class:`InstanceSegmentationV4`.

    Raises:
        ConfigError: anything invalid; ``.step`` is the step's name (``None`` if it has none) and
            ``.field`` the first invalid field; the message lists every error found.
    """
    try:
        return _STEP_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise config_error(exc, data, "step") from None


_STEP_ADAPTER: Final[TypeAdapter[InstanceSegmentationStep]] = TypeAdapter(ExplainedStep)
