"""The shipped demo clip and its COCO ground truth."""

from __future__ import annotations

import itertools
import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from training.evaluate import DEFAULT_ASSETS
from training.make_clip import CLIP_FILE, CLIP_SPEED, GT_FILE, render_clip_frames


@pytest.fixture(scope="module")
def gt() -> dict:
    return json.loads((DEFAULT_ASSETS / GT_FILE).read_text())


def test_clip_reads_back_with_opencv(gt: dict) -> None:
    path = DEFAULT_ASSETS / CLIP_FILE
    assert path.stat().st_size < 8 * 1024 * 1024
    cap = cv2.VideoCapture(str(path))
    try:
        assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(25.0)
        ok, first = cap.read()
        assert ok and first.shape == (720, 1280, 3)
        frames = 1
        while cap.grab():
            frames += 1
    finally:
        cap.release()
    assert frames == len(gt["images"]) == 250


def test_ground_truth_is_consistent_rle(gt: dict) -> None:
    assert [c["name"] for c in gt["categories"]] == ["nut", "washer", "bolt", "bracket"]
    assert len(gt["annotations"]) > 5 * len(gt["images"])
    for ann in gt["annotations"][::97]:
        m = mask_utils.decode(ann["segmentation"])
        assert m.shape == (720, 1280) and int(m.sum()) == ann["area"]
        ys, xs = np.nonzero(m)
        assert ann["bbox"] == [
            float(xs.min()),
            float(ys.min()),
            float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1),
        ]


def test_parts_move_along_the_belt_frame_to_frame(gt: dict) -> None:
    speed = gt["info"]["speed_px_per_frame"]
    assert speed == CLIP_SPEED
    boxes: dict[int, list[list[float]]] = {}
    for ann in gt["annotations"]:
        boxes.setdefault(ann["image_id"], []).append(ann["bbox"])
    a, b = np.array(boxes[100]), np.array(boxes[101])
    inside = a[(a[:, 0] > 10) & (a[:, 0] + a[:, 2] < 1280 - 10 - speed)]
    assert len(inside) >= 3
    moved = inside + np.array([speed, 0, 0, 0])
    # every part fully inside both frames shows up `speed` px further right in the next one, same size
    for box in moved:
        assert np.abs(b - box).max(axis=1).min() <= 1.0


def test_clip_shows_many_distinct_parts(gt: dict) -> None:
    # one part per track: a part enters at the left edge, rides the belt and leaves at the right
    from training.clip_parts import link_tracks

    tracks = link_tracks(gt)
    long_tracks = [t for t in tracks if len(t) >= 20]
    assert len(long_tracks) >= 40, len(long_tracks)


def test_generator_reproduces_the_shipped_ground_truth(gt: dict) -> None:
    frames = itertools.islice(render_clip_frames(0), 3)  # the first 3 frames
    for t, (img, masks, classes) in enumerate(frames):
        anns = [a for a in gt["annotations"] if a["image_id"] == t + 1]
        assert img.shape == (720, 1280, 3)
        assert [a["category_id"] - 1 for a in anns] == classes
        for a, m in zip(anns, masks, strict=True):
            assert mask_utils.decode(a["segmentation"]).astype(bool).tolist() == m.tolist()
