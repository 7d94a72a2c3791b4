"""The regression corpus of hostile inputs: frame payloads and control messages that once stopped a
worker (issue 12) or could, each with what the worker must answer.

Used by the unit tests (``tests/sources/test_decode_fuzz.py``, ``tests/test_control_fuzz.py``) and by
the end-to-end tests (``tests/integration/test_hostile.py``), so a case added here is checked on
every path.
"""

from __future__ import annotations

import base64
import functools
import json
import struct
import zlib
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "BOMB_PNG_SIDE",
    "CONTROL_POISON",
    "FRAME_POISON",
    "Poison",
    "bomb_png",
    "good_jpeg",
    "good_png",
    "payload_variants",
]

#: the side of :func:`bomb_png`: 4000 x 4000 BGR is 48 MB decoded, from under 70 KB of PNG
BOMB_PNG_SIDE = 4000


@dataclass(frozen=True)
class Poison:
    """One hostile payload.

    Attributes:
        name: the test id.
        payload: the bytes.
        reason: the error report's ``reason`` (frames), or a word the refusal must contain (control).
        frame_id: the ``frame_id`` the error report must carry (the sender's), or None when the payload
            names none (the report then carries the worker's ``<source>:<n>``).
    """

    name: str
    payload: bytes
    reason: str
    frame_id: str | None = None


@functools.cache
def good_jpeg(seed: int = 0) -> bytes:
    """A real 48x64 JPEG."""
    yy, xx = np.mgrid[0:48, 0:64]
    image = np.stack([(xx * 3 + seed) % 256, (yy * 5) % 256, (xx + yy + seed) % 256], -1).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return buf.tobytes()


@functools.cache
def good_png(seed: int = 0) -> bytes:
    """A real 24x32 PNG."""
    image = np.full((24, 32, 3), seed % 256, np.uint8)
    image[:12, :, 2] = 255 - seed % 256
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def bomb_png(side: int = BOMB_PNG_SIDE) -> bytes:
    """A *complete, valid* black PNG of ``side`` x ``side`` pixels: tiny encoded, huge decoded."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    row = b"\x00" * (1 + 3 * side)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"\x00" * 64


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _doc(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def _raw(text: str) -> bytes:
    return text.encode()


def _frame_poison() -> tuple[Poison, ...]:
    good = _b64(good_jpeg())
    deep = "[" * 1000 + "]" * 1000
    return (
        # item 1 of the issue: nested ~1,000 deep (2 KB), the sender's frame_id still read
        Poison(
            "deep-1000", _raw(f'{{"frame_id": "deep-1000", "image": {deep}}}'), "decode_error", "deep-1000"
        ),
        Poison("deep-objects", _raw('{"a":' * 1000 + "1" + "}" * 1000), "decode_error"),
        Poison(
            "deep-parameters",
            _raw(f'{{"image": "{good}", "frame_id": "dp", "parameters": {{"x": {"[" * 20}1{"]" * 20}}}}}'),
            "decode_error",
            "dp",
        ),
        # item 1: a 400-digit timestamp (math.isfinite overflowed)
        Poison(
            "ts-400-digits",
            _raw(f'{{"image": "{good}", "frame_id": "ts-400", "timestamp": {"9" * 400}}}'),
            "decode_error",
            "ts-400",
        ),
        Poison(
            "ts-5000-digits",
            _raw(f'{{"image": "{good}", "frame_id": "ts-5000", "timestamp": {"9" * 5000}}}'),
            "decode_error",
            "ts-5000",
        ),
        Poison(
            "ts-nan",
            _raw(f'{{"image": "{good}", "frame_id": "ts-nan", "timestamp": NaN}}'),
            "decode_error",
            "ts-nan",
        ),
        Poison(
            "ts-infinity",
            _raw(f'{{"image": "{good}", "frame_id": "ts-inf", "timestamp": -Infinity}}'),
            "decode_error",
            "ts-inf",
        ),
        Poison(
            "ts-1e999",
            _raw(f'{{"image": "{good}", "frame_id": "ts-e", "timestamp": 1e999}}'),
            "decode_error",
            "ts-e",
        ),
        Poison(
            "ts-long-float",
            _raw(f'{{"image": "{good}", "frame_id": "ts-f", "timestamp": 1.{"5" * 3000}}}'),
            "decode_error",
            "ts-f",
        ),
        Poison(
            "ts-milliseconds", _doc(image=good, frame_id="ts-ms", timestamp=1.7e12), "decode_error", "ts-ms"
        ),
        Poison("ts-negative", _doc(image=good, frame_id="ts-neg", timestamp=-5), "decode_error", "ts-neg"),
        Poison(
            "ts-iso-garbage",
            _doc(image=good, frame_id="ts-iso", timestamp="9999-99-99"),
            "decode_error",
            "ts-iso",
        ),
        Poison(
            "ts-iso-year-1",
            _doc(image=good, frame_id="ts-y1", timestamp="0001-01-01T00:00:00+14:00"),
            "decode_error",
            "ts-y1",
        ),
        Poison(
            "ts-wrong-type", _doc(image=good, frame_id="ts-list", timestamp=[1]), "decode_error", "ts-list"
        ),
        Poison(
            "int-in-parameters",
            _raw(f'{{"image": "{good}", "frame_id": "pi", "parameters": {{"confidence": {"7" * 4400}}}}}'),
            "decode_error",
            "pi",
        ),
        Poison("frame-id-huge-int", _raw(f'{{"image": "{good}", "frame_id": {"1" * 400}}}'), "decode_error"),
        Poison("frame-id-list", _doc(image=good, frame_id=["a"]), "decode_error"),
        Poison("frame-id-too-long", _doc(image=good, frame_id="x" * 300), "decode_error"),
        # item 7: wrong base64 must carry the sender's frame_id
        Poison("bad-base64", _doc(image="@@not base64@@", frame_id="b64-1"), "decode_error", "b64-1"),
        Poison("base64-non-ascii", _doc(image="QUJD\u00e9", frame_id="b64-2"), "decode_error", "b64-2"),
        Poison(
            "base64-not-an-image", _doc(image=_b64(b"hello world"), frame_id="b64-3"), "decode_error", "b64-3"
        ),
        Poison("image-wrong-type", _doc(image=7, frame_id="img-7"), "decode_error", "img-7"),
        Poison(
            "image-dict-wrong",
            _doc(image={"type": "base64", "value": None}, frame_id="img-d"),
            "decode_error",
            "img-d",
        ),
        Poison(
            "data-url-no-comma",
            _doc(image="data:image/png;base64", frame_id="img-u"),
            "decode_error",
            "img-u",
        ),
        Poison("no-image", _doc(frame_id="no-img"), "decode_error", "no-img"),
        Poison("json-array", _raw("[1, 2, 3]"), "decode_error"),
        Poison("bad-json-with-id", _raw('{"frame_id": "cut-1", "image": "QUJD'), "decode_error", "cut-1"),
        Poison("not-utf8-json", b'{"frame_id": "u8", "image": "\xff\xfe"}', "decode_error", "u8"),
        Poison("parameters-list", _doc(image=good, frame_id="pl", parameters=[1]), "decode_error", "pl"),
        Poison("many-values", _doc(image=good, frame_id="mv", extra=list(range(5000))), "decode_error", "mv"),
        Poison("long-string", _doc(image=good, frame_id="ls", note="n" * 5000), "decode_error", "ls"),
        Poison("long-key", _doc(image=good, frame_id="lk", **{"k" * 500: 1}), "decode_error", "lk"),
        # images
        Poison("empty", b"", "decode_error"),
        Poison(
            "random-bytes",
            bytes(np.random.default_rng(12).integers(0, 256, 3000, dtype=np.uint8)),
            "decode_error",
        ),
        Poison("truncated-jpeg", good_jpeg()[: len(good_jpeg()) // 2], "decode_error"),
        Poison("corrupt-png", good_png()[:-20], "decode_error"),
        Poison("png-claims-gigapixels", _png_claiming(60000, 60000), "oversize"),
        Poison(
            "jpeg-sof-65535",
            b"\xff\xd8\xff\xc0\x00\x11\x08\xff\xff\xff\xff\x03" + b"\x00" * 64 + b"\xff\xd9",
            "oversize",
        ),
        Poison("png-zero-size", _png_claiming(0, 10), "decode_error"),
        # item 6: a small complete PNG whose pixels are far more than its bytes
        Poison("png-bomb-4000", bomb_png(), "oversize"),
        Poison("png-bomb-json", _doc(image=_b64(bomb_png()), frame_id="bomb-j"), "oversize", "bomb-j"),
    )


#: the frame payloads; valid for a source with ``max_decoded_bytes`` under 48 MB (the bomb) and
#: ``max_payload_bytes`` of at least 128 KiB
FRAME_POISON: tuple[Poison, ...] = _frame_poison()


def _control_poison() -> tuple[Poison, ...]:
    return (
        Poison("deep-1000", _raw('{"inputs": ' + "[" * 1000 + "]" * 1000 + "}"), "nested"),
        Poison("deep-top", _raw("[" * 1000 + "]" * 1000), "nested"),
        Poison("int-400-digits", _raw('{"inputs": {"confidence": ' + "9" * 400 + "}}"), "out of range"),
        Poison("int-5000-digits", _raw('{"inputs": {"confidence": ' + "9" * 5000 + "}}"), "out of range"),
        Poison("nan", _raw('{"inputs": {"confidence": NaN}}'), "out of range"),
        Poison("confidence-1e12", _raw('{"inputs": {"confidence": 1e12}}'), "less than or equal to 1"),
        Poison("not-json", b"not json", "not JSON"),
        Poison("not-utf8", b"\xff\xfe{", "not JSON"),
        Poison("empty", b"", "not JSON"),
        Poison("inputs-list", _raw('{"inputs": [1]}'), "must be"),
        Poison("extra-key", _raw('{"inputs": {}, "sudo": true}'), "unknown keys"),
        Poison("unknown-input", _raw('{"inputs": {"no_such_input": 1}}'), "unknown workflow input"),
        Poison("out-of-range", _raw('{"inputs": {"confidence": 1.7}}'), "less than or equal to 1"),
        Poison("wrong-type", _raw('{"inputs": {"confidence": "high"}}'), "valid number"),
        Poison("long-string", _doc(inputs={"confidence": "x" * 1000}), "characters"),
        Poison("too-large", b" " * (64 * 1024 + 1), "limit"),
    )


#: control messages, for a workflow whose one parameter input is ``confidence`` (a custom threshold)
CONTROL_POISON: tuple[Poison, ...] = _control_poison()


def payload_variants() -> dict[str, tuple[bytes, str | None]]:
    """Valid payloads in unusual but legal shapes: ``{name: (payload, frame_id)}``."""
    good = good_jpeg(3)
    wrapped = base64.encodebytes(good).decode()  # MIME: a line break every 76 characters
    return {
        "raw-jpeg": (good, None),
        "raw-png": (good_png(5), None),
        "base64-line-breaks": (_doc(image=wrapped, frame_id="wrapped"), "wrapped"),
        "base64-crlf": (_doc(image=wrapped.replace("\n", "\r\n"), frame_id="crlf"), "crlf"),
        "data-url": (_doc(image="data:image/jpeg;base64," + _b64(good), frame_id=17), "17"),
        "typed-image": (_doc(image={"type": "base64", "value": _b64(good)}, frame_id="typed"), "typed"),
        "iso-timestamp": (_doc(image=_b64(good), frame_id="iso", timestamp="2026-12-02T10:00:00Z"), "iso"),
        "leading-whitespace": (b"  \n" + _doc(image=_b64(good), frame_id="ws"), "ws"),
    }
