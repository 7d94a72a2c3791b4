"""The unit that flows from sources to sinks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Frame"]


@dataclass(slots=True)
class Frame:
    """One decoded frame from a source.

    Attributes:
        source_id: id of the source in the pipeline file.
        frame_number: 0-based counter per source (for MQTT: order of arrival).
        timestamp: capture time, Unix seconds (the camera/publisher's clock when known,
            else the time the frame was read).
        image: ``(H, W, 3)`` uint8 BGR image.
        frame_id: stable id of the frame, used as ``parent_id`` of predictions
            (MQTT ``frame_id`` when given, else ``"<source_id>:<frame_number>"``).
        parameters: per-frame bindings of the workflow's ``$inputs.*`` (MQTT JSON payloads).
        received_monotonic: ``time.monotonic()`` when the worker got the frame.
        topic: the MQTT topic the frame came from (MQTT sources), carried into its result or report.
        idempotency_key: the same for every delivery of this frame (MQTT: ``<source>/<frame_id>`` or
            ``<source>/<payload digest>``); default ``<source_id>/<frame_id>``.
        ack: called once the frame's outcome (its result, or its error report) was delivered by every
            sink that confirms delivery; an MQTT source acknowledges the frame to the broker then.
    """

    source_id: str
    frame_number: int
    timestamp: float
    image: np.ndarray
    frame_id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    received_monotonic: float = field(default_factory=time.monotonic)
    topic: str | None = None
    idempotency_key: str | None = None
    ack: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.frame_id:
            self.frame_id = f"{self.source_id}:{self.frame_number}"
        if self.idempotency_key is None:
            self.idempotency_key = f"{self.source_id}/{self.frame_id}"
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(
                f"Frame.image must be (H, W, 3) uint8 BGR, got {self.image.shape} {self.image.dtype}"
            )
