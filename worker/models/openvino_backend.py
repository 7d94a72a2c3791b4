"""The OpenVINO backend: the same ONNX files (and OpenVINO IR packages) at BF16, FP32 or INT8.

``OpenVinoSegmentationModel`` reads a package's OpenVINO IR (``weights.xml``, e.g. the INT8 package
``segstream quantize`` writes, or an Ultralytics ``*_openvino_model`` export) when it has one, else
its ``weights.onnx``; fixes the spatial input axes at the chosen input size (the batch axis stays
dynamic when the model's is) and compiles it for ``device``.

- **Precision**: ``auto`` is BF16 on a CPU that runs it natively (OpenVINO's
  ``OPTIMIZATION_CAPABILITIES`` lists ``BF16``: AVX512-BF16 or AMX), else FP32; ``fp32``, ``bf16``,
  ``fp16`` force it (``INFERENCE_PRECISION_HINT``). A quantized (INT8) model runs its quantized
  layers in INT8 whatever the hint, the rest at the hint.
- **Requests in flight**: each calling thread has its own ``num_requests`` infer requests (an
  ``AsyncInferQueue``); a batch is cut into chunks spread over them, on ``NUM_STREAMS = num_requests``
  CPU streams of ``threads`` threads each. Outputs are copied out of the requests before they are
  reused.
- **Compiled-model cache**: with ``cache_dir`` OpenVINO stores the compiled model there
  (``CACHE_DIR``) and a restart loads it instead of compiling again (``info.details`` says which).

Measured on the 2-core VM (AVX512-BF16, shared), bundled model at 480x480, one thread, alternated with
ONNX Runtime FP32: BF16 1.4-1.6x the frames/s (CPU time per frame 1.43-1.51x less), segm mAP50 on the
demo clip 0.9198 vs 0.9192 (``benchmarks/backends.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from worker.errors import ModelError
from worker.models.backend import BackendInfo, LetterboxedBackend, RawSegmentation
from worker.models.layout import output_indices
from worker.models.package import (
    ModelMetadata,
    build_metadata,
    locate_package,
    read_metadata_file,
    read_package_signature,
)
from worker.models.signature import ModelSignature, signature_of_openvino_model

__all__ = ["OpenVinoSegmentationModel", "cpu_supports_bf16", "materialize_sliced_gathers"]

log = logging.getLogger(__name__)

_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_TYPE_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "float": "fp32", "bfloat16": "bf16"}


def _openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise ModelError(
            "model.backend openvino needs the openvino package: pip install 'segstream[openvino]'"
        ) from exc
    return ov


def cpu_supports_bf16(core: Any | None = None) -> bool:
    """Whether OpenVINO's CPU plugin runs BF16 natively on this machine."""
    core = core or _openvino().Core()
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return False


def materialize_sliced_gathers(model: Any) -> int:
    """Work around OpenVINO's CPU plugin refusing end-to-end heads (YOLO26): returns the inputs rewritten.

    An end-to-end head picks its rows with ``GatherElements(Slice(x), indices)``: ``x[..., :4]`` gathered
    with indices ``[B, 300, 4]``. OpenVINO 2026.4's CPU transformations fold the ``Slice`` into the
    ``GatherElements``, which then sees the whole ``[B, 2100, 116]`` tensor and fails shape inference
    ("data and indices must have equal or intersecting dimensions"). The same values taken with a
    ``Gather`` of the slice's explicit indices are not folded; outputs are unchanged (only slices with
    constant starts and steps over static axes are rewritten).
    """
    from openvino import opset8

    rewritten = 0
    for op in model.get_ops():
        if op.get_type_name() != "GatherElements":
            continue
        data = op.input_value(0)
        source = data.get_node()
        if source.get_type_name() != "Slice" or data.get_partial_shape().rank.is_dynamic:
            continue
        rank = data.get_partial_shape().rank.get_length()
        whole, part = source.input_value(0).get_partial_shape(), data.get_partial_shape()
        starts, steps, axes = (_constant_values(source, i) for i in (1, 3, 4))
        if starts is None or steps is None or axes is None:
            continue
        steps = steps * len(starts) if len(steps) == 1 else steps
        if len(steps) != len(starts) or len(axes) != len(starts):
            continue
        if not all(whole[int(a) % rank].is_static and part[int(a) % rank].is_static for a in axes):
            continue
        value = source.input_value(0)
        for start, step, axis in zip(starts, steps, axes, strict=True):
            axis = int(axis) % rank
            kept = np.arange(whole[axis].get_length())[int(start) :: int(step)][: part[axis].get_length()]
            value = opset8.gather(value, kept.astype(np.int64), np.int64(axis)).output(0)
        op.input(0).replace_source_output(value)
        rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    return rewritten


def _constant_values(node: Any, index: int) -> list[int] | None:
    """The values of a node's constant input (also a ``Broadcast`` of a constant), else None."""
    source = node.input_value(index).get_node()
    if (
        source.get_type_name() == "Broadcast"
        and source.input_value(0).get_node().get_type_name() == "Constant"
    ):
        source = source.input_value(0).get_node()
    if source.get_type_name() != "Constant":
        return None
    return [int(v) for v in np.asarray(source.get_data()).reshape(-1)]


def _check_arguments(precision: str, threads: int, num_requests: int, session_batch: int | None) -> None:
    if threads < 0 or num_requests < 1 or (session_batch is not None and session_batch < 1):
        raise ValueError(
            f"need threads >= 0, num_requests >= 1, session_batch >= 1; got {threads}, "
            f"{num_requests}, {session_batch}"
        )
    if precision not in ("auto", *_HINTS):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")


def _precision_hint(core: Any, device: str, precision: str) -> str:
    """The precision to ask for: ``auto`` on the CPU is bf16 where it has it, else fp32."""
    if precision != "auto":
        return precision
    if device != "CPU":
        return "auto"
    return "bf16" if cpu_supports_bf16(core) else "fp32"


def _compile_config(device: str, hint: str, threads: int, num_requests: int) -> dict[str, Any]:
    """Latency hint, the precision hint, and on the CPU one stream per request and the threads."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if hint != "auto":
        config["INFERENCE_PRECISION_HINT"] = _HINTS[hint]
    if device == "CPU":
        config["NUM_STREAMS"] = num_requests
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenVinoSegmentationModel(LetterboxedBackend):
    """A YOLOv8-seg layout model compiled by OpenVINO (a :class:`SegmentationBackend`).

    Args:
        package_path_or_weights: a package folder, an ``.onnx`` file, an IR ``.xml``, or an
            Ultralytics OpenVINO export folder.
        device: OpenVINO device name (``CPU``, ``GPU``, ``AUTO:GPU,CPU``...).
        precision: ``auto`` | ``fp32`` | ``bf16`` | ``fp16`` (see the module docstring).
        threads: ``INFERENCE_NUM_THREADS`` (0: OpenVINO's default).
        num_requests: infer requests per calling thread, and CPU streams.
        cache_dir: compiled-model cache folder (created when missing), or None.
        input_size: ``(h, w)`` to run at instead of the native size (dynamic-axes models only).
        session_batch: most frames per infer request (None: 1 with one thread or several
            requests, else the whole batch; a fixed-batch model runs its own size).
        warmup: run one padding-only frame at load time.
        model_id: the id the model was loaded under, for messages.
        letterbox: ``square`` or ``rect`` (dynamic-axes models only: the spatial axes then stay
            dynamic in the compiled model).

    Raises:
        ModelError: missing files, bad metadata, a layout mismatch, a device OpenVINO lacks, or a
            model it cannot compile.
        ValueError: bad thread/request counts or input size.
    """

    backend_name = "openvino"

    def __init__(
        self,
        package_path_or_weights: str | Path,
        *,
        device: str = "CPU",
        precision: str = "auto",
        threads: int = 0,
        num_requests: int = 1,
        cache_dir: str | Path | None = None,
        input_size: tuple[int, int] | None = None,
        session_batch: int | None = None,
        warmup: bool = True,
        model_id: str | None = None,
        letterbox: str = "square",
    ) -> None:
        super().__init__()
        _check_arguments(precision, threads, num_requests, session_batch)
        ov = _openvino()
        self.model_id = model_id
        self._source = model_id or str(package_path_or_weights)
        package = locate_package(package_path_or_weights)
        self.package_path: Path = package.root or package.weights_path
        self.weights_path: Path = package.ir_path or package.weights_path
        file_fields = read_metadata_file(package.metadata_path) if package.metadata_path else None
        # metadata_props (ONNX) / metadata.yaml (IR) without compiling anything
        props = read_package_signature(package, prefer_ir=package.ir_path is not None).metadata_props

        core = ov.Core()
        self._check_device(core, device)
        model = self._read_model(core)
        self._read_layout(model, props, file_fields)
        self.input_size: tuple[int, int] = self._choose_input_size(input_size)
        self.letterbox_mode = self._choose_letterbox(letterbox)
        if self.metadata.output_layout == "end2end" and materialize_sliced_gathers(model):
            log.debug("%s: end-to-end head: sliced GatherElements inputs made explicit", self._source)
        self._reshape_input(ov, model)

        self._quantized = any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
        hint = _precision_hint(core, device, precision)
        config = _compile_config(device, hint, threads, num_requests)
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        self._compiled: Any = self._compile(core, model, device, config)
        self._requested = (device,)
        self._device = device
        self._precision = self._compiled_precision(hint)
        self._num_requests = num_requests
        self._threads = threads
        self._cache_dir = None if cache_dir is None else str(cache_dir)
        self._from_cache = self._property("LOADED_FROM_CACHE", False)
        if session_batch is None and (threads == 1 or num_requests > 1):
            session_batch = 1
        self.session_batch: int | None = self.signature.static_batch or session_batch
        # one letterboxed chunk feeds every request at once: session_batch frames each
        static = self.signature.static_batch
        self.chunk_size = static or (session_batch * num_requests if session_batch else None)
        self._queues = threading.local()
        log.info("model %s loaded: %s", self._source, self.info.summary())
        if warmup:
            self._warmup()

    def _check_device(self, core: Any, device: str) -> None:
        """Raise unless ``device`` is a virtual device or one this machine has."""
        if device.split(":")[0] in ("AUTO", "MULTI", "HETERO"):
            return
        if device.split(".")[0] not in core.available_devices:
            raise ModelError(
                f"{self._source}: OpenVINO device {device!r} is not available; this machine has "
                f"{core.available_devices}",
                model_id=self.model_id,
            )

    def _read_model(self, core: Any) -> Any:
        try:
            return core.read_model(str(self.weights_path))
        except RuntimeError as exc:
            raise ModelError(
                f"{self._source}: cannot load model {self.weights_path}: {exc}", model_id=self.model_id
            ) from exc

    def _read_layout(self, model: Any, props: Mapping[str, str], file_fields: dict[str, Any] | None) -> None:
        """Signature, metadata and output indices of the read (not yet compiled) model."""
        try:
            graph = signature_of_openvino_model(model)
            self.signature: ModelSignature = ModelSignature(
                graph.input_name, graph.input_shape, graph.output_names, graph.output_shapes, props
            )
            self.metadata: ModelMetadata = build_metadata(self.signature, file_fields, source=self._source)
            self._pred_index, self._proto_index = output_indices(self.signature, self.metadata.num_classes)
        except ModelError as exc:
            exc.model_id = self.model_id
            raise

    def _reshape_input(self, ov: Any, model: Any) -> None:
        """Fix the input to the run size (``square``) or keep the spatial axes dynamic (``rect``)."""
        height, width = self.input_size if self.letterbox_mode == "square" else (-1, -1)
        batch_dim = self.signature.static_batch or -1
        try:
            model.reshape({model.inputs[0]: ov.PartialShape([batch_dim, 3, height, width])})
        except RuntimeError as exc:
            raise ModelError(
                f"{self._source}: cannot reshape the input to [{batch_dim}, 3, {height}, {width}]: {exc}",
                model_id=self.model_id,
            ) from exc

    def _compile(self, core: Any, model: Any, device: str, config: dict[str, Any]) -> Any:
        try:
            return core.compile_model(model, device, config)
        except RuntimeError as exc:
            raise ModelError(
                f"{self._source}: OpenVINO cannot compile the model for {device} with {config}: {exc}",
                model_id=self.model_id,
            ) from exc

    def _property(self, name: str, default: Any) -> Any:
        try:
            return self._compiled.get_property(name)
        except RuntimeError:
            return default

    def _compiled_precision(self, hint: str) -> str:
        if self._quantized:
            return "int8"
        value = self._property("INFERENCE_PRECISION_HINT", None)
        name = str(getattr(value, "get_type_name", lambda: value)()) if value is not None else hint
        return _TYPE_NAMES.get(name, hint if hint != "auto" else name)

    @property
    def info(self) -> BackendInfo:
        """Engine, precision (``int8`` for a quantized model), device, threads, streams, cache."""
        details: dict[str, Any] = {"threads": self._threads or "default", "requests": self._num_requests}
        if self._cache_dir is not None:
            details["cache"] = "loaded" if self._from_cache else "compiled"
        used = tuple(str(d) for d in self._property("EXECUTION_DEVICES", [self._device]))
        return BackendInfo(
            backend=self.backend_name,
            precision=self._precision,
            requested=self._requested,
            used=used,
            weights=self.weights_path.name,
            details=details,
        )

    @property
    def loaded_from_cache(self) -> bool:
        """Whether the compiled model came from ``cache_dir`` instead of being compiled."""
        return bool(self._from_cache)

    def infer(self, images: Sequence[np.ndarray]) -> list[RawSegmentation]:
        """Run the model on BGR frames of any sizes; see :class:`SegmentationBackend`."""
        return super().infer(images)

    def _queue(self) -> Any:
        queue = getattr(self._queues, "queue", None)
        if queue is None:
            if self._compiled is None:
                raise ModelError(f"{self._source}: the model was closed", model_id=self.model_id)
            queue = _openvino().AsyncInferQueue(self._compiled, self._num_requests)
            self._queues.queue = queue
        return queue

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        queue = self._queue()
        pred, proto = self._pred_index, self._proto_index
        count = batch.shape[0]
        # the chunk is spread over the requests, at most session_batch frames each
        per = self.session_batch or -(-count // self._num_requests)
        parts = [(start, min(start + per, count)) for start in range(0, count, per)]
        results: list[tuple[np.ndarray, np.ndarray] | BaseException | None] = [None] * len(parts)

        def done(request: Any, index: int) -> None:
            try:  # copy: the request's buffers are reused by its next run
                results[index] = (
                    np.array(request.get_output_tensor(pred).data, dtype=np.float32),
                    np.array(request.get_output_tensor(proto).data, dtype=np.float32),
                )
            except RuntimeError as exc:  # pragma: no cover - OpenVINO failing mid-run
                results[index] = exc

        queue.set_callback(done)
        try:
            for index, (start, stop) in enumerate(parts):
                queue.start_async({0: batch[start:stop]}, index)
            queue.wait_all()
        except RuntimeError as exc:
            raise ModelError(f"{self._source}: inference failed: {exc}", model_id=self.model_id) from exc
        outputs: list[tuple[np.ndarray, np.ndarray]] = []
        for result in results:
            if not isinstance(result, tuple):
                raise ModelError(f"{self._source}: inference failed: {result}", model_id=self.model_id)
            outputs.append(result)
        if len(outputs) == 1:
            return outputs[0]
        return (
            np.concatenate([o[0] for o in outputs]),
            np.concatenate([o[1] for o in outputs]),
        )

    def close(self) -> None:
        """Drop the compiled model and this thread's requests."""
        super().close()
        self._compiled = None
        self._queues = threading.local()

    def __repr__(self) -> str:
        return (
            f"OpenVinoSegmentationModel({self._source!r}, classes={self.num_classes}, "
            f"input_size={self.input_size}, {self._precision} on {self._device})"
        )
