"""The frames input path is total: whatever the bytes, parsing and decoding return or raise
``FrameDecodeError`` (never anything else), with the sender's ``frame_id`` when it can be read.

Property tests (hypothesis) over structured JSON, deep nesting, huge numbers, random bytes and mutated
real JPEG/PNG, and the regression corpus of ``tests/support/poison.py``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.poison import FRAME_POISON, Poison, bomb_png, good_jpeg, good_png, payload_variants
from worker.errors import FrameDecodeError
from worker.sources.decode import FRAME_JSON_LIMITS, FramePayload, decode_image, decode_payload

MAX_BYTES = 1 << 20
MAX_PIXELS = 20_000_000
MAX_DECODED = 16 * 1024 * 1024  # the bomb (48 MB) is refused

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def decode_all(payload: bytes) -> tuple[FramePayload, np.ndarray] | FrameDecodeError:
    """The MQTT source's whole path for one payload: parse, then decode."""
    try:
        return decode_payload(
            payload, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, max_decoded_bytes=MAX_DECODED
        )
    except FrameDecodeError as exc:
        assert exc.reason in ("decode_error", "oversize")
        assert str(exc)
        return exc


@pytest.mark.parametrize("poison", FRAME_POISON, ids=[p.name for p in FRAME_POISON])
def test_the_poison_corpus_gives_one_error_with_the_senders_frame_id(poison: Poison) -> None:
    outcome = decode_all(poison.payload)
    assert isinstance(outcome, FrameDecodeError), f"{poison.name} was accepted"
    assert (outcome.reason, outcome.frame_id) == (poison.reason, poison.frame_id)


@pytest.mark.parametrize("name", list(payload_variants()))
def test_legal_payload_variants_decode(name: str) -> None:
    payload, frame_id = payload_variants()[name]
    outcome = decode_all(payload)
    assert not isinstance(outcome, FrameDecodeError), outcome
    parsed, image = outcome
    assert parsed.frame_id == frame_id and image.dtype == np.uint8 and image.ndim == 3


def test_the_png_bomb_is_refused_before_its_pixels_are_allocated() -> None:
    data = bomb_png()
    assert len(data) < 100_000  # 4000 x 4000: 48 MB decoded
    with pytest.raises(FrameDecodeError, match="needs 48000000 bytes decoded") as info:
        decode_image(data, max_pixels=MAX_PIXELS, max_decoded_bytes=MAX_DECODED)
    assert info.value.reason == "oversize"


# ------------------------------------------------------------------------------------ strategies

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6), st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=40,
)
images = st.one_of(
    st.just(base64.b64encode(good_jpeg()).decode()),
    st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=60),
    json_values,
)
frame_docs = st.fixed_dictionaries(
    {},
    optional={
        "image": images,
        "frame_id": json_values,
        "timestamp": st.one_of(json_values, st.floats(), st.integers(min_value=-(10**30), max_value=10**30)),
        "parameters": json_values,
        "extra": json_values,
    },
)


def _encode(doc: Any) -> bytes:
    # Python's json writes NaN/Infinity and integers of any size: exactly the hostile cases
    return json.dumps(doc).encode()


@FUZZ
@given(frame_docs)
def test_structured_json_frames(doc: dict[str, Any]) -> None:
    outcome = decode_all(_encode(doc))
    if isinstance(outcome, FrameDecodeError):
        sent = doc.get("frame_id")
        if outcome.frame_id is not None:  # the sender's id, never a made-up one
            assert outcome.frame_id == str(sent)
    else:
        parsed, _ = outcome
        assert isinstance(parsed.parameters, dict)


@FUZZ
@given(st.integers(min_value=1, max_value=5000), st.sampled_from(["[", '{"a":']), st.booleans())
@example(1000, "[", True)
@example(1000, '{"a":', False)
def test_deep_nesting(depth: int, opener: str, inside_image: bool) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth if opener != "[" else "[" * depth + "]" * depth
    text = (
        f'{{"frame_id": "d", "image": {nested}}}' if inside_image else f'{{"x": {nested}, "image": "QUJD"}}'
    )
    outcome = decode_all(text.encode())
    if depth + 1 > FRAME_JSON_LIMITS.max_depth:
        assert isinstance(outcome, FrameDecodeError) and "nested" in str(outcome)


GOOD_B64 = base64.b64encode(good_jpeg()).decode()


@FUZZ
@given(st.integers(min_value=12, max_value=6000), st.sampled_from(["timestamp", "frame_id", "parameters"]))
@example(400, "timestamp")
@example(4301, "parameters")
def test_huge_numbers(digits: int, field: str) -> None:
    number = "9" * digits
    fields = {
        "timestamp": f'"frame_id": "n", "timestamp": {number}',
        "frame_id": f'"frame_id": {number}',
        "parameters": f'"frame_id": "n", "parameters": {{"confidence": {number}}}',
    }[field]
    outcome = decode_all(f'{{"image": "{GOOD_B64}", {fields}}}'.encode())
    # a timestamp of 12+ digits is past the year 5138; any integer over 19 digits is refused
    assert isinstance(outcome, FrameDecodeError) == (field == "timestamp" or digits > 19)
    if isinstance(outcome, FrameDecodeError) and field != "frame_id":
        assert outcome.frame_id == "n"


@FUZZ
@given(st.binary(max_size=4096))
@example(b"{")
@example(b"\xff\xd8")
@example(b"\x89PNG\r\n\x1a\n")
def test_random_bytes(data: bytes) -> None:
    decode_all(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_behind_real_magic_numbers(tail: bytes) -> None:
    decode_all(b"\xff\xd8\xff" + tail)
    decode_all(b"\x89PNG\r\n\x1a\n" + tail)
    decode_all(b'{"image": "' + base64.b64encode(b"\xff\xd8\xff" + tail) + b'"}')


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, position, value in edits:
        if not out:
            break
        at = position % len(out)
        if kind == 0:
            out[at] = value
        elif kind == 1:
            out.insert(at, value)
        elif kind == 2:
            del out[at]
        else:
            del out[at:]
    return bytes(out)


edits = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8
)


@FUZZ
@given(st.sampled_from(["jpeg", "png", "progressive"]), edits)
def test_mutated_real_images(kind: str, changes: list[tuple[int, int, int]]) -> None:
    import cv2

    if kind == "progressive":
        image = cv2.imdecode(np.frombuffer(good_jpeg(1), np.uint8), cv2.IMREAD_COLOR)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
        assert ok
        source = buf.tobytes()
    else:
        source = good_jpeg(2) if kind == "jpeg" else good_png(7)
    mutated = _mutate(source, changes)
    decode_all(mutated)
    decode_all(json.dumps({"image": base64.b64encode(mutated).decode(), "frame_id": "m"}).encode())
