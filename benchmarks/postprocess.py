"""Post-processing and RLE benchmark on synthetic but realistic raw model outputs.

Scenarios: a 1920x1080 frame with 100 instances and a 640x480 frame with 10, letterboxed into a
640x640 model input (8400 candidates, C = 4 classes, 32 x 160 x 160 prototypes). Each instance has a
few lower-scored jittered duplicates (work for NMS); the other candidates score below the threshold.

Timed:
    * ``postprocess_frame`` (filters, NMS, box mapping, mask decoding on crops) per decode mode;
      median ms per frame.
    * RLE of the resulting masks: ``encode_crop`` (crop + offset -> COCO string) against
      ``pycocotools.mask.encode`` of the full-frame Fortran-ordered uint8 masks. Building the
      full-frame masks for pycocotools is NOT timed (that favours pycocotools); the crop encoder's
      time includes everything it does.

Runs on one core: ``OMP_NUM_THREADS=1`` etc. are set before numpy loads, ``cv2.setNumThreads(1)``.

Usage::

    python -m benchmarks.postprocess [--repeats 15]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pycocotools.mask as mask_utils  # noqa: E402

from worker.models.letterbox import compute_letterbox  # noqa: E402
from worker.step.detections import Detections  # noqa: E402
from worker.step.postprocess import PostprocessParams, postprocess_frame  # noqa: E402
from worker.step.rle import encode_crop, encode_crops  # noqa: E402

NUM_CLASSES = 4
NUM_CANDIDATES = 8400
TARGET_RLE_SPEEDUP = 5.0
TARGET_ACCURATE_1080P_MS = 50.0


@dataclass(frozen=True)
class Scenario:
    name: str
    frame: tuple[int, int]  # (H, W)
    instances: int


SCENARIOS = (Scenario("1080p", (1080, 1920), 100), Scenario("480p", (480, 640), 10))
MODES: tuple[tuple[str, float], ...] = (("accurate", 0.0), ("tradeoff", 0.5), ("fast", 0.0))


def make_outputs(scenario: Scenario, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, object]:
    """Raw outputs ``(predictions [4+C+32, N], prototypes [32, 160, 160], letterbox)``."""
    lb = compute_letterbox(scenario.frame, (640, 640))
    height, width = scenario.frame
    # instances: boxes 3-15 % of the frame's width, spread over a grid so most survive NMS
    n = scenario.instances
    side = int(np.ceil(np.sqrt(n)))
    cells = rng.permutation(side * side)[:n]
    centre = (np.c_[cells % side, cells // side] + rng.uniform(0.3, 0.7, (n, 2))) / side * [width, height]
    size = rng.uniform(0.03, 0.15, (n, 2)) * width
    frame_boxes = np.c_[centre - size / 2, centre + size / 2]
    input_boxes = frame_boxes * lb.scale + [lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y]
    preds = np.zeros((4 + NUM_CLASSES + 32, NUM_CANDIDATES), np.float32)
    # background candidates: random boxes, scores below 0.3
    xy = rng.uniform(0, 640, (NUM_CANDIDATES, 2))
    preds[:2] = xy.T
    preds[2:4] = rng.uniform(8, 120, (2, NUM_CANDIDATES))
    preds[4 : 4 + NUM_CLASSES] = rng.uniform(0, 0.3, (NUM_CLASSES, NUM_CANDIDATES))
    preds[4 + NUM_CLASSES :] = rng.normal(size=(32, NUM_CANDIDATES))
    # each instance: one strong candidate and 4 jittered duplicates with lower scores
    columns = rng.choice(NUM_CANDIDATES, n * 5, replace=False).reshape(n, 5)
    for i in range(n):
        cls = rng.integers(NUM_CLASSES)
        coef = rng.normal(size=32).astype(np.float32)
        for j, col in enumerate(columns[i]):
            box = input_boxes[i] + (rng.normal(0, 2, 4) if j else 0)
            preds[:4, col] = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]]
            preds[4 : 4 + NUM_CLASSES, col] = 0.05
            preds[4 + cls, col] = 0.95 - 0.1 * j
            preds[4 + NUM_CLASSES :, col] = coef + rng.normal(0, 0.05, 32)
    low = rng.normal(size=(32, 10, 10)).astype(np.float32)
    protos = np.stack([cv2.resize(p, (160, 160), interpolation=cv2.INTER_CUBIC) for p in low])
    return preds, protos, lb


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def rle_times(dets: Detections, repeats: int) -> tuple[float, float]:
    """(crop encoder ms, pycocotools full-frame ms) for all instances of one frame, medians."""
    shape = dets.frame_shape
    crops = list(zip(dets.masks.crops, (tuple(int(v) for v in o) for o in dets.masks.offsets), strict=True))

    def crop_encode() -> None:  # what serialization runs: all of a frame's crops in one call
        encode_crops(dets.masks.crops, dets.masks.offsets, shape)

    full_masks = [np.asfortranarray(dets.masks.paste(i, shape).astype(np.uint8)) for i in range(len(dets))]

    def coco_encode() -> None:
        for full in full_masks:  # built above, not timed
            mask_utils.encode(full)

    for i, (crop, offset) in enumerate(crops):  # same strings, or the comparison means nothing
        want = mask_utils.encode(full_masks[i])["counts"].decode()
        if encode_crop(crop, offset, shape)["counts"] != want:
            raise AssertionError(f"instance {i}: crop RLE differs from pycocotools")
    return median_ms(crop_encode, repeats), median_ms(coco_encode, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per measurement (median)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    results: dict[tuple[str, str], float] = {}
    speedups: dict[str, float] = {}
    print(f"threads: OMP={os.environ['OMP_NUM_THREADS']} cv2={cv2.getNumThreads()}; repeats={args.repeats}")
    for scenario in SCENARIOS:
        preds, protos, lb = make_outputs(scenario, rng)
        height, width = scenario.frame
        count = f"{scenario.instances} instances, {NUM_CANDIDATES} candidates"
        print(f"\n{scenario.name}: {width}x{height}, {count}")
        dets = None
        for mode, factor in MODES:
            params = PostprocessParams(mask_decode_mode=mode, tradeoff_factor=factor)  # type: ignore[arg-type]
            ms = median_ms(lambda a=(preds, protos, lb, params): postprocess_frame(*a), args.repeats)
            results[(scenario.name, mode)] = ms
            out = postprocess_frame(preds, protos, lb, params)
            pixels = int(out.masks.area().sum())
            label = f"{mode}" + (f" (factor {factor})" if mode == "tradeoff" else "")
            print(f"  postprocess {label:<20} {ms:8.2f} ms/frame  ({len(out)} instances, {pixels} mask px)")
            if mode == "accurate":
                dets = out
        assert dets is not None
        crop_ms, coco_ms = rle_times(dets, args.repeats)
        speedups[scenario.name] = coco_ms / crop_ms
        print(
            f"  RLE {len(dets)} masks: crop encoder {crop_ms:.2f} ms, pycocotools full-frame "
            f"{coco_ms:.2f} ms (full masks prebuilt, untimed) -> {coco_ms / crop_ms:.1f}x"
        )
    accurate = results[("1080p", "accurate")]
    ok_rle = speedups["1080p"] >= TARGET_RLE_SPEEDUP
    ok_acc = accurate < TARGET_ACCURATE_1080P_MS
    print(
        f"\nSUMMARY 1080p/100: accurate {accurate:.1f} ms (target < {TARGET_ACCURATE_1080P_MS:.0f}: "
        f"{'PASS' if ok_acc else 'FAIL'}), tradeoff {results[('1080p', 'tradeoff')]:.1f} ms, "
        f"fast {results[('1080p', 'fast')]:.1f} ms; crop RLE {speedups['1080p']:.1f}x pycocotools "
        f"(target >= {TARGET_RLE_SPEEDUP:.0f}x: {'PASS' if ok_rle else 'FAIL'}); "
        f"480p/10: accurate {results[('480p', 'accurate')]:.1f} ms, RLE {speedups['480p']:.1f}x"
    )
    return 0 if ok_rle and ok_acc else 1


if __name__ == "__main__":
    raise SystemExit(main())
