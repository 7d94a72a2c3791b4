"""The one seam between the step and an inference engine: :class:`SegmentationBackend`.

The step (``worker.step.executor``), the CLI, the benchmarks and the training evaluation see a model
only through this protocol. A backend takes BGR frames of any sizes, letterboxes them into its input
size and returns, per frame, the raw outputs (:class:`RawSegmentation`) in one of the layouts of
``worker.models.layout`` (``classic`` YOLOv8/YOLO11-seg candidates, or ``end2end`` rows of a YOLO26 /
``nms=True`` export), tagged with that layout, with the letterbox geometry needed to map them back to
the frame; ``worker.step.postprocess.postprocess_raw`` takes both.

Backends (``worker.models.registry.BACKENDS``): ``onnxruntime``
(:class:`worker.models.onnx_backend.OnnxSegmentationModel`, any execution provider) and ``openvino``
(:class:`worker.models.openvino_backend.OpenVinoSegmentationModel`, FP32/BF16/INT8 on the CPU).

:class:`LetterboxedBackend` holds what both share: per-thread pre-allocated input buffers, chunking
a batch into engine calls (a fixed-batch model always runs its own batch size, the last chunk padded),
the output-shape check (against the layout decided at load) and the input-size rules for
dynamic-axes models, including the rectangular letterbox (``model.letterbox: rect``: each batch runs at
the smallest stride-multiple rectangle holding its frames, see
``worker.models.letterbox.rect_input_size``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from worker.errors import ModelError
from worker.models.layout import OutputLayout, check_run_outputs
from worker.models.letterbox import LetterboxInfo, letterbox_batch, rect_input_size
from worker.models.package import ModelMetadata
from worker.models.signature import ModelSignature

__all__ = ["BackendInfo", "LetterboxMode", "LetterboxedBackend", "RawSegmentation", "SegmentationBackend"]

#: ``square``: every frame into the model's input size; ``rect``: the smallest stride-multiple
#: rectangle holding the batch's frames (dynamic-axes models only)
LetterboxMode = Literal["square", "rect"]


@dataclass(frozen=True, slots=True)
class RawSegmentation:
    """The model's raw outputs for one frame.

    Attributes:
        predictions: float32, a view into the batch output; by ``layout``:
            ``classic``: ``(4 + C + 32, N)``: ``cx, cy, w, h`` in input pixels, C class scores,
            32 mask coefficients per candidate (before NMS);
            ``end2end``: ``(N, 6 + 32)`` rows ``x1, y1, x2, y2`` in input pixels, score, class id,
            32 mask coefficients (after the model's own NMS).
        prototypes: ``(32, ph, pw)`` float32 mask prototypes (``ph, pw`` usually ``h/4, w/4``).
        letterbox: how the frame was placed in the input (to map boxes and masks back).
        layout: which of the two ``predictions`` is (``worker.models.layout``).
    """

    predictions: np.ndarray
    prototypes: np.ndarray
    letterbox: LetterboxInfo
    layout: OutputLayout = "classic"


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What was asked of an engine and what it actually runs (logged at start-up, a metric label).

    Attributes:
        backend: the registry name (``"onnxruntime"``, ``"openvino"``).
        precision: what the weights/arithmetic are (``"fp32"``, ``"fp16"``, ``"bf16"``, ``"int8"``).
        requested: the execution providers / device asked for, in order of preference.
        used: those actually in use, in order.
        weights: the file the engine loaded.
        details: engine-specific settings worth logging (threads, streams, cache folder).
    """

    backend: str
    precision: str
    requested: tuple[str, ...]
    used: tuple[str, ...]
    weights: str
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One log line's worth: ``openvino bf16 on CPU (asked CPU), weights.onnx, threads=1``."""
        extra = ", ".join(f"{k}={v}" for k, v in self.details.items())
        asked = ",".join(self.requested)
        text = f"{self.backend} {self.precision} on {','.join(self.used)} (asked {asked}), {self.weights}"
        return f"{text}, {extra}" if extra else text


@runtime_checkable
class SegmentationBackend(Protocol):
    """A loaded segmentation model, whatever engine runs it.

    ``infer`` is blocking and thread-safe: the worker calls it from its model threads (one batch per
    thread at a time), never from the event loop.
    """

    #: the id the model was loaded under (``"project/version"``), None for a path
    model_id: str | None
    #: what the model is: class names, native input size, padding, recommended parameters, provenance
    metadata: ModelMetadata
    #: ``(h, w)`` the frames are letterboxed into
    input_size: tuple[int, int]

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in class-id order."""
        ...

    @property
    def info(self) -> BackendInfo:
        """Engine, precision, requested and used providers/devices."""
        ...

    def infer(self, images: Sequence[np.ndarray]) -> list[RawSegmentation]:
        """Run the model on BGR frames of any sizes; one :class:`RawSegmentation` per frame, in order.

        Raises:
            ValueError: a frame is not an ``(H, W, 3)`` uint8 array.
            ModelError: the engine failed, or the outputs do not have the expected layout.
        """
        ...

    def close(self) -> None:
        """Release the engine's resources (sessions, compiled models); ``infer`` fails afterwards."""
        ...


class LetterboxedBackend:
    """Shared part of the backends: letterbox into per-thread buffers, chunks, output checks.

    Subclasses set ``model_id``, ``metadata``, ``signature``, ``input_size`` and ``chunk_size``
    (most frames per engine call, None for the whole batch) and implement :meth:`_run`.
    """

    model_id: str | None
    metadata: ModelMetadata
    signature: ModelSignature
    input_size: tuple[int, int]
    #: most frames per engine call (None: the whole batch); a fixed-batch model runs its own size
    chunk_size: int | None = None
    #: how frames are letterboxed (``rect`` only for dynamic-axes models)
    letterbox_mode: LetterboxMode = "square"
    _source: str
    _closed: bool = False

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in class-id order."""
        return self.metadata.class_names

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return self.metadata.num_classes

    @property
    def dynamic_batch(self) -> bool:
        """Whether the model's batch axis is dynamic."""
        return self.signature.dynamic_batch

    def infer(self, images: Sequence[np.ndarray]) -> list[RawSegmentation]:
        """Letterbox the frames and run them through the engine; see :class:`SegmentationBackend`."""
        if self._closed:
            raise ModelError(f"{self._source}: the model was closed", model_id=self.model_id)
        if not images:
            return []
        static = self.signature.static_batch
        capacity = static or min(self.chunk_size or len(images), len(images))
        layout = self.metadata.output_layout
        results: list[RawSegmentation] = []
        for start in range(0, len(images), capacity):
            chunk = images[start : start + capacity]
            size = self.input_size
            if self.letterbox_mode == "rect":
                size = rect_input_size([im.shape[:2] for im in chunk], self.input_size, self.metadata.stride)
            buffer = self._buffer(capacity, size)
            batch, infos = letterbox_batch(chunk, size, self.metadata.pad_value, out=buffer)
            if static is not None and len(chunk) < capacity:
                buffer[len(chunk) :] = np.float32(self.metadata.pad_value) / np.float32(255.0)
                batch = buffer
            predictions, prototypes = self._run(batch)
            try:
                check_run_outputs(
                    predictions,
                    prototypes,
                    layout=layout,
                    batch=batch.shape[0],
                    num_classes=self.num_classes,
                    source=self._source,
                )
            except ModelError as exc:
                exc.model_id = self.model_id
                raise
            predictions = np.asarray(predictions, dtype=np.float32)
            prototypes = np.asarray(prototypes, dtype=np.float32)
            results.extend(
                RawSegmentation(predictions[i], prototypes[i], info, layout) for i, info in enumerate(infos)
            )
        return results

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One engine call on a ``(B, 3, h, w)`` float32 batch: ``(predictions, prototypes)``."""
        raise NotImplementedError

    def close(self) -> None:
        """Mark the model closed; subclasses release their engine objects too."""
        self._closed = True

    def _buffer(self, capacity: int, size: tuple[int, int]) -> np.ndarray:
        """This thread's ``(capacity, 3, h, w)`` input buffer (a view of one flat allocation, so the
        rectangular letterbox's smaller inputs reuse the memory of the largest)."""
        height, width = size
        needed = capacity * 3 * height * width
        flat: np.ndarray | None = getattr(self._local, "buffer", None)
        if flat is None or flat.size < needed:
            max_h, max_w = self.input_size
            flat = np.empty(max(needed, capacity * 3 * max_h * max_w), np.float32)
            self._local.buffer = flat
        return flat[:needed].reshape(capacity, 3, height, width)

    def _choose_letterbox(self, mode: str) -> LetterboxMode:
        if mode not in ("square", "rect"):
            raise ValueError(f"letterbox must be 'square' or 'rect', got {mode!r}")
        if mode == "rect" and not self.metadata.dynamic_input:
            raise ModelError(
                f"{self._source}: model.letterbox: rect needs a model with dynamic spatial axes; this "
                f"one's input is fixed at {list(self.metadata.input_size)} (use letterbox: square)",
                model_id=self.model_id,
            )
        return "rect" if mode == "rect" else "square"

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

    def _warmup(self) -> None:
        height, width = self.input_size
        self.infer([np.full((height, width, 3), self.metadata.pad_value, np.uint8)])
