"""Tiny YOLOv8-seg layout ONNX models with known outputs, for tests.

The models built here have exactly the interface of an Ultralytics/Roboflow segmentation export:

- input ``images`` ``[B, 3, h, w]`` float32 RGB in [0, 1];
- ``output0`` ``[B, 4 + C + 32, N]``: ``cx, cy, w, h`` (input pixels), C class scores, 32 coefficients;
- ``output1`` ``[B, 32, h/4, w/4]``: mask prototypes;

but their values are whatever the test chooses:

- ``candidates`` (``[4 + C + 32, N]``, see :func:`candidate_rows`) are emitted for every frame;
- ``prototypes`` (``[32, ph, pw]``) are emitted for every frame (nearest-resized to ``h/4 x w/4``
  when the input size differs, e.g. with dynamic spatial axes);
- optionally the outputs depend on the frame: ``input_gain`` adds ``mean(frame) * input_gain`` to
  the candidates and ``prototype_gain`` adds ``avgpool4(mean over channels(frame)) * gain[k]`` to
  prototype k, so frames that differ give different outputs (batching is testable) and the
  prototypes show where the frame's content sits in the letterboxed input.

Typical use::

    rows = candidate_rows(boxes_cxcywh=[[32, 32, 16, 16]], class_scores=[[0.9, 0.1]])
    model = build_segmentation_model(2, candidates=rows, input_size=(64, 64))
    write_model_package(tmp_path / "parts" / "1", model, package_metadata(["bolt", "nut"], (64, 64)))

Or an Ultralytics-style file with ``metadata_props``::

    model = build_segmentation_model(2, metadata_props=ultralytics_metadata_props(["a", "b"], (64, 64)))
    save_model(model, tmp_path / "model.onnx")
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "NUM_COEFFICIENTS",
    "build_segmentation_model",
    "candidate_rows",
    "package_metadata",
    "save_model",
    "ultralytics_metadata_props",
    "write_model_package",
]

NUM_COEFFICIENTS = 32
OPSET = 17
IR_VERSION = 8


def candidate_rows(
    boxes_cxcywh: Sequence[Sequence[float]] | np.ndarray,
    class_scores: Sequence[Sequence[float]] | np.ndarray,
    coefficients: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> np.ndarray:
    """Stack candidates into the ``output0`` layout of one frame.

    Args:
        boxes_cxcywh: ``(N, 4)`` boxes ``cx, cy, w, h`` in input pixels.
        class_scores: ``(N, C)`` class scores in [0, 1].
        coefficients: ``(N, 32)`` mask coefficients; zeros when None.

    Returns:
        ``(4 + C + 32, N)`` float32 array (one column per candidate).

    Raises:
        ValueError: inconsistent shapes.
    """
    boxes = np.asarray(boxes_cxcywh, np.float32).reshape(-1, 4)
    scores = np.asarray(class_scores, np.float32)
    if scores.ndim != 2 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"class_scores must be (N={boxes.shape[0]}, C), got {scores.shape}")
    coefs = (
        np.zeros((boxes.shape[0], NUM_COEFFICIENTS), np.float32)
        if coefficients is None
        else np.asarray(coefficients, np.float32)
    )
    if coefs.shape != (boxes.shape[0], NUM_COEFFICIENTS):
        raise ValueError(f"coefficients must be ({boxes.shape[0]}, {NUM_COEFFICIENTS}), got {coefs.shape}")
    return np.ascontiguousarray(np.concatenate([boxes, scores, coefs], axis=1).T)


def build_segmentation_model(
    num_classes: int,
    *,
    candidates: np.ndarray | None = None,
    prototypes: np.ndarray | None = None,
    input_size: tuple[int, int] = (64, 64),
    dynamic_batch: bool = True,
    static_batch: int = 1,
    dynamic_spatial: bool = False,
    input_gain: np.ndarray | None = None,
    prototype_gain: Sequence[float] | np.ndarray | None = None,
    metadata_props: Mapping[str, str] | None = None,
    output_channels: int | None = None,
    hide_channel_count: bool = False,
) -> onnx.ModelProto:
    """Build a YOLOv8-seg layout ONNX model whose outputs are known.

    Args:
        num_classes: C.
        candidates: ``(4 + C + 32, N)`` float32 rows emitted for every frame; default: one
            all-zero candidate.
        prototypes: ``(32, ph, pw)`` float32 emitted for every frame; default zeros of
            ``input_size / 4``. Resized (nearest) to ``h/4 x w/4`` when the input differs.
        input_size: ``(h, w)`` of the input (the fixed size, or the nominal one when dynamic).
        dynamic_batch: batch axis named ``"batch"``; else fixed at ``static_batch``.
        static_batch: the fixed batch size when ``dynamic_batch`` is false.
        dynamic_spatial: spatial axes named ``"height"`` / ``"width"``.
        input_gain: optional ``(4 + C + 32, N)``: ``output0 += mean(frame) * input_gain``.
        prototype_gain: optional ``(32,)``: ``output1[k] += avgpool4(channel mean) * gain[k]``.
        metadata_props: ONNX ``metadata_props`` to store (see :func:`ultralytics_metadata_props`).
        output_channels: declare and emit this many ``output0`` channels instead of ``4 + C + 32``
            (for layout-mismatch tests); the candidates are cut or zero-padded to it.
        hide_channel_count: make ``output0``'s channel axis dynamic (a runtime reshape), so a
            runtime cannot know the channel count before running the model.

    Returns:
        A checked ``onnx.ModelProto`` (opset 17).

    Raises:
        ValueError: inconsistent shapes.
    """
    height, width = input_size
    if height % 4 or width % 4:
        raise ValueError(f"input_size must be multiples of 4, got {input_size}")
    channels = 4 + num_classes + NUM_COEFFICIENTS
    rows = np.zeros((channels, 1), np.float32) if candidates is None else np.asarray(candidates, np.float32)
    if rows.ndim != 2 or rows.shape[0] != channels:
        raise ValueError(f"candidates must be ({channels}, N), got {rows.shape}")
    gain = None if input_gain is None else np.asarray(input_gain, np.float32)
    if gain is not None and gain.shape != rows.shape:
        raise ValueError(f"input_gain must be {rows.shape}, got {gain.shape}")
    if output_channels is not None:
        rows = _fit_rows(rows, output_channels)
        gain = None if gain is None else _fit_rows(gain, output_channels)
        channels = output_channels
    count = rows.shape[1]
    protos = (
        np.zeros((NUM_COEFFICIENTS, height // 4, width // 4), np.float32)
        if prototypes is None
        else np.asarray(prototypes, np.float32)
    )
    if protos.ndim != 3 or protos.shape[0] != NUM_COEFFICIENTS:
        raise ValueError(f"prototypes must be ({NUM_COEFFICIENTS}, ph, pw), got {protos.shape}")

    batch_dim: int | str = "batch" if dynamic_batch else static_batch
    h_dim: int | str = "height" if dynamic_spatial else height
    w_dim: int | str = "width" if dynamic_spatial else width
    ph_dim: int | str = "proto_height" if dynamic_spatial else height // 4
    pw_dim: int | str = "proto_width" if dynamic_spatial else width // 4

    inits = [
        numpy_helper.from_array(rows[None], "candidates"),
        numpy_helper.from_array(protos[None], "prototypes"),
        numpy_helper.from_array(np.array([0], np.int64), "i0"),
        numpy_helper.from_array(np.array([1], np.int64), "i1"),
        numpy_helper.from_array(np.array([2], np.int64), "i2"),
        numpy_helper.from_array(np.array([4], np.int64), "i4"),
        numpy_helper.from_array(np.array([channels, count], np.int64), "pred_tail"),
        numpy_helper.from_array(np.array([1, NUM_COEFFICIENTS], np.int64), "proto_head"),
        numpy_helper.from_array(np.array([NUM_COEFFICIENTS], np.int64), "proto_channels"),
        numpy_helper.from_array(np.array([4], np.int64), "four"),
    ]
    nodes = [
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Slice", ["shape", "i0", "i1"], ["batch"]),
        helper.make_node("Slice", ["shape", "i2", "i4"], ["hw"]),
        helper.make_node("Div", ["hw", "four"], ["proto_hw"]),
        helper.make_node("Concat", ["batch", "pred_tail"], ["pred_shape"], axis=0),
        helper.make_node("Expand", ["candidates", "pred_shape"], ["pred_base"]),
        # prototypes: nearest-resize the constant to (h/4, w/4), then repeat over the batch
        helper.make_node("Concat", ["proto_head", "proto_hw"], ["proto_one_shape"], axis=0),
        helper.make_node("Resize", ["prototypes", "", "", "proto_one_shape"], ["proto_one"], mode="nearest"),
        helper.make_node("Concat", ["batch", "proto_channels", "proto_hw"], ["proto_shape"], axis=0),
        helper.make_node("Expand", ["proto_one", "proto_shape"], ["proto_base"]),
    ]
    pred_out = "pred_raw" if hide_channel_count else "output0"
    if gain is None:
        nodes.append(helper.make_node("Identity", ["pred_base"], [pred_out]))
    else:
        inits.append(numpy_helper.from_array(gain[None], "input_gain"))
        nodes += [
            helper.make_node("ReduceMean", ["images"], ["frame_mean4"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Squeeze", ["frame_mean4", "i2"], ["frame_mean"]),  # [B, 1, 1]
            helper.make_node("Mul", ["frame_mean", "input_gain"], ["pred_delta"]),
            helper.make_node("Add", ["pred_base", "pred_delta"], [pred_out]),
        ]
    if hide_channel_count:
        inits.append(numpy_helper.from_array(np.array([-1, count], np.int64), "hidden_tail"))
        nodes += [
            helper.make_node("Concat", ["batch", "hidden_tail"], ["hidden_shape"], axis=0),
            helper.make_node("Reshape", ["pred_raw", "hidden_shape"], ["output0"]),
        ]
    if prototype_gain is None:
        nodes.append(helper.make_node("Identity", ["proto_base"], ["output1"]))
    else:
        pgain = np.asarray(prototype_gain, np.float32).reshape(1, NUM_COEFFICIENTS, 1, 1)
        inits.append(numpy_helper.from_array(pgain, "prototype_gain"))
        nodes += [
            helper.make_node("ReduceMean", ["images"], ["gray"], axes=[1], keepdims=1),
            helper.make_node("AveragePool", ["gray"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
            helper.make_node("Mul", ["pooled", "prototype_gain"], ["proto_delta"]),
            helper.make_node("Add", ["proto_base", "proto_delta"], ["output1"]),
        ]
    graph = helper.make_graph(
        nodes,
        "yolov8_seg_test_model",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch_dim, 3, h_dim, w_dim])],
        [
            helper.make_tensor_value_info(
                "output0",
                TensorProto.FLOAT,
                [batch_dim, "channels" if hide_channel_count else channels, count],
            ),
            helper.make_tensor_value_info(
                "output1", TensorProto.FLOAT, [batch_dim, NUM_COEFFICIENTS, ph_dim, pw_dim]
            ),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="segstream-tests"
    )
    model.ir_version = IR_VERSION
    if metadata_props:
        helper.set_model_props(model, dict(metadata_props))
    onnx.checker.check_model(model)
    return model


def ultralytics_metadata_props(
    class_names: Sequence[str],
    imgsz: tuple[int, int] = (640, 640),
    *,
    stride: int = 32,
    task: str = "segment",
    **extra: str,
) -> dict[str, str]:
    """``metadata_props`` as an Ultralytics export writes them (all values are strings).

    Example:
        >>> ultralytics_metadata_props(["person", "car"], (640, 480))["names"]
        "{0: 'person', 1: 'car'}"
    """
    props = {
        "names": str(dict(enumerate(class_names))),
        "imgsz": str(list(imgsz)),
        "stride": str(stride),
        "task": task,
        "batch": "1",
        "author": "Ultralytics",
        "description": "Ultralytics YOLOv8n-seg model (segstream test)",
    }
    props.update(extra)
    return props


def package_metadata(
    class_names: Sequence[str], input_size: tuple[int, int] | None = None, **fields: Any
) -> dict[str, Any]:
    """A ``metadata.json`` document (schema version 1) for :func:`write_model_package`.

    Args:
        class_names: class names in id order.
        input_size: ``(h, w)``; left out when None.
        **fields: other schema fields (``pad_value``, ``stride``, ``recommended_parameters``...).
    """
    doc: dict[str, Any] = {"schema_version": 1, "task": "segment", "class_names": list(class_names)}
    if input_size is not None:
        doc["input_size"] = list(input_size)
    doc.update(fields)
    return doc


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Write a model to ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_model_package(
    folder: Path, model: onnx.ModelProto, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write a model package: ``folder/weights.onnx`` and, when given, ``folder/metadata.json``."""
    save_model(model, folder / "weights.onnx")
    if metadata is not None:
        (folder / "metadata.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return folder


def _fit_rows(rows: np.ndarray, channels: int) -> np.ndarray:
    if rows.shape[0] >= channels:
        return np.ascontiguousarray(rows[:channels])
    return np.concatenate([rows, np.zeros((channels - rows.shape[0], rows.shape[1]), np.float32)])
