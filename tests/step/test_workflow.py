"""Workflow definitions: loading, load-time checks, per-frame parameter resolution."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from tests.step.conftest import TYPE_V, minimal_step, reference_example, workflow_dict
from worker.errors import ConfigError, ParameterError
from worker.step import workflow as workflow_module
from worker.step.workflow import (
    JsonField,
    WorkflowDefinition,
    WorkflowParameter,
    load_workflow,
    resolve_step_parameters,
    validate_runtime_inputs,
)

SPEC_EXAMPLE: dict[str, Any] = {
    "version": "1.0",
    "inputs": [
        {"type": "WorkflowImage", "name": "image"},
        {"type": "WorkflowParameter", "name": "confidence", "default_value": 0.4},
    ],
    "steps": [
        {
            "type": TYPE_V.format(4),
            "name": "seg",
            "images": "$inputs.image",
            "model_id": "factory-parts/1",
            "confidence_mode": "custom",
            "custom_confidence": "$inputs.confidence",
        }
    ],
    "outputs": [{"type": "JsonField", "name": "predictions", "selector": "$steps.seg.predictions"}],
}


def param(name: str, *default: Any) -> dict[str, Any]:
    """A WorkflowParameter input; ``default`` (one value) sets ``default_value``."""
    return {"type": "WorkflowParameter", "name": name} | ({"default_value": default[0]} if default else {})


# ---------------------------------------------------------------- loading


def test_spec_example_loads_from_dict() -> None:
    workflow = load_workflow(SPEC_EXAMPLE)
    assert workflow.image_input == "image"
    assert workflow.parameter_defaults == {"confidence": 0.4}
    assert workflow.input_bindings == {"confidence": [("seg", "custom_confidence")]}
    assert workflow.step("seg").bindings == {"custom_confidence": "confidence"}
    assert workflow.outputs[0].step_name == "seg" and workflow.outputs[0].step_output == "predictions"


def test_json_string_and_json_and_yaml_files_give_the_same_definition(tmp_path: Path) -> None:
    import yaml

    json_file = tmp_path / "w.json"
    json_file.write_text(json.dumps(SPEC_EXAMPLE))
    yaml_file = tmp_path / "w.yaml"
    yaml_file.write_text(yaml.safe_dump(SPEC_EXAMPLE))
    yml_file = tmp_path / "w.yml"
    yml_file.write_text(yaml.safe_dump(SPEC_EXAMPLE))
    expected = load_workflow(SPEC_EXAMPLE).model_dump()
    for source in (json.dumps(SPEC_EXAMPLE), json_file, str(json_file), yaml_file, str(yml_file)):
        assert load_workflow(source).model_dump() == expected


def test_example_files(workflows_dir: Path) -> None:
    v4 = load_workflow(workflows_dir / "factory_v4.json")
    assert [s.version for s in v4.steps] == [4]
    assert v4.parameter_defaults == {"confidence": 0.4, "classes": None}
    mixed = load_workflow(workflows_dir / "factory_v1_v3.yaml")
    assert [(s.name, s.version) for s in mixed.steps] == [("legacy", 1), ("modes", 3)]
    assert mixed.step("legacy").bindings == {"model_id": "model", "iou_threshold": "iou"}
    assert mixed.outputs[1].step_output is None  # $steps.modes.*


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_reference_examples_paste_into_a_workflow(version: int) -> None:
    step = reference_example(version)
    if version >= 3:
        step["confidence_mode"] = "custom"
    workflow = load_workflow(workflow_dict(step))
    assert workflow.steps[0].model_dump() == step


@pytest.mark.parametrize(
    ("text", "suffix", "fragment"),
    [
        ('{"version": "1.0", "inputs": [', ".json", "invalid JSON"),
        ("inputs: [\n  - a", ".yaml", "invalid YAML"),
        ('{"version": "1.0", "version": "2.0"}', ".json", "duplicate key"),
        ("version: '1.0'\nversion: '2.0'\n", ".yml", "duplicate key"),
        ("- just\n- a list\n", ".yaml", "must be a mapping"),
        ("{}", ".txt", "must end in .json, .yaml or .yml"),
    ],
)
def test_file_errors(tmp_path: Path, text: str, suffix: str, fragment: str) -> None:
    path = tmp_path / f"workflow{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment) as caught:
        load_workflow(path)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_workflow(tmp_path / "absent.json")


def test_input_aliases_and_kind() -> None:
    data = workflow_dict(minimal_step(4, confidence_mode="$inputs.mode"))
    data["inputs"] = [
        {"type": "InferenceImage", "name": "image", "kind": ["image"]},
        {"type": "InferenceParameter", "name": "mode", "default_value": "best", "kind": [{"name": "string"}]},
        {"type": "WorkflowVideoMetadata", "name": "meta"},
    ]
    workflow = load_workflow(data)
    assert workflow.parameters["mode"].default_value == "best"


@pytest.mark.parametrize(
    ("given", "has_default"), [({}, False), ({"default_value": None}, True), ({"default_value": 3}, True)]
)
def test_default_value_absent_differs_from_null(given: dict[str, Any], has_default: bool) -> None:
    parameter = WorkflowParameter.model_validate({"type": "WorkflowParameter", "name": "p"} | given)
    assert parameter.has_default is has_default


# ---------------------------------------------------------------- load-time errors


def _without_output(data: dict[str, Any]) -> dict[str, Any]:
    data["outputs"] = []
    return data


# (description, workflow, expected .step, expected .field, fragment of the message)
LOAD_ERRORS: list[tuple[str, dict[str, Any], str | None, str, str]] = [
    (
        "selector to a missing input",
        workflow_dict(minimal_step(4, custom_confidence="$inputs.nope")),
        "seg",
        "custom_confidence",
        "$inputs.nope is no input",
    ),
    (
        "images to a missing input",
        workflow_dict(minimal_step(4, images="$inputs.camera")),
        "seg",
        "images",
        "points at no input",
    ),
    (
        "images to a parameter",
        workflow_dict(minimal_step(4, images="$inputs.p"), inputs=[param("p", 1)]),
        "seg",
        "images",
        "not a WorkflowImage",
    ),
    (
        "parameter field bound to the image",
        workflow_dict(minimal_step(2, confidence="$inputs.image")),
        "seg",
        "confidence",
        "not a WorkflowParameter",
    ),
    (
        "output of a missing step",
        workflow_dict(minimal_step(4))
        | {"outputs": [{"type": "JsonField", "name": "o", "selector": "$steps.x.*"}]},
        "x",
        "outputs[0].selector",
        "points at no step",
    ),
    (
        "v1 has no model_id output",
        workflow_dict(minimal_step(1))
        | {"outputs": [{"type": "JsonField", "name": "m", "selector": "$steps.seg.model_id"}]},
        "seg",
        "outputs[0].selector",
        "has no output 'model_id'",
    ),
    (
        "malformed output selector",
        workflow_dict(minimal_step(4))
        | {"outputs": [{"type": "JsonField", "name": "o", "selector": "seg.predictions"}]},
        None,
        "outputs[0].selector",
        "output selector must be",
    ),
    (
        "duplicate step names",
        workflow_dict(minimal_step(4), minimal_step(3)),
        "seg",
        "steps[1].name",
        "duplicate step name 'seg'",
    ),
    (
        "duplicate input names",
        workflow_dict(minimal_step(4), inputs=[param("a"), param("a")]),
        None,
        "inputs[2].name",
        "duplicate input name 'a'",
    ),
    (
        "duplicate output names",
        workflow_dict(minimal_step(4))
        | {"outputs": [{"type": "JsonField", "name": "o", "selector": "$steps.seg.*"}] * 2},
        None,
        "outputs[1].name",
        "duplicate output name 'o'",
    ),
    (
        "unsupported step type",
        workflow_dict(minimal_step(4) | {"type": "roboflow_core/roboflow_object_detection_model@v2"}),
        "seg",
        "type",
        "supported types",
    ),
    (
        "literal out of range",
        workflow_dict(minimal_step(4, name="cam", iou_threshold=1.5)),
        "cam",
        "iou_threshold",
        "less than or equal to 1",
    ),
    (
        "field absent in the version",
        workflow_dict(minimal_step(4, enforce_dense_masks_in_inference_models=True)),
        "seg",
        "enforce_dense_masks_in_inference_models",
        "not accepted",
    ),
    (
        "default_value out of range for a field it binds",
        workflow_dict(minimal_step(4, custom_confidence="$inputs.c"), inputs=[param("c", 1.7)]),
        "seg",
        "custom_confidence",
        "default_value",
    ),
    (
        "no image input",
        workflow_dict(minimal_step(4)) | {"inputs": [param("p")]},
        None,
        "inputs",
        "exactly one WorkflowImage",
    ),
    (
        "two image inputs",
        workflow_dict(minimal_step(4), inputs=[{"type": "WorkflowImage", "name": "other"}]),
        None,
        "inputs",
        "exactly one WorkflowImage",
    ),
    (
        "unknown input type",
        workflow_dict(minimal_step(4), inputs=[{"type": "WorkflowBatch", "name": "b"}]),
        None,
        "inputs[1]",
        "unsupported input type",
    ),
    ("no steps", workflow_dict() | {"outputs": []}, None, "steps", "at least 1 item"),
    ("no outputs", _without_output(workflow_dict(minimal_step(4))), None, "outputs", "at least 1 item"),
    ("unknown top-level key", workflow_dict(minimal_step(4)) | {"extra": 1}, None, "extra", "not permitted"),
]


@pytest.mark.parametrize(
    ("data", "step", "field", "fragment"),
    [row[1:] for row in LOAD_ERRORS],
    ids=[row[0] for row in LOAD_ERRORS],
)
def test_load_time_errors_name_step_and_field(
    data: dict[str, Any], step: str | None, field: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_workflow(data)
    error = caught.value
    assert (error.step, error.field) == (step, field)
    assert fragment in str(error)
    if step is not None:
        assert repr(step) in str(error)
    assert field.split("[")[0] in str(error)


def test_workflow_model_checks_references_however_it_is_built() -> None:
    with pytest.raises(ValueError, match="points at no step"):
        WorkflowDefinition.model_validate(
            workflow_dict(minimal_step(4))
            | {"outputs": [{"type": "JsonField", "name": "o", "selector": "$steps.z.*"}]}
        )


def test_jsonfield_star_selector() -> None:
    field = JsonField(type="JsonField", name="all", selector="$steps.seg.*")
    assert (field.step_name, field.step_output) == ("seg", None)


# ---------------------------------------------------------------- run-time resolution


def _resolve(data: dict[str, Any], frame: dict[str, Any] | None = None, step: str = "seg") -> Any:
    workflow = load_workflow(data)
    return resolve_step_parameters(workflow.step(step), workflow.parameter_defaults, frame or {})


def test_literal_only_step_resolves_to_one_cached_object() -> None:
    workflow = load_workflow(workflow_dict(reference_example(2)))
    step = workflow.steps[0]
    first = resolve_step_parameters(step, {}, {"anything": 1})
    assert resolve_step_parameters(step, {}, {}) is first
    assert (first.model_id, first.confidence_mode, first.confidence) == ("my_project/3", "custom", 0.3)
    assert first.class_filter == ("a", "b", "c")
    assert (first.iou_threshold, first.max_detections, first.class_agnostic_nms) == (0.4, 300, True)
    assert (first.max_candidates, first.mask_decode_mode, first.tradeoff_factor) == (3000, "accurate", 0.3)
    assert first.active_learning_target_dataset == "my_project"
    assert first.enforce_dense_masks_in_inference_models is True and first.rle_masks is False


@pytest.mark.parametrize(
    ("version", "fields", "mode", "confidence"),
    [
        (1, {}, "custom", 0.4),
        (2, {"confidence": 0.25}, "custom", 0.25),
        (3, {}, "best", None),
        (3, {"confidence_mode": "default", "custom_confidence": 0.9}, "default", 0.4),
        (4, {"confidence_mode": "custom", "custom_confidence": 0.9}, "custom", 0.9),
        (4, {"confidence_mode": "custom", "custom_confidence": 1}, "custom", 1.0),
    ],
)
def test_effective_confidence(
    version: int, fields: dict[str, Any], mode: str, confidence: float | None
) -> None:
    resolved = _resolve(workflow_dict(minimal_step(version, **fields)))
    assert (resolved.confidence_mode, resolved.confidence) == (mode, confidence)
    assert resolved.version == version and resolved.rle_masks is (version == 4)


@pytest.mark.parametrize(("version", "dense"), [(1, False), (3, False), (4, True)])
def test_enforce_dense_masks(version: int, dense: bool) -> None:
    fields = {} if version == 4 else {"enforce_dense_masks_in_inference_models": False}
    assert (
        _resolve(workflow_dict(minimal_step(version, **fields))).enforce_dense_masks_in_inference_models
        is dense
    )


def test_defaults_then_frame_overrides() -> None:
    data = workflow_dict(
        minimal_step(4, model_id="$inputs.model", max_detections="$inputs.n", class_filter="$inputs.classes"),
        inputs=[param("model", "parts/2"), param("n", 10), param("classes", None)],
    )
    workflow = load_workflow(data)
    step, defaults = workflow.steps[0], workflow.parameter_defaults
    base = resolve_step_parameters(step, defaults, {})
    assert (base.model_id, base.max_detections, base.class_filter) == ("parts/2", 10, None)
    assert base.active_learning_target_dataset == "parts"
    frame = resolve_step_parameters(step, defaults, {"n": 5, "classes": ["bolt", "nut"], "unrelated": "x"})
    assert (frame.model_id, frame.max_detections, frame.class_filter) == ("parts/2", 5, ("bolt", "nut"))
    assert resolve_step_parameters(step, defaults, {"classes": []}).class_filter is None
    # the frame's values do not stick
    assert resolve_step_parameters(step, defaults, {}) == base


def test_selector_without_value_is_a_parameter_error() -> None:
    data = workflow_dict(minimal_step(2, confidence="$inputs.threshold"), inputs=[param("threshold")])
    with pytest.raises(ParameterError) as caught:
        _resolve(data)
    assert (caught.value.step, caught.value.field) == ("seg", "confidence")
    assert "$inputs.threshold" in str(caught.value) and "no value" in str(caught.value)
    assert _resolve(data, {"threshold": 0.6}).confidence == 0.6


# field bound to $inputs.x, then a frame value that must be refused
BAD_VALUES: list[tuple[int, str, Any]] = [
    (2, "confidence", 1.7),
    (4, "custom_confidence", -0.1),
    (4, "custom_confidence", "0.5"),
    (1, "max_detections", 0),
    (3, "max_candidates", 2.5),
    (4, "mask_decode_mode", "foo"),
    (3, "confidence_mode", "<block_does_not_provide_example>"),
    (4, "class_filter", "bolt"),
    (4, "class_agnostic_nms", 1),
    (2, "iou_threshold", None),
    (1, "tradeoff_factor", float("inf")),
    (4, "model_id", "no-version"),
    (4, "active_learning_target_dataset", ""),
    (3, "enforce_dense_masks_in_inference_models", "yes"),
    (1, "disable_active_learning", "false"),
]


@pytest.mark.parametrize(("version", "field", "value"), BAD_VALUES)
def test_bad_runtime_value_is_a_parameter_error(version: int, field: str, value: Any) -> None:
    data = workflow_dict(minimal_step(version, **{field: "$inputs.x"}), inputs=[param("x")])
    with pytest.raises(ParameterError) as caught:
        _resolve(data, {"x": value})
    error = caught.value
    assert (error.step, error.field) == ("seg", field)
    assert "'seg'" in str(error) and repr(field) in str(error) and "$inputs.x" in str(error)


def test_mode_from_selector_custom_without_confidence() -> None:
    data = workflow_dict(
        minimal_step(4, confidence_mode="$inputs.mode", custom_confidence=None),
        inputs=[param("mode", "best")],
    )
    assert _resolve(data).confidence is None
    with pytest.raises(ParameterError) as caught:
        _resolve(data, {"mode": "custom"})
    assert caught.value.field == "confidence_mode" and "$inputs.mode" in str(caught.value)


def test_a_bad_frame_does_not_affect_the_next() -> None:
    workflow = load_workflow(SPEC_EXAMPLE)
    step = workflow.steps[0]
    with pytest.raises(ParameterError):
        resolve_step_parameters(step, workflow.parameter_defaults, {"confidence": 1.7})
    assert resolve_step_parameters(step, workflow.parameter_defaults, {"confidence": 0.7}).confidence == 0.7


# ---------------------------------------------------------------- run-time inputs (control topic)


def _two_steps() -> WorkflowDefinition:
    return load_workflow(
        workflow_dict(
            minimal_step(4, name="a", custom_confidence="$inputs.x", max_detections="$inputs.n"),
            minimal_step(1, name="b", iou_threshold="$inputs.x"),
            inputs=[param("x", 0.5), param("n"), param("unused", "free")],
        )
    )


@pytest.mark.parametrize(
    ("values", "accepted", "error"),
    [
        ({"x": 1}, {"x": 1.0}, None),
        ({"n": 7, "unused": {"any": "thing"}}, {"n": 7, "unused": {"any": "thing"}}, None),
        ({}, {}, None),
        ({"x": None}, None, ("b", "iou_threshold")),  # fine for a.custom_confidence, not for b
        ({"x": 1.5}, None, ("a", "custom_confidence")),
        ({"n": 0}, None, ("a", "max_detections")),
        ({"nope": 1}, None, (None, "nope")),
        ({"image": 1}, None, (None, "image")),
    ],
)
def test_validate_runtime_inputs(
    values: dict[str, Any], accepted: dict[str, Any] | None, error: tuple[str | None, str] | None
) -> None:
    workflow = _two_steps()
    context = nullcontext() if error is None else pytest.raises(ParameterError)
    with context as caught:
        result = validate_runtime_inputs(workflow, values)
    if error is None:
        assert result == accepted
    else:
        assert caught is not None and (caught.value.step, caught.value.field) == error
        name = next(iter(values))
        assert name in str(caught.value)


def test_all_names_exist() -> None:
    for name in workflow_module.__all__:
        assert hasattr(workflow_module, name), name
