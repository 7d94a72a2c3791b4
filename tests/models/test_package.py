from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from tests.support.onnx_models import (
    build_segmentation_model,
    package_metadata,
    save_model,
    ultralytics_metadata_props,
    write_model_package,
)
from worker.errors import ModelError
from worker.models.onnx_backend import OnnxSegmentationModel
from worker.models.package import (
    ModelMetadata,
    RecommendedParameters,
    load_model_metadata,
    locate_package,
    parse_ultralytics_metadata,
)

NAMES = ["bolt", "nut", "washer"]


def test_metadata_from_package_folder(tmp_path: Path) -> None:
    doc = package_metadata(
        NAMES,
        (64, 96),
        pad_value=0,
        stride=32,
        recommended_parameters={"confidence": 0.45, "per_class_confidence": {"nut": 0.7}},
        provenance={"dataset": "synthetic-v2", "epochs": 40},
        metrics={"mask_map50": 0.9},
    )
    folder = write_model_package(
        tmp_path / "parts" / "1", build_segmentation_model(3, input_size=(64, 96)), doc
    )
    metadata = load_model_metadata(folder)
    assert metadata.class_names == ("bolt", "nut", "washer")
    assert metadata.num_classes == 3 and metadata.num_channels == 4 + 3 + 32
    assert metadata.input_size == (64, 96)
    assert metadata.pad_value == 0 and metadata.stride == 32 and metadata.task == "segment"
    assert metadata.recommended_parameters == RecommendedParameters(
        confidence=0.45, per_class_confidence={"nut": 0.7}
    )
    assert metadata.provenance == {"dataset": "synthetic-v2", "epochs": 40}
    assert metadata.metrics == {"mask_map50": 0.9}
    assert metadata.dynamic_input is False


def test_metadata_from_ultralytics_props(tmp_path: Path) -> None:
    props = ultralytics_metadata_props(NAMES, (64, 64), stride=32, version="8.3.0")
    weights = save_model(build_segmentation_model(3, metadata_props=props), tmp_path / "yolov8n-seg.onnx")
    metadata = load_model_metadata(weights)
    assert metadata.class_names == tuple(NAMES)
    assert metadata.input_size == (64, 64)
    assert metadata.pad_value == 114 and metadata.recommended_parameters is None
    assert metadata.provenance["metadata_props"]["version"] == "8.3.0"
    # the same file as a package folder without metadata.json
    folder = write_model_package(tmp_path / "pkg", build_segmentation_model(3, metadata_props=props))
    assert load_model_metadata(folder).class_names == tuple(NAMES)


def test_package_file_wins_over_props(tmp_path: Path) -> None:
    props = ultralytics_metadata_props(["a", "b", "c"], (64, 64), stride=32)
    model = build_segmentation_model(3, metadata_props=props, dynamic_spatial=True)
    doc = {"schema_version": 1, "class_names": NAMES, "provenance": {"by": "tests"}}
    metadata = load_model_metadata(write_model_package(tmp_path / "pkg", model, doc))
    assert metadata.class_names == tuple(NAMES)  # from metadata.json
    assert metadata.input_size == (64, 64)  # from metadata_props (imgsz)
    assert metadata.dynamic_input is True  # from the graph
    assert metadata.provenance["by"] == "tests" and "metadata_props" in metadata.provenance
    doc["input_size"] = [96, 128]
    assert load_model_metadata(write_model_package(tmp_path / "pkg2", model, doc)).input_size == (96, 128)


def test_input_size_from_static_graph(tmp_path: Path) -> None:
    model = build_segmentation_model(3, input_size=(96, 64))
    metadata = load_model_metadata(write_model_package(tmp_path / "p", model, package_metadata(NAMES)))
    assert metadata.input_size == (96, 64)


@pytest.mark.parametrize(
    ("props", "expected", "context"),
    [
        ({"names": "{0: 'person', 1: 'car'}"}, {"class_names": ["person", "car"]}, nullcontext()),
        ({"names": "{1: 'car', 0: 'person'}"}, {"class_names": ["person", "car"]}, nullcontext()),
        ({"names": "['a', 'b']"}, {"class_names": ["a", "b"]}, nullcontext()),
        ({"imgsz": "[480, 640]", "stride": "32"}, {"input_size": (480, 640), "stride": 32}, nullcontext()),
        ({"imgsz": "320"}, {"input_size": (320, 320)}, nullcontext()),
        ({"task": "segment", "batch": "1"}, {"task": "segment"}, nullcontext()),
        ({}, {}, nullcontext()),
        ({"names": "{0: 'a', 2: 'c'}"}, None, pytest.raises(ModelError, match=r"0\.\.C-1")),
        ({"names": "__import__('os')"}, None, pytest.raises(ModelError, match="not a Python literal")),
        ({"names": "'person'"}, None, pytest.raises(ModelError, match="dict or list")),
        ({"imgsz": "[640]"}, None, pytest.raises(ModelError, match=r"\[h, w\]")),
        ({"imgsz": "[640, -1]"}, None, pytest.raises(ModelError, match=r"\[h, w\]")),
        ({"stride": "32.5"}, None, pytest.raises(ModelError, match="stride")),
    ],
)
def test_parse_ultralytics_metadata(
    props: dict[str, str], expected: dict[str, Any] | None, context: Any
) -> None:
    with context:
        assert parse_ultralytics_metadata(props) == expected


def _write(tmp_path: Path, doc: Any, model_classes: int = 3, **model_kwargs: Any) -> Path:
    folder = tmp_path / "pkg"
    write_model_package(folder, build_segmentation_model(model_classes, **model_kwargs))
    (folder / "metadata.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return folder


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("{not json", "cannot read model metadata"),
        ({"class_names": NAMES, "colour": "red"}, "colour"),
        ({"class_names": NAMES, "schema_version": 2}, "schema_version"),
        ({"class_names": ["bolt", "nut"]}, r"has 39 channels but 2 class names need 4 \+ 2 \+ 32 = 38"),
        ({"class_names": ["bolt", "bolt", "nut"]}, "unique"),
        ({"class_names": []}, "class_names"),
        ({"class_names": NAMES, "input_size": [64, 64], "stride": 48}, "multiples of stride"),
        ({"class_names": NAMES, "input_size": [96, 96]}, "differs from the ONNX input"),
        ({"class_names": NAMES, "dynamic_input": True}, "dynamic_input"),
        ({"class_names": NAMES, "pad_value": 300}, "pad_value"),
        ({"class_names": NAMES, "task": "detect"}, "task"),
        ({"class_names": NAMES, "recommended_parameters": {"confidence": 1.5}}, "confidence"),
        (
            {"class_names": NAMES, "recommended_parameters": {"per_class_confidence": {"gear": 0.5}}},
            "does not have",
        ),
        (
            {"class_names": NAMES, "recommended_parameters": {"per_class_confidence": {"nut": -0.1}}},
            r"\[0, 1\]",
        ),
        ({"input_size": [64, 64]}, "no class names"),
    ],
)
def test_bad_metadata(tmp_path: Path, doc: Any, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        load_model_metadata(_write(tmp_path, doc))


def test_dynamic_model_without_input_size(tmp_path: Path) -> None:
    folder = _write(tmp_path, {"class_names": NAMES}, dynamic_spatial=True)
    with pytest.raises(ModelError, match="input size unknown"):
        load_model_metadata(folder)


def test_prototype_channel_and_output_checks(tmp_path: Path) -> None:
    # a detection-only export (no prototypes output): no rank-4 output
    model = build_segmentation_model(3)
    del model.graph.output[1]
    folder = write_model_package(tmp_path / "det", model, package_metadata(NAMES))
    with pytest.raises(ModelError, match=r"not a segmentation head.*rank-4 prototypes output"):
        load_model_metadata(folder)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        locate_package(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no weights\.onnx"):
        locate_package(tmp_path / "empty")
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ModelError, match="neither"):
        locate_package(tmp_path / "model.pt")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "weights.onnx").write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        load_model_metadata(tmp_path / "broken")


def test_locate_package(tmp_path: Path) -> None:
    folder = write_model_package(tmp_path / "p", build_segmentation_model(3), package_metadata(NAMES))
    package = locate_package(folder)
    assert package.root == folder and package.weights_path == folder / "weights.onnx"
    assert package.metadata_path == folder / "metadata.json"
    bare = locate_package(folder / "weights.onnx")
    assert bare.root is None and bare.metadata_path is None


def test_model_metadata_is_frozen_and_strict() -> None:
    metadata = ModelMetadata(class_names=("a",), input_size=(64, 64))
    with pytest.raises(ValueError, match="frozen"):
        metadata.pad_value = 0
    with pytest.raises(ValueError, match="extra"):
        ModelMetadata(class_names=("a",), input_size=(64, 64), colour="red")  # type: ignore[call-arg]


def test_channel_count_hidden_by_dynamic_axes_is_checked_when_a_backend_loads(tmp_path: Path) -> None:
    # metadata is read without an inference session, so a count the graph hides cannot be seen
    # there; the backend's warm-up run (and every run) checks the actual outputs
    model = build_segmentation_model(2, hide_channel_count=True, dynamic_spatial=True)
    ok = write_model_package(tmp_path / "ok", model, package_metadata(["a", "b"], (64, 64)))
    assert load_model_metadata(ok).num_classes == 2
    bad = write_model_package(tmp_path / "bad", model, package_metadata(NAMES, (64, 64)))
    assert load_model_metadata(bad).num_classes == 3
    with pytest.raises(ModelError, match=r"predictions output has shape \(1, 38, 1\)"):
        OnnxSegmentationModel(bad, intra_op_threads=1)


def test_metadata_is_read_without_an_inference_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_model_metadata created an ONNX Runtime session")

    folder = write_model_package(tmp_path / "p", build_segmentation_model(3), package_metadata(NAMES))
    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    assert load_model_metadata(folder).class_names == tuple(NAMES)


def test_a_folder_with_one_onnx_file_of_any_name_loads(tmp_path: Path) -> None:
    from worker.models.registry import ModelRegistry

    folder = tmp_path / "yolo" / "1"
    folder.mkdir(parents=True)
    props = ultralytics_metadata_props(NAMES, (64, 64), stride=32, version="8.4.0")
    save_model(build_segmentation_model(3, metadata_props=props), folder / "yolov8n-seg.onnx")
    assert locate_package(folder).weights_path == folder / "yolov8n-seg.onnx"
    registry = ModelRegistry([tmp_path])
    assert registry.available_ids() == ["yolo/1"]
    model = registry.load("yolo/1")
    assert model.class_names == tuple(NAMES) and model.input_size == (64, 64)
    save_model(build_segmentation_model(3, metadata_props=props), folder / "yolo11n-seg.onnx")
    with pytest.raises(ModelError, match=r"several ONNX files \['yolo11n-seg\.onnx', 'yolov8n-seg\.onnx'\]"):
        locate_package(folder)
