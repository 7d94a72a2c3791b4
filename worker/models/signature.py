"""The graph's interface (inputs, outputs, metadata_props); the layouts are in ``worker.models.layout``.

The interface is read from an ONNX Runtime session (:func:`read_signature`), from the ONNX file
itself without any session (:func:`read_onnx_signature`, with the ``onnx`` package: a parse of the
protobuf, weights stored outside the file left unread), or from an OpenVINO model
(:func:`read_ir_signature` / :func:`signature_of_openvino_model`, parsed, not compiled).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from worker.errors import ModelError

__all__ = [
    "NUM_MASK_COEFFICIENTS",
    "ORT_ERRORS",
    "Dim",
    "ModelSignature",
    "check_layout",
    "check_outputs",
    "read_ir_signature",
    "read_onnx_signature",
    "read_signature",
    "signature_of_openvino_model",
]

NUM_MASK_COEFFICIENTS = 32

#: exceptions ONNX Runtime raises for bad models and failed runs (they do not share a base class)
ORT_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeError,
    ValueError,
    OSError,
    *(
        getattr(_ort_state, name)
        for name in (
            "Fail",
            "InvalidArgument",
            "NoSuchFile",
            "NoModel",
            "EngineError",
            "RuntimeException",
            "InvalidProtobuf",
            "ModelLoaded",
            "NotImplemented",
            "InvalidGraph",
            "EPFail",
        )
        if hasattr(_ort_state, name)
    ),
)

#: one dimension of an ONNX tensor shape: an int when fixed, a name or None when dynamic
Dim = int | str | None


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """The ONNX graph's interface as a runtime sees it.

    Attributes:
        input_name: name of the image input.
        input_shape: shape of the image input, e.g. ``("batch", 3, 640, 640)``.
        output_names: names of the outputs, in graph order.
        output_shapes: shapes of the outputs, in graph order.
        metadata_props: the ONNX file's ``metadata_props``.
    """

    input_name: str
    input_shape: tuple[Dim, ...]
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[Dim, ...], ...]
    metadata_props: Mapping[str, str] = field(default_factory=dict)

    @property
    def dynamic_batch(self) -> bool:
        """Whether the batch axis of the input is dynamic."""
        return not isinstance(self.input_shape[0], int)

    @property
    def static_batch(self) -> int | None:
        """The fixed batch size of the input, or None when dynamic."""
        dim = self.input_shape[0]
        return dim if isinstance(dim, int) else None

    @property
    def dynamic_spatial(self) -> bool:
        """Whether either spatial axis of the input is dynamic."""
        return len(self.input_shape) != 4 or not all(isinstance(d, int) for d in self.input_shape[2:])

    @property
    def static_input_size(self) -> tuple[int, int] | None:
        """``(h, w)`` of the input when both are fixed, else None."""
        if len(self.input_shape) != 4:
            return None
        h, w = self.input_shape[2], self.input_shape[3]
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    def output_index(self, rank: int) -> int:
        """Index of the only output with the given rank.

        Raises:
            ModelError: when no output or several outputs have that rank.
        """
        found = [i for i, shape in enumerate(self.output_shapes) if len(shape) == rank]
        if len(found) != 1:
            raise ModelError(
                f"expected exactly one rank-{rank} output, got outputs "
                f"{dict(zip(self.output_names, self.output_shapes, strict=True))}"
            )
        return found[0]


def read_signature(session: ort.InferenceSession) -> ModelSignature:
    """Read a session's interface: its single input, its outputs and its ``metadata_props``.

    Raises:
        ModelError: the graph does not have exactly one input.
    """
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"model must have exactly one input, got {[i.name for i in inputs]}")
    outputs = session.get_outputs()
    return ModelSignature(
        input_name=inputs[0].name,
        input_shape=_as_dims(inputs[0].shape),
        output_names=tuple(o.name for o in outputs),
        output_shapes=tuple(_as_dims(o.shape) for o in outputs),
        metadata_props=dict(session.get_modelmeta().custom_metadata_map),
    )


def read_onnx_signature(path: str | Path) -> ModelSignature:
    """Read an ONNX file's interface and ``metadata_props`` without creating an inference session.

    Raises:
        ModelError: the file cannot be parsed as an ONNX model, or it has not exactly one input.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (OSError, DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load ONNX model {path}: {exc}") from exc
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(f"model must have exactly one input, got {[i.name for i in inputs]}")

    def dims(value: Any) -> tuple[Dim, ...]:
        shape = value.type.tensor_type.shape
        out: list[Dim] = []
        for d in shape.dim:
            if d.HasField("dim_value"):
                out.append(int(d.dim_value))
            else:
                out.append(d.dim_param or None)
        return tuple(out)

    return ModelSignature(
        input_name=inputs[0].name,
        input_shape=dims(inputs[0]),
        output_names=tuple(o.name for o in proto.graph.output),
        output_shapes=tuple(dims(o) for o in proto.graph.output),
        metadata_props={p.key: p.value for p in proto.metadata_props},
    )


def signature_of_openvino_model(model: Any) -> ModelSignature:
    """The interface of an ``openvino.Model`` (dynamic dimensions as None; no metadata_props).

    Raises:
        ModelError: the model has not exactly one input.
    """
    if len(model.inputs) != 1:
        raise ModelError(f"model must have exactly one input, got {[i.get_any_name() for i in model.inputs]}")

    def dims(port: Any) -> tuple[Dim, ...]:
        shape = port.get_partial_shape()
        if shape.rank.is_dynamic:
            return ()
        return tuple(int(d.get_length()) if d.is_static else None for d in shape)

    def name(port: Any, index: int) -> str:
        try:
            return str(port.get_any_name())
        except RuntimeError:  # an unnamed port
            return f"output{index}"

    return ModelSignature(
        input_name=name(model.inputs[0], 0),
        input_shape=dims(model.inputs[0]),
        output_names=tuple(name(o, i) for i, o in enumerate(model.outputs)),
        output_shapes=tuple(dims(o) for o in model.outputs),
        metadata_props={},
    )


def read_ir_signature(path: str | Path) -> ModelSignature:
    """Read an OpenVINO IR's interface (``read_model``: parsed, never compiled).

    Raises:
        ModelError: OpenVINO is not installed, or the IR cannot be read.
    """
    try:
        import openvino as ov
    except ImportError as exc:
        raise ModelError(
            f"{path} is an OpenVINO IR; reading it needs the openvino package (pip install "
            "'segstream[openvino]')"
        ) from exc
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as exc:
        raise ModelError(f"cannot load OpenVINO model {path}: {exc}") from exc
    return signature_of_openvino_model(model)


def check_layout(
    signature: ModelSignature, num_classes: int, declared_end2end: bool | None = False
) -> tuple[int, int]:
    """Check a graph's declared shapes against a layout; see :func:`worker.models.layout.determine_layout`.

    Returns:
        ``(predictions_index, prototypes_index)``: which output is which.

    Raises:
        ModelError: the input is not ``[B, 3, h, w]`` or the outputs do not fit the layout.
    """
    from worker.models.layout import determine_layout

    _, pred_index, proto_index = determine_layout(signature, num_classes, declared_end2end)
    return pred_index, proto_index


def check_outputs(
    predictions: Any, prototypes: Any, *, batch: int, num_classes: int, source: str, layout: str = "classic"
) -> None:
    """Check one run's arrays; see :func:`worker.models.layout.check_run_outputs`.

    Raises:
        ModelError: a shape does not match.
    """
    from worker.models.layout import check_run_outputs

    check_run_outputs(
        predictions,
        prototypes,
        layout="end2end" if layout == "end2end" else "classic",
        batch=batch,
        num_classes=num_classes,
        source=source,
    )


def _as_dims(shape: Sequence[Any]) -> tuple[Dim, ...]:
    return tuple(d if isinstance(d, int) or d is None else str(d) for d in shape)
