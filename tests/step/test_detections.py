"""Detections and MaskCrops: shape checks, indexing, pasting."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest

from worker.step.detections import Detections, MaskCrops


def make(n: int = 3, frame_shape: tuple[int, int] = (20, 30)) -> Detections:
    crops = [np.full((2 + i, 3 + i), True) for i in range(n)]
    return Detections(
        xyxy=np.array([[i, i, i + 3 + i, i + 2 + i] for i in range(n)], np.float32),
        confidence=np.linspace(0.9, 0.5, n).astype(np.float32),
        class_id=np.arange(n),
        masks=MaskCrops(crops, [[i, i] for i in range(n)]),
        frame_shape=frame_shape,
    )


ONE_CROP = MaskCrops([np.ones((2, 2), bool)], [[0, 0]])


@pytest.mark.parametrize(
    ("kwargs", "context"),
    [
        ({}, nullcontext()),
        (
            {"xyxy": np.zeros((1, 3))},
            pytest.raises(ValueError, match=r"xyxy: .* \(N, 4\), got \(1, 3\)"),
        ),
        ({"xyxy": np.zeros(4)}, pytest.raises(ValueError, match="xyxy")),
        (
            {"confidence": np.zeros(2)},
            pytest.raises(ValueError, match=r"confidence: .* \(1,\), got \(2,\)"),
        ),
        ({"class_id": np.zeros((1, 1), int)}, pytest.raises(ValueError, match="class_id: expected shape")),
        ({"class_id": np.array([0.5])}, pytest.raises(ValueError, match="integer")),
        ({"masks": MaskCrops.empty()}, pytest.raises(ValueError, match="masks: expected 1 crops, got 0")),
        ({"frame_shape": (1, 1)}, pytest.raises(ValueError, match="exceeds frame")),
        ({"frame_shape": (0, 5)}, pytest.raises(ValueError, match="frame_shape")),
    ],
)
def test_shape_checks(kwargs, context) -> None:
    fields = {
        "xyxy": np.zeros((1, 4)),
        "confidence": np.ones(1),
        "class_id": np.zeros(1, int),
        "masks": ONE_CROP,
        "frame_shape": (4, 4),
    } | kwargs
    with context:
        dets = Detections(**fields)
        assert dets.xyxy.dtype == np.float32 and dets.class_id.dtype == np.int64


@pytest.mark.parametrize(
    ("crops", "offsets", "match"),
    [
        ([np.ones((2, 2), bool)], [[0, 0], [1, 1]], "offsets: expected shape"),
        ([np.ones((2, 2), np.uint8)], [[0, 0]], r"crops\[0\]: expected a 2-D bool array, got uint8"),
        ([np.ones(2, bool)], [[0, 0]], "2-D bool"),
        ([np.ones((2, 2), bool)], [[-1, 0]], "non-negative"),
    ],
)
def test_mask_crops_checks(crops, offsets, match) -> None:
    with pytest.raises(ValueError, match=match):
        MaskCrops(crops, offsets)


@pytest.mark.parametrize(
    ("index", "kept"),
    [
        (np.array([True, False, True]), [0, 2]),
        (np.array([2, 0]), [2, 0]),
        (np.array([], int), []),
        (slice(1, None), [1, 2]),
        (1, [1]),
        (-1, [2]),
    ],
)
def test_indexing_returns_new_object(index, kept) -> None:
    dets = make()
    sub = dets[index]
    assert sub is not dets and len(sub) == len(kept)
    assert sub.class_id.tolist() == kept
    np.testing.assert_array_equal(sub.xyxy, dets.xyxy[kept])
    np.testing.assert_array_equal(sub.masks.offsets, dets.masks.offsets[kept])
    assert [c.shape for c in sub.masks.crops] == [dets.masks.crops[k].shape for k in kept]
    assert sub.frame_shape == dets.frame_shape


def test_confidence_filter_by_boolean_indexing() -> None:
    dets = make(5)
    assert dets[dets.confidence >= 0.7].class_id.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("index", "error"),
    [(np.array([True]), ValueError), (np.array([3]), IndexError), (np.array([0.5]), ValueError)],
)
def test_bad_index(index, error) -> None:
    with pytest.raises(error):
        make()[index]


def test_empty() -> None:
    dets = Detections.empty((10, 20))
    assert len(dets) == 0 and dets.xyxy.shape == (0, 4) and dets.frame_shape == (10, 20)
    assert len(dets[dets.confidence > 0.5]) == 0


def test_paste_and_area() -> None:
    crop = np.array([[True, False], [True, True]])
    masks = MaskCrops([crop], [[3, 1]])
    full = masks.paste(0, (4, 6))
    assert full.shape == (4, 6) and full.sum() == 3 and full[1, 3] and not full[1, 4]
    assert masks.area().tolist() == [3]
    with pytest.raises(ValueError, match="does not fit"):
        masks.paste(0, (2, 6))
