"""Model packages: where the weights are, and what the model is (classes, input size, padding).

A model package is a folder::

    <models_dir>/<project>/<version>/
        weights.onnx      YOLOv8/YOLO11-seg layout ONNX model (see below); any other name works when
                          it is the folder's only .onnx file (an Ultralytics export as exported)
        weights.xml/.bin  OpenVINO IR of the same model (optional; the only weights of an INT8
                          package made by ``segstream quantize``; only the openvino backend reads it)
        metadata.json     optional when the ONNX file carries Ultralytics metadata_props

An Ultralytics OpenVINO export folder (``<name>_openvino_model/`` with one ``<name>.xml``, its
``.bin`` and ``metadata.yaml``) is a package too: ``metadata.yaml`` gives what ``metadata_props``
give an ONNX export.

``metadata.json`` schema (``schema_version`` 1; every field optional, unknown fields rejected)::

    {
      "schema_version": 1,
      "task": "segment",                       # only "segment" is accepted
      "class_names": ["bolt", "nut", "washer"],# class names in class-id order
      "input_size": [640, 640],                # native input size [h, w], multiples of stride
      "pad_value": 114,                        # letterbox padding value (0..255, all channels)
      "stride": 32,                            # the model's largest stride
      "dynamic_input": false,                  # must agree with the ONNX graph when given
      "end2end": false,                        # true: an end-to-end head [B, N, 6 + 32] (NMS in the
                                               # graph); default: the export's metadata_props, else
                                               # the shapes (see worker.models.layout)
      "recommended_parameters": {              # used by confidence_mode "best"
        "confidence": 0.45,
        "per_class_confidence": {"bolt": 0.6}  # keys must be class names
      },
      "provenance": {"trained_by": "...", "dataset": "...", "epochs": 50},  # free-form
      "metrics": {"mask_map50": 0.91},         # free-form evaluation results
      "quantization": {...}                    # INT8 packages: how made, accuracy vs the float model
    }

An Ultralytics ONNX export carries its metadata in the file's ``metadata_props``: ``names`` (a
Python dict literal ``"{0: 'person', 1: 'car'}"``), ``imgsz`` (``"[640, 640]"``), ``stride``
(``"32"``), ``task`` (``"segment"``), ``batch`` (``"1"``), and for an end-to-end head ``end2end``
(``"True"``) or ``args`` (``"{'nms': True, ...}"``). Where both exist, a field of ``metadata.json``
wins over the same field of ``metadata_props``. ``dynamic_input`` always comes from the graph. A key
that neither gives and the graph cannot tell (class names; the input size of a dynamic-axes model) is
an error naming it.

The model's layout is decided and checked when it is loaded (``worker.models.layout``): one input
``[B, 3, h, w]``, prototypes ``[B, 32, h/4, w/4]`` and predictions either ``[B, 4 + C + 32, N]``
(classic) or ``[B, N, 6 + 32]`` (end-to-end); ``ModelMetadata.output_layout`` says which.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker.errors import ModelError
from worker.models.layout import OutputLayout, determine_layout
from worker.models.letterbox import PAD_VALUE
from worker.models.signature import (
    NUM_MASK_COEFFICIENTS,
    ModelSignature,
    read_ir_signature,
    read_onnx_signature,
)

__all__ = [
    "DEFAULT_PAD_VALUE",
    "DEFAULT_STRIDE",
    "IR_WEIGHTS_FILE",
    "METADATA_FILE",
    "ULTRALYTICS_METADATA_FILE",
    "WEIGHTS_FILE",
    "ModelMetadata",
    "ModelPackage",
    "PackageMetadataFile",
    "RecommendedParameters",
    "build_metadata",
    "load_model_metadata",
    "locate_package",
    "parse_ultralytics_metadata",
    "read_metadata_file",
    "read_package_signature",
]

_DESCRIPTIVE_PROPS = ("author", "date", "version", "license", "description", "docs")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no", "none", ""}

WEIGHTS_FILE = "weights.onnx"
IR_WEIGHTS_FILE = "weights.xml"
METADATA_FILE = "metadata.json"
ULTRALYTICS_METADATA_FILE = "metadata.yaml"
DEFAULT_PAD_VALUE = PAD_VALUE
DEFAULT_STRIDE = 32


class RecommendedParameters(BaseModel):
    """Confidence thresholds the model's maker recommends (``confidence_mode: "best"``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    per_class_confidence: dict[str, float] = Field(default_factory=dict)

    @field_validator("per_class_confidence")
    @classmethod
    def _thresholds_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {name: t for name, t in value.items() if not 0.0 <= t <= 1.0}
        if bad:
            raise ValueError(f"per-class confidences must be in [0, 1], got {bad}")
        return value


class ModelMetadata(BaseModel):
    """What a segmentation model is: classes, native input size, letterbox padding.

    Attributes:
        class_names: class names in class-id order (``class_names[i]`` is class id ``i``).
        input_size: default/native input size ``(h, w)`` in pixels, multiples of ``stride``.
        pad_value: letterbox padding value (0..255) for all three channels.
        stride: the model's largest stride; input sizes must be multiples of it.
        task: always ``"segment"``.
        recommended_parameters: optional recommended confidence thresholds.
        dynamic_input: whether the ONNX input has dynamic spatial axes (other input sizes allowed).
        output_layout: ``classic`` (``[B, 4 + C + 32, N]``, NMS in post-processing) or ``end2end``
            (``[B, N, 6 + 32]`` rows, NMS done by the model); decided at load from the metadata and
            the graph (``worker.models.layout``).
        provenance: free-form description of how the model was made.
        metrics: free-form evaluation results (e.g. mAP on a held-out set).
        quantization: how an INT8 package was made from its float model and what it measured
            (written by ``segstream quantize``); None for a float model.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    class_names: tuple[str, ...] = Field(min_length=1)
    input_size: tuple[int, int]
    pad_value: int = Field(default=DEFAULT_PAD_VALUE, ge=0, le=255)
    stride: int = Field(default=DEFAULT_STRIDE, gt=0)
    task: Literal["segment"] = "segment"
    recommended_parameters: RecommendedParameters | None = None
    dynamic_input: bool = False
    output_layout: OutputLayout = "classic"
    provenance: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    quantization: dict[str, Any] | None = None

    @field_validator("class_names")
    @classmethod
    def _unique_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not name for name in value):
            raise ValueError("class names must be non-empty strings")
        duplicated = sorted({name for name in value if value.count(name) > 1})
        if duplicated:
            raise ValueError(f"class names must be unique, duplicated: {duplicated}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        h, w = self.input_size
        if h <= 0 or w <= 0 or h % self.stride or w % self.stride:
            raise ValueError(
                f"input_size {self.input_size} must be positive multiples of stride {self.stride}"
            )
        if self.recommended_parameters is not None:
            unknown = sorted(set(self.recommended_parameters.per_class_confidence) - set(self.class_names))
            if unknown:
                raise ValueError(f"per_class_confidence names classes the model does not have: {unknown}")
        return self

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.class_names)

    @property
    def num_channels(self) -> int:
        """Channels of the predictions output: ``4 + C + 32``."""
        return 4 + self.num_classes + NUM_MASK_COEFFICIENTS


class PackageMetadataFile(BaseModel):
    """The schema of ``metadata.json`` (all fields optional; see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    task: str | None = None
    class_names: list[str] | None = None
    input_size: tuple[int, int] | None = None
    pad_value: int | None = None
    stride: int | None = None
    dynamic_input: bool | None = None
    end2end: bool | None = None
    recommended_parameters: RecommendedParameters | None = None
    provenance: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ModelPackage:
    """Where a model's files are.

    Attributes:
        onnx_path: the ONNX file, or None (an OpenVINO-only package).
        ir_path: the OpenVINO IR ``.xml`` (its ``.bin`` beside it), or None.
        metadata_path: the package's ``metadata.json``, or None when there is none.
        ultralytics_metadata_path: an Ultralytics OpenVINO export's ``metadata.yaml``, or None.
        root: the package folder, or None when a bare file was given.
    """

    onnx_path: Path | None
    ir_path: Path | None
    metadata_path: Path | None
    root: Path | None
    ultralytics_metadata_path: Path | None = None

    @property
    def weights_path(self) -> Path:
        """The ONNX file when there is one, else the IR ``.xml``."""
        path = self.onnx_path or self.ir_path
        assert path is not None  # locate_package never builds a package without weights
        return path

    @property
    def weights_files(self) -> tuple[Path, ...]:
        """Every weights file present (ONNX first)."""
        return tuple(p for p in (self.onnx_path, self.ir_path) if p is not None)

    def require_onnx(self, backend: str) -> Path:
        """The ONNX file, or an error saying which backend can read this package instead.

        Raises:
            ModelError: the package holds only an OpenVINO IR.
        """
        if self.onnx_path is None:
            raise ModelError(
                f"model package {self.root or self.ir_path} has no {WEIGHTS_FILE}, only the OpenVINO IR "
                f"{self.ir_path.name if self.ir_path else '?'}: {backend} cannot read it; use "
                "model.backend: openvino"
            )
        return self.onnx_path


def locate_package(path: str | Path) -> ModelPackage:
    """Find a model's files: a package folder, an Ultralytics OpenVINO export, a bare ``.onnx``/``.xml``.

    Args:
        path: a folder holding ``weights.onnx`` and/or ``weights.xml`` (and usually ``metadata.json``),
            an Ultralytics ``*_openvino_model`` folder, or an ``.onnx`` / ``.xml`` file.

    Returns:
        The package's paths.

    Raises:
        ModelError: the path does not exist, or the folder has no weights.
    """
    path = Path(path)
    if path.is_dir():
        return _locate_in_folder(path)
    if path.is_file():
        return _locate_file(path)
    raise ModelError(f"model package {path} does not exist")


def _folder_onnx(path: Path) -> Path:
    """``weights.onnx``, else the folder's one ``.onnx`` file of any name (as the user exported it)."""
    onnx_file = path / WEIGHTS_FILE
    if onnx_file.is_file():
        return onnx_file
    candidates = sorted(p for p in path.glob("*.onnx") if p.is_file())
    if len(candidates) > 1:
        raise ModelError(
            f"model package {path} has several ONNX files {[c.name for c in candidates]}; keep one "
            f"(or name the one to use {WEIGHTS_FILE})"
        )
    return candidates[0] if candidates else onnx_file


def _folder_ir(path: Path, yaml_file: Path) -> Path:
    """``weights.xml``, else in an Ultralytics OpenVINO export its one ``.xml`` file."""
    ir_file = path / IR_WEIGHTS_FILE
    if ir_file.is_file() or not yaml_file.is_file():
        return ir_file
    candidates = sorted(path.glob("*.xml"))
    if len(candidates) > 1:
        raise ModelError(f"model package {path} has several OpenVINO IR files: {candidates}")
    return candidates[0] if candidates else ir_file


def _locate_in_folder(path: Path) -> ModelPackage:
    yaml_file = path / ULTRALYTICS_METADATA_FILE
    onnx_file = _folder_onnx(path)
    ir_file = _folder_ir(path, yaml_file)
    onnx_found = onnx_file if onnx_file.is_file() else None
    ir_found = ir_file if ir_file.is_file() and ir_file.with_suffix(".bin").is_file() else None
    if onnx_found is None and ir_found is None:
        raise ModelError(f"model package {path} has no {WEIGHTS_FILE} (nor an OpenVINO {IR_WEIGHTS_FILE})")
    metadata = path / METADATA_FILE
    return ModelPackage(
        onnx_found,
        ir_found,
        metadata if metadata.is_file() else None,
        path,
        yaml_file if yaml_file.is_file() else None,
    )


def _locate_file(path: Path) -> ModelPackage:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return ModelPackage(path, None, None, None)
    if suffix == ".xml":
        if not path.with_suffix(".bin").is_file():
            raise ModelError(f"OpenVINO IR {path} has no {path.with_suffix('.bin').name} beside it")
        yaml_file = path.parent / ULTRALYTICS_METADATA_FILE
        return ModelPackage(None, path, None, None, yaml_file if yaml_file.is_file() else None)
    raise ModelError(f"{path} is neither a model package folder nor an .onnx / OpenVINO .xml file")


def read_ultralytics_yaml(path: Path) -> dict[str, str]:
    """An Ultralytics export's ``metadata.yaml`` as ``metadata_props``-like strings.

    Raises:
        ModelError: the file cannot be read or is not a YAML mapping.
    """
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ModelError(f"{path} must hold a mapping, got {type(doc).__name__}")
    return {str(k): v if isinstance(v, str) else repr(v) for k, v in doc.items()}


def read_package_signature(package: ModelPackage, *, prefer_ir: bool = False) -> ModelSignature:
    """The graph's interface, read from the file without building an inference session.

    ONNX files are parsed with the ``onnx`` package (weights stored outside the file are not read);
    an IR is read with OpenVINO's ``read_model`` (parsed, never compiled). An Ultralytics
    ``metadata.yaml`` supplies the ``metadata_props`` of an IR.

    Raises:
        ModelError: the file cannot be parsed, or it does not have exactly one input.
    """
    if package.ir_path is not None and (prefer_ir or package.onnx_path is None):
        signature = read_ir_signature(package.ir_path)
    else:
        signature = read_onnx_signature(package.weights_path)
    if package.ultralytics_metadata_path is not None:
        props = {**read_ultralytics_yaml(package.ultralytics_metadata_path), **signature.metadata_props}
        signature = ModelSignature(
            signature.input_name,
            signature.input_shape,
            signature.output_names,
            signature.output_shapes,
            props,
        )
    return signature


def read_metadata_file(path: Path) -> dict[str, Any]:
    """Read and validate a package's ``metadata.json``.

    Args:
        path: the file.

    Returns:
        The fields the file sets (unset fields left out), ``schema_version`` dropped.

    Raises:
        ModelError: the file cannot be read, is not JSON, or does not follow the schema.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read model metadata {path}: {exc}") from exc
    try:
        parsed = PackageMetadataFile.model_validate(raw)
    except ValidationError as exc:
        raise ModelError(f"invalid model metadata {path}: {_validation_summary(exc)}") from exc
    fields = parsed.model_dump(exclude_none=True, exclude={"schema_version"})
    if "recommended_parameters" in fields:
        fields["recommended_parameters"] = parsed.recommended_parameters
    return fields


def parse_ultralytics_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    """Turn Ultralytics ``metadata_props`` into :class:`ModelMetadata` fields.

    Args:
        props: the ONNX file's ``metadata_props`` (all values are strings).

    Returns:
        The fields found (``class_names``, ``input_size``, ``stride``, ``task``) plus a
        ``provenance`` dict with the remaining descriptive props (author, date, version...).

    Raises:
        ModelError: a prop is present but cannot be parsed.

    Example:
        >>> parse_ultralytics_metadata({"names": "{0: 'a', 1: 'b'}", "imgsz": "[320, 480]"})
        {'class_names': ['a', 'b'], 'input_size': (320, 480)}
    """
    fields: dict[str, Any] = {}
    if "names" in props:
        fields["class_names"] = _class_names(props)
    if "imgsz" in props:
        fields["input_size"] = _input_size(props)
    if "stride" in props:
        stride = _literal(props, "stride")
        if not isinstance(stride, int):
            raise ModelError(f"metadata_props 'stride' must be an integer, got {props['stride']!r}")
        fields["stride"] = stride
    if "task" in props:
        fields["task"] = props["task"]
    if "batch" in props and not isinstance(_literal(props, "batch"), int):
        raise ModelError(f"metadata_props 'batch' must be an integer, got {props['batch']!r}")
    end2end = _declared_end2end(props)
    if end2end is not None:
        fields["end2end"] = end2end
    described = {k: v for k, v in props.items() if k in _DESCRIPTIVE_PROPS}
    if described:
        fields["provenance"] = {"metadata_props": described}
    return fields


def _class_names(props: Mapping[str, str]) -> list[str]:
    """``names``: a dict of class ids 0..C-1 (Ultralytics) or a list, in id order."""
    names = _literal(props, "names")
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise ModelError(f"metadata_props 'names' must have class ids 0..C-1, got {keys}")
        return [str(names[k]) for k in keys]
    if isinstance(names, list | tuple):
        return [str(n) for n in names]
    raise ModelError(f"metadata_props 'names' must be a dict or list, got {props['names']!r}")


def _input_size(props: Mapping[str, str]) -> tuple[int, int]:
    """``imgsz``: ``[h, w]`` of positive integers, or one integer for a square."""
    imgsz = _literal(props, "imgsz")
    if isinstance(imgsz, int):
        imgsz = [imgsz, imgsz]
    pair = isinstance(imgsz, list | tuple) and len(imgsz) == 2
    if not (pair and all(isinstance(v, int) and v > 0 for v in imgsz)):
        raise ModelError(f"metadata_props 'imgsz' must be [h, w], got {props['imgsz']!r}")
    return (imgsz[0], imgsz[1])


def _flag(props: Mapping[str, Any], key: str) -> bool | None:
    value = props.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ModelError(f"metadata_props {key!r} must be True or False, got {value!r}")


def _declared_end2end(props: Mapping[str, str]) -> bool | None:
    """Whether the export says its head is end-to-end: ``end2end``, ``nms``, ``args['nms'/'end2end']``.

    Any of them true: True; all present ones false: False; none present: None.
    """
    flags = [_flag(props, "end2end"), _flag(props, "nms")]
    if "args" in props:
        args = _literal(props, "args")
        if not isinstance(args, dict):
            raise ModelError(f"metadata_props 'args' must be a dict, got {props['args']!r}")
        flags += [_flag(args, "nms"), _flag(args, "end2end")]
    present = [f for f in flags if f is not None]
    if not present:
        return None
    return any(present)


def build_metadata(
    signature: ModelSignature,
    file_fields: Mapping[str, Any] | None,
    *,
    source: str,
) -> ModelMetadata:
    """Merge ``metadata.json`` over ``metadata_props``, fill in what the graph says, check the layout.

    Args:
        signature: the graph's interface (and its ``metadata_props``).
        file_fields: fields from :func:`read_metadata_file`, or None without a metadata file.
        source: where the model came from, for error messages.

    Returns:
        The model's metadata.

    Raises:
        ModelError: metadata missing or invalid, or the graph does not match it.
    """
    fields = parse_ultralytics_metadata(signature.metadata_props)
    file_fields = dict(file_fields or {})
    if "provenance" in fields and "provenance" in file_fields:
        file_fields["provenance"] = {**fields["provenance"], **file_fields["provenance"]}
    fields.update(file_fields)

    graph_size = signature.static_input_size
    if "dynamic_input" in fields and fields["dynamic_input"] != signature.dynamic_spatial:
        raise ModelError(
            f"{source}: metadata says dynamic_input={fields['dynamic_input']} but the ONNX input shape is "
            f"{list(signature.input_shape)}"
        )
    fields["dynamic_input"] = signature.dynamic_spatial
    if "class_names" not in fields:
        raise ModelError(
            f"{source}: no class names: missing key 'class_names' in {METADATA_FILE} and 'names' in the "
            "ONNX file's metadata_props (an Ultralytics export writes it)"
        )
    if fields.get("task", "segment") != "segment":
        raise ModelError(
            f"{source}: the model's task is {fields['task']!r} (metadata 'task'); segstream runs "
            "instance segmentation models (task 'segment')"
        )
    declared_end2end = fields.pop("end2end", None)
    if "input_size" not in fields:
        if graph_size is None:
            raise ModelError(
                f"{source}: input size unknown: the ONNX input is dynamic and the metadata has no "
                "'input_size' (or metadata_props 'imgsz')"
            )
        fields["input_size"] = graph_size
    elif graph_size is not None and tuple(fields["input_size"]) != graph_size:
        raise ModelError(
            f"{source}: metadata input_size {list(fields['input_size'])} differs from the ONNX input "
            f"{list(graph_size)}"
        )
    try:
        metadata = ModelMetadata.model_validate(fields)
    except ValidationError as exc:
        raise ModelError(f"{source}: invalid model metadata: {_validation_summary(exc)}") from exc
    try:
        layout, _, _ = determine_layout(signature, metadata.num_classes, declared_end2end)
    except ModelError as exc:
        raise ModelError(f"{source}: {exc}") from exc
    return metadata.model_copy(update={"output_layout": layout})


def load_model_metadata(path: str | Path) -> ModelMetadata:
    """Read a model's metadata without creating an inference session.

    ``metadata.json`` (or ``metadata_props`` / ``metadata.yaml``) and the graph's declared shapes
    are read and the layout is checked on them. Dimensions the graph leaves dynamic (a PyTorch
    export's channel axis often is) are checked when a backend loads the model (its warm-up run)
    and on every run.

    Args:
        path: a package folder, an ``.onnx`` file or an OpenVINO ``.xml``.

    Returns:
        The model's metadata (declared layout checked).

    Raises:
        ModelError: missing files, unreadable weights, bad metadata or a layout mismatch.
    """
    package = locate_package(path)
    file_fields = read_metadata_file(package.metadata_path) if package.metadata_path else None
    signature = read_package_signature(package)
    return build_metadata(signature, file_fields, source=str(path))


def _literal(props: Mapping[str, str], key: str) -> Any:
    try:
        return ast.literal_eval(props[key])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise ModelError(f"metadata_props {key!r} is not a Python literal: {props[key]!r}") from exc


def _validation_summary(exc: ValidationError) -> str:
    parts: list[str] = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(p) for p in error["loc"]) or "<root>"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)
