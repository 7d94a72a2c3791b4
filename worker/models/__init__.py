"""Model packages and inference backends.

- :mod:`worker.models.backend`: ``SegmentationBackend`` (the protocol the step sees),
  ``RawSegmentation`` (raw outputs per frame), ``BackendInfo``.
- :mod:`worker.models.config`: the pipeline's ``model`` section, one settings class per backend.
- :mod:`worker.models.package`: ``ModelMetadata`` and model package folders (``metadata.json`` schema).
- :mod:`worker.models.signature`: the graph's interface and the YOLOv8-seg layout check.
- :mod:`worker.models.letterbox`: letterbox pre-processing, ``LetterboxInfo``, the one box mapping.
- :mod:`worker.models.onnx_backend`: ``OnnxSegmentationModel`` (ONNX Runtime, execution providers).
- :mod:`worker.models.openvino_backend`: ``OpenVinoSegmentationModel`` (OpenVINO; optional extra).
- :mod:`worker.models.registry`: ``BACKENDS``, ``ModelRegistry`` (``"project/version"`` ids, cache).
- :mod:`worker.models.quantize`: INT8 packages with a measured accuracy (``segstream quantize``).
"""

from worker.models.backend import BackendInfo, RawSegmentation, SegmentationBackend
from worker.models.config import ModelRuntimeConfig, OnnxRuntimeConfig, OpenVinoConfig, ProviderConfig
from worker.models.letterbox import (
    PAD_VALUE,
    LetterboxInfo,
    compute_letterbox,
    letterbox,
    letterbox_batch,
    map_boxes_to_frame,
)
from worker.models.onnx_backend import OnnxSegmentationModel
from worker.models.package import (
    METADATA_FILE,
    WEIGHTS_FILE,
    ModelMetadata,
    ModelPackage,
    PackageMetadataFile,
    RecommendedParameters,
    load_model_metadata,
    locate_package,
)
from worker.models.registry import (
    BACKENDS,
    BUNDLED_MODELS_DIR,
    MODELS_DIR_ENV,
    InvalidModelIdError,
    ModelRegistry,
    default_models_dirs,
    load_backend,
    validate_model_id,
)
from worker.models.signature import NUM_MASK_COEFFICIENTS, ModelSignature

__all__ = [
    "BACKENDS",
    "BUNDLED_MODELS_DIR",
    "METADATA_FILE",
    "MODELS_DIR_ENV",
    "NUM_MASK_COEFFICIENTS",
    "PAD_VALUE",
    "WEIGHTS_FILE",
    "BackendInfo",
    "InvalidModelIdError",
    "LetterboxInfo",
    "ModelMetadata",
    "ModelPackage",
    "ModelRegistry",
    "ModelRuntimeConfig",
    "ModelSignature",
    "OnnxRuntimeConfig",
    "OnnxSegmentationModel",
    "OpenVinoConfig",
    "PackageMetadataFile",
    "ProviderConfig",
    "RawSegmentation",
    "RecommendedParameters",
    "SegmentationBackend",
    "compute_letterbox",
    "default_models_dirs",
    "letterbox",
    "letterbox_batch",
    "load_backend",
    "load_model_metadata",
    "locate_package",
    "map_boxes_to_frame",
    "validate_model_id",
]
