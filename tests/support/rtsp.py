"""Start, kill and restart the GStreamer RTSP test server (``tests/support/rtsp_server.py``) on one port.

The server runs under the *system* Python (``/usr/bin/python3``), which has Debian's ``gi`` bindings
(packages ``python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-{base,good,ugly}``); the venv's
Python cannot import them. Being its own process is also what lets a test kill it (camera gone) and
start it again on the same port (camera back).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.mosquitto import free_port

__all__ = ["RtspServer", "rtsp_server_available", "system_python"]

_SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")


def system_python() -> str | None:
    """The interpreter that can import Debian's ``gi`` (None if there is none)."""
    for candidate in ("/usr/bin/python3", shutil.which("python3")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def rtsp_server_available() -> str | None:
    """None if the RTSP server can run here, else why not (for ``pytest.skip``)."""
    python = system_python()
    if python is None:
        return "no system python3"
    probe = subprocess.run(
        [
            python,
            "-c",
            "import gi; gi.require_version('GstRtspServer', '1.0'); "
            "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
            "import sys; sys.exit(0 if Gst.ElementFactory.find('x264enc') else 3)",
        ],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return (
            "GStreamer RTSP server not installed (python3-gi gir1.2-gst-rtsp-server-1.0 "
            f"gstreamer1.0-plugins-ugly): {probe.stderr.decode(errors='replace')[-200:]}"
        )
    return None


class RtspServer:
    """One RTSP server process serving ``rtsp://127.0.0.1:<port><path>``.

    Args:
        workdir: where the server's log goes.
        path: the mount point.
        file: serve this H.264 MP4 instead of a live ``videotestsrc``.
        width, height, fps: ``videotestsrc`` format.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        path: str = "/cam",
        file: Path | None = None,
        width: int = 160,
        height: int = 120,
        fps: int = 15,
    ) -> None:
        python = system_python()
        if python is None:
            raise RuntimeError("no system python3 to run the RTSP server")
        self.python = python
        self.host = "127.0.0.1"
        self.port = free_port()
        self.path = path
        self.file = file
        self.width, self.height, self.fps = width, height, fps
        self.log_path = workdir / f"rtsp{path.replace('/', '_')}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://{self.host}:{self.port}{self.path}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until it accepts connections."""
        if self.running:
            return
        cmd = [self.python, str(_SERVER_SCRIPT), "--port", str(self.port), "--path", self.path]
        cmd += ["--width", str(self.width), "--height", str(self.height), "--fps", str(self.fps)]
        if self.file is not None:
            cmd += ["--file", str(self.file)]
        # the system Python must not see the venv (PYTHONPATH/PYTHONHOME would break ``gi``)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                output = self.log_path.read_text()
                raise RuntimeError(f"RTSP server exited with {self._proc.returncode}: {output}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"RTSP server did not listen on {self.host}:{self.port} within {timeout}s")

    def kill(self) -> None:
        """Kill the server at once (SIGKILL: a camera that vanishes, no RTSP TEARDOWN)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(timeout=10)
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP: the TCP connection stays up but no packet comes (a frozen camera)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it cleanly (SIGTERM), killing it if it does not exit in time."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        """Kill and start again on the same port."""
        self.kill()
        self.start()
