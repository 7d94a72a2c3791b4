"""Draw one frame's detections: translucent masks with outlines, boxes, class names and confidences.

Pure functions (no I/O, input image untouched) used by the live preview, only while someone watches.
Masks are blended crop by crop (``MaskCrops``: a bool crop per instance at an ``(x0, y0)`` offset), so
the cost per instance grows with its box, never with the frame.

Example:
    >>> import numpy as np
    >>> from worker.step.detections import Detections, MaskCrops
    >>> img = np.zeros((40, 60, 3), np.uint8)
    >>> dets = Detections(np.array([[10, 10, 30, 30]], np.float32), np.array([0.9], np.float32),
    ...                   np.array([0]), MaskCrops([np.ones((20, 20), bool)], [[10, 10]]), (40, 60))
    >>> out = annotate(img, dets, ["bolt"])
    >>> bool(out[20, 20].any()), bool(img.any())
    (True, False)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

__all__ = ["DetectionsLike", "annotate", "class_color", "fit_width"]

# Distinct, saturated BGR colours (Tableau 10 in BGR order), chosen by class id.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (180, 119, 31),
    (14, 127, 255),
    (44, 160, 44),
    (40, 39, 214),
    (189, 103, 148),
    (75, 86, 140),
    (194, 119, 227),
    (127, 127, 127),
    (34, 189, 188),
    (207, 190, 23),
)


class _MaskCropsLike(Protocol):
    @property
    def crops(self) -> Sequence[npt.NDArray[np.bool_]]: ...
    @property
    def offsets(self) -> npt.NDArray[np.int64]: ...


class DetectionsLike(Protocol):
    """What ``annotate`` reads: ``worker.step.detections.Detections`` fits it."""

    @property
    def xyxy(self) -> npt.NDArray[np.float32]: ...
    @property
    def confidence(self) -> npt.NDArray[np.float32]: ...
    @property
    def class_id(self) -> npt.NDArray[Any]: ...
    @property
    def masks(self) -> _MaskCropsLike: ...
    def __len__(self) -> int: ...


def class_color(class_id: int) -> tuple[int, int, int]:
    """The BGR colour of a class (stable across frames and runs)."""
    return _PALETTE[int(class_id) % len(_PALETTE)]


def _label(class_names: Sequence[str], class_id: int, confidence: float) -> str:
    name = class_names[class_id] if 0 <= class_id < len(class_names) else f"class {class_id}"
    return f"{name} {confidence:.2f}"


def annotate(
    image: npt.NDArray[np.uint8],
    detections: DetectionsLike,
    class_names: Sequence[str],
    *,
    mask_alpha: float = 0.45,
) -> npt.NDArray[np.uint8]:
    """Return a copy of ``image`` with the detections drawn on it.

    Args:
        image: ``(H, W, 3)`` uint8 BGR frame; not modified.
        detections: N instances (``xyxy`` float32 ``(N, 4)`` in frame pixels, ``confidence`` ``(N,)``,
            ``class_id`` ``(N,)``, ``masks`` with N bool crops and int ``(N, 2)`` offsets).
        class_names: names in class id order; an id without a name is drawn as ``class <id>``.
        mask_alpha: mask opacity in [0, 1].

    Returns:
        A new ``(H, W, 3)`` uint8 BGR image.

    Raises:
        ValueError: ``image`` is not ``(H, W, 3)`` uint8 or ``mask_alpha`` is outside [0, 1].
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if not 0.0 <= mask_alpha <= 1.0:
        raise ValueError(f"mask_alpha must be in [0, 1], got {mask_alpha}")
    out = image.copy()
    height, width = out.shape[:2]
    n = len(detections)
    if n == 0:
        return out
    thickness = max(1, round(min(height, width) / 320))
    font_scale = max(0.4, min(height, width) / 900)
    crops = detections.masks.crops
    offsets = detections.masks.offsets
    class_ids = [int(c) for c in detections.class_id]
    # Masks first (largest first, so small instances stay visible on top), then boxes and labels.
    order = sorted(range(n), key=lambda i: -int(crops[i].size))
    for i in order:
        crop = crops[i]
        if crop.size == 0:
            continue
        x0, y0 = int(offsets[i][0]), int(offsets[i][1])
        h = min(crop.shape[0], height - y0)
        w = min(crop.shape[1], width - x0)
        if h <= 0 or w <= 0:
            continue
        crop = crop[:h, :w]
        roi = out[y0 : y0 + h, x0 : x0 + w]
        fill = np.array(class_color(class_ids[i]), dtype=np.float32)
        pixels = roi[crop].astype(np.float32)
        roi[crop] = (pixels * (1.0 - mask_alpha) + fill * mask_alpha).astype(np.uint8)
        contours, _ = cv2.findContours(
            crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0)
        )
        cv2.drawContours(out, contours, -1, class_color(class_ids[i]), thickness, cv2.LINE_AA)
    for i in range(n):
        x1, y1, x2, y2 = (float(v) for v in detections.xyxy[i])
        p1 = (round(max(0.0, x1)), round(max(0.0, y1)))
        p2 = (round(min(width - 1.0, x2)), round(min(height - 1.0, y2)))
        color = class_color(class_ids[i])
        cv2.rectangle(out, p1, p2, color, thickness, cv2.LINE_AA)
        text = _label(class_names, class_ids[i], float(detections.confidence[i]))
        (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        # Above the box when there is room, else inside its top edge.
        ty = p1[1] - baseline - 2 if p1[1] - th - baseline - 2 >= 0 else p1[1] + th + 2
        tx = min(p1[0], max(0, width - tw - 2))
        cv2.rectangle(out, (tx, ty - th - 2), (tx + tw + 2, ty + baseline), color, cv2.FILLED)
        cv2.putText(
            out,
            text,
            (tx + 1, ty),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            (255, 255, 255),
            thickness,
            cv2.LINE_AA,
        )
    return out


def fit_width(image: npt.NDArray[np.uint8], max_width: int) -> npt.NDArray[np.uint8]:
    """Downscale ``image`` to at most ``max_width`` pixels wide, keeping its aspect ratio.

    Raises:
        ValueError: ``max_width`` < 16.
    """
    if max_width < 16:
        raise ValueError(f"max_width must be >= 16, got {max_width}")
    height, width = image.shape[:2]
    if width <= max_width:
        return image
    new_h = max(1, round(height * max_width / width))
    return np.asarray(cv2.resize(image, (max_width, new_h), interpolation=cv2.INTER_AREA), dtype=np.uint8)
