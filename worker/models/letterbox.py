"""Letterbox pre-processing and the mapping of model coordinates back to the frame.

The frame is resized with one scale for both axes, ``scale = min(w / W, h / H)``, to
``(round(H * scale), round(W * scale))`` (``cv2.INTER_LINEAR``), centred in the model input and
padded with ``pad_value``. Left/top padding is ``(w - new_w) // 2`` / ``(h - new_h) // 2``, the
same as Ultralytics' ``LetterBox(center=True)``. A box in input pixels maps back to the frame by
removing the padding, dividing by the scale and clipping to the frame.

The BGR to RGB swap, the division by 255 (bit-equal to ``x / 255``) and HWC to CHW happen in one
vectorised step per channel, written straight into the (pre-allocated) batch slot: no full-frame
float copy is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "PAD_VALUE",
    "BoxGeometry",
    "LetterboxInfo",
    "compute_letterbox",
    "letterbox",
    "letterbox_batch",
    "map_boxes_to_frame",
    "rect_input_size",
]

#: the letterbox padding value (all three channels) of YOLO models, Ultralytics' and the reference's
PAD_VALUE = 114

_255 = np.float32(255.0)


class BoxGeometry(Protocol):
    """What mapping boxes back needs of a letterbox (``LetterboxInfo`` or a look-alike)."""

    @property
    def scale(self) -> float: ...
    @property
    def pad_x(self) -> float: ...
    @property
    def pad_y(self) -> float: ...
    @property
    def orig_size(self) -> tuple[int, int]: ...


def map_boxes_to_frame(xyxy_input: npt.NDArray[np.floating], geometry: BoxGeometry) -> np.ndarray:
    """Boxes from input pixels to frame pixels: remove padding, divide by scale, clip to the frame.

    The one implementation (post-processing and ``LetterboxInfo.boxes_to_frame`` both use it);
    computed in float64, returned as float32.

    Args:
        xyxy_input: ``(N, 4)`` boxes ``x0, y0, x1, y1`` in model-input pixels. Not modified.
        geometry: the frame's letterbox geometry.

    Returns:
        float32 ``(N, 4)`` boxes, x in ``[0, W]``, y in ``[0, H]``.

    Raises:
        ValueError: ``xyxy_input`` is not ``(N, 4)``.

    Example:
        1280x720 frame in 640x640 (scale 0.5, pad_y 140): ``[10, 150, 110, 250]`` -> ``[20, 20, 220, 220]``.
    """
    boxes = np.asarray(xyxy_input, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) xyxy, got shape {boxes.shape}")
    pad = np.array([geometry.pad_x, geometry.pad_y] * 2, dtype=np.float64)
    out = (boxes - pad) / float(geometry.scale)
    height, width = geometry.orig_size
    np.clip(out[:, 0::2], 0.0, width, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0.0, height, out=out[:, 1::2])
    return out.astype(np.float32)


@dataclass(frozen=True, slots=True)
class LetterboxInfo:
    """How one frame was placed in the model input.

    Attributes:
        scale: resize factor from frame pixels to input pixels (same for both axes).
        pad_x: columns of padding left of the image, in input pixels.
        pad_y: rows of padding above the image, in input pixels.
        orig_size: ``(H, W)`` of the frame.
        input_size: ``(h, w)`` of the model input.
        resized_size: ``(new_h, new_w)`` of the resized frame inside the input.
    """

    scale: float
    pad_x: int
    pad_y: int
    orig_size: tuple[int, int]
    input_size: tuple[int, int]
    resized_size: tuple[int, int]

    def boxes_to_frame(self, xyxy: np.ndarray) -> np.ndarray:
        """Map boxes from input pixels to frame pixels: remove padding, divide by scale, clip.

        Args:
            xyxy: ``(N, 4)`` float boxes ``x0, y0, x1, y1`` in input pixels. Not modified.

        Returns:
            ``(N, 4)`` float32 boxes in frame pixels, x clipped to ``[0, W]``, y to ``[0, H]``.

        Raises:
            ValueError: ``xyxy`` is not ``(N, 4)``.

        Example:
            A 1280x720 frame in a 640x640 input: scale 0.5, pad_y 140. The input box
            ``[10, 150, 110, 250]`` is ``[20, 20, 220, 220]`` in the frame.
        """
        return map_boxes_to_frame(xyxy, self)

    def boxes_to_input(self, xyxy: np.ndarray, grid_size: tuple[int, int] | None = None) -> np.ndarray:
        """Map boxes from frame pixels to input pixels, or onto a grid that covers the input.

        Args:
            xyxy: ``(N, 4)`` float boxes in frame pixels. Not modified.
            grid_size: ``(gh, gw)`` of a grid spanning the whole input (e.g. the ``h/4 x w/4``
                prototypes); None for input pixels.

        Returns:
            ``(N, 4)`` float32 boxes (not clipped).

        Raises:
            ValueError: ``xyxy`` is not ``(N, 4)``.
        """
        boxes = _check_boxes(xyxy)
        out = boxes * np.float32(self.scale) + np.array(
            [self.pad_x, self.pad_y, self.pad_x, self.pad_y], np.float32
        )
        if grid_size is not None:
            fy, fx = self._grid_factors(grid_size)
            out *= np.array([fx, fy, fx, fy], np.float32)
        return out

    def content_region(self, grid_size: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
        """The part of the input (or of a grid covering it) that holds the frame, not padding.

        Args:
            grid_size: ``(gh, gw)`` of a grid spanning the whole input, e.g. the prototypes'
                ``(h/4, w/4)``; None for input pixels.

        Returns:
            ``(x0, y0, x1, y1)`` in grid (or input) units; may be fractional on a grid.

        Example:
            A 1280x720 frame in a 640x640 input: ``(0, 140, 640, 500)``; on the 160x160
            prototype grid ``(0, 35, 160, 125)``.
        """
        new_h, new_w = self.resized_size
        x0, y0, x1, y1 = self.pad_x, self.pad_y, self.pad_x + new_w, self.pad_y + new_h
        if grid_size is None:
            return float(x0), float(y0), float(x1), float(y1)
        fy, fx = self._grid_factors(grid_size)
        return x0 * fx, y0 * fy, x1 * fx, y1 * fy

    def _grid_factors(self, grid_size: tuple[int, int]) -> tuple[float, float]:
        gh, gw = grid_size
        if gh <= 0 or gw <= 0:
            raise ValueError(f"grid_size must be positive (gh, gw), got {grid_size}")
        return gh / self.input_size[0], gw / self.input_size[1]


def compute_letterbox(orig_size: tuple[int, int], input_size: tuple[int, int]) -> LetterboxInfo:
    """Where a frame of ``orig_size`` goes in an input of ``input_size`` (no pixels touched).

    Args:
        orig_size: ``(H, W)`` of the frame, both > 0.
        input_size: ``(h, w)`` of the model input, both > 0.

    Returns:
        The letterbox geometry.

    Raises:
        ValueError: a size is not positive.

    Example:
        >>> compute_letterbox((1080, 1920), (640, 640))
        LetterboxInfo(scale=0.3333333333333333, pad_x=0, pad_y=140, orig_size=(1080, 1920), \
input_size=(640, 640), resized_size=(360, 640))
    """
    height, width = (int(v) for v in orig_size)
    in_h, in_w = (int(v) for v in input_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive (H, W), got {orig_size}")
    if in_h <= 0 or in_w <= 0:
        raise ValueError(f"input size must be positive (h, w), got {input_size}")
    scale = min(in_w / width, in_h / height)
    new_w = min(in_w, max(1, round(width * scale)))
    new_h = min(in_h, max(1, round(height * scale)))
    return LetterboxInfo(
        scale=scale,
        pad_x=(in_w - new_w) // 2,
        pad_y=(in_h - new_h) // 2,
        orig_size=(height, width),
        input_size=(in_h, in_w),
        resized_size=(new_h, new_w),
    )


def letterbox(
    image_bgr: np.ndarray,
    input_size: tuple[int, int],
    pad_value: int = PAD_VALUE,
    *,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, LetterboxInfo]:
    """Letterbox one BGR frame into a CHW float32 RGB tensor in ``[0, 1]``.

    Args:
        image_bgr: ``(H, W, 3)`` uint8 BGR frame. Not modified.
        input_size: ``(h, w)`` of the model input.
        pad_value: padding value 0..255 (the tensor holds ``pad_value / 255``).
        out: optional ``(3, h, w)`` float32 array to write into (e.g. a slot of a batch);
            every element is written.

    Returns:
        ``(tensor, info)``: the ``(3, h, w)`` float32 tensor (``out`` when given) and the geometry.

    Raises:
        ValueError: bad image, size, pad value or ``out``.

    Example:
        A 2x4 frame into a 4x4 input: the image occupies rows 1..2, rows 0 and 3 are padding.
    """
    if not (isinstance(image_bgr, np.ndarray) and image_bgr.ndim == 3 and image_bgr.shape[2] == 3):
        shape = getattr(image_bgr, "shape", None)
        raise ValueError(f"image must be an (H, W, 3) uint8 BGR array, got shape {shape}")
    if image_bgr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image_bgr.dtype}")
    if not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be in 0..255, got {pad_value}")
    if not image_bgr.flags.c_contiguous:
        image_bgr = np.ascontiguousarray(image_bgr)  # e.g. a flipped view: OpenCV needs positive strides
    info = compute_letterbox(image_bgr.shape[:2], input_size)
    in_h, in_w = info.input_size
    if out is None:
        out = np.empty((3, in_h, in_w), np.float32)
    elif out.shape != (3, in_h, in_w) or out.dtype != np.float32 or not out.flags.writeable:
        raise ValueError(
            f"out must be a writeable (3, {in_h}, {in_w}) float32 array, got {out.shape} {out.dtype}"
        )
    new_h, new_w = info.resized_size
    x0, y0 = info.pad_x, info.pad_y
    x1, y1 = x0 + new_w, y0 + new_h

    pad = np.float32(pad_value) / _255
    out[:, :y0, :] = pad
    out[:, y1:, :] = pad
    out[:, y0:y1, :x0] = pad
    out[:, y0:y1, x1:] = pad

    if (new_h, new_w) == info.orig_size:
        resized = image_bgr
    else:
        resized = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    blue, green, red = cv2.split(resized)
    for channel, plane in enumerate((red, green, blue)):
        np.divide(plane, _255, out=out[channel, y0:y1, x0:x1], casting="unsafe")
    return out, info


def rect_input_size(
    orig_sizes: Sequence[tuple[int, int]], max_size: tuple[int, int], stride: int
) -> tuple[int, int]:
    """The rectangular input of a batch for a dynamic-axes model (``model.letterbox: rect``).

    Each frame is scaled as into ``max_size`` (``min(h / H, w / W)``) and its resized size rounded up
    to a multiple of ``stride`` (Ultralytics' ``LetterBox(auto=True)``); the batch takes the largest
    height and width of its frames, so every frame keeps that scale (a 1920x1080 frame at 480x480
    runs at 288x480).

    Args:
        orig_sizes: ``(H, W)`` of each frame (at least one).
        max_size: the model's input size ``(h, w)``, multiples of ``stride``.
        stride: the model's largest stride.

    Returns:
        ``(h, w)``, multiples of ``stride``, at most ``max_size``.

    Example:
        >>> rect_input_size([(1080, 1920)], (480, 480), 32)
        (288, 480)
    """
    max_h, max_w = max_size
    height = width = stride
    for frame_h, frame_w in orig_sizes:
        scale = min(max_h / frame_h, max_w / frame_w)
        new_h, new_w = round(frame_h * scale), round(frame_w * scale)
        height = max(height, min(-(-new_h // stride) * stride, max_h))
        width = max(width, min(-(-new_w // stride) * stride, max_w))
    return height, width


def letterbox_batch(
    images_bgr: Sequence[np.ndarray],
    input_size: tuple[int, int],
    pad_value: int = PAD_VALUE,
    *,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, list[LetterboxInfo]]:
    """Letterbox frames of any sizes into one ``(B, 3, h, w)`` batch.

    Args:
        images_bgr: B ``(H_i, W_i, 3)`` uint8 BGR frames. Not modified.
        input_size: ``(h, w)`` of the model input.
        pad_value: padding value 0..255.
        out: optional float32 buffer ``(B', 3, h, w)`` with ``B' >= B``; its first B slots are used.

    Returns:
        ``(batch, infos)``: the ``(B, 3, h, w)`` float32 batch (a view of ``out`` when given) and
        one :class:`LetterboxInfo` per frame.

    Raises:
        ValueError: bad image, size, pad value or ``out``.
    """
    count = len(images_bgr)
    in_h, in_w = input_size
    if out is None:
        out = np.empty((count, 3, in_h, in_w), np.float32)
    elif out.ndim != 4 or out.shape[0] < count or out.shape[1:] != (3, in_h, in_w) or out.dtype != np.float32:
        raise ValueError(
            f"out must be a (>= {count}, 3, {in_h}, {in_w}) float32 array, got {out.shape} {out.dtype}"
        )
    batch = out[:count]
    infos = [letterbox(image, input_size, pad_value, out=batch[i])[1] for i, image in enumerate(images_bgr)]
    return batch, infos


def _check_boxes(xyxy: np.ndarray) -> np.ndarray:
    boxes = np.asarray(xyxy, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) xyxy, got shape {boxes.shape}")
    return boxes
