"""Remote inference: the step's model runs on an inference server (``model.backend: remote``).

- ``protocol: kserve_v2`` (:class:`~worker.models.remote.kserve.KServeV2Backend`): Triton, KServe,
  OpenVINO Model Server, MLServer. A :class:`~worker.models.backend.SegmentationBackend` like the
  local ones: segstream letterboxes, sends the tensor, gets the raw outputs and post-processes.
- ``protocol: roboflow`` (:class:`~worker.models.remote.roboflow.RoboflowBackend`): the Roboflow
  ``inference`` server's HTTP API, which returns final predictions; the step sends each frame with
  its parameters and maps the answer to the outputs the local step gives.

Both share :class:`~worker.models.remote.client.RemoteClient` (bounded concurrency, timeout,
retries, circuit breaker, metrics) and :mod:`worker.models.remote.hold` (live frames dropped with a
reason while the server is down, ``every_frame`` frames held).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from worker.models.backend import SegmentationBackend
from worker.models.remote.config import RemoteModelConfig
from worker.models.remote.step_backend import RemoteStepBackend

__all__ = ["RemoteModelConfig", "bind_remote", "load_remote", "release_remote"]

log = logging.getLogger(__name__)


def load_remote(
    path: Path, model_id: str | None, config: RemoteModelConfig
) -> SegmentationBackend | RemoteStepBackend:
    """The remote backend of ``config.protocol`` for the package at ``path`` (its metadata).

    Raises:
        ModelError: the server cannot be reached, lacks the model, or does not fit the package.
        ConfigError: the API key cannot be read.
    """
    if config.protocol == "kserve_v2":
        from worker.models.remote.kserve import KServeV2Backend

        return KServeV2Backend(path, model_id, config)
    from worker.models.remote.roboflow import RoboflowBackend

    return RoboflowBackend(path, model_id, config)


def bind_remote(model: object, metrics: Any, health: Any, model_id: str) -> None:
    """Wire a loaded model into the worker: remote metrics on its registry, readiness on its server.

    Does nothing for a local model. Readiness: ``health.stage_alive("model <id>", available)`` where
    the health state has it, else ``health.set_model_loaded(available)``.
    """
    bind = getattr(model, "bind", None)
    if not callable(bind):
        return
    stage_alive = getattr(health, "stage_alive", None)
    if callable(stage_alive):

        def on_available(available: bool) -> None:
            stage_alive(f"model {model_id}", available)

    else:

        def on_available(available: bool) -> None:
            health.set_model_loaded(available)

    bind(getattr(metrics, "registry", None), on_available)


def release_remote(models: Iterable[object]) -> None:
    """Close the remote models at the worker's exit: batches still waiting for a server give up.

    The worker calls it once its shutdown grace time is over (``worker.models.remote.hold``: frames
    of ``every_frame`` sources wait for an unavailable server; the model pool's threads are joined at
    interpreter exit, so they must stop waiting). Local models are left alone.
    """
    from worker.models.remote.hold import HoldsForServer

    for model in models:
        if isinstance(model, HoldsForServer):
            close = getattr(model, "close", None)
            if callable(close):
                close()
