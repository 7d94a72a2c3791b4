"""The ``segstream`` command: ``run``, ``validate``, ``infer``, ``schema``, ``models``, ``quantize``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker import __version__
from worker.errors import ConfigError, SegstreamError

__all__ = ["main"]


def _read(path: Path) -> dict[str, Any]:
    from worker.config import read_document

    return read_document(path)


def _models_dirs(cli_dir: Path | None, pipeline_dir: Path | None) -> list[Path]:
    from worker.models.registry import default_models_dirs

    return default_models_dirs(cli_dir or pipeline_dir)


def _workflow_and_models_dir(path: Path) -> tuple[Any, Path | None, dict[str, Any]]:
    """Load a pipeline file's workflow (validating the whole pipeline) or a bare workflow file."""
    from worker.config import load_pipeline, looks_like_pipeline
    from worker.step.workflow import load_workflow

    doc = _read(path)
    if looks_like_pipeline(doc):
        pipeline = load_pipeline(path)
        options: dict[str, Any] = {"model_config": pipeline.model, "blas_threads": pipeline.blas_threads}
        return load_workflow(pipeline.workflow), pipeline.model.models_dir, options
    return load_workflow(doc), None, {}


def _model_files(specs: Sequence[str], workflow: Any) -> dict[str, Path]:
    """``--model [ID=]PATH`` options as ``{model id: path}``.

    ``ID=PATH`` binds that model id; a bare ``PATH`` binds the one model the workflow uses (an error
    when it uses several or none).

    Raises:
        ConfigError: a bad id, a path that does not exist, or a bare path the workflow leaves ambiguous.
    """
    from worker.ids import model_id_problem
    from worker.step.executor import workflow_model_ids

    files: dict[str, Path] = {}
    for spec in specs:
        model_id, sep, raw = spec.partition("=")
        if not sep or "/" not in model_id or Path(spec).exists():
            model_id, raw = "", spec
        path = Path(raw).expanduser()
        if not path.exists():
            raise ConfigError(f"--model {spec}: {path} does not exist")
        if not model_id:
            used = workflow_model_ids(workflow)
            if len(used) != 1:
                raise ConfigError(
                    f"--model {spec}: the workflow uses {len(used)} models ({', '.join(used) or 'none'}); "
                    "say which one this file is: --model ID=PATH"
                )
            model_id = used[0]
        problem = model_id_problem(model_id)
        if problem is not None:
            raise ConfigError(f"--model {spec}: {problem}")
        files[model_id] = path
    return files


def _runner(path: Path, models_dir: Path | None, model_specs: Sequence[str] = ()) -> Any:
    from worker.concurrency import limit_blas_threads
    from worker.config import PipelineConfig
    from worker.models.registry import ModelRegistry
    from worker.step.executor import WorkflowRunner

    workflow, pipeline_models_dir, options = _workflow_and_models_dir(path)
    # as the worker does: post-processing's BLAS stays single-threaded next to ONNX Runtime
    limit_blas_threads(options.pop("blas_threads", PipelineConfig.model_fields["blas_threads"].default))
    registry = ModelRegistry(
        _models_dirs(models_dir, pipeline_models_dir), files=_model_files(model_specs, workflow)
    )
    return WorkflowRunner(workflow, registry, model_config=options.get("model_config"))


def _preflight(path: Path) -> list[str]:
    """A pipeline file's start-up problems on this machine (``worker.preflight``); none for a workflow."""
    from worker.config import load_pipeline, looks_like_pipeline
    from worker.preflight import problems

    if not looks_like_pipeline(_read(path)):
        return []
    return problems(load_pipeline(path))


def _cmd_validate(args: argparse.Namespace) -> int:
    found = [] if args.no_environment else _preflight(args.file)
    for problem in found:
        print(f"{args.file}: {problem}", file=sys.stderr)
    if found:
        return 1
    if args.no_models:
        _workflow_and_models_dir(args.file)
    else:
        runner = _runner(args.file, args.models_dir, args.model)
        models = ", ".join(sorted(runner.models)) or "none"
        print(f"{args.file}: valid (models: {models})", file=sys.stderr)
        return 0
    print(f"{args.file}: valid", file=sys.stderr)
    return 0


def _parse_params(items: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--param expects name=value (value as JSON), got {item!r}")
        try:
            params[name] = json.loads(raw)
        except json.JSONDecodeError:
            params[name] = raw
    return params


#: exit status after stdout was closed by the reader (``segstream infer ... | head -1``): 128 + SIGPIPE
EXIT_BROKEN_PIPE = 141
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class _ImageReadError(Exception):
    """An input image that cannot be used (the message names the file and why)."""


def _read_image(path: Path) -> Any:
    """The image at ``path`` as a BGR array; distinct errors for each way it can fail."""
    import cv2
    import numpy as np

    if not path.exists():
        raise _ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise _ImageReadError(f"{path}: is a directory, not an image")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise _ImageReadError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if data.size == 0:
        raise _ImageReadError(f"{path}: empty file, not an image")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise _ImageReadError(f"{path}: not a readable image (a format OpenCV cannot decode, or truncated)")
    return image


def _annotation_targets(out: Path | None, images: Sequence[str]) -> list[Path] | None:
    """Where ``--annotate`` writes each image: ``out`` itself (a file, one image) or files in folder ``out``.

    Raises:
        ConfigError: a file name for several images, or a target that would overwrite an input.
    """
    if out is None:
        return None
    inputs = [Path(i) for i in images]
    if out.suffix.lower() in _IMAGE_SUFFIXES and not out.is_dir():
        if len(inputs) != 1:
            raise ConfigError(
                f"--annotate {out}: a file name takes one image; give a folder for {len(inputs)}"
            )
        targets = [out]
    else:
        targets, used = [], set()
        for number, source in enumerate(inputs):
            suffix = source.suffix if source.suffix.lower() in _IMAGE_SUFFIXES else ".png"
            name = f"{source.stem}.annotated{suffix}"
            if name in used:  # same file name in two input folders
                name = f"{source.stem}.annotated-{number}{suffix}"
            used.add(name)
            targets.append(out / name)
    for source, target in zip(inputs, targets, strict=True):
        if target.resolve() == source.resolve():
            raise ConfigError(f"--annotate {out}: would overwrite the input {source}")
    return targets


def _write_annotated(runner: Any, outcome: Any, image: Any, target: Path) -> None:
    """Draw the primary step's detections on ``image`` and write it to ``target``.

    Raises:
        _ImageReadError: the file cannot be written.
    """
    import cv2

    from worker.annotate import annotate

    step = runner.workflow.steps[0].name
    detections = outcome.detections.get(step)
    model = runner.models.get(outcome.model_id or "")
    drawn = image if detections is None else annotate(image, detections, model.class_names if model else ())
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        written = cv2.imwrite(str(target), drawn)
    except cv2.error as exc:
        raise _ImageReadError(f"{target}: cannot write the annotated image: {exc}") from None
    if not written:
        raise _ImageReadError(f"{target}: cannot write the annotated image")


def _silence_stdout() -> None:
    """stdout's reader is gone: send what is still buffered to /dev/null (no error at exit)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _cmd_infer(args: argparse.Namespace) -> int:
    from worker.frame import Frame

    targets = _annotation_targets(args.annotate, args.images)
    runner = _runner(args.file, args.models_dir, args.model)
    params = _parse_params(args.param)
    if params:
        # exactly what the control topic does with {"inputs": {...}}: same checks, same messages
        runner.set_runtime_inputs(params)
    failures = 0
    for number, name in enumerate(args.images):
        path = Path(name)
        try:
            image = _read_image(path)
        except _ImageReadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failures += 1
            continue
        frame = Frame("cli", number, path.stat().st_mtime, image, path.name)
        (outcome,) = runner.run_batch([frame]).outcomes
        if outcome.error is not None:
            print(f"error: {path}: {outcome.error}", file=sys.stderr)
            failures += 1
            continue
        if targets is not None:
            try:
                _write_annotated(runner, outcome, image, targets[number])
            except _ImageReadError as exc:
                print(f"error: {exc}", file=sys.stderr)
                failures += 1
        try:
            print(json.dumps(outcome.outputs, indent=2 if args.pretty else None), flush=True)
        except BrokenPipeError:  # the reader closed the pipe (| head): nobody wants the rest
            _silence_stdout()
            return EXIT_BROKEN_PIPE
    return 1 if failures else 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from worker.schemas import generate, render

    sys.stdout.write(render(generate(args.kind)))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from worker.runtime import run_pipeline_file

    files: dict[str, Path] = {}
    if args.model:
        from worker.config import load_pipeline

        try:
            files = _model_files(args.model, load_pipeline(args.file).workflow)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return run_pipeline_file(args.file, models_dir=args.models_dir, model_files=files)


def _cmd_models(args: argparse.Namespace) -> int:
    from worker.models.package import load_model_metadata, locate_package
    from worker.models.registry import ModelRegistry

    registry = ModelRegistry(_models_dirs(args.models_dir, None))
    rows = []
    for model_id, folder in registry.available():
        package = locate_package(folder)
        files = [p.name for p in package.weights_files]
        try:
            meta = load_model_metadata(folder)
        except SegstreamError as exc:
            rows.append({"id": model_id, "path": str(folder), "files": files, "error": str(exc)})
            continue
        quantization = meta.quantization or {}
        backends = ["onnxruntime", "openvino"] if package.onnx_path is not None else ["openvino"]
        made_by = quantization.get("made_by") or meta.provenance.get("made_by") or ""
        if quantization:
            made_by = f"{made_by} from {quantization.get('source_model', '?')}"
        row: dict[str, Any] = {
            "id": model_id,
            "path": str(folder),
            "files": files,
            "backends": backends,
            "classes": list(meta.class_names),
            "input_size": list(meta.input_size),
            "dynamic_input": meta.dynamic_input,
            "layout": meta.output_layout,
            "precision": "int8" if quantization else str(meta.provenance.get("weights_precision", "fp32")),
            "provenance": made_by,
        }
        if quantization:
            accuracy = quantization.get("accuracy", {})
            row["segm_map50_drop"] = accuracy.get("segm_map50_drop")
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models found in " + ", ".join(str(d) for d in registry.models_dirs))
        return 0
    for row in rows:
        if "error" in row:
            print(f"{row['id']}  {row['path']}\n    error: {row['error']}")
            continue
        size = "x".join(str(v) for v in row["input_size"]) + (" (dynamic)" if row["dynamic_input"] else "")
        drop = f", segm mAP50 drop {row['segm_map50_drop']}" if row.get("segm_map50_drop") is not None else ""
        print(
            f"{row['id']}  {row['precision']}  input {size}  {len(row['classes'])} classes: "
            f"{', '.join(row['classes'])}\n    files: {', '.join(row['files'])} "
            f"(backends: {', '.join(row['backends'])})  {row['path']}\n"
            f"    provenance: {row['provenance'] or 'unknown'}{drop}"
        )
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from worker.models.quantize import describe_drop, quantize_package
    from worker.models.registry import ModelRegistry, validate_model_id

    registry = ModelRegistry(_models_dirs(args.models_dir, None))
    source = registry.resolve(args.model_id)
    output_id = args.output_id or f"{args.model_id}-int8"
    project, version = validate_model_id(output_id)
    output_root = args.output_dir or source.parent.parent
    result = quantize_package(
        source,
        output_root / project / version,
        source_id=args.model_id,
        model_id=output_id,
        calibration=args.calibration,
        ground_truth=args.ground_truth,
        evaluation=args.evaluation,
        max_drop=args.max_drop,
        keep_float=args.keep_float,
        preset=args.preset,
        calibration_frames=args.calibration_frames,
        eval_frames=args.eval_frames,
        threads=args.threads,
    )
    size = result.record["weights_bytes"]
    print(
        f"wrote {result.model_id} to {result.package} ({size / 1e6:.1f} MB of weights): "
        f"{describe_drop(result.record)}"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segstream", description="Instance segmentation on live video streams, published over MQTT."
    )
    parser.add_argument("--version", action="version", version=f"segstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def models_dir_option(p: argparse.ArgumentParser, *, model_path: bool = False) -> None:
        p.add_argument(
            "--models-dir",
            type=Path,
            default=None,
            help="model packages folder (<dir>/<project>/<version>/); else $SEGSTREAM_MODELS_DIR, "
            "else the bundled models",
        )
        if model_path:
            p.add_argument(
                "--model",
                action="append",
                default=[],
                metavar="[ID=]PATH",
                help="load model ID from PATH (an .onnx file as exported, e.g. by Ultralytics, or a package "
                "folder) instead of the models folder; a bare PATH replaces the workflow's one model; "
                "repeatable",
            )

    run = sub.add_parser("run", help="run a pipeline until SIGINT/SIGTERM (or until its files end)")
    run.add_argument("file", type=Path, help="pipeline file (YAML or JSON)")
    models_dir_option(run, model_path=True)
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", help="check a pipeline or workflow file (and load its models)")
    validate.add_argument("file", type=Path, help="pipeline file or bare workflow definition (YAML or JSON)")
    validate.add_argument("--no-models", action="store_true", help="check the definition only")
    validate.add_argument(
        "--no-environment",
        action="store_true",
        help="do not check this machine (secret variables, password/TLS files, video files, image folders): "
        "for a file meant for another machine",
    )
    models_dir_option(validate, model_path=True)
    validate.set_defaults(func=_cmd_validate)

    infer = sub.add_parser("infer", help="run the workflow on images; print its outputs, one JSON per image")
    infer.add_argument("file", type=Path, help="pipeline file or bare workflow definition (YAML or JSON)")
    infer.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    infer.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="bind $inputs.NAME (JSON value)"
    )
    infer.add_argument("--pretty", action="store_true", help="indent the JSON")
    infer.add_argument(
        "--annotate",
        type=Path,
        default=None,
        metavar="OUT",
        help="also write each image with its detections drawn: into folder OUT (<name>.annotated.<ext>), "
        "or to file OUT (one image, .jpg/.png)",
    )
    models_dir_option(infer, model_path=True)
    infer.set_defaults(func=_cmd_infer)

    from worker.schemas import KINDS

    schema = sub.add_parser(
        "schema",
        help="print a JSON Schema: a message kind, or the pipeline file (for editors)",
        description="Print the JSON Schema (draft 2020-12) of a message kind or of the pipeline file.",
    )
    schema.add_argument("kind", choices=KINDS)
    schema.set_defaults(func=_cmd_schema)

    models = sub.add_parser("models", help="list the model packages found (what a worker can load)")
    models.add_argument("--json", action="store_true", help="one JSON array instead of text")
    models_dir_option(models)
    models.set_defaults(func=_cmd_models)

    quantize = sub.add_parser(
        "quantize",
        help="write an INT8 package of a model (NNCF, OpenVINO), refused when it loses too much accuracy",
    )
    quantize.add_argument("model_id", help="the float model (project/version)")
    quantize.add_argument(
        "--calibration", type=Path, required=True, help="video file or image folder of real frames"
    )
    quantize.add_argument(
        "--ground-truth",
        type=Path,
        default=None,
        help="COCO file naming frames of the evaluation video (frame_index) or folder (file_name); "
        "without it accuracy is the INT8 model's agreement with the float model",
    )
    quantize.add_argument(
        "--evaluation",
        type=Path,
        default=None,
        help="video or image folder accuracy is measured on (default: the calibration source)",
    )
    quantize.add_argument("--max-drop", type=float, default=0.01, help="largest segm mAP50 drop accepted")
    quantize.add_argument("--output-id", default=None, help="the new package's id (default: <id>-int8)")
    quantize.add_argument(
        "--output-dir", type=Path, default=None, help="models folder to write to (default: the source's)"
    )
    quantize.add_argument(
        "--keep-float",
        choices=("auto", "none"),
        default="auto",
        help="auto: the convolutions producing the outputs stay float; none: quantize everything",
    )
    quantize.add_argument(
        "--preset",
        choices=("performance", "mixed"),
        default="performance",
        help="NNCF preset: performance (symmetric activations, the fast INT8 kernels) or mixed",
    )
    quantize.add_argument("--calibration-frames", type=int, default=100, help="at most this many frames")
    quantize.add_argument(
        "--eval-frames", type=int, default=None, help="measure accuracy on this many frames (default: all)"
    )
    quantize.add_argument("--threads", type=int, default=0, help="engine threads (0: default)")
    models_dir_option(quantize)
    quantize.set_defaults(func=_cmd_quantize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segstream`` console command."""
    args = _parser().parse_args(argv)
    try:
        code = int(args.func(args))
    except SegstreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
