"""The second kind of model behind the seam: one whose server runs the whole step.

A :class:`~worker.models.backend.SegmentationBackend` returns raw outputs that the step
post-processes; a :class:`RemoteStepBackend` (the Roboflow inference server) gets the frames with the
step's resolved parameters and returns each frame's detections, which the step serializes as for a
local model. The step (``worker.step.executor``) tells them apart with ``isinstance``.

This module imports nothing of ``worker.step`` at run time (the step imports it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from worker.errors import SegstreamError
from worker.models.backend import BackendInfo
from worker.models.package import ModelMetadata

if TYPE_CHECKING:
    from worker.step.detections import Detections
    from worker.step.parameters import ResolvedStepParameters

__all__ = ["RemoteStepBackend"]


@runtime_checkable
class RemoteStepBackend(Protocol):
    """A model that runs the whole step on a server: frames and parameters in, detections out."""

    model_id: str | None
    metadata: ModelMetadata

    @property
    def class_names(self) -> tuple[str, ...]: ...

    @property
    def info(self) -> BackendInfo: ...

    def detect(
        self, images: Sequence[np.ndarray], params: ResolvedStepParameters
    ) -> list[Detections | SegstreamError]:
        """Each frame's detections (or its own error), in order.

        Raises:
            RemoteError: the server failed the whole request (unreachable, timeout, 5xx).
        """
        ...

    def close(self) -> None: ...
