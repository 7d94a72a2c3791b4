"""The pipeline-file and workflow loaders are total: whatever the file holds, ``load_pipeline`` /
``load_workflow`` return or raise ``ConfigError`` (deep nesting, huge numbers, random bytes, structured
YAML/JSON of any shape)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.integration.helpers import workflow_v4
from worker.config import PipelineConfig, load_pipeline
from worker.errors import ConfigError
from worker.step.workflow import WorkflowDefinition, load_workflow

FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

VALID: dict[str, Any] = {
    "name": "line",
    "sources": [{"type": "mqtt", "id": "cam", "topic": "f/+"}],
    "sinks": [{"type": "stdout"}],
    "workflow": workflow_v4(),
}


def _load(data: bytes, suffix: str) -> PipelineConfig | ConfigError:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"pipeline{suffix}"
        path.write_bytes(data)
        try:
            return load_pipeline(path)
        except ConfigError as exc:
            assert str(exc)
            return exc


@pytest.mark.parametrize(
    ("name", "text", "suffix"),
    [
        ("deep-yaml-list", "[" * 5000 + "]" * 5000, ".yaml"),
        ("deep-yaml-map", "a: " + "{b: " * 3000 + "1" + "}" * 3000, ".yaml"),
        ("deep-json", "[" * 5000 + "]" * 5000, ".json"),
        ("deep-workflow", "name: p\nworkflow: " + "[" * 3000 + "]" * 3000, ".yaml"),
        ("int-5000-digits", "name: x\nshutdown_grace_s: " + "9" * 5000, ".yaml"),
        ("json-int-5000-digits", '{"name": "x", "shutdown_grace_s": ' + "9" * 5000 + "}", ".json"),
        ("not-utf8", "\udcff\udcfe", ".yaml"),
        ("nul", "\x00", ".yaml"),
        ("inline-password", yaml.safe_dump({**VALID, "broker": {"password": "s3cret"}}), ".yaml"),
    ],
)
def test_hostile_pipeline_files_are_config_errors(name: str, text: str, suffix: str) -> None:
    outcome = _load(text.encode("utf-8", "surrogateescape"), suffix)
    assert isinstance(outcome, ConfigError), name
    if name == "inline-password":
        assert "must not be written in the pipeline file" in str(outcome)
        assert "s3cret" not in str(outcome)


def test_the_valid_document_loads() -> None:
    assert isinstance(_load(yaml.safe_dump(VALID).encode(), ".yaml"), PipelineConfig)


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**400), max_value=10**400),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=25,
)
sections = st.sampled_from(sorted(PipelineConfig.model_fields))


@FUZZ
@given(st.dictionaries(sections, json_values, max_size=4), st.sampled_from([".yaml", ".json"]))
@example({"sources": [{"type": "mqtt", "id": "c", "topic": 7}]}, ".yaml")
def test_a_valid_file_with_sections_replaced_by_anything(changes: dict[str, Any], suffix: str) -> None:
    doc = {**VALID, **changes}
    _load(json.dumps(doc).encode(), suffix)  # JSON is YAML too


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from([".yaml", ".json", ".yml"]))
def test_random_bytes(data: bytes, suffix: str) -> None:
    _load(data, suffix)


@FUZZ
@given(st.text(alphabet="{}[]:,-'\"&*!| \n\tab01.#%@", max_size=300))
@example("a: &x [*x]")
@example("- !!python/object:os.system [ls]")
def test_yaml_syntax_soup(text: str) -> None:
    _load(text.encode(), ".yaml")


def _load_workflow(source: Any) -> WorkflowDefinition | ConfigError:
    try:
        return load_workflow(source)
    except ConfigError as exc:
        assert str(exc)
        return exc


def _deep_dict(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    node = doc
    for _ in range(depth):
        node["a"] = {}
        node = node["a"]
    return doc


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("deep-mapping", {**workflow_v4(), "steps": [_deep_dict(3000)]}),
        ("deep-json-string", "{" + '"a": {' * 3000 + "}" * 3001),
        ("deep-list", {**workflow_v4(), "inputs": [[[[[[]]]]], _deep_dict(2000)]}),
        ("huge-int", {**workflow_v4(), "version": 10**5000}),
    ],
)
def test_hostile_workflows_are_config_errors(name: str, source: Any) -> None:
    assert isinstance(_load_workflow(source), ConfigError), name


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, '{"version": ' + "9" * 5000 + "}"])
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_hostile_workflow_files_are_config_errors(text: str, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"workflow{suffix}"
        path.write_text(text)
        assert isinstance(_load_workflow(path), ConfigError)


workflow_sections = st.sampled_from(["version", "inputs", "steps", "outputs", "extra"])


@FUZZ
@given(st.dictionaries(workflow_sections, json_values, max_size=3))
def test_a_valid_workflow_with_sections_replaced_by_anything(changes: dict[str, Any]) -> None:
    _load_workflow({**workflow_v4(), **changes})


@FUZZ
@given(st.lists(json_values, max_size=3), json_values)
def test_a_step_with_fields_replaced_by_anything(fields: list[Any], value: Any) -> None:
    doc = workflow_v4()
    step = dict(doc["steps"][0])
    names = ["confidence_mode", "custom_confidence", "class_filter", "max_detections"]
    for name, item in zip(names, fields, strict=False):
        step[name] = item
    step["iou_threshold"] = value
    _load_workflow({**doc, "steps": [step]})
