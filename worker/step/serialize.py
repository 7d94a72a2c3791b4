"""The step's ``predictions`` JSON for one frame: polygons (v1-v3) or COCO RLE masks (v4).

Shape (``shared/spec/step.md`` section 2)::

    {"image": {"width": W, "height": H},
     "predictions": [{"x", "y", "width", "height", "confidence", "class", "class_id",
                      "detection_id", "parent_id", "points" | "rle_mask"}, ...]}

Rounding: ``x``, ``y`` (box centre), ``width``, ``height`` to 1 decimal (0.1 pixel); ``confidence`` to
4 decimals; polygon points are pixel coordinates (whole pixels, ``.5`` only for the degenerate case
below). Everything is a plain Python type, ready for ``json.dumps``.

Polygons: the outer contour (``cv2.findContours``, ``RETR_EXTERNAL``, ``CHAIN_APPROX_SIMPLE``) with
the largest area (ties: more points), run on the crop and shifted by its offset, so points are pixel
centres of boundary pixels in frame coordinates. A mask whose best contour has fewer than 3 points (a
single pixel or a one-pixel-thin straight line) gets the rectangle around those pixels (their centres
``± 0.5``) instead. Instances with an empty mask are dropped.

Example:
    >>> import numpy as np
    >>> from worker.step.detections import Detections, MaskCrops
    >>> dets = Detections(np.array([[2, 1, 5, 3]], np.float32), np.array([0.87654], np.float32),
    ...                   np.array([0]), MaskCrops([np.ones((2, 3), bool)], [[2, 1]]), (4, 8))
    >>> out = serialize_predictions(dets, ["part"], parent_id="cam:1", mask_format="rle",
    ...                             id_factory=lambda: "id")
    >>> out["predictions"][0]["rle_mask"], out["predictions"][0]["confidence"]
    ({'size': [4, 8], 'counts': '922000;'}, 0.8765)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from worker.step.detections import Detections
from worker.step.rle import encode_crops

__all__ = ["MaskFormat", "mask_to_polygon", "serialize_predictions"]

MaskFormat = Literal["polygon", "rle"]


def _new_id() -> str:
    return str(uuid.uuid4())


def mask_to_polygon(crop: npt.NDArray[np.bool_], offset: tuple[int, int]) -> list[dict[str, float]]:
    """The largest outer contour of a crop, in frame coordinates.

    Args:
        crop: bool ``(h, w)`` mask crop. Not modified.
        offset: ``(x0, y0)`` of the crop in the frame.

    Returns:
        ``[{"x": float, "y": float}, ...]`` with at least 3 points, or ``[]`` for an empty mask.

    Raises:
        ValueError: ``crop`` is not 2-D.

    Example:
        >>> mask_to_polygon(np.ones((3, 3), bool), (10, 20))
        [{'x': 10.0, 'y': 20.0}, {'x': 10.0, 'y': 22.0}, {'x': 12.0, 'y': 22.0}, {'x': 12.0, 'y': 20.0}]
        >>> mask_to_polygon(np.ones((1, 1), bool), (0, 0))[0]
        {'x': -0.5, 'y': -0.5}
    """
    crop = np.asarray(crop)
    if crop.ndim != 2:
        raise ValueError(f"crop: expected a 2-D array, got shape {crop.shape}")
    if crop.size == 0 or not crop.any():
        return []
    contours, _ = cv2.findContours(crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    best = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    points = best.reshape(-1, 2).astype(np.float64)
    if len(points) < 3:
        (lx, ly), (hx, hy) = points.min(axis=0) - 0.5, points.max(axis=0) + 0.5
        points = np.array([[lx, ly], [lx, hy], [hx, hy], [hx, ly]])
    points += np.asarray(offset, dtype=np.float64)
    return [{"x": float(x), "y": float(y)} for x, y in points]


def serialize_predictions(
    detections: Detections,
    class_names: Sequence[str],
    *,
    parent_id: str,
    mask_format: MaskFormat,
    id_factory: Callable[[], str] = _new_id,
) -> dict[str, Any]:
    """One frame's ``predictions`` output.

    Args:
        detections: the frame's detections (their ``frame_shape`` is the image size).
        class_names: class names in id order.
        parent_id: the frame's id.
        mask_format: ``polygon`` (v1-v3: ``points``, empty masks dropped) or ``rle`` (v4: ``rle_mask``).
        id_factory: makes each ``detection_id`` (uuid4 strings by default).

    Returns:
        A JSON-ready dict of plain Python types.

    Raises:
        ValueError: unknown ``mask_format`` or a class id without a name.
    """
    if mask_format not in ("polygon", "rle"):
        raise ValueError(f"mask_format must be 'polygon' or 'rle', got {mask_format!r}")
    height, width = detections.frame_shape
    if len(detections) and (detections.class_id.min() < 0 or detections.class_id.max() >= len(class_names)):
        raise ValueError(
            f"class ids {detections.class_id.tolist()} outside the {len(class_names)} class names"
        )
    if mask_format == "rle":
        rles = encode_crops(detections.masks.crops, detections.masks.offsets, (height, width))
    predictions: list[dict[str, Any]] = []
    for i in range(len(detections)):
        crop = detections.masks.crops[i]
        x0, y0 = (int(v) for v in detections.masks.offsets[i])
        if mask_format == "polygon":
            mask: dict[str, Any] = {"points": mask_to_polygon(crop, (x0, y0))}
            if not mask["points"]:
                continue
        else:
            mask = {"rle_mask": dict(rles[i])}
        bx1, by1, bx2, by2 = (float(v) for v in detections.xyxy[i])
        class_id = int(detections.class_id[i])
        predictions.append(
            {
                "x": round((bx1 + bx2) / 2, 1),
                "y": round((by1 + by2) / 2, 1),
                "width": round(bx2 - bx1, 1),
                "height": round(by2 - by1, 1),
                "confidence": round(float(detections.confidence[i]), 4),
                "class": str(class_names[class_id]),
                "class_id": class_id,
                "detection_id": id_factory(),
                "parent_id": parent_id,
                **mask,
            }
        )
    return {"image": {"width": int(width), "height": int(height)}, "predictions": predictions}
