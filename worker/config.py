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

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker.active_learning.config import ActiveLearningConfig
from worker.documents import config_error, read_document
from worker.errors import ConfigError
from worker.models.config import ModelRuntimeConfig, OnnxRuntimeConfig
from worker.mqtt import BrokerConfig
from worker.sinks import SinkConfig
from worker.sources import SourceConfig
from worker.step.workflow import WorkflowDefinition

__all__ = [
    "AnnotatedVideoConfig",
    "BatchingConfig",
    "ControlConfig",
    "ControlSender",
    "HttpConfig",
    "ModelRuntimeConfig",
    "PipelineConfig",
    "load_pipeline",
    "looks_like_pipeline",
    "read_document",
]

HTTP_HOST_ENV = "SEGSTREAM_HTTP_HOST"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(_Strict):
    """How frames from all sources are grouped for the model."""

    max_batch_size: int = Field(4, ge=1, le=64)
    max_wait_ms: float = Field(10.0, ge=0, le=10_000)


class HttpConfig(_Strict):
    """The aiohttp server for /metrics, /healthz, /readyz and the live preview.

    ``host`` defaults to ``$SEGSTREAM_HTTP_HOST``, else ``127.0.0.1`` (the container image sets
    ``0.0.0.0``). Bound beyond loopback, the preview needs the token from ``preview_token_file``, else
    ``$<preview_token_env>`` (``worker.ops.access`` says how it is presented).
    """

    enabled: bool = True
    host: str = Field(
        default_factory=lambda: os.environ.get(HTTP_HOST_ENV) or "127.0.0.1",
        min_length=1,
        description="bind address (default: $SEGSTREAM_HTTP_HOST, else 127.0.0.1); "
        "beyond loopback the preview needs a token",
    )
    port: int = Field(9108, ge=0, le=65535)
    preview: bool = Field(False, description="serve the live preview page at /")
    preview_fps: float = Field(5.0, gt=0, le=30)
    preview_token_env: str = Field("SEGSTREAM_PREVIEW_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    preview_token_file: Path | None = Field(None, description="e.g. a secret under /run/secrets")
    allowed_origins: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="other origins (scheme://host[:port]) whose pages may open the preview WebSocket",
    )
    open_probes: bool = Field(True, description="/metrics, /healthz, /readyz need no token")
    ready_sources: Literal["any", "all"] = Field(
        "any", description="readiness needs at least one source alive (any) or every source (all)"
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not re.fullmatch(r"https?://[^/?#\s]+", origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path)")
        return value

    def resolved_preview_token(self) -> str | None:
        """The preview token from the file, else the environment; None when neither is set.

        Raises:
            ConfigError: the file cannot be read, or the token is shorter than 16 characters.
        """
        where = f"http.preview_token_file {self.preview_token_file}"
        if self.preview_token_file is not None:
            try:
                token = self.preview_token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{where}: {exc.strerror or exc}", field="http.preview_token_file") from exc
        else:
            where = f"${self.preview_token_env}"
            token = os.environ.get(self.preview_token_env, "").strip()
            if not token:
                return None
        if len(token) < 16:
            raise ConfigError(f"the preview token in {where} must have at least 16 characters")
        return token


class ControlSender(_Strict):
    """One sender allowed to sign control messages, and where its shared secret is (never inline)."""

    secret_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    secret_file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ControlSender:
        if (self.secret_env is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret_env or secret_file")
        return self

    def secret(self, name: str) -> bytes:
        """The secret's bytes (surrounding whitespace stripped).

        Raises:
            ConfigError: the variable is unset or empty, or the file cannot be read or is empty.
        """
        if self.secret_env is not None:
            value = os.environ.get(self.secret_env, "").strip()
            where = f"environment variable {self.secret_env}"
        else:
            assert self.secret_file is not None
            try:
                value = self.secret_file.read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"control sender {name!r}: cannot read {self.secret_file}: {exc}") from None
            where = str(self.secret_file)
        if len(value) < 16:
            raise ConfigError(
                f"control sender {name!r}: the secret in {where} is missing or shorter than 16 characters"
            )
        return value.encode()


class ControlConfig(_Strict):
    """A topic where new values for the workflow's runtime inputs arrive (needs a broker).

    Who may use it (see ``worker.control``): the broker's ACL first (``deploy/mosquitto/acl``), then
    optionally signed messages from named ``senders`` (HMAC-SHA256, MQTT v5 user property
    ``signature``); retained messages are refused unless ``accept_retained``; ``allowed_inputs``
    limits which inputs may change. Values are checked against the step's own types and ranges.
    """

    enabled: bool = True
    topic: str = "segstream/{pipeline}/control"
    accept_retained: bool = Field(
        False, description="apply a retained control message (at every start); off: refused"
    )
    senders: dict[str, ControlSender] = Field(
        default_factory=dict,
        description="senders whose signed messages are accepted; when set, unsigned messages are refused",
    )
    max_age_s: float = Field(60.0, gt=0, le=3600, description="a signed message's issued_at window")
    allowed_inputs: list[str] | None = Field(
        None, description="the inputs the control topic may change (default: every parameter input)"
    )

    @field_validator("senders")
    @classmethod
    def _sender_names(cls, senders: dict[str, ControlSender]) -> dict[str, ControlSender]:
        for name in senders:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", name):
                raise ValueError(f"sender name {name!r}: 1..64 letters, digits, '_', '.', '@', '-'")
        return senders

    def sender_secrets(self) -> dict[str, bytes]:
        """``{sender: secret}`` (read now, from the environment or the files).

        Raises:
            ConfigError: a secret is missing or too short.
        """
        return {name: sender.secret(name) for name, sender in self.senders.items()}


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
    broker_required: bool = Field(
        False,
        description="at start-up, exit with an error unless every mqtt sink connects within "
        "broker.connect_timeout (default: start anyway, not ready until the broker is there)",
    )
    inference_threads: int = Field(1, ge=1, le=8, description="batches in flight at once")
    blas_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="threads of numpy's/OpenCV's BLAS (the worker parallelises across batches)",
    )
    annotated_video: AnnotatedVideoConfig | None = None
    active_learning: ActiveLearningConfig | None = None
    print_summary: bool = Field(True, description="print frames, detections per class and fps at the end")
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _signed_control_needs_v5(self) -> PipelineConfig:
        if self.control.enabled and self.control.senders and self.broker and self.broker.protocol != "5":
            raise ValueError(
                "control.senders needs broker.protocol '5' (the signature is an MQTT v5 user property)"
            )
        return self

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
    try:
        doc = read_document(p)
        return PipelineConfig.model_validate(doc)
    except ValidationError as exc:
        raise config_error(exc, doc, f"pipeline file {p}") from exc
    except ConfigError:
        raise
    except (RecursionError, ValueError, TypeError, OverflowError, OSError) as exc:
        # hostile or broken files the loader lets through: nesting deeper than the validators'
        # recursion, integers of more than 4,300 digits (int/str conversion limit) ...
        raise ConfigError(f"{p} cannot be read as a pipeline file: {type(exc).__name__}: {exc}") from None
