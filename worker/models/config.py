"""The pipeline's ``model`` section: which backend runs the models, and how.

``model.backend`` picks one entry of ``worker.models.registry.BACKENDS``; each has its own settings
class here, and the section is a pydantic discriminated union on ``backend`` (a file without
``backend`` is ``onnxruntime``, so every existing pipeline file keeps its meaning)::

    model:                                   model:
      backend: onnxruntime                     backend: openvino
      intra_op_threads: 1                      precision: auto        # bf16 where the CPU has it
      providers:                               threads: 1
        - name: CUDAExecutionProvider          num_requests: 1
          options: {device_id: 0}              cache_dir: ${HOME}/.cache/segstream/openvino
        - CPUExecutionProvider
      allow_fallback: true

Common to all: ``models_dir``, ``files`` (model ids bound to an ``.onnx`` file or a package folder
anywhere, e.g. an Ultralytics export as exported), ``input_size`` (run a dynamic-axes model at another
size) and ``letterbox`` (``square``, or ``rect`` for dynamic-axes models)::

    model:
      files:
        yolo/1: /models/yolo11n-seg.onnx       # the workflow's model_id "yolo/1" loads this file
      letterbox: square

``letterbox``: ``square`` (the default) pads every frame to the model's square input, as the model was
trained; ``rect`` runs each batch at the smallest stride-multiple rectangle holding its frames (a 16:9
frame at 480 runs at 288x480), as Ultralytics' predictor does: about 40 % less compute, at some
accuracy for a model tuned square (``benchmarks/letterbox.py`` measures both on the demo clip).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
)

from worker.ids import model_id_problem
from worker.models.remote.config import RemoteModelConfig

__all__ = [
    "DEFAULT_BACKEND",
    "ModelRuntimeConfig",
    "OnnxRuntimeConfig",
    "OpenVinoConfig",
    "ProviderConfig",
    "RemoteModelConfig",
    "backend_of",
]

DEFAULT_BACKEND = "onnxruntime"

#: a provider option value as ONNX Runtime takes them (it turns every value into a string)
ProviderOption = str | int | float | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Common(_Strict):
    models_dir: Path | None = Field(None, description="else $SEGSTREAM_MODELS_DIR, else the bundled models")
    files: dict[str, Path] = Field(
        default_factory=dict,
        description="model ids ('project/version') bound to an .onnx file or a package folder anywhere; "
        "looked up before models_dir",
    )
    input_size: tuple[int, int] | None = Field(
        None, description="run the model at (h, w) instead of its default (dynamic-axes models only)"
    )
    letterbox: Literal["square", "rect"] = Field(
        "square",
        description="square: pad every frame to the model's input size; rect: each batch at the smallest "
        "stride-multiple rectangle holding its frames (dynamic-axes models only; faster, less accurate "
        "for a model trained square)",
    )

    @field_validator("files")
    @classmethod
    def _file_ids(cls, value: dict[str, Path]) -> dict[str, Path]:
        for model_id in value:
            problem = model_id_problem(model_id)
            if problem is not None:
                raise ValueError(f"files: {problem}")
        return value


_PROVIDER_NAME = r"^[A-Za-z][A-Za-z0-9]*ExecutionProvider$"


class ProviderConfig(_Strict):
    """One ONNX Runtime execution provider and its options (ONNX Runtime's own option names)."""

    name: str = Field(pattern=_PROVIDER_NAME)
    options: dict[str, ProviderOption] = Field(default_factory=dict)


def _provider_entry(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


#: a provider as written in the file: its name, or ``{name, options}``
ProviderEntry = Annotated[
    ProviderConfig,
    BeforeValidator(
        _provider_entry,
        json_schema_input_type=Annotated[str, StringConstraints(pattern=_PROVIDER_NAME)] | ProviderConfig,
    ),
]


class OnnxRuntimeConfig(_Common):
    """ONNX Runtime: thread counts, execution providers in order of preference."""

    backend: Literal["onnxruntime"] = "onnxruntime"
    intra_op_threads: int = Field(0, ge=0, le=256, description="0: ONNX Runtime's default")
    inter_op_threads: int = Field(1, ge=0, le=64)
    session_batch: int | None = Field(
        None,
        ge=1,
        le=64,
        description="most frames per ONNX Runtime call; default: 1 for a single-threaded CPU session "
        "(a batch only adds cache pressure there), else the whole batch",
    )
    providers: tuple[ProviderEntry, ...] = Field(
        (ProviderConfig(name="CPUExecutionProvider"),),
        min_length=1,
        description="execution providers in order of preference: a name, or {name, options}",
    )
    allow_fallback: bool = Field(
        False,
        description="leave out providers this ONNX Runtime lacks (logged) instead of refusing to start; "
        "CPUExecutionProvider is added last when nothing is left",
    )

    @field_validator("providers")
    @classmethod
    def _unique(cls, value: tuple[ProviderConfig, ...]) -> tuple[ProviderConfig, ...]:
        names = [p.name for p in value]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"providers listed twice: {duplicated}")
        return value


class OpenVinoConfig(_Common):
    """OpenVINO runtime: device, precision, threads, requests in flight, compiled-model cache."""

    backend: Literal["openvino"]
    device: str = Field("CPU", pattern=r"^[A-Z][A-Z0-9_.:,()]*$", description="CPU, GPU, AUTO:GPU,CPU, ...")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="inference precision: auto = bf16 on a CPU with native BF16 (AVX512-BF16, AMX), "
        "else fp32; an INT8 package stays INT8 where it was quantized whatever this says",
    )
    threads: int = Field(0, ge=0, le=256, description="INFERENCE_NUM_THREADS; 0: OpenVINO's default")
    num_requests: int = Field(
        1,
        ge=1,
        le=32,
        description="infer requests a batch is spread over at once (and the number of CPU streams); "
        "each model thread has its own",
    )
    cache_dir: Path | None = Field(
        None, description="compiled-model cache (OpenVINO CACHE_DIR): a restart does not recompile"
    )
    session_batch: int | None = Field(
        None, ge=1, le=64, description="most frames per infer request (default: 1 when threads is 1)"
    )


def backend_of(value: Any) -> str:
    """The discriminator: ``backend`` of a dict or a settings object, ``onnxruntime`` when absent."""
    if isinstance(value, dict):
        return str(value.get("backend", DEFAULT_BACKEND))
    return str(getattr(value, "backend", DEFAULT_BACKEND))


#: the pipeline's ``model`` section: one settings class per backend, chosen by ``backend``
ModelRuntimeConfig = Annotated[
    Annotated[OnnxRuntimeConfig, Tag("onnxruntime")]
    | Annotated[OpenVinoConfig, Tag("openvino")]
    | Annotated[RemoteModelConfig, Tag("remote")],
    Discriminator(
        backend_of,
        custom_error_type="unknown_backend",
        custom_error_message="model.backend must be one of: onnxruntime, openvino, remote",
    ),
]
