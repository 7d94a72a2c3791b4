"""annotate(): masks blended crop by crop, boxes and labels drawn, input untouched."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import numpy as np
import pytest

from tests.ops.conftest import make_detections
from worker.annotate import annotate, class_color, fit_width
from worker.step.detections import Detections


def test_mask_pixels_are_blended_with_the_class_colour_and_the_input_is_untouched() -> None:
    image = np.full((120, 160, 3), 100, np.uint8)
    before = image.copy()
    dets = make_detections((120, 160), [(40, 40, 120, 100)], [2])
    out = annotate(image, dets, ["a", "b", "c"], mask_alpha=0.5)
    np.testing.assert_array_equal(image, before)
    color = np.array(class_color(2), np.float32)
    expected = (100 * 0.5 + color * 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[70, 80], expected)  # mask interior
    np.testing.assert_array_equal(out[45, 45], before[45, 45])  # inside the box, outside the mask
    np.testing.assert_array_equal(out[5, 150], before[5, 150])  # far from everything
    edge = out[70, 40].astype(int)  # box edge (anti-aliased): near the class colour, far from the background
    assert np.abs(edge - color).max() < 16 and np.abs(edge - 100).max() > 40
    assert (out[25:40, 40:120] != before[25:40, 40:120]).any()  # the label above the box


def test_each_class_gets_its_own_colour_and_unknown_ids_still_draw() -> None:
    image = np.zeros((100, 200, 3), np.uint8)
    dets = make_detections((100, 200), [(10, 30, 60, 90), (110, 30, 190, 90)], [0, 7])
    out = annotate(image, dets, ["bolt"], mask_alpha=1.0)
    np.testing.assert_array_equal(out[60, 35], class_color(0))
    np.testing.assert_array_equal(out[60, 150], class_color(7))
    assert class_color(0) != class_color(7)


def test_no_detections_gives_an_equal_copy() -> None:
    image = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    out = annotate(image, Detections.empty((30, 40)), [])
    assert out is not image
    np.testing.assert_array_equal(out, image)


def test_crop_touching_the_frame_edges() -> None:
    image = np.zeros((50, 60, 3), np.uint8)
    dets = make_detections((50, 60), [(0, 0, 60, 50)], [1])
    out = annotate(image, dets, ["a", "b"], mask_alpha=1.0)
    np.testing.assert_array_equal(out[25, 30], class_color(1))


@pytest.mark.parametrize(
    ("image", "alpha", "context"),
    [
        (np.zeros((10, 10, 3), np.uint8), 0.5, nullcontext()),
        (np.zeros((10, 10), np.uint8), 0.5, pytest.raises(ValueError, match=r"\(H, W, 3\) uint8")),
        (np.zeros((10, 10, 3), np.float32), 0.5, pytest.raises(ValueError, match=r"\(H, W, 3\) uint8")),
        (np.zeros((10, 10, 3), np.uint8), 1.5, pytest.raises(ValueError, match="mask_alpha")),
    ],
)
def test_input_checks(image: np.ndarray, alpha: float, context: AbstractContextManager[object]) -> None:
    with context:
        annotate(image, Detections.empty((10, 10)), [], mask_alpha=alpha)


@pytest.mark.parametrize(
    ("shape", "max_width", "expected"),
    [((480, 640), 960, (480, 640)), ((1080, 1920), 960, (540, 960)), ((100, 1000), 100, (10, 100))],
)
def test_fit_width(shape: tuple[int, int], max_width: int, expected: tuple[int, int]) -> None:
    assert fit_width(np.zeros((*shape, 3), np.uint8), max_width).shape[:2] == expected
