"""Step definitions v1..v4: every row of the spec's table, the reference examples, selectors."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import pytest

from tests.step.conftest import PLACEHOLDER, TYPE_V, minimal_step, reference_example
from worker.errors import ConfigError
from worker.step import manifests, parameters
from worker.step.manifests import (
    STEP_OUTPUTS,
    InstanceSegmentationV1,
    InstanceSegmentationV2,
    InstanceSegmentationV3,
    InstanceSegmentationV4,
    parse_step,
    serializes_rle,
    step_outputs,
)

ALL = (1, 2, 3, 4)

# The spec's table: field -> (default, versions that have it).
TABLE: dict[str, tuple[Any, tuple[int, ...]]] = {
    "confidence": (0.4, (1, 2)),
    "confidence_mode": ("best", (3, 4)),
    "custom_confidence": (0.4, (3, 4)),
    "class_filter": (None, ALL),
    "iou_threshold": (0.3, ALL),
    "max_detections": (300, ALL),
    "class_agnostic_nms": (False, ALL),
    "max_candidates": (3000, ALL),
    "mask_decode_mode": ("accurate", ALL),
    "tradeoff_factor": (0.0, ALL),
    "disable_active_learning": (True, ALL),
    "active_learning_target_dataset": (None, ALL),
    "enforce_dense_masks_in_inference_models": (True, (1, 2, 3)),
}

ZERO_TO_ONE = [
    (0.0, True),
    (1.0, True),
    (0, True),
    (1, True),
    (0.55, True),
    (-0.01, False),
    (1.01, False),
    (1.7, False),
    (math.nan, False),
    ("0.5", False),
    (True, False),
    (None, False),
]
POSITIVE_INT = [(1, True), (10_000, True), (0, False), (-1, False), (2.5, False), (3.0, False), ("3", False)]
BOOL = [(True, True), (False, True), (1, False), ("true", False), (None, False)]
# field -> [(value, accepted)]
RANGES: dict[str, list[tuple[Any, bool]]] = {
    "confidence": ZERO_TO_ONE,
    "custom_confidence": [(v, ok) for v, ok in ZERO_TO_ONE if v is not None] + [(None, True)],
    "iou_threshold": ZERO_TO_ONE,
    "tradeoff_factor": ZERO_TO_ONE,
    "max_detections": POSITIVE_INT,
    "max_candidates": POSITIVE_INT,
    "class_agnostic_nms": BOOL,
    "disable_active_learning": BOOL,
    "enforce_dense_masks_in_inference_models": BOOL,
    "confidence_mode": [("best", True), ("default", True), ("custom", True), ("BEST", False), ("", False)],
    "mask_decode_mode": [("accurate", True), ("tradeoff", True), ("fast", True), ("foo", False), (1, False)],
    "class_filter": [(["a", "b"], True), (None, True), ("a", False), ([""], False), ([1], False)],
    "active_learning_target_dataset": [("my_project", True), (None, True), ("", False), (3, False)],
    "model_id": [
        ("my_project/3", True),
        ("factory-parts/1", True),
        ("a.b/v_2", True),
        ("project", False),
        ("a/b/c", False),
        ("../x", False),
        ("a/..", False),
        ("a/ 1", False),
        (3, False),
    ],
}


def _rows_for_versions() -> list[tuple[int, str, Any, bool]]:
    rows = []
    for field, values in RANGES.items():
        versions = TABLE[field][1] if field in TABLE else ALL
        for version in versions:
            rows.extend((version, field, value, ok) for value, ok in values)
    return rows


@pytest.mark.parametrize(("field", "version"), [(f, v) for f in TABLE for v in ALL])
def test_defaults_and_presence_per_version(field: str, version: int) -> None:
    default, versions = TABLE[field]
    step = parse_step(minimal_step(version))
    assert step.version == version
    if version in versions:
        assert getattr(step, field) == default
        assert type(getattr(step, field)) is type(default)
    else:
        assert field not in type(step).model_fields
        with pytest.raises(ConfigError) as caught:
            parse_step(minimal_step(version, **{field: default}))
        assert (caught.value.step, caught.value.field) == ("seg", field)
        assert "not accepted" in str(caught.value) and field in str(caught.value)


@pytest.mark.parametrize(("version", "field", "value", "ok"), _rows_for_versions())
def test_literal_ranges(version: int, field: str, value: Any, ok: bool) -> None:
    context = nullcontext() if ok else pytest.raises(ConfigError)
    with context as caught:
        step = parse_step(minimal_step(version, **{field: value}))
    if ok:
        expected = None if field == "class_filter" and value == [] else value
        assert getattr(step, field) == expected
    else:
        assert caught is not None
        assert (caught.value.step, caught.value.field) == ("seg", field)
        assert "'seg'" in str(caught.value) and repr(field) in str(caught.value)


@pytest.mark.parametrize("version", ALL)
def test_empty_class_filter_means_all_classes(version: int) -> None:
    assert parse_step(minimal_step(version, class_filter=[])).class_filter is None


@pytest.mark.parametrize("version", [3, 4])
def test_reference_example_placeholder_names_allowed_values(version: int) -> None:
    example = reference_example(version)
    assert example["confidence_mode"] == PLACEHOLDER
    with pytest.raises(ConfigError) as caught:
        parse_step(example)
    error = caught.value
    assert (error.step, error.field) == ("<your_step_name_here>", "confidence_mode")
    for allowed in ("'best'", "'default'", "'custom'", PLACEHOLDER):
        assert allowed in str(error)


@pytest.mark.parametrize("version", ALL)
def test_reference_example_loads_with_every_field_equal(version: int) -> None:
    example = reference_example(version)
    if version >= 3:
        example["confidence_mode"] = "custom"
    step = parse_step(example)
    assert step.version == version
    assert step.model_dump() == example  # every field of the version, as given
    assert step.bindings == {}


@pytest.mark.parametrize(
    ("step_type", "model"),
    [
        (TYPE_V.format(1), InstanceSegmentationV1),
        ("RoboflowInstanceSegmentationModel", InstanceSegmentationV1),
        ("InstanceSegmentationModel", InstanceSegmentationV1),
        (TYPE_V.format(2), InstanceSegmentationV2),
        (TYPE_V.format(3), InstanceSegmentationV3),
        (TYPE_V.format(4), InstanceSegmentationV4),
    ],
)
def test_type_identifiers_and_aliases(step_type: str, model: type) -> None:
    step = parse_step(minimal_step(1) | {"type": step_type})
    assert type(step) is model
    assert step.type == step_type


@pytest.mark.parametrize(
    "step_type",
    [TYPE_V.format(5), "roboflow_core/roboflow_object_detection_model@v1", "", None, 4],
)
def test_unsupported_type_lists_supported_ones(step_type: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_step(minimal_step(1) | {"type": step_type})
    assert (caught.value.step, caught.value.field) == ("seg", "type")
    for supported in manifests.STEP_TYPES:
        assert repr(supported) in str(caught.value)


@pytest.mark.parametrize("version", ALL)
def test_image_alias(version: int) -> None:
    data = minimal_step(version)
    data["image"] = data.pop("images")
    step = parse_step(data)
    assert step.images == "$inputs.image" and step.image_input == "image"
    assert "images" in step.model_dump() and "image" not in step.model_dump()


@pytest.mark.parametrize(
    ("images", "ok"),
    [("$inputs.camera", True), ("$steps.a.image", False), ("image", False), ("$inputs.", False), (3, False)],
)
def test_images_must_be_an_input_selector(images: Any, ok: bool) -> None:
    context = nullcontext() if ok else pytest.raises(ConfigError)
    with context as caught:
        parse_step(minimal_step(4, images=images))
    if not ok:
        assert caught is not None and (caught.value.step, caught.value.field) == ("seg", "images")


def test_images_required() -> None:
    data = minimal_step(2)
    del data["images"]
    with pytest.raises(ConfigError) as caught:
        parse_step(data)
    assert (caught.value.step, caught.value.field) == ("seg", "images")


@pytest.mark.parametrize(
    ("name", "ok"), [("seg_1", True), ("<x>", True), ("", False), ("a.b", False), ("$a", False)]
)
def test_step_name(name: str, ok: bool) -> None:
    context = nullcontext() if ok else pytest.raises(ConfigError)
    with context as caught:
        parse_step(minimal_step(4, name=name))
    if not ok:
        assert caught is not None and caught.value.field == "name"


def _ref_rows() -> list[tuple[int, str]]:
    return [
        (version, field) for version in ALL for field in manifests.STEP_CLASSES[version].parameter_fields()
    ]


@pytest.mark.parametrize(("version", "field"), _ref_rows())
def test_selector_on_every_ref_field(version: int, field: str) -> None:
    step = parse_step(minimal_step(version, **{field: "$inputs.knob"}))
    assert getattr(step, field) == "$inputs.knob"
    assert step.bindings == {field: "knob"}
    assert step.model_dump()[field] == "$inputs.knob"


@pytest.mark.parametrize("version", ALL)
def test_every_table_field_is_a_ref_field(version: int) -> None:
    expected = {"model_id"} | {f for f, (_, versions) in TABLE.items() if version in versions}
    assert set(manifests.STEP_CLASSES[version].parameter_fields()) == expected


@pytest.mark.parametrize(
    "selector", ["$inputs.", "$inputs.a.b", "$input.x", "$steps.seg.predictions", "$", "$inputs.a b"]
)
@pytest.mark.parametrize(
    "field", ["active_learning_target_dataset", "model_id", "iou_threshold", "class_filter"]
)
def test_malformed_selector_is_not_taken_for_a_literal(field: str, selector: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_step(minimal_step(4, **{field: selector}))
    assert (caught.value.step, caught.value.field) == ("seg", field)
    assert "$inputs.<name>" in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "error_field"),
    [
        ({"confidence_mode": "custom", "custom_confidence": None}, "custom_confidence"),
        ({"confidence_mode": "custom", "custom_confidence": 0.2}, None),
        ({"confidence_mode": "custom"}, None),  # the default 0.4 applies
        ({"confidence_mode": "custom", "custom_confidence": "$inputs.c"}, None),
        ({"confidence_mode": "best", "custom_confidence": None}, None),
        ({"confidence_mode": "$inputs.mode", "custom_confidence": None}, None),  # checked per frame
    ],
)
@pytest.mark.parametrize("version", [3, 4])
def test_custom_mode_requires_custom_confidence(
    version: int, fields: dict[str, Any], error_field: str | None
) -> None:
    context = nullcontext() if error_field is None else pytest.raises(ConfigError)
    with context as caught:
        parse_step(minimal_step(version, **fields))
    if error_field is not None:
        assert caught is not None and (caught.value.step, caught.value.field) == ("seg", error_field)
        assert "custom_confidence" in str(caught.value)


@pytest.mark.parametrize("field", ["unknown_field", "image_size", "confidence_threshold"])
def test_unknown_fields_are_refused(field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_step(minimal_step(4, **{field: 1}))
    assert (caught.value.step, caught.value.field) == ("seg", field)


def test_every_error_is_listed() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_step(minimal_step(1, confidence=2.0, max_detections=0, mask_decode_mode="foo"))
    message = str(caught.value)
    assert caught.value.field in ("confidence", "max_detections", "mask_decode_mode")
    assert all(f"'{f}'" in message for f in ("confidence", "max_detections", "mask_decode_mode"))


def test_step_is_immutable() -> None:
    step = parse_step(minimal_step(4))
    with pytest.raises(ValueError, match="frozen"):
        step.iou_threshold = 0.9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("version", "outputs", "rle"),
    [
        (1, ("inference_id", "predictions"), False),
        (2, ("inference_id", "predictions", "model_id"), False),
        (3, ("inference_id", "predictions", "model_id"), False),
        (4, ("inference_id", "predictions", "model_id"), True),
    ],
)
def test_outputs_and_mask_format_per_version(version: int, outputs: tuple[str, ...], rle: bool) -> None:
    step = parse_step(minimal_step(version))
    assert step.outputs == outputs == STEP_OUTPUTS[version] == step_outputs(step.type)
    assert step.serializes_rle is rle is serializes_rle(step.type)


@pytest.mark.parametrize("module", [manifests, parameters])
def test_all_names_exist(module: Any) -> None:
    for name in module.__all__:
        assert hasattr(module, name), name
