"""The output layouts of segmentation models segstream reads, and how each is recognised.

One place for both backends (ONNX Runtime and OpenVINO) and for loading metadata without a session:
:func:`determine_layout` decides a graph's layout once, when the model is loaded, and
:func:`check_run_outputs` checks every run's arrays against it.

=============  ==========================================  ===========================================
layout         outputs                                     what Ultralytics emits it for
=============  ==========================================  ===========================================
``classic``    ``[B, 4 + C + 32, N]``: ``cx, cy, w, h``    YOLOv8/YOLO11-seg exports (static, dynamic,
               (input pixels), C class scores, 32 mask     static batch, FP16, simplified or not),
               coefficients per candidate (NMS to do)      YOLO26 exported with ``end2end=False``
``end2end``    ``[B, N, 6 + 32]``: rows ``x1, y1, x2, y2,  YOLO26 by default, and every ``nms=True``
               score, class``, 32 mask coefficients        export (NMS already done in the graph)
               (input pixels, best first)
=============  ==========================================  ===========================================

Both have the prototypes ``[B, 32, ph, pw]`` as the one rank-4 output.

Recognition, in this order (never from a coincidence of channel counts: a 264-class end-to-end model
has 4 + C + 32 = 300 = N):

1. **Declared**: ``metadata.json`` ``end2end``, else the export's ``metadata_props``: ``end2end``,
   ``nms`` or the ``args`` dict's ``nms`` / ``end2end`` (Ultralytics writes them). Any of them true
   means ``end2end``; all present and false means ``classic``. The graph's declared shapes must then
   fit that layout (dimensions a graph leaves dynamic are checked on every run).
2. **Undeclared** (a ``metadata.json`` without ``end2end`` and no such props): the declared shapes
   decide when only one layout fits them; when both fit (``[B, 4 + C + 32, 38]``) the model is refused
   with a message asking for ``end2end`` in ``metadata.json``; when the shapes are dynamic the model is
   ``classic`` (every Ultralytics export of an end-to-end head declares it), checked on its first run.

Anything else (a detection model without prototypes, a pose or OBB head, a rank that does not fit) is
refused with the shapes found and the layouts supported.
"""

from __future__ import annotations

from typing import Any, Literal

from worker.errors import ModelError
from worker.models.signature import NUM_MASK_COEFFICIENTS, ModelSignature

__all__ = [
    "END2END_COLUMNS",
    "LAYOUTS",
    "OutputLayout",
    "check_run_outputs",
    "determine_layout",
    "output_indices",
    "supported_layouts",
]

#: the two layouts: candidates before NMS, or rows after the graph's own NMS
OutputLayout = Literal["classic", "end2end"]
LAYOUTS: tuple[OutputLayout, ...] = ("classic", "end2end")
#: columns of an end-to-end row: x1, y1, x2, y2, score, class and the mask coefficients
END2END_COLUMNS = 6 + NUM_MASK_COEFFICIENTS


def supported_layouts(num_classes: int) -> str:
    """The layouts in words, for error messages."""
    c = num_classes
    return (
        f"supported: classic [B, 4 + C + {NUM_MASK_COEFFICIENTS} = {4 + c + NUM_MASK_COEFFICIENTS}, N] "
        f"or end2end [B, N, 6 + {NUM_MASK_COEFFICIENTS} = {END2END_COLUMNS}] for C = {c} classes, each "
        f"with prototypes [B, {NUM_MASK_COEFFICIENTS}, h/4, w/4]"
    )


def _outputs_text(signature: ModelSignature) -> str:
    return str(
        {
            name: list(shape)
            for name, shape in zip(signature.output_names, signature.output_shapes, strict=True)
        }
    )


def output_indices(signature: ModelSignature, num_classes: int) -> tuple[int, int]:
    """``(predictions index, prototypes index)``: the one rank-3 and the one rank-4 output.

    Raises:
        ModelError: not exactly one output of each rank, or an input that is not ``[B, 3, h, w]``.
    """
    shape = signature.input_shape
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise ModelError(f"model input {signature.input_name!r} must be [B, 3, h, w], got {list(shape)}")
    ranks = [len(s) for s in signature.output_shapes]
    if ranks.count(3) != 1 or ranks.count(4) != 1:
        raise ModelError(
            f"model outputs {_outputs_text(signature)} are not a segmentation head: expected one rank-3 "
            f"predictions output and one rank-4 prototypes output; {supported_layouts(num_classes)}"
        )
    return ranks.index(3), ranks.index(4)


def determine_layout(
    signature: ModelSignature, num_classes: int, declared_end2end: bool | None
) -> tuple[OutputLayout, int, int]:
    """Decide the graph's layout (see the module docstring) and check its declared shapes.

    Args:
        signature: the graph's interface.
        num_classes: C, the number of class names.
        declared_end2end: what the metadata says (None: it says nothing).

    Returns:
        ``(layout, predictions index, prototypes index)``.

    Raises:
        ModelError: the outputs fit neither layout, not the declared one, or both (undeclared).
    """
    pred_index, proto_index = output_indices(signature, num_classes)
    pred = signature.output_shapes[pred_index]
    proto_channels = signature.output_shapes[proto_index][1]
    if isinstance(proto_channels, int) and proto_channels != NUM_MASK_COEFFICIENTS:
        raise ModelError(
            f"model output {signature.output_names[proto_index]!r} must have {NUM_MASK_COEFFICIENTS} "
            f"prototype channels, got {proto_channels} (outputs {_outputs_text(signature)}); "
            f"{supported_layouts(num_classes)}"
        )
    channels = 4 + num_classes + NUM_MASK_COEFFICIENTS
    fits_classic = not isinstance(pred[1], int) or pred[1] == channels
    fits_end2end = not isinstance(pred[2], int) or pred[2] == END2END_COLUMNS
    name = signature.output_names[pred_index]
    if declared_end2end is True:
        if not fits_end2end:
            raise ModelError(
                f"the metadata declares an end-to-end head (end2end/nms) but output {name!r} is "
                f"{list(pred)}, not [B, N, {END2END_COLUMNS}] (rows x1, y1, x2, y2, score, class, "
                f"{NUM_MASK_COEFFICIENTS} mask coefficients); outputs {_outputs_text(signature)}"
            )
        return "end2end", pred_index, proto_index
    if declared_end2end is False:
        if not fits_classic:
            raise ModelError(
                f"model output {name!r} has {pred[1]} channels but {num_classes} class names need "
                f"4 + {num_classes} + {NUM_MASK_COEFFICIENTS} = {channels} (outputs "
                f"{_outputs_text(signature)}); {supported_layouts(num_classes)}"
            )
        return "classic", pred_index, proto_index
    static = isinstance(pred[1], int) and isinstance(pred[2], int)
    if static and fits_classic and fits_end2end:
        raise ModelError(
            f"output {name!r} {list(pred)} fits both layouts (classic with {num_classes} classes and "
            f'end2end); the metadata does not say which: set "end2end": true or false in metadata.json'
        )
    if fits_classic and (not fits_end2end or not static):
        return "classic", pred_index, proto_index
    if fits_end2end:
        return "end2end", pred_index, proto_index
    raise ModelError(
        f"model output {name!r} {list(pred)} fits no layout: it has {pred[1]} channels but "
        f"{num_classes} class names need 4 + {num_classes} + {NUM_MASK_COEFFICIENTS} = {channels} "
        f"(classic), and its rows do not have {END2END_COLUMNS} columns (end2end); outputs "
        f"{_outputs_text(signature)}; {supported_layouts(num_classes)}"
    )


def check_run_outputs(
    predictions: Any,
    prototypes: Any,
    *,
    layout: OutputLayout,
    batch: int,
    num_classes: int,
    source: str,
) -> None:
    """Check the arrays one run produced (covers the dimensions a graph leaves dynamic).

    Raises:
        ModelError: a shape does not match the layout (the message says what was expected, and how
            to declare the other layout when the arrays fit it).
    """
    channels = 4 + num_classes + NUM_MASK_COEFFICIENTS
    shape = tuple(predictions.shape)
    if layout == "classic" and (predictions.ndim != 3 or shape[:2] != (batch, channels)):
        hint = ""
        if predictions.ndim == 3 and shape[0] == batch and shape[2] == END2END_COLUMNS:
            hint = '; it looks like an end-to-end head: declare it with "end2end": true in metadata.json'
        raise ModelError(
            f"{source}: predictions output has shape {shape}, expected ({batch}, {channels}, N) for "
            f"{num_classes} classes (4 + {num_classes} + {NUM_MASK_COEFFICIENTS}){hint}"
        )
    if layout == "end2end" and (predictions.ndim != 3 or (shape[0], shape[2]) != (batch, END2END_COLUMNS)):
        raise ModelError(
            f"{source}: predictions output has shape {shape}, expected ({batch}, N, {END2END_COLUMNS}) "
            f"for an end-to-end head (x1, y1, x2, y2, score, class, {NUM_MASK_COEFFICIENTS} coefficients)"
        )
    if prototypes.ndim != 4 or tuple(prototypes.shape[:2]) != (batch, NUM_MASK_COEFFICIENTS):
        raise ModelError(
            f"{source}: prototypes output has shape {tuple(prototypes.shape)}, expected "
            f"({batch}, {NUM_MASK_COEFFICIENTS}, h/4, w/4)"
        )
