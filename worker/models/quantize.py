"""INT8 model packages that keep their accuracy: ``segstream quantize``.

:func:`quantize_package` makes a new package (its own id, e.g. ``factory-parts/1-int8``) from a float
package with NNCF's post-training static quantization of the OpenVINO model:

1. **Calibration** on real frames: every k-th frame of a video, or the images of a folder (at most
   ``calibration_frames``, spread over the source), letterboxed exactly as at inference.
2. **What stays float**: by default (``keep_float="auto"``) the convolutions that produce the
   outputs: for each output, walking back from it through non-convolution nodes, the first
   convolution met (the detection head's box / class / coefficient output convolutions, the last
   prototype convolution). Those layers carry pixel boxes, [0, 1] scores and mask logits side by
   side; giving them INT8 activations is what makes naive INT8 YOLO-seg models detect nothing.
   ``keep_float="none"`` quantizes everything (to see the difference; usually refused).
3. **What runs in INT8 and how**: NNCF ``quantize`` with the ``PERFORMANCE`` preset by default
   (symmetric weights and activations), the inputs of elementwise operations (``Multiply``,
   ``Sigmoid``, ``Subtract``, ``Add``: the SiLU activations, the residual sums) left unquantized.
   On OpenVINO's CPU plugin that is what lets a convolution, its SiLU and the next layer's
   quantization run as one fused INT8 kernel: quantizing the elementwise inputs puts a
   FakeQuantize between each convolution and its SiLU (74 unfused subgraphs on the bundled
   model), and asymmetric activations (``--preset mixed``) need the slower zero-point kernels;
   with either, the INT8 model was no faster than BF16 on an AMX CPU (see ``benchmarks/backends``).
   Then ``openvino.save_model`` writes ``weights.xml`` / ``weights.bin``
   (INT8 weights) next to a copy of the float package's ``metadata.json`` with a ``quantization``
   section.
4. **Accuracy**, measured through the worker's own backend and post-processing: with ground truth
   (``--ground-truth coco.json`` whose images name frames of the evaluation video by
   ``frame_index``, or files of the evaluation folder by ``file_name``; ``--evaluation`` defaults
   to the calibration source) the float model (ONNX
   Runtime FP32) and the INT8 model (OpenVINO, precision ``auto``) are scored with COCOeval (segm and
   bbox mAP50, mAP50:95); without it, the INT8 model's *agreement* with the float model: the float
   model's detections (confidence >= 0.25) are the ground truth, and the float model itself scores 1.
5. **Refusal**: when segm mAP50 drops by more than ``max_drop``, nothing is written and
   :class:`QuantizationRefused` says by how much it missed.

The package is written to a temporary folder beside the destination and renamed into place only
once it passed, so a refused or failed run leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from worker.errors import ModelError
from worker.models.config import OnnxRuntimeConfig, OpenVinoConfig
from worker.models.evaluation import (
    EVAL_PARAMS,
    coco_eval,
    detections_as_ground_truth,
    detections_to_coco,
    frames_for_ground_truth,
    iter_frames,
    predict,
)
from worker.models.letterbox import letterbox
from worker.models.package import IR_WEIGHTS_FILE, METADATA_FILE, locate_package
from worker.models.registry import load_backend

__all__ = [
    "QuantizationRefused",
    "QuantizeResult",
    "describe_drop",
    "evaluation_frames",
    "float_output_layers",
    "measure_accuracy",
    "quantize_package",
]

log = logging.getLogger(__name__)

KeepFloat = Literal["auto", "none"]
Preset = Literal["performance", "mixed"]
_CONV_TYPES = ("Convolution", "GroupConvolution")
#: operation types whose inputs stay float (see the module docstring, point 3)
_FLOAT_INPUT_TYPES = ("Multiply", "Sigmoid", "Subtract", "Add")


class QuantizationRefused(ModelError):
    """The INT8 model lost more accuracy than allowed; no package was written."""

    reason = "quantization_refused"


@dataclass(frozen=True, slots=True)
class QuantizeResult:
    """What :func:`quantize_package` wrote and measured."""

    package: Path
    model_id: str
    record: dict[str, Any]


def float_output_layers(model: Any) -> list[str]:
    """Friendly names of the convolutions that produce an OpenVINO model's outputs.

    For each output, walking back through non-convolution nodes (bias adds, reshapes, concats,
    sigmoids...), the first convolution met on every path; shape computations (``ShapeOf``) are
    not followed, since they carry no values.
    """
    found: dict[str, None] = {}
    seen: set[str] = set()  # by the node's unique name (the Python wrappers are made afresh per call)
    stack = list(model.get_results())
    while stack:
        node = stack.pop()
        if node.get_name() in seen:
            continue
        seen.add(node.get_name())
        if node.get_type_name() in _CONV_TYPES:
            found[node.get_friendly_name()] = None
            continue
        for value in node.input_values():
            producer = value.get_node()
            # ShapeOf only passes a tensor's shape (e.g. to make the anchor grid), not its values
            if producer.get_type_name() not in ("Constant", "Parameter", "ShapeOf"):
                stack.append(producer)
    return list(found)


def _calibration_tensors(
    source: Path, input_size: tuple[int, int], pad_value: int, limit: int
) -> tuple[list[np.ndarray], dict[str, Any]]:
    total = sum(1 for _ in iter_frames(source))
    every = max(1, total // limit)
    tensors = [
        letterbox(image, input_size, pad_value)[0][None]
        for image in iter_frames(source, every=every, limit=limit)
    ]
    return tensors, {"source": source.name, "frames": len(tensors), "every": every, "of": total}


def _score(
    model: Any, frames: Sequence[np.ndarray], gt: dict[str, Any], ids: Sequence[int]
) -> dict[str, float]:
    (dets,) = predict(model, frames, (EVAL_PARAMS,), batch=1)
    results = detections_to_coco(dets, ids)
    segm, bbox = coco_eval(gt, results, "segm"), coco_eval(gt, results, "bbox")
    return {
        "segm_map50": round(segm["map50"], 4),
        "segm_map": round(segm["map"], 4),
        "bbox_map50": round(bbox["map50"], 4),
        "bbox_map": round(bbox["map"], 4),
    }


def evaluation_frames(
    calibration: Path, ground_truth: dict[str, Any] | None, eval_frames: int | None
) -> tuple[list[np.ndarray], dict[str, Any] | None]:
    """The frames accuracy is measured on (and the ground truth cut to them, when given)."""
    if ground_truth is None:
        total = sum(1 for _ in iter_frames(calibration))
        limit = eval_frames or total
        return list(iter_frames(calibration, every=max(1, total // limit), limit=limit)), None
    images = ground_truth["images"][:eval_frames] if eval_frames else ground_truth["images"]
    kept = {im["id"] for im in images}
    gt = {
        **ground_truth,
        "images": images,
        "annotations": [a for a in ground_truth["annotations"] if a["image_id"] in kept],
    }
    return frames_for_ground_truth(calibration, gt), gt


def measure_accuracy(
    float_model: Any,
    int8_model: Any,
    frames: Sequence[np.ndarray],
    gt: dict[str, Any] | None,
) -> dict[str, Any]:
    """Segm/bbox mAP of both models on ground truth, or the INT8 model's agreement with the float one."""
    if gt is not None:
        ids = [im["id"] for im in gt["images"]]
        kind = "ground_truth"
    else:
        (reference,) = predict(float_model, frames, (EVAL_PARAMS,), batch=1)
        gt = detections_as_ground_truth(reference, float_model.class_names)
        ids = [im["id"] for im in gt["images"]]
        kind = "agreement_with_float"
    float_scores = _score(float_model, frames, gt, ids)
    int8_scores = _score(int8_model, frames, gt, ids)
    return {
        "kind": kind,
        "frames": len(frames),
        "postprocess": "confidence 0.01, NMS IoU 0.5, 100 detections, accurate masks",
        "float": float_scores,
        "int8": int8_scores,
        "segm_map50_drop": round(float_scores["segm_map50"] - int8_scores["segm_map50"], 4),
        "segm_map_drop": round(float_scores["segm_map"] - int8_scores["segm_map"], 4),
    }


def quantize_package(
    source: Path,
    destination: Path,
    *,
    source_id: str,
    model_id: str,
    calibration: Path,
    ground_truth: Path | None = None,
    evaluation: Path | None = None,
    max_drop: float = 0.01,
    keep_float: KeepFloat = "auto",
    preset: Preset = "performance",
    calibration_frames: int = 100,
    eval_frames: int | None = None,
    threads: int = 0,
) -> QuantizeResult:
    """Quantize the float package ``source`` into ``destination`` (a new package folder).

    Args:
        source: the float package folder (``weights.onnx``).
        destination: the new package folder (must not exist).
        source_id: the float model's id (recorded).
        model_id: the new package's id (recorded).
        calibration: a video file or an image folder.
        ground_truth: a COCO file naming frames of ``evaluation`` (see the module docstring).
        evaluation: the video or image folder accuracy is measured on (default: ``calibration``).
        max_drop: the largest segm mAP50 drop accepted.
        keep_float: ``auto`` (output convolutions stay float) or ``none``.
        preset: NNCF's ``performance`` (symmetric activations) or ``mixed`` (asymmetric) preset.
        calibration_frames: at most this many calibration frames (spread over the source).
        eval_frames: measure on the first this many ground-truth images (or frames); None: all.
        threads: engine threads for the measurement (0: default).

    Returns:
        The package written and its ``quantization`` record.

    Raises:
        QuantizationRefused: the drop exceeds ``max_drop`` (nothing written).
        ModelError: unreadable inputs, a destination that exists, NNCF/OpenVINO missing.
    """
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise ModelError("quantize needs nncf and openvino: pip install 'segstream[openvino]'") from exc
    if destination.exists():
        raise ModelError(f"{destination} exists; choose another --output-id or remove it")
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    package = locate_package(source)
    onnx_path = package.require_onnx("quantize")
    started = time.monotonic()
    float_model = load_backend(source, OnnxRuntimeConfig(intra_op_threads=threads), model_id=source_id)
    metadata = float_model.metadata
    tensors, calib_record = _calibration_tensors(
        calibration, float_model.input_size, metadata.pad_value, calibration_frames
    )

    core = ov.Core()
    model = core.read_model(str(onnx_path))
    kept_float = float_output_layers(model) if keep_float == "auto" else []
    # validate=False: a model without one of these types (e.g. no residual Add) is not an error
    scope = nncf.IgnoredScope(names=kept_float, types=list(_FLOAT_INPUT_TYPES), validate=False)
    log.info(
        "quantizing %s on %d frames (%s preset); kept float: %s", source_id, len(tensors), preset, kept_float
    )
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    quantized = nncf.quantize(
        model,
        nncf.Dataset(tensors),
        preset=presets[preset],
        subset_size=len(tensors),
        ignored_scope=scope,
    )

    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        ov.save_model(quantized, str(staging / IR_WEIGHTS_FILE))
        base = json.loads(package.metadata_path.read_text()) if package.metadata_path else {}
        base.pop("quantization", None)
        base.update(
            {
                "schema_version": 1,
                "class_names": list(metadata.class_names),
                "input_size": list(metadata.input_size),
                "pad_value": metadata.pad_value,
                "stride": metadata.stride,
                "dynamic_input": metadata.dynamic_input,
                "end2end": metadata.output_layout == "end2end",
            }
        )
        (staging / METADATA_FILE).write_text(json.dumps(base, indent=2) + "\n")
        int8_model = load_backend(
            staging, OpenVinoConfig(backend="openvino", threads=threads), model_id=model_id
        )
        truth = json.loads(ground_truth.read_text()) if ground_truth is not None else None
        frames, gt = evaluation_frames(evaluation or calibration, truth, eval_frames)
        accuracy = measure_accuracy(float_model, int8_model, frames, gt)
        accuracy["ground_truth"] = ground_truth.name if ground_truth is not None else None
        accuracy["source"] = (evaluation or calibration).name
        accuracy["int8_run_as"] = int8_model.info.summary()
        int8_model.close()
        drop = accuracy["segm_map50_drop"]
        if drop > max_drop:
            raise QuantizationRefused(
                f"{model_id}: segm mAP50 dropped by {drop:.4f} ({accuracy['kind']}: float "
                f"{accuracy['float']['segm_map50']:.4f} -> int8 {accuracy['int8']['segm_map50']:.4f} on "
                f"{accuracy['frames']} frames), more than --max-drop {max_drop} by {drop - max_drop:.4f}; "
                "nothing written (more calibration frames, or frames closer to what the camera sees, "
                "may help)",
                model_id=model_id,
            )
        record = {
            "made_by": "segstream quantize",
            "method": (
                f"NNCF post-training static quantization of the OpenVINO model (INT8, {preset.upper()} "
                f"preset, inputs of {', '.join(_FLOAT_INPUT_TYPES)} kept float)"
            ),
            "source_model": source_id,
            "source_weights_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
            "calibration": calib_record,
            "kept_float": kept_float,
            "keep_float": keep_float,
            "preset": preset,
            "max_drop": max_drop,
            "accuracy": accuracy,
            "nncf": nncf.__version__,
            "openvino": ov.__version__,
            "weights_bytes": (staging / IR_WEIGHTS_FILE).with_suffix(".bin").stat().st_size,
            "seconds": round(time.monotonic() - started, 1),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        base["quantization"] = record
        (staging / METADATA_FILE).write_text(json.dumps(base, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp made it private
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return QuantizeResult(destination, model_id, record)


def describe_drop(record: dict[str, Any]) -> str:
    """One line: ``segm mAP50 0.912 -> 0.909 (drop 0.003, ground_truth, 250 frames)``."""
    acc = record["accuracy"]
    return (
        f"segm mAP50 {acc['float']['segm_map50']:.4f} -> {acc['int8']['segm_map50']:.4f} "
        f"(drop {acc['segm_map50_drop']:.4f}, {acc['kind']}, {acc['frames']} frames)"
    )
