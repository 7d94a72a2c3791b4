"""Frame payloads: parse MQTT payloads, check sizes before decoding, decode JPEG/PNG to BGR.

Every function here is *total* on hostile input: whatever the bytes, it returns or raises
``FrameDecodeError`` (reason ``"decode_error"`` or ``"oversize"``), never anything else. The
regression corpus and property tests in ``tests/sources/test_decode_fuzz.py`` hold it to that.

Limits are checked before any pixel is decoded: the payload's byte size first, then the image's
width x height read from its header (JPEG: the SOF segment; PNG: the IHDR chunk), which costs a few
bytes of parsing instead of a full decode, so a small "decompression bomb" (a tiny PNG that claims
50000 x 50000 pixels) is refused without allocating its pixels. Two bounds apply: ``max_pixels``
(width x height) and ``max_decoded_bytes``, what decoding will allocate, estimated from the header:
3 bytes per pixel for the BGR result, plus 6 per pixel for a progressive JPEG, whose decoder keeps
every DCT coefficient of the image until the last scan. A 2.7 KB PNG of 4000 x 4000 pixels is 48 MB
decoded; ``max_decoded_bytes`` is the knob for that. Only JPEG and PNG are accepted (the formats whose
header we check). A JPEG without its end-of-image marker is refused as truncated (libjpeg would
otherwise return a half-grey picture with only a warning).

Payload shapes (the first non-blank byte decides):

- raw JPEG or PNG bytes;
- JSON ``{"image": "<base64>" | "data:image/jpeg;base64,..." | {"type": "base64", "value": "..."},
  "frame_id": str | int, "timestamp": Unix seconds | ISO 8601, "parameters": {...}}`` — only ``image``
  is required; unknown keys are ignored (forward compatible). Base64 may be wrapped over lines (MIME
  style, ``base64`` without ``-w0``): ASCII whitespace in it is dropped.

The JSON is parsed with :mod:`worker.bounded_json` under :data:`FRAME_JSON_LIMITS` (nesting depth 8,
1,000 values, strings of 1,024 characters except the image, integers of 19 digits, no NaN/Infinity).
Errors carry the *sender's* ``frame_id`` whenever it can be read (also when the JSON itself is
refused, from a plain look-up of the ``"frame_id"`` key), so a publisher can match its error reports.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import cv2
import numpy as np

from worker.bounded_json import JsonLimitError, JsonLimits, check_bounds, loads_bounded
from worker.errors import FrameDecodeError

__all__ = [
    "DEFAULT_MAX_DECODED_BYTES",
    "FRAME_JSON_LIMITS",
    "FramePayload",
    "decode_image",
    "decode_payload",
    "decoded_bytes_estimate",
    "image_size",
    "parse_payload",
    "sniff_format",
    "sniff_frame_id",
]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
# SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}
_MAX_FRAME_ID = 256
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
#: a Unix timestamp above this (the year 5138) is taken for a mistake (milliseconds, garbage)
_MAX_TIMESTAMP = 1e11
_MAX_TIMESTAMP_TEXT = 64
#: what decoding one image may allocate, by default (a 20 MP BGR frame is 60 MB)
DEFAULT_MAX_DECODED_BYTES = 64 * 1024 * 1024
#: bounds of a JSON frame payload (the base64 ``image`` is bounded by the payload size only)
FRAME_JSON_LIMITS = JsonLimits(
    max_depth=8,
    max_elements=1000,
    max_string_chars=1024,
    max_key_chars=128,
    max_int_digits=19,
    max_number_chars=64,
    long_string_keys=frozenset({"image"}),
)
_FRAME_ID_KEY = b'"frame_id"'
_FRAME_ID_VALUE = re.compile(rb'\s*:\s*(?:"((?:[^"\\\x00-\x1f]|\\.){1,256})"|(-?[0-9]{1,19})(?![0-9.eE]))')
_BASE64_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")


@dataclass(slots=True)
class FramePayload:
    """A parsed payload: the encoded image and what the publisher said about it."""

    image: bytes
    frame_id: str | None = None
    timestamp: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def sniff_format(data: bytes) -> Literal["jpeg", "png"] | None:
    """``"jpeg"``, ``"png"`` or None, from the magic bytes."""
    if data.startswith(_JPEG_SOI):
        return "jpeg"
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    return None


def _jpeg_header(data: bytes) -> tuple[int, int, bool] | None:
    """``(width, height, progressive)`` from the first SOF segment."""
    pos = 2
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if pos + 9 > n:
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return width, height, marker in _JPEG_PROGRESSIVE
        pos += 2 + length
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG's SOF segment or a PNG's IHDR chunk; None if not found.

    Example:
        >>> ok, buf = cv2.imencode(".png", np.zeros((3, 5, 3), np.uint8))
        >>> image_size(buf.tobytes())
        (5, 3)
    """
    kind = sniff_format(data)
    if kind == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack_from(">II", data, 16)
        return width, height
    if kind == "jpeg":
        header = _jpeg_header(data)
        return None if header is None else header[:2]
    return None


def decoded_bytes_estimate(data: bytes) -> int | None:
    """What decoding ``data`` allocates, from its header: 3 bytes per pixel for the BGR image, plus
    6 per pixel for a progressive JPEG (its coefficient buffers); None if the header is unreadable.

    Example:
        >>> ok, buf = cv2.imencode(".png", np.zeros((3, 5, 3), np.uint8))
        >>> decoded_bytes_estimate(buf.tobytes())
        45
    """
    kind = sniff_format(data)
    if kind == "jpeg":
        header = _jpeg_header(data)
        if header is None:
            return None
        width, height, progressive = header
        return width * height * (9 if progressive else 3)
    size = image_size(data)
    return None if size is None else size[0] * size[1] * 3


def decode_image(data: bytes, *, max_pixels: int, max_decoded_bytes: int | None = None) -> np.ndarray:
    """Decode JPEG/PNG bytes to a ``(H, W, 3)`` uint8 BGR image, checking the header first.

    Args:
        data: the encoded image.
        max_pixels: the largest width x height accepted.
        max_decoded_bytes: the most bytes decoding may allocate (see :func:`decoded_bytes_estimate`);
            None: only ``max_pixels`` bounds it.

    Returns:
        The BGR image (gray and alpha images are converted; 16-bit PNGs are scaled to 8 bits).

    Raises:
        FrameDecodeError: ``reason="oversize"`` if the header claims more than ``max_pixels`` pixels
            or more than ``max_decoded_bytes`` once decoded;
            ``reason="decode_error"`` if the bytes are not a readable, complete JPEG or PNG.
    """
    kind = sniff_format(data)
    if kind is None:
        raise FrameDecodeError("not a JPEG or PNG image", reason="decode_error")
    size = image_size(data)
    if size is None or size[0] == 0 or size[1] == 0:
        raise FrameDecodeError(f"corrupt {kind.upper()} header", reason="decode_error")
    width, height = size
    if width * height > max_pixels:
        raise FrameDecodeError(
            f"image of {width}x{height} = {width * height} pixels exceeds max_image_pixels={max_pixels}",
            reason="oversize",
        )
    estimate = decoded_bytes_estimate(data) or 0
    if max_decoded_bytes is not None and estimate > max_decoded_bytes:
        raise FrameDecodeError(
            f"image of {width}x{height} needs {estimate} bytes decoded; "
            f"max_decoded_bytes={max_decoded_bytes}",
            reason="oversize",
        )
    if kind == "jpeg" and data.rfind(b"\xff\xd9") < 4:
        raise FrameDecodeError("truncated JPEG (no end-of-image marker)", reason="decode_error")
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise FrameDecodeError(f"corrupt {kind.upper()} data: {exc}", reason="decode_error") from None
    if image is None or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise FrameDecodeError(f"corrupt {kind.upper()} data", reason="decode_error")
    if image.shape[:2] != (height, width):
        raise FrameDecodeError(
            f"decoded {image.shape[1]}x{image.shape[0]} but the header says {width}x{height}",
            reason="decode_error",
        )
    return image


def _b64(value: Any) -> bytes:
    if isinstance(value, dict) and value.get("type") == "base64":
        value = value.get("value")
    if not isinstance(value, str):
        raise FrameDecodeError("'image' must be a base64 string", reason="decode_error")
    if value.startswith("data:"):
        _, sep, value = value.partition(",")
        if not sep:
            raise FrameDecodeError("'image' data URL has no ',' before the data", reason="decode_error")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        pass
    # line-wrapped base64 (MIME, `base64` without -w0): drop ASCII whitespace, then strictly again
    try:
        return base64.b64decode(value.translate(_BASE64_WHITESPACE), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FrameDecodeError(f"'image' is not valid base64: {exc}", reason="decode_error") from None


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise FrameDecodeError("'timestamp' must be Unix seconds or ISO 8601", reason="decode_error")
    if isinstance(value, int | float):
        if not (isinstance(value, int) or math.isfinite(value)) or not 0 <= value <= _MAX_TIMESTAMP:
            raise FrameDecodeError(
                f"'timestamp' {value!r} is not a valid time (Unix seconds, 0..{_MAX_TIMESTAMP:.0e})",
                reason="decode_error",
            )
        return float(value)
    if isinstance(value, str):
        if len(value) > _MAX_TIMESTAMP_TEXT:
            raise FrameDecodeError(f"'timestamp' of {len(value)} characters", reason="decode_error")
        try:
            stamp = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError, OSError) as exc:
            raise FrameDecodeError(
                f"'timestamp' {value!r} is not ISO 8601: {exc}", reason="decode_error"
            ) from None
        if not 0 <= stamp <= _MAX_TIMESTAMP:
            raise FrameDecodeError(f"'timestamp' {value!r} is not a valid time", reason="decode_error")
        return stamp
    raise FrameDecodeError("'timestamp' must be Unix seconds or ISO 8601", reason="decode_error")


def _frame_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise FrameDecodeError("'frame_id' must be a string or an integer", reason="decode_error")
    frame_id = str(value)
    if not frame_id or len(frame_id) > _MAX_FRAME_ID:
        raise FrameDecodeError(f"'frame_id' must have 1..{_MAX_FRAME_ID} characters", reason="decode_error")
    return frame_id


def sniff_frame_id(payload: bytes) -> str | None:
    """The ``frame_id`` of a JSON payload that could not be parsed, if a plain look-up finds one.

    Only for error reports: the first ``"frame_id": "<string>"`` or ``"frame_id": <integer>`` in the
    bytes (a string with escapes is unescaped as JSON; anything odd gives None).

    Example:
        >>> sniff_frame_id(b'{"frame_id": "cam-7/42", "image": [[[[')
        'cam-7/42'
    """
    at = payload.find(_FRAME_ID_KEY)
    if at < 0:
        return None
    match = _FRAME_ID_VALUE.match(payload, at + len(_FRAME_ID_KEY))
    if match is None:
        return None
    text, number = match.groups()
    if number is not None:
        return number.decode()
    try:
        value = json.loads(b'"' + text + b'"')
    except ValueError:
        return None
    return value if isinstance(value, str) and value else None


def parse_payload(payload: bytes, *, max_bytes: int) -> FramePayload:
    """Split an MQTT frame payload into the encoded image and its metadata (no pixel decoding).

    Total: any payload returns or raises ``FrameDecodeError`` (with the sender's ``frame_id`` when it
    can be read).

    Raises:
        FrameDecodeError: ``oversize`` above ``max_bytes``; ``decode_error`` for bad JSON, JSON past
            :data:`FRAME_JSON_LIMITS`, or a bad field.
    """
    if len(payload) > max_bytes:
        raise FrameDecodeError(
            f"payload of {len(payload)} bytes exceeds max_payload_bytes={max_bytes}", reason="oversize"
        )
    payload = bytes(payload)
    if not payload[:64].lstrip().startswith(b"{"):
        return FramePayload(image=payload)
    try:
        doc = loads_bounded(payload, FRAME_JSON_LIMITS)
    except JsonLimitError as exc:
        raise FrameDecodeError(f"bad JSON payload: {exc}", frame_id=sniff_frame_id(payload)) from None
    if not isinstance(doc, dict) or "image" not in doc:
        raise FrameDecodeError("JSON payload has no 'image' field", frame_id=sniff_frame_id(payload))
    try:
        frame_id = _frame_id(doc.get("frame_id"))
    except FrameDecodeError:
        raise
    except (ValueError, TypeError) as exc:  # e.g. a frame_id that is a BadNumber
        raise FrameDecodeError(f"bad 'frame_id': {exc}") from None
    try:
        check_bounds(doc, FRAME_JSON_LIMITS)
        parameters = doc.get("parameters")
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise FrameDecodeError("'parameters' must be an object", reason="decode_error")
        return FramePayload(
            image=_b64(doc["image"]),
            frame_id=frame_id,
            timestamp=_timestamp(doc.get("timestamp")),
            parameters=parameters,
        )
    except FrameDecodeError as exc:
        exc.frame_id = frame_id
        raise
    except (ValueError, TypeError, OverflowError) as exc:  # JsonLimitError is a ValueError
        raise FrameDecodeError(f"bad JSON payload: {exc}", frame_id=frame_id) from None


def decode_payload(
    payload: bytes, *, max_bytes: int, max_pixels: int, max_decoded_bytes: int | None = None
) -> tuple[FramePayload, np.ndarray]:
    """:func:`parse_payload` then :func:`decode_image`: the whole path of one frame payload.

    Raises:
        FrameDecodeError: as those two do, always with the sender's ``frame_id`` when it was read.
    """
    parsed = parse_payload(payload, max_bytes=max_bytes)
    try:
        return parsed, decode_image(parsed.image, max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes)
    except FrameDecodeError as exc:
        if exc.frame_id is None:
            exc.frame_id = parsed.frame_id
        raise
