"""A real mosquitto broker on a free loopback port, owned by a test session.

The broker can be stopped and started again on the *same* port (for broker-restart tests).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from worker.mqtt import BrokerConfig

__all__ = ["MosquittoBroker", "free_port", "mosquitto_path"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mosquitto_path() -> str | None:
    """Path of the mosquitto binary (Debian puts it in /usr/sbin, often not on PATH)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists()), None
    )


class MosquittoBroker:
    """Run ``mosquitto`` bound to 127.0.0.1 on a free port, with an optional password file.

    Args:
        workdir: where the config, password file and log go.
        username, password: one account (anonymous clients are then refused).
        users: more accounts ``{name: password}`` (with or instead of ``username``).
        acl_file: a mosquitto ACL file to enforce (e.g. ``deploy/mosquitto/acl``).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        username: str | None = None,
        password: str | None = None,
        users: dict[str, str] | None = None,
        acl_file: Path | None = None,
    ) -> None:
        binary = mosquitto_path()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (Debian package 'mosquitto'; .ci/run installs it)")
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = free_port()
        self.workdir = workdir
        self.username = username
        self.password = password
        self.users = dict(users or {})
        if username is not None:
            self.users.setdefault(username, password or "")
        self.acl_file = acl_file
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mosquitto.log"
        self.conf_path = workdir / "mosquitto.conf"
        self._write_conf()

    def config(self, **changes: Any) -> BrokerConfig:
        """Client settings for this broker, reconnecting fast enough for tests (0.05..0.5 s)."""
        fields: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
        }
        return BrokerConfig(**{**fields, **changes})

    def _write_conf(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            "persistence false",
            # started as root (CI), mosquitto would drop to the 'mosquitto' user, which cannot read
            # files in the test's private temporary folder; as non-root this line has no effect
            "user root",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if self.users:
            pwfile = self.workdir / "passwd"
            pwfile.write_text("".join(f"{name}:{secret}\n" for name, secret in self.users.items()))
            pwfile.chmod(0o600)
            subprocess.run(
                [shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-U", str(pwfile)],
                check=True,
                capture_output=True,
            )
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines += ["allow_anonymous true"]
        if self.acl_file is not None:
            lines += [f"acl_file {self.acl_file}"]
        self.conf_path.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen([self.binary, "-c", str(self.conf_path)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self._proc.returncode}: {self.log_path.read_text()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
