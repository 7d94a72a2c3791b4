"""The local ONNX Runtime backend for YOLOv8/YOLO11-seg layout models.

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

It is blocking and thread-safe: call it from the worker's thread pool, never from the event loop.
ONNX Runtime's own threads are configured with ``intra_op_threads`` / ``inter_op_threads``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from worker.errors import ModelError
from worker.models.letterbox import LetterboxInfo, letterbox_batch
from worker.models.package import ModelMetadata, build_metadata, locate_package, read_metadata_file
from worker.models.signature import (
    ORT_ERRORS,
    ModelSignature,
    check_layout,
    check_outputs,
    read_signature,
)

__all__ = ["OnnxSegmentationModel", "RawSegmentation"]

_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True, slots=True)
class RawSegmentation:
    """The model's raw outputs for one frame.

    Attributes:
        predictions: ``(4 + C + 32, N)`` float32: ``cx, cy, w, h`` in input pixels, C class
            scores, 32 mask coefficients per candidate (a view into the batch output).
        prototypes: ``(32, ph, pw)`` float32 mask prototypes (``ph, pw`` usually ``h/4, w/4``).
        letterbox: how the frame was placed in the input (to map boxes and masks back).
    """

    predictions: np.ndarray
    prototypes: np.ndarray
    letterbox: LetterboxInfo


class OnnxSegmentationModel:
    """A YOLOv8-seg layout ONNX model in an ONNX Runtime session.

    Args:
        package_path_or_weights: a model package folder (``weights.onnx`` + ``metadata.json``)
            or an ``.onnx`` file with Ultralytics ``metadata_props``.
        intra_op_threads: threads ONNX Runtime uses inside one operator (0: one per physical core).
        inter_op_threads: threads across operators; more than 1 switches the session to parallel
            execution mode (0: ONNX Runtime's default).
        providers: ONNX Runtime execution providers in order of preference.
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

    Raises:
        ModelError: missing files, bad metadata, unloadable ONNX, unknown provider, layout that
            does not match the class count, or an ``input_size`` a fixed-size model cannot take.
        ValueError: negative thread counts, a ``session_batch`` below 1, or an ``input_size`` that
            is not a positive multiple of the stride.
    """

    def __init__(
        self,
        package_path_or_weights: str | Path,
        *,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        input_size: tuple[int, int] | None = None,
        allow_spinning: bool = False,
        warmup: bool = True,
        model_id: str | None = None,
        session_batch: int | None = None,
    ) -> None:
        if session_batch is not None and session_batch < 1:
            raise ValueError(f"session_batch must be >= 1, got {session_batch}")
        if intra_op_threads < 0 or inter_op_threads < 0:
            raise ValueError(
                f"thread counts must be >= 0, got intra_op_threads={intra_op_threads}, "
                f"inter_op_threads={inter_op_threads}"
            )
        self.model_id = model_id
        self._source = model_id or str(package_path_or_weights)
        package = locate_package(package_path_or_weights)
        self.package_path: Path = package.root or package.weights_path
        self.weights_path: Path = package.weights_path
        file_fields = read_metadata_file(package.metadata_path) if package.metadata_path else None

        providers = list(providers)
        available = ort.get_available_providers()
        unknown = [p for p in providers if p not in available]
        if not providers or unknown:
            raise ModelError(
                f"{self._source}: unavailable execution providers {unknown or providers}; "
                f"this ONNX Runtime has {available}",
                model_id=model_id,
            )
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
        try:
            self._session = ort.InferenceSession(
                str(package.weights_path), sess_options=options, providers=providers
            )
        except ORT_ERRORS as exc:
            raise ModelError(
                f"{self._source}: cannot load ONNX model {package.weights_path}: {exc}", model_id=model_id
            ) from exc

        try:
            self.signature: ModelSignature = read_signature(self._session)
            self.metadata: ModelMetadata = build_metadata(self.signature, file_fields, source=self._source)
            self._pred_index, self._proto_index = check_layout(self.signature, self.metadata.num_classes)
        except ModelError as exc:
            exc.model_id = model_id
            raise
        input_type = self._session.get_inputs()[0].type
        if input_type not in _INPUT_TYPES:
            raise ModelError(
                f"{self._source}: input must be float or float16, got {input_type}", model_id=model_id
            )
        self._input_dtype = _INPUT_TYPES[input_type]
        self.input_size: tuple[int, int] = self._choose_input_size(input_size)
        if session_batch is None and intra_op_threads == 1 and providers == ["CPUExecutionProvider"]:
            session_batch = 1
        #: most frames per ``session.run`` (``None``: the whole batch); fixed-batch models: their size
        self.session_batch: int | None = self.signature.static_batch or session_batch
        self._local = threading.local()
        if warmup:
            height, width = self.input_size
            self.infer([np.full((height, width, 3), self.metadata.pad_value, np.uint8)])

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in class-id order."""
        return self.metadata.class_names

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return self.metadata.num_classes

    @property
    def input_name(self) -> str:
        """Name of the ONNX image input."""
        return self.signature.input_name

    @property
    def dynamic_batch(self) -> bool:
        """Whether a whole batch goes through one ``session.run``."""
        return self.signature.dynamic_batch

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses."""
        return list(self._session.get_providers())

    @property
    def session_options(self) -> ort.SessionOptions:
        """The options the session was created with (thread counts, optimisation level)."""
        return self._session.get_session_options()

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
        if not images:
            return []
        # a fixed-batch model always runs its own size (the last chunk padded)
        capacity = self.signature.static_batch or min(self.session_batch or len(images), len(images))
        buffer = self._buffer(capacity)
        results: list[RawSegmentation] = []
        for start in range(0, len(images), capacity):
            chunk = images[start : start + capacity]
            batch, infos = letterbox_batch(chunk, self.input_size, self.metadata.pad_value, out=buffer)
            if self.signature.static_batch is not None and len(chunk) < capacity:
                buffer[len(chunk) :] = np.float32(self.metadata.pad_value) / np.float32(255.0)
                batch = buffer
            predictions, prototypes = self._run(batch)
            results.extend(
                RawSegmentation(predictions[i], prototypes[i], info) for i, info in enumerate(infos)
            )
        return results

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feed = batch if self._input_dtype is np.float32 else batch.astype(self._input_dtype)
        outputs = self.signature.output_names
        names = [outputs[self._pred_index], outputs[self._proto_index]]
        try:
            predictions, prototypes = self._session.run(names, {self.input_name: feed})
        except ORT_ERRORS as exc:
            raise ModelError(f"{self._source}: inference failed: {exc}", model_id=self.model_id) from exc
        try:
            check_outputs(
                predictions,
                prototypes,
                batch=batch.shape[0],
                num_classes=self.num_classes,
                source=self._source,
            )
        except ModelError as exc:
            exc.model_id = self.model_id
            raise
        return (
            np.asarray(predictions, dtype=np.float32),
            np.asarray(prototypes, dtype=np.float32),
        )

    def _buffer(self, capacity: int) -> np.ndarray:
        buffer: np.ndarray | None = getattr(self._local, "buffer", None)
        if buffer is None or buffer.shape[0] < capacity:
            height, width = self.input_size
            buffer = np.empty((capacity, 3, height, width), np.float32)
            self._local.buffer = buffer
        return buffer

    def _choose_input_size(self, requested: tuple[int, int] | None) -> tuple[int, int]:
        native = self.metadata.input_size
        if requested is None:
            return native
        height, width = (int(v) for v in requested)
        stride = self.metadata.stride
        if height <= 0 or width <= 0 or height % stride or width % stride:
            raise ValueError(f"input_size must be positive multiples of stride {stride}, got {requested}")
        if (height, width) != native and not self.metadata.dynamic_input:
            raise ModelError(
                f"{self._source}: input size is fixed at {list(native)} (no dynamic spatial axes), "
                f"cannot run at {[height, width]}",
                model_id=self.model_id,
            )
        return height, width

    def __repr__(self) -> str:
        return (
            f"OnnxSegmentationModel({self._source!r}, classes={self.num_classes}, "
            f"input_size={self.input_size}, providers={self.providers})"
        )
