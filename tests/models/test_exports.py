from __future__ import annotations

import importlib

import pytest

MODULES = [
    "worker.models",
    "worker.models.letterbox",
    "worker.models.onnx_backend",
    "worker.models.package",
    "worker.models.registry",
    "worker.models.signature",
    "tests.support.onnx_models",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist_and_are_sorted_uniquely(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(set(exported)) == len(exported)
    missing = [item for item in exported if not hasattr(module, item)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"


def test_package_exports_the_public_api() -> None:
    models = importlib.import_module("worker.models")
    for item in (
        "ModelRegistry",
        "OnnxSegmentationModel",
        "RawSegmentation",
        "LetterboxInfo",
        "ModelMetadata",
    ):
        assert item in models.__all__
