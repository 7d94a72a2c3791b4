"""KServe v2 inference protocol backend: the letterboxed tensor out, the two raw outputs back.

Triton Inference Server, KServe, OpenVINO Model Server and MLServer speak the protocol
(https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/). segstream keeps
pre- and post-processing: it letterboxes a batch exactly as for a local model
(:class:`~worker.models.backend.LetterboxedBackend`), sends the ``(B, 3, h, w)`` FP32 tensor and gets
``(B, 4 + C + 32, N)`` and ``(B, 32, h/4, w/4)`` back, so the detections are those of the local
backend up to the server's arithmetic. One request per batch (chunked to the server's batch size
when its model has a fixed one).

Tensors travel with the **binary tensor data extension** (Triton's, also KServe's and MLServer's):
the JSON header, then the raw little-endian bytes; ``Inference-Header-Content-Length`` says where the
JSON ends. A server answering in plain JSON (``"data"`` lists) is read too.

At start-up the server's model metadata (``GET /v2/models/<name>[/versions/<v>]``) is checked against
the local package: one ``[B, 3, h, w]`` FP32 input, outputs of the YOLOv8-seg layout for the package's
C classes, the input size where the server fixes it. Class names, padding and recommended thresholds
come from the package (the protocol's metadata has none).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from worker.errors import ModelError
from worker.models.backend import BackendInfo, LetterboxedBackend
from worker.models.package import load_model_metadata
from worker.models.remote.client import RemoteClient, RemoteError, ServerBackend
from worker.models.remote.config import RemoteModelConfig
from worker.models.signature import Dim, ModelSignature, check_layout

__all__ = ["KServeV2Backend", "decode_infer_response", "encode_infer_request"]

log = logging.getLogger(__name__)

_HEADER_LENGTH = "Inference-Header-Content-Length"
_DTYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "FP64": np.dtype("<f8"),
}


class _TensorMetadata(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    datatype: str
    shape: list[int]


class _ModelMetadataResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    versions: list[str] | None = None
    platform: str = ""
    inputs: list[_TensorMetadata]
    outputs: list[_TensorMetadata]


def _dims(shape: Sequence[int]) -> tuple[Dim, ...]:
    return tuple(None if d < 0 else int(d) for d in shape)


def encode_infer_request(
    input_name: str, batch: np.ndarray, output_names: Sequence[str]
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a binary-extension ``/infer`` request for one FP32 batch."""
    data = np.ascontiguousarray(batch, dtype="<f4")
    header = {
        "inputs": [
            {
                "name": input_name,
                "shape": list(data.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": data.nbytes},
            }
        ],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in output_names],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {_HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
    return head + data.tobytes(), headers


def decode_infer_response(body: bytes, headers: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The output tensors of an ``/infer`` answer (binary extension or plain JSON), by name.

    Raises:
        ModelError: a malformed answer (bad JSON, sizes that do not add up, an unknown datatype).
    """
    length_text = next((v for k, v in headers.items() if k.lower() == _HEADER_LENGTH.lower()), None)
    try:
        length = int(length_text) if length_text is not None else len(body)
        if not 0 <= length <= len(body):
            raise ValueError(f"header length {length} outside the {len(body)}-byte body")
        header = json.loads(body[:length])
        outputs = header["outputs"]
        tensors: dict[str, np.ndarray] = {}
        offset = length
        for output in outputs:
            name = str(output["name"])
            dtype = _DTYPES.get(str(output["datatype"]))
            if dtype is None:
                raise ValueError(f"output {name!r}: datatype {output['datatype']!r} is not a float type")
            shape = [int(d) for d in output["shape"]]
            size = (output.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                size = int(size)
                if offset + size > len(body):
                    raise ValueError(f"output {name!r}: {size} bytes announced, body too short")
                array = np.frombuffer(body, dtype=dtype, count=size // dtype.itemsize, offset=offset)
                offset += size
            else:
                array = np.asarray(output["data"], dtype=dtype)
            tensors[name] = array.reshape(shape)
        return tensors
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ModelError(f"malformed KServe v2 inference response: {exc}") from None


class KServeV2Backend(ServerBackend, LetterboxedBackend):
    """A :class:`~worker.models.backend.SegmentationBackend` whose engine is a KServe v2 server.

    Args:
        path: the local package (metadata: class names, padding, recommended thresholds).
        model_id: the step's model id.
        config: the ``model`` section (``protocol: kserve_v2``).

    Raises:
        ModelError: the server cannot be reached at start-up, does not have the model, or its
            metadata does not fit the package.
    """

    def __init__(self, path: Path, model_id: str | None, config: RemoteModelConfig) -> None:
        super().__init__()
        self.model_id = model_id
        name = config.model_name or (model_id.split("/")[0] if model_id else Path(path).parent.name)
        self.model_name = name
        self._model_path = f"/v2/models/{name}" + (
            f"/versions/{config.model_version}" if config.model_version else ""
        )
        self.metadata = load_model_metadata(path)
        self._client = RemoteClient(config, health_path="/v2/health/ready")
        self._source = f"{self._client.server}{self._model_path}"
        try:
            self.signature, self._pred_name, self._proto_name = self._read_server_metadata()
            self.input_size = self._choose_size(config.input_size)
            self.chunk_size = None
            self._warmup()
        except BaseException:
            self._client.close()
            raise
        self._info = BackendInfo(
            backend="remote",
            precision="fp32",
            requested=(f"kserve_v2:{self._client.server}",),
            used=(f"kserve_v2:{self._client.server}",),
            weights=f"{self._model_path} ({self._platform or 'server'})",
            details={"max_concurrency": config.max_concurrency, "timeout_s": config.timeout_s},
        )

    @property
    def info(self) -> BackendInfo:
        """Protocol, server, model path."""
        return self._info

    def _read_server_metadata(self) -> tuple[ModelSignature, str, str]:
        try:
            response = self._client.request("GET", self._model_path)
        except RemoteError as exc:
            raise ModelError(f"model metadata from {self._source}: {exc}", model_id=self.model_id) from None
        try:
            meta = _ModelMetadataResponse.model_validate_json(response.body)
        except ValidationError as exc:
            raise ModelError(f"{self._source}: not a KServe v2 model metadata answer: {exc}") from None
        self._platform = meta.platform
        if len(meta.inputs) != 1:
            raise ModelError(f"{self._source}: expected one input, the server lists {len(meta.inputs)}")
        (tensor,) = meta.inputs
        if tensor.datatype != "FP32":
            raise ModelError(f"{self._source}: input {tensor.name!r} is {tensor.datatype}, expected FP32")
        bad = [o.name for o in meta.outputs if o.datatype not in _DTYPES]
        if bad:
            raise ModelError(f"{self._source}: outputs {bad} are not float tensors")
        signature = ModelSignature(
            input_name=tensor.name,
            input_shape=_dims(tensor.shape),
            output_names=tuple(o.name for o in meta.outputs),
            output_shapes=tuple(_dims(o.shape) for o in meta.outputs),
        )
        try:
            pred, proto = check_layout(signature, self.metadata.num_classes)
        except ModelError as exc:
            raise ModelError(
                f"{self._source} does not fit the package's {self.metadata.num_classes} classes: {exc}",
                model_id=self.model_id,
            ) from None
        return signature, signature.output_names[pred], signature.output_names[proto]

    def _choose_size(self, requested: tuple[int, int] | None) -> tuple[int, int]:
        fixed = self.signature.static_input_size
        if fixed is not None:
            if requested is not None and tuple(requested) != fixed:
                raise ModelError(f"{self._source}: the server's input is fixed at {list(fixed)}")
            if fixed != self.metadata.input_size:
                log.info(
                    "%s: the server runs %s, the package says %s",
                    self._source,
                    fixed,
                    self.metadata.input_size,
                )
            return fixed
        height, width = requested or self.metadata.input_size
        stride = self.metadata.stride
        if height <= 0 or width <= 0 or height % stride or width % stride:
            raise ValueError(f"input_size must be positive multiples of stride {stride}, got {requested}")
        return int(height), int(width)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        body, headers = encode_infer_request(
            self.signature.input_name, batch, (self._pred_name, self._proto_name)
        )
        response = self._client.request("POST", f"{self._model_path}/infer", body=body, headers=headers)
        tensors = decode_infer_response(response.body, response.headers)
        missing = [n for n in (self._pred_name, self._proto_name) if n not in tensors]
        if missing:
            raise ModelError(f"{self._source}: the answer lacks outputs {missing}", model_id=self.model_id)
        return tensors[self._pred_name], tensors[self._proto_name]

    def close(self) -> None:
        """Close the HTTP client; ``infer`` fails afterwards."""
        super().close()
        self._client.close()
