"""What the step does with a batch when its inference server fails: drop live frames, hold the rest.

A server failure (:class:`~worker.models.remote.client.RemoteError`: unreachable, breaker open,
timeout, 5xx) is not the frames' fault, so the batch is not split into per-frame retries. Frames of
*live* sources fail at once with the error's reason (``server_unavailable``, ``remote_timeout``,
...): the runtime counts them in ``segstream_frames_dropped_total{reason}`` and publishes an error
report, so none is lost silently. Frames of *held* sources (``every_frame``) wait in the model
thread until the server is back (the breaker closes) and are then sent again: the model pool stops
taking batches, the batcher stops, and those sources' bounded queues push back on their readers.
Held frames are given up only when the backend is closed (shutdown), with the error's reason.

A local backend never raises ``RemoteError``: for it this is one ``infer`` call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from typing import Protocol, runtime_checkable

from worker.errors import SegstreamError
from worker.frame import Frame
from worker.models.backend import RawSegmentation, SegmentationBackend
from worker.models.remote.client import RemoteError
from worker.sources.base import Backoff

__all__ = ["HoldsForServer", "infer_holding"]

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
    try:
        return list(model.infer([f.image for f in frames]))
    except RemoteError as exc:
        failure = exc
    results: list[RawSegmentation | SegstreamError] = [_copy(failure, model) for _ in frames]
    pending = [i for i, frame in enumerate(frames) if frame.source_id in held_sources]
    if not pending or not isinstance(model, HoldsForServer):
        return results
    log.warning("%d frame(s) of held sources wait for the inference server: %s", len(pending), failure)
    backoff = Backoff(0.05, 2.0)
    while not model.closed:
        if not model.wait_available(_WAIT_SLICE_S):
            continue
        try:
            raws = model.infer([frames[i].image for i in pending])
        except RemoteError as exc:
            failure = exc
            time.sleep(backoff.next_delay())  # the server is back but failing: do not spin on it
            continue
        for i, raw in zip(pending, raws, strict=True):
            results[i] = raw
        return results
    for i in pending:
        results[i] = _copy(failure, model)
    return results


def _copy(exc: RemoteError, model: SegmentationBackend) -> RemoteError:
    error = type(exc)(str(exc), model_id=model.model_id)
    error.reason = exc.reason
    return error
