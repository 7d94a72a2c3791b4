"""JSON from untrusted senders, parsed with explicit bounds.

``json.loads`` alone is not total on hostile input: a document nested ~1,000 deep raises
``RecursionError``, an integer of more than 4,300 digits raises a ``ValueError`` about int/str
conversion, and an integer of a few hundred digits parses but later overflows ``float()`` or
``math.isfinite``. :func:`loads_bounded` first measures the nesting depth without parsing (the
structure left once the strings are cut out, counted in chunks with numpy) and refuses a document
nested deeper than ``max_depth`` before the recursive parser sees it — recursing ~1,000 deep is not
only an error but a hazard: the garbage collector can run finalizers at that depth, which then fail
with ``RecursionError`` themselves. It then parses with hooks that never build an out-of-range number
(an oversized, non-finite or ``NaN``/``Infinity`` number becomes a :class:`BadNumber` marker) and
turns every parse failure into :class:`JsonLimitError`; :func:`check_bounds` then walks the
document once, iteratively, and refuses it past any of the :class:`JsonLimits` (nesting depth,
element count, string and key length, any ``BadNumber``), naming the path of the offending value.

The two steps are separate so a caller can read what it needs to *report* an error (e.g. the
sender's ``frame_id``) from a document that the bounds will refuse.

Example:
    >>> doc = loads_bounded(b'{"a": [1, 2, 3]}', JsonLimits())
    >>> check_bounds(doc, JsonLimits(max_elements=3))
    Traceback (most recent call last):
        ...
    worker.bounded_json.JsonLimitError: $.a[1]: more than 3 values in the document
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BadNumber", "JsonLimitError", "JsonLimits", "check_bounds", "loads_bounded"]


class JsonLimitError(ValueError):
    """The bytes are not JSON, or the document is past a :class:`JsonLimits` bound.

    Attributes:
        path: where in the document (``$.parameters.confidence``), or ``"$"``.
    """

    def __init__(self, message: str, *, path: str = "$") -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True, slots=True)
class BadNumber:
    """A JSON number that was not converted: too many digits, not finite, or NaN/Infinity."""

    text: str

    def describe(self) -> str:
        shown = self.text if len(self.text) <= 24 else f"{self.text[:20]}... ({len(self.text)} characters)"
        return f"number {shown} is out of range"


@dataclass(frozen=True, slots=True)
class JsonLimits:
    """Bounds of one untrusted JSON document.

    Attributes:
        max_depth: containers nested at most this deep (the top-level object is depth 1).
        max_elements: values in the whole document (containers, keys' values, list items).
        max_string_chars: characters of one string value, except under ``long_string_keys``.
        max_key_chars: characters of one object key.
        max_int_digits: digits of an integer (an int64 has 19).
        max_number_chars: characters of a number with a fraction or exponent.
        long_string_keys: top-level keys whose strings (at any depth under them) may be as long as the
            document (e.g. a base64 ``image``).
    """

    max_depth: int = 8
    max_elements: int = 1000
    max_string_chars: int = 1024
    max_key_chars: int = 128
    max_int_digits: int = 19
    max_number_chars: int = 64
    long_string_keys: frozenset[str] = frozenset()


#: a JSON string (unrolled: no per-character alternation, so a megabyte of base64 is one fast run)
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_CHUNK = 1 << 20
_OPEN = frozenset(b"[{")


def nesting_depth(text: str) -> int:
    """How deep ``[``/``{`` nest in ``text`` outside its strings (no parsing, no recursion).

    Example:
        >>> nesting_depth('{"a": [1, {"b": "[[["}]}')
        3
    """
    structure = _STRING.sub("", text).encode("ascii", "replace")
    deepest = depth = 0
    for start in range(0, len(structure), _CHUNK):
        chunk = np.frombuffer(structure, np.uint8, count=min(_CHUNK, len(structure) - start), offset=start)
        steps = (np.isin(chunk, (0x5B, 0x7B))).astype(np.int32) - np.isin(chunk, (0x5D, 0x7D)).astype(
            np.int32
        )
        if not steps.any():
            continue
        levels = np.cumsum(steps) + depth
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
    return deepest


def loads_bounded(data: bytes | str, limits: JsonLimits) -> Any:
    """Parse ``data``; numbers past the bounds become :class:`BadNumber`, never an exception.

    Raises:
        JsonLimitError: not UTF-8, not JSON, or nested deeper than ``limits.max_depth``.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonLimitError(f"not JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    depth = nesting_depth(data)
    if depth > limits.max_depth:
        raise JsonLimitError(f"$: nested {depth} deep, deeper than {limits.max_depth}")

    def parse_int(text: str) -> int | BadNumber:
        digits = len(text) - (text[0] == "-")
        return int(text) if digits <= limits.max_int_digits else BadNumber(text)

    def parse_float(text: str) -> float | BadNumber:
        if len(text) > limits.max_number_chars:
            return BadNumber(text)
        value = float(text)
        return value if math.isfinite(value) else BadNumber(text)

    try:
        return json.loads(data, parse_int=parse_int, parse_float=parse_float, parse_constant=BadNumber)
    except RecursionError:
        raise JsonLimitError(
            f"JSON nested deeper than the parser allows (limit {limits.max_depth})"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JsonLimitError(f"not JSON: {exc}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # anything else json can raise on odd input
        raise JsonLimitError(f"not JSON: {exc}") from None


def check_bounds(doc: Any, limits: JsonLimits) -> None:
    """Walk ``doc`` once (no recursion) and refuse it past any bound.

    Raises:
        JsonLimitError: the first value past a bound, with its path.
    """
    elements = 0
    # (value, depth of the container holding it, path, strings may be long)
    stack: list[tuple[Any, int, str, bool]] = [(doc, 0, "$", False)]
    while stack:
        value, depth, path, long_ok = stack.pop()
        elements += 1
        if elements > limits.max_elements:
            raise JsonLimitError(f"{path}: more than {limits.max_elements} values in the document", path=path)
        if isinstance(value, dict):
            if depth + 1 > limits.max_depth:
                raise JsonLimitError(f"{path}: nested deeper than {limits.max_depth}", path=path)
            for key, item in value.items():
                if len(key) > limits.max_key_chars:
                    raise JsonLimitError(
                        f"{path}: a key of {len(key)} characters (limit {limits.max_key_chars})", path=path
                    )
                long_item = long_ok or (depth == 0 and key in limits.long_string_keys)
                stack.append((item, depth + 1, f"{path}.{key[:32]}", long_item))
        elif isinstance(value, list):
            if depth + 1 > limits.max_depth:
                raise JsonLimitError(f"{path}: nested deeper than {limits.max_depth}", path=path)
            if len(value) > limits.max_elements:
                raise JsonLimitError(
                    f"{path}: a list of {len(value)} values (limit {limits.max_elements})", path=path
                )
            stack.extend((item, depth + 1, f"{path}[{i}]", long_ok) for i, item in enumerate(value))
        elif isinstance(value, str):
            if not long_ok and len(value) > limits.max_string_chars:
                raise JsonLimitError(
                    f"{path}: a string of {len(value)} characters (limit {limits.max_string_chars})",
                    path=path,
                )
        elif isinstance(value, BadNumber):
            raise JsonLimitError(f"{path}: {value.describe()}", path=path)
