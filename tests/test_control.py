"""The control topic's parser and authority: total on any bytes, bounded, signed senders, retained
messages, allowed inputs, the step's own ranges; validated by the real workflow (no model needed)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tests.integration.helpers import workflow_v4
from worker.config import ControlConfig, PipelineConfig
from worker.control import (
    MAX_CONTROL_BYTES,
    ControlListener,
    parse_control_message,
    parse_control_payload,
    sign_control_message,
)
from worker.errors import ConfigError, ParameterError
from worker.mqtt import BrokerConfig
from worker.step.workflow import WorkflowDefinition, load_workflow, validate_runtime_inputs
from worker.telemetry import RecordingTelemetry

TOPIC = "segstream/line/control"
KEY = "k" * 24


def workflow() -> WorkflowDefinition:
    doc = workflow_v4()
    doc["inputs"].append({"type": "WorkflowParameter", "name": "max_det", "default_value": 100})
    doc["steps"][0]["max_detections"] = "$inputs.max_det"
    return load_workflow(doc)


class Inputs:
    """The runtime inputs of a real workflow, validated the way WorkflowRunner does it."""

    def __init__(self) -> None:
        self.workflow = workflow()
        self.values: dict[str, Any] = dict(self.workflow.parameter_defaults)
        self.refused: list[str] = []

    def apply(self, values: Mapping[str, Any]) -> dict[str, Any]:
        accepted = validate_runtime_inputs(self.workflow, values)
        self.values.update(accepted)
        return accepted


def listener(
    inputs: Inputs, policy: ControlConfig | None = None, now: float = 1_000_000.0
) -> ControlListener:
    return ControlListener(
        BrokerConfig(),
        TOPIC,
        inputs.apply,
        lambda: dict(inputs.values),
        inputs.refused.append,
        RecordingTelemetry(),
        "w-1",
        policy=policy,
        clock=lambda: now,
    )


@pytest.mark.parametrize(
    ("payload", "context"),
    [
        (b'{"inputs": {"confidence": 0.6}}', nullcontext({"confidence": 0.6})),
        (b'{"inputs": {}}', nullcontext({})),
        (b"not json", pytest.raises(ParameterError, match="not JSON")),
        (b"\xff\xfe\x00", pytest.raises(ParameterError, match="not JSON")),
        (b"[" * 1000 + b"]" * 1000, pytest.raises(ParameterError, match="nested")),
        (
            b'{"inputs": {"a": [[[[1]]]]}}',
            pytest.raises(ParameterError, match="nested 6 deep, deeper than 4"),
        ),
        (
            b'{"inputs": {"confidence": ' + b"9" * 400 + b"}}",
            pytest.raises(ParameterError, match="out of range"),
        ),
        (b'{"inputs": {"confidence": NaN}}', pytest.raises(ParameterError, match="NaN is out of range")),
        (b'{"inputs": {"confidence": 1e999}}', pytest.raises(ParameterError, match="out of range")),
        (b'{"inputs": {"x": "' + b"a" * 300 + b'"}}', pytest.raises(ParameterError, match="300 characters")),
        (b'{"inputs": [1]}', pytest.raises(ParameterError, match="must be")),
        (b'{"inputs": {}, "extra": 1}', pytest.raises(ParameterError, match="unknown keys")),
        (b'{"inputs": {}, "sender": 7}', pytest.raises(ParameterError, match="sender")),
        (b'{"inputs": {}, "issued_at": true}', pytest.raises(ParameterError, match="issued_at")),
        (b" " * (MAX_CONTROL_BYTES + 1), pytest.raises(ParameterError, match="limit")),
        (
            json.dumps({"inputs": {f"i{n}": n for n in range(40)}}).encode(),
            pytest.raises(ParameterError, match="40 inputs"),
        ),
    ],
)
def test_parse_control_payload(payload: bytes, context: AbstractContextManager[Any]) -> None:
    with context as expected:
        assert parse_control_payload(payload) == expected


def test_values_are_checked_against_the_step_ranges_and_a_bad_one_changes_nothing() -> None:
    inputs = Inputs()
    control = listener(inputs)
    for bad in (
        b'{"inputs": {"confidence": 1.7}}',
        b'{"inputs": {"max_det": 1000000000000}}',  # max_detections: 1e12 is no longer accepted
        b'{"inputs": {"max_det": 1e12}}',
        b'{"inputs": {"max_det": 0}}',
        b'{"inputs": {"no_such_input": 1}}',
        b'{"inputs": {"confidence": 0.5, "max_det": 20000}}',  # all or nothing
    ):
        reply = control.handle(bad)
        assert reply["ok"] is False and reply["worker"] == "w-1", bad
    assert inputs.values == {"confidence": 0.4, "max_det": 100}
    assert control.refused == 6 and len(inputs.refused) == 6
    assert "out of range" in inputs.refused[1] and "less than or equal to 10000" in inputs.refused[5]
    ok = control.handle(b'{"inputs": {"confidence": 0.5, "max_det": 10000}}')
    assert ok == {
        "ok": True,
        "applied": {"confidence": 0.5, "max_det": 10000},
        "inputs": {"confidence": 0.5, "max_det": 10000},
        "worker": "w-1",
    }


def test_an_unexpected_exception_is_a_refusal_logged_with_its_traceback_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inputs = Inputs()

    def broken(values: Mapping[str, Any]) -> dict[str, Any]:
        raise KeyError("a bug")

    control = ControlListener(
        BrokerConfig(), TOPIC, broken, dict, inputs.refused.append, RecordingTelemetry(), "w-1"
    )
    with caplog.at_level(logging.ERROR, logger="worker.control"):
        first = control.handle(b'{"inputs": {"confidence": 0.5}}')
        second = control.handle(b'{"inputs": {"confidence": 0.6}}')
    assert first["ok"] is False and second["ok"] is False and "internal error (KeyError)" in first["error"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and errors[0].exc_info is not None and errors[1].exc_info is None
    assert len(inputs.refused) == 2


def test_retained_messages_are_refused_unless_accepted() -> None:
    inputs = Inputs()
    reply = listener(inputs).handle(b'{"inputs": {"confidence": 0.99}}', retained=True)
    assert reply["ok"] is False and "retained" in reply["error"]
    assert inputs.values["confidence"] == 0.4
    reply = listener(inputs, ControlConfig(accept_retained=True)).handle(
        b'{"inputs": {"confidence": 0.99}}', retained=True
    )
    assert reply["ok"] is True and inputs.values["confidence"] == 0.99


def test_allowed_inputs() -> None:
    inputs = Inputs()
    control = listener(inputs, ControlConfig(allowed_inputs=["confidence"]))
    assert control.handle(b'{"inputs": {"confidence": 0.5}}')["ok"] is True
    reply = control.handle(b'{"inputs": {"max_det": 5}}')
    assert reply["ok"] is False and "may not be changed" in reply["error"]
    assert inputs.values == {"confidence": 0.5, "max_det": 100}


def signed(
    sender: str, issued_at: float, inputs: dict[str, Any], key: str = KEY
) -> tuple[bytes, dict[str, str]]:
    payload = json.dumps({"inputs": inputs, "sender": sender, "issued_at": issued_at}).encode()
    return payload, {"signature": sign_control_message(key.encode(), TOPIC, payload)}


def test_signed_senders(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CONTROL_KEY_HMI", KEY)
    (tmp_path / "eng").write_text("e" * 20 + "\n")
    policy = ControlConfig.model_validate(
        {"senders": {"hmi": {"secret_env": "CONTROL_KEY_HMI"}, "eng": {"secret_file": str(tmp_path / "eng")}}}
    )
    inputs = Inputs()
    now = 1_000_000.0
    control = listener(inputs, policy, now=now)

    payload, props = signed("hmi", now - 5, {"confidence": 0.6})
    with caplog.at_level(logging.INFO, logger="worker.control"):
        assert control.handle(payload, properties=props)["ok"] is True
    assert any(
        "by hmi" in r.getMessage() and "were {'confidence': 0.4}" in r.getMessage() for r in caplog.records
    )
    assert control.handle(payload, properties=props)["error"].endswith(
        "a replay of a message already applied"
    )

    payload, props = signed("eng", now, {"confidence": 0.7}, key="e" * 20)
    assert control.handle(payload, properties=props)["ok"] is True
    assert inputs.values["confidence"] == 0.7

    def attempt(pair: tuple[bytes, dict[str, str]], topic: str = TOPIC) -> dict[str, Any]:
        return control.handle(pair[0], properties=pair[1], topic=topic)

    refusals = {
        "unsigned": control.handle(b'{"inputs": {"confidence": 0.1}}'),
        "no signature": control.handle(signed("hmi", now, {"confidence": 0.1})[0]),
        "unknown sender": attempt(signed("mallory", now, {"confidence": 0.1})),
        "wrong key": attempt(signed("hmi", now, {"confidence": 0.1}, key="x" * 24)),
        "too old": attempt(signed("hmi", now - 61, {"confidence": 0.1})),
        "from the future": attempt(signed("hmi", now + 61, {"confidence": 0.1})),
        "another topic": attempt(signed("hmi", now, {"confidence": 0.1}), topic="other/control"),
    }
    assert all(reply["ok"] is False for reply in refusals.values()), refusals
    assert "known sender" in refusals["unsigned"]["error"]
    assert "user property" in refusals["no signature"]["error"]
    assert "known sender" in refusals["unknown sender"]["error"]
    assert refusals["wrong key"]["error"] == "control message refused: bad signature for sender 'hmi'"
    assert "issued_at" in refusals["too old"]["error"] and "issued_at" in refusals["from the future"]["error"]
    assert "bad signature" in refusals["another topic"]["error"]
    assert inputs.values["confidence"] == 0.7
    assert control.refused == 8  # the replay and the seven above


def test_control_config_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        ControlConfig.model_validate({"senders": {"a": {}}})
    with pytest.raises(ValidationError, match="sender name"):
        ControlConfig.model_validate({"senders": {"a b": {"secret_env": "X"}}})
    monkeypatch.setenv("SHORT_KEY", "short")
    with pytest.raises(ConfigError, match="shorter than 16"):
        ControlConfig.model_validate({"senders": {"a": {"secret_env": "SHORT_KEY"}}}).sender_secrets()
    monkeypatch.delenv("UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match="missing"):
        ControlConfig.model_validate({"senders": {"a": {"secret_env": "UNSET_KEY"}}}).sender_secrets()
    doc = {
        "name": "p",
        "sources": [{"type": "mqtt", "id": "c", "topic": "f"}],
        "sinks": [{"type": "stdout"}],
        "workflow": workflow_v4(),
        "broker": {"protocol": "3.1.1"},
        "control": {"senders": {"a": {"secret_env": "X"}}},
    }
    with pytest.raises(ValidationError, match="protocol '5'"):
        PipelineConfig.model_validate(doc)


def test_parse_control_message_keeps_sender_and_time() -> None:
    message = parse_control_message(b'{"inputs": {"confidence": 0.5}, "sender": "hmi", "issued_at": 17}')
    assert (message.inputs, message.sender, message.issued_at) == ({"confidence": 0.5}, "hmi", 17.0)
