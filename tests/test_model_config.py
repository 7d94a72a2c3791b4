"""The pipeline's ``model`` section: one settings class per backend, chosen by ``backend``."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from worker.config import ModelRuntimeConfig
from worker.models.config import OnnxRuntimeConfig, OpenVinoConfig, ProviderConfig

SECTION: TypeAdapter[Any] = TypeAdapter(ModelRuntimeConfig)


def test_without_backend_it_is_onnxruntime_as_before() -> None:
    config = SECTION.validate_python({"intra_op_threads": 1, "input_size": [448, 448], "session_batch": 2})
    assert isinstance(config, OnnxRuntimeConfig)
    assert (config.intra_op_threads, config.input_size, config.session_batch) == (1, (448, 448), 2)
    assert config.providers == (ProviderConfig(name="CPUExecutionProvider"),)
    assert config.allow_fallback is False


def test_openvino_section() -> None:
    config = SECTION.validate_python(
        {"backend": "openvino", "precision": "bf16", "threads": 1, "num_requests": 2, "cache_dir": "/tmp/c"}
    )
    assert isinstance(config, OpenVinoConfig)
    assert (config.precision, config.threads, config.num_requests, str(config.cache_dir)) == (
        "bf16",
        1,
        2,
        "/tmp/c",
    )
    assert SECTION.validate_python({"backend": "openvino"}).precision == "auto"


def test_providers_by_name_or_with_options() -> None:
    config = SECTION.validate_python(
        {
            "providers": [
                {"name": "TensorrtExecutionProvider", "options": {"trt_fp16_enable": True}},
                {"name": "CUDAExecutionProvider", "options": {"device_id": 0}},
                "CPUExecutionProvider",
            ],
            "allow_fallback": True,
        }
    )
    assert [p.name for p in config.providers] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert config.providers[0].options == {"trt_fp16_enable": True}


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"session_batch": 0}, "session_batch"),
        ({"session_batch": 65}, "session_batch"),
        ({"backend": "tensorflow"}, "must be one of: onnxruntime, openvino"),
        ({"backend": "openvino", "intra_op_threads": 1}, "intra_op_threads"),  # an ONNX Runtime field
        ({"backend": "openvino", "precision": "int4"}, "precision"),
        ({"providers": []}, "providers"),
        ({"providers": ["CPUExecutionProvider", "CPUExecutionProvider"]}, "listed twice"),
        ({"providers": ["cuda"]}, "providers.0.name"),
    ],
)
def test_bad_sections_name_the_field(section: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        SECTION.validate_python(section)
