"""Post-processing: filters, NMS, box mapping and the three mask decode modes.

Mask decoding is compared with slow full-frame references written here in float64 (every frame pixel
sampled from the full prototype logits, then cut to the box). The implementation computes logits in
float32 on the box's prototype region, so a pixel may only disagree where the reference logit is within
``LOGIT_TOL`` of 0: float32 logits of 32 terms of magnitude ~5 carry errors ~1e-5, and such pixels
have probability 0.5 +- 2.5e-5.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import cv2
import numpy as np
import pytest

from worker.models.letterbox import compute_letterbox
from worker.step.postprocess import (
    PostprocessParams,
    decode_masks,
    map_boxes_to_frame,
    nms,
    postprocess_frame,
)

LOGIT_TOL = 1e-4
M = 32


@dataclass(frozen=True)
class Box:
    """A letterbox with any (also fractional) padding, to check the Protocol works with other objects."""

    scale: float
    pad_x: float
    pad_y: float
    orig_size: tuple[int, int]
    input_size: tuple[int, int]


def make_predictions(boxes_xyxy, scores, coefficients=None) -> np.ndarray:
    """``(4 + C + 32, N)`` from input-pixel xyxy boxes and ``(N, C)`` class scores."""
    boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(len(boxes), -1)
    if coefficients is None:  # logit = prototype 0: with PROTOS_ONES every crop is full (kept)
        coefficients = np.zeros((len(boxes), M), np.float32)
        coefficients[:, 0] = 1.0
    coef = coefficients
    cxcywh = np.stack(
        [(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, *(boxes[:, 2:] - boxes[:, :2]).T],
        1,
    )
    return np.concatenate([cxcywh, scores, coef], axis=1).T.astype(np.float32)


def smooth_prototypes(rng: np.random.Generator, size=(160, 160)) -> np.ndarray:
    """Blob-like prototypes: low-resolution noise upsampled (realistic smooth masks)."""
    low = rng.normal(size=(M, 8, 8)).astype(np.float32)
    return np.stack([cv2.resize(p, size[::-1], interpolation=cv2.INTER_CUBIC) for p in low])


PROTOS_ONES = np.ones((M, 160, 160), np.float32)
LB640 = compute_letterbox((640, 640), (640, 640))


def run(boxes, scores, **params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Post-process hand-made candidates on a 640x640 frame; returns (xyxy, confidence, class_id)."""
    dets = postprocess_frame(make_predictions(boxes, scores), PROTOS_ONES, LB640, PostprocessParams(**params))
    return dets.xyxy, dets.confidence, dets.class_id


A = [0, 0, 100, 100]
A_SHIFT = [10, 0, 110, 100]  # IoU with A = 90 / 110
B = [300, 300, 400, 400]
C = [500, 500, 600, 600]


@pytest.mark.parametrize(
    ("boxes", "scores", "params", "expected_conf", "expected_cls"),
    [
        # confidence: kept when score >= threshold (0.5 is exact in float32)
        ([A, B], [[0.5], [0.4999]], {"confidence": 0.5}, [0.5], [0]),
        # score is the best class score, class its argmax
        ([A], [[0.2, 0.7, 0.6]], {"confidence": 0.5}, [0.7], [1]),
        # per-class thresholds (best): class 0 needs 0.8, class 1 needs 0.25
        (
            [A, B, C],
            [[0.75, 0.1], [0.1, 0.25], [0.8, 0.0]],
            {"confidence": np.array([0.8, 0.25])},
            [0.8, 0.25],
            [0, 1],
        ),
        # class filter before agnostic NMS: the better class-1 box does not suppress the class-0 box
        (
            [A, A_SHIFT],
            [[0.0, 0.9], [0.6, 0.0]],
            {"class_ids": np.array([0]), "class_agnostic_nms": True},
            [0.6],
            [0],
        ),
        # without the filter it does
        ([A, A_SHIFT], [[0.0, 0.9], [0.6, 0.0]], {"class_agnostic_nms": True}, [0.9], [1]),
        # filtered classes do not use up max_detections
        (
            [A, B, C],
            [[0, 0.9], [0, 0.8], [0.5, 0]],
            {"class_ids": np.array([0]), "max_detections": 1},
            [0.5],
            [0],
        ),
        # per-class NMS keeps overlapping boxes of different classes, agnostic does not
        ([A, A_SHIFT], [[0.9, 0], [0, 0.8]], {}, [0.9, 0.8], [0, 1]),
        ([A, A_SHIFT], [[0.9, 0], [0, 0.8]], {"class_agnostic_nms": True}, [0.9], [0]),
        # same class: suppressed
        ([A, A_SHIFT], [[0.9], [0.8]], {}, [0.9], [0]),
        # max_candidates cuts before NMS: A, A_SHIFT enter, A_SHIFT is suppressed, C never entered
        ([A, A_SHIFT, C], [[0.9], [0.8], [0.7]], {"max_candidates": 2}, [0.9], [0]),
        ([A, A_SHIFT, C], [[0.9], [0.8], [0.7]], {"max_candidates": 3}, [0.9, 0.7], [0, 0]),
        # max_detections keeps the highest scores after NMS
        ([C, A, B], [[0.5], [0.9], [0.7]], {"max_detections": 2}, [0.9, 0.7], [0, 0]),
        # nothing passes
        ([A, B], [[0.1], [0.2]], {"confidence": 0.3}, [], []),
    ],
)
def test_filters_and_nms(boxes, scores, params, expected_conf, expected_cls) -> None:
    _, conf, cls = run(boxes, scores, **params)
    np.testing.assert_allclose(conf, np.asarray(expected_conf, np.float32))
    assert cls.tolist() == expected_cls


@pytest.mark.parametrize(
    ("threshold", "kept"),
    [(0.5, 2), (0.5 - 1e-9, 1), (0.0, 1), (1.0, 2)],
)
def test_nms_iou_boundary(threshold: float, kept: int) -> None:
    # IoU([0,0,10,10], [0,0,10,5]) = 50 / 100 = 0.5 exactly: equal to the threshold is kept
    out = nms(np.array([[0, 0, 10, 10], [0, 0, 10, 5]]), np.array([0.9, 0.8]), np.array([0, 0]), threshold)
    assert len(out) == kept


def test_nms_touching_boxes_and_zero_threshold() -> None:
    # touching boxes have IoU 0: never suppressed, even at threshold 0; degenerate boxes neither
    boxes = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [5, 5, 5, 5]])
    assert nms(boxes, np.array([0.9, 0.8, 0.7]), np.zeros(3, int), 0.0).tolist() == [0, 1, 2]


def test_nms_matches_brute_force_and_max_keep() -> None:
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 200, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (300, 2))], 1)
    score, cls = rng.random(300), rng.integers(0, 3, 300)
    for agnostic in (False, True):
        order, kept = np.argsort(-score, kind="stable"), []
        for i in order:  # the textbook definition, one pair at a time
            ok = True
            for j in kept:
                if agnostic or cls[i] == cls[j]:
                    iw = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
                    ih = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
                    a_i = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
                    a_j = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
                    ok &= iw * ih / (a_i + a_j - iw * ih) <= 0.45
            if ok:
                kept.append(i)
        got = nms(boxes, score, cls, 0.45, class_agnostic=agnostic)
        assert got.tolist() == kept
        assert nms(boxes, score, cls, 0.45, class_agnostic=agnostic, max_keep=7).tolist() == kept[:7]


@pytest.mark.parametrize(
    ("frame", "input_size"),
    [
        ((1080, 1920), (640, 640)),
        ((480, 640), (640, 640)),
        ((1920, 1080), (640, 640)),
        ((300, 300), (640, 640)),
        ((479, 641), (480, 640)),
        ((100, 50), (640, 640)),
    ],
)
def test_boxes_map_back_to_frame(frame, input_size) -> None:
    lb = compute_letterbox(frame, input_size)
    height, width = frame
    frame_box = np.array([0.1 * width, 0.2 * height, 0.6 * width, 0.9 * height])
    input_box = frame_box * lb.scale + [lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y]
    protos = np.ones((M, input_size[0] // 4, input_size[1] // 4), np.float32)
    dets = postprocess_frame(make_predictions([input_box], [[0.9]]), protos, lb, PostprocessParams())
    np.testing.assert_allclose(dets.xyxy[0], frame_box, rtol=0, atol=1e-3 * max(frame))
    assert dets.frame_shape == frame


def test_boxes_clipped_to_frame() -> None:
    lb = compute_letterbox((1080, 1920), (640, 640))  # scale 1/3, pad_y 140
    out = map_boxes_to_frame(np.array([[-30.0, 100.0, 700.0, 200.0]]), lb)
    np.testing.assert_allclose(out, [[0.0, 0.0, 1920.0, 180.0]], atol=1e-4)


# ---- masks -------------------------------------------------------------------------------------


def proto_axis(lb, axis: int, proto_size: int):
    """(origin, q) of frame -> prototype coordinates along axis 0 (y) or 1 (x)."""
    in_size, pad = lb.input_size[axis], (lb.pad_y, lb.pad_x)[axis]
    return pad * proto_size / in_size, lb.scale * proto_size / in_size


def reference_masks(coef, protos, xyxy, lb, mode):
    """Full-frame float64 reference, per instance: yields the (H, W) mask and the logits behind it."""
    height, width = lb.orig_size
    _, ph, pw = protos.shape
    (oy, qy), (ox, qx) = proto_axis(lb, 0, ph), proto_axis(lb, 1, pw)
    cy = oy + (np.arange(height) + 0.5) * qy
    cx = ox + (np.arange(width) + 0.5) * qx
    for c, b in zip(coef.astype(np.float64), xyxy.astype(np.float64), strict=True):
        logits = (c @ protos.reshape(M, -1).astype(np.float64)).reshape(ph, pw)
        if mode == "fast":
            iy, ix = (
                np.clip(np.floor(cy).astype(int), 0, ph - 1),
                np.clip(np.floor(cx).astype(int), 0, pw - 1),
            )
            full = logits[iy[:, None], ix[None, :]]
        else:
            uy, ux = np.clip(cy - 0.5, 0, ph - 1), np.clip(cx - 0.5, 0, pw - 1)
            y0, x0 = np.floor(uy).astype(int), np.floor(ux).astype(int)
            y1, x1 = np.minimum(y0 + 1, ph - 1), np.minimum(x0 + 1, pw - 1)
            wy, wx = (uy - y0)[:, None], (ux - x0)[None, :]
            full = (
                logits[y0[:, None], x0] * (1 - wy) * (1 - wx)
                + logits[y0[:, None], x1] * (1 - wy) * wx
                + logits[y1[:, None], x0] * wy * (1 - wx)
                + logits[y1[:, None], x1] * wy * wx
            )
        centre_x, centre_y = np.arange(width) + 0.5, np.arange(height) + 0.5
        inside = ((centre_y >= b[1]) & (centre_y < b[3]))[:, None] & ((centre_x >= b[0]) & (centre_x < b[2]))[
            None, :
        ]
        yield (full > 0) & inside, full


def random_instances(rng, lb, n=12, protos_size=(160, 160)):
    height, width = lb.orig_size
    xy = rng.uniform([-0.1 * width, -0.1 * height], [0.9 * width, 0.9 * height], (n, 2))
    wh = rng.uniform(0.02, 0.5, (n, 2)) * [width, height]
    xyxy = np.concatenate([xy, xy + wh], 1)
    xyxy = np.clip(xyxy, 0, [width, height, width, height]).astype(np.float32)
    xyxy[0] = [0, 0, width, height]  # one box touching every edge
    coef = rng.normal(size=(n, M)).astype(np.float32)
    return coef, smooth_prototypes(rng, protos_size), xyxy


GEOMETRIES = [
    compute_letterbox((1080, 1920), (640, 640)),
    compute_letterbox((97, 131), (640, 640)),  # frame smaller than the prototype grid's content
    compute_letterbox((479, 641), (480, 640)),
    Box(scale=0.37, pad_x=13.5, pad_y=101.25, orig_size=(1000, 1500), input_size=(640, 640)),
]


@pytest.mark.parametrize("mode", ["accurate", "fast"])
@pytest.mark.parametrize("lb", GEOMETRIES, ids=lambda lb: f"{lb.orig_size}")
def test_crop_masks_equal_full_frame_reference(lb, mode) -> None:
    rng = np.random.default_rng(11)
    proto_hw = (lb.input_size[0] // 4, lb.input_size[1] // 4)
    coef, protos, xyxy = random_instances(rng, lb, n=8, protos_size=proto_hw)
    coef_in, protos_in = coef.copy(), protos.copy()
    crops = decode_masks(coef, protos, xyxy, lb, mode)
    np.testing.assert_array_equal(coef, coef_in)
    np.testing.assert_array_equal(protos, protos_in)
    non_empty = 0
    for i, (ref, logits) in enumerate(reference_masks(coef, protos, xyxy, lb, mode)):
        diff = crops.paste(i, lb.orig_size) != ref
        assert np.all(np.abs(logits[diff]) < LOGIT_TOL), f"instance {i}: {diff.sum()} pixels differ"
        non_empty += bool(ref.any())
    assert non_empty >= len(xyxy) // 2  # the comparison is not vacuous


@pytest.mark.parametrize(
    ("frame", "input_size"), [((1280, 1280), (640, 640)), ((320, 320), (640, 640)), ((960, 1280), (480, 640))]
)
def test_accurate_matches_cv2_resize_without_padding(frame, input_size) -> None:
    # Without padding, "accurate" is plain bilinear upsampling of the whole prototype map (cv2.resize,
    # align_corners=False), cut to the box: an independent check of the coordinate conventions.
    lb = compute_letterbox(frame, input_size)
    assert (lb.pad_x, lb.pad_y) == (0, 0)
    rng = np.random.default_rng(5)
    protos = smooth_prototypes(rng, (input_size[0] // 4, input_size[1] // 4))
    coef = rng.normal(size=(1, M)).astype(np.float32)
    box = np.array([[0.13 * frame[1], 0.21 * frame[0], 0.77 * frame[1], 0.93 * frame[0]]], np.float32)
    logits = (coef @ protos.reshape(M, -1)).reshape(protos.shape[1:])
    full = cv2.resize(logits, frame[::-1], interpolation=cv2.INTER_LINEAR)
    got = decode_masks(coef, protos, box, lb, "accurate")
    x0, y0 = got.offsets[0]
    h, w = got.crops[0].shape
    assert (x0, y0) == (int(np.ceil(box[0, 0] - 0.5)), int(np.ceil(box[0, 1] - 0.5)))
    want = full[y0 : y0 + h, x0 : x0 + w] > 0
    diff = got.crops[0] != want
    assert np.all(np.abs(full[y0 : y0 + h, x0 : x0 + w][diff]) < LOGIT_TOL)


@pytest.mark.parametrize("lb", GEOMETRIES, ids=lambda lb: f"{lb.orig_size}")
def test_tradeoff_endpoints_are_fast_and_accurate_bit_for_bit(lb) -> None:
    rng = np.random.default_rng(7)
    coef, protos, xyxy = random_instances(rng, lb, protos_size=(lb.input_size[0] // 4, lb.input_size[1] // 4))
    for factor, mode in ((0.0, "fast"), (1.0, "accurate")):
        trade = decode_masks(coef, protos, xyxy, lb, "tradeoff", factor)
        other = decode_masks(coef, protos, xyxy, lb, mode)
        np.testing.assert_array_equal(trade.offsets, other.offsets)
        for a, b in zip(trade.crops, other.crops, strict=True):
            np.testing.assert_array_equal(a, b)


def test_tradeoff_approaches_accurate_monotonically() -> None:
    lb = compute_letterbox((1080, 1920), (640, 640))
    rng = np.random.default_rng(9)
    coef, protos, xyxy = random_instances(rng, lb, n=30)
    accurate = decode_masks(coef, protos, xyxy, lb, "accurate").crops
    ious = []
    for factor in (0.0, 0.25, 0.5, 0.75, 1.0):
        crops = decode_masks(coef, protos, xyxy, lb, "tradeoff", factor).crops
        inter = sum(int((a & b).sum()) for a, b in zip(crops, accurate, strict=True))
        union = sum(int((a | b).sum()) for a, b in zip(crops, accurate, strict=True))
        ious.append(inter / union)
    assert ious == sorted(ious) and ious[-1] == 1.0
    assert ious[0] < 0.99  # fast differs visibly at 1080p: the test can tell the modes apart


@pytest.mark.parametrize("factor", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_tradeoff_resolution_follows_factor(factor: float) -> None:
    # A logit field linear in x (prototype column k minus c) crosses 0 at x = c. Sweeping c over a few
    # prototype cells (12 frame pixels each at 1080p), the mask boundary only takes positions at the
    # decoding grid's cell edges; their spacing is the grid's cell size in frame pixels, which for
    # resolution proto + (frame - proto) * factor is 12 / (1 + 11 * factor).
    lb = compute_letterbox((1080, 1920), (640, 640))
    protos = np.zeros((M, 160, 160), np.float32)
    protos[0] = np.arange(160, dtype=np.float32)[None, :]
    protos[1] = 1.0
    box = np.array([[600, 500, 900, 502]], np.float32)  # x = 12 * c for c in [60, 64): 720..768
    edges = set()
    for c in np.linspace(60.0, 64.0, 200, endpoint=False):
        coef = np.zeros((1, M), np.float32)
        coef[0, :2] = [1.0, -c]
        crop = decode_masks(coef, protos, box, lb, "tradeoff", factor).crops[0]
        edges.add(int(np.argmax(crop[0])))
    spacing = (max(edges) - min(edges)) / (len(edges) - 1)
    assert spacing == pytest.approx(12 / (1 + 11 * factor), rel=0.1)


@pytest.mark.parametrize(
    ("box", "offset", "shape"),
    [
        ([10.3, 20.0, 30.7, 40.5], (10, 20), (20, 21)),  # pixels whose centre is in the box
        ([10.5, 20.5, 11.5, 21.5], (10, 20), (1, 1)),
        ([10.6, 20.0, 11.4, 30.0], (11, 20), (10, 0)),  # narrower than a pixel centre gap: empty
        ([0.0, 0.0, 640.0, 640.0], (0, 0), (640, 640)),
    ],
)
def test_crop_covers_pixels_whose_centre_is_in_the_box(box, offset, shape) -> None:
    crops = decode_masks(
        np.ones((1, M), np.float32), PROTOS_ONES, np.array([box], np.float32), LB640, "accurate"
    )
    assert tuple(crops.offsets[0]) == offset
    assert crops.crops[0].shape == shape
    assert crops.crops[0].all()


def test_postprocess_end_to_end_masks_and_empty_input() -> None:
    lb = compute_letterbox((720, 1280), (640, 640))  # scale 0.5, pad_y 140
    rng = np.random.default_rng(1)
    protos = smooth_prototypes(rng)
    coef = rng.normal(size=(2, M)).astype(np.float32)
    preds = make_predictions([[100, 200, 300, 400], [320, 150, 620, 480]], [[0.9], [0.8]], coef)
    preds_in = preds.copy()
    dets = postprocess_frame(
        preds, protos, lb, PostprocessParams(mask_decode_mode="tradeoff", tradeoff_factor=0.5)
    )
    np.testing.assert_array_equal(preds, preds_in)
    np.testing.assert_allclose(dets.xyxy, [[200, 120, 600, 520], [640, 20, 1240, 680]], atol=1e-3)
    assert [c.shape for c in dets.masks.crops] == [(400, 400), (660, 600)]
    empty = postprocess_frame(np.zeros((4 + 3 + M, 0), np.float32), protos, lb, PostprocessParams())
    assert len(empty) == 0 and empty.frame_shape == (720, 1280)


@pytest.mark.parametrize(
    ("kwargs", "context"),
    [
        ({}, nullcontext()),
        ({"confidence": 1.5}, pytest.raises(ValueError, match="confidence")),
        ({"confidence": np.array([0.2, -0.1])}, pytest.raises(ValueError, match="confidence")),
        ({"iou_threshold": -0.1}, pytest.raises(ValueError, match="iou_threshold")),
        ({"max_detections": 0}, pytest.raises(ValueError, match="max_detections")),
        ({"mask_decode_mode": "best"}, pytest.raises(ValueError, match="mask_decode_mode")),
        ({"tradeoff_factor": 2.0}, pytest.raises(ValueError, match="tradeoff_factor")),
    ],
)
def test_params_validation(kwargs, context) -> None:
    with context:
        PostprocessParams(**kwargs)


@pytest.mark.parametrize(
    ("preds_shape", "protos_shape", "params", "match"),
    [
        ((4 + M, 5), (M, 160, 160), {}, "predictions"),  # no class rows
        ((4 + 2 + M, 5), (M, 160), {}, "prototypes"),
        ((4 + 2 + M, 5), (M, 160, 160), {"confidence": np.array([0.1, 0.2, 0.3])}, "per-class"),
    ],
)
def test_postprocess_rejects_bad_shapes(preds_shape, protos_shape, params, match) -> None:
    with pytest.raises(ValueError, match=match):
        postprocess_frame(
            np.zeros(preds_shape, np.float32),
            np.zeros(protos_shape, np.float32),
            LB640,
            PostprocessParams(**params),
        )
