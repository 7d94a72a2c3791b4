"""Helpers for the step tests: reference examples and small workflow builders."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

WORKFLOWS_DIR = Path(__file__).resolve().parent.parent / "data" / "workflows"
TYPE_V = "roboflow_core/roboflow_instance_segmentation_model@v{}"
PLACEHOLDER = "<block_does_not_provide_example>"


def reference_example(version: int) -> dict[str, Any]:
    """The reference block's example step for ``version``, verbatim from its public docs."""
    return json.loads((WORKFLOWS_DIR / f"reference_step_v{version}.json").read_text())


def minimal_step(version: int, name: str = "seg", **fields: Any) -> dict[str, Any]:
    """The smallest valid step of ``version``, plus ``fields``."""
    return {
        "type": TYPE_V.format(version),
        "name": name,
        "images": "$inputs.image",
        "model_id": "parts/1",
    } | fields


def workflow_dict(*steps: dict[str, Any], inputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A workflow around ``steps``: an image input plus ``inputs``, one output per step."""
    return {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}, *(inputs or [])],
        "steps": [copy.deepcopy(step) for step in steps],
        "outputs": [
            {
                "type": "JsonField",
                "name": f"{step['name']}_predictions",
                "selector": f"$steps.{step['name']}.predictions",
            }
            for step in steps
        ],
    }


@pytest.fixture
def workflows_dir() -> Path:
    return WORKFLOWS_DIR


@pytest.fixture
def make_workflow() -> Callable[..., dict[str, Any]]:
    return workflow_dict
