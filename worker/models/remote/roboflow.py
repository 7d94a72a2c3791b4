"""The Roboflow inference server's HTTP API: frames and the step's parameters out, predictions back.

The server (the ``inference`` package, ``inference-cpu`` on PyPI; what the reference block's remote
mode speaks) runs the whole model: pre-processing, inference, NMS, mask decoding. So this backend is
not a :class:`~worker.models.backend.SegmentationBackend` (no raw outputs): it is a
``RemoteStepBackend`` (``worker.models.remote.step_backend``), which the step calls with the frames
*and* their resolved parameters and which returns each frame's
:class:`~worker.step.detections.Detections`. The step serializes those as
for a local model, so the outputs are the same shape, ids and rounding (``rle_mask`` where the
server's response says ``rle``; ``points`` polygons for v1-v3).

One request per batch: ``POST /infer/instance_segmentation`` with the batch's images (base64 PNG by
default: lossless; JPEG optional) and the step's parameters: ``confidence`` (a number, or ``"best"``
/ ``"default"``, which the server resolves from its model's own thresholds), ``class_filter``,
``iou_threshold``, ``max_detections``, ``class_agnostic_nms``, ``max_candidates``,
``mask_decode_mode``, ``tradeoff_factor``, and ``response_mask_format`` (``rle`` for v4, ``polygon``
for v1-v3). Frames whose parameters differ go in separate requests.

Mapping a prediction back: the box (centre, width, height: whole pixels from the server) to
``x1, y1, x2, y2``; the class by name to the local package's class id (a name the package does not
have is an error: the server runs another model); an RLE (COCO compressed counts, column-major over
the frame) or a polygon (filled with OpenCV) to a boolean mask crop.

At start-up the model is loaded on the server by a warm-up request (an unknown model id fails the
start), and ``GET /model/registry`` must list it as ``instance-segmentation``.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from worker.errors import ModelError, SegstreamError
from worker.models.backend import BackendInfo
from worker.models.package import load_model_metadata
from worker.models.remote.client import RemoteClient, RemoteError, ServerBackend
from worker.models.remote.config import RemoteModelConfig
from worker.step.detections import Detections, MaskCrops
from worker.step.parameters import ResolvedStepParameters

__all__ = ["RoboflowBackend", "decode_rle", "request_parameters", "rle_to_crop"]

log = logging.getLogger(__name__)

_INFER_PATH = "/infer/instance_segmentation"


def request_parameters(params: ResolvedStepParameters) -> dict[str, Any]:
    """The step's parameters as the server's instance-segmentation request takes them."""
    confidence: float | str
    if params.confidence_mode == "custom":
        confidence = float(params.confidence if params.confidence is not None else 0.4)
    else:
        confidence = params.confidence_mode  # "best" / "default": resolved on the server
    return {
        "confidence": confidence,
        "class_filter": list(params.class_filter) if params.class_filter else None,
        "iou_threshold": params.iou_threshold,
        "max_detections": params.max_detections,
        "class_agnostic_nms": params.class_agnostic_nms,
        "max_candidates": params.max_candidates,
        "mask_decode_mode": params.mask_decode_mode,
        "tradeoff_factor": params.tradeoff_factor,
        "response_mask_format": "rle" if params.rle_masks else "polygon",
    }


def decode_rle(counts: str, size: Sequence[int]) -> np.ndarray:
    """A COCO compressed RLE string to a bool ``(h, w)`` mask (runs are column-major).

    Raises:
        ValueError: the runs do not add up to ``h * w``.
    """
    height, width = int(size[0]), int(size[1])
    runs: list[int] = []
    position = 0
    data = counts.encode("ascii")
    while position < len(data):
        value = 0
        shift = 0
        more = True
        while more:
            char = data[position] - 48
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    if sum(runs) != height * width or any(r < 0 for r in runs):
        raise ValueError(f"RLE runs add up to {sum(runs)}, the size {height}x{width} needs {height * width}")
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return flat.reshape((width, height)).T


def rle_to_crop(counts: str, size: Sequence[int]) -> tuple[np.ndarray, tuple[int, int]]:
    """A COCO compressed RLE string to the mask's bounding crop and its ``(x0, y0)`` offset.

    Only the columns the mask touches are laid out (the runs are column-major), so a small instance
    in a large frame costs its box, not the frame.

    Raises:
        ValueError: the runs do not add up to ``h * w``.
    """
    mask = decode_rle(counts, size)  # a transposed view of the column-major runs
    columns = np.flatnonzero(mask.any(axis=0))
    if len(columns) == 0:
        return np.zeros((0, 0), bool), (0, 0)
    x0, x1 = int(columns[0]), int(columns[-1]) + 1
    block = mask[:, x0:x1]
    rows = np.flatnonzero(block.any(axis=1))
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    return np.ascontiguousarray(block[y0:y1]), (x0, y0)


def _crop(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    columns = np.flatnonzero(mask.any(axis=0))
    if len(columns) == 0:
        return np.zeros((0, 0), bool), (0, 0)
    x0, x1 = int(columns[0]), int(columns[-1]) + 1
    rows = np.flatnonzero(mask[:, x0:x1].any(axis=1))
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    return np.ascontiguousarray(mask[y0:y1, x0:x1]), (x0, y0)


class RoboflowBackend(ServerBackend):
    """A ``RemoteStepBackend`` on a Roboflow inference server.

    Args:
        path: the local package (class names, recommended thresholds: the step's ``best`` mode
            checks and the class filter).
        model_id: the step's model id; the server's model id is ``model_name`` or this.
        config: the ``model`` section (``protocol: roboflow``).

    Raises:
        ModelError: the server cannot be reached at start-up, cannot load the model, or lists it
            with another task.
    """

    def __init__(self, path: Path, model_id: str | None, config: RemoteModelConfig) -> None:
        self.model_id = model_id
        self.metadata = load_model_metadata(path)
        self.input_size = self.metadata.input_size
        self.server_model_id = config.model_name or model_id or Path(path).name
        self._config = config
        self._client = RemoteClient(config, health_path="/info", bearer=False)
        self._closed = False
        self._source = f"{self._client.server} model {self.server_model_id}"
        try:
            self._warmup()
        except BaseException:
            self._client.close()
            raise
        self._info = BackendInfo(
            backend="remote",
            precision="server",
            requested=(f"roboflow:{self._client.server}",),
            used=(f"roboflow:{self._client.server}",),
            weights=self.server_model_id,
            details={"max_concurrency": config.max_concurrency, "image_format": config.image_format},
        )

    # ----------------------------------------------------------------------------- protocol

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in class-id order (the local package's)."""
        return self.metadata.class_names

    @property
    def info(self) -> BackendInfo:
        """Protocol, server, model id."""
        return self._info

    def detect(
        self, images: Sequence[np.ndarray], params: ResolvedStepParameters
    ) -> list[Detections | SegstreamError]:
        """One request for the frames with these parameters (``RemoteStepBackend.detect``)."""
        if self._closed:
            raise ModelError(f"{self._source}: the model was closed", model_id=self.model_id)
        if not images:
            return []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected (H, W, 3) uint8 BGR frames, got {image.shape} {image.dtype}")
        body = self._request_body(images, request_parameters(params))
        response = self._client.request(
            "POST", _INFER_PATH, body=body, headers={"Content-Type": "application/json"}
        )
        try:
            answer = json.loads(response.body)
        except ValueError as exc:
            raise ModelError(
                f"{self._source}: the answer is not JSON: {exc}", model_id=self.model_id
            ) from None
        answers = answer if isinstance(answer, list) else [answer]
        if len(answers) != len(images):
            raise ModelError(
                f"{self._source}: {len(answers)} answers for {len(images)} images", model_id=self.model_id
            )
        results: list[Detections | SegstreamError] = []
        for image, item in zip(images, answers, strict=True):
            try:
                results.append(self._detections(item, image.shape[:2]))
            except (KeyError, TypeError, ValueError) as exc:
                error = ModelError(f"{self._source}: malformed prediction: {exc}", model_id=self.model_id)
                error.reason = "inference_error"
                results.append(error)
        return results

    def close(self) -> None:
        """Close the HTTP client; ``detect`` fails afterwards."""
        self._closed = True
        self._client.close()

    # ----------------------------------------------------------------------------- internals

    def _encode(self, image: np.ndarray) -> str:
        if self._config.image_format == "png":
            ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        else:
            ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self._config.jpeg_quality])
        if not ok:
            raise ValueError("the frame could not be encoded")
        return base64.b64encode(data.tobytes()).decode("ascii")

    def _request_body(self, images: Sequence[np.ndarray], parameters: dict[str, Any]) -> bytes:
        encoded = [{"type": "base64", "value": self._encode(image)} for image in images]
        body: dict[str, Any] = {
            "model_id": self.server_model_id,
            "image": encoded if len(encoded) > 1 else encoded[0],
            **{k: v for k, v in parameters.items() if v is not None},
        }
        if self._client.api_key is not None:
            body["api_key"] = self._client.api_key.get_secret_value()
        return json.dumps(body, separators=(",", ":")).encode()

    def _detections(self, item: dict[str, Any], shape: tuple[int, int]) -> Detections:
        height, width = int(shape[0]), int(shape[1])
        predictions = item["predictions"]
        boxes, scores, classes, crops, offsets = [], [], [], [], []
        for prediction in predictions:
            name = str(prediction["class"])
            if name not in self.metadata.class_names:
                raise ValueError(f"class {name!r} is not one of the package's {list(self.class_names)}")
            x, y = float(prediction["x"]), float(prediction["y"])
            w, h = float(prediction["width"]), float(prediction["height"])
            if "rle" in prediction or "rle_mask" in prediction:
                rle = prediction.get("rle") or prediction["rle_mask"]
                if isinstance(rle, str):  # some versions send the dict as a string
                    rle = json.loads(rle.replace("'", '"'))
                if [int(v) for v in rle["size"]] != [height, width]:
                    raise ValueError(f"RLE size {rle['size']} is not the frame's {[height, width]}")
                crop, offset = rle_to_crop(str(rle["counts"]), rle["size"])
            else:
                mask = np.zeros((height, width), np.uint8)
                points = np.array([[p["x"], p["y"]] for p in prediction.get("points", [])], np.float64)
                if len(points) >= 3:
                    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
                crop, offset = _crop(mask.astype(bool))
            boxes.append((x - w / 2, y - h / 2, x + w / 2, y + h / 2))
            scores.append(float(prediction["confidence"]))
            classes.append(self.metadata.class_names.index(name))
            crops.append(crop)
            offsets.append(offset)
        return Detections(
            np.array(boxes, np.float32).reshape(-1, 4),
            np.array(scores, np.float32),
            np.array(classes, np.int64),
            MaskCrops(crops, np.array(offsets, np.int64).reshape(-1, 2)),
            (height, width),
        )

    def _warmup(self) -> None:
        try:
            self._client.request(
                "POST",
                _INFER_PATH,
                body=self._request_body(
                    [np.full((*self.input_size, 3), self.metadata.pad_value, np.uint8)],
                    {"confidence": 0.99, "response_mask_format": "rle"},
                ),
                headers={"Content-Type": "application/json"},
            )
            registry = json.loads(self._client.request("GET", "/model/registry").body)
        except RemoteError as exc:
            raise ModelError(f"{self._source}: {exc}", model_id=self.model_id) from None
        except ValueError as exc:
            raise ModelError(f"{self._source}: /model/registry is not JSON: {exc}") from None
        models = registry.get("models", []) if isinstance(registry, dict) else []
        listed = {str(m.get("model_id")): m for m in models if isinstance(m, dict)}
        entry = listed.get(self.server_model_id)
        if entry is None:
            return  # older servers list nothing: the warm-up answered, which is what counts
        task = entry.get("task_type")
        if task != "instance-segmentation":
            raise ModelError(
                f"{self._source}: the server runs it as {task!r}, not instance-segmentation",
                model_id=self.model_id,
            )
        size = (entry.get("input_height"), entry.get("input_width"))
        if all(isinstance(v, int) for v in size) and size != tuple(self.metadata.input_size):
            raise ModelError(
                f"{self._source}: the server's input size {list(size)} is not the package's "
                f"{list(self.metadata.input_size)}: another model?",
                model_id=self.model_id,
            )
        log.info("%s: loaded on the server (%s, input %s)", self._source, task, list(size))
