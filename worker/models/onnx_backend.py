"""The local ONNX Runtime backend for YOLO segmentation models (both layouts of ``worker.models.layout``).

``OnnxSegmentationModel.infer`` takes a batch of BGR frames of any sizes, letterboxes each into
the model's input size (one pre-allocated buffer per calling thread), runs it through
``session.run`` in chunks of ``session_batch`` frames (the fixed batch size for a fixed-batch
model) and returns the raw per-frame outputs with the letterbox geometry needed to map them back.

Chunks: a single-threaded CPU session gains nothing from a batch, it only adds cache pressure, so
by default such a session runs one frame per call; other sessions (more threads, other providers)
take the whole batch in one call. Measured on the 2-core VM with the demo model, two single-threaded
sessions side by side (the demo's ``inference_threads: 2``): 14.1 / 14.3 / 15.5 ms a frame at 480
for batches of 1 / 2 / 4, 26.2 / 26.4 / 30.1 ms at 640; one session on 2 threads, though, ran a
batch of 4 at 640 in 32 ms a frame against 41 ms one by one.

Execution providers: ``providers`` in order of preference, each a name or ``(name, options)`` with
ONNX Runtime's own provider options (CUDA ``device_id``, TensorRT ``trt_fp16_enable``,
``trt_engine_cache_path``...). A provider this ONNX Runtime lacks is an error naming what it has,
or, with ``allow_fallback``, left out with a warning (``CPUExecutionProvider`` is appended when
nothing is left). ONNX Runtime may still put nodes on a later provider; ``info.used`` is what the
session reports it uses. Both are logged at load and exported as the ``segstream_model_info`` labels.

It is blocking and thread-safe: call it from the worker's thread pool, never from the event loop.
ONNX Runtime's own threads are configured with ``intra_op_threads`` / ``inter_op_threads``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from worker.errors import ModelError
from worker.models.backend import BackendInfo, LetterboxedBackend, RawSegmentation
from worker.models.layout import output_indices
from worker.models.package import ModelMetadata, build_metadata, locate_package, read_metadata_file
from worker.models.signature import ORT_ERRORS, ModelSignature, read_signature

__all__ = ["OnnxSegmentationModel", "ProviderSpec", "RawSegmentation", "resolve_providers"]

log = logging.getLogger(__name__)

_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_PRECISION = {np.float32: "fp32", np.float16: "fp16"}

#: a provider as the caller gives it: its name, or ``(name, {option: value})``
ProviderSpec = str | tuple[str, Mapping[str, Any]]


def resolve_providers(
    requested: Sequence[ProviderSpec],
    available: Sequence[str],
    *,
    allow_fallback: bool = False,
    source: str = "model",
) -> list[tuple[str, dict[str, str]]]:
    """Check the requested providers against those this ONNX Runtime has.

    Args:
        requested: providers in order of preference (names, or ``(name, options)``).
        available: ``onnxruntime.get_available_providers()``.
        allow_fallback: leave out unavailable ones (logged) instead of failing.
        source: the model, for messages.

    Returns:
        ``[(name, options as strings)]`` to hand to ``InferenceSession``.

    Raises:
        ModelError: no providers requested, or one is unavailable and ``allow_fallback`` is off.

    Example:
        >>> resolve_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"],
        ...                   allow_fallback=True)
        [('CPUExecutionProvider', {})]
    """
    entries = [(r, {}) if isinstance(r, str) else (r[0], dict(r[1])) for r in requested]
    if not entries:
        raise ModelError(
            f"{source}: no execution providers requested; this ONNX Runtime has {list(available)}"
        )
    missing = [name for name, _ in entries if name not in available]
    if missing and not allow_fallback:
        raise ModelError(
            f"{source}: execution providers {missing} are not available in this ONNX Runtime "
            f"(onnxruntime {ort.__version__} has {list(available)}); install the build that has them "
            "(e.g. pip install 'segstream[gpu]' for CUDA/TensorRT) or set model.allow_fallback: true"
        )
    kept = [
        (name, {k: _option_text(v) for k, v in opts.items()}) for name, opts in entries if name in available
    ]
    if missing:
        if not kept:
            kept = [("CPUExecutionProvider", {})]
        log.warning(
            "%s: execution providers %s are not available (this ONNX Runtime has %s); falling back to %s",
            source,
            missing,
            list(available),
            [name for name, _ in kept],
        )
    return kept


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _check_arguments(session_batch: int | None, intra_op_threads: int, inter_op_threads: int) -> None:
    if session_batch is not None and session_batch < 1:
        raise ValueError(f"session_batch must be >= 1, got {session_batch}")
    if intra_op_threads < 0 or inter_op_threads < 0:
        raise ValueError(
            f"thread counts must be >= 0, got intra_op_threads={intra_op_threads}, "
            f"inter_op_threads={inter_op_threads}"
        )


def _session_options(
    intra_op_threads: int, inter_op_threads: int, allow_spinning: bool
) -> ort.SessionOptions:
    """Full graph optimisation, the thread counts, parallel mode above one inter-op thread."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if inter_op_threads > 1 else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    spinning = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    return options


class OnnxSegmentationModel(LetterboxedBackend):
    """A YOLOv8-seg layout ONNX model in an ONNX Runtime session (a :class:`SegmentationBackend`).

    Args:
        package_path_or_weights: a model package folder (``weights.onnx`` + ``metadata.json``)
            or an ``.onnx`` file with Ultralytics ``metadata_props``.
        intra_op_threads: threads ONNX Runtime uses inside one operator (0: one per physical core).
        inter_op_threads: threads across operators; more than 1 switches the session to parallel
            execution mode (0: ONNX Runtime's default).
        providers: execution providers in order of preference: names or ``(name, options)``.
        allow_fallback: leave out unavailable providers (a warning) instead of raising.
        input_size: ``(h, w)`` to run at instead of the native size; only for models with dynamic
            spatial axes; multiples of the model's stride.
        allow_spinning: let idle ONNX Runtime threads spin (lower latency, but burns CPU between
            batches; off by default for a worker that shares its machine).
        warmup: run one padding-only frame at load time (checks the actual output layout and
            takes the first-run cost out of the first real frame).
        model_id: the id the model was loaded under, for error messages.
        session_batch: most frames per ``session.run`` (``None``: 1 for a single-threaded
            session on the CPU provider alone, else the whole batch; see the module's docstring).
            A fixed-batch model always runs its own batch size.
        letterbox: ``square`` (every frame into ``input_size``) or ``rect`` (each batch at the
            smallest stride-multiple rectangle holding its frames; dynamic-axes models only).

    Raises:
        ModelError: missing files, bad metadata, unloadable ONNX, unavailable provider, layout that
            does not match the class count, or an ``input_size`` a fixed-size model cannot take.
        ValueError: negative thread counts, a ``session_batch`` below 1, or an ``input_size`` that
            is not a positive multiple of the stride.
    """

    backend_name = "onnxruntime"

    def __init__(
        self,
        package_path_or_weights: str | Path,
        *,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        providers: Sequence[ProviderSpec] = ("CPUExecutionProvider",),
        allow_fallback: bool = False,
        input_size: tuple[int, int] | None = None,
        allow_spinning: bool = False,
        warmup: bool = True,
        model_id: str | None = None,
        session_batch: int | None = None,
        letterbox: str = "square",
    ) -> None:
        super().__init__()
        _check_arguments(session_batch, intra_op_threads, inter_op_threads)
        self.model_id = model_id
        self._source = model_id or str(package_path_or_weights)
        package = locate_package(package_path_or_weights)
        self.package_path: Path = package.root or package.weights_path
        self.weights_path: Path = package.require_onnx(self.backend_name)
        file_fields = read_metadata_file(package.metadata_path) if package.metadata_path else None

        self._requested = tuple(p if isinstance(p, str) else p[0] for p in providers)
        chosen = resolve_providers(
            providers, ort.get_available_providers(), allow_fallback=allow_fallback, source=self._source
        )
        options = _session_options(intra_op_threads, inter_op_threads, allow_spinning)
        self._session: ort.InferenceSession | None = self._open_session(options, chosen)
        self._read_layout(self._session, file_fields)
        self.input_size: tuple[int, int] = self._choose_input_size(input_size)
        self.letterbox_mode = self._choose_letterbox(letterbox)
        used = self.providers
        if session_batch is None and intra_op_threads == 1 and used == ["CPUExecutionProvider"]:
            session_batch = 1
        #: most frames per ``session.run`` (``None``: the whole batch); fixed-batch models: their size
        self.session_batch: int | None = self.signature.static_batch or session_batch
        self.chunk_size = self.session_batch
        self._threads = intra_op_threads
        log.info("model %s loaded: %s", self._source, self.info.summary())
        if warmup:
            self._warmup()

    def _open_session(
        self, options: ort.SessionOptions, chosen: list[tuple[str, dict[str, str]]]
    ) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                str(self.weights_path),
                sess_options=options,
                providers=[name for name, _ in chosen],
                provider_options=[opts for _, opts in chosen],
            )
        except ORT_ERRORS as exc:
            raise ModelError(
                f"{self._source}: cannot load ONNX model {self.weights_path}: {exc}",
                model_id=self.model_id,
            ) from exc

    def _read_layout(self, session: ort.InferenceSession, file_fields: dict[str, Any] | None) -> None:
        """Signature, metadata, output indices and input dtype of the loaded session."""
        try:
            self.signature: ModelSignature = read_signature(session)
            self.metadata: ModelMetadata = build_metadata(self.signature, file_fields, source=self._source)
            self._pred_index, self._proto_index = output_indices(self.signature, self.metadata.num_classes)
        except ModelError as exc:
            exc.model_id = self.model_id
            raise
        input_type = session.get_inputs()[0].type
        if input_type not in _INPUT_TYPES:
            raise ModelError(
                f"{self._source}: input must be float or float16, got {input_type}",
                model_id=self.model_id,
            )
        self._input_dtype = _INPUT_TYPES[input_type]

    @property
    def input_name(self) -> str:
        """Name of the ONNX image input."""
        return self.signature.input_name

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses."""
        return list(self._live_session().get_providers())

    @property
    def requested_providers(self) -> tuple[str, ...]:
        """The execution providers asked for, in order of preference."""
        return self._requested

    @property
    def session_options(self) -> ort.SessionOptions:
        """The options the session was created with (thread counts, optimisation level)."""
        return self._live_session().get_session_options()

    @property
    def info(self) -> BackendInfo:
        """Engine, precision, requested and used providers."""
        quantized = self.metadata.quantization is not None
        return BackendInfo(
            backend=self.backend_name,
            precision="int8" if quantized else _PRECISION[self._input_dtype],
            requested=self._requested,
            used=tuple(self.providers),
            weights=self.weights_path.name,
            details={"intra_op_threads": self._threads, "session_batch": self.session_batch or "batch"},
        )

    def infer(self, images: Sequence[np.ndarray]) -> list[RawSegmentation]:
        """Run the model on a batch of BGR frames of any sizes.

        Args:
            images: ``(H_i, W_i, 3)`` uint8 BGR frames. Not modified.

        Returns:
            One :class:`RawSegmentation` per frame, in order.

        Raises:
            ValueError: a frame is not an ``(H, W, 3)`` uint8 array.
            ModelError: ONNX Runtime failed, or the outputs do not have the expected layout.
        """
        return super().infer(images)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feed = batch if self._input_dtype is np.float32 else batch.astype(self._input_dtype)
        outputs = self.signature.output_names
        names = [outputs[self._pred_index], outputs[self._proto_index]]
        try:
            predictions, prototypes = self._live_session().run(names, {self.input_name: feed})
        except ORT_ERRORS as exc:
            raise ModelError(f"{self._source}: inference failed: {exc}", model_id=self.model_id) from exc
        return predictions, prototypes

    def _live_session(self) -> ort.InferenceSession:
        if self._session is None:
            raise ModelError(f"{self._source}: the model was closed", model_id=self.model_id)
        return self._session

    def close(self) -> None:
        """Drop the session (ONNX Runtime frees it when the last reference goes)."""
        super().close()
        self._session = None

    def __repr__(self) -> str:
        providers = self.providers if self._session is not None else "closed"
        return (
            f"OnnxSegmentationModel({self._source!r}, classes={self.num_classes}, "
            f"input_size={self.input_size}, providers={providers})"
        )
