"""The ``model`` section of a pipeline that runs its model on an inference server::

    model:
      backend: remote
      protocol: kserve_v2            # or roboflow
      url: ${SEGSTREAM_INFERENCE_URL}
      model_name: factory-parts      # the server's name for the model (kserve_v2)
      timeout_s: 5
      max_concurrency: 4             # requests in flight to this server, all model threads together
      api_key_env: SEGSTREAM_INFERENCE_KEY
      tls: {ca_file: /etc/ssl/rack-ca.pem}

``kserve_v2`` (Triton, KServe, OpenVINO Model Server, MLServer) gets the letterboxed tensor and
returns the two raw outputs: segstream pre- and post-processes as for a local model. ``roboflow`` (the
Roboflow ``inference`` server) gets the image and the step's parameters and returns final predictions.
The model's metadata (class names, padding, recommended thresholds) comes from the local package of the
step's ``model_id``; the server's own metadata is checked against it at start-up.

The API key is read from the environment variable or the file named here, never from the pipeline
file itself, and is never logged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from worker.errors import ConfigError

__all__ = ["RemoteModelConfig", "RemoteTlsConfig"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RemoteTlsConfig(_Strict):
    """TLS towards the inference server (an ``https://`` url)."""

    ca_file: Path | None = Field(None, description="CA bundle that signs the server's certificate")
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="client certificate's key (mutual TLS)")
    verify: bool = Field(True, description="check the server's certificate; false only for a test rack")

    @model_validator(mode="after")
    def _pair(self) -> RemoteTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        return self


class RemoteModelConfig(_Strict):
    """A model served by an inference server (KServe v2 or the Roboflow inference server)."""

    backend: Literal["remote"]
    protocol: Literal["kserve_v2", "roboflow"]
    url: str = Field(pattern=r"^https?://[^\s/]+(/\S*)?$", description="the server's base URL")
    model_name: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
        description="kserve_v2: the server's model name (default: the model id's project); "
        "roboflow: the model id on the server (default: the step's model_id)",
    )
    model_version: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$", description="kserve_v2")
    timeout_s: float = Field(10.0, gt=0, le=300, description="one request, connect to last byte")
    max_concurrency: int = Field(4, ge=1, le=256, description="requests in flight to this server")
    retries: int = Field(
        2,
        ge=0,
        le=10,
        description="retries of a request that failed before the server took it (refused, reset, "
        "502/503/504), with backoff; a timeout is not retried",
    )
    retry_backoff_s: tuple[float, float] = Field((0.05, 1.0), description="backoff [min, max] seconds")
    breaker_failures: int = Field(
        3, ge=1, le=100, description="consecutive failed requests that open the circuit breaker"
    )
    probe_interval_s: tuple[float, float] = Field(
        (0.2, 5.0), description="while the breaker is open: health probes, backoff [min, max] seconds"
    )
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    api_key_file: Path | None = None
    tls: RemoteTlsConfig | None = None
    image_format: Literal["png", "jpeg"] = Field(
        "png",
        description="roboflow: how frames are sent (png: lossless, the server sees segstream's pixels; "
        "jpeg: about 10x fewer bytes, detections move by the compression)",
    )
    jpeg_quality: int = Field(90, ge=1, le=100, description="roboflow, image_format jpeg")
    models_dir: Path | None = Field(None, description="where the model's package (metadata) is found")
    input_size: tuple[int, int] | None = Field(None, description="kserve_v2: letterbox size (h, w)")

    @field_validator("retry_backoff_s", "probe_interval_s")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"need 0 < min <= max, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> RemoteModelConfig:
        if self.api_key_env is not None and self.api_key_file is not None:
            raise ValueError("give api_key_env or api_key_file, not both")
        if self.tls is not None and not self.url.startswith("https://"):
            raise ValueError("tls settings need an https:// url")
        return self

    def api_key(self) -> SecretStr | None:
        """The API key from the environment or the file, None when neither is configured.

        Raises:
            ConfigError: the variable is unset/empty or the file cannot be read (the key is never shown).
        """
        if self.api_key_env is not None:
            value = os.environ.get(self.api_key_env, "").strip()
            if not value:
                raise ConfigError(f"model.api_key_env: ${self.api_key_env} is not set", field="api_key_env")
            return SecretStr(value)
        if self.api_key_file is not None:
            try:
                value = self.api_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"model.api_key_file: cannot read {self.api_key_file}: {exc.strerror}",
                    field="api_key_file",
                ) from None
            if not value:
                raise ConfigError(f"model.api_key_file: {self.api_key_file} is empty", field="api_key_file")
            return SecretStr(value)
        return None
