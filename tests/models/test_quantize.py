"""``segstream quantize``: a real INT8 package from the bundled model, its recorded accuracy re-measured.

Calibration on a few frames of the demo clip, accuracy on a few ground-truth frames (small, so the
test is quick; the shipped factory-parts/1-int8 was made on 100 frames and measured on all 250).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from worker.cli import main
from worker.errors import ModelError
from worker.models.config import OnnxRuntimeConfig, OpenVinoConfig
from worker.models.package import load_model_metadata
from worker.models.quantize import (
    QuantizationRefused,
    evaluation_frames,
    float_output_layers,
    measure_accuracy,
    quantize_package,
)
from worker.models.registry import BUNDLED_MODELS_DIR, ModelRegistry, load_backend

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")

REPO = Path(__file__).resolve().parents[2]
DEMO = BUNDLED_MODELS_DIR / "factory-parts" / "1"
CLIP = REPO / "worker" / "assets" / "demo_clip.mp4"
GT = REPO / "worker" / "assets" / "demo_clip_coco.json"
EVAL_FRAMES = 6


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(DEMO, models / "factory-parts" / "1")
    code = main(
        [
            "quantize",
            "factory-parts/1",
            "--models-dir",
            str(models),
            "--calibration",
            str(CLIP),
            "--ground-truth",
            str(GT),
            "--calibration-frames",
            "24",
            "--eval-frames",
            str(EVAL_FRAMES),
            "--threads",
            "1",
            "--max-drop",
            "0.05",
        ]
    )
    assert code == 0
    return models


def test_the_package_loads_and_says_how_it_was_made(quantized: Path) -> None:
    folder = quantized / "factory-parts" / "1-int8"
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "weights.bin", "weights.xml"]
    registry = ModelRegistry([quantized])
    assert registry.available_ids() == ["factory-parts/1", "factory-parts/1-int8"]
    model = registry.load("factory-parts/1-int8", OpenVinoConfig(backend="openvino", threads=1))
    assert model.info.precision == "int8" and model.class_names == ("nut", "washer", "bolt", "bracket")
    record = load_model_metadata(folder).quantization
    assert record is not None
    assert record["source_model"] == "factory-parts/1" and record["calibration"]["frames"] == 24
    # the head's output convolutions and the last prototype convolution stayed float
    assert sorted(record["kept_float"]) == sorted(
        float_output_layers(ov.Core().read_model(str(DEMO / "weights.onnx")))
    )
    assert any("proto_out" in name for name in record["kept_float"])
    assert sum("/out/Conv" in name for name in record["kept_float"]) == 9
    assert record["weights_bytes"] == (folder / "weights.bin").stat().st_size
    assert record["preset"] == "performance" and "PERFORMANCE preset" in record["method"]


@pytest.mark.parametrize("folder", ["quantized", "shipped"])
def test_no_quantizer_sits_between_a_convolution_and_its_activation(folder: str, quantized: Path) -> None:
    """The recipe that lets OpenVINO fuse conv + SiLU + requantization (quantize.py, point 3).

    A FakeQuantize feeding a Sigmoid / Multiply / Add / Subtract splits the fused INT8 kernel: the
    shipped package is checked too, so a package made with the old recipe cannot be shipped again.
    """
    root = quantized if folder == "quantized" else BUNDLED_MODELS_DIR
    model = ov.Core().read_model(str(root / "factory-parts" / "1-int8" / "weights.xml"))
    ops = model.get_ordered_ops()
    fake_quantizes = [op for op in ops if op.get_type_name() == "FakeQuantize"]
    assert len(fake_quantizes) > 40  # the convolutions' inputs are quantized
    feeding = {
        target.get_node().get_type_name()
        for op in fake_quantizes
        for output in op.outputs()
        for target in output.get_target_inputs()
    }
    assert feeding.isdisjoint({"Sigmoid", "Multiply", "Add", "Subtract"}), feeding
    # symmetric activations (PERFORMANCE): a SiLU output's quantizer spans negative values
    lows = [float(np.min(op.input_value(1).get_node().get_data())) for op in fake_quantizes]
    assert min(lows) < 0


def test_recorded_accuracy_is_what_the_package_measures(quantized: Path) -> None:
    record = load_model_metadata(quantized / "factory-parts" / "1-int8").quantization
    assert record is not None
    accuracy = record["accuracy"]
    assert accuracy["kind"] == "ground_truth" and accuracy["frames"] == EVAL_FRAMES
    float_model = load_backend(quantized / "factory-parts" / "1", OnnxRuntimeConfig(intra_op_threads=1))
    int8_model = load_backend(
        quantized / "factory-parts" / "1-int8", OpenVinoConfig(backend="openvino", threads=1)
    )
    frames, gt = evaluation_frames(CLIP, json.loads(GT.read_text()), EVAL_FRAMES)
    again = measure_accuracy(float_model, int8_model, frames, gt)
    assert again["float"] == accuracy["float"] and again["int8"] == accuracy["int8"]
    assert again["segm_map50_drop"] == accuracy["segm_map50_drop"] <= 0.05
    assert accuracy["float"]["segm_map50"] > 0.5  # a real model on real frames, not an empty score


def _grey_frames(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):  # frames unlike anything the camera sees: a flat grey belt
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.full((360, 640, 3), 100 + 10 * i, np.uint8))
    return folder


def test_too_large_a_drop_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    # calibrated on flat grey frames the activation ranges are wrong for real frames: the accuracy
    # measured on the clip's ground truth falls, and the package must not be written
    destination = tmp_path / "models" / "factory-parts" / "1-int8"
    with pytest.raises(QuantizationRefused) as info:
        quantize_package(
            DEMO,
            destination,
            source_id="factory-parts/1",
            model_id="factory-parts/1-int8",
            calibration=_grey_frames(tmp_path / "grey"),
            ground_truth=GT,
            evaluation=CLIP,
            max_drop=0.01,
            eval_frames=EVAL_FRAMES,
            threads=1,
        )
    message = str(info.value)
    drop = float(message.split("dropped by ")[1].split(" ")[0])
    assert drop > 0.01 and "ground_truth" in message and "more than --max-drop 0.01 by" in message
    assert f"by {drop - 0.01:.4f}" in message
    assert not destination.exists() and list((tmp_path / "models").rglob("*")) == [destination.parent]


def test_refusal_through_the_cli_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(DEMO, tmp_path / "factory-parts" / "1")
    grey = _grey_frames(tmp_path / "grey")
    argv = ["quantize", "factory-parts/1", "--models-dir", str(tmp_path), "--calibration", str(grey)]
    argv += ["--ground-truth", str(GT), "--evaluation", str(CLIP), "--eval-frames", "3", "--threads", "1"]
    code = main(argv)
    assert code == 1
    assert "segm mAP50 dropped by" in capsys.readouterr().err
    assert not (tmp_path / "factory-parts" / "1-int8").exists()


def test_existing_destination_and_missing_inputs(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(ModelError, match="exists"):
        quantize_package(DEMO, tmp_path / "out", source_id="a/1", model_id="a/2", calibration=CLIP)
    with pytest.raises(ModelError, match="neither a video file nor an image folder"):
        quantize_package(DEMO, tmp_path / "new", source_id="a/1", model_id="a/2", calibration=tmp_path / "no")


def test_bundled_int8_package_is_listed_with_its_provenance(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    float_row, int8_row = rows["factory-parts/1"], rows["factory-parts/1-int8"]
    assert float_row["precision"] == "fp32" and float_row["backends"] == ["onnxruntime", "openvino"]
    assert int8_row["precision"] == "int8" and int8_row["backends"] == ["openvino"]
    assert int8_row["files"] == ["weights.xml"] and int8_row["input_size"] == [480, 480]
    assert "segstream quantize from factory-parts/1" in int8_row["provenance"]
    record = load_model_metadata(BUNDLED_MODELS_DIR / "factory-parts" / "1-int8").quantization
    assert record is not None and record["accuracy"]["frames"] == 250
    assert int8_row["segm_map50_drop"] == record["accuracy"]["segm_map50_drop"] <= 0.01
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert (
        "factory-parts/1-int8  int8  input 480x480 (dynamic)  4 classes: nut, washer, bolt, bracket" in text
    )
