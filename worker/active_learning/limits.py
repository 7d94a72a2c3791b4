"""Calendar windows: sample limits per minute / hour / day, and batch names per day / week / month.

Like the reference, limits count samples in fixed UTC calendar windows (the minute ``12:34``, the
hour ``12:00``, the day ``2026-12-02``), not sliding ones: a limit of 10 per minute allows 10 samples
between 12:34:00 and 12:34:59.999 and 10 more from 12:35:00. Every clock is injected (Unix seconds),
so tests step time across boundaries without sleeping.

Example:
    >>> t = [0.0]
    >>> limiter = WindowLimiter(clock=lambda: t[0])
    >>> [limiter.acquire([("parts", {"minutely": 2})]) is not None for _ in range(3)]
    [True, True, False]
    >>> t[0] = 60.0                        # the next minute
    >>> limiter.acquire([("parts", {"minutely": 2})]) is not None
    True
    >>> batch_name("al", "weekly", 1764633600.0)    # Tuesday 2025-12-02 -> that week's Monday
    'al_2025_12_01'
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

from worker.active_learning.config import RecreationInterval

__all__ = ["WINDOW_SECONDS", "Ticket", "WindowLimiter", "batch_name"]

#: length of each limit window; Unix time has no leap seconds, so day windows are UTC days
WINDOW_SECONDS: Mapping[str, int] = {"minutely": 60, "hourly": 3600, "daily": 86400}


@dataclass(frozen=True, slots=True)
class Ticket:
    """What one :meth:`WindowLimiter.acquire` took: ``(key, window, window index)`` per count."""

    taken: tuple[tuple[Hashable, str, int], ...]


class WindowLimiter:
    """Counts samples per key (a dataset, a strategy of a dataset) in UTC calendar windows.

    Not thread-safe: the observer calls it on the event loop only.

    Args:
        clock: Unix seconds (``time.time`` by default).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # (key, window) -> (window index, count)
        self._counts: dict[tuple[Hashable, str], tuple[int, int]] = {}

    def used(self, key: Hashable, window: str) -> int:
        """Samples counted for ``key`` in the current ``window`` (``minutely``/``hourly``/``daily``)."""
        index = int(self._clock() // WINDOW_SECONDS[window])
        current, count = self._counts.get((key, window), (index, 0))
        return count if current == index else 0

    def acquire(self, limits: Sequence[tuple[Hashable, Mapping[str, int]]]) -> Ticket | None:
        """Count one sample against every ``(key, {window: limit})``, all or nothing.

        Returns:
            A ticket (give it to :meth:`release` if the sample is not kept after all), or ``None``
            when some limit is reached (nothing is counted then).
        """
        now = self._clock()
        plan = []
        for key, windows in limits:
            for window, limit in windows.items():
                index = int(now // WINDOW_SECONDS[window])
                current, count = self._counts.get((key, window), (index, 0))
                count = count if current == index else 0
                if count >= limit:
                    return None
                plan.append((key, window, index, count))
        for key, window, index, count in plan:
            self._counts[(key, window)] = (index, count + 1)
        # every window is counted, limited or not, so a limit added later would see the right use
        return Ticket(tuple((key, window, index) for key, window, index, _ in plan))

    def release(self, ticket: Ticket) -> None:
        """Give back what ``ticket`` took, in the windows that are still current."""
        for key, window, index in ticket.taken:
            current, count = self._counts.get((key, window), (index, 0))
            if current == index and count > 0:
                self._counts[(key, window)] = (index, count - 1)


def batch_name(prefix: str, interval: RecreationInterval, now: float) -> str:
    """The labelling batch a sample taken at ``now`` (Unix s) goes to.

    ``never``: ``prefix``; ``daily``: ``prefix_YYYY_MM_DD`` of the UTC day; ``weekly``: of the UTC
    week's Monday; ``monthly``: of the month's first day (the reference's names, in UTC).
    """
    if interval == "never":
        return prefix
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    if interval == "weekly":
        day -= dt.timedelta(days=day.weekday())
    elif interval == "monthly":
        day = day.replace(day=1)
    elif interval != "daily":
        raise ValueError(f"recreation_interval must be never, daily, weekly or monthly, got {interval!r}")
    return f"{prefix}_{day.strftime('%Y_%m_%d')}"
