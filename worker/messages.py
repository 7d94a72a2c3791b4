"""The messages segstream publishes and accepts, as pydantic models: the contract with consumers.

Each model is the one definition of a payload: the sinks serialize it with ``to_json()`` /
``to_dict()``, consumers may parse it with ``model_validate_json``, and the JSON Schemas in
``worker/schemas/`` are generated from these models (``python -m worker.schemas`` rewrites them; a test
checks that the shipped files match). ``docs/messages.md`` shows one example of each and a consumer.

=============================  ==========================================  ===========================
message                        topic (MQTT sink defaults) / where          model
=============================  ==========================================  ===========================
result (one per frame)         ``segstream/{pipeline}/{source}/predictions``  ``FrameResult``
error (one per failure)        ``segstream/{pipeline}/errors``             ``ErrorReport``
status (retained, Last Will)   ``segstream/{pipeline}/status/{worker}``    ``StatusMessage``
control (to the worker)        ``segstream/{pipeline}/control``            ``ControlMessage``
control reply                  ``<control topic>/result``                  ``ControlReply``
=============================  ==========================================  ===========================

Result payload (JSON)::

    {"pipeline": "line-3", "source": "cam1", "frame_number": 41, "frame_id": "cam1:41",
     "timestamp": 1732790000.123,          # capture time, Unix s
     "processed_at": 1732790000.180,       # when the result was made, Unix s
     "step": "seg",                        # the (first) segmentation step's name
     "inference_id": "…", "model_id": "factory-parts/1",
     "outputs": {"predictions": {...}, "model_id": "…"},   # the workflow's outputs by name
     "topic": "factory/line-3/frames/st1",  # MQTT sources only: the frame's topic
     "idempotency_key": "st1/f-0041"}       # the same for a redelivered frame: drop duplicates on it

Error payload (JSON)::

    {"pipeline": "line-3", "source": "cam1", "frame_id": "cam1:42", "frame_number": 42,
     "reason": "decode_error", "error": "human-readable message", "timestamp": 1732790000.2,
     "topic": "factory/line-3/frames/st1", "idempotency_key": "st1/…"}   # MQTT sources only

Python names differ from JSON names in two places: ``source_id`` is ``"source"`` and
``ErrorReport.message`` is ``"error"``. ``FrameResult`` and ``ErrorReport`` may be built positionally in
their historical field order (``ErrorReport(pipeline, source_id, reason, message)``) or by keyword.
Payloads never contain secrets.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, TypeAdapter
from pydantic.json_schema import JsonSchemaValue, SkipJsonSchema
from pydantic_core import CoreSchema

__all__ = [
    "ControlAccepted",
    "ControlMessage",
    "ControlRefused",
    "ControlReply",
    "ErrorReport",
    "FrameResult",
    "ImageSize",
    "Message",
    "PolygonPrediction",
    "Predictions",
    "RleMask",
    "RlePrediction",
    "StatusMessage",
    "StepResult",
]


def _is_none(value: Any) -> bool:
    return value is None


class Message(BaseModel):
    """Base of every message: strict (``extra="forbid"``), immutable, JSON names as aliases.

    Subclasses may list ``_positional`` field names, accepted as positional arguments in that order.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    _positional: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **data: Any) -> None:
        if args:
            names = self._positional
            if len(args) > len(names):
                raise TypeError(
                    f"{type(self).__name__}() takes at most {len(names)} positional arguments "
                    f"({len(args)} given)"
                )
            for name, value in zip(names, args, strict=False):
                if name in data:
                    raise TypeError(f"{type(self).__name__}() got multiple values for argument {name!r}")
                data[name] = value
        super().__init__(**data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (JSON names) as Python values; nested values are shared, not copied."""
        doc: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if info.exclude_if is not None and info.exclude_if(value):
                continue
            doc[info.alias or name] = value
        return doc

    def to_json(self) -> bytes:
        """The compact JSON payload (UTF-8; pydantic's serializer, ~4x faster than ``json.dumps``)."""
        return self.__pydantic_serializer__.to_json(self, by_alias=True)


# ---- the step's predictions (documentation of ``outputs``; not validated per frame) --------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ImageSize(_Strict):
    """The frame's size in pixels."""

    width: int = Field(ge=1)
    height: int = Field(ge=1)


class RleMask(_Strict):
    """A COCO run-length encoded mask of the whole frame, exactly as ``pycocotools.mask.encode`` gives.

    Decode: ``pycocotools.mask.decode({"size": m["size"], "counts": m["counts"].encode()})`` is an
    ``(height, width)`` uint8 array (1 inside the instance).
    """

    size: tuple[int, int] = Field(description="[height, width] of the frame")
    counts: str = Field(description="COCO compressed RLE counts (the LEB128-like string form)")


class _Box(_Strict):
    x: float = Field(description="box centre, frame pixels (0.1 px)")
    y: float = Field(description="box centre, frame pixels (0.1 px)")
    width: float = Field(ge=0)
    height: float = Field(ge=0)
    confidence: float = Field(ge=0, le=1)
    class_name: str = Field(alias="class")
    class_id: int = Field(ge=0)
    detection_id: str = Field(description="unique per detection (uuid4)")
    parent_id: str = Field(description="the frame's frame_id")


class Point(_Strict):
    x: float
    y: float


class PolygonPrediction(_Box):
    """One instance with its outline (steps v1-v3): the largest outer contour, frame pixels."""

    points: list[Point] = Field(min_length=3)


class RlePrediction(_Box):
    """One instance with its mask as COCO RLE (step v4)."""

    rle_mask: RleMask


class Predictions(_Strict):
    """The step's ``predictions`` output for one frame."""

    image: ImageSize
    predictions: list[RlePrediction | PolygonPrediction]


class StepResult(_Strict):
    """A whole step's outputs (a workflow output with selector ``$steps.<name>.*``)."""

    inference_id: str
    predictions: Predictions
    model_id: str | SkipJsonSchema[None] = Field(None, exclude_if=_is_none, description="steps v2-v4")


#: what one workflow output can hold: a step's predictions, its ids, or the whole step result
OutputValue: TypeAlias = Predictions | StepResult | str | None


class _SchemaAs:
    """JSON Schema of another type for a field validated as something simpler.

    ``outputs`` is checked as a plain ``dict`` per frame (the step already made it; deep validation
    would only cost time), and described in full in the JSON Schema.
    """

    def __init__(self, described: Any) -> None:
        self._adapter: TypeAdapter[Any] = TypeAdapter(described)

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(self._adapter.core_schema)


# ---- the messages ----------------------------------------------------------------------------------


class FrameResult(Message):
    """The serialized workflow outputs of one frame, with the ids a consumer needs."""

    _positional = (
        "pipeline",
        "source_id",
        "frame_number",
        "frame_id",
        "timestamp",
        "step",
        "inference_id",
        "model_id",
        "outputs",
        "processed_at",
    )

    pipeline: str = Field(description="the pipeline's name")
    source_id: str = Field(alias="source", description="the source id from the pipeline file")
    frame_number: int = Field(ge=0, description="frames read by this source so far, from 0")
    frame_id: str = Field(description="the sender's frame id, else <source>:<frame_number>")
    timestamp: float = Field(description="capture time, Unix seconds")
    processed_at: float = Field(default_factory=time.time, description="when the result was made, Unix s")
    step: str = Field(description="the name of the workflow's (first) segmentation step")
    inference_id: str | None = Field(description="the first step's inference id (unique per frame)")
    model_id: str | None = Field(description="the model the first step ran (project/version)")
    outputs: Annotated[dict[str, Any], _SchemaAs(dict[str, OutputValue])] = Field(
        description="the workflow's outputs by name: predictions, ids, or a whole step's result"
    )
    topic: str | SkipJsonSchema[None] = Field(
        None, exclude_if=_is_none, description="the MQTT topic the frame came from (MQTT sources only)"
    )
    idempotency_key: str | SkipJsonSchema[None] = Field(
        None,
        exclude_if=_is_none,
        description="the same for every delivery of one frame (<source>/<frame_id>, or <source>/<payload "
        "digest> for an MQTT payload without a frame_id): drop a result whose key was seen (at-least-once)",
    )


class ErrorReport(Message):
    """One frame (or payload, or control message) that could not be processed, and why."""

    _positional = ("pipeline", "source_id", "reason", "message", "frame_id", "frame_number", "timestamp")

    pipeline: str
    source_id: str = Field(
        alias="source", description='the source id, or "control" for a refused control message'
    )
    frame_id: str | None = Field(None, description="null when the payload had no frame")
    frame_number: int | None = Field(None, ge=0)
    reason: str = Field(
        pattern=r"^[a-z][a-z0-9_]*$",
        description="machine-readable cause, the reason label of segstream_frames_dropped_total "
        "(decode_error, oversize, bad_parameter, inference_error, bad_control, ...)",
    )
    message: str = Field(alias="error", description="human-readable message (no secrets)")
    timestamp: float = Field(default_factory=time.time, description="when it was reported, Unix s")
    topic: str | SkipJsonSchema[None] = Field(
        None, exclude_if=_is_none, description="the MQTT topic of the payload (MQTT sources only)"
    )
    idempotency_key: str | SkipJsonSchema[None] = Field(
        None, exclude_if=_is_none, description="as in the result: the same for every delivery of one frame"
    )


class StatusMessage(Message):
    """A worker's state, retained on the status topic: ``online`` on every connect, ``offline`` at a
    clean shutdown (reason ``shutdown``) or as the Last Will (reason ``connection_lost``)."""

    status: Literal["online", "offline"]
    worker: str = Field(description="the worker's id")
    pipeline: str
    reason: Literal["shutdown", "connection_lost"] | SkipJsonSchema[None] = Field(
        None, exclude_if=_is_none, description="offline only"
    )
    timestamp: float | SkipJsonSchema[None] = Field(
        None,
        exclude_if=_is_none,
        description="Unix s; absent in the Last Will (which is set when the connection is made)",
    )


class ControlMessage(Message):
    """Sent to the control topic: new values of the workflow's runtime inputs (``$inputs.*``).

    All or nothing, validated like a definition; at most 64 KiB. Each worker of the pipeline applies it.
    With ``control.senders`` configured it must be signed: ``sender`` and ``issued_at`` in the message,
    and the MQTT v5 user property ``signature`` (see ``worker.control``).
    """

    inputs: dict[str, Any] = Field(description='{input name: value}, e.g. {"confidence": 0.6}')
    sender: str | SkipJsonSchema[None] = Field(
        None,
        exclude_if=_is_none,
        min_length=1,
        max_length=64,
        description="the signing sender (a name in control.senders); signed messages only",
    )
    issued_at: float | SkipJsonSchema[None] = Field(
        None,
        exclude_if=_is_none,
        description="when the message was made, Unix s (within control.max_age_s); signed messages only",
    )
    station: str | SkipJsonSchema[None] = Field(
        None,
        exclude_if=_is_none,
        min_length=1,
        max_length=64,
        description="only for the frames of this station (an MQTT source's source_id from the topic); "
        "they use these inputs over the pipeline-wide ones",
    )


class ControlAccepted(Message):
    """Reply on ``<control topic>/result``: the update was applied."""

    _positional = ("ok", "applied", "inputs", "worker")

    ok: Literal[True] = True
    applied: dict[str, Any] = Field(description="the accepted values, as the steps use them")
    inputs: dict[str, Any] = Field(description="every runtime input's current value")
    worker: str = Field(description="the id of the worker that applied it")
    station: str | SkipJsonSchema[None] = Field(
        None, exclude_if=_is_none, description="the station the values were set for (station messages only)"
    )


class ControlRefused(Message):
    """Reply on ``<control topic>/result``: the update was refused; nothing changed."""

    ok: Literal[False] = False
    error: str = Field(description="why (names the step, field and input)")
    worker: str


ControlReply: TypeAlias = ControlAccepted | ControlRefused
