"""COCO run-length encoding straight from a mask crop, without building the full-frame mask.

COCO RLE runs over the full frame in column-major (Fortran) order and starts with a run of zeros
(possibly empty). A crop at ``(x0, y0)`` only contributes changes inside its own columns; the zeros
around it merge into the runs between its columns. The run boundaries are found with one vectorised
comparison on the crop's columns, each padded with a zero above and below (when the crop does not span
the full frame height, every crop column is surrounded by zeros of the frame), then mapped to full-frame
positions. The counts are compressed with the algorithm of ``rleToString`` in pycocotools'
``maskApi.c`` (each count, minus the count two before it from the fourth on, in 5-bit groups,
``+ 48``), vectorised over the counts.

The result equals ``pycocotools.mask.encode(np.asfortranarray(full_mask))`` with ``counts`` decoded
to an ASCII ``str``.

Example:
    A 4x4 frame with the 2x2 block at rows/columns 1..2 (``crop = np.ones((2, 2), bool)`` at
    ``(1, 1)``) has runs ``[5, 2, 2, 2, 5]`` and counts ``"52203"``:

    >>> import numpy as np
    >>> rle_counts(np.ones((2, 2), bool), (1, 1), (4, 4)).tolist()
    [5, 2, 2, 2, 5]
    >>> encode_crop(np.ones((2, 2), bool), (1, 1), (4, 4))
    {'size': [4, 4], 'counts': '52203'}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np
import numpy.typing as npt

__all__ = ["CocoRle", "compress_counts", "compress_counts_many", "encode_crop", "encode_crops", "rle_counts"]


class CocoRle(TypedDict):
    """``{"size": [H, W], "counts": str}``, the compressed COCO RLE of one mask."""

    size: list[int]
    counts: str


def rle_counts(
    crop: npt.NDArray[np.bool_], offset: tuple[int, int], frame_shape: tuple[int, int]
) -> npt.NDArray[np.int64]:
    """Uncompressed COCO run lengths of a full-frame mask given by a crop.

    Args:
        crop: bool (or 0/1 integer) ``(h, w)`` crop. Not modified.
        offset: ``(x0, y0)`` of the crop's top-left pixel in the frame.
        frame_shape: ``(H, W)`` of the frame.

    Returns:
        int64 ``(R,)`` run lengths, alternating zeros and ones, starting with zeros (maybe 0);
        they sum to ``H * W``.

    Raises:
        ValueError: the crop is not 2-D or does not fit in the frame at that offset.

    Example:
        >>> rle_counts(np.ones((1, 1), bool), (0, 0), (2, 2)).tolist()
        [0, 1, 3]
    """
    crop = np.asarray(crop)
    height, width = (int(v) for v in frame_shape)
    x0, y0 = (int(v) for v in offset)
    if crop.ndim != 2:
        raise ValueError(f"crop: expected a 2-D array, got shape {crop.shape}")
    if height < 0 or width < 0:
        raise ValueError(f"frame_shape must be non-negative (H, W), got {frame_shape}")
    h, w = crop.shape
    if x0 < 0 or y0 < 0 or y0 + h > height or x0 + w > width:
        raise ValueError(f"crop of shape {crop.shape} at (x0={x0}, y0={y0}) does not fit frame {frame_shape}")
    total = height * width
    if h == 0 or w == 0:
        return np.array([total], np.int64)
    if h == height:
        # Full-height crop: its columns are contiguous in the frame's order, so it is one column.
        columns = crop.T.reshape(1, -1)
        starts = np.array([x0 * height], np.int64)
    else:
        columns = crop.T
        starts = (x0 + np.arange(w, dtype=np.int64)) * height + y0
    length = columns.shape[1]
    padded = np.zeros((columns.shape[0], length + 2), bool)
    padded[:, 1:-1] = columns
    flat = padded.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # index of the first element after a change
    column, row = np.divmod(change, length + 2)
    positions = starts[column] + row - 1
    positions = positions[positions < total]  # a run of ones ending the frame has no closing change
    bounds = np.concatenate(([0], positions, [total]))
    return np.diff(bounds).astype(np.int64)


def compress_counts(counts: npt.NDArray[np.integer]) -> str:
    """COCO's string compression of run lengths (``rleToString`` in ``maskApi.c``), vectorised.

    Each count ``x`` (minus the count two places before it, for the fourth count on) is written as
    little-endian 5-bit groups of its two's complement; a group gets bit ``0x20`` when more follow
    (more follow while the remaining value is not 0, or not -1 when the group's sign bit ``0x10`` is
    set); each group is written as the character ``group + 48``.

    Args:
        counts: integer ``(R,)`` run lengths.

    Returns:
        The ASCII string.

    Example:
        >>> compress_counts(np.array([5, 2, 2, 2, 5]))
        '52203'
    """
    return compress_counts_many([counts])[0]


def compress_counts_many(counts_list: Sequence[npt.NDArray[np.integer]]) -> list[str]:
    """``compress_counts`` of several masks at once (one set of array operations for all of them).

    Args:
        counts_list: integer run-length arrays, one per mask.

    Returns:
        One ASCII string per mask.

    Example:
        >>> compress_counts_many([np.array([5, 2, 2, 2, 5]), np.array([0, 1, 3])])
        ['52203', '013']
    """
    lengths = np.array([len(c) for c in counts_list], dtype=np.int64)
    if not lengths.sum():
        return [""] * len(lengths)
    counts = np.concatenate([np.asarray(c, dtype=np.int64).ravel() for c in counts_list])
    starts = np.cumsum(lengths) - lengths
    delta = np.flatnonzero(np.arange(counts.size) - np.repeat(starts, lengths) >= 3)
    values = counts.copy()
    values[delta] -= counts[delta - 2]
    bits = int(np.max(np.abs(values))).bit_length() + 1  # magnitude plus sign
    shifts = 5 * np.arange(max(1, -(-bits // 5)), dtype=np.int64)
    group = (values[:, None] >> shifts) & 0x1F  # (R, G); arithmetic shift keeps the sign
    rest = values[:, None] >> (shifts + 5)
    more = np.where(group & 0x10, rest != -1, rest != 0)
    # once no more groups follow, none follow later either: group g is used iff group g-1 has "more"
    used = np.ones_like(more)
    used[:, 1:] = more[:, :-1]
    chars = (group | more * 0x20) + 48
    text = chars[used].astype(np.uint8).tobytes().decode("ascii")
    bounds = np.concatenate(([0], np.cumsum(used.sum(axis=1))))
    return [
        text[b:e] for b, e in zip(bounds[starts].tolist(), bounds[starts + lengths].tolist(), strict=True)
    ]


def encode_crop(
    crop: npt.NDArray[np.bool_], offset: tuple[int, int], frame_shape: tuple[int, int]
) -> CocoRle:
    """Compressed COCO RLE of the full-frame mask that holds ``crop`` at ``offset``.

    Args:
        crop: bool ``(h, w)`` crop. Not modified.
        offset: ``(x0, y0)`` in the frame.
        frame_shape: ``(H, W)``.

    Returns:
        ``{"size": [H, W], "counts": str}``, equal to ``pycocotools.mask.encode`` of the full
        Fortran-ordered uint8 mask (with ``counts`` as ``str``).

    Raises:
        ValueError: the crop does not fit in the frame.

    Example:
        >>> encode_crop(np.ones((1, 1), bool), (0, 0), (2, 2))
        {'size': [2, 2], 'counts': '013'}
    """
    counts = rle_counts(crop, offset, frame_shape)
    return {"size": [int(frame_shape[0]), int(frame_shape[1])], "counts": compress_counts(counts)}


def encode_crops(
    crops: Sequence[npt.NDArray[np.bool_]],
    offsets: npt.ArrayLike,
    frame_shape: tuple[int, int],
) -> list[CocoRle]:
    """``encode_crop`` for all instances of a frame, compressing their counts in one pass.

    Args:
        crops: N bool crops. Not modified.
        offsets: int ``(N, 2)`` ``(x0, y0)`` per crop.
        frame_shape: ``(H, W)``.

    Returns:
        N ``{"size": [H, W], "counts": str}``, each equal to ``encode_crop`` of that crop.

    Raises:
        ValueError: a crop does not fit in the frame, or offsets do not match the crops.

    Example:
        >>> [r["counts"] for r in encode_crops([np.ones((1, 1), bool)] * 2, [[0, 0], [1, 1]], (2, 2))]
        ['013', '31']
    """
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2) if len(crops) else np.zeros((0, 2), np.int64)
    if len(offs) != len(crops):
        raise ValueError(f"offsets: expected shape ({len(crops)}, 2), got {np.shape(offsets)}")
    counts = [rle_counts(c, (int(x0), int(y0)), frame_shape) for c, (x0, y0) in zip(crops, offs, strict=True)]
    size = [int(frame_shape[0]), int(frame_shape[1])]
    return [{"size": list(size), "counts": text} for text in compress_counts_many(counts)]
