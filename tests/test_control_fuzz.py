"""The control path is total: any bytes get a reply (never an exception), the runtime inputs change
only for a valid message, and the regression corpus of ``tests/support/poison.py`` is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.poison import CONTROL_POISON, Poison
from tests.test_control import Inputs, listener
from worker.control import parse_control_message
from worker.errors import ParameterError

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("poison", CONTROL_POISON, ids=[p.name for p in CONTROL_POISON])
def test_the_poison_corpus_is_refused_and_the_listener_goes_on(poison: Poison) -> None:
    inputs = Inputs()
    control = listener(inputs)
    reply = control.handle(poison.payload)
    assert reply["ok"] is False and poison.reason in reply["error"], reply
    assert inputs.values == {"confidence": 0.4, "max_det": 100}
    assert control.handle(b'{"inputs": {"confidence": 0.5}}')["ok"] is True
    retained = control.handle(poison.payload, retained=True)
    assert retained["ok"] is False and "retained" in retained["error"]


def _check(payload: bytes) -> None:
    inputs = Inputs()
    before = dict(inputs.values)
    try:
        message = parse_control_message(payload)
    except ParameterError:
        message = None
    reply = listener(inputs).handle(payload)
    json.dumps(reply)  # a reply can always be published
    assert set(reply) <= {"ok", "applied", "inputs", "error", "worker"}
    if reply["ok"]:
        assert message is not None and inputs.values == {**before, **reply["applied"]}
    else:
        assert reply["error"] and inputs.values == before


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**300), max_value=10**300),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=30),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
input_names = st.sampled_from(["confidence", "max_det", "image", "unknown", ""])


@FUZZ
@given(
    st.dictionaries(input_names, json_values, max_size=3),
    st.dictionaries(st.text(max_size=8), json_values, max_size=2),
)
@example({"confidence": 0.5}, {})
@example({"max_det": 10**12}, {})
def test_structured_control_messages(inputs: dict[str, Any], extra: dict[str, Any]) -> None:
    _check(json.dumps({"inputs": inputs, **extra}).encode())


@FUZZ
@given(json_values)
def test_any_json_document(doc: Any) -> None:
    _check(json.dumps(doc).encode())


@FUZZ
@given(st.binary(max_size=2048))
@example(b"[" * 5000)
@example(b'{"inputs": {"confidence": ' + b"9" * 5000 + b"}}")
def test_random_bytes(payload: bytes) -> None:
    _check(payload)


@FUZZ
@given(st.integers(min_value=1, max_value=3000))
def test_deep_nesting(depth: int) -> None:
    _check(b'{"inputs": {"confidence": ' + b"[" * depth + b"]" * depth + b"}}")
