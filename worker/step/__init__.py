"""The versioned instance-segmentation step (Roboflow Workflows block v1..v4 compatible).

- :mod:`worker.step.manifests`: step definitions v1..v4.
- :mod:`worker.step.parameters`: per-frame parameter resolution.
- :mod:`worker.step.workflow`: workflow definitions (inputs, steps, outputs) and their checks.
- :mod:`worker.step.detections`, :mod:`worker.step.postprocess`, :mod:`worker.step.rle`,
  :mod:`worker.step.serialize`: the numeric core (pure functions).
- :mod:`worker.step.executor`: ``WorkflowRunner``, which runs a workflow on batches of frames.
"""

from worker.step.detections import Detections, MaskCrops
from worker.step.executor import BatchResult, FrameOutcome, WorkflowRunner
from worker.step.parameters import ResolvedStepParameters
from worker.step.postprocess import PostprocessParams, postprocess_frame
from worker.step.rle import encode_crop
from worker.step.serialize import serialize_predictions
from worker.step.workflow import WorkflowDefinition, load_workflow, validate_runtime_inputs

__all__ = [
    "BatchResult",
    "Detections",
    "FrameOutcome",
    "MaskCrops",
    "PostprocessParams",
    "ResolvedStepParameters",
    "WorkflowDefinition",
    "WorkflowRunner",
    "encode_crop",
    "load_workflow",
    "postprocess_frame",
    "serialize_predictions",
    "validate_runtime_inputs",
]
