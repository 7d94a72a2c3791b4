"""What happens to a batch when its inference server fails: drop live frames, park the rest.

A server failure (:class:`~worker.models.remote.client.RemoteError`: unreachable, breaker open,
timeout, 5xx) is not the frames' fault, so the batch is not split into per-frame retries. Frames of
*live* sources fail at once with the error's reason (``server_unavailable``, ``remote_timeout``,
...): the runtime counts them in ``segstream_frames_dropped_total{reason}`` and publishes an error
report, so none is lost silently. Frames of *held* sources (``every_frame``) fail with
:class:`HeldForServer`, which carries the model to wait on; the inference loop
(``worker.inference``) parks them per source, out of the model pool, pauses those sources in the
batcher (their bounded queues push back on their readers) and runs them again once the server's
breaker closes. Batches of other sources and models keep flowing meanwhile. Parked frames are given
up when the backend is closed (the worker does at exit, after its shutdown grace time:
``worker.models.remote.release_remote``), with the error's reason.

A local backend never raises ``RemoteError``: for it this is one ``infer`` call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from worker.errors import SegstreamError
from worker.frame import Frame
from worker.models.backend import RawSegmentation, SegmentationBackend
from worker.models.remote.client import RemoteError

if TYPE_CHECKING:
    from worker.models.remote.step_backend import RemoteStepBackend
    from worker.step.detections import Detections
    from worker.step.parameters import ResolvedStepParameters

__all__ = ["HeldForServer", "HoldsForServer", "detect_holding", "infer_holding"]

_T = TypeVar("_T")

log = logging.getLogger(__name__)


@runtime_checkable
class HoldsForServer(Protocol):
    """A backend whose frames can wait for its server (the remote backends)."""

    def wait_available(self, timeout: float) -> bool:
        """Block until the server is available (True), or ``timeout`` passes / the backend closes."""
        ...

    @property
    def closed(self) -> bool:
        """Whether the backend was closed (held frames are given up)."""
        ...


def infer_holding(
    model: SegmentationBackend, frames: Sequence[Frame], held_sources: Collection[str]
) -> list[RawSegmentation | SegstreamError]:
    """``model.infer`` on the frames; on a server failure, live frames fail, held ones are marked.

    Raises:
        ModelError, ValueError: what ``infer`` raises for anything but a server failure.
    """

    def run(indices: Sequence[int]) -> list[RawSegmentation | SegstreamError]:
        return list(model.infer([frames[i].image for i in indices]))

    return _holding(model, frames, held_sources, run)


def detect_holding(
    model: RemoteStepBackend,
    frames: Sequence[Frame],
    params: Sequence[ResolvedStepParameters],
    held_sources: Collection[str],
) -> list[Detections | SegstreamError]:
    """``model.detect`` per group of frames with equal parameters, holding as :func:`infer_holding`."""
    groups: dict[ResolvedStepParameters, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p, []).append(i)
    results: list[Detections | SegstreamError | None] = [None] * len(frames)
    for group_params, indices in groups.items():
        group = [frames[i] for i in indices]

        def run(
            sub: Sequence[int], group: list[Frame] = group, p: ResolvedStepParameters = group_params
        ) -> list[Detections | SegstreamError]:
            return model.detect([group[j].image for j in sub], p)

        for i, result in zip(indices, _holding(model, group, held_sources, run), strict=True):
            results[i] = result
    return [r for r in results if r is not None]


def _holding(
    model: Any,
    frames: Sequence[Frame],
    held_sources: Collection[str],
    run: Callable[[Sequence[int]], list[_T]],
) -> list[_T | SegstreamError]:
    try:
        return list(run(list(range(len(frames)))))
    except RemoteError as exc:
        failure = exc
    holds = isinstance(model, HoldsForServer) and not model.closed
    return [
        HeldForServer(failure, model) if holds and frame.source_id in held_sources else _copy(failure, model)
        for frame in frames
    ]


class HeldForServer(RemoteError):
    """A held source's frame failed because its server did: it waits for ``model``, then runs again.

    Its ``reason`` is the server failure's (what the frame is given up with at exit).
    """

    def __init__(self, failure: RemoteError, model: HoldsForServer) -> None:
        super().__init__(str(failure), model_id=getattr(model, "model_id", None))
        self.reason = failure.reason
        self.model = model

    def given_up(self) -> RemoteError:
        """The plain error the frame ends with when its server never came back."""
        return _copy(self, self.model)


def _copy(exc: RemoteError, model: Any) -> RemoteError:
    error = type(exc)(str(exc), model_id=model.model_id)
    error.reason = exc.reason
    return error
