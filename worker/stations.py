"""Runtime inputs for one station: the control topic addressing a single station of an MQTT line.

A control message with a ``station`` sets inputs for the frames of that station only (an MQTT source
whose ``source_id`` comes from the topic)::

    {"station": "st2", "inputs": {"confidence": 0.7}}

The values are validated like any control message (:func:`worker.step.workflow.validate_runtime_inputs`)
and kept here; the MQTT source puts them into each frame of that station as its per-frame ``parameters``,
under the frame's own ones. What a step uses for a frame is therefore, first found: the frame's own
``parameters``, its station's inputs, the pipeline-wide control inputs, the workflow's defaults. A
station's values replace earlier values of the same inputs for it; ``{"station": "st2", "inputs": {}}``
is accepted and changes nothing. At most ``max_stations`` stations have inputs (the sources bound the
stations the same way).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

from worker.errors import ParameterError
from worker.sources.video import SOURCE_ID_PATTERN

__all__ = ["StationInputs"]


class StationInputs:
    """Per-station input values, set by the control listener, read by the MQTT sources.

    Args:
        validate: checks new values and returns the accepted ones (raises ``ParameterError``).
        max_stations: most stations that may have inputs.
    """

    def __init__(
        self, validate: Callable[[Mapping[str, Any]], dict[str, Any]], max_stations: int = 4096
    ) -> None:
        self._validate = validate
        self._max = max_stations
        self._values: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def set(self, station: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and store ``values`` for ``station``; the accepted values.

        Raises:
            ParameterError: a bad station id, a refused value, or one station too many.
        """
        if not re.fullmatch(SOURCE_ID_PATTERN, station):
            raise ParameterError(f"station {station[:80]!r} is not a valid source id")
        accepted = self._validate(values)
        with self._lock:
            if station not in self._values and len(self._values) >= self._max:
                raise ParameterError(
                    f"inputs for {self._max} stations already set; station {station!r} refused"
                )
            self._values[station] = {**self._values.get(station, {}), **accepted}
        return accepted

    def get(self, station: str) -> dict[str, Any]:
        """The inputs set for ``station`` (empty when none)."""
        return self._values.get(station, {})
