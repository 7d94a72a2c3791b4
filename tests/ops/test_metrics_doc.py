"""docs/metrics.md against the code: its generated tables are exactly what the code renders."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from worker.active_learning.metrics import register_metrics as register_active_learning_metrics
from worker.ops.docs import DOC_PATH, render_parts, update
from worker.ops.metrics import METRICS
from worker.telemetry import DROP_REASONS, ERROR_REASONS, LOSS_REASONS, SKIP_REASONS

ROOT = Path(__file__).resolve().parents[2]


def test_the_generated_parts_are_up_to_date() -> None:
    text = DOC_PATH.read_text(encoding="utf-8")
    new, changed = update(text)
    assert not changed, f"docs/metrics.md is out of date in {changed}: python -m worker.ops.docs --write"
    assert new == text


def test_every_metric_and_reason_appears_in_the_document() -> None:
    text = DOC_PATH.read_text(encoding="utf-8")
    for spec in METRICS:
        assert re.search(rf"^\| `{spec.exported}` \| {spec.kind} \|", text, re.M), spec.name
    for reason in (*DROP_REASONS, *SKIP_REASONS, *LOSS_REASONS, *ERROR_REASONS):
        assert f"- `{reason}`: " in text, reason
    documented = set(re.findall(r"`(segstream_[a-z_]+)`", text))
    exported = {spec.exported for spec in METRICS}
    registry = CollectorRegistry()
    register_active_learning_metrics(registry)  # registered only when a pipeline samples
    exported |= {f"{family.name}_total" for family in registry.collect()}
    assert documented <= exported, documented - exported  # every metric it names is exported


def test_a_stale_part_is_found_and_rewritten(tmp_path: Path) -> None:
    doc = tmp_path / "metrics.md"
    stale = DOC_PATH.read_text(encoding="utf-8").replace("- `max_fps`: ", "- `max_fps` (old): ", 1)
    doc.write_text(stale, encoding="utf-8")
    check = [sys.executable, "-m", "worker.ops.docs", str(doc)]
    run = subprocess.run(check, capture_output=True, text=True, cwd=ROOT, check=False)
    assert run.returncode == 1 and "skip_reasons" in run.stdout
    subprocess.run([*check[:-1], "--write", str(doc)], check=True, capture_output=True, cwd=ROOT)
    assert doc.read_text(encoding="utf-8") == DOC_PATH.read_text(encoding="utf-8")
    assert subprocess.run(check, capture_output=True, cwd=ROOT, check=False).returncode == 0


def test_a_missing_part_is_an_error() -> None:
    with pytest.raises(ValueError, match="generated:metrics"):
        update("# no generated blocks\n")
    assert set(render_parts()) == {"metrics", "drop_reasons", "skip_reasons", "loss_reasons", "error_reasons"}
