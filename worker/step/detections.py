"""One frame's detections: parallel arrays plus per-instance mask crops.

A ``Detections`` holds N instances as parallel arrays (boxes, scores, class ids) and a ``MaskCrops``
with one boolean crop per instance. A crop covers the instance's box (clipped to the frame) and sits at
an integer offset in the frame, so memory and work per instance grow with the box, never with the frame.

Example:
    >>> import numpy as np
    >>> crops = MaskCrops([np.ones((2, 3), bool)], np.array([[5, 1]]))
    >>> dets = Detections(
    ...     xyxy=np.array([[5, 1, 8, 3]], np.float32),
    ...     confidence=np.array([0.9], np.float32),
    ...     class_id=np.array([2]),
    ...     masks=crops,
    ...     frame_shape=(4, 10),
    ... )
    >>> len(dets[dets.confidence > 0.5]), int(crops.paste(0, (4, 10)).sum())
    (1, 6)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Detections", "MaskCrops"]

BoolArray = npt.NDArray[np.bool_]
IndexLike = slice | int | Sequence[int] | npt.NDArray[Any]


def _as_index(index: IndexLike, n: int) -> npt.NDArray[np.intp]:
    """Normalise a boolean mask, integer array, int or slice into an integer index array."""
    if isinstance(index, slice):
        return np.arange(n, dtype=np.intp)[index]
    if isinstance(index, (int, np.integer)):
        index = [int(index)]
    arr = np.asarray(index)
    if arr.dtype == np.bool_:
        if arr.shape != (n,):
            raise ValueError(f"boolean index must have shape ({n},), got {arr.shape}")
        return np.flatnonzero(arr)
    if arr.size == 0:
        return np.empty(0, dtype=np.intp)
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
        raise ValueError(f"index must be a 1-D bool or integer array, got {arr.dtype} {arr.shape}")
    if arr.min() < -n or arr.max() >= n:
        raise IndexError(f"index out of range for {n} instances")
    return arr.astype(np.intp) % max(n, 1)


@dataclass(frozen=True, eq=False)
class MaskCrops:
    """Per-instance boolean mask crops with their integer offsets in the frame.

    Attributes:
        crops: N boolean arrays, crop ``i`` has shape ``(h_i, w_i)`` (either may be 0).
        offsets: int64 ``(N, 2)``: ``(x0, y0)`` of each crop's top-left pixel in the frame.

    Raises:
        ValueError: crops and offsets disagree in length, a crop is not 2-D bool, or an offset is
            negative.
    """

    crops: tuple[BoolArray, ...]
    offsets: npt.NDArray[np.int64]

    def __init__(self, crops: Sequence[BoolArray], offsets: npt.ArrayLike) -> None:
        crops_t = tuple(crops)
        offs = np.asarray(offsets, dtype=np.int64)
        if not crops_t and offs.size == 0:
            offs = offs.reshape(0, 2)
        if offs.shape != (len(crops_t), 2):
            raise ValueError(f"offsets: expected shape ({len(crops_t)}, 2), got {offs.shape}")
        for i, crop in enumerate(crops_t):
            if not isinstance(crop, np.ndarray) or crop.dtype != np.bool_ or crop.ndim != 2:
                got = f"{crop.dtype} {crop.shape}" if isinstance(crop, np.ndarray) else type(crop).__name__
                raise ValueError(f"crops[{i}]: expected a 2-D bool array, got {got}")
        if offs.size and offs.min() < 0:
            raise ValueError("offsets must be non-negative (crops lie inside the frame)")
        object.__setattr__(self, "crops", crops_t)
        object.__setattr__(self, "offsets", offs)

    @classmethod
    def empty(cls) -> MaskCrops:
        """No instances."""
        return cls((), np.zeros((0, 2), np.int64))

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: IndexLike) -> MaskCrops:
        """Select instances with a bool mask, integer array, int or slice; returns a new object."""
        idx = _as_index(index, len(self))
        return MaskCrops([self.crops[i] for i in idx], self.offsets[idx])

    def area(self) -> npt.NDArray[np.int64]:
        """Number of mask pixels per instance, int64 ``(N,)``."""
        return np.array([int(c.sum()) for c in self.crops], dtype=np.int64)

    def paste(self, i: int, frame_shape: tuple[int, int]) -> BoolArray:
        """Instance ``i``'s full-frame bool mask ``(H, W)`` (for tests and export, not the hot path).

        Raises:
            ValueError: the crop does not fit in ``frame_shape``.
        """
        height, width = frame_shape
        crop = self.crops[i]
        x0, y0 = (int(v) for v in self.offsets[i])
        if y0 + crop.shape[0] > height or x0 + crop.shape[1] > width:
            raise ValueError(f"crop {crop.shape} at (x0={x0}, y0={y0}) does not fit frame {frame_shape}")
        full = np.zeros((height, width), dtype=bool)
        full[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
        return full


@dataclass(frozen=True, eq=False)
class Detections:
    """One frame's instances as parallel arrays.

    Attributes:
        xyxy: float32 ``(N, 4)``: ``x1, y1, x2, y2`` in frame pixels (edges; pixel ``i`` spans
            ``[i, i + 1)``).
        confidence: float32 ``(N,)``.
        class_id: int64 ``(N,)``.
        masks: ``MaskCrops`` with N crops.
        frame_shape: ``(H, W)`` of the original frame.

    Raises:
        ValueError: an array has the wrong shape (message gives expected vs. actual) or a crop does not
            fit in the frame.
    """

    xyxy: npt.NDArray[np.float32]
    confidence: npt.NDArray[np.float32]
    class_id: npt.NDArray[np.int64]
    masks: MaskCrops
    frame_shape: tuple[int, int]
    _n: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float32)
        n = xyxy.shape[0] if xyxy.ndim == 2 else -1
        if xyxy.ndim != 2 or xyxy.shape[1] != 4:
            raise ValueError(f"xyxy: expected shape (N, 4), got {xyxy.shape}")
        conf = np.asarray(self.confidence, dtype=np.float32)
        if conf.shape != (n,):
            raise ValueError(f"confidence: expected shape ({n},), got {conf.shape}")
        cls = np.asarray(self.class_id)
        if cls.shape != (n,):
            raise ValueError(f"class_id: expected shape ({n},), got {cls.shape}")
        if cls.size and not np.issubdtype(cls.dtype, np.integer):
            raise ValueError(f"class_id: expected an integer array, got {cls.dtype}")
        if len(self.masks) != n:
            raise ValueError(f"masks: expected {n} crops, got {len(self.masks)}")
        height, width = (int(v) for v in self.frame_shape)
        if height <= 0 or width <= 0:
            raise ValueError(f"frame_shape: expected positive (H, W), got {self.frame_shape}")
        for i, crop in enumerate(self.masks.crops):
            x0, y0 = self.masks.offsets[i]
            if y0 + crop.shape[0] > height or x0 + crop.shape[1] > width:
                raise ValueError(
                    f"masks[{i}]: crop {crop.shape} at ({x0}, {y0}) exceeds frame {(height, width)}"
                )
        object.__setattr__(self, "xyxy", xyxy)
        object.__setattr__(self, "confidence", conf)
        object.__setattr__(self, "class_id", cls.astype(np.int64, copy=False))
        object.__setattr__(self, "frame_shape", (height, width))
        object.__setattr__(self, "_n", n)

    @classmethod
    def empty(cls, frame_shape: tuple[int, int]) -> Detections:
        """No instances in a frame of shape ``(H, W)``."""
        return cls(
            xyxy=np.zeros((0, 4), np.float32),
            confidence=np.zeros(0, np.float32),
            class_id=np.zeros(0, np.int64),
            masks=MaskCrops.empty(),
            frame_shape=frame_shape,
        )

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: IndexLike) -> Detections:
        """Select instances with a bool mask, integer array, int or slice; returns a new object."""
        idx = _as_index(index, self._n)
        return Detections(
            xyxy=self.xyxy[idx],
            confidence=self.confidence[idx],
            class_id=self.class_id[idx],
            masks=self.masks[idx],
            frame_shape=self.frame_shape,
        )
