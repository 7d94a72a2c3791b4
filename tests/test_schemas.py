"""The message and pipeline JSON Schemas: shipped files equal the models, and they accept and reject
what the worker does (the shipped pipeline files, a broken one, every message kind)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from tests.support.messages import validate_message
from worker.config import PipelineConfig, read_document
from worker.control import parse_control_payload
from worker.errors import ParameterError
from worker.messages import (
    ControlAccepted,
    ControlMessage,
    ControlRefused,
    ErrorReport,
    FrameResult,
    StatusMessage,
)
from worker.schemas import KINDS, MESSAGE_KINDS, generate, generated_files, shipped

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", sorted(generated_files(REPO)), ids=lambda p: str(p.relative_to(REPO)))
def test_generated_files_are_up_to_date(path: Path) -> None:
    expected = generated_files(REPO)[path]
    assert path.exists(), f"{path} is missing: run `python -m worker.schemas`"
    assert path.read_text(encoding="utf-8") == expected, (
        f"{path.relative_to(REPO)} differs from what the models give: run `python -m worker.schemas`"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_each_schema_is_a_valid_draft_2020_12_schema(kind: str) -> None:
    schema = shipped(kind)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == generate(kind)


def test_unknown_kinds_are_refused() -> None:
    with pytest.raises(KeyError, match="one of: result, error"):
        generate("results")


# ---- messages ----------------------------------------------------------------------------------


def _rle_result() -> FrameResult:
    prediction = {
        "x": 32.0,
        "y": 16.0,
        "width": 32.0,
        "height": 32.0,
        "confidence": 0.9,
        "class": "bolt",
        "class_id": 0,
        "detection_id": "d1",
        "parent_id": "cam1:3",
        "rle_mask": {"size": [96, 128], "counts": "X1a0"},
    }
    return FrameResult(
        "line-3",
        "cam1",
        3,
        "cam1:3",
        1.7e9,
        "seg",
        "i-1",
        "parts/1",
        {
            "predictions": {"image": {"width": 128, "height": 96}, "predictions": [prediction]},
            "model_id": "parts/1",
            "whole": {
                "inference_id": "i-1",
                "predictions": {"image": {"width": 1, "height": 1}, "predictions": []},
            },
        },
    )


def test_positional_and_keyword_construction_give_the_same_message() -> None:
    positional = ErrorReport("p", "control", "bad_control", "no", "f1", 4, 5.0)
    keyword = ErrorReport(
        pipeline="p",
        source_id="control",
        reason="bad_control",
        message="no",
        frame_id="f1",
        frame_number=4,
        timestamp=5.0,
    )
    assert positional == keyword
    assert positional.to_dict() == {
        "pipeline": "p",
        "source": "control",
        "frame_id": "f1",
        "frame_number": 4,
        "reason": "bad_control",
        "error": "no",
        "timestamp": 5.0,
    }
    with pytest.raises(TypeError, match="multiple values for argument 'pipeline'"):
        ErrorReport("p", pipeline="q", source_id="s", reason="r", message="m")
    with pytest.raises(TypeError, match="at most 7 positional"):
        ErrorReport("p", "s", "r", "m", None, None, 1.0, "extra")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("result", _rle_result()),
        ("error", ErrorReport("p", "cam1", "decode_error", "bad JPEG")),
        ("status", StatusMessage(status="online", worker="w1", pipeline="p", timestamp=1.0)),
        ("status", StatusMessage(status="offline", worker="w1", pipeline="p", reason="connection_lost")),
        ("control", ControlMessage(inputs={"confidence": 0.6})),
        (
            "control-result",
            ControlAccepted(applied={"confidence": 0.6}, inputs={"confidence": 0.6}, worker="w"),
        ),
        ("control-result", ControlRefused(error="unknown workflow input 'x'", worker="w")),
    ],
)
def test_every_message_validates_and_round_trips(kind: str, message: Any) -> None:
    payload = message.to_json()
    validate_message(kind, payload)
    assert type(message).model_validate_json(payload) == message
    assert json.loads(payload) == message.to_dict()  # the two encodings agree


@pytest.mark.parametrize(
    ("kind", "doc", "why"),
    [
        ("result", {"source": "cam1"}, "required"),
        ("error", {**ErrorReport("p", "s", "decode_error", "m").to_dict(), "extra": 1}, "Additional"),
        ("error", {**ErrorReport("p", "s", "decode_error", "m").to_dict(), "reason": "Bad Reason"}, "match"),
        ("status", {"status": "away", "worker": "w", "pipeline": "p"}, "is not one of"),
        ("control", {"inputs": []}, "is not of type 'object'"),
        ("control-result", {"ok": True, "error": "x", "worker": "w"}, "was expected|required"),
    ],
)
def test_schemas_reject_malformed_messages(kind: str, doc: dict[str, Any], why: str) -> None:
    with pytest.raises(AssertionError, match=why):
        validate_message(kind, json.dumps(doc).encode())


def test_the_result_schema_checks_the_predictions_inside_outputs() -> None:
    doc = _rle_result().to_dict()
    broken = copy.deepcopy(doc)
    del broken["outputs"]["predictions"]["predictions"][0]["rle_mask"]["counts"]
    with pytest.raises(AssertionError, match="counts"):
        validate_message("result", json.dumps(broken).encode())
    polygon = copy.deepcopy(doc)
    prediction = polygon["outputs"]["predictions"]["predictions"][0]
    del prediction["rle_mask"]
    prediction["points"] = [{"x": 1.0, "y": 1.0}, {"x": 2.0, "y": 1.0}, {"x": 2.0, "y": 2.0}]
    validate_message("result", json.dumps(polygon).encode())


@pytest.mark.parametrize(
    "payload",
    [
        b'{"inputs": {"confidence": 0.6}}',
        b'{"inputs": {}}',
        b'{"inputs": {"c": 1}, "extra": 2}',
        b'{"inputs": [1]}',
        b"[]",
        b'{"other": {}}',
    ],
)
def test_the_control_schema_accepts_what_the_control_listener_accepts(payload: bytes) -> None:
    try:
        parse_control_payload(payload)
        listener_accepts = True
    except ParameterError:
        listener_accepts = False
    try:
        ControlMessage.model_validate_json(payload)
        model_accepts = True
    except ValidationError:
        model_accepts = False
    schema_accepts = jsonschema.Draft202012Validator(shipped("control")).is_valid(json.loads(payload))
    assert listener_accepts == model_accepts == schema_accepts


# ---- the pipeline file ---------------------------------------------------------------------------


def _flattened(errors: Any) -> list[str]:
    """Every error with the errors inside it (the branches of a oneOf/anyOf), as ``path: message``."""
    flat: list[str] = []
    for error in errors:
        flat.append(f"{error.json_path}: {error.message}")
        flat.extend(_flattened(error.context or ()))
    return flat


def _pipeline_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(shipped("pipeline"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_the_shipped_pipelines_validate_as_written_and_as_loaded(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())  # what an editor sees: ${VAR} references unexpanded
    errors = [e.message for e in _pipeline_validator().iter_errors(raw)]
    assert not errors, errors
    loaded = read_document(path)  # what the worker validates
    assert not [e.message for e in _pipeline_validator().iter_errors(loaded)]
    PipelineConfig.model_validate(loaded)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d["sinks"][0].update(pathh="x.jsonl"), "Additional properties"),
        (lambda d: d["batching"].update(max_batch_size=0), "less than the minimum"),
        (lambda d: d["batching"].update(max_batch_size="four"), "is not valid"),
        (lambda d: d.pop("sources"), "'sources' is a required property"),
        (lambda d: d["sources"][0].update(type="webcam"), "is not valid"),
        (lambda d: d["sources"][0].update(policy="newest"), "is not valid"),
        (lambda d: d.update(name="has space"), "is not valid"),
    ],
)
def test_the_pipeline_schema_rejects_a_broken_file(change: Any, why: str) -> None:
    doc = read_document(REPO / "pipelines" / "demo.yaml")
    change(doc)
    errors = _flattened(_pipeline_validator().iter_errors(doc))
    assert errors and any(why in error for error in errors), errors
    with pytest.raises(ValidationError):  # the loader refuses it too
        PipelineConfig.model_validate(doc)


def test_environment_references_are_allowed_where_values_are_typed() -> None:
    doc = read_document(REPO / "pipelines" / "demo.yaml")
    doc["batching"]["max_batch_size"] = "${BATCH:-4}"
    doc["http"]["preview"] = "${PREVIEW}"
    assert _pipeline_validator().is_valid(doc)
    doc["batching"]["max_batch_size"] = "four"
    assert not _pipeline_validator().is_valid(doc)


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
def test_message_schemas_forbid_unknown_fields(kind: str) -> None:
    schema = shipped(kind)
    bodies = [schema] if "properties" in schema else list(schema["$defs"].values())
    assert all(body.get("additionalProperties") is False for body in bodies if "properties" in body)
