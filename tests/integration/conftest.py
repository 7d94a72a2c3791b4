"""Fixtures of the end-to-end tests: the test model package (the broker's are the root fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.helpers import make_models_dir


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A models folder holding the test model ``parts/1`` (known boxes, masks that fill them)."""
    return make_models_dir(tmp_path / "models")
