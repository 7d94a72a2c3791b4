"""Payload parsing and image decoding: header checks before decoding, every failure's reason."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from contextlib import AbstractContextManager, nullcontext

import cv2
import numpy as np
import pytest

from worker.errors import FrameDecodeError
from worker.sources.decode import decode_image, image_size, parse_payload, sniff_format


def enc(img: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok
    return buf.tobytes()


BGR = np.zeros((6, 10, 3), np.uint8)
BGR[:, :5] = (255, 0, 0)  # left half blue
GRAY = np.full((4, 7), 128, np.uint8)
BGRA = np.dstack([BGR, np.full((6, 10), 7, np.uint8)])
DEEP = np.full((3, 4, 3), 65535, np.uint16)


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (enc(BGR, ".png"), (10, 6)),
        (enc(BGR, ".jpg"), (10, 6)),
        (enc(BGR, ".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), (10, 6)),  # SOF2
        (png_header(70000, 3), (70000, 3)),
        (b"\xff\xd8\xff\xda\x00\x08", None),  # scan before any frame header
        (b"GIF89a....", None),
        (b"", None),
    ],
)
def test_image_size_from_the_header(data: bytes, expected: tuple[int, int] | None) -> None:
    assert image_size(data) == expected


@pytest.mark.parametrize(
    ("data", "shape", "context"),
    [
        (enc(BGR, ".png"), (6, 10, 3), nullcontext()),
        (enc(GRAY, ".png"), (4, 7, 3), nullcontext()),
        (enc(BGRA, ".png"), (6, 10, 3), nullcontext()),
        (enc(DEEP, ".png"), (3, 4, 3), nullcontext()),
        (enc(GRAY, ".jpg"), (4, 7, 3), nullcontext()),
        (enc(BGR, ".jpg")[:-40], None, pytest.raises(FrameDecodeError, match="truncated JPEG")),
        (enc(BGR, ".png")[:-20], None, pytest.raises(FrameDecodeError, match="corrupt PNG data")),
        (png_header(0, 5), None, pytest.raises(FrameDecodeError, match="corrupt PNG header")),
        (png_header(2000, 2000) + b"\0" * 10, None, pytest.raises(FrameDecodeError, match="4000000 pixels")),
        (b"\xff\xd8\xff\xd9", None, pytest.raises(FrameDecodeError, match="corrupt JPEG header")),
        (b"BM\x00\x00", None, pytest.raises(FrameDecodeError, match="not a JPEG or PNG")),
    ],
)
def test_decode_image(
    data: bytes, shape: tuple[int, ...] | None, context: AbstractContextManager[object]
) -> None:
    with context:
        out = decode_image(data, max_pixels=1_000_000)
        assert out.shape == shape and out.dtype == np.uint8


def test_decode_keeps_bgr_order_and_values() -> None:
    np.testing.assert_array_equal(decode_image(enc(BGR, ".png"), max_pixels=60), BGR)
    assert decode_image(enc(DEEP, ".png"), max_pixels=12).max() == 255


@pytest.mark.parametrize(("pixels", "ok"), [(59, False), (60, True)])
def test_pixel_limit_is_inclusive(pixels: int, ok: bool) -> None:
    context = nullcontext() if ok else pytest.raises(FrameDecodeError)
    with context as caught:
        decode_image(enc(BGR, ".png"), max_pixels=pixels)
    if not ok:
        assert caught.value.reason == "oversize"


B64 = base64.b64encode(enc(BGR, ".png")).decode()


@pytest.mark.parametrize(
    ("payload", "expected", "context"),
    [
        (enc(BGR, ".jpg"), {"frame_id": None, "timestamp": None, "parameters": {}}, nullcontext()),
        (
            json.dumps(
                {"image": B64, "frame_id": "a/1", "timestamp": 12.5, "parameters": {"c": 0.3}}
            ).encode(),
            {"frame_id": "a/1", "timestamp": 12.5, "parameters": {"c": 0.3}},
            nullcontext(),
        ),
        (
            b'  \n{"image": {"type": "base64", "value": "' + B64.encode() + b'"}, "frame_id": 42, '
            b'"timestamp": "2024-11-28T10:00:00Z"}',
            {"frame_id": "42", "timestamp": 1732788000.0, "parameters": {}},
            nullcontext(),
        ),
        (b"x" * 2000, None, pytest.raises(FrameDecodeError, match="exceeds max_payload_bytes=1024")),
        (b'{"image": ', None, pytest.raises(FrameDecodeError, match="bad JSON")),
        (
            b'{"image": "' + B64.encode() + b'", "timestamp": true}',
            None,
            pytest.raises(FrameDecodeError, match="timestamp"),
        ),
        (
            b'{"image": "' + B64.encode() + b'", "timestamp": "noon"}',
            None,
            pytest.raises(FrameDecodeError, match="ISO"),
        ),
        (
            b'{"image": "' + B64.encode() + b'", "frame_id": [1]}',
            None,
            pytest.raises(FrameDecodeError, match="frame_id"),
        ),
        (
            b'{"image": "' + B64.encode() + b'", "frame_id": ""}',
            None,
            pytest.raises(FrameDecodeError, match="frame_id"),
        ),
        (b'{"image": 5}', None, pytest.raises(FrameDecodeError, match="base64 string")),
        (b'{"image": "data:image/png;base64"}', None, pytest.raises(FrameDecodeError, match="data URL")),
        (b'{"frame_id": 1}', None, pytest.raises(FrameDecodeError, match="no 'image'")),
    ],
)
def test_parse_payload(
    payload: bytes, expected: dict[str, object] | None, context: AbstractContextManager[object]
) -> None:
    with context:
        parsed = parse_payload(payload, max_bytes=1024 if len(payload) > 1500 else 1 << 20)
        assert {
            "frame_id": parsed.frame_id,
            "timestamp": parsed.timestamp,
            "parameters": parsed.parameters,
        } == expected
        assert sniff_format(parsed.image) in ("jpeg", "png")
