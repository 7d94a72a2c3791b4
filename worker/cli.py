"""The ``segstream`` command: ``run``, ``validate``, ``infer``."""

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
        options: dict[str, Any] = {**pipeline.model.backend_options(), "blas_threads": pipeline.blas_threads}
        return load_workflow(pipeline.workflow), pipeline.model.models_dir, options
    return load_workflow(doc), None, {}


def _runner(path: Path, models_dir: Path | None) -> Any:
    from worker.concurrency import limit_blas_threads
    from worker.config import PipelineConfig
    from worker.models.registry import ModelRegistry
    from worker.step.executor import WorkflowRunner

    workflow, pipeline_models_dir, options = _workflow_and_models_dir(path)
    # as the worker does: post-processing's BLAS stays single-threaded next to ONNX Runtime
    limit_blas_threads(options.pop("blas_threads", PipelineConfig.model_fields["blas_threads"].default))
    registry = ModelRegistry(_models_dirs(models_dir, pipeline_models_dir))
    return WorkflowRunner(workflow, registry, backend_options=options)


def _cmd_validate(args: argparse.Namespace) -> int:
    if args.no_models:
        _workflow_and_models_dir(args.file)
    else:
        runner = _runner(args.file, args.models_dir)
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


def _cmd_infer(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np

    from worker.frame import Frame

    runner = _runner(args.file, args.models_dir)
    params = _parse_params(args.param)
    failures = 0
    for number, image_path in enumerate(args.images):
        data = np.fromfile(image_path, dtype=np.uint8) if Path(image_path).is_file() else None
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
        if image is None:
            print(f"error: {image_path}: not a readable image", file=sys.stderr)
            failures += 1
            continue
        frame = Frame("cli", number, Path(image_path).stat().st_mtime, image, Path(image_path).name, params)
        (outcome,) = runner.run_batch([frame]).outcomes
        if outcome.error is not None:
            print(f"error: {image_path}: {outcome.error}", file=sys.stderr)
            failures += 1
            continue
        print(json.dumps(outcome.outputs, indent=2 if args.pretty else None), flush=True)
    return 1 if failures else 0


def _cmd_run(args: argparse.Namespace) -> int:
    from worker.runtime import run_pipeline_file

    return run_pipeline_file(args.file, models_dir=args.models_dir)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segstream", description="Instance segmentation on live video streams, published over MQTT."
    )
    parser.add_argument("--version", action="version", version=f"segstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def models_dir_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--models-dir",
            type=Path,
            default=None,
            help="model packages folder (<dir>/<project>/<version>/); else $SEGSTREAM_MODELS_DIR, "
            "else the bundled models",
        )

    run = sub.add_parser("run", help="run a pipeline until SIGINT/SIGTERM (or until its files end)")
    run.add_argument("file", type=Path, help="pipeline file (YAML or JSON)")
    models_dir_option(run)
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", help="check a pipeline or workflow file (and load its models)")
    validate.add_argument("file", type=Path, help="pipeline file or bare workflow definition (YAML or JSON)")
    validate.add_argument("--no-models", action="store_true", help="check the definition only")
    models_dir_option(validate)
    validate.set_defaults(func=_cmd_validate)

    infer = sub.add_parser("infer", help="run the workflow on images; print its outputs, one JSON per image")
    infer.add_argument("file", type=Path, help="pipeline file or bare workflow definition (YAML or JSON)")
    infer.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    infer.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="bind $inputs.NAME (JSON value)"
    )
    infer.add_argument("--pretty", action="store_true", help="indent the JSON")
    models_dir_option(infer)
    infer.set_defaults(func=_cmd_infer)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segstream`` console command."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SegstreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
