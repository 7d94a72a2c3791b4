"""Frame payloads: parse MQTT payloads, check sizes before decoding, decode JPEG/PNG to BGR.

Limits are checked before any pixel is decoded: the payload's byte size first, then the image's
width x height read from its header (JPEG: the SOF segment; PNG: the IHDR chunk), which costs a few
bytes of parsing instead of a full decode, so a small "decompression bomb" (a tiny PNG that claims
50000 x 50000 pixels) is refused without allocating its pixels. Only JPEG and PNG are accepted (the
formats whose header we check). A JPEG without its end-of-image marker is refused as truncated
(libjpeg would otherwise return a half-grey picture with only a warning).

Payload shapes (the first non-blank byte decides):

- raw JPEG or PNG bytes;
- JSON ``{"image": "<base64>" | "data:image/jpeg;base64,..." | {"type": "base64", "value": "..."},
  "frame_id": str | int, "timestamp": Unix seconds | ISO 8601, "parameters": {...}}`` — only ``image``
  is required; unknown keys are ignored (forward compatible).

Every failure raises ``FrameDecodeError`` with ``reason`` ``"decode_error"`` or ``"oversize"``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import cv2
import numpy as np

from worker.errors import FrameDecodeError

__all__ = ["FramePayload", "decode_image", "image_size", "parse_payload", "sniff_format"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
# SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}
_MAX_FRAME_ID = 256


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


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
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
            return width, height
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
        return _jpeg_size(data)
    return None


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode JPEG/PNG bytes to a ``(H, W, 3)`` uint8 BGR image, checking the header first.

    Args:
        data: the encoded image.
        max_pixels: the largest width x height accepted.

    Returns:
        The BGR image (gray and alpha images are converted; 16-bit PNGs are scaled to 8 bits).

    Raises:
        FrameDecodeError: ``reason="oversize"`` if the header claims more than ``max_pixels`` pixels;
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
    if kind == "jpeg" and data.rfind(b"\xff\xd9") < 4:
        raise FrameDecodeError("truncated JPEG (no end-of-image marker)", reason="decode_error")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
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
    except (binascii.Error, ValueError) as exc:
        raise FrameDecodeError(f"'image' is not valid base64: {exc}", reason="decode_error") from exc


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise FrameDecodeError("'timestamp' must be Unix seconds or ISO 8601", reason="decode_error")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise FrameDecodeError(f"'timestamp' {value!r} is not a valid time", reason="decode_error")
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError as exc:
            raise FrameDecodeError(f"'timestamp' {value!r} is not ISO 8601", reason="decode_error") from exc
    raise FrameDecodeError("'timestamp' must be Unix seconds or ISO 8601", reason="decode_error")


def parse_payload(payload: bytes, *, max_bytes: int) -> FramePayload:
    """Split an MQTT frame payload into the encoded image and its metadata (no pixel decoding).

    Raises:
        FrameDecodeError: ``oversize`` above ``max_bytes``; ``decode_error`` for bad JSON or fields.
    """
    if len(payload) > max_bytes:
        raise FrameDecodeError(
            f"payload of {len(payload)} bytes exceeds max_payload_bytes={max_bytes}", reason="oversize"
        )
    head = payload[:64].lstrip()
    if not head.startswith(b"{"):
        return FramePayload(image=bytes(payload))
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameDecodeError(f"bad JSON payload: {exc}", reason="decode_error") from exc
    if not isinstance(doc, dict) or "image" not in doc:
        raise FrameDecodeError("JSON payload has no 'image' field", reason="decode_error")
    frame_id = doc.get("frame_id")
    if frame_id is not None:
        if isinstance(frame_id, bool) or not isinstance(frame_id, str | int):
            raise FrameDecodeError("'frame_id' must be a string or an integer", reason="decode_error")
        frame_id = str(frame_id)
        if not frame_id or len(frame_id) > _MAX_FRAME_ID:
            raise FrameDecodeError(
                f"'frame_id' must have 1..{_MAX_FRAME_ID} characters", reason="decode_error"
            )
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise FrameDecodeError("'parameters' must be an object", reason="decode_error")
    return FramePayload(
        image=_b64(doc["image"]),
        frame_id=frame_id,
        timestamp=_timestamp(doc.get("timestamp")),
        parameters=parameters,
    )
