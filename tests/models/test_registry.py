from __future__ import annotations

import os
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.onnx_models import (
    build_segmentation_model,
    candidate_rows,
    package_metadata,
    write_model_package,
)
from worker.errors import ModelError
from worker.models.config import OnnxRuntimeConfig
from worker.models.onnx_backend import OnnxSegmentationModel
from worker.models.registry import (
    BACKENDS,
    BUNDLED_MODELS_DIR,
    MODELS_DIR_ENV,
    InvalidModelIdError,
    ModelRegistry,
    default_models_dirs,
    validate_model_id,
)

ONE_THREAD = OnnxRuntimeConfig(intra_op_threads=1)


def _package(models_dir: Path, model_id: str, class_names: list[str]) -> Path:
    """A package whose single candidate's class-0 score tells which copy was loaded."""
    rows = candidate_rows([[32, 32, 16, 16]], [[0.1 * len(class_names)] + [0.0] * (len(class_names) - 1)])
    model = build_segmentation_model(len(class_names), candidates=rows)
    return write_model_package(models_dir / model_id, model, package_metadata(class_names, (64, 64)))


@pytest.mark.parametrize(
    ("model_id", "context"),
    [
        ("factory-parts/1", nullcontext(("factory-parts", "1"))),
        ("my_project/3", nullcontext(("my_project", "3"))),
        ("Proj.v2/v1.2", nullcontext(("Proj.v2", "v1.2"))),
        ("../x", pytest.raises(InvalidModelIdError)),
        ("x/..", pytest.raises(InvalidModelIdError)),
        ("a..b/1", pytest.raises(InvalidModelIdError)),
        ("/abs", pytest.raises(InvalidModelIdError)),
        ("/abs/1", pytest.raises(InvalidModelIdError)),
        ("a/b/c", pytest.raises(InvalidModelIdError)),
        ("a", pytest.raises(InvalidModelIdError)),
        ("", pytest.raises(InvalidModelIdError)),
        ("a/", pytest.raises(InvalidModelIdError)),
        ("./a", pytest.raises(InvalidModelIdError)),
        ("a/.hidden", pytest.raises(InvalidModelIdError)),
        ("a b/1", pytest.raises(InvalidModelIdError)),
        ("a/1\n", pytest.raises(InvalidModelIdError)),
        ("a\\b/1", pytest.raises(InvalidModelIdError)),
        ("models/yolov8n-seg.onnx", pytest.raises(InvalidModelIdError, match=r"not an \.onnx")),
        ("p/" + "9" * 101, pytest.raises(InvalidModelIdError)),
        (3, pytest.raises(InvalidModelIdError, match="string")),
    ],
)
def test_validate_model_id(model_id: Any, context: Any) -> None:
    with context as expected:
        assert validate_model_id(model_id) == expected


def test_invalid_id_error_is_a_model_error_and_value_error() -> None:
    with pytest.raises(ModelError) as info:
        ModelRegistry([]).resolve("../etc/passwd")
    assert isinstance(info.value, ValueError) and info.value.reason == "invalid_model_id"


def test_default_models_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(MODELS_DIR_ENV, raising=False)
    assert default_models_dirs() == [BUNDLED_MODELS_DIR]
    assert BUNDLED_MODELS_DIR.parent.name == "worker" and BUNDLED_MODELS_DIR.name == "bundled_models"
    monkeypatch.setenv(MODELS_DIR_ENV, f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert default_models_dirs() == [tmp_path / "a", tmp_path / "b", BUNDLED_MODELS_DIR]
    # --models-dir replaces the environment variable; the bundled models stay last
    assert default_models_dirs(tmp_path / "cli") == [tmp_path / "cli", BUNDLED_MODELS_DIR]


def test_resolution_order_with_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _package(first, "parts/1", ["a"])
    _package(second, "parts/1", ["a", "b"])
    _package(second, "parts/2", ["a", "b"])
    monkeypatch.setenv(MODELS_DIR_ENV, f"{first}{os.pathsep}{second}")
    registry = ModelRegistry(default_models_dirs())
    assert registry.resolve("parts/1") == first / "parts" / "1"
    assert registry.resolve("parts/2") == second / "parts" / "2"
    assert registry.load("parts/1", ONE_THREAD).class_names == ("a",)
    assert registry.load("parts/2", ONE_THREAD).class_names == ("a", "b")
    cli_first = ModelRegistry(default_models_dirs(second))
    assert cli_first.resolve("parts/1") == second / "parts" / "1"
    with pytest.raises(ModelError, match="not found"):
        ModelRegistry(default_models_dirs(tmp_path / "empty")).resolve("parts/2")


def test_unresolvable_id_lists_where_and_what(tmp_path: Path) -> None:
    _package(tmp_path, "parts/1", ["a"])
    _package(tmp_path, "gears/7", ["a"])
    registry = ModelRegistry([tmp_path, tmp_path / "missing"])
    with pytest.raises(ModelError) as info:
        registry.resolve("parts/9")
    message = str(info.value)
    assert str(tmp_path / "parts" / "9") in message and str(tmp_path / "missing" / "parts" / "9") in message
    assert "gears/7, parts/1" in message
    assert info.value.model_id == "parts/9"
    assert registry.available_ids() == ["gears/7", "parts/1"]


def test_load_is_cached_per_model_and_options(tmp_path: Path) -> None:
    _package(tmp_path, "parts/1", ["a"])
    registry = ModelRegistry([tmp_path])
    model = registry.load("parts/1", ONE_THREAD)
    assert isinstance(model, OnnxSegmentationModel) and model.model_id == "parts/1"
    assert registry.load("parts/1", ONE_THREAD) is model
    # the same settings written another way are the same model (the default provider is the CPU's)
    by_name = OnnxRuntimeConfig(intra_op_threads=1, providers=["CPUExecutionProvider"])
    assert registry.load("parts/1", by_name) is model
    by_entry = OnnxRuntimeConfig(intra_op_threads=1, providers=[{"name": "CPUExecutionProvider"}])
    assert registry.load("parts/1", by_entry) is model
    assert registry.load("parts/1", OnnxRuntimeConfig(intra_op_threads=2)) is not model
    assert len(registry.loaded()) == 2


def test_concurrent_loads_share_one_model(tmp_path: Path) -> None:
    _package(tmp_path, "parts/1", ["a"])
    registry = ModelRegistry([tmp_path])
    models: list[Any] = []
    threads = [
        threading.Thread(target=lambda: models.append(registry.load("parts/1", ONE_THREAD))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(models) == 4 and all(m is models[0] for m in models)


def test_load_path_for_the_cli(tmp_path: Path) -> None:
    folder = _package(tmp_path / "anywhere", "x/y", ["a", "b"])
    registry = ModelRegistry([])
    model = registry.load_path(folder, ONE_THREAD)
    assert model.class_names == ("a", "b") and model.model_id is None
    assert registry.load_path(folder, ONE_THREAD) is model
    result = model.infer([np.zeros((20, 10, 3), np.uint8)])[0]
    assert result.predictions[4, 0] == pytest.approx(0.2)


def test_broken_package_shadowing_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    (tmp_path / "first" / "parts" / "1").mkdir(parents=True)
    _package(tmp_path / "second", "parts/1", ["a"])
    registry = ModelRegistry([tmp_path / "first", tmp_path / "second"])
    with pytest.raises(ModelError, match=r"no weights\.onnx"):
        registry.load("parts/1")


def test_backends_table_names_every_settings_class() -> None:
    assert sorted(BACKENDS) == ["onnxruntime", "openvino", "remote"]
    for name, entry in BACKENDS.items():
        assert entry.config.model_fields["backend"].annotation.__args__ == (name,)  # type: ignore[union-attr]


def test_openvino_only_package_is_listed_and_refused_by_onnxruntime(tmp_path: Path) -> None:
    folder = tmp_path / "parts" / "1-int8"
    folder.mkdir(parents=True)
    (folder / "weights.xml").write_text("<net/>")
    (folder / "weights.bin").write_bytes(b"")
    registry = ModelRegistry([tmp_path])
    assert registry.available_ids() == ["parts/1-int8"]
    with pytest.raises(ModelError, match=r"only the OpenVINO IR weights\.xml.*use model\.backend: openvino"):
        registry.load("parts/1-int8")
