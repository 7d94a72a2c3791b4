"""The step's defaults and value sets, in one table.

A field left out of a step definition takes its default from :data:`STEP_DEFAULTS`, which is the
reference block's (``shared/spec/step.md``): the step definitions (:mod:`worker.step.manifests`), the
per-frame resolution (:mod:`worker.step.parameters`) and the post-processing parameters
(:mod:`worker.step.postprocess`) all read it, so the three can never disagree. This module imports
nothing of the worker: the numeric core can use it.

Example:
    >>> STEP_DEFAULTS["iou_threshold"], STEP_DEFAULTS["mask_decode_mode"]
    (0.3, 'accurate')
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, Literal, get_args

__all__ = [
    "CONFIDENCE_MODES",
    "DEFAULT_CONFIDENCE",
    "MASK_DECODE_MODES",
    "STEP_DEFAULTS",
    "ConfidenceMode",
    "MaskDecodeMode",
]

#: How masks are decoded from the prototypes (see :mod:`worker.step.postprocess`).
MaskDecodeMode = Literal["accurate", "tradeoff", "fast"]
MASK_DECODE_MODES: Final[tuple[str, ...]] = get_args(MaskDecodeMode)
#: How v3/v4 pick the confidence threshold.
ConfidenceMode = Literal["best", "default", "custom"]
CONFIDENCE_MODES: Final[tuple[str, ...]] = get_args(ConfidenceMode)

#: Threshold of ``confidence_mode: default`` (the reference block's fixed default).
DEFAULT_CONFIDENCE: Final = 0.4

#: The default of every step field that has one (a field a version lacks is simply not read).
STEP_DEFAULTS: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "confidence": 0.4,  # v1/v2
        "confidence_mode": "best",  # v3/v4
        "custom_confidence": 0.4,  # v3/v4
        "class_filter": None,
        "iou_threshold": 0.3,
        "max_detections": 300,
        "class_agnostic_nms": False,
        "max_candidates": 3000,
        "mask_decode_mode": "accurate",
        "tradeoff_factor": 0.0,
        "disable_active_learning": True,
        "active_learning_target_dataset": None,
        "enforce_dense_masks_in_inference_models": True,  # v1-v3; v4 behaves as True
    }
)
