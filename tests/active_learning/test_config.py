"""The pipeline's ``active_learning`` section: the shipped example loads, mistakes name their field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from worker.config import load_pipeline, read_document
from worker.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "pipelines" / "active-learning.yaml"


def test_the_example_pipeline_loads() -> None:
    config = load_pipeline(EXAMPLE)
    al = config.active_learning
    assert al is not None and al.root == Path("out/active-learning/dataset")
    assert [s.type for s in al.sampling_strategies] == [
        "close_to_threshold",
        "detections_number_based",
        "random",
    ]
    assert al.limits.as_dict() == {"minutely": 30, "hourly": 300, "daily": 2000}
    assert al.batching_strategy.recreation_interval == "daily"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            lambda al: al["sampling_strategies"][0].update(epsilon=2),
            "active_learning.sampling_strategies[0].epsilon",
        ),
        (lambda al: al.update(limits={"weekly": 3}), "active_learning.limits.weekly"),
        (lambda al: al.update(jpeg_compression_level=0), "active_learning.jpeg_compression_level"),
        (lambda al: al.update(max_image_size=[0, 10]), "active_learning.max_image_size[0]"),
        (
            lambda al: al["batching_strategy"].update(batches_name_prefix="../up"),
            "active_learning.batching_strategy",
        ),
        (lambda al: al.pop("root"), "active_learning.root"),
    ],
)
def test_a_bad_field_stops_the_pipeline_naming_it(tmp_path: Path, change: object, field: str) -> None:
    doc = read_document(EXAMPLE)
    change(doc["active_learning"])  # type: ignore[operator]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert info.value.field is not None and info.value.field.startswith(field)
