"""``segstream validate`` and ``segstream infer``: exit codes, error messages, JSON per image, and where
models are looked up (``--models-dir``, then ``$SEGSTREAM_MODELS_DIR``, then the bundled models)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import yaml
from pycocotools import mask as mask_utils

from tests.integration.helpers import MODEL_ID, jpeg_bytes, make_models_dir, workflow_v4
from worker.cli import main
from worker.models.registry import BUNDLED_MODELS_DIR, MODELS_DIR_ENV

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "tests" / "data" / "workflows"
BUNDLED = BUNDLED_MODELS_DIR / "factory-parts" / "1"


@pytest.fixture(autouse=True)
def _no_models_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODELS_DIR_ENV, raising=False)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return make_models_dir(tmp_path / "models")


@pytest.fixture
def workflow_file(tmp_path: Path) -> Path:
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow_v4(confidence=0.4)))
    return path


def _image(tmp_path: Path, name: str, seed: int = 0) -> Path:
    path = tmp_path / name
    path.write_bytes(jpeg_bytes(seed, size=(120, 160)))
    return path


def _stdout_objects(text: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_validate_a_workflow_with_its_models(
    workflow_file: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(workflow_file), "--models-dir", str(models_dir)]) == 0
    assert f"valid (models: {MODEL_ID})" in capsys.readouterr().err


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_validate_the_reference_examples(
    version: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    step = json.loads((WORKFLOWS / f"reference_step_v{version}.json").read_text())
    workflow = {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}],
        "steps": [step],
        "outputs": [{"type": "JsonField", "name": "out", "selector": f"$steps.{step['name']}.*"}],
    }
    path = tmp_path / "reference.yaml"
    path.write_text(yaml.safe_dump(workflow))
    code = main(["validate", str(path), "--no-models"])
    err = capsys.readouterr().err
    if "confidence_mode" in step:  # v3/v4: the docs' placeholder is not an allowed value
        assert code == 1
        assert "confidence_mode" in err and all(v in err for v in ("best", "default", "custom")), err
    else:
        assert code == 0, err


def test_validate_names_the_step_and_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workflow = workflow_v4()
    workflow["steps"][0]["iou_threshold"] = 1.5
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(workflow))
    assert main(["validate", str(path), "--no-models"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "seg" in err and "iou_threshold" in err, err


def test_validate_unknown_model_and_unknown_class(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workflow = workflow_v4()
    workflow["steps"][0]["model_id"] = "nothing/9"
    path = tmp_path / "unknown-model.json"
    path.write_text(json.dumps(workflow))
    assert main(["validate", str(path), "--models-dir", str(models_dir)]) == 1
    assert "nothing/9" in capsys.readouterr().err

    workflow = workflow_v4()
    workflow["steps"][0]["class_filter"] = ["bolt", "sprocket"]
    path = tmp_path / "unknown-class.json"
    path.write_text(json.dumps(workflow))
    assert main(["validate", str(path), "--models-dir", str(models_dir)]) == 1
    assert "sprocket" in capsys.readouterr().err


def test_validate_the_shipped_pipelines_without_models(capsys: pytest.CaptureFixture[str]) -> None:
    # the examples name their deployment's folders and secrets: check the files, not this machine
    for path in sorted((REPO / "pipelines").glob("*.yaml")):
        assert main(["validate", str(path), "--no-models", "--no-environment"]) == 0, capsys.readouterr().err


def test_validate_a_file_that_is_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in capsys.readouterr().err


def test_infer_prints_one_object_per_image(
    workflow_file: Path, models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [_image(tmp_path, "a.jpg", 1), _image(tmp_path, "b.jpg", 2)]
    args = ["infer", str(workflow_file), *map(str, images), "--models-dir", str(models_dir)]
    assert main(args) == 0
    docs = _stdout_objects(capsys.readouterr().out)
    assert len(docs) == 2
    for doc in docs:
        assert set(doc) == {"predictions", "model_id"} and doc["model_id"] == MODEL_ID
        predictions = doc["predictions"]
        assert predictions["image"] == {"width": 160, "height": 120}
        # the test model's bolt (0.9) and nut (0.6) pass confidence 0.4, its washer (0.3) does not
        assert sorted(p["class"] for p in predictions["predictions"]) == ["bolt", "nut"]
        for p in predictions["predictions"]:
            rle = {"size": p["rle_mask"]["size"], "counts": p["rle_mask"]["counts"].encode()}
            assert mask_utils.decode(rle).sum() > 0


def test_infer_binds_parameters(
    workflow_file: Path, models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _image(tmp_path, "a.jpg")
    args = ["infer", str(workflow_file), str(image), "--models-dir", str(models_dir)]
    assert main([*args, "--param", "confidence=0.7"]) == 0
    (doc,) = _stdout_objects(capsys.readouterr().out)
    assert [p["class"] for p in doc["predictions"]["predictions"]] == ["bolt"]
    assert main([*args, "--param", "confidence=7"]) == 1  # out of range: an error for that image
    captured = capsys.readouterr()
    assert captured.out == "" and "confidence" in captured.err


def test_infer_reports_an_unreadable_image_and_goes_on(
    workflow_file: Path, models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(jpeg_bytes(0)[:40])
    good = _image(tmp_path, "good.jpg")
    args = ["infer", str(workflow_file), str(broken), str(tmp_path / "none.png"), str(good)]
    assert main([*args, "--models-dir", str(models_dir)]) == 1
    captured = capsys.readouterr()
    assert len(_stdout_objects(captured.out)) == 1  # the good image still gets its result
    assert f"{broken}: not a readable image" in captured.err
    assert f"{tmp_path / 'none.png'}: no such file" in captured.err


def test_models_dir_option_wins_over_the_environment(
    workflow_file: Path,
    models_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "empty"))
    assert main(["validate", str(workflow_file)]) == 1  # parts/1 is neither there nor bundled
    assert MODEL_ID in capsys.readouterr().err
    monkeypatch.setenv(MODELS_DIR_ENV, str(models_dir))
    assert main(["validate", str(workflow_file)]) == 0
    assert main(["validate", str(workflow_file), "--models-dir", str(tmp_path / "empty")]) == 1


def test_environment_models_dir_wins_over_the_bundled_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a package called factory-parts/1 in $SEGSTREAM_MODELS_DIR shadows the bundled one
    own = make_models_dir(tmp_path / "build")
    shutil.copytree(own / "parts" / "1", tmp_path / "models" / "factory-parts" / "1")
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "models"))
    workflow = workflow_v4()
    workflow["steps"][0]["model_id"] = "factory-parts/1"
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    image = _image(tmp_path, "a.jpg")
    assert main(["infer", str(path), str(image)]) == 0
    (doc,) = _stdout_objects(capsys.readouterr().out)
    assert {p["class"] for p in doc["predictions"]["predictions"]} == {"bolt", "nut"}  # the test model's


def test_infer_with_the_bundled_model_on_a_pipeline_file(tmp_path: Path) -> None:
    from training.data import TEST, eval_frame

    scene = eval_frame(20261201, TEST, 0)
    image = tmp_path / "belt.png"
    assert cv2.imwrite(str(image), scene.image)
    # the console command as a user runs it, on the demo pipeline file (no models dir anywhere)
    env = {k: v for k, v in os.environ.items() if k != MODELS_DIR_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "infer", str(REPO / "pipelines" / "demo.yaml"), str(image)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (doc,) = _stdout_objects(proc.stdout)
    assert doc["model_id"] == "factory-parts/1"
    found = doc["predictions"]["predictions"]
    assert len(found) >= max(1, len(scene.masks) // 2), (len(found), len(scene.masks))
    names = {"nut", "washer", "bolt", "bracket"}
    assert {p["class"] for p in found} <= names
    h, w = scene.image.shape[:2]
    for p in found:
        assert p["rle_mask"]["size"] == [h, w]
        rle = {"size": [h, w], "counts": p["rle_mask"]["counts"].encode()}
        assert mask_utils.decode(rle).any()


def test_validate_the_factory_workflows_with_the_bundled_model(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("factory_v1_v3.yaml", "factory_v4.json"):
        assert main(["validate", str(WORKFLOWS / name)]) == 0, capsys.readouterr().err
        assert "factory-parts/1" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("segstream ")


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2 and "usage" in capsys.readouterr().err


# ---- infer: parameters, inputs that are not images, closed pipes, annotated images ----------------


def _cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != MODELS_DIR_ENV}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )


def _control_topic_error(workflow_file: Path, models_dir: Path, inputs: dict[str, object]) -> str:
    """What the control topic replies to ``{"inputs": inputs}`` for the same workflow and models."""
    from worker.control import ControlListener
    from worker.models.registry import ModelRegistry
    from worker.mqtt import BrokerConfig
    from worker.step.executor import WorkflowRunner
    from worker.step.workflow import load_workflow
    from worker.telemetry import NullTelemetry

    runner = WorkflowRunner(load_workflow(workflow_file), ModelRegistry([models_dir]))
    refused: list[str] = []
    listener = ControlListener(
        BrokerConfig(), "c", runner.set_runtime_inputs, lambda: {}, refused.append, NullTelemetry(), "w"
    )
    reply = listener.handle(json.dumps({"inputs": inputs}).encode())
    assert reply["ok"] is False and refused == [reply["error"]]
    return str(reply["error"])


@pytest.mark.parametrize(
    "param", ["confidnce=0.5", "confidence=7", "image=1"], ids=["typo", "out-of-range", "not-a-parameter"]
)
def test_infer_refuses_a_bad_param_with_the_control_topics_message(
    workflow_file: Path, models_dir: Path, tmp_path: Path, param: str
) -> None:
    image = _image(tmp_path, "a.jpg")
    proc = _cli("infer", str(workflow_file), str(image), "--models-dir", str(models_dir), "--param", param)
    name, _, value = param.partition("=")
    expected = _control_topic_error(workflow_file, models_dir, {name: json.loads(value)})
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", f"error: {expected}\n")


def test_infer_names_each_kind_of_bad_input(
    workflow_file: Path, models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    missing = tmp_path / "missing.jpg"
    good = _image(tmp_path, "good.jpg")
    args = ["infer", str(workflow_file), *map(str, (missing, empty, text, folder, good))]
    assert main([*args, "--models-dir", str(models_dir)]) == 1
    captured = capsys.readouterr()
    assert len(_stdout_objects(captured.out)) == 1
    assert captured.err.splitlines() == [
        f"error: {missing}: no such file",
        f"error: {empty}: empty file, not an image",
        f"error: {text}: not a readable image (a format OpenCV cannot decode, or truncated)",
        f"error: {folder}: is a directory, not an image",
    ]


def test_infer_is_quiet_when_its_reader_goes_away(
    workflow_file: Path, models_dir: Path, tmp_path: Path
) -> None:
    image = _image(tmp_path, "a.jpg")
    # far more output than a pipe holds (64 KiB): the worker is still writing when the reader leaves
    args = ["infer", str(workflow_file), *[str(image)] * 300, "--pretty", "--models-dir", str(models_dir)]
    env = {k: v for k, v in os.environ.items() if k != MODELS_DIR_ENV}
    with subprocess.Popen(
        [sys.executable, "-m", "worker.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()  # what `| head -1` does: one line, then close the pipe
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141, stderr
    assert first.strip() == b"{" and stderr == ""


def test_infer_in_a_shell_pipeline_to_head(workflow_file: Path, models_dir: Path, tmp_path: Path) -> None:
    image = _image(tmp_path, "a.jpg")
    command = (
        f"{sys.executable} -m worker.cli infer {workflow_file} {' '.join([str(image)] * 300)} "
        f"--models-dir {models_dir} | head -1"
    )
    env = {k: v for k, v in os.environ.items() if k != MODELS_DIR_ENV}
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    (doc,) = _stdout_objects(proc.stdout)
    assert doc["model_id"] == MODEL_ID


def test_infer_writes_annotated_images_into_a_folder_or_a_file(
    workflow_file: Path, models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _image(tmp_path, "a.jpg", 1), _image(tmp_path, "b.png", 2)
    out = tmp_path / "annotated"
    base = ["infer", str(workflow_file), "--models-dir", str(models_dir)]
    assert main([*base, str(a), str(b), "--annotate", str(out)]) == 0
    docs = _stdout_objects(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["a.annotated.jpg", "b.annotated.png"]
    for source, doc in zip((a, b), docs, strict=True):
        original = cv2.imread(str(source))
        drawn = cv2.imread(str(out / f"{source.stem}.annotated{source.suffix}"))
        assert drawn.shape == original.shape
        changed = cv2.absdiff(drawn, original).max(axis=2) > 40
        for p in doc["predictions"]["predictions"]:  # each mask is tinted (the masks fill their boxes)
            x, y = round(p["x"]), round(p["y"])
            assert changed[y, x], (source.name, p["class"])
        assert not changed[-3:, :8].any()  # far from every box: untouched (JPEG noise aside)

    single = tmp_path / "one.png"
    assert main([*base, str(a), "--annotate", str(single)]) == 0
    assert cv2.imread(str(single)).shape == cv2.imread(str(a)).shape
    capsys.readouterr()

    assert main([*base, str(a), str(b), "--annotate", str(tmp_path / "two.png")]) == 1
    assert "a file name takes one image" in capsys.readouterr().err
    assert main([*base, str(a), "--annotate", str(a)]) == 1
    assert "would overwrite the input" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["result", "error", "status", "control", "control-result", "pipeline"])
def test_schema_prints_the_shipped_schema(kind: str) -> None:
    from worker.schemas import shipped

    proc = _cli("schema", kind)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == shipped(kind)


def test_schema_of_an_unknown_kind_is_a_usage_error() -> None:
    proc = _cli("schema", "results")
    assert proc.returncode == 2 and "invalid choice: 'results'" in proc.stderr
