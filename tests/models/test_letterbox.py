from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import cv2
import numpy as np
import pytest

from worker.models.letterbox import LetterboxInfo, compute_letterbox, letterbox, letterbox_batch

PAD = np.float32(114) / np.float32(255)


@pytest.mark.parametrize(
    ("orig", "input_size", "scale", "pad_x", "pad_y", "resized"),
    [
        pytest.param((1080, 1920), (640, 640), 1 / 3, 0, 140, (360, 640), id="1080p-landscape"),
        pytest.param((1920, 1080), (640, 640), 1 / 3, 140, 0, (640, 360), id="portrait"),
        pytest.param((500, 500), (640, 640), 1.28, 0, 0, (640, 640), id="square-upscaled"),
        pytest.param((3, 5), (640, 640), 128.0, 0, 128, (384, 640), id="tiny"),
        pytest.param((480, 640), (640, 640), 1.0, 0, 80, (480, 640), id="vga-no-resize"),
        pytest.param((720, 1280), (384, 640), 0.5, 0, 12, (360, 640), id="rectangular-input"),
        pytest.param((100, 300), (64, 64), 64 / 300, 0, 21, (21, 64), id="odd-padding"),
        pytest.param((1, 1), (64, 96), 64.0, 16, 0, (64, 64), id="single-pixel"),
    ],
)
def test_geometry(
    orig: tuple[int, int],
    input_size: tuple[int, int],
    scale: float,
    pad_x: int,
    pad_y: int,
    resized: tuple[int, int],
) -> None:
    info = compute_letterbox(orig, input_size)
    assert info.scale == pytest.approx(scale)
    assert (info.pad_x, info.pad_y, info.resized_size) == (pad_x, pad_y, resized)
    assert info.orig_size == orig and info.input_size == input_size


@pytest.mark.parametrize(
    ("orig", "input_box", "frame_box"),
    [
        pytest.param((1080, 1920), [10, 150, 110, 250], [30, 30, 330, 330], id="1080p"),
        pytest.param((1080, 1920), [-5, 100, 700, 600], [0, 0, 1920, 1080], id="1080p-clipped"),
        pytest.param((1920, 1080), [150, 10, 250, 110], [30, 30, 330, 330], id="portrait"),
        pytest.param((500, 500), [128, 128, 256, 256], [100, 100, 200, 200], id="square"),
        pytest.param((3, 5), [64, 192, 128, 256], [0.5, 0.5, 1.0, 1.0], id="tiny"),
        pytest.param((3, 5), [600, 100, 700, 600], [4.6875, 0, 5, 3], id="tiny-clipped"),
        pytest.param((480, 640), [0, 80, 640, 560], [0, 0, 640, 480], id="vga-full"),
    ],
)
def test_boxes_to_frame(orig: tuple[int, int], input_box: list[float], frame_box: list[float]) -> None:
    info = compute_letterbox(orig, (640, 640))
    boxes = np.array([input_box], np.float32)
    before = boxes.copy()
    out = info.boxes_to_frame(boxes)
    assert out.dtype == np.float32 and out.shape == (1, 4)
    np.testing.assert_allclose(out[0], frame_box, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(boxes, before)


def test_boxes_round_trip_and_grid() -> None:
    info = compute_letterbox((1080, 1920), (640, 640))
    frame_boxes = np.array([[30, 30, 330, 330], [0, 0, 1920, 1080]], np.float32)
    np.testing.assert_allclose(info.boxes_to_frame(info.boxes_to_input(frame_boxes)), frame_boxes, atol=1e-3)
    np.testing.assert_allclose(info.boxes_to_input(frame_boxes)[1], [0, 140, 640, 500])
    np.testing.assert_allclose(info.boxes_to_input(frame_boxes, grid_size=(160, 160))[1], [0, 35, 160, 125])
    assert info.boxes_to_frame(np.zeros((0, 4), np.float32)).shape == (0, 4)


@pytest.mark.parametrize(
    ("orig", "input_size", "grid", "region"),
    [
        ((1080, 1920), (640, 640), None, (0, 140, 640, 500)),
        ((1080, 1920), (640, 640), (160, 160), (0, 35, 160, 125)),
        ((1920, 1080), (640, 640), (160, 160), (35, 0, 125, 160)),
        ((100, 300), (64, 64), (16, 16), (0, 5.25, 16, 10.5)),
    ],
)
def test_content_region(
    orig: tuple[int, int],
    input_size: tuple[int, int],
    grid: tuple[int, int] | None,
    region: tuple[float, float, float, float],
) -> None:
    assert compute_letterbox(orig, input_size).content_region(grid) == pytest.approx(region)


def _reference(image: np.ndarray, info: LetterboxInfo, pad_value: int) -> np.ndarray:
    """Straightforward letterbox: pad a uint8 canvas, then RGB / 255 CHW."""
    new_h, new_w = info.resized_size
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((*info.input_size, 3), pad_value, np.uint8)
    canvas[info.pad_y : info.pad_y + new_h, info.pad_x : info.pad_x + new_w] = resized
    return canvas[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / np.float32(255)


@pytest.mark.parametrize("orig", [(1080, 1920), (1920, 1080), (480, 640), (3, 5), (97, 61)])
def test_letterbox_pixels_match_reference(orig: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(orig))
    image = rng.integers(0, 256, (*orig, 3), dtype=np.uint8)
    before = image.copy()
    tensor, info = letterbox(image, (640, 640), 114)
    assert tensor.shape == (3, 640, 640) and tensor.dtype == np.float32
    np.testing.assert_array_equal(tensor, _reference(image, info, 114))
    np.testing.assert_array_equal(image, before)


def test_letterbox_channel_order_and_padding() -> None:
    image = np.zeros((2, 4, 3), np.uint8)
    image[..., 0] = 10  # blue
    image[..., 1] = 20  # green
    image[..., 2] = 30  # red
    tensor, info = letterbox(image, (4, 4), pad_value=0)
    assert (info.pad_y, info.resized_size) == (1, (2, 4))
    np.testing.assert_array_equal(tensor[:, 0], 0)
    np.testing.assert_array_equal(tensor[:, 3], 0)
    np.testing.assert_allclose(tensor[:, 1:3, :].reshape(3, -1).mean(axis=1), np.array([30, 20, 10]) / 255)


def test_letterbox_writes_into_slot_and_handles_views() -> None:
    batch = np.full((2, 3, 64, 64), -1.0, np.float32)
    image = np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    flipped = image[:, ::-1]  # negative strides
    result, info = letterbox(flipped, (64, 64), 114, out=batch[1])
    assert np.shares_memory(result, batch)
    assert (batch[0] == -1).all() and (batch[1] >= 0).all()
    np.testing.assert_allclose(batch[1], _reference(np.ascontiguousarray(flipped), info, 114), atol=1e-6)
    assert batch[1, 0, 0, 0] == PAD


def test_letterbox_batch_of_different_sizes() -> None:
    rng = np.random.default_rng(2)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(30, 50, 3), (50, 30, 3), (64, 64, 3)]
    ]
    buffer = np.empty((5, 3, 64, 64), np.float32)
    batch, infos = letterbox_batch(images, (64, 64), 114, out=buffer)
    assert batch.shape == (3, 3, 64, 64) and np.shares_memory(batch, buffer)
    for image, slot, info in zip(images, batch, infos, strict=True):
        alone, alone_info = letterbox(image, (64, 64), 114)
        assert info == alone_info
        np.testing.assert_array_equal(slot, alone)


@pytest.mark.parametrize(
    ("image", "input_size", "pad_value", "out", "context"),
    [
        (np.zeros((4, 4, 3), np.uint8), (8, 8), 114, None, nullcontext()),
        (np.zeros((4, 4), np.uint8), (8, 8), 114, None, pytest.raises(ValueError, match="H, W, 3")),
        (np.zeros((4, 4, 4), np.uint8), (8, 8), 114, None, pytest.raises(ValueError, match="H, W, 3")),
        (np.zeros((4, 4, 3), np.float32), (8, 8), 114, None, pytest.raises(ValueError, match="uint8")),
        (np.zeros((0, 4, 3), np.uint8), (8, 8), 114, None, pytest.raises(ValueError, match="positive")),
        (np.zeros((4, 4, 3), np.uint8), (0, 8), 114, None, pytest.raises(ValueError, match="positive")),
        (np.zeros((4, 4, 3), np.uint8), (8, 8), 256, None, pytest.raises(ValueError, match="pad_value")),
        (
            np.zeros((4, 4, 3), np.uint8),
            (8, 8),
            114,
            np.zeros((3, 8, 4), np.float32),
            pytest.raises(ValueError, match="out must be"),
        ),
        (
            np.zeros((4, 4, 3), np.uint8),
            (8, 8),
            114,
            np.zeros((3, 8, 8), np.float64),
            pytest.raises(ValueError, match="out must be"),
        ),
        ([[1, 2, 3]], (8, 8), 114, None, pytest.raises(ValueError, match="H, W, 3")),
    ],
)
def test_letterbox_input_checks(
    image: Any, input_size: tuple[int, int], pad_value: int, out: np.ndarray | None, context: Any
) -> None:
    with context:
        letterbox(image, input_size, pad_value, out=out)


def test_bad_boxes_and_grid_rejected() -> None:
    info = compute_letterbox((10, 10), (32, 32))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        info.boxes_to_frame(np.zeros((3,), np.float32))
    with pytest.raises(ValueError, match="grid_size"):
        info.content_region((0, 8))
    with pytest.raises(ValueError, match="out must be"):
        letterbox_batch([np.zeros((4, 4, 3), np.uint8)] * 3, (8, 8), out=np.zeros((2, 3, 8, 8), np.float32))
