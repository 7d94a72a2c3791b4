"""Check received messages against the shipped JSON Schemas (``worker/schemas/*.schema.json``).

Tests that receive messages (MQTT collectors, JSONL files, webhook servers) pass each one through
``validate_message`` (kind known) or ``validate_received`` (kind from the MQTT topic), so every payload a
real run produces is checked against the contract consumers validate with.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import jsonschema

from worker.schemas import MESSAGE_KINDS, shipped

__all__ = ["kind_of_topic", "validate_line", "validate_message", "validate_received"]

#: endings of the topics segstream publishes to (the MQTT sink's and control listener's defaults, and
#: the tests' own templates); the control topic itself carries what tests send, bad payloads included
_TOPIC_KINDS = (
    ("/control/result", "control-result"),
    ("/predictions", "result"),
    ("/errors", "error"),
    ("/status", "status"),
)


@cache
def _validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = shipped(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate_message(kind: str, payload: bytes | str | dict[str, Any]) -> dict[str, Any]:
    """Parse ``payload`` (JSON) and check it against the ``kind`` schema; returns the document.

    Raises:
        AssertionError: not JSON, or not valid (every violation listed with its JSON path).
    """
    if kind not in MESSAGE_KINDS:
        raise ValueError(f"unknown message kind {kind!r}; one of {MESSAGE_KINDS}")
    try:
        doc = payload if isinstance(payload, dict) else json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AssertionError(f"{kind} message is not JSON: {exc}: {payload!r:.200}") from None
    errors = sorted(_validator(kind).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        # anyOf/oneOf errors: name the most relevant failure inside them (e.g. a missing rle_mask field)
        deepest = [jsonschema.exceptions.best_match([e]) for e in errors[:10]]
        listed = "\n".join(f"  {e.json_path}: {e.message}" for e in deepest)
        raise AssertionError(f"{kind} message violates its schema:\n{listed}\nmessage: {doc!r:.500}")
    return dict(doc)


def kind_of_topic(topic: str) -> str | None:
    """The kind of message segstream publishes on ``topic``, or None (frames, control requests, ...)."""
    for ending, kind in _TOPIC_KINDS:
        if topic.endswith(ending):
            return kind
    return None


def validate_received(topic: str, payload: bytes) -> None:
    """Validate an MQTT message by its topic; payloads on other topics (camera frames) are skipped."""
    kind = kind_of_topic(topic)
    if kind is not None:
        validate_message(kind, payload)


def validate_line(line: str | bytes) -> dict[str, Any]:
    """A JSON Lines sink's line: ``{"kind": "result" | "error", ...message}``; returns the message."""
    doc = json.loads(line)
    kind = doc.pop("kind", None)
    if kind not in ("result", "error"):
        raise AssertionError(f"line without a result/error kind: {line!r:.200}")
    return validate_message(kind, doc)
