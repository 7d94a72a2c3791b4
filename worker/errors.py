"""The segstream exception tree.

::

    SegstreamError
    ├── ConfigError (ValueError)          invalid pipeline file or workflow definition
    ├── SourceError (OSError)             a source cannot be opened or read
    │   └── FrameDecodeError (ValueError) a frame payload cannot be decoded / is oversized
    ├── StepError (ValueError)            a frame cannot be processed by the step
    │   └── ParameterError               a runtime parameter resolved to a bad value
    ├── ModelError (RuntimeError)         a model cannot be found, loaded or run
    └── SinkError (OSError)               a result cannot be delivered

Handlers catch the subclass they can act on, report it (error topic, metric, one log
line with the ids kept as attributes) and go on with the next frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.telemetry import DropReason

__all__ = [
    "ConfigError",
    "FrameDecodeError",
    "ModelError",
    "ParameterError",
    "SegstreamError",
    "SinkError",
    "SourceError",
    "StepError",
]


class SegstreamError(Exception):
    """Base of every error segstream raises on purpose."""

    #: short machine-readable reason, used as a metric label and in error messages
    reason: str = "error"


class ConfigError(SegstreamError, ValueError):
    """An invalid pipeline file or workflow definition (names the step and field)."""

    reason = "config_error"

    def __init__(self, message: str, *, step: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.field = field


class SourceError(SegstreamError, OSError):
    """A source could not be opened or read."""

    reason = "source_error"

    def __init__(self, message: str, *, source_id: str | None = None) -> None:
        super().__init__(message)
        self.source_id = source_id


class FrameDecodeError(SourceError, ValueError):
    """A frame payload could not be decoded, or was too large."""

    reason: DropReason = "decode_error"

    def __init__(
        self,
        message: str,
        *,
        source_id: str | None = None,
        frame_id: str | None = None,
        reason: DropReason = "decode_error",
    ) -> None:
        super().__init__(message, source_id=source_id)
        self.frame_id = frame_id
        self.reason = reason


class StepError(SegstreamError, ValueError):
    """A frame could not be processed by the step."""

    reason = "step_error"

    def __init__(self, message: str, *, step: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.field = field


class ParameterError(StepError):
    """A runtime parameter (``$inputs.*``) resolved to a value the step does not accept."""

    reason = "bad_parameter"


class ModelError(SegstreamError, RuntimeError):
    """A model could not be resolved, loaded or run."""

    reason = "model_error"

    def __init__(self, message: str, *, model_id: str | None = None) -> None:
        super().__init__(message)
        self.model_id = model_id


class SinkError(SegstreamError, OSError):
    """A result could not be delivered."""

    reason = "sink_error"
