"""Workflow definitions: inputs, steps, outputs, in the Workflows JSON shape.

::

    {"version": "1.0",
     "inputs": [{"type": "WorkflowImage", "name": "image"},
                {"type": "WorkflowParameter", "name": "confidence", "default_value": 0.4}],
     "steps": [{"type": "roboflow_core/roboflow_instance_segmentation_model@v4", "name": "seg",
                "images": "$inputs.image", "model_id": "factory-parts/1",
                "confidence_mode": "custom", "custom_confidence": "$inputs.confidence"}],
     "outputs": [{"type": "JsonField", "name": "predictions", "selector": "$steps.seg.predictions"}]}

:func:`load_workflow` reads one from a dict, a JSON string, or a JSON/YAML file, and checks at load
time what can be checked then: field types and ranges, duplicate names, selectors that point nowhere
(a missing input or step, an output the step's version does not produce), ``images`` not pointing at
the ``WorkflowImage`` input, parameters bound to an image input, and each ``default_value`` against
every field it binds. Any problem is a :class:`~worker.errors.ConfigError` with ``.step`` and
``.field`` set (``.step`` is ``None`` for a problem outside the steps).

Per frame, :func:`resolve_step_parameters` turns a step's selectors into values; the control topic
checks new input values with :func:`validate_runtime_inputs`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from worker.documents import config_error, parse_document, read_document
from worker.errors import ConfigError, ParameterError
from worker.step.manifests import (
    ExplainedStep,
    InstanceSegmentationStep,
    serializes_rle,
    step_outputs,
)
from worker.step.parameters import ResolvedStepParameters, resolve_step_parameters

__all__ = [
    "JsonField",
    "ResolvedStepParameters",
    "WorkflowDefinition",
    "WorkflowImage",
    "WorkflowParameter",
    "WorkflowVideoMetadata",
    "load_workflow",
    "resolve_step_parameters",
    "serializes_rle",
    "step_outputs",
    "validate_runtime_inputs",
    "validate_workflow",
]

_NAME_RE: Final = r"^[^.\s$]+$"
_STEP_SELECTOR_RE: Final = re.compile(r"\$steps\.([^.\s$]+)\.([^.\s$]+|\*)")

Name = Annotated[str, Field(pattern=_NAME_RE, description="Unique name; no '.', '$' or spaces.")]
# ``kind`` is written by the Workflows UI; it only types the input for the editor, so it is kept
# for round trips and otherwise ignored.
Kind = list[str | dict[str, Any]] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkflowImage(_Strict):
    """The frame's image (alias ``InferenceImage``). A workflow has exactly one."""

    type: Literal["WorkflowImage", "InferenceImage"]
    name: Name
    kind: Kind = None


class WorkflowParameter(_Strict):
    """A run-time value (alias ``InferenceParameter``) that step fields bind with ``$inputs.<name>``.

    ``default_value`` applies when a frame does not set the input; an input whose
    ``default_value`` is absent has no default (an explicit ``null`` is a default of ``None``).
    """

    type: Literal["WorkflowParameter", "InferenceParameter"]
    name: Name
    kind: Kind = None
    default_value: Any = None

    @property
    def has_default(self) -> bool:
        """Whether ``default_value`` was given (even as ``null``)."""
        return "default_value" in self.model_fields_set


class WorkflowVideoMetadata(_Strict):
    """Video metadata of the frame (fps, frame number); declared for compatibility, not bindable."""

    type: Literal["WorkflowVideoMetadata"]
    name: Name
    kind: Kind = None


def _input_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, Mapping) else getattr(value, "type", None)
    return (
        {
            "WorkflowImage": "image",
            "InferenceImage": "image",
            "WorkflowParameter": "parameter",
            "InferenceParameter": "parameter",
            "WorkflowVideoMetadata": "video_metadata",
        }.get(kind)
        if isinstance(kind, str)
        else None
    )


WorkflowInput = Annotated[
    Annotated[WorkflowImage, Tag("image")]
    | Annotated[WorkflowParameter, Tag("parameter")]
    | Annotated[WorkflowVideoMetadata, Tag("video_metadata")],
    Discriminator(
        _input_tag,
        custom_error_type="unsupported_input_type",
        custom_error_message="unsupported input type; supported types: WorkflowImage (InferenceImage), "
        "WorkflowParameter (InferenceParameter), WorkflowVideoMetadata",
    ),
]


def _check_output_selector(value: Any) -> str:
    if not (isinstance(value, str) and _STEP_SELECTOR_RE.fullmatch(value)):
        raise PydanticCustomError(
            "output_selector", "an output selector must be '$steps.<step>.<output>' or '$steps.<step>.*'"
        )
    return value


class JsonField(_Strict):
    """An output: ``selector`` is ``$steps.<step>.<output>`` or ``$steps.<step>.*`` (all outputs)."""

    type: Literal["JsonField"]
    name: Name
    selector: Annotated[str, PlainValidator(_check_output_selector, json_schema_input_type=str)]
    coordinates_system: Literal["own", "parent"] = "own"

    @property
    def step_name(self) -> str:
        """The step the selector reads."""
        return self.selector.split(".")[1]

    @property
    def step_output(self) -> str | None:
        """The output the selector reads, or ``None`` for ``*`` (all of the step's outputs)."""
        output = self.selector.split(".")[2]
        return None if output == "*" else output


def _fail(message: str, *, step: str | None, field: str) -> PydanticCustomError:
    return PydanticCustomError("workflow_reference", message, {"step": step, "field": field})


def _check_step_inputs(step: InstanceSegmentationStep, inputs: Mapping[str, Any]) -> None:
    """``images`` points at the image input; each bound field at a parameter whose default it accepts."""
    if step.image_input not in inputs:
        raise _fail(
            f"selector {step.images!r} points at no input (inputs: {', '.join(inputs)})",
            step=step.name,
            field="images",
        )
    if not isinstance(inputs[step.image_input], WorkflowImage):
        raise _fail(
            f"{step.images!r} is a {inputs[step.image_input].type}, not a WorkflowImage",
            step=step.name,
            field="images",
        )
    for field, input_name in step.bindings.items():
        bound = inputs.get(input_name)
        if not isinstance(bound, WorkflowParameter):
            what = "no input" if bound is None else f"a {bound.type}, not a WorkflowParameter"
            raise _fail(f"$inputs.{input_name} is {what}", step=step.name, field=field)
        refusal = step.resolver.refusal(field, bound.default_value) if bound.has_default else None
        if refusal is not None:
            raise _fail(
                f"the default_value of $inputs.{input_name} is refused: {refusal}",
                step=step.name,
                field=field,
            )


class WorkflowDefinition(_Strict):
    """A workflow: its inputs, steps and outputs (a pipeline file's ``workflow``, or a workflow file).

    Validated as a whole: names unique, every selector pointing at an input or step that exists,
    defaults accepted by the fields they bind. :func:`load_workflow` turns its errors into a
    ``ConfigError`` naming the step and the field.
    """

    version: str = "1.0"
    inputs: list[WorkflowInput]
    steps: Annotated[list[ExplainedStep], Field(min_length=1)]
    outputs: Annotated[list[JsonField], Field(min_length=1)]

    @model_validator(mode="after")
    def _check_references(self) -> WorkflowDefinition:
        self._check_unique_names()
        images = [item for item in self.inputs if isinstance(item, WorkflowImage)]
        if len(images) != 1:
            raise _fail(
                f"a workflow needs exactly one WorkflowImage input (the frame), found {len(images)}",
                step=None,
                field="inputs",
            )
        inputs = {item.name: item for item in self.inputs}
        for step in self.steps:
            _check_step_inputs(step, inputs)
        self._check_outputs()
        return self

    def _check_unique_names(self) -> None:
        for section, items in (("inputs", self.inputs), ("steps", self.steps), ("outputs", self.outputs)):
            seen: dict[str, int] = {}
            for index, item in enumerate(items):
                if item.name in seen:
                    raise _fail(
                        f"duplicate {section[:-1]} name {item.name!r} ({section}[{seen[item.name]}] "
                        f"and {section}[{index}])",
                        step=item.name if section == "steps" else None,
                        field=f"{section}[{index}].name",
                    )
                seen[item.name] = index

    def _check_outputs(self) -> None:
        steps = {step.name: step for step in self.steps}
        for index, output in enumerate(self.outputs):
            field = f"outputs[{index}].selector"
            target = steps.get(output.step_name)
            if target is None:
                raise _fail(
                    f"output {output.name!r}: {output.selector!r} points at no step "
                    f"(steps: {', '.join(steps)})",
                    step=output.step_name,
                    field=field,
                )
            if output.step_output is not None and output.step_output not in target.outputs:
                raise _fail(
                    f"output {output.name!r}: step {target.name!r} ({target.type}) has no output "
                    f"{output.step_output!r}; its outputs: {', '.join(target.outputs)}",
                    step=target.name,
                    field=field,
                )

    @property
    def image_input(self) -> str:
        """Name of the one ``WorkflowImage`` input (the frame's image)."""
        return next(item.name for item in self.inputs if isinstance(item, WorkflowImage))

    @property
    def parameters(self) -> dict[str, WorkflowParameter]:
        """The ``WorkflowParameter`` inputs by name."""
        return {item.name: item for item in self.inputs if isinstance(item, WorkflowParameter)}

    @property
    def parameter_defaults(self) -> dict[str, Any]:
        """``{name: default_value}`` of the parameters that have one (the resolver's defaults)."""
        return {name: item.default_value for name, item in self.parameters.items() if item.has_default}

    @property
    def input_bindings(self) -> dict[str, list[tuple[str, str]]]:
        """``{input_name: [(step_name, field), ...]}`` for every parameter (empty list if unbound)."""
        result: dict[str, list[tuple[str, str]]] = {name: [] for name in self.parameters}
        for step in self.steps:
            for field, input_name in step.bindings.items():
                result[input_name].append((step.name, field))
        return result

    def step(self, name: str) -> InstanceSegmentationStep:
        """The step called ``name`` (``KeyError`` if there is none)."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


def validate_workflow(data: Any) -> WorkflowDefinition:
    """Validate an already parsed definition (a mapping).

    Raises:
        ConfigError: naming the step (or ``None``) and the field.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"a workflow definition must be a mapping, got {type(data).__name__}")
    try:
        return WorkflowDefinition.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, data, "workflow") from None


def load_workflow(
    source: WorkflowDefinition | Mapping[str, Any] | str | os.PathLike[str],
) -> WorkflowDefinition:
    """Load and check a workflow definition.

    Args:
        source: a definition already validated (returned as it is: a loaded pipeline's
            ``workflow``); a mapping; a JSON string (starts with ``{``); or a path (``str`` or
            ``PathLike``) to a ``.json``, ``.yaml`` or ``.yml`` file, read by
            :func:`worker.documents.read_document` (size limit, ``${VAR}`` expansion, duplicate keys
            refused). Blocking file I/O: call it through the thread pool from async code.

    Returns:
        The validated definition.

    Raises:
        ConfigError: unreadable file, bad syntax, duplicate keys, or an invalid definition;
            ``.step`` and ``.field`` name the first problem, the message lists them all.
    """
    if isinstance(source, WorkflowDefinition):
        return source  # already validated (e.g. the ``workflow`` of a loaded PipelineConfig)
    try:
        return _load_workflow(source)
    except ConfigError:
        raise
    except (RecursionError, ValueError, TypeError, OverflowError) as exc:
        # hostile documents: nesting deeper than the parsers' or validators' recursion, integers of
        # more than 4,300 digits (int/str conversion limit) ...
        where = "workflow" if isinstance(source, Mapping) or str(source).lstrip().startswith("{") else source
        raise ConfigError(f"{where} cannot be read: {type(exc).__name__}: {str(exc)[:200]}") from None


def _load_workflow(source: Mapping[str, Any] | str | os.PathLike[str]) -> WorkflowDefinition:
    if isinstance(source, Mapping):
        return validate_workflow(source)
    if isinstance(source, str) and source.lstrip().startswith("{"):
        return validate_workflow(parse_document(source, syntax="json", origin="workflow JSON", expand=False))
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"{path}: a workflow file must end in .json, .yaml or .yml")
    doc = read_document(path)
    try:
        return validate_workflow(doc)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}", step=exc.step, field=exc.field) from exc.__cause__


def validate_runtime_inputs(workflow: WorkflowDefinition, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check new values of ``$inputs.*`` (e.g. from the control topic) before using them.

    Args:
        workflow: the loaded workflow.
        values: ``{input_name: value}``.

    Returns:
        A new dict of the accepted values, as the steps use them (e.g. ``1`` bound to a float field
        becomes ``1.0``; the value of the first binding when an input binds several fields).

    Raises:
        ParameterError: an unknown input, an input that is not a ``WorkflowParameter``, or a value
            refused by a field it binds (names the step, the field and the input).
    """
    parameters = workflow.parameters
    bindings = workflow.input_bindings
    accepted: dict[str, Any] = {}
    for name, value in values.items():
        if name not in parameters:
            known = ", ".join(parameters) or "none"
            raise ParameterError(f"unknown workflow input {name!r}; parameter inputs: {known}", field=name)
        checked = [
            workflow.step(step).resolver.check_value(field, value, name) for step, field in bindings[name]
        ]
        accepted[name] = checked[0] if checked else value
    return accepted
