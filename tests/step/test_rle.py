"""Crop-based COCO RLE against pycocotools on the full-frame mask, bit for bit."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from worker.step.rle import compress_counts, compress_counts_many, encode_crop, encode_crops, rle_counts


def full_mask(crop: np.ndarray, offset: tuple[int, int], frame_shape: tuple[int, int]) -> np.ndarray:
    full = np.zeros(frame_shape, np.uint8)
    x0, y0 = offset
    full[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return full


def check(crop: np.ndarray, offset: tuple[int, int], frame_shape: tuple[int, int]) -> None:
    full = full_mask(crop, offset, frame_shape)
    want = mask_utils.encode(np.asfortranarray(full))
    got = encode_crop(crop, offset, frame_shape)
    assert got == {"size": [int(v) for v in want["size"]], "counts": want["counts"].decode("ascii")}
    # decoding gives back the instance mask bit for bit
    with warnings.catch_warnings():
        # pycocotools 2.0.x's decode under numpy 2 warns about ``__array__(copy=...)``; harmless here
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        decoded = mask_utils.decode({"size": got["size"], "counts": got["counts"].encode("ascii")})
    np.testing.assert_array_equal(decoded, full)


def block(h: int, w: int, fill: bool = True) -> np.ndarray:
    return np.full((h, w), fill, bool)


CHECKER = (np.indices((5, 7)).sum(axis=0) % 2).astype(bool)


@pytest.mark.parametrize(
    ("crop", "offset", "frame_shape"),
    [
        (block(0, 0), (0, 0), (4, 4)),  # no pixels
        (block(3, 0), (2, 1), (4, 4)),
        (block(4, 4, False), (0, 0), (4, 4)),  # empty mask
        (block(4, 4), (0, 0), (4, 4)),  # full mask: counts start with 0
        (block(1, 1), (0, 0), (5, 7)),  # 1 pixel at every corner
        (block(1, 1), (6, 0), (5, 7)),
        (block(1, 1), (0, 4), (5, 7)),
        (block(1, 1), (6, 4), (5, 7)),  # the last pixel: no closing run
        (block(2, 3), (0, 1), (5, 7)),  # touching each edge
        (block(2, 3), (4, 1), (5, 7)),
        (block(2, 3), (2, 0), (5, 7)),
        (block(2, 3), (2, 3), (5, 7)),
        (block(5, 2), (3, 0), (5, 7)),  # full-height crop: runs continue across columns
        (block(5, 7), (0, 0), (5, 7)),
        (CHECKER, (0, 0), (5, 7)),  # a change at every pixel
        (CHECKER[:, :3], (4, 0), (5, 7)),
        (block(1, 1), (0, 0), (1, 1)),
        (block(1, 300), (0, 0), (1, 300)),  # one row: long runs, multi-character counts
        (block(3, 3), (0, 0), (2000, 3000)),  # a 6e6-pixel frame: counts need 5-6 characters
        (block(3, 3), (2997, 1997), (2000, 3000)),
    ],
)
def test_table_matches_pycocotools(crop, offset, frame_shape) -> None:
    check(crop, offset, frame_shape)


def test_random_crops_match_pycocotools() -> None:
    rng = np.random.default_rng(2024)
    for _ in range(400):
        height, width = (int(v) for v in rng.integers(1, 70, 2))
        h, w = int(rng.integers(0, height + 1)), int(rng.integers(0, width + 1))
        y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        crop = rng.random((h, w)) < rng.choice([0.02, 0.5, 0.98])
        check(crop, (x0, y0), (height, width))


def test_blob_masks_in_a_1080p_frame() -> None:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:150, 0:200]
    for _ in range(10):
        crop = (yy - 75) ** 2 / 70**2 + (xx - 100) ** 2 / 95**2 < rng.uniform(0.3, 1.0)
        check(crop, (int(rng.integers(0, 1721)), int(rng.integers(0, 931))), (1080, 1920))


def test_rle_counts_sum_to_frame_and_alternate() -> None:
    crop = np.array([[1, 0], [1, 1]], bool)
    counts = rle_counts(crop, (1, 1), (3, 3))
    assert counts.tolist() == [4, 2, 2, 1]  # columns: 000 011 001
    assert counts.sum() == 9


def test_compress_counts_matches_pycocotools_for_any_counts() -> None:
    # frPyObjects compresses uncompressed counts with the same rleToString: check large values and
    # negative deltas (a count smaller than the one two before it)
    rng = np.random.default_rng(1)
    for _ in range(200):
        counts = rng.integers(1, rng.choice([4, 40, 5000, 3_000_000]), int(rng.integers(1, 30)))
        counts[0] = rng.integers(0, 3)
        total = int(counts.sum())
        want = mask_utils.frPyObjects({"size": [1, total], "counts": counts.tolist()}, 1, total)
        assert compress_counts(counts) == want["counts"].decode("ascii")


def test_input_crop_is_not_modified() -> None:
    crop = np.eye(4, dtype=bool)
    before = crop.copy()
    encode_crop(crop, (1, 2), (10, 10))
    np.testing.assert_array_equal(crop, before)


@pytest.mark.parametrize(
    ("crop", "offset", "frame_shape", "context"),
    [
        (block(2, 2), (2, 2), (4, 4), nullcontext()),
        (block(2, 2), (3, 0), (4, 4), pytest.raises(ValueError, match="does not fit")),
        (block(2, 2), (0, 3), (4, 4), pytest.raises(ValueError, match="does not fit")),
        (block(2, 2), (-1, 0), (4, 4), pytest.raises(ValueError, match="does not fit")),
        (np.ones(4, bool), (0, 0), (4, 4), pytest.raises(ValueError, match="2-D")),
    ],
)
def test_rejects_crops_outside_the_frame(crop, offset, frame_shape, context) -> None:
    with context:
        encode_crop(crop, offset, frame_shape)


def test_batch_encoding_equals_one_by_one() -> None:
    rng = np.random.default_rng(5)
    frame_shape = (90, 120)
    crops, offsets = [], []
    for _ in range(25):
        h, w = int(rng.integers(0, 40)), int(rng.integers(0, 40))
        crops.append(rng.random((h, w)) < 0.6)
        offsets.append((int(rng.integers(0, 120 - w + 1)), int(rng.integers(0, 90 - h + 1))))
    batch = encode_crops(crops, offsets, frame_shape)
    assert batch == [encode_crop(c, o, frame_shape) for c, o in zip(crops, offsets, strict=True)]
    assert encode_crops([], np.zeros((0, 2), int), frame_shape) == []
    assert compress_counts_many([np.array([], int), np.array([3, 1]), np.array([], int)]) == ["", "31", ""]
    with pytest.raises(ValueError, match="offsets"):
        encode_crops(crops, offsets[:-1], frame_shape)
