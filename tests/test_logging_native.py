"""Native libraries' stderr (libpng, libjpeg, OpenCV, FFmpeg) goes through the JSON log format, redacted.

Run in a subprocess: the capture replaces file descriptor 2 of the process it runs in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    import cv2, numpy as np
    from worker.logging_setup import configure_logging

    configure_logging("INFO", "json", secrets=["hunter22"])
    logging.getLogger("worker.test").info("started password=hunter22")
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", image)
    broken = bytearray(png.tobytes())
    broken[60] ^= 0xFF  # a CRC error inside IDAT: libpng complains on fd 2
    assert cv2.imdecode(np.frombuffer(bytes(broken), np.uint8), cv2.IMREAD_COLOR) is None
    os.write(2, b"a native library says hunter22\\n")
    print("a stray print to stderr", file=sys.stderr)
    logging.getLogger("worker.test").warning("done")
    """
)


def test_native_stderr_lines_become_json_records(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, timeout=60, env=env, cwd=tmp_path, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stderr.decode().splitlines()
    records = [json.loads(line) for line in lines]  # every line on stderr is JSON
    native = [r for r in records if r["logger"] == "native"]
    messages = [r["msg"] for r in native]
    assert any(m.startswith("libpng error") for m in messages), messages
    assert "a native library says ***" in messages and "a stray print to stderr" in messages
    assert next(r for r in native if r["msg"].startswith("libpng"))["level"] == "ERROR"
    assert [r["msg"] for r in records if r["logger"] == "worker.test"] == ["started password=***", "done"]
    assert "hunter22" not in proc.stderr.decode()
