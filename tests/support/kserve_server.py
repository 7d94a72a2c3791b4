"""A real KServe v2 server for the tests and the benchmark: NVIDIA Triton (bundled by PyTriton)
serving a segstream model package's ``weights.onnx`` with ONNX Runtime.

Run with the Python that has ``nvidia-pytriton`` and ``onnxruntime`` (its own virtual environment,
``.venv-kserve``; ``scripts/install-remote-servers.sh`` makes it)::

    .venv-kserve/bin/python tests/support/kserve_server.py --model worker/bundled_models/factory-parts/1 \
        --name factory-parts --http-port 8000 [--stall-file PATH]

It prints ``READY <http-port>`` on stdout once Triton answers, and serves until SIGTERM/SIGINT.
``--stall-file`` makes the model wait while that file exists (the tests' slow server). The model is declared
with a dynamic batch (``max_batch_size``) and dynamic spatial axes, like the ONNX file.

Only the standard library, numpy, onnxruntime and pytriton are imported: this file must not import
segstream (it runs in another environment).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def _own_libpython() -> None:
    """Make Triton's Python-backend stub load this interpreter's libpython, not the system's.

    The stub links ``libpython3.X.so`` by name; where the distribution has its own (Debian's 3.11.2
    beside a pyenv 3.11.7), the stub would run the system library against this interpreter's standard
    library and fail in ``multiprocessing`` (``RLock`` has no ``_recursion_count``).
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        current = os.environ.get("LD_LIBRARY_PATH", "")
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="package folder with weights.onnx")
    parser.add_argument("--name", required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, default=0, help="0: http port + 1")
    parser.add_argument("--metrics-port", type=int, default=0, help="0: http port + 2")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--stall-file", type=Path, default=None, help="while this file exists, requests do not answer"
    )
    args = parser.parse_args()
    _own_libpython()

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(args.model / "weights.onnx"), options, providers=["CPUExecutionProvider"]
    )
    (image_input,) = session.get_inputs()
    outputs = session.get_outputs()
    lock = threading.Lock()

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        while args.stall_file is not None and args.stall_file.exists():
            time.sleep(0.02)  # the tests' slow server: stalled until the test removes the file
        with lock:
            results = session.run(None, {image_input.name: inputs[image_input.name]})
        return {o.name: r.astype(np.float32) for o, r in zip(outputs, results, strict=True)}

    def dims(shape: list[object]) -> tuple[int, ...]:  # without the batch axis; -1 when dynamic
        return tuple(d if isinstance(d, int) else -1 for d in shape[1:])

    http = args.http_port
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=http,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port or http + 1,
        metrics_port=args.metrics_port or http + 2,
        allow_metrics=False,
        log_verbose=0,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=[Tensor(name=image_input.name, dtype=np.float32, shape=dims(image_input.shape))],
            outputs=[Tensor(name=o.name, dtype=np.float32, shape=dims(o.shape)) for o in outputs],
            config=ModelConfig(max_batch_size=args.max_batch),
            strict=True,
        )
        triton.run()
        print(f"READY {http}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
