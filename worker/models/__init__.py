"""Model packages and inference backends.

- :mod:`worker.models.package`: ``ModelMetadata`` and model package folders (``metadata.json`` schema).
- :mod:`worker.models.signature`: the ONNX graph's interface and the YOLOv8-seg layout check.
- :mod:`worker.models.letterbox`: letterbox pre-processing, ``LetterboxInfo`` for mapping back.
- :mod:`worker.models.onnx_backend`: ``OnnxSegmentationModel`` (batched ONNX Runtime inference).
- :mod:`worker.models.registry`: ``ModelRegistry`` (``"project/version"`` ids, search order, cache).
"""

from worker.models.letterbox import LetterboxInfo, compute_letterbox, letterbox, letterbox_batch
from worker.models.onnx_backend import OnnxSegmentationModel, RawSegmentation
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
    BUNDLED_MODELS_DIR,
    MODELS_DIR_ENV,
    InvalidModelIdError,
    ModelRegistry,
    default_models_dirs,
    validate_model_id,
)
from worker.models.signature import NUM_MASK_COEFFICIENTS, ModelSignature

__all__ = [
    "BUNDLED_MODELS_DIR",
    "METADATA_FILE",
    "MODELS_DIR_ENV",
    "NUM_MASK_COEFFICIENTS",
    "WEIGHTS_FILE",
    "InvalidModelIdError",
    "LetterboxInfo",
    "ModelMetadata",
    "ModelPackage",
    "ModelRegistry",
    "ModelSignature",
    "OnnxSegmentationModel",
    "PackageMetadataFile",
    "RawSegmentation",
    "RecommendedParameters",
    "compute_letterbox",
    "default_models_dirs",
    "letterbox",
    "letterbox_batch",
    "load_model_metadata",
    "locate_package",
    "validate_model_id",
]
