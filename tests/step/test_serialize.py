"""The predictions JSON: shape, rounding, plain types, polygons and RLE masks."""

from __future__ import annotations

import itertools
import json
import uuid
import warnings
from typing import Any

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest

from worker.models.letterbox import compute_letterbox
from worker.step.detections import Detections, MaskCrops
from worker.step.postprocess import PostprocessParams, postprocess_frame
from worker.step.serialize import mask_to_polygon, serialize_predictions

NAMES = ["bolt", "nut", "washer"]


def dets_with(crops: list[np.ndarray], offsets: list[tuple[int, int]], frame_shape=(50, 80)) -> Detections:
    n = len(crops)
    xyxy = [[x, y, x + c.shape[1], y + c.shape[0]] for c, (x, y) in zip(crops, offsets, strict=True)]
    return Detections(
        xyxy=np.array(xyxy, np.float32).reshape(n, 4),
        confidence=np.linspace(0.912345, 0.5, n).astype(np.float32),
        class_id=np.arange(n) % len(NAMES),
        masks=MaskCrops(crops, offsets),
        frame_shape=frame_shape,
    )


def plain_types_only(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_types_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain_types_only(v) for v in value)
    return type(value) in (int, float, str, bool) or value is None


@pytest.mark.parametrize("mask_format", ["polygon", "rle"])
def test_shape_types_and_rounding(mask_format) -> None:
    dets = Detections(
        xyxy=np.array([[10.04, 20.26, 30.51, 41.0]], np.float32),
        confidence=np.array([0.876543], np.float32),
        class_id=np.array([1]),
        masks=MaskCrops([np.ones((21, 20), bool)], [(10, 20)]),
        frame_shape=(50, 80),
    )
    out = serialize_predictions(dets, NAMES, parent_id="cam1:7", mask_format=mask_format)
    assert plain_types_only(out)
    json.dumps(out)
    assert out["image"] == {"width": 80, "height": 50}
    (pred,) = out["predictions"]
    expected = {"x": 20.3, "y": 30.6, "width": 20.5, "height": 20.7, "confidence": 0.8765, "class": "nut"}
    assert {k: pred[k] for k in expected} == expected
    assert pred["class_id"] == 1 and pred["parent_id"] == "cam1:7"
    assert uuid.UUID(pred["detection_id"]).version == 4
    assert ("points" in pred) == (mask_format == "polygon") and ("rle_mask" in pred) == (mask_format == "rle")


def test_no_detections_still_reports_image_size() -> None:
    out = serialize_predictions(Detections.empty((720, 1280)), NAMES, parent_id="p", mask_format="rle")
    assert out == {"image": {"width": 1280, "height": 720}, "predictions": []}


def test_detection_ids_are_unique_and_injectable() -> None:
    dets = dets_with([np.ones((3, 3), bool)] * 4, [(0, 0), (5, 5), (10, 10), (20, 20)])
    ids = [
        p["detection_id"]
        for p in serialize_predictions(dets, NAMES, parent_id="p", mask_format="rle")["predictions"]
    ]
    assert len(set(ids)) == 4
    counter = itertools.count()
    out = serialize_predictions(
        dets, NAMES, parent_id="p", mask_format="rle", id_factory=lambda: f"d{next(counter)}"
    )
    assert [p["detection_id"] for p in out["predictions"]] == ["d0", "d1", "d2", "d3"]


def test_empty_masks_dropped_from_polygons_kept_in_rle() -> None:
    dets = dets_with(
        [np.zeros((4, 4), bool), np.ones((4, 4), bool), np.zeros((0, 3), bool)], [(0, 0), (9, 9), (20, 20)]
    )
    poly = serialize_predictions(dets, NAMES, parent_id="p", mask_format="polygon")["predictions"]
    rle = serialize_predictions(dets, NAMES, parent_id="p", mask_format="rle")["predictions"]
    assert [p["class_id"] for p in poly] == [1]
    assert [p["class_id"] for p in rle] == [0, 1, 2]
    assert rle[0]["rle_mask"] == {
        "size": [50, 80],
        "counts": mask_utils.encode(np.zeros((50, 80), np.uint8, "F"))["counts"].decode(),
    }


def test_polygon_is_the_largest_outer_contour_in_frame_coordinates() -> None:
    crop = np.zeros((20, 30), bool)
    crop[2:5, 2:5] = True  # small blob
    crop[8:18, 10:28] = True  # large blob
    crop[11:14, 14:20] = False  # a hole: the outer contour ignores it
    points = mask_to_polygon(crop, (100, 200))
    xy = np.array([[p["x"], p["y"]] for p in points])
    assert xy.min(axis=0).tolist() == [110, 208] and xy.max(axis=0).tolist() == [127, 217]
    assert cv2.contourArea(xy.astype(np.float32)) == 17 * 9  # corner pixel centres of an 18x10 block


def test_polygon_points_lie_on_mask_pixels() -> None:
    yy, xx = np.mgrid[0:40, 0:60]
    crop = (yy - 20) ** 2 / 15**2 + (xx - 30) ** 2 / 25**2 < 1
    full = np.zeros((100, 100), bool)
    full[30:70, 20:80] = crop
    points = mask_to_polygon(crop, (20, 30))
    assert len(points) >= 3
    assert all(full[int(p["y"]), int(p["x"])] for p in points)


@pytest.mark.parametrize(
    ("crop", "expected"),
    [
        (np.ones((1, 1), bool), [(-0.5, -0.5), (-0.5, 0.5), (0.5, 0.5), (0.5, -0.5)]),
        (np.ones((1, 4), bool), [(-0.5, -0.5), (-0.5, 0.5), (3.5, 0.5), (3.5, -0.5)]),
        (np.ones((3, 1), bool), [(-0.5, -0.5), (-0.5, 2.5), (0.5, 2.5), (0.5, -0.5)]),
        (np.zeros((3, 3), bool), []),
        (np.zeros((0, 3), bool), []),
    ],
)
def test_degenerate_masks_get_at_least_three_points(crop, expected) -> None:
    points = mask_to_polygon(crop, (10, 20))
    assert [(p["x"] - 10, p["y"] - 20) for p in points] == expected


def test_rle_output_decodes_to_the_instance_masks() -> None:
    # end to end: raw model outputs -> post-processing -> v4 JSON -> pycocotools.decode == the masks
    rng = np.random.default_rng(0)
    lb = compute_letterbox((360, 500), (640, 640))
    low = rng.normal(size=(32, 8, 8)).astype(np.float32)
    protos = np.stack([cv2.resize(p, (160, 160), interpolation=cv2.INTER_CUBIC) for p in low])
    boxes = rng.uniform(100, 400, (6, 2))
    preds = np.concatenate(
        [np.c_[boxes, rng.uniform(40, 200, (6, 2))], rng.uniform(0.5, 1, (6, 3)), rng.normal(size=(6, 32))], 1
    ).T.astype(np.float32)
    dets = postprocess_frame(preds, protos, lb, PostprocessParams(iou_threshold=0.9))
    out = serialize_predictions(dets, NAMES, parent_id="p", mask_format="rle")
    assert len(out["predictions"]) == len(dets) >= 3
    for i, pred in enumerate(out["predictions"]):
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", "__array__ implementation", DeprecationWarning
            )  # pycocotools/numpy 2
            decoded = mask_utils.decode(
                {"size": pred["rle_mask"]["size"], "counts": pred["rle_mask"]["counts"]}
            )
        np.testing.assert_array_equal(decoded.astype(bool), dets.masks.paste(i, (360, 500)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"mask_format": "bitmap"}, "mask_format"), ({"mask_format": "rle", "class_names": ["a"]}, "class ids")],
)
def test_errors(kwargs, match) -> None:
    dets = dets_with([np.ones((2, 2), bool)] * 2, [(0, 0), (3, 3)])
    fields = {"class_names": NAMES, "parent_id": "p"} | kwargs
    with pytest.raises(ValueError, match=match):
        serialize_predictions(dets, **fields)
