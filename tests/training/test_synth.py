"""The synthetic scene generator: determinism, exact masks, occlusion, class coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.data import TEST, TRAIN, eval_frame, letterbox_params, make_sample
from training.synth import CLASS_NAMES, Part, make_belt, place_parts, random_scene, render, sample_part


def test_same_seed_same_pixels_and_masks() -> None:
    a = random_scene(np.random.default_rng([7, 0, 3]))
    b = random_scene(np.random.default_rng([7, 0, 3]))
    c = random_scene(np.random.default_rng([7, 0, 4]))
    assert np.array_equal(a.image, b.image)
    assert a.class_ids == b.class_ids
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))
    assert not np.array_equal(a.image, c.image)


def test_streams_of_different_purposes_differ() -> None:
    train = eval_frame(0, TRAIN, 5)
    test = eval_frame(0, TEST, 5)
    assert train.image.shape != test.image.shape or not np.array_equal(train.image, test.image)


def _render_one(part: Part, size: int = 200) -> np.ndarray:
    rng = np.random.default_rng(0)
    belt = np.full((size, size, 3), 100, np.float32)
    scene = render(belt, [part], rng)
    assert scene.class_ids == [part.class_id]
    return scene.masks[0]


def test_washer_mask_is_a_ring_with_the_hole_left_out() -> None:
    part = sample_part(np.random.default_rng(1), 1, 120.0)
    part.x = part.y = 100.0
    mask = _render_one(part)
    r_out = part.radius
    r_in = float(np.sqrt((part.holes[0] ** 2).sum(axis=1)).max())
    xs = np.nonzero(mask)[1]
    # the ellipse's area: pi * a * b with b = a * (min/max extent)
    sy = float(np.abs(part.outer[:, 1]).max()) / r_out
    expected = math.pi * (r_out**2 - r_in**2) * sy
    assert mask.sum() == pytest.approx(expected, rel=0.04)
    assert not mask[100, 100]  # the hole
    assert xs.min() >= 100 - r_out - 1 and xs.max() <= 100 + r_out + 1


def test_occluded_parts_keep_at_least_half_and_masks_do_not_overlap() -> None:
    rng = np.random.default_rng(3)
    parts = place_parts(rng, 200, 200, 12, (50.0, 90.0), max_occlusion=0.5)
    belt = make_belt(rng, 200, 200)
    scene = render(belt, parts, rng, min_visible=1)
    stack = np.stack(scene.masks)
    assert stack.sum(axis=0).max() <= 1  # visible masks are disjoint
    for part, visible in zip(parts, scene.masks, strict=True):
        own = _render_one(
            Part(part.class_id, part.outer, part.holes, part.color, part.x, part.y, part.angle), 200
        )
        assert visible.sum() >= 0.5 * own.sum() - 2


def test_frames_hold_all_classes_cut_parts_and_varied_counts() -> None:
    classes: set[int] = set()
    counts = []
    touching_edge = 0
    for i in range(40):
        scene = random_scene(np.random.default_rng([11, 0, i]))
        classes.update(scene.class_ids)
        counts.append(len(scene.masks))
        for m in scene.masks:
            touching_edge += bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
    assert classes == set(range(len(CLASS_NAMES)))
    assert min(counts) <= 2 and max(counts) >= 7
    assert touching_edge > 5


def test_wide_samples_are_letterboxed_like_the_worker() -> None:
    shapes = set()
    for i in range(12):
        frame = eval_frame(0, TRAIN, i)
        sample = make_sample(0, TRAIN, i)
        shapes.add(frame.image.shape[:2])
        assert sample.image.shape == (320, 320, 3)
        assert sample.masks.shape[1:] == (80, 80)
        assert len(sample.boxes) == len(sample.class_ids) == len(sample.masks)
        if frame.image.shape[:2] != (320, 320):
            _, nh, _, top, _ = letterbox_params(*frame.image.shape[:2], 320)
            assert (sample.image[:top] == 114).all()
            assert (sample.boxes[:, 1] >= top - 1e-3).all() and (sample.boxes[:, 3] <= top + nh + 1e-3).all()
    assert shapes == {(320, 320), (360, 640)}


def test_crowded_training_frames_leave_other_streams_and_square_frames_alone() -> None:
    from training.data import DENSE_PARTS, VAL

    wide_plain, wide_dense = [], []
    for i in range(16):
        plain = eval_frame(0, VAL, i)
        # dense=0 is the stream as it always was (the option's extra draw is not made)
        assert np.array_equal(plain.image, eval_frame(0, VAL, i, dense=0.0).image)
        crowded = eval_frame(0, TRAIN, i, dense=1.0)
        if crowded.image.shape[:2] == (320, 320):
            # square frames are drawn before the crowded choice: the same frame either way
            assert np.array_equal(crowded.image, eval_frame(0, TRAIN, i).image)
        else:
            wide_dense.append(len(crowded.masks))
            wide_plain.append(len(eval_frame(0, TRAIN, i).masks))
    assert wide_dense, "no wide frame among the first 16"
    assert min(wide_dense) >= DENSE_PARTS[0] // 2  # placements hiding over half a part are refused
    assert max(wide_dense) <= 16  # MAX_INSTANCES: nothing is cut off when the cache pads
    assert np.mean(wide_dense) > np.mean(wide_plain) + 3
