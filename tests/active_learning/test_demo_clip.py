"""Active learning end to end: the demo model on frames of the demo clip, close_to_threshold and a limit.

The first 40 frames of the bundled clip go through a real ``Worker`` (images source, memory sink);
the dataset it writes is checked against what was published: the limit holds, every kept frame's
pre-annotations are the published predictions (masks bit for bit through pycocotools), and the
counter and the readiness details add up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from worker.active_learning.dataset import ANNOTATIONS_FILE
from worker.active_learning.limits import WINDOW_SECONDS
from worker.config import PipelineConfig, read_document
from worker.runtime import Worker
from worker.sinks.memory import MemorySink

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
FRAMES = 40
THRESHOLD, EPSILON, LIMIT = 0.5, 0.3, 5


def clip_frames(folder: Path, n: int) -> None:
    cap = cv2.VideoCapture(str(REPO / "worker" / "assets" / "demo_clip.mp4"))
    try:
        for i in range(n):
            ok, image = cap.read()
            assert ok, f"the demo clip ended at frame {i}"
            cv2.imwrite(str(folder / f"{i:04d}.png"), image)
    finally:
        cap.release()


def pipeline(tmp_path: Path) -> dict[str, Any]:
    doc = read_document(REPO / "pipelines" / "active-learning.yaml")
    doc["sources"] = [{"type": "images", "id": "belt", "path": str(tmp_path / "frames"), "queue_size": 8}]
    doc["sinks"] = [{"type": "jsonl", "path": str(tmp_path / "predictions.jsonl")}]
    doc["http"] = {"enabled": False}
    doc["active_learning"] = {
        **doc["active_learning"],
        "root": str(tmp_path / "dataset"),
        "sampling_strategies": [
            {
                "name": "unsure",
                "type": "close_to_threshold",
                "threshold": THRESHOLD,
                "epsilon": EPSILON,
                "probability": 1.0,
            }
        ],
        "limits": {"hourly": LIMIT},
        "max_image_size": None,
    }
    return doc


def close_to_threshold(result: Any) -> bool:
    predictions = result.outputs["predictions"]["predictions"]
    return any(abs(p["confidence"] - THRESHOLD) < EPSILON for p in predictions)


async def test_the_demo_clip_with_close_to_threshold_and_a_limit(tmp_path: Path) -> None:
    (tmp_path / "frames").mkdir()
    clip_frames(tmp_path / "frames", FRAMES)
    memory = MemorySink()
    worker = await Worker.create(PipelineConfig.model_validate(pipeline(tmp_path)), extra_sinks=[memory])
    started = time.time()
    assert await worker.run() == 0
    ended = time.time()
    assert len(memory.results) == FRAMES

    published = {r.frame_id: r for r in memory.results}
    matched = [r for r in memory.results if close_to_threshold(r)]
    assert len(matched) > LIMIT, "the test needs more matching frames than the limit"
    windows = int(ended // WINDOW_SECONDS["hourly"]) - int(started // WINDOW_SECONDS["hourly"]) + 1

    (batch,) = (tmp_path / "dataset" / "factory-parts").iterdir()
    coco = COCO(str(batch / ANNOTATIONS_FILE))
    written = len(coco.imgs)
    assert min(LIMIT, len(matched)) <= written <= LIMIT * windows
    # the first frames that matched are the ones kept (frames are published in order)
    kept = [coco.imgs[i]["segstream"]["frame_id"] for i in sorted(coco.imgs)]
    assert kept == [r.frame_id for r in matched][:written]

    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    for image_id in sorted(coco.imgs):
        image = coco.imgs[image_id]
        result = published[image["segstream"]["frame_id"]]
        assert image["segstream"]["inference_id"] == result.inference_id
        assert image["segstream"]["strategy"] == "unsure"
        assert (image["width"], image["height"]) == (1280, 720)
        predictions = result.outputs["predictions"]["predictions"]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(predictions)
        for ann, p in zip(anns, predictions, strict=True):
            assert names[ann["category_id"]] == p["class"]
            assert ann["score"] == p["confidence"]
            assert ann["attributes"]["detection_id"] == p["detection_id"]
            assert ann["segmentation"] == p["rle_mask"]
            ours = coco.annToMask(ann)
            theirs = mask_utils.decode(
                {"size": p["rle_mask"]["size"], "counts": p["rle_mask"]["counts"].encode()}
            )
            assert np.array_equal(ours, theirs)
            x, y, w, h = ann["bbox"]
            assert (x + w / 2, y + h / 2, w, h) == pytest.approx(
                (p["x"], p["y"], p["width"], p["height"]), abs=0.06
            )
        assert cv2.imread(str(batch / image["file_name"])).shape == (720, 1280, 3)

    value = worker.metrics.registry.get_sample_value
    labels = {"dataset": "factory-parts", "strategy": "unsure"}
    assert value("segstream_active_learning_samples_total", {**labels, "outcome": "written"}) == written
    assert (
        value("segstream_active_learning_samples_total", {**labels, "outcome": "limited"})
        == len(matched) - written
    )
    assert value("segstream_active_learning_samples_total", {**labels, "outcome": "dropped"}) == 0
    detail = worker.health.readiness().checks["active_learning"]
    assert detail["written"] == written and detail["writing"] is True and detail["last_error"] is None


async def test_an_unwritable_root_is_reported_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "frames").mkdir()
    clip_frames(tmp_path / "frames", 8)
    doc = pipeline(tmp_path)
    (tmp_path / "dataset").write_text("a file where the dataset root should be")
    doc["active_learning"]["limits"] = {}
    worker = await Worker.create(PipelineConfig.model_validate(doc))
    assert await worker.run() == 0  # every frame still processed and published
    assert (
        worker.metrics.registry.get_sample_value("segstream_frames_processed_total", {"source": "belt"}) == 8
    )
    detail = worker.health.readiness().checks["active_learning"]
    assert detail["writing"] is False and detail["failed"] > 0 and detail["written"] == 0
    assert "cannot open batch" in detail["last_error"]
    failed = worker.metrics.registry.get_sample_value(
        "segstream_active_learning_samples_total",
        {"dataset": "factory-parts", "strategy": "unsure", "outcome": "failed"},
    )
    assert failed == detail["failed"]


def test_the_worker_killed_mid_run_leaves_a_dataset_that_parses(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    import yaml

    (tmp_path / "frames").mkdir()
    clip_frames(tmp_path / "frames", 12)
    doc = pipeline(tmp_path)
    doc["sources"][0]["loop"] = True  # runs until killed
    doc["active_learning"]["sampling_strategies"] = [
        {"name": "all", "type": "random", "traffic_percentage": 1.0}
    ]
    doc["active_learning"]["limits"] = {}
    doc["log_level"] = "WARNING"
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run", str(tmp_path / "pipeline.yaml")], env=env, cwd=tmp_path
    )
    root = tmp_path / "dataset" / "factory-parts"
    try:
        deadline = time.monotonic() + 120
        while len(list(root.glob("*/*.jpg"))) < 20:
            assert proc.poll() is None, "the worker stopped"
            assert time.monotonic() < deadline, "the worker wrote too few samples in time"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    (batch,) = root.iterdir()
    coco = COCO(str(batch / ANNOTATIONS_FILE))
    assert len(coco.imgs) >= 1
    assert all((batch / image["file_name"]).is_file() for image in coco.imgs.values())


async def test_unknown_strategy_classes_stop_the_worker_at_start_up(tmp_path: Path) -> None:
    from worker.errors import ConfigError

    (tmp_path / "frames").mkdir()
    doc = pipeline(tmp_path)
    doc["active_learning"]["sampling_strategies"][0]["selected_class_names"] = ["bolt", "gear"]
    with pytest.raises(ConfigError, match=r"\['gear'\] do not exist in the model's training set") as info:
        await Worker.create(PipelineConfig.model_validate(doc))
    assert info.value.field == "active_learning.sampling_strategies[0].selected_class_names"
