"""Start the real inference servers of the remote-backend tests on loopback, and kill them by PID.

Each server runs in its own virtual environment (they pin packages segstream does not want:
``scripts/install-remote-servers.sh`` makes them):

- KServe v2: NVIDIA Triton bundled by PyTriton (``.venv-kserve``, or ``$SEGSTREAM_KSERVE_PYTHON``),
  serving the bundled ONNX model with ONNX Runtime (``tests/support/kserve_server.py``);
- Roboflow: the ``inference`` package's HTTP API (``.venv-roboflow``, or ``$SEGSTREAM_ROBOFLOW_PYTHON``)
  serving the bundled model as a local model package (``tests/support/roboflow_server.py``).

A server is started in its own process group (``start_new_session``) so that killing it takes its
children (Triton's ``tritonserver`` and Python-backend stubs) too: :meth:`ServerProcess.kill` signals
the group of the PID it started, nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.mosquitto import free_port

__all__ = [
    "KSERVE_PYTHON_ENV",
    "ROBOFLOW_PYTHON_ENV",
    "ServerProcess",
    "kserve_python",
    "roboflow_python",
    "start_kserve",
    "start_roboflow",
]

REPO = Path(__file__).resolve().parents[2]
KSERVE_PYTHON_ENV = "SEGSTREAM_KSERVE_PYTHON"
KSERVE_SCRIPT = REPO / "tests" / "support" / "kserve_server.py"
ROBOFLOW_PYTHON_ENV = "SEGSTREAM_ROBOFLOW_PYTHON"
ROBOFLOW_SCRIPT = REPO / "tests" / "support" / "roboflow_server.py"


def _python(variable: str, venv: str) -> Path | None:
    """The variable's interpreter, else the project's environment once its install finished (stamp)."""
    configured = os.environ.get(variable)
    if configured:
        return Path(configured) if Path(configured).is_file() else None
    candidate = REPO / venv / "bin" / "python"
    installed = any((REPO / venv).glob(".stamp-*"))  # a broken-off install has no stamp
    return candidate if installed and candidate.is_file() else None


def kserve_python() -> Path | None:
    """The interpreter with PyTriton and ONNX Runtime, or None when it is not installed."""
    return _python(KSERVE_PYTHON_ENV, ".venv-kserve")


def roboflow_python() -> Path | None:
    """The interpreter with ``inference-cpu[http]``, or None when it is not installed."""
    return _python(ROBOFLOW_PYTHON_ENV, ".venv-roboflow")


class ServerProcess:
    """A server subprocess that prints ``READY <port>`` when it serves.

    Args:
        argv: the command, ports included (:meth:`restart` runs it again: the same port).
        port: the HTTP port it serves on.
        log_path: where its stdout/stderr go (read back on a failed start).
    """

    def __init__(self, argv: list[str], port: int, log_path: Path) -> None:
        self.argv = argv
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> None:
        """Start it and wait for ``READY`` in its log (generous timeout: a loaded CI machine)."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.log_path.parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                if any(line.startswith(b"READY") for line in log):
                    return
            time.sleep(0.2)
        self.kill()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"server {self.argv[:3]} did not start within {timeout} s:\n{tail}")

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
        """Signal the server's process group (the PID this object started) and reap it."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
            os.killpg(process.pid, signal.SIGKILL)
        self.process = None

    def stop(self) -> None:
        """Graceful stop (SIGTERM to the group), then SIGKILL for what is left."""
        self.kill(signal.SIGTERM)
        self.process = None

    def restart(self, timeout: float = 180.0) -> None:
        """Start the same command on the same port again."""
        self.process = None
        self.start(timeout)


def start_kserve(
    tmp_path: Path,
    *,
    model: Path,
    name: str,
    stall_file: Path | None = None,
    port: int | None = None,
) -> ServerProcess:
    """Start Triton (PyTriton) serving ``model``'s ``weights.onnx`` as ``name``; returns it serving.

    Raises:
        RuntimeError: PyTriton is not installed (see ``kserve_python``), or the server did not start.
    """
    python = kserve_python()
    if python is None:
        raise RuntimeError(
            f"no PyTriton environment: run scripts/install-remote-servers.sh or set ${KSERVE_PYTHON_ENV}"
        )
    http = port or free_port()
    argv = [
        str(python),
        str(KSERVE_SCRIPT),
        "--model",
        str(model),
        "--name",
        name,
        "--http-port",
        str(http),
        "--grpc-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
    ]
    if stall_file is not None:
        argv += ["--stall-file", str(stall_file)]
    server = ServerProcess(argv, http, tmp_path / f"kserve-{http}.log")
    server.start()
    return server


def start_roboflow(
    tmp_path: Path,
    *,
    model: Path,
    model_id: str,
    stall_file: Path | None = None,
    port: int | None = None,
) -> ServerProcess:
    """Start the Roboflow inference server serving ``model`` as the local package ``model_id``.

    Raises:
        RuntimeError: ``inference-cpu`` is not installed (see ``roboflow_python``), or no start.
    """
    python = roboflow_python()
    if python is None:
        raise RuntimeError(
            "no inference-cpu environment: run scripts/install-remote-servers.sh or set "
            f"${ROBOFLOW_PYTHON_ENV}"
        )
    http = port or free_port()
    workdir = tmp_path / f"roboflow-{http}"
    argv = [str(python), str(ROBOFLOW_SCRIPT), "--model", str(model), "--workdir", str(workdir)]
    argv += ["--model-id", model_id, "--port", str(http)]
    if stall_file is not None:
        argv += ["--stall-file", str(stall_file)]
    workdir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(argv, http, tmp_path / f"roboflow-{http}.log")
    server.start(timeout=300.0)
    return server


if __name__ == "__main__":  # pragma: no cover - a manual check: python -m tests.support.servers
    print(kserve_python() or "PyTriton environment not installed", file=sys.stderr)
    print(roboflow_python() or "inference-cpu environment not installed", file=sys.stderr)
