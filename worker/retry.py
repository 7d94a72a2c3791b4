"""The one retry policy: capped exponential backoff with full jitter, and a floor on the attempt rate.

Every reconnect loop of the worker (the MQTT source, the MQTT sink, the control listener, a video
source) waits between attempts with :class:`Backoff`.

Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015): the delay before retry
number ``attempt`` (0-based, counting failures since the last success) is drawn uniformly in
``[0, min(max_s, min_s * 2**attempt)]``. Drawing from zero spreads the retries of many clients that
lost the same broker at the same moment over the whole window, instead of bunching them at its top.

A delay drawn from ``[0, ...]`` can be (almost) zero, and a loop may also retry without a backoff at
all (a connection that succeeded and dropped at once resets the backoff). So the policy has a second,
separate part, the **attempt-rate floor**: whatever the state (running, reconnecting, shutting down),
two attempts of one client are at least ``min_interval_s`` apart, i.e. a client makes at most
``1 / min_interval_s`` attempts per second (:data:`DEFAULT_MIN_INTERVAL_S`: at most 5 per second).
Loops call :meth:`Backoff.pace` right before each attempt and wait what it returns.

Example:
    >>> import random
    >>> b = Backoff(0.5, 4.0, rng=random.Random(0))
    >>> [b.ceiling(i) for i in range(5)]
    [0.5, 1.0, 2.0, 4.0, 4.0]
    >>> 0.0 <= b.next_delay() <= 0.5 and b.attempt == 1
    True
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

__all__ = ["DEFAULT_MIN_INTERVAL_S", "Backoff"]

#: the least time between two attempts of one client (at most 5 attempts per second)
DEFAULT_MIN_INTERVAL_S = 0.2


class Backoff:
    """Capped exponential backoff with full jitter, plus a floor between attempts.

    Args:
        min_s: the first retry's largest delay, seconds (> 0).
        max_s: the cap of every delay, seconds (>= ``min_s``).
        rng: where the jitter comes from (tests pass a seeded ``random.Random``).
        clock: monotonic seconds, for the attempt-rate floor (tests pass a fake clock).
        min_interval_s: the floor: the least time between two attempts (>= 0; 0 turns it off).

    Raises:
        ValueError: ``min_s <= 0``, ``max_s < min_s`` or ``min_interval_s < 0``.
    """

    __slots__ = ("_clock", "_last_attempt", "_rng", "attempt", "max_s", "min_interval_s", "min_s")

    def __init__(
        self,
        min_s: float,
        max_s: float,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
    ) -> None:
        if not min_s > 0:
            raise ValueError(f"min_s must be > 0, got {min_s}")
        if not max_s >= min_s:
            raise ValueError(f"max_s ({max_s}) must be >= min_s ({min_s})")
        if not min_interval_s >= 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        self.min_s = min_s
        self.max_s = max_s
        self.min_interval_s = min_interval_s
        #: failures since the last :meth:`reset` (the exponent of the next delay's ceiling)
        self.attempt = 0
        self._rng = rng or random.Random()
        self._clock = clock
        self._last_attempt: float | None = None

    def ceiling(self, attempt: int) -> float:
        """The largest delay of retry ``attempt`` (0-based): ``min(max_s, min_s * 2**attempt)``."""
        return min(self.max_s, self.min_s * 2.0 ** min(max(attempt, 0), 62))

    def next_delay(self) -> float:
        """The delay before the next retry, uniform in ``[0, ceiling(attempt)]``; advances ``attempt``."""
        ceiling = self.ceiling(self.attempt)
        self.attempt += 1
        return self._rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        """Back to the shortest window (call after a success). The attempt-rate floor still holds."""
        self.attempt = 0

    def pace(self) -> float:
        """Book the attempt about to be made; the seconds to wait before making it.

        The booked time is ``max(now, previous attempt + min_interval_s)``, so attempts that follow
        the returned waits are at least ``min_interval_s`` apart, whatever delays came before.

        Example:
            >>> now = [10.0]
            >>> b = Backoff(1.0, 2.0, clock=lambda: now[0], min_interval_s=0.2)
            >>> b.pace(), round(b.pace(), 3)  # the first at once; the second 0.2 s after it
            (0.0, 0.2)
        """
        now = self._clock()
        at = now if self._last_attempt is None else max(now, self._last_attempt + self.min_interval_s)
        self._last_attempt = at
        return at - now
