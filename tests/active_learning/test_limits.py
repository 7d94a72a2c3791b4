"""Limits per minute / hour / day and batch names, with an injected clock stepped across boundaries."""

from __future__ import annotations

import datetime as dt

import pytest

from worker.active_learning.limits import WindowLimiter, batch_name


def utc(*args: int) -> float:
    return dt.datetime(*args, tzinfo=dt.UTC).timestamp()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def take(limiter: WindowLimiter, n: int, limits: dict[str, int], key: str = "parts") -> int:
    return sum(limiter.acquire([(key, limits)]) is not None for _ in range(n))


@pytest.mark.parametrize(
    ("window", "start", "last_inside", "next_window"),
    [
        (
            "minutely",
            utc(2026, 12, 2, 12, 34, 0),
            utc(2026, 12, 2, 12, 34, 59) + 0.999,
            utc(2026, 12, 2, 12, 35),
        ),
        ("hourly", utc(2026, 12, 2, 12, 0, 0), utc(2026, 12, 2, 12, 59, 59) + 0.999, utc(2026, 12, 2, 13)),
        ("daily", utc(2026, 12, 2), utc(2026, 12, 2, 23, 59, 59) + 0.999, utc(2026, 12, 3)),
    ],
)
def test_a_limit_holds_for_its_calendar_window_and_resets_at_the_boundary(
    window: str, start: float, last_inside: float, next_window: float
) -> None:
    clock = Clock(start)
    limiter = WindowLimiter(clock)
    assert take(limiter, 5, {window: 3}) == 3
    clock.t = last_inside
    assert take(limiter, 5, {window: 3}) == 0
    assert limiter.used("parts", window) == 3
    clock.t = next_window
    assert limiter.used("parts", window) == 0
    assert take(limiter, 5, {window: 3}) == 3


def test_all_windows_apply_together() -> None:
    clock = Clock(utc(2026, 12, 2, 10, 0, 0))
    limiter = WindowLimiter(clock)
    limits = {"minutely": 2, "hourly": 3, "daily": 4}
    assert take(limiter, 5, limits) == 2  # the minute's limit
    clock.t += 60
    assert take(limiter, 5, limits) == 1  # the hour's (3 in all)
    clock.t += 3600
    assert take(limiter, 5, limits) == 1  # the day's (4 in all)
    clock.t = utc(2026, 12, 3, 0, 0, 0)
    assert take(limiter, 5, limits) == 2


def test_keys_are_independent_and_a_refusal_counts_nothing() -> None:
    clock = Clock(utc(2026, 12, 2, 10))
    limiter = WindowLimiter(clock)
    assert take(limiter, 3, {"minutely": 2}, key="a") == 2
    assert take(limiter, 3, {"minutely": 2}, key="b") == 2
    # dataset limit 5 and strategy limit 1: once the strategy is out, the dataset is not charged
    combined = [("c", {"minutely": 5}), (("c", "unsure"), {"minutely": 1})]
    assert limiter.acquire(combined) is not None
    assert limiter.acquire(combined) is None
    assert limiter.used("c", "minutely") == 1


def test_release_gives_back_credit_in_the_same_window_only() -> None:
    clock = Clock(utc(2026, 12, 2, 10, 0, 30))
    limiter = WindowLimiter(clock)
    ticket = limiter.acquire([("a", {"minutely": 1})])
    assert ticket is not None and limiter.acquire([("a", {"minutely": 1})]) is None
    limiter.release(ticket)
    later = limiter.acquire([("a", {"minutely": 1})])
    assert later is not None
    clock.t += 60
    assert limiter.acquire([("a", {"minutely": 1})]) is not None  # the new minute: one used
    limiter.release(later)  # from the previous minute: changes nothing now
    assert limiter.used("a", "minutely") == 1


def test_zero_means_nothing_and_no_limits_means_no_limit() -> None:
    limiter = WindowLimiter(Clock(0.0))
    assert take(limiter, 3, {"daily": 0}) == 0
    assert take(limiter, 100, {}) == 100


@pytest.mark.parametrize(
    ("interval", "now", "expected"),
    [
        ("never", utc(2026, 12, 2, 15), "al"),
        ("daily", utc(2026, 12, 2, 0, 0, 0), "al_2026_12_02"),
        ("daily", utc(2026, 12, 2, 23, 59, 59) + 0.999, "al_2026_12_02"),
        ("daily", utc(2026, 12, 3, 0, 0, 0), "al_2026_12_03"),
        ("weekly", utc(2026, 11, 30, 0, 0, 0), "al_2026_11_30"),  # a Monday
        ("weekly", utc(2026, 12, 6, 23, 59, 59), "al_2026_11_30"),  # the Sunday after
        ("weekly", utc(2026, 12, 7, 0, 0, 0), "al_2026_12_07"),  # the next Monday
        ("weekly", utc(2027, 1, 1, 12), "al_2026_12_28"),  # a week across the new year
        ("monthly", utc(2026, 12, 31, 23, 59, 59), "al_2026_12_01"),
        ("monthly", utc(2027, 1, 1, 0, 0, 0), "al_2027_01_01"),
        ("monthly", utc(2028, 2, 29, 12), "al_2028_02_01"),
    ],
)
def test_batch_names_change_on_interval_boundaries(interval: str, now: float, expected: str) -> None:
    assert batch_name("al", interval, now) == expected  # type: ignore[arg-type]


def test_unknown_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="recreation_interval"):
        batch_name("al", "hourly", 0.0)  # type: ignore[arg-type]
