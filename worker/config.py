"""The pipeline file: sources, batching, the workflow, sinks, broker, HTTP, models.

Read by :func:`worker.documents.read_document` (the loader workflow files share: size limit, ``${VAR}``
and ``${VAR:-default}`` replaced from the environment before validation so one file serves several
deployments, ``${SEGSTREAM_ASSETS}`` the package's bundled assets folder, duplicate keys refused with
their lines) and validated with pydantic in one pass, the ``workflow`` section included (it is a
:class:`~worker.step.workflow.WorkflowDefinition`); an invalid file stops the worker with one error
that names the step and the field (:func:`worker.documents.describe`). Secrets never sit in the file:
the broker password comes from ``$SEGSTREAM_MQTT_PASSWORD`` (or the variable / file the ``broker``
section names).

The ``model`` section (``ModelRuntimeConfig``: which backend, its settings) lives in
``worker.models.config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from worker.documents import config_error, read_document
from worker.models.config import ModelRuntimeConfig, OnnxRuntimeConfig
from worker.mqtt import BrokerConfig
from worker.sinks import SinkConfig
from worker.sources import SourceConfig
from worker.step.workflow import WorkflowDefinition

__all__ = [
    "AnnotatedVideoConfig",
    "BatchingConfig",
    "ControlConfig",
    "HttpConfig",
    "ModelRuntimeConfig",
    "PipelineConfig",
    "load_pipeline",
    "looks_like_pipeline",
    "read_document",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(_Strict):
    """How frames from all sources are grouped for the model."""

    max_batch_size: int = Field(4, ge=1, le=64)
    max_wait_ms: float = Field(10.0, ge=0, le=10_000)


class HttpConfig(_Strict):
    """The aiohttp server for /metrics, /healthz, /readyz and the live preview."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(9108, ge=0, le=65535)
    preview: bool = Field(False, description="serve the live preview page at /")
    preview_fps: float = Field(5.0, gt=0, le=30)


class ControlConfig(_Strict):
    """A topic where new values for the workflow's runtime inputs arrive (needs a broker)."""

    enabled: bool = True
    topic: str = "segstream/{pipeline}/control"


class AnnotatedVideoConfig(_Strict):
    """Write one source's frames, with the detections drawn on them, to a video file."""

    path: Path
    source: str | None = Field(None, description="source id; default: the first source")
    fps: float = Field(25.0, gt=0, le=240)


class PipelineConfig(_Strict):
    """One pipeline file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    sources: list[SourceConfig] = Field(min_length=1)
    batching: BatchingConfig = BatchingConfig()
    workflow: WorkflowDefinition
    sinks: list[SinkConfig] = Field(min_length=1)
    broker: BrokerConfig | None = None
    control: ControlConfig = ControlConfig()
    http: HttpConfig = HttpConfig()
    model: ModelRuntimeConfig = OnnxRuntimeConfig()
    shutdown_grace_s: float = Field(20.0, gt=0, le=600)
    inference_threads: int = Field(1, ge=1, le=8, description="batches in flight at once")
    blas_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="threads of numpy's/OpenCV's BLAS (the worker parallelises across batches)",
    )
    annotated_video: AnnotatedVideoConfig | None = None
    print_summary: bool = Field(True, description="print frames, detections per class and fps at the end")
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, sources: list[Any]) -> list[Any]:
        seen: set[str] = set()
        for s in sources:
            if s.id in seen:
                raise ValueError(f"duplicate source id {s.id!r}")
            seen.add(s.id)
        return sources


def looks_like_pipeline(doc: dict[str, Any]) -> bool:
    """A pipeline file has ``sources``/``sinks``/``workflow``; a bare workflow has ``steps``."""
    return "workflow" in doc or "sources" in doc


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline file (YAML or JSON), its workflow included.

    Raises:
        ConfigError: unreadable file, bad syntax, a duplicate key, a missing environment variable, or
            a field that fails validation; ``.field`` names the first one's path (``sources[0].url``),
            and ``.step`` its step for a problem inside the workflow's steps.
    """
    p = Path(path)
    doc = read_document(p)
    try:
        return PipelineConfig.model_validate(doc)
    except ValidationError as exc:
        raise config_error(exc, doc, f"pipeline file {p}") from exc
