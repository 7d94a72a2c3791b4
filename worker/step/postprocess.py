"""Post-processing of one frame's raw segmentation outputs into ``Detections``.

Order (``shared/spec/step.md`` section 4): confidence threshold (score = best class score, kept when
``score >= threshold``), class filter, ``max_candidates``, NMS (true IoU, suppressed when
``IoU > iou_threshold``, per class or class-agnostic), ``max_detections``, boxes mapped to the frame,
then masks decoded on each box's crop.

End-to-end heads (``worker.models.layout``: YOLO26, ``nms=True`` exports) give rows after the model's
own NMS: ``x1, y1, x2, y2, score, class``, 32 coefficients (:func:`postprocess_end2end`). The
confidence threshold (per class too), the class filter, ``max_detections`` (best scores first) and the
mask modes apply to the rows exactly as above; ``iou_threshold``, ``class_agnostic_nms`` and
``max_candidates`` have no effect (the model already decided; the runner says so once at start-up).
:func:`postprocess_raw` takes a backend's ``RawSegmentation`` of either layout.

Empty masks: one rule for every step version. A detection whose mask is empty after decoding (no pixel
of its crop above 0.5, or a box thinner than a pixel) is dropped, after ``max_detections``, as the
reference's serializers drop an instance without a polygon: v1-v3 polygons and v4 RLE masks publish
the same instances, and the annotated frames, summaries and observers see only those.

Coordinate conventions. Pixel ``i`` spans ``[i, i + 1)``; its centre is ``i + 0.5``. A frame point
``X`` lies at input point ``X * scale + pad_x`` and at prototype point ``(X * scale + pad_x) / stride``
(``stride = w / pw``). Prototype cell ``k`` is sampled at its centre ``k + 0.5`` (``align_corners=False``,
as ``cv2.resize`` and ``torch.nn.functional.interpolate`` do, edges clamped). A pixel belongs to an
instance's crop when its centre lies in the box (``x1 <= i + 0.5 < x2``); pixels outside are 0. Mask
probability ``> 0.5`` is tested as logit ``> 0``.

Mask modes:
    * ``accurate``: logits bilinearly sampled at each frame pixel centre, then thresholded.
    * ``fast``: thresholded on the prototype grid; each frame pixel takes the cell holding its centre.
    * ``tradeoff``: an intermediate grid of resolution ``proto + (frame - proto) * f`` (cells per
      prototype unit), whose origin moves linearly from the prototype grid's (``f = 0``) to the frame's
      (``f = 1``); logits sampled bilinearly at its cell centres, thresholded, and each frame pixel takes
      the cell holding its centre. ``f = 0`` equals ``fast`` and ``f = 1`` equals ``accurate`` bit for bit.

Every mode works on the box's region of the prototypes (logits computed for that region only) and on
the box's crop of the frame, so the cost per instance grows with the box area, not the frame's.

Example:
    >>> import numpy as np
    >>> from worker.models.letterbox import compute_letterbox
    >>> preds = np.zeros((4 + 1 + 32, 1), np.float32)
    >>> preds[:5, 0] = [320, 320, 64, 64, 0.9]  # one box, class 0
    >>> preds[5, 0] = 1.0  # mask coefficient 0
    >>> protos = np.ones((32, 160, 160), np.float32)
    >>> box = compute_letterbox((640, 640), (640, 640))
    >>> dets = postprocess_frame(preds, protos, box, PostprocessParams())
    >>> dets.xyxy.tolist(), dets.masks.crops[0].shape, bool(dets.masks.crops[0].all())
    ([[288.0, 288.0, 352.0, 352.0]], (64, 64), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from worker.models.letterbox import map_boxes_to_frame
from worker.step.defaults import MASK_DECODE_MODES, STEP_DEFAULTS, MaskDecodeMode
from worker.step.detections import Detections, MaskCrops

__all__ = [
    "IGNORED_BY_END2END",
    "LetterboxLike",
    "MaskDecodeMode",
    "PostprocessParams",
    "RawLike",
    "decode_masks",
    "drop_empty_masks",
    "filter_candidates",
    "filter_rows",
    "map_boxes_to_frame",
    "nms",
    "postprocess_end2end",
    "postprocess_frame",
    "postprocess_raw",
]

#: the step parameters an end-to-end head has already applied (NMS, its candidate limit)
IGNORED_BY_END2END = ("iou_threshold", "class_agnostic_nms", "max_candidates")

FloatArray = npt.NDArray[np.float32]


class LetterboxLike(Protocol):
    """What post-processing needs of ``worker.models.letterbox.LetterboxInfo``."""

    @property
    def scale(self) -> float: ...  # frame pixels -> input pixels
    @property
    def pad_x(self) -> float: ...  # left padding, input pixels
    @property
    def pad_y(self) -> float: ...  # top padding, input pixels
    @property
    def orig_size(self) -> tuple[int, int]: ...  # (H, W) of the frame
    @property
    def input_size(self) -> tuple[int, int]: ...  # (h, w) of the model input


class RawLike(Protocol):
    """What :func:`postprocess_raw` needs of ``worker.models.backend.RawSegmentation``."""

    @property
    def predictions(self) -> FloatArray: ...
    @property
    def prototypes(self) -> FloatArray: ...
    @property
    def letterbox(self) -> LetterboxLike: ...
    @property
    def layout(self) -> str: ...


@dataclass(frozen=True, eq=False)  # array fields: compare by identity
class PostprocessParams:
    """Resolved post-processing parameters for one frame.

    Attributes:
        confidence: a threshold in [0, 1], or float32 ``(C,)`` per-class thresholds (``best`` mode).
        class_ids: allowed class ids (int ``(K,)``), or None for all classes.
        iou_threshold: NMS suppresses a box whose IoU with a better kept box is ``> iou_threshold``.
        max_detections: at most this many instances after NMS.
        class_agnostic_nms: NMS over all classes instead of per class.
        max_candidates: at most this many candidates enter NMS (highest scores).
        mask_decode_mode: ``accurate``, ``tradeoff`` or ``fast``.
        tradeoff_factor: in [0, 1], used by ``tradeoff``.

    Raises:
        ValueError: a value is out of range.
    """

    confidence: float | npt.NDArray[np.float32] = STEP_DEFAULTS["confidence"]
    class_ids: npt.NDArray[np.int64] | None = None
    iou_threshold: float = STEP_DEFAULTS["iou_threshold"]
    max_detections: int = STEP_DEFAULTS["max_detections"]
    class_agnostic_nms: bool = STEP_DEFAULTS["class_agnostic_nms"]
    max_candidates: int = STEP_DEFAULTS["max_candidates"]
    mask_decode_mode: MaskDecodeMode = STEP_DEFAULTS["mask_decode_mode"]
    tradeoff_factor: float = STEP_DEFAULTS["tradeoff_factor"]

    def __post_init__(self) -> None:
        conf = np.asarray(self.confidence, dtype=np.float32)
        if conf.ndim > 1 or not np.all((conf >= 0) & (conf <= 1)):
            raise ValueError(f"confidence must be a value or 1-D array in [0, 1], got {self.confidence!r}")
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {self.iou_threshold}")
        if self.max_detections < 1 or self.max_candidates < 1:
            raise ValueError(f"max_detections and max_candidates must be > 0, got {self}")
        if self.mask_decode_mode not in MASK_DECODE_MODES:
            raise ValueError(
                f"mask_decode_mode must be accurate/tradeoff/fast, got {self.mask_decode_mode!r}"
            )
        if not 0.0 <= self.tradeoff_factor <= 1.0:
            raise ValueError(f"tradeoff_factor must be in [0, 1], got {self.tradeoff_factor}")


def filter_candidates(
    predictions: FloatArray, num_classes: int, params: PostprocessParams
) -> tuple[npt.NDArray[np.intp], FloatArray, npt.NDArray[np.int64]]:
    """Steps 1-3: confidence threshold, class filter, ``max_candidates``.

    Args:
        predictions: float32 ``(4 + C + M, N)`` raw model output for one frame. Not modified.
        num_classes: C.
        params: thresholds, allowed classes, ``max_candidates``.

    Returns:
        ``(index, score, class_id)``: kept columns of ``predictions`` (intp ``(K,)``), their scores
        (float32 ``(K,)``) and classes (int64 ``(K,)``), highest score first (ties: lower column first).

    Raises:
        ValueError: per-class thresholds do not have C entries.

    Example:
        Scores ``[[0.5, 0.39]]`` with confidence 0.4 keep column 0 only.
    """
    class_scores = predictions[4 : 4 + num_classes]
    class_id = np.argmax(class_scores, axis=0)
    score = np.take_along_axis(class_scores, class_id[None], axis=0)[0]
    thr = np.asarray(params.confidence, dtype=np.float32)
    if thr.ndim == 1:
        if thr.shape != (num_classes,):
            raise ValueError(f"per-class confidence: expected shape ({num_classes},), got {thr.shape}")
        thr = thr[class_id]
    keep = score >= thr
    if params.class_ids is not None:
        keep &= np.isin(class_id, np.asarray(params.class_ids))
    index = np.flatnonzero(keep)
    order = np.argsort(-score[index], kind="stable")[: params.max_candidates]
    index = index[order]
    return index, score[index].astype(np.float32), class_id[index].astype(np.int64)


def nms(
    xyxy: npt.NDArray[np.floating],
    score: npt.NDArray[np.floating],
    class_id: npt.NDArray[np.integer],
    iou_threshold: float,
    *,
    class_agnostic: bool = False,
    max_keep: int | None = None,
) -> npt.NDArray[np.intp]:
    """Greedy non-maximum suppression with true IoU.

    A box is suppressed when its IoU with a higher-scored kept box (of the same class unless
    ``class_agnostic``) is ``> iou_threshold``; IoU exactly equal to the threshold is kept. IoU is
    computed in float64 on continuous coordinates (no ``+1``); boxes with zero union have IoU 0.

    Args:
        xyxy: ``(N, 4)`` boxes. Not modified.
        score: ``(N,)`` scores.
        class_id: ``(N,)`` integer classes.
        iou_threshold: in [0, 1].
        class_agnostic: suppress across classes.
        max_keep: stop after this many kept boxes (same result as truncating the full output).

    Returns:
        intp ``(K,)`` indices of kept boxes, highest score first (ties: lower index first).

    Example:
        ``[[0, 0, 10, 10], [0, 0, 10, 5]]`` have IoU 0.5: both kept at threshold 0.5, one at 0.49.
    """
    n = len(score)
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    boxes = np.asarray(xyxy, dtype=np.float64)[order]
    cls = np.asarray(class_id)[order]
    x1, y1, x2, y2 = boxes.T
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    limit = n if max_keep is None else max_keep
    keep: list[int] = []
    rest = np.arange(n)
    while rest.size and len(keep) < limit:
        i, rest = rest[0], rest[1:]
        keep.append(int(i))
        if not rest.size:
            break
        iw = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = iw * ih
        union = area[i] + area[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        suppress = iou > iou_threshold
        if not class_agnostic:
            suppress &= cls[rest] == cls[i]
        rest = rest[~suppress]
    return order[np.asarray(keep, dtype=np.intp)]


def _crop_range(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Pixels whose centre lies in ``[lo, hi)``, clipped to ``[0, size)``: ``(start, stop)``."""
    start = min(max(math.ceil(lo - 0.5), 0), size)
    stop = min(max(math.ceil(hi - 0.5), start), size)
    return start, stop


def _bilinear_matrix(u: npt.NDArray[np.float64], p0: int, pn: int, size: int) -> FloatArray:
    """float32 ``(len(u), pn)`` weights sampling ``size`` cells (crop ``[p0, p0 + pn)``) at ``u``."""
    u = np.clip(u, 0.0, size - 1)
    i0 = np.floor(u).astype(np.intp)
    w1 = u - i0
    i1 = np.minimum(i0 + 1, size - 1)
    rows = np.arange(len(u))
    mat = np.zeros((len(u), pn), np.float32)
    mat[rows, i0 - p0] = (1.0 - w1).astype(np.float32)
    mat[rows, i1 - p0] += w1.astype(np.float32)
    return mat


@dataclass(frozen=True)
class _Axis:
    """One axis of the frame -> prototype mapping: proto point = origin + frame point * q."""

    origin: float  # pad / stride
    q: float  # scale / stride (prototype units per frame pixel)
    size: int  # prototype cells on this axis

    def proto_range(self, start: int, stop: int) -> tuple[int, int]:
        """Prototype cells any mode may read for frame pixels ``[start, stop)`` (same for all modes)."""
        half = max(self.q, 1.0) / 2
        first = self.origin + (start + 0.5) * self.q - 0.5 - half
        last = self.origin + (stop - 0.5) * self.q - 0.5 + half
        p0 = min(max(math.floor(first), 0), self.size - 1)
        p1 = min(max(math.floor(last) + 2, p0 + 1), self.size)
        return p0, p1

    def centres(self, start: int, stop: int) -> npt.NDArray[np.float64]:
        """Frame pixel centres of ``[start, stop)`` in prototype units."""
        return self.origin + (np.arange(start, stop, dtype=np.float64) + 0.5) * self.q

    def sample_accurate(self, start: int, stop: int, p0: int, pn: int) -> FloatArray:
        x = np.arange(start, stop, dtype=np.float64)
        return _bilinear_matrix(self.origin + (x + 0.5) * self.q - 0.5, p0, pn, self.size)

    def nearest_cells(self, start: int, stop: int) -> npt.NDArray[np.intp]:
        return np.clip(np.floor(self.centres(start, stop)).astype(np.intp), 0, self.size - 1)

    def sample_tradeoff(
        self, start: int, stop: int, p0: int, pn: int, factor: float
    ) -> tuple[FloatArray, npt.NDArray[np.intp]]:
        """Intermediate-grid weights and each frame pixel's cell index (relative to the first cell)."""
        origin = factor * self.origin  # exactly 0 at f = 0 and self.origin at f = 1
        cell = self.q / ((1.0 - factor) * self.q + factor)  # exactly 1 at f = 0 and q at f = 1
        cells = np.floor((self.centres(start, stop) - origin) / cell).astype(np.intp)
        grid = np.arange(cells[0], cells[-1] + 1, dtype=np.float64)
        weights = _bilinear_matrix(origin + (grid + 0.5) * cell - 0.5, p0, pn, self.size)
        return weights, cells - cells[0]


def decode_masks(
    coefficients: FloatArray,
    prototypes: FloatArray,
    xyxy_frame: FloatArray,
    letterbox: LetterboxLike,
    mode: MaskDecodeMode = STEP_DEFAULTS["mask_decode_mode"],
    tradeoff_factor: float = 0.0,
) -> MaskCrops:
    """Decode instance masks on each box's crop.

    Args:
        coefficients: float32 ``(K, M)`` mask coefficients. Not modified.
        prototypes: float32 ``(M, ph, pw)``. Not modified.
        xyxy_frame: float32 ``(K, 4)`` boxes in frame pixels (already clipped to the frame).
        letterbox: the frame's letterbox geometry.
        mode: ``accurate``, ``tradeoff`` or ``fast`` (see the module docstring).
        tradeoff_factor: in [0, 1], for ``tradeoff``.

    Returns:
        ``MaskCrops``: per box a bool crop of the pixels whose centre lies in the box.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in MASK_DECODE_MODES:
        raise ValueError(f"mask_decode_mode must be accurate/tradeoff/fast, got {mode!r}")
    m, ph, pw = prototypes.shape
    height, width = letterbox.orig_size
    in_h, in_w = letterbox.input_size
    ax = _Axis(letterbox.pad_x * pw / in_w, letterbox.scale * pw / in_w, pw)
    ay = _Axis(letterbox.pad_y * ph / in_h, letterbox.scale * ph / in_h, ph)
    crops: list[npt.NDArray[np.bool_]] = []
    offsets = np.zeros((len(xyxy_frame), 2), np.int64)
    for k, (bx1, by1, bx2, by2) in enumerate(np.asarray(xyxy_frame, dtype=np.float64)):
        x0, x1 = _crop_range(bx1, bx2, width)
        y0, y1 = _crop_range(by1, by2, height)
        offsets[k] = (x0, y0)
        if x1 <= x0 or y1 <= y0:
            crops.append(np.zeros((y1 - y0, x1 - x0), bool))
            continue
        px0, px1 = ax.proto_range(x0, x1)
        py0, py1 = ay.proto_range(y0, y1)
        region = prototypes[:, py0:py1, px0:px1].reshape(m, -1)
        logits = (coefficients[k] @ region).reshape(py1 - py0, px1 - px0)
        if mode == "fast":
            above = logits > 0
            # two 1-D gathers: several times faster than one np.ix_ gather
            crop = above[ay.nearest_cells(y0, y1) - py0][:, ax.nearest_cells(x0, x1) - px0]
        elif mode == "accurate":
            wy = ay.sample_accurate(y0, y1, py0, py1 - py0)
            wx = ax.sample_accurate(x0, x1, px0, px1 - px0)
            crop = (wy @ logits @ wx.T) > 0
        else:
            wy, iy = ay.sample_tradeoff(y0, y1, py0, py1 - py0, tradeoff_factor)
            wx, ix = ax.sample_tradeoff(x0, x1, px0, px1 - px0, tradeoff_factor)
            crop = ((wy @ logits @ wx.T) > 0)[iy][:, ix]
        crops.append(np.ascontiguousarray(crop))
    return MaskCrops(crops, offsets)


def postprocess_frame(
    predictions: FloatArray, prototypes: FloatArray, letterbox: LetterboxLike, params: PostprocessParams
) -> Detections:
    """Raw outputs of one frame -> ``Detections`` in frame pixels with mask crops.

    Args:
        predictions: float32 ``(4 + C + M, N)``: ``cx, cy, w, h`` (input pixels), C sigmoid class
            scores, M mask coefficients. Not modified.
        prototypes: float32 ``(M, ph, pw)``. Not modified.
        letterbox: the frame's geometry (``scale``, ``pad_x``, ``pad_y``, ``orig_size``, ``input_size``).
        params: resolved parameters.

    Returns:
        ``Detections`` sorted by confidence, highest first; those with an empty mask dropped.

    Raises:
        ValueError: array shapes disagree (message gives expected vs. actual).
    """
    if prototypes.ndim != 3:
        raise ValueError(f"prototypes: expected shape (M, ph, pw), got {prototypes.shape}")
    m = prototypes.shape[0]
    if predictions.ndim != 2 or predictions.shape[0] < 4 + 1 + m:
        raise ValueError(f"predictions: expected shape (4 + C + {m}, N) with C >= 1, got {predictions.shape}")
    num_classes = predictions.shape[0] - 4 - m
    index, score, class_id = filter_candidates(predictions, num_classes, params)
    cx, cy, bw, bh = predictions[:4, index].astype(np.float64)
    xyxy_input = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    kept = nms(
        xyxy_input,
        score,
        class_id,
        params.iou_threshold,
        class_agnostic=params.class_agnostic_nms,
        max_keep=params.max_detections,
    )
    xyxy = map_boxes_to_frame(xyxy_input[kept], letterbox)
    coefficients = np.ascontiguousarray(predictions[4 + num_classes :, index[kept]].T, dtype=np.float32)
    return _with_masks(xyxy, score[kept], class_id[kept], coefficients, prototypes, letterbox, params)


def _with_masks(
    xyxy: FloatArray,
    score: FloatArray,
    class_id: npt.NDArray[np.int64],
    coefficients: FloatArray,
    prototypes: FloatArray,
    letterbox: LetterboxLike,
    params: PostprocessParams,
) -> Detections:
    """Decode the masks and build the ``Detections``, dropping those whose mask is empty."""
    masks = decode_masks(
        coefficients, prototypes, xyxy, letterbox, params.mask_decode_mode, params.tradeoff_factor
    )
    height, width = letterbox.orig_size
    detections = Detections(
        xyxy=xyxy, confidence=score, class_id=class_id, masks=masks, frame_shape=(height, width)
    )
    return drop_empty_masks(detections)


def drop_empty_masks(detections: Detections) -> Detections:
    """The detections whose mask has at least one pixel (the one empty-mask rule, every version)."""
    crops = detections.masks.crops
    nonempty = np.fromiter((crop.any() for crop in crops), dtype=bool, count=len(crops))
    return detections if nonempty.all() else detections[nonempty]


def filter_rows(
    rows: FloatArray, num_classes: int, params: PostprocessParams
) -> tuple[npt.NDArray[np.intp], FloatArray, npt.NDArray[np.int64]]:
    """Confidence threshold, class filter and ``max_detections`` on an end-to-end head's rows.

    Args:
        rows: float32 ``(N, 6 + M)``: ``x1, y1, x2, y2, score, class``, M coefficients. Not modified.
        num_classes: C (the model's class names).
        params: thresholds (per class too), allowed classes, ``max_detections``.

    Returns:
        ``(index, score, class_id)`` of the kept rows, highest score first (ties: lower row first).

    Raises:
        ValueError: a row that passes the threshold has a class id outside ``0..C-1`` (the metadata's
            class names do not match the model), or per-class thresholds do not have C entries.
    """
    score = rows[:, 4]
    class_value = rows[:, 5]
    class_id = np.rint(class_value).astype(np.int64)
    valid = np.isfinite(score) & np.isfinite(class_value) & (class_id >= 0) & (class_id < num_classes)
    thr = np.asarray(params.confidence, dtype=np.float32)
    if thr.ndim == 1:
        if thr.shape != (num_classes,):
            raise ValueError(f"per-class confidence: expected shape ({num_classes},), got {thr.shape}")
        thr = thr[np.clip(class_id, 0, num_classes - 1)]
    passing = score >= thr
    broken = passing & ~valid
    if broken.any():
        bad = class_value[broken][:5].tolist()
        raise ValueError(
            f"end-to-end rows with class {bad} outside the model's {num_classes} class names (do the "
            "metadata's class names match the model?)"
        )
    keep = passing & valid
    if params.class_ids is not None:
        keep &= np.isin(class_id, np.asarray(params.class_ids))
    index = np.flatnonzero(keep)
    order = np.argsort(-score[index], kind="stable")[: params.max_detections]
    index = index[order]
    return index, score[index].astype(np.float32), class_id[index]


def postprocess_end2end(
    rows: FloatArray,
    prototypes: FloatArray,
    letterbox: LetterboxLike,
    params: PostprocessParams,
    num_classes: int,
) -> Detections:
    """An end-to-end head's rows of one frame -> ``Detections`` in frame pixels with mask crops.

    Args:
        rows: float32 ``(N, 6 + M)``: ``x1, y1, x2, y2`` (input pixels), score, class id, M mask
            coefficients, as the model's own NMS left them. Not modified.
        prototypes: float32 ``(M, ph, pw)``. Not modified.
        letterbox: the frame's geometry.
        params: resolved parameters (``iou_threshold``, ``class_agnostic_nms``, ``max_candidates``
            have no effect here).
        num_classes: C.

    Returns:
        ``Detections`` sorted by confidence, highest first; empty masks dropped.

    Raises:
        ValueError: array shapes disagree, or a class id outside the class names.
    """
    if prototypes.ndim != 3:
        raise ValueError(f"prototypes: expected shape (M, ph, pw), got {prototypes.shape}")
    m = prototypes.shape[0]
    if rows.ndim != 2 or rows.shape[1] != 6 + m:
        raise ValueError(f"end-to-end rows: expected shape (N, 6 + {m}), got {rows.shape}")
    index, score, class_id = filter_rows(rows, num_classes, params)
    xyxy_input = rows[index, :4].astype(np.float64)
    xyxy = map_boxes_to_frame(xyxy_input, letterbox)
    coefficients = np.ascontiguousarray(rows[index, 6:], dtype=np.float32)
    return _with_masks(xyxy, score, class_id, coefficients, prototypes, letterbox, params)


def postprocess_raw(raw: RawLike, params: PostprocessParams, num_classes: int) -> Detections:
    """A backend's raw outputs of one frame (either layout) -> ``Detections``.

    Args:
        raw: ``worker.models.backend.RawSegmentation`` (``layout`` ``classic`` or ``end2end``).
        params: resolved parameters.
        num_classes: C, the model's class names (checked against a classic output's channels).

    Raises:
        ValueError: unknown layout, shapes that disagree, or classes that do not match.
    """
    if raw.layout == "end2end":
        return postprocess_end2end(raw.predictions, raw.prototypes, raw.letterbox, params, num_classes)
    if raw.layout != "classic":
        raise ValueError(f"unknown output layout {raw.layout!r} (classic or end2end)")
    m = raw.prototypes.shape[0] if raw.prototypes.ndim == 3 else 0
    if raw.predictions.ndim == 2 and raw.predictions.shape[0] != 4 + num_classes + m:
        raise ValueError(
            f"predictions: {raw.predictions.shape[0]} channels, expected 4 + {num_classes} + {m} for "
            f"{num_classes} class names"
        )
    return postprocess_frame(raw.predictions, raw.prototypes, raw.letterbox, params)
