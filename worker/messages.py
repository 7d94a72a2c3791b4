"""The messages segstream publishes: one result per frame, one error report per failure.

Result payload (JSON, one per frame)::

    {"pipeline": "line-3", "source": "cam1", "frame_number": 41, "frame_id": "cam1:41",
     "timestamp": 1732790000.123,          # capture time, Unix s
     "processed_at": 1732790000.180,       # when the result was made, Unix s
     "step": "seg",                        # the (first) segmentation step's name
     "inference_id": "…", "model_id": "factory-parts/1",
     "outputs": {"predictions": {...}, "inference_id": "…", "model_id": "…"}}   # the workflow's outputs

Error payload (JSON)::

    {"pipeline": "line-3", "source": "cam1", "frame_id": "cam1:42", "frame_number": 42,
     "reason": "decode_error", "error": "human-readable message", "timestamp": 1732790000.2}

Payloads never contain secrets.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ErrorReport", "FrameResult"]


@dataclass(slots=True)
class FrameResult:
    """The serialized workflow outputs of one frame, with the ids a consumer needs."""

    pipeline: str
    source_id: str
    frame_number: int
    frame_id: str
    timestamp: float
    step: str
    inference_id: str | None
    model_id: str | None
    outputs: dict[str, Any]
    processed_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "source": self.source_id,
            "frame_number": self.frame_number,
            "frame_id": self.frame_id,
            "timestamp": self.timestamp,
            "processed_at": self.processed_at,
            "step": self.step,
            "inference_id": self.inference_id,
            "model_id": self.model_id,
            "outputs": self.outputs,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


@dataclass(slots=True)
class ErrorReport:
    """One frame (or payload) that could not be processed, and why."""

    pipeline: str
    source_id: str
    reason: str
    message: str
    frame_id: str | None = None
    frame_number: int | None = None
    timestamp: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "source": self.source_id,
            "frame_id": self.frame_id,
            "frame_number": self.frame_number,
            "reason": self.reason,
            "error": self.message,
            "timestamp": self.timestamp,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()
