"""Every module of the package imports, and every name in its ``__all__`` exists."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import worker

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(worker.__path__, prefix="worker.")
    if not name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_public_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        assert not name.split(".")[-1].startswith("_") or name.endswith("__init__"), name
        return
    missing = [item for item in exported if not hasattr(module, item)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"
