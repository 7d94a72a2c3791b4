"""A real Roboflow inference server for the tests and the benchmark: the ``inference`` package's
HTTP API (``inference-cpu`` from PyPI) serving a segstream model package as a *local* model package.

Run with the Python that has ``inference-cpu`` (its own virtual environment, ``.venv-roboflow``;
``scripts/install-remote-servers.sh`` makes it)::

    .venv-roboflow/bin/python tests/support/roboflow_server.py \
        --model worker/bundled_models/factory-parts/1 --workdir /tmp/rf --model-id factory-parts/1 \
        --port 9001

It writes ``<workdir>/<model-id>/`` (``model_config.json``: yolov8 instance segmentation on ONNX;
``class_names.txt``; ``inference_config.json``: letterbox, padding 114, RGB, scaling 255, NMS not
fused; a copy of ``weights.onnx``), runs in ``<workdir>`` with
``ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES=True`` (the model id is then that relative
path), builds the app as the server's CPU image does (``HttpInterface`` over a ``ModelManager``) and
serves it with uvicorn on 127.0.0.1. It prints ``READY <port>`` once uvicorn listens.

``--stall-file``: while that file exists, requests wait before being handled (the slow server).
This file must not import segstream (it runs in another environment).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from pathlib import Path


def write_package(model: Path, target: Path) -> None:
    """The inference server's local package layout, from a segstream package."""
    meta = json.loads((model / "metadata.json").read_text())
    height, width = meta["input_size"]
    target.mkdir(parents=True, exist_ok=True)
    (target / "model_config.json").write_text(
        json.dumps(
            {"model_architecture": "yolov8", "task_type": "instance-segmentation", "backend_type": "onnx"}
        )
    )
    (target / "class_names.txt").write_text("\n".join(meta["class_names"]) + "\n")
    (target / "inference_config.json").write_text(
        json.dumps(
            {
                "network_input": {
                    "training_input_size": {"height": height, "width": width},
                    "dynamic_spatial_size_supported": False,
                    "color_mode": "rgb",
                    "resize_mode": "letterbox",
                    "padding_value": meta.get("pad_value", 114),
                    "input_channels": 3,
                    "scaling_factor": 255,
                },
                "post_processing": {"type": "nms", "fused": False},
            }
        )
    )
    shutil.copyfile(model / "weights.onnx", target / "weights.onnx")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="segstream package folder")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--model-id", required=True, help="project/version: the folder under workdir")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stall-file", type=Path, default=None)
    args = parser.parse_args()

    write_package(args.model.resolve(), args.workdir / args.model_id)
    os.chdir(args.workdir)
    # the app mounts its landing page's static folders relative to the working directory, whether
    # they exist or not (the server's image builds them; the wheel does not ship them): empty ones
    for folder in ("inference/landing/out/static", "inference/landing/out/_next/static"):
        Path(folder).mkdir(parents=True, exist_ok=True)
    os.environ["ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES"] = "True"
    os.environ.setdefault("ONNXRUNTIME_EXECUTION_PROVIDERS", "[CPUExecutionProvider]")
    os.environ.setdefault("MODEL_CACHE_DIR", str(args.workdir / ".cache"))
    os.environ.setdefault("METRICS_ENABLED", "False")
    os.environ.setdefault("DISABLE_VERSION_CHECK", "True")
    os.environ.setdefault("ENABLE_STREAM_API", "False")

    import uvicorn
    from inference.core.interfaces.http.http_api import HttpInterface
    from inference.core.managers.base import ModelManager
    from inference.core.registries.roboflow import RoboflowModelRegistry
    from inference.models.utils import ROBOFLOW_MODEL_TYPES

    manager = ModelManager(model_registry=RoboflowModelRegistry(ROBOFLOW_MODEL_TYPES))
    app = HttpInterface(manager).app
    stall = args.stall_file

    if stall is not None:

        @app.middleware("http")
        async def _stall(request, call_next):  # type: ignore[no-untyped-def]
            while stall.exists():  # a file the test removes: polled  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            return await call_next(request)

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():  # uvicorn has no started event  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if server.started:
            print(f"READY {args.port}", flush=True)
        await task

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
