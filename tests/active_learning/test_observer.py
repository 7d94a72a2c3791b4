"""The sampler: the step's fields per frame, strategies in order, limits, a writer that falls behind."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pycocotools.coco import COCO

from tests.active_learning.helpers import NAMES, detections, frame_image
from worker.active_learning import ActiveLearningConfig, ActiveLearningSampler, build_sampler
from worker.active_learning.dataset import ANNOTATIONS_FILE, DatasetWriter
from worker.errors import ConfigError
from worker.frame import Frame
from worker.messages import FrameResult
from worker.publisher import PublishedFrame
from worker.step.detections import Detections
from worker.step.manifests import parse_step

T0 = 1796220000.0  # 2026-12-02T14:00:00Z
BATCH = "al_batch_2026_12_02"  # the default prefix, daily
UNSURE = {
    "name": "unsure",
    "type": "close_to_threshold",
    "threshold": 0.5,
    "epsilon": 0.1,
    "probability": 1.0,
}


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def step(**fields: Any) -> Any:
    return parse_step(
        {
            "type": "roboflow_core/roboflow_instance_segmentation_model@v4",
            "name": "seg",
            "images": "$inputs.image",
            "model_id": "factory-parts/1",
            **fields,
        }
    )


def config(root: Path, **fields: Any) -> ActiveLearningConfig:
    doc: dict[str, Any] = {"root": str(root), "sampling_strategies": [UNSURE], "seed": 0, **fields}
    return ActiveLearningConfig.model_validate(doc)


def sampler(
    root: Path,
    step_fields: dict[str, Any] | None = None,
    *,
    inputs: dict[str, Any] | None = None,
    clock: Clock | None = None,
    writer: DatasetWriter | None = None,
    start: bool = True,
    **fields: Any,
) -> tuple[ActiveLearningSampler, CollectorRegistry]:
    registry = CollectorRegistry()
    s = ActiveLearningSampler(
        config(root, **fields),
        step=step(**(step_fields if step_fields is not None else {"disable_active_learning": False})),
        class_names={"factory-parts/1": NAMES},
        runtime_inputs=lambda: dict(inputs or {}),
        pipeline="test",
        registry=registry,
        clock=clock or Clock(),
        writer=writer,
    )
    if start:
        s.start()
    return s, registry


def published(n: int, det: Detections | None = None, **parameters: Any) -> PublishedFrame:
    if det is None:  # one washer at 0.52: close to the threshold
        det = detections([(2, 3, 20, 30), (50, 10, 90, 60)], [0.52, 0.95], [1, 3], seed=n)
    frame = Frame("cam1", n, T0 + n, frame_image(seed=n), parameters=dict(parameters))
    result = FrameResult(
        "test", "cam1", n, frame.frame_id, frame.timestamp, "seg", f"inf-{n}", "factory-parts/1", {}
    )
    return PublishedFrame(frame, result, det, NAMES, 0.01)


def count(registry: CollectorRegistry, dataset: str, strategy: str, outcome: str) -> float:
    value = registry.get_sample_value(
        "segstream_active_learning_samples_total",
        {"dataset": dataset, "strategy": strategy, "outcome": outcome},
    )
    return 0.0 if value is None else value


def folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def images(root: Path, dataset: str = "factory-parts", batch: str = BATCH) -> list[dict[str, Any]]:
    path = root / dataset / batch / ANNOTATIONS_FILE
    if not path.exists():
        return []
    coco = COCO(str(path))
    return [coco.imgs[i] for i in sorted(coco.imgs)]


async def test_the_default_step_collects_nothing(tmp_path: Path) -> None:
    s, registry = sampler(tmp_path, {})  # disable_active_learning defaults to true
    for n in range(3):
        s.on_result(published(n))
    await s.aclose()
    assert not (tmp_path / "factory-parts").exists()
    assert count(registry, "factory-parts", "unsure", "written") == 0


async def test_enabled_frames_go_to_the_project_part_of_the_model_id(tmp_path: Path) -> None:
    s, registry = sampler(tmp_path)
    far = detections([(2, 3, 20, 30)], [0.95], [1])
    s.on_result(published(0))
    s.on_result(published(1, det=far))  # nothing close to the threshold
    s.on_result(published(2))
    await s.aclose()
    got = images(tmp_path)
    assert [i["segstream"]["frame_number"] for i in got] == [0, 2]
    assert got[0]["segstream"] == {
        "pipeline": "test",
        "source": "cam1",
        "frame_id": "cam1:0",
        "frame_number": 0,
        "capture_time": T0,
        "strategy": "unsure",
        "inference_id": "inf-0",
        "model_id": "factory-parts/1",
        "original_width": 128,
        "original_height": 72,
    }
    assert count(registry, "factory-parts", "unsure", "written") == 2
    assert s.status()["datasets"] == ["factory-parts"] and s.status()["written"] == 2


async def test_both_fields_follow_input_selectors_per_frame(tmp_path: Path) -> None:
    fields = {"disable_active_learning": "$inputs.al_off", "active_learning_target_dataset": "$inputs.ds"}
    s, registry = sampler(tmp_path, fields, inputs={"al_off": False, "ds": "line-a"})
    s.on_result(published(0))  # the inputs' values: on, line-a
    s.on_result(published(1, ds="line-b"))  # the frame's own dataset
    s.on_result(published(2, al_off=True))  # this frame opts out
    s.on_result(published(3, ds=None))  # null dataset: the project part of model_id
    await s.aclose()
    assert [i["segstream"]["frame_number"] for i in images(tmp_path, "line-a")] == [0]
    assert [i["segstream"]["frame_number"] for i in images(tmp_path, "line-b")] == [1]
    assert [i["segstream"]["frame_number"] for i in images(tmp_path, "factory-parts")] == [3]
    assert count(registry, "line-b", "unsure", "written") == 1


async def test_literal_fields_with_other_selectors_that_only_frames_set(tmp_path: Path) -> None:
    # confidence_mode is bound to an input without a default: the frames must set it; the literal
    # active-learning fields still decide once
    fields = {
        "disable_active_learning": False,
        "confidence_mode": "$inputs.mode",
        "active_learning_target_dataset": "line-c",
    }
    s, _ = sampler(tmp_path, fields)
    s.on_result(published(0, mode="best"))
    await s.aclose()
    assert [i["segstream"]["frame_number"] for i in images(tmp_path, "line-c")] == [0]


async def test_a_bad_selector_value_skips_the_frame(tmp_path: Path) -> None:
    s, _ = sampler(tmp_path, {"disable_active_learning": "$inputs.al_off"}, inputs={"al_off": False})
    s.on_result(published(0, al_off="no"))  # refused by the field's type: not sampled, no error
    s.on_result(published(1))
    await s.aclose()
    assert [i["segstream"]["frame_number"] for i in images(tmp_path)] == [1]


async def test_dataset_limits_hold_per_minute_and_reset_with_the_clock(tmp_path: Path) -> None:
    clock = Clock()
    s, registry = sampler(tmp_path, clock=clock, limits={"minutely": 2, "hourly": 3})
    for n in range(5):
        s.on_result(published(n))
    clock.t += 60
    for n in range(5, 10):
        s.on_result(published(n))
    await s.aclose()
    assert [i["segstream"]["frame_number"] for i in images(tmp_path)] == [0, 1, 5]
    assert count(registry, "factory-parts", "unsure", "written") == 3
    assert count(registry, "factory-parts", "unsure", "limited") == 7


async def test_the_first_matching_strategy_with_credit_takes_the_frame(tmp_path: Path) -> None:
    strategies = [
        {**UNSURE, "limits": [{"type": "hourly", "value": 1}]},
        {"name": "everything", "type": "random", "traffic_percentage": 1.0},
    ]
    s, registry = sampler(tmp_path, sampling_strategies=strategies)
    for n in range(3):
        s.on_result(published(n))
    await s.aclose()
    assert [i["segstream"]["strategy"] for i in images(tmp_path)] == ["unsure", "everything", "everything"]
    assert count(registry, "factory-parts", "unsure", "written") == 1
    assert count(registry, "factory-parts", "everything", "written") == 2


async def test_a_writer_that_falls_behind_drops_samples_and_gives_their_credit_back(tmp_path: Path) -> None:
    stalled = DatasetWriter(tmp_path, queue_size=1, autostart=False)  # never started: its queue stays full
    s, registry = sampler(tmp_path, writer=stalled, start=False, limits={"minutely": 2})
    for n in range(4):
        s.on_result(published(n))  # returns at once every time
    assert count(registry, "factory-parts", "unsure", "dropped") == 3
    assert count(registry, "factory-parts", "unsure", "limited") == 0  # credit returned on each drop
    assert stalled.queue_depth == 1
    assert stalled.close(timeout=1) == 1


async def test_unsafe_or_surplus_dataset_names_are_refused(tmp_path: Path) -> None:
    s, registry = sampler(
        tmp_path,
        {"disable_active_learning": False, "active_learning_target_dataset": "$inputs.ds"},
        inputs={"ds": "a"},
        max_datasets=2,
    )
    for n, ds in enumerate(["a", "../escape", "b", "c", ".hidden", "a"]):
        s.on_result(published(n, ds=ds))
    await s.aclose()
    assert count(registry, "other", "unsure", "refused") == 3  # ../escape, c (a third name), .hidden
    assert [i["segstream"]["frame_number"] for i in images(tmp_path, "a")] == [0, 5]
    assert len(images(tmp_path, "b")) == 1
    assert folders(tmp_path) == ["a", "b"]


def test_selected_classes_must_exist_in_the_model(tmp_path: Path) -> None:
    strategies = [UNSURE, {**UNSURE, "name": "gears", "selected_class_names": ["gear"]}]
    with pytest.raises(
        ConfigError, match=r"'gears'.*\['gear'\] do not exist in the model's training set"
    ) as info:
        sampler(tmp_path, sampling_strategies=strategies)
    assert info.value.field == "active_learning.sampling_strategies[1].selected_class_names"


def test_build_sampler_warns_when_a_step_asks_without_a_section(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert (
            build_sampler(
                None,
                [step(disable_active_learning=False)],
                {"factory-parts/1": NAMES},
                runtime_inputs=dict,
                pipeline="p",
                registry=CollectorRegistry(),
            )
            is None
        )
    assert "no samples are collected" in caplog.text


def test_the_section_refuses_unknown_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Extra inputs"):
        config(tmp_path, upload=True)
    with pytest.raises(ValueError, match="strategy names must be unique"):
        config(tmp_path, sampling_strategies=[UNSURE, UNSURE])
    with pytest.raises(ValueError, match="recreation_interval"):
        config(tmp_path, batching_strategy={"recreation_interval": "hourly"})
