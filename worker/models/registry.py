"""Model ids to model packages, and a cache of loaded models.

A ``model_id`` is ``"<project>/<version>"`` and names the package folder
``<models_dir>/<project>/<version>/``. The models directories are searched in order (see
:func:`default_models_dirs`): ``--models-dir`` or ``$SEGSTREAM_MODELS_DIR``, then the models bundled
with segstream. The first directory that holds the folder wins.

Ids can come from MQTT messages, so they are checked strictly before they touch the file system:
exactly one ``/``, each part 1..100 characters of ``A-Z a-z 0-9 . _ -`` starting with a letter or
digit (so no ``..``, no absolute paths, no hidden folders). A path to an ``.onnx`` file is not an id;
an id can be bound to a file (or a package folder) anywhere: the pipeline's ``model.files``
(``{"yolo/1": "/models/yolo11n-seg.onnx"}``) and the CLI's ``--model [ID=]PATH`` are looked up before
the models directories. :meth:`ModelRegistry.load_path` loads a path directly.

Which engine loads a model is the pipeline's ``model.backend``: :data:`BACKENDS` maps each name to its
settings class (``worker.models.config``) and the function that builds a
:class:`~worker.models.backend.SegmentationBackend` from them (an explicit table, as Frigate keeps its
``detector_types``). A backend's engine package is imported only when that backend is used.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pydantic import BaseModel

from worker.errors import ModelError
from worker.ids import model_id_problem, split_model_id
from worker.models.backend import SegmentationBackend
from worker.models.config import ModelRuntimeConfig, OnnxRuntimeConfig, OpenVinoConfig, RemoteModelConfig
from worker.models.package import IR_WEIGHTS_FILE, ULTRALYTICS_METADATA_FILE, WEIGHTS_FILE

__all__ = [
    "BACKENDS",
    "BUNDLED_MODELS_DIR",
    "MODELS_DIR_ENV",
    "BackendEntry",
    "InvalidModelIdError",
    "ModelRegistry",
    "default_models_dirs",
    "load_backend",
    "validate_model_id",
]

MODELS_DIR_ENV = "SEGSTREAM_MODELS_DIR"
BUNDLED_MODELS_DIR = Path(__file__).resolve().parent.parent / "bundled_models"


def _load_onnxruntime(path: Path, model_id: str | None, config: BaseModel) -> SegmentationBackend:
    from worker.models.onnx_backend import OnnxSegmentationModel

    assert isinstance(config, OnnxRuntimeConfig)
    return OnnxSegmentationModel(
        path,
        model_id=model_id,
        intra_op_threads=config.intra_op_threads,
        inter_op_threads=config.inter_op_threads,
        providers=[(p.name, p.options) for p in config.providers],
        allow_fallback=config.allow_fallback,
        input_size=config.input_size,
        session_batch=config.session_batch,
        letterbox=config.letterbox,
    )


def _load_openvino(path: Path, model_id: str | None, config: BaseModel) -> SegmentationBackend:
    from worker.models.openvino_backend import OpenVinoSegmentationModel

    assert isinstance(config, OpenVinoConfig)
    return OpenVinoSegmentationModel(
        path,
        model_id=model_id,
        device=config.device,
        precision=config.precision,
        threads=config.threads,
        num_requests=config.num_requests,
        cache_dir=config.cache_dir,
        input_size=config.input_size,
        session_batch=config.session_batch,
        letterbox=config.letterbox,
    )


def _load_remote(path: Path, model_id: str | None, config: BaseModel) -> SegmentationBackend:
    from worker.models.remote import load_remote

    assert isinstance(config, RemoteModelConfig)
    # protocol roboflow gives a RemoteStepBackend (the server runs the whole step), which the step
    # tells apart with isinstance (worker.models.remote.step_backend); the table's type is the seam's
    return cast(SegmentationBackend, load_remote(path, model_id, config))


@dataclass(frozen=True, slots=True)
class BackendEntry:
    """One backend: its settings class and how a model is loaded with them."""

    config: type[BaseModel]
    load: Callable[[Path, str | None, BaseModel], SegmentationBackend]
    description: str


#: every backend, by the name ``model.backend`` takes
BACKENDS: dict[str, BackendEntry] = {
    "onnxruntime": BackendEntry(
        OnnxRuntimeConfig, _load_onnxruntime, "ONNX Runtime (CPU, CUDA, TensorRT, OpenVINO EP, ...)"
    ),
    "openvino": BackendEntry(OpenVinoConfig, _load_openvino, "OpenVINO runtime (FP32, BF16, INT8)"),
    "remote": BackendEntry(
        RemoteModelConfig, _load_remote, "an inference server (KServe v2 / Triton, Roboflow inference)"
    ),
}


def load_backend(
    path: Path, config: ModelRuntimeConfig | None = None, *, model_id: str | None = None
) -> SegmentationBackend:
    """Load the model at ``path`` with the backend ``config`` names (ONNX Runtime by default).

    Raises:
        ModelError: the backend is unknown, its engine is not installed, or the model cannot load.
    """
    config = config if config is not None else OnnxRuntimeConfig()
    entry = BACKENDS.get(config.backend)
    if entry is None:  # pragma: no cover - the settings union only has registered names
        raise ModelError(f"unknown model backend {config.backend!r}; known: {sorted(BACKENDS)}")
    return entry.load(Path(path), model_id, config)


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
    """Resolves model ids to packages and loads each model once per backend settings.

    Args:
        models_dirs: directories to search, in order (see :func:`default_models_dirs`).
        files: model ids bound to a file or package folder, looked up first (``model.files``,
            ``--model``); the model config's ``files`` given to :meth:`load` are looked up too.

    Loading is thread-safe: concurrent :meth:`load` calls for the same model and settings share
    one backend object.
    """

    def __init__(self, models_dirs: Iterable[Path], files: Mapping[str, Path] | None = None) -> None:
        self.models_dirs: tuple[Path, ...] = tuple(Path(d) for d in models_dirs)
        self.files: dict[str, Path] = {}
        for model_id, path in (files or {}).items():
            validate_model_id(model_id)
            self.files[model_id] = Path(path)
        self._cache: dict[tuple[Path, str], SegmentationBackend] = {}
        self._lock = threading.Lock()

    def resolve(self, model_id: str, files: Mapping[str, Path] | None = None) -> Path:
        """Where a model id's weights are: its bound file (``files``, then the registry's), else the
        first ``<dir>/<project>/<version>/`` that exists.

        Raises:
            InvalidModelIdError: the id is not a safe ``"project/version"``.
            ModelError: a bound path does not exist, or no directory has the id (the message lists
                where it looked and the ids there).
        """
        project, version = validate_model_id(model_id)
        bound = (files or {}).get(model_id) or self.files.get(model_id)
        if bound is not None:
            if not bound.exists():
                raise ModelError(
                    f"model {model_id!r} is bound to {bound}, which does not exist", model_id=model_id
                )
            return bound
        for models_dir in self.models_dirs:
            candidate = models_dir / project / version
            if candidate.is_dir():
                return candidate
        looked = ", ".join(str(d / project / version) for d in self.models_dirs) or "(no models directories)"
        known = ", ".join(sorted({*self.available_ids(), *self.files, *(files or {})})) or "none"
        raise ModelError(
            f"model {model_id!r} not found; looked in {looked}; available models: {known}",
            model_id=model_id,
        )

    def available(self) -> list[tuple[str, Path]]:
        """``(id, folder)`` of every package in the models directories (the first one of an id wins).

        A package folder holds ``weights.onnx``, an OpenVINO ``weights.xml``, or an Ultralytics
        OpenVINO export (``metadata.yaml`` beside an ``.xml``).
        """
        found: dict[str, Path] = {}
        for models_dir in self.models_dirs:
            if not models_dir.is_dir():
                continue
            for version in sorted(models_dir.glob("*/*")):
                if not version.is_dir() or not _is_package(version):
                    continue
                model_id = f"{version.parent.name}/{version.name}"
                try:
                    validate_model_id(model_id)
                except InvalidModelIdError:
                    continue
                found.setdefault(model_id, version)
        return sorted(found.items())

    def available_ids(self) -> list[str]:
        """Ids of the packages in all models directories, sorted."""
        return [model_id for model_id, _ in self.available()]

    def load(self, model_id: str, config: ModelRuntimeConfig | None = None) -> SegmentationBackend:
        """Load a model by id (cached: the same id and settings give the same object).

        Args:
            model_id: ``"project/version"``.
            config: the pipeline's ``model`` section (default: ONNX Runtime with its defaults).

        Raises:
            InvalidModelIdError: a bad id.
            ModelError: the model cannot be found or loaded.
        """
        files = getattr(config, "files", None)  # the local backends' model.files
        return self._load(self.resolve(model_id, files), model_id, config)

    def load_path(self, package_path: Path, config: ModelRuntimeConfig | None = None) -> SegmentationBackend:
        """Load a model from a package folder (or weights file) given directly, e.g. on the CLI.

        Raises:
            ModelError: the model cannot be found or loaded.
        """
        return self._load(Path(package_path), None, config)

    def _load(
        self, path: Path, model_id: str | None, config: ModelRuntimeConfig | None
    ) -> SegmentationBackend:
        config = config if config is not None else OnnxRuntimeConfig()
        key = (path.resolve(), config.model_dump_json(exclude={"models_dir", "files"}))
        with self._lock:
            model = self._cache.get(key)
            if model is None:
                model = load_backend(path, config, model_id=model_id)
                self._cache[key] = model
            return model

    def loaded(self) -> list[SegmentationBackend]:
        """The models loaded so far."""
        with self._lock:
            return list(self._cache.values())

    def close(self) -> None:
        """Close every loaded model and forget them."""
        with self._lock:
            models, self._cache = list(self._cache.values()), {}
        for model in models:
            model.close()


def _is_package(folder: Path) -> bool:
    if (folder / WEIGHTS_FILE).is_file() or (folder / IR_WEIGHTS_FILE).is_file():
        return True
    if any(p.is_file() for p in folder.glob("*.onnx")):
        return True
    return (folder / ULTRALYTICS_METADATA_FILE).is_file() and any(folder.glob("*.xml"))
