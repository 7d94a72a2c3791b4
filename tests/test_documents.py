"""The one document loader (size, ${VAR}, duplicate keys, top level) and the one error format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.integration.helpers import workflow_v4
from worker.config import PipelineConfig, load_pipeline
from worker.documents import (
    BUILTIN_VARIABLES,
    MAX_DOCUMENT_BYTES,
    MAX_PROBLEMS_LISTED,
    describe,
    expand_env,
    parse_document,
    problems,
    read_document,
)
from worker.errors import ConfigError
from worker.mqtt import BrokerConfig
from worker.step.workflow import WorkflowDefinition, load_workflow

PIPELINE_YAML = """\
name: line-3
sources:
  - type: video
    id: cam
    url: clip.mp4
batching:
  max_batch_size: 2
  max_wait_ms: 5
  max_batch_size: 8
sinks:
  - type: stdout
"""


def _pipeline_doc(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "line-3",
        "sources": [{"type": "video", "id": "cam", "url": "clip.mp4"}],
        "sinks": [{"type": "stdout"}],
        "workflow": workflow_v4(),
        **overrides,
    }


def _write(tmp_path: Path, name: str, doc: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc) if name.endswith(".json") else yaml.safe_dump(doc))
    return path


# ---- duplicate keys


def test_a_duplicate_yaml_key_is_refused_with_the_key_and_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE_YAML)
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert "duplicate key 'max_batch_size' at line 9 (first at line 7)" in message


def test_a_duplicate_json_key_is_refused_with_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.json"
    path.write_text('{\n  "name": "a",\n  "sources": [],\n  "name": "b"\n}\n')
    with pytest.raises(ConfigError, match=r"duplicate key 'name' at line 4 \(first at line 2\)"):
        read_document(path)


def test_a_duplicate_key_in_a_nested_mapping_and_in_a_workflow_file(tmp_path: Path) -> None:
    text = "a:\n  - b: 1\n    c: 2\n    b: 3\n"
    with pytest.raises(ConfigError, match=r"duplicate key 'b' at line 4 \(first at line 2\)"):
        parse_document(text, syntax="yaml", origin="x.yaml")
    workflow = tmp_path / "workflow.yaml"
    workflow.write_text(yaml.safe_dump(workflow_v4()) + "version: '2.0'\n")
    with pytest.raises(ConfigError, match="duplicate key 'version'"):
        load_workflow(workflow)


def test_yaml_merge_keys_still_merge() -> None:
    text = "base: &b {x: 1, y: 2}\nitem:\n  <<: *b\n  y: 3\n"
    assert parse_document(text, syntax="yaml", origin="m")["item"] == {"x": 1, "y": 3}


def test_same_key_in_two_mappings_is_fine() -> None:
    doc = parse_document('{"a": {"k": 1}, "b": {"k": 2}}', syntax="json", origin="j")
    assert doc == {"a": {"k": 1}, "b": {"k": 2}}


# ---- environment, size, syntax, top level


def test_variables_are_expanded_with_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINE_NAME", "line-7")
    monkeypatch.delenv("QUEUE", raising=False)
    path = tmp_path / "p.yaml"
    path.write_text("name: ${LINE_NAME}\nqueue: ${QUEUE:-8}\nassets: ${SEGSTREAM_ASSETS}\n")
    assert read_document(path) == {
        "name": "line-7",
        "queue": 8,  # expanded before parsing: a number
        "assets": BUILTIN_VARIABLES["SEGSTREAM_ASSETS"],
    }


def test_a_missing_variable_is_named(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: ${SURELY_NOT_SET_1234}\n")
    with pytest.raises(ConfigError, match="SURELY_NOT_SET_1234 is not set") as caught:
        read_document(path)
    assert str(path) in str(caught.value)
    assert expand_env("a ${X:-} b", {}) == "a  b"


def test_workflow_files_expand_variables_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL", "other/3")
    doc = workflow_v4()
    doc["steps"][0]["model_id"] = "${MODEL}"
    workflow = load_workflow(_write(tmp_path, "w.json", doc))
    assert workflow.steps[0].model_id == "other/3"


def test_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("a: " + "x" * MAX_DOCUMENT_BYTES + "\n")
    with pytest.raises(ConfigError, match="the limit is"):
        read_document(path)
    path.write_text("a: 1\n")
    with pytest.raises(ConfigError, match="the limit is 4"):
        read_document(path, max_bytes=4)


@pytest.mark.parametrize(
    ("content", "name", "fragment"),
    [
        (b"- a\n- b\n", "p.yaml", "must be a mapping at the top level, got list"),
        (b"", "p.yaml", "got NoneType"),
        (b"a: [1,\n", "p.yaml", "invalid YAML"),
        (b'{"a": }', "p.json", "invalid JSON"),
        (b"a: \xff\xfe\n", "p.yaml", "not UTF-8"),
        (b"a: !!python/object:os.system ls\n", "p.yaml", "invalid YAML"),  # no arbitrary objects
    ],
)
def test_bad_documents(tmp_path: Path, content: bytes, name: str, fragment: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=fragment) as caught:
        read_document(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("syntax", ["yaml", "json"])
def test_deep_nesting_is_an_error_not_a_crash(syntax: str) -> None:
    deep = "[" * 100_000 + "]" * 100_000  # well-formed, 200 KB: under the size limit
    text = f"a: {deep}" if syntax == "yaml" else f'{{"a": {deep}}}'
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_document(text, syntax=syntax, origin="deep")  # type: ignore[arg-type]


def test_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*absent\.yaml"):
        read_document(tmp_path / "absent.yaml")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=200), syntax=st.sampled_from(["yaml", "json"]))
def test_any_text_gives_a_mapping_or_a_config_error(text: str, syntax: str) -> None:
    try:
        doc = parse_document(text, syntax=syntax, origin="fuzz", expand=False)  # type: ignore[arg-type]
    except ConfigError:
        return
    assert isinstance(doc, dict)


# ---- one pass, one error format


def test_the_workflow_is_typed_inside_the_pipeline(tmp_path: Path) -> None:
    config = load_pipeline(_write(tmp_path, "p.yaml", _pipeline_doc()))
    assert isinstance(config.workflow, WorkflowDefinition)
    assert config.workflow.step("seg").bindings == {"custom_confidence": "confidence"}
    assert load_workflow(config.workflow) is config.workflow


def test_a_bad_workflow_fails_the_pipeline_in_one_pass_naming_step_and_field(tmp_path: Path) -> None:
    workflow = workflow_v4()
    workflow["steps"][0]["iou_threshold"] = 1.5
    doc = _pipeline_doc(workflow=workflow, batching={"max_batch_size": 0})
    path = _write(tmp_path, "p.json", doc)
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    error = caught.value
    message = str(error)
    assert message.startswith(f"invalid pipeline file {path}: ")
    # both problems, of two sections, in one message and one format
    assert "field 'batching.max_batch_size': Input should be greater than or equal to 1 (got 0)" in message
    assert "step 'seg' field 'iou_threshold': Input should be less than or equal to 1 (got 1.5)" in message
    assert (error.step, error.field) == (None, "batching.max_batch_size")


def test_a_workflow_reference_error_inside_a_pipeline(tmp_path: Path) -> None:
    workflow = workflow_v4()
    workflow["steps"][0]["custom_confidence"] = "$inputs.nope"
    with pytest.raises(ConfigError) as caught:
        load_pipeline(_write(tmp_path, "p.yaml", _pipeline_doc(workflow=workflow)))
    assert (caught.value.step, caught.value.field) == ("seg", "custom_confidence")
    assert "$inputs.nope is no input" in str(caught.value)


def test_locations_drop_union_tags_and_name_missing_fields() -> None:
    doc = _pipeline_doc(sources=[{"type": "video", "id": "cam"}])
    with pytest.raises(ValidationError) as caught:
        PipelineConfig.model_validate(doc)
    (problem,) = problems(caught.value, doc)
    assert (problem.step, problem.field, problem.message) == (None, "sources[0].url", "Field required")
    assert describe(caught.value, doc) == "field 'sources[0].url': Field required"


def test_secrets_are_never_shown() -> None:
    doc = {"password": ["hunter2-secret-value"]}
    with pytest.raises(ValidationError) as caught:
        BrokerConfig.model_validate(doc)
    text = describe(caught.value, doc)
    assert "password" in text and "hunter2" not in text


def test_describe_limits_and_counts() -> None:
    doc = {"port": 0, "keepalive": 1, "connect_timeout": 0}
    with pytest.raises(ValidationError) as caught:
        BrokerConfig.model_validate(doc)
    text = describe(caught.value, doc, limit=2)
    assert text.count("field '") == 2 and text.endswith("; and 1 more")


def test_the_pipeline_schema_types_the_workflow_as_the_loader_does() -> None:
    import jsonschema

    from worker.schemas import generate

    validator = jsonschema.Draft202012Validator(generate("pipeline"))
    good = _pipeline_doc()
    step = good["workflow"]["steps"][0]
    step["image"] = step.pop("images")  # the alias
    step["iou_threshold"] = "$inputs.iou"  # a selector where a number goes
    good["workflow"]["inputs"].append({"type": "WorkflowParameter", "name": "iou", "default_value": 0.5})
    PipelineConfig.model_validate(good)
    assert not list(validator.iter_errors(good))
    bad = _pipeline_doc()
    bad["workflow"]["steps"][0]["iou_threshold"] = 1.5
    assert list(validator.iter_errors(bad))
    with pytest.raises(ValidationError):
        PipelineConfig.model_validate(bad)


def test_a_file_with_many_problems_lists_the_first_ones_and_counts_the_rest(tmp_path: Path) -> None:
    doc = _pipeline_doc(sources=[{"type": "video", "id": f"cam{n}"} for n in range(50)])  # 50 missing urls
    with pytest.raises(ConfigError) as caught:
        load_pipeline(_write(tmp_path, "p.yaml", doc))
    message = str(caught.value)
    assert message.count("Field required") == MAX_PROBLEMS_LISTED and message.endswith("; and 30 more")
    assert caught.value.field == "sources[0].url"
