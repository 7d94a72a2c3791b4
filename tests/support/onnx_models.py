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

End-to-end heads (YOLO26, ``nms=True`` exports): :func:`build_end2end_model` emits ``output0``
``[B, N, 6 + 32]`` rows (:func:`end2end_rows`: ``x1, y1, x2, y2, score, class``, coefficients) and the
same prototypes. ``half=True`` (both builders) stores the constants as float16 and makes the input and
outputs float16, as an Ultralytics ``half=True`` export does.
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
    "END2END_COLUMNS",
    "NUM_COEFFICIENTS",
    "build_end2end_head_model",
    "build_end2end_model",
    "build_segmentation_model",
    "candidate_rows",
    "end2end_rows",
    "package_metadata",
    "save_model",
    "ultralytics_metadata_props",
    "write_model_package",
]

NUM_COEFFICIENTS = 32
END2END_COLUMNS = 6 + NUM_COEFFICIENTS
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
    half: bool = False,
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
        half: float16 constants, input and outputs (an FP16 export).

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
    protos = (
        np.zeros((NUM_COEFFICIENTS, height // 4, width // 4), np.float32)
        if prototypes is None
        else np.asarray(prototypes, np.float32)
    )
    if protos.ndim != 3 or protos.shape[0] != NUM_COEFFICIENTS:
        raise ValueError(f"prototypes must be ({NUM_COEFFICIENTS}, ph, pw), got {protos.shape}")

    return _build_graph(
        rows,
        protos,
        input_size=input_size,
        dynamic_batch=dynamic_batch,
        static_batch=static_batch,
        dynamic_spatial=dynamic_spatial,
        input_gain=gain,
        prototype_gain=prototype_gain,
        metadata_props=metadata_props,
        hide_first_axis=hide_channel_count,
        half=half,
        name="yolov8_seg_test_model",
    )


def end2end_rows(
    boxes_xyxy: Sequence[Sequence[float]] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    class_ids: Sequence[int] | np.ndarray,
    coefficients: Sequence[Sequence[float]] | np.ndarray | None = None,
    *,
    count: int | None = None,
) -> np.ndarray:
    """Rows of an end-to-end head for one frame: ``(count, 6 + 32)`` float32.

    Args:
        boxes_xyxy: ``(K, 4)`` boxes ``x1, y1, x2, y2`` in input pixels.
        scores: ``(K,)`` scores.
        class_ids: ``(K,)`` class ids (stored as floats, as the models emit them).
        coefficients: ``(K, 32)`` mask coefficients; zeros when None.
        count: rows in all (Ultralytics: ``max_det``, 300); the rest are zeros, as the models pad.

    Raises:
        ValueError: inconsistent shapes.
    """
    boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    k = boxes.shape[0]
    score = np.asarray(scores, np.float32).reshape(k, 1)
    cls = np.asarray(class_ids, np.float32).reshape(k, 1)
    coefs = (
        np.zeros((k, NUM_COEFFICIENTS), np.float32)
        if coefficients is None
        else np.asarray(coefficients, np.float32).reshape(k, NUM_COEFFICIENTS)
    )
    rows = np.concatenate([boxes, score, cls, coefs], axis=1)
    total = k if count is None else count
    if total < k:
        raise ValueError(f"count {total} is less than the {k} rows given")
    return np.concatenate([rows, np.zeros((total - k, END2END_COLUMNS), np.float32)])


def build_end2end_model(
    rows: np.ndarray,
    *,
    prototypes: np.ndarray | None = None,
    input_size: tuple[int, int] = (64, 64),
    dynamic_batch: bool = True,
    static_batch: int = 1,
    dynamic_spatial: bool = False,
    metadata_props: Mapping[str, str] | None = None,
    half: bool = False,
    hide_row_count: bool = False,
) -> onnx.ModelProto:
    """Build an end-to-end head ONNX model: ``output0`` ``[B, N, 6 + 32]`` is ``rows`` for every frame.

    Args:
        rows: ``(N, 6 + 32)`` float32 (see :func:`end2end_rows`).
        prototypes: ``(32, ph, pw)``; default zeros of ``input_size / 4``.
        input_size, dynamic_batch, static_batch, dynamic_spatial, metadata_props, half: as for
            :func:`build_segmentation_model`.
        hide_row_count: declare ``output0``'s row axis dynamic (``[B, "num_dets", 38]``).

    Raises:
        ValueError: inconsistent shapes.
    """
    height, width = input_size
    table = np.asarray(rows, np.float32)
    if table.ndim != 2 or table.shape[1] != END2END_COLUMNS:
        raise ValueError(f"rows must be (N, {END2END_COLUMNS}), got {table.shape}")
    protos = (
        np.zeros((NUM_COEFFICIENTS, height // 4, width // 4), np.float32)
        if prototypes is None
        else np.asarray(prototypes, np.float32)
    )
    return _build_graph(
        table,
        protos,
        input_size=input_size,
        dynamic_batch=dynamic_batch,
        static_batch=static_batch,
        dynamic_spatial=dynamic_spatial,
        input_gain=None,
        prototype_gain=None,
        metadata_props=metadata_props,
        hide_first_axis=hide_row_count,
        half=half,
        name="yolo26_seg_end2end_test_model",
    )


def build_end2end_head_model(
    candidates: np.ndarray,
    num_classes: int,
    *,
    max_det: int,
    prototypes: np.ndarray | None = None,
    input_size: tuple[int, int] = (64, 64),
    metadata_props: Mapping[str, str] | None = None,
) -> onnx.ModelProto:
    """An end-to-end head built the way a YOLO26 export computes its rows (not a constant table).

    From ``candidates`` (``(4 + C + 32, N)``: ``x1, y1, x2, y2``, C scores, 32 coefficients): transpose
    to ``[B, N, 4 + C + 32]``, slice boxes / scores / coefficients (``x[..., :4]``, ``x[..., 4:4 + C]``,
    ``x[..., 4 + C:]``), ``TopK`` of each candidate's best score, ``GatherElements`` of the three slices
    at the kept indices, class = argmax, then ``Concat`` into ``[B, max_det, 6 + 32]`` rows, best first.
    The ``Slice -> GatherElements`` pattern is the one OpenVINO's CPU plugin mis-folds (see
    ``worker.models.openvino_backend.materialize_sliced_gathers``).
    """
    height, width = input_size
    channels = 4 + num_classes + NUM_COEFFICIENTS
    cand = np.asarray(candidates, np.float32)
    if cand.ndim != 2 or cand.shape[0] != channels or cand.shape[1] < max_det:
        raise ValueError(f"candidates must be ({channels}, N >= {max_det}), got {cand.shape}")
    protos = (
        np.zeros((NUM_COEFFICIENTS, height // 4, width // 4), np.float32)
        if prototypes is None
        else np.asarray(prototypes, np.float32)
    )
    count = cand.shape[1]
    big = np.iinfo(np.int64).max

    def i64(name: str, *values: int) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, np.int64), name)

    inits = [
        numpy_helper.from_array(cand[None], "cand"),
        numpy_helper.from_array(protos[None], "protos"),
        i64("i0", 0), i64("i1", 1), i64("minus1", -1),
        i64("cand_tail", channels, count), i64("proto_tail", NUM_COEFFICIENTS, height // 4, width // 4),
        i64("s0", 0), i64("e4", 4), i64("s4", 4), i64("eC", 4 + num_classes), i64("sC", 4 + num_classes),
        i64("eBig", big), i64("k", max_det),
        i64("tail4", max_det, 4), i64("tailC", max_det, num_classes), i64("tailM", max_det, NUM_COEFFICIENTS),
    ]  # fmt: skip
    node = helper.make_node
    nodes = [
        node("Shape", ["images"], ["shape"]),
        node("Slice", ["shape", "i0", "i1"], ["batch"]),
        node("Concat", ["batch", "cand_tail"], ["cand_shape"], axis=0),
        node("Expand", ["cand", "cand_shape"], ["cand_b"]),
        node("Transpose", ["cand_b"], ["rows"], perm=[0, 2, 1]),  # [B, N, 4 + C + 32]
        node("Slice", ["rows", "s0", "e4", "minus1"], ["boxes"]),
        node("Slice", ["rows", "s4", "eC", "minus1"], ["scores"]),
        node("Slice", ["rows", "sC", "eBig", "minus1"], ["coefs"]),
        node("ReduceMax", ["scores"], ["best"], axes=[-1], keepdims=0),
        node("TopK", ["best", "k"], ["top_values", "top_index"], axis=-1),
        node("Unsqueeze", ["top_index", "minus1"], ["index1"]),
    ]
    for part, tail in (("boxes", "tail4"), ("scores", "tailC"), ("coefs", "tailM")):
        nodes += [
            node("Concat", ["batch", tail], [f"{part}_ishape"], axis=0),
            node("Expand", ["index1", f"{part}_ishape"], [f"{part}_index"]),
            node("GatherElements", [part, f"{part}_index"], [f"{part}_k"], axis=1),
        ]
    nodes += [
        node("ReduceMax", ["scores_k"], ["score_k"], axes=[-1], keepdims=1),
        node("ArgMax", ["scores_k"], ["class_i"], axis=-1, keepdims=1),
        node("Cast", ["class_i"], ["class_k"], to=TensorProto.FLOAT),
        node("Concat", ["boxes_k", "score_k", "class_k", "coefs_k"], ["output0"], axis=-1),
        node("Concat", ["batch", "proto_tail"], ["proto_shape"], axis=0),
        node("Expand", ["protos", "proto_shape"], ["output1"]),
    ]
    graph = helper.make_graph(
        nodes,
        "yolo26_seg_end2end_head_test_model",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, height, width])],
        [
            helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", max_det, END2END_COLUMNS]),
            helper.make_tensor_value_info(
                "output1", TensorProto.FLOAT, ["batch", NUM_COEFFICIENTS, height // 4, width // 4]
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


def _build_graph(
    table: np.ndarray,
    protos: np.ndarray,
    *,
    input_size: tuple[int, int],
    dynamic_batch: bool,
    static_batch: int,
    dynamic_spatial: bool,
    input_gain: np.ndarray | None,
    prototype_gain: Sequence[float] | np.ndarray | None,
    metadata_props: Mapping[str, str] | None,
    hide_first_axis: bool,
    half: bool,
    name: str,
) -> onnx.ModelProto:
    """``output0 = table`` (``[B, a, b]``) and ``output1`` = the prototypes, per frame."""
    height, width = input_size
    if height % 4 or width % 4:
        raise ValueError(f"input_size must be multiples of 4, got {input_size}")
    if protos.ndim != 3 or protos.shape[0] != NUM_COEFFICIENTS:
        raise ValueError(f"prototypes must be ({NUM_COEFFICIENTS}, ph, pw), got {protos.shape}")
    first, second = table.shape
    gain = input_gain
    store = np.float16 if half else np.float32
    elem = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    batch_dim: int | str = "batch" if dynamic_batch else static_batch
    h_dim: int | str = "height" if dynamic_spatial else height
    w_dim: int | str = "width" if dynamic_spatial else width
    ph_dim: int | str = "proto_height" if dynamic_spatial else height // 4
    pw_dim: int | str = "proto_width" if dynamic_spatial else width // 4

    inits = [
        numpy_helper.from_array(table[None].astype(store), "candidates_stored"),
        numpy_helper.from_array(protos[None].astype(store), "prototypes_stored"),
        numpy_helper.from_array(np.array([0], np.int64), "i0"),
        numpy_helper.from_array(np.array([1], np.int64), "i1"),
        numpy_helper.from_array(np.array([2], np.int64), "i2"),
        numpy_helper.from_array(np.array([4], np.int64), "i4"),
        numpy_helper.from_array(np.array([first, second], np.int64), "pred_tail"),
        numpy_helper.from_array(np.array([1, NUM_COEFFICIENTS], np.int64), "proto_head"),
        numpy_helper.from_array(np.array([NUM_COEFFICIENTS], np.int64), "proto_channels"),
        numpy_helper.from_array(np.array([4], np.int64), "four"),
    ]
    nodes = [
        # the constants are computed on in float32 (as an FP16 export's graph casts where it must)
        helper.make_node("Cast", ["candidates_stored"], ["candidates"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["prototypes_stored"], ["prototypes"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["images"], ["images_f"], to=TensorProto.FLOAT),
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
    pred_out = "pred_raw" if hide_first_axis else "pred_f"
    if gain is None:
        nodes.append(helper.make_node("Identity", ["pred_base"], [pred_out]))
    else:
        inits.append(numpy_helper.from_array(gain[None], "input_gain"))
        nodes += [
            helper.make_node("ReduceMean", ["images_f"], ["frame_mean4"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Squeeze", ["frame_mean4", "i2"], ["frame_mean"]),  # [B, 1, 1]
            helper.make_node("Mul", ["frame_mean", "input_gain"], ["pred_delta"]),
            helper.make_node("Add", ["pred_base", "pred_delta"], [pred_out]),
        ]
    if hide_first_axis:
        inits.append(numpy_helper.from_array(np.array([-1, second], np.int64), "hidden_tail"))
        nodes += [
            helper.make_node("Concat", ["batch", "hidden_tail"], ["hidden_shape"], axis=0),
            helper.make_node("Reshape", ["pred_raw", "hidden_shape"], ["pred_f"]),
        ]
    if prototype_gain is None:
        nodes.append(helper.make_node("Identity", ["proto_base"], ["proto_f"]))
    else:
        pgain = np.asarray(prototype_gain, np.float32).reshape(1, NUM_COEFFICIENTS, 1, 1)
        inits.append(numpy_helper.from_array(pgain, "prototype_gain"))
        nodes += [
            helper.make_node("ReduceMean", ["images_f"], ["gray"], axes=[1], keepdims=1),
            helper.make_node("AveragePool", ["gray"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
            helper.make_node("Mul", ["pooled", "prototype_gain"], ["proto_delta"]),
            helper.make_node("Add", ["proto_base", "proto_delta"], ["proto_f"]),
        ]
    nodes += [
        helper.make_node("Cast", ["pred_f"], ["output0"], to=elem),
        helper.make_node("Cast", ["proto_f"], ["output1"], to=elem),
    ]
    first_dim: int | str = (
        ("channels" if name.startswith("yolov8") else "num_dets") if hide_first_axis else first
    )
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("images", elem, [batch_dim, 3, h_dim, w_dim])],
        [
            helper.make_tensor_value_info("output0", elem, [batch_dim, first_dim, second]),
            helper.make_tensor_value_info("output1", elem, [batch_dim, NUM_COEFFICIENTS, ph_dim, pw_dim]),
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
    batch: int = 1,
    end2end: bool | None = None,
    nms: bool | None = None,
    **extra: str,
) -> dict[str, str]:
    """``metadata_props`` as an Ultralytics export writes them (all values are strings).

    ``end2end`` adds the ``end2end`` prop (YOLO26 exports: ``"True"``); ``nms`` adds the ``args``
    dict an ``nms=True`` export of YOLOv8/YOLO11 carries (``"{'half': False, ..., 'nms': True}"``).

    Example:
        >>> ultralytics_metadata_props(["person", "car"], (640, 480))["names"]
        "{0: 'person', 1: 'car'}"
    """
    props = {
        "names": str(dict(enumerate(class_names))),
        "imgsz": str(list(imgsz)),
        "stride": str(stride),
        "task": task,
        "batch": str(batch),
        "author": "Ultralytics",
        "description": "Ultralytics YOLOv8n-seg model (segstream test)",
    }
    if end2end is not None:
        props["end2end"] = str(end2end)
    if nms is not None:
        props["args"] = str({"half": False, "dynamic": False, "simplify": True, "nms": nms, "batch": batch})
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
