"""One table of step defaults: the step definitions, the resolver and the post-processing agree with it."""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest

from worker.step import defaults, manifests, parameters, postprocess
from worker.step.defaults import MASK_DECODE_MODES, STEP_DEFAULTS
from worker.step.manifests import STEP_CLASSES, parse_step

TYPE = "roboflow_core/roboflow_instance_segmentation_model@v"


@pytest.mark.parametrize("version", sorted(STEP_CLASSES))
def test_step_fields_default_to_the_table(version: int) -> None:
    fields = STEP_CLASSES[version].model_fields
    for name in STEP_CLASSES[version].parameter_fields():
        if name == "model_id":
            continue  # required
        assert fields[name].default == STEP_DEFAULTS[name], (version, name)


@pytest.mark.parametrize("version", sorted(STEP_CLASSES))
def test_a_minimal_step_resolves_to_the_table(version: int) -> None:
    step = parse_step({"type": f"{TYPE}{version}", "name": "s", "image": "$inputs.image", "model_id": "p/1"})
    resolved = step.resolver.resolve({}, {})
    for name in ("iou_threshold", "max_detections", "class_agnostic_nms", "max_candidates"):
        assert getattr(resolved, name) == STEP_DEFAULTS[name], name
    assert resolved.mask_decode_mode == STEP_DEFAULTS["mask_decode_mode"]
    assert resolved.tradeoff_factor == STEP_DEFAULTS["tradeoff_factor"]
    assert resolved.disable_active_learning is STEP_DEFAULTS["disable_active_learning"]
    assert resolved.enforce_dense_masks_in_inference_models is True
    expected = STEP_DEFAULTS["confidence"] if version <= 2 else None  # v3/v4 default to "best"
    assert resolved.confidence == expected


def test_postprocess_params_default_to_the_table() -> None:
    found = {f.name: f.default for f in dataclasses.fields(postprocess.PostprocessParams)}
    for name in ("iou_threshold", "max_detections", "class_agnostic_nms", "max_candidates"):
        assert found[name] == STEP_DEFAULTS[name], name
    assert found["mask_decode_mode"] == STEP_DEFAULTS["mask_decode_mode"]
    assert found["tradeoff_factor"] == STEP_DEFAULTS["tradeoff_factor"]
    assert found["confidence"] == STEP_DEFAULTS["confidence"]


def test_one_mask_decode_mode() -> None:
    assert postprocess.MaskDecodeMode is defaults.MaskDecodeMode
    assert parameters.MaskDecodeMode is defaults.MaskDecodeMode
    assert manifests.MaskDecodeMode is defaults.MaskDecodeMode
    assert MASK_DECODE_MODES == get_args(defaults.MaskDecodeMode) == ("accurate", "tradeoff", "fast")


def test_the_table_cannot_be_changed_at_run_time() -> None:
    with pytest.raises(TypeError):
        STEP_DEFAULTS["iou_threshold"] = 0.9  # type: ignore[index]
