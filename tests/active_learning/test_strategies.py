"""Each strategy on hand-made detections where the right decision is known, draws seeded."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from worker.active_learning.config import StrategyConfig
from worker.active_learning.strategies import (
    compile_strategies,
    count_close_to_threshold,
    is_in_range,
    sample_close_to_threshold,
    sample_detections_number,
    sample_randomly,
)

NAMES = ("nut", "washer", "bolt", "bracket")
_ADAPTER: TypeAdapter[Any] = TypeAdapter(StrategyConfig)


def strategy(**fields: Any) -> Any:
    return _ADAPTER.validate_python({"name": "s", **fields})


def never_called() -> float:
    raise AssertionError("the draw must not happen when the criteria do not match")


def counting(value: float) -> tuple[Callable[[], float], list[int]]:
    calls = [0]

    def draw() -> float:
        calls[0] += 1
        return value

    return draw, calls


CONF = np.array([0.30, 0.45, 0.55, 0.56, 0.90], np.float32)
CLS = np.array([0, 1, 1, 2, 3], np.int64)


@pytest.mark.parametrize(
    ("threshold", "epsilon", "selected", "expected"),
    [
        (0.5, 0.1, None, 3),  # 0.45, 0.55, 0.56
        (0.5, 0.05, None, 0),  # open interval: |0.45 - 0.5| = 0.05 is not < 0.05 (float32 0.45 is 0.4499...)
        (0.5, 0.1, [1], 2),  # washers only: 0.45, 0.55
        (0.5, 0.1, [2, 3], 1),  # bolt 0.56
        (0.9, 0.01, [3], 1),
        (0.9, 0.01, [0], 0),
        (0.0, 1.0, None, 5),  # the whole range
    ],
)
def test_count_close_to_threshold(
    threshold: float, epsilon: float, selected: list[int] | None, expected: int
) -> None:
    ids = None if selected is None else np.array(selected, np.int64)
    got = count_close_to_threshold(CONF, CLS, ids, threshold=threshold, epsilon=epsilon)
    assert got == expected


def test_band_edges_are_open() -> None:
    conf = np.array([0.25, 0.75, 0.5], np.float64).astype(np.float32)  # exactly representable
    cls = np.zeros(3, np.int64)
    assert count_close_to_threshold(conf, cls, None, threshold=0.5, epsilon=0.25) == 1  # only 0.5


@pytest.mark.parametrize(
    ("minimum", "draw_value", "probability", "expected", "draws"),
    [
        (1, 0.3, 0.5, True, 1),  # 3 close, draw 0.3 < 0.5
        (3, 0.3, 0.5, True, 1),
        (4, 0.3, 0.5, False, 0),  # only 3 close: no draw at all
        (1, 0.5, 0.5, False, 1),  # draw not below probability
        (1, 0.0, 0.0, False, 1),  # probability 0 never keeps
        (1, 0.999, 1.0, True, 1),  # probability 1 always keeps
    ],
)
def test_close_to_threshold_decision(
    minimum: int, draw_value: float, probability: float, expected: bool, draws: int
) -> None:
    draw, calls = counting(draw_value)
    got = sample_close_to_threshold(
        CONF, CLS, None, threshold=0.5, epsilon=0.1, minimum=minimum, probability=probability, draw=draw
    )
    assert got is expected and calls[0] == draws


def test_close_to_threshold_with_no_detections_never_draws() -> None:
    empty_f, empty_i = np.zeros(0, np.float32), np.zeros(0, np.int64)
    assert not sample_close_to_threshold(
        empty_f, empty_i, None, threshold=0.5, epsilon=0.5, minimum=1, probability=1.0, draw=never_called
    )


@pytest.mark.parametrize(
    ("value", "more_than", "less_than", "expected"),
    [
        (3, None, None, True),
        (3, 2, None, True),
        (3, 3, None, False),
        (3, None, 4, True),
        (3, None, 3, False),
        (0, None, 1, True),
        (5, 2, 5, False),
        (4, 2, 5, True),
    ],
)
def test_is_in_range(value: int, more_than: int | None, less_than: int | None, expected: bool) -> None:
    assert is_in_range(value, more_than=more_than, less_than=less_than) is expected


@pytest.mark.parametrize(
    ("selected", "more_than", "less_than", "expected"),
    [
        (None, 4, None, True),  # 5 detections > 4
        (None, 5, None, False),
        ([1], 1, None, True),  # 2 washers > 1
        ([1], 2, None, False),
        ([0, 3], None, 3, True),  # 2 of nut/bracket < 3
        ([0, 3], None, 2, False),
    ],
)
def test_detections_number_decision(
    selected: list[int] | None, more_than: int | None, less_than: int | None, expected: bool
) -> None:
    ids = None if selected is None else np.array(selected, np.int64)
    draw = (lambda: 0.0) if expected else never_called
    assert (
        sample_detections_number(
            CLS, ids, more_than=more_than, less_than=less_than, probability=0.5, draw=draw
        )
        is expected
    )


def test_random_sampling_keeps_the_share_of_seeded_draws() -> None:
    rng = random.Random(1234)
    kept = sum(sample_randomly(traffic_percentage=0.1, draw=rng.random) for _ in range(10_000))
    # the same seed gives the same decisions
    rng2 = random.Random(1234)
    again = sum(sample_randomly(traffic_percentage=0.1, draw=rng2.random) for _ in range(10_000))
    assert kept == again
    assert 900 < kept < 1100  # binomial(10000, 0.1): sd 30, this is > 3 sd wide
    assert not any(sample_randomly(traffic_percentage=0.0, draw=rng.random) for _ in range(1000))
    assert all(sample_randomly(traffic_percentage=1.0, draw=rng.random) for _ in range(1000))


def test_probability_is_applied_to_matching_frames_only() -> None:
    rng = random.Random(7)
    (s,) = compile_strategies(
        [strategy(type="close_to_threshold", threshold=0.5, epsilon=0.1, probability=0.25)], NAMES
    )
    far = np.array([0.95], np.float32), np.array([0], np.int64)
    near = np.array([0.52], np.float32), np.array([0], np.int64)
    assert not any(s.matches(*far, rng.random) for _ in range(1000))
    kept = sum(s.matches(*near, rng.random) for _ in range(4000))
    assert 880 < kept < 1120  # binomial(4000, 0.25): sd 27


def test_compiled_class_subsets_use_the_model_ids() -> None:
    cfgs = [
        strategy(
            type="close_to_threshold",
            threshold=0.5,
            epsilon=0.1,
            probability=1.0,
            selected_class_names=["bolt"],
        ),
        {
            "name": "n",
            "type": "detections_number_based",
            "more_than": 0,
            "probability": 1.0,
            "selected_class_names": ["bracket", "nut"],
        },
    ]
    a, b = compile_strategies(
        [c if not isinstance(c, dict) else _ADAPTER.validate_python(c) for c in cfgs], NAMES
    )
    assert a.selected_ids is not None and a.selected_ids.tolist() == [2]
    assert b.selected_ids is not None and b.selected_ids.tolist() == [3, 0]
    washer_near = np.array([0.5], np.float32), np.array([1], np.int64)
    bolt_near = np.array([0.5], np.float32), np.array([2], np.int64)
    assert not a.matches(*washer_near, never_called)
    assert a.matches(*bolt_near, lambda: 0.0)
    assert not b.matches(*washer_near, never_called)
    assert b.matches(np.array([0.9], np.float32), np.array([0], np.int64), lambda: 0.0)


def test_unknown_class_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\['gear'\] do not exist in the model's training set"):
        compile_strategies(
            [
                strategy(
                    type="close_to_threshold",
                    threshold=0.5,
                    epsilon=0.1,
                    probability=1.0,
                    selected_class_names=["gear", "nut"],
                )
            ],
            NAMES,
        )


@pytest.mark.parametrize(
    ("fields", "context"),
    [
        ({"type": "random", "traffic_percentage": 0.1}, nullcontext()),
        (
            {"type": "random", "traffic_percentage": 10},
            pytest.raises(ValidationError, match="less than or equal to 1"),
        ),
        ({"type": "random"}, pytest.raises(ValidationError, match="traffic_percentage")),
        (
            {"type": "close_to_threshold", "threshold": 0.5, "epsilon": 0.1},
            pytest.raises(ValidationError, match="probability"),
        ),
        (
            {
                "type": "close_to_threshold",
                "threshold": 0.5,
                "epsilon": 0.1,
                "probability": 1,
                "minimum_objects_close_to_threshold": 0,
            },
            pytest.raises(ValidationError, match="greater than or equal to 1"),
        ),
        (
            {
                "type": "close_to_threshold",
                "threshold": 0.5,
                "epsilon": 0.1,
                "probability": 1,
                "selected_class_names": [],
            },
            pytest.raises(ValidationError, match="at least 1"),
        ),
        (
            {"type": "detections_number_based", "more_than": 3, "less_than": 3, "probability": 1},
            pytest.raises(ValidationError, match=r"more_than \(3\) must be < less_than \(3\)"),
        ),
        ({"type": "detections_number_based", "probability": 1}, nullcontext()),
        (
            {"type": "random", "traffic_percentage": 0.1, "limit": 3},
            pytest.raises(ValidationError, match="Extra inputs"),
        ),
        (
            {"type": "classes_based", "probability": 1},
            pytest.raises(ValidationError, match="does not match any"),
        ),
        (
            {
                "type": "random",
                "traffic_percentage": 0.1,
                "limits": [{"type": "hourly", "value": 1}, {"type": "hourly", "value": 2}],
            },
            pytest.raises(ValidationError, match="one limit per type"),
        ),
    ],
)
def test_strategy_configuration(fields: dict[str, Any], context: AbstractContextManager[Any]) -> None:
    with context:
        strategy(**fields)
