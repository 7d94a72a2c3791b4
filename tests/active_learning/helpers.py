"""Hand-made detections and samples for the active-learning tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.active_learning.dataset import Sample
from worker.step.detections import Detections, MaskCrops

NAMES = ("nut", "washer", "bolt", "bracket")


def detections(
    boxes: list[tuple[int, int, int, int]],
    confidence: list[float],
    class_id: list[int],
    frame_shape: tuple[int, int] = (72, 128),
    *,
    seed: int = 0,
) -> Detections:
    """Detections whose masks are random blobs inside integer boxes ``(x0, y0, x1, y1)``."""
    rng = np.random.default_rng(seed)
    crops = []
    for x0, y0, x1, y1 in boxes:
        crop = rng.random((y1 - y0, x1 - x0)) < 0.6
        crop[0, 0] = True
        crops.append(crop)
    return Detections(
        xyxy=np.array(boxes, np.float32).reshape(-1, 4),
        confidence=np.array(confidence, np.float32),
        class_id=np.array(class_id, np.int64),
        masks=MaskCrops(crops, np.array([(b[0], b[1]) for b in boxes], np.int64).reshape(-1, 2)),
        frame_shape=frame_shape,
    )


def frame_image(shape: tuple[int, int] = (72, 128), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (*shape, 3), dtype=np.uint8)


def sample(
    n: int = 0,
    *,
    dataset: str = "parts",
    batch: str = "al_2026_12_02",
    det: Detections | None = None,
    shape: tuple[int, int] = (72, 128),
    **metadata: Any,
) -> Sample:
    if det is None:
        det = detections([(2, 3, 20, 30), (50, 10, 90, 60)], [0.52, 0.91], [1, 3], shape, seed=n)
    return Sample(
        dataset=dataset,
        batch=batch,
        image=frame_image(shape, seed=n),
        detections=det,
        class_names=NAMES,
        metadata={
            "pipeline": "test",
            "source": "cam:1",
            "frame_id": f"cam1:{n}",
            "frame_number": n,
            "capture_time": 1796220000.0 + n,
            "strategy": "unsure",
            **metadata,
        },
    )
