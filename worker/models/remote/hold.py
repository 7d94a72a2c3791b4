"""What the step does with a batch when its inference server fails: drop live frames, hold the rest.

A server failure (:class:`~worker.models.remote.client.RemoteError`: unreachable, breaker open,
timeout, 5xx) is not the frames' fault, so the batch is not split into per-frame retries. Frames of
*live* sources fail at once with the error's reason (``server_unavailable``, ``remote_timeout``,
...): the runtime counts them in ``segstream_frames_dropped_total{reason}`` and publishes an error
report, so none is lost silently. Frames of *held* sources (``every_frame``) wait in the model
thread until the server is back (the breaker closes) and are then sent again: the model pool stops
taking batches, the batcher stops, and those sources' bounded queues push back on their readers.
Held frames are given up only when the backend is closed (the worker does at exit, after its shutdown
grace time: ``worker.models.remote.release_remote``), with the error's reason.

A local backend never raises ``RemoteError``: for it this is one ``infer`` call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from worker.errors import SegstreamError
from worker.frame import Frame
from worker.models.backend import RawSegmentation, SegmentationBackend
from worker.models.remote.client import RemoteError
from worker.sources.base import Backoff

if TYPE_CHECKING:
    from worker.models.remote.step_backend import RemoteStepBackend
    from worker.step.detections import Detections
    from worker.step.parameters import ResolvedStepParameters

__all__ = ["HoldsForServer", "detect_holding", "infer_holding"]

_T = TypeVar("_T")

log = logging.getLogger(__name__)

#: how often a held batch re-checks the breaker (it also wakes at once when the breaker closes)
_WAIT_SLICE_S = 1.0


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
    """``model.infer`` on the frames; on a server failure, live frames fail and held ones wait.

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
    everything = list(range(len(frames)))
    try:
        return list(run(everything))
    except RemoteError as exc:
        failure = exc
    results: list[_T | SegstreamError] = [_copy(failure, model) for _ in frames]
    pending = [i for i, frame in enumerate(frames) if frame.source_id in held_sources]
    if not pending or not isinstance(model, HoldsForServer):
        return results
    log.warning("%d frame(s) of held sources wait for the inference server: %s", len(pending), failure)
    backoff = Backoff(0.05, 2.0)
    # the worker closes remote models when its shutdown grace time is over (release_remote)
    while not model.closed:
        if not model.wait_available(_WAIT_SLICE_S):
            continue
        try:
            outputs = run(pending)
        except RemoteError as exc:
            failure = exc
            time.sleep(backoff.next_delay())  # the server is back but failing: do not spin on it
            continue
        for i, output in zip(pending, outputs, strict=True):
            results[i] = output
        return results
    for i in pending:
        results[i] = _copy(failure, model)
    return results


def _copy(exc: RemoteError, model: Any) -> RemoteError:
    error = type(exc)(str(exc), model_id=model.model_id)
    error.reason = exc.reason
    return error
