"""Model ids to model packages, and a cache of loaded models.

A ``model_id`` is ``"<project>/<version>"`` and names the package folder
``<models_dir>/<project>/<version>/``. The models directories are searched in order (see
:func:`default_models_dirs`): ``--models-dir`` or ``$SEGSTREAM_MODELS_DIR``, then the models bundled
with segstream. The first directory that holds the folder wins.

Ids can come from MQTT messages, so they are checked strictly before they touch the file system:
exactly one ``/``, each part 1..100 characters of ``A-Z a-z 0-9 . _ -`` starting with a letter or
digit (so no ``..``, no absolute paths, no hidden folders). A path to an ``.onnx`` file is not an id;
the CLI can load a package folder directly with :meth:`ModelRegistry.load_path`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from worker.errors import ModelError
from worker.ids import model_id_problem, split_model_id
from worker.models.onnx_backend import OnnxSegmentationModel
from worker.models.package import WEIGHTS_FILE

__all__ = [
    "BUNDLED_MODELS_DIR",
    "MODELS_DIR_ENV",
    "InvalidModelIdError",
    "ModelRegistry",
    "default_models_dirs",
    "validate_model_id",
]

MODELS_DIR_ENV = "SEGSTREAM_MODELS_DIR"
BUNDLED_MODELS_DIR = Path(__file__).resolve().parent.parent / "bundled_models"


class InvalidModelIdError(ModelError, ValueError):
    """A ``model_id`` that is not a safe ``"project/version"`` string."""

    reason = "invalid_model_id"


def validate_model_id(model_id: object) -> tuple[str, str]:
    """Check a model id and split it.

    Args:
        model_id: the id, e.g. ``"factory-parts/1"``.

    Returns:
        ``(project, version)``.

    Raises:
        InvalidModelIdError: not a string, not exactly one ``/``, or a part with unsafe characters.

    Example:
        >>> validate_model_id("factory-parts/1")
        ('factory-parts', '1')
    """
    problem = model_id_problem(model_id)
    if problem is not None:
        raise InvalidModelIdError(problem, model_id=model_id if isinstance(model_id, str) else None)
    return split_model_id(model_id)


def default_models_dirs(cli_dir: Path | None = None) -> list[Path]:
    """The models directories to search, in order.

    Args:
        cli_dir: ``--models-dir`` from the command line, if given.

    Returns:
        ``[cli_dir]`` when given, else the directories in ``$SEGSTREAM_MODELS_DIR`` (``os.pathsep``
        separated) when set, followed always by the bundled ``worker/bundled_models/``.
    """
    dirs: list[Path] = []
    if cli_dir is not None:
        dirs.append(Path(cli_dir))
    else:
        env = os.environ.get(MODELS_DIR_ENV, "")
        dirs.extend(Path(part) for part in env.split(os.pathsep) if part.strip())
    if BUNDLED_MODELS_DIR not in dirs:
        dirs.append(BUNDLED_MODELS_DIR)
    return dirs


class ModelRegistry:
    """Resolves model ids to packages and loads each model once.

    Args:
        models_dirs: directories to search, in order (see :func:`default_models_dirs`).

    Loading is thread-safe: concurrent :meth:`load` calls for the same model and options share
    one :class:`OnnxSegmentationModel`.
    """

    def __init__(self, models_dirs: Iterable[Path]) -> None:
        self.models_dirs: tuple[Path, ...] = tuple(Path(d) for d in models_dirs)
        self._cache: dict[tuple[Path, tuple[tuple[str, Any], ...]], OnnxSegmentationModel] = {}
        self._lock = threading.Lock()

    def resolve(self, model_id: str) -> Path:
        """The package folder of a model id: the first ``<dir>/<project>/<version>/`` that exists.

        Raises:
            InvalidModelIdError: the id is not a safe ``"project/version"``.
            ModelError: no directory has it (the message lists where it looked and the ids there).
        """
        project, version = validate_model_id(model_id)
        for models_dir in self.models_dirs:
            candidate = models_dir / project / version
            if candidate.is_dir():
                return candidate
        looked = ", ".join(str(d / project / version) for d in self.models_dirs) or "(no models directories)"
        known = ", ".join(self.available_ids()) or "none"
        raise ModelError(
            f"model {model_id!r} not found; looked in {looked}; available models: {known}",
            model_id=model_id,
        )

    def available_ids(self) -> list[str]:
        """Ids of the packages (folders with ``weights.onnx``) in all models directories, sorted."""
        found: set[str] = set()
        for models_dir in self.models_dirs:
            if not models_dir.is_dir():
                continue
            for weights in models_dir.glob(f"*/*/{WEIGHTS_FILE}"):
                model_id = f"{weights.parent.parent.name}/{weights.parent.name}"
                try:
                    validate_model_id(model_id)
                except InvalidModelIdError:
                    continue
                found.add(model_id)
        return sorted(found)

    def load(self, model_id: str, **backend_options: Any) -> OnnxSegmentationModel:
        """Load a model by id (cached: the same id and options give the same object).

        Args:
            model_id: ``"project/version"``.
            **backend_options: keyword arguments of :class:`OnnxSegmentationModel`
                (``intra_op_threads``, ``inter_op_threads``, ``providers``, ``input_size``...).

        Raises:
            InvalidModelIdError: a bad id.
            ModelError: the model cannot be found or loaded.
        """
        return self._load(self.resolve(model_id), model_id, backend_options)

    def load_path(self, package_path: Path, **backend_options: Any) -> OnnxSegmentationModel:
        """Load a model from a package folder (or ``.onnx`` file) given directly, e.g. on the CLI.

        Raises:
            ModelError: the model cannot be found or loaded.
        """
        path = Path(package_path)
        return self._load(path, None, backend_options)

    def _load(
        self, path: Path, model_id: str | None, backend_options: dict[str, Any]
    ) -> OnnxSegmentationModel:
        key = (path.resolve(), _freeze(backend_options))
        with self._lock:
            model = self._cache.get(key)
            if model is None:
                model = OnnxSegmentationModel(path, model_id=model_id, **backend_options)
                self._cache[key] = model
            return model

    def loaded(self) -> list[OnnxSegmentationModel]:
        """The models loaded so far."""
        with self._lock:
            return list(self._cache.values())


def _freeze(options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    def frozen(value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple(frozen(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, frozen(v)) for k, v in value.items()))
        return value

    return tuple(sorted((name, frozen(value)) for name, value in options.items()))
