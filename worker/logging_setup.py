"""Logging: plain text by default, JSON lines on request, secrets redacted either way.

``configure_logging`` installs one handler on the root logger. Stages log with the ids that matter as
``extra`` fields (``log.warning("cannot decode", extra={"source": "cam1", "frame_id": "cam1:42"})``);
the text format appends them as ``[source=cam1 frame_id=cam1:42]``, the JSON format makes them keys.

``RedactingFilter`` sits on the handler, so every record from every logger passes it: it replaces the
configured secret values (the broker password, API keys) and obvious ``password=``/``api_key=``/
``token:``/``Authorization: Bearer``/``scheme://user:pass@`` patterns with ``***`` in the message, the
arguments, the extra fields and the formatted traceback.

Native libraries (libjpeg, libpng, OpenCV, FFmpeg) write their warnings straight to file descriptor 2,
past Python's logging. With ``log_format: json`` (``configure_logging(fmt="json")`` writing to the real
stderr) :func:`capture_native_stderr` puts a pipe on descriptor 2 and a thread turns each line written
there into a record of the ``native`` logger (WARNING; ERROR when the line says "error"), so every line
on stderr is JSON and passes the redaction; the log handler itself writes to a copy of the original
stderr, and ``faulthandler`` dumps go there too. At exit descriptor 2 is put back. OpenCV's own log
level follows the configured level (``cv2.utils.logging.setLogLevel``), so its INFO chatter stays off.

Example:
    >>> f = RedactingFilter(["hunter22"])
    >>> f.redact("connect mqtt://bob:hunter22@broker password=hunter22 api_key=abc123")
    'connect mqtt://bob:***@broker password=*** api_key=***'
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

__all__ = ["JsonFormatter", "RedactingFilter", "TextFormatter", "capture_native_stderr", "configure_logging"]

REDACTED = "***"

_KEY_VALUE = re.compile(
    r"""(?P<key>\b(?:password|passwd|pwd|pass|secret|client_secret|api[_-]?key|apikey|access[_-]?token|
    refresh[_-]?token|auth[_-]?token|token|private[_-]?key)\b["']?\s*[:=]\s*)(?P<quote>["']?)(?P<value>[^\s"',;&}]+)""",
    re.IGNORECASE | re.VERBOSE,
)
_URL_USERINFO = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]+:)(?P<value>[^@/\s]+)(?=@)", re.IGNORECASE)
_BEARER = re.compile(r"(?P<head>\b(?:bearer|basic)\s+)(?P<value>[A-Za-z0-9._~+/=-]{8,})", re.IGNORECASE)

# LogRecord attributes that are not "extra" fields
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName"}
)


class RedactingFilter(logging.Filter):
    """Replace secret values and password-like patterns in log records with ``***``.

    Args:
        secrets: literal values to redact wherever they appear (empty values are ignored).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()
        self._literal: re.Pattern[str] | None = None
        for s in secrets:
            self.add_secret(s)

    def add_secret(self, value: str | None) -> None:
        """Redact ``value`` from now on (e.g. a secret read after start-up)."""
        if not value:
            return
        with self._lock:
            if value in self._secrets:
                return
            self._secrets = tuple(sorted({*self._secrets, value}, key=len, reverse=True))
            # short secrets only as whole words, so a 2-character password cannot shred every line
            parts = [re.escape(s) if len(s) >= 4 else rf"(?<!\w){re.escape(s)}(?!\w)" for s in self._secrets]
            self._literal = re.compile("|".join(parts))

    def redact(self, text: str) -> str:
        """``text`` with every secret and password-like value replaced by ``***``."""
        literal = self._literal
        if literal is not None:
            text = literal.sub(REDACTED, text)
        text = _URL_USERINFO.sub(lambda m: m.group("head") + REDACTED, text)
        text = _KEY_VALUE.sub(lambda m: m.group("key") + m.group("quote") + REDACTED, text)
        return _BEARER.sub(lambda m: m.group("head") + REDACTED, text)

    def _redact_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, (int, float, bool)) or value is None:
            return value
        if isinstance(value, dict):  # structured fields (the run summary) stay structured, redacted
            return {str(k): self._redact_value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._redact_value(v) for v in value]
        return self.redact(str(value))

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: keep the raw parts, still redacted
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
            record.exc_info = None  # the formatter would re-render the unredacted traceback
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS:
                setattr(record, key, self._redact_value(value))
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``2024-11-28T14:16:00.123Z INFO worker.sources: message [source=cam1 frame_id=cam1:42]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso(record.created)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = _extras(record)
        if not extras:
            return text
        tail = " ".join(f"{k}={v}" for k, v in extras.items())
        head, sep, rest = text.partition("\n")
        return f"{head} [{tail}]{sep}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, the extra fields, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            doc.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, default=str, ensure_ascii=False)


def _iso(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _NativeStderr:
    """Descriptor 2 redirected into a pipe read by a thread that logs each line (see the module doc)."""

    def __init__(self) -> None:
        self.original_fd = os.dup(2)
        #: the real stderr, for the log handler (writing to fd 2 would feed the pipe)
        self.stream: TextIO = os.fdopen(os.dup(self.original_fd), "w", buffering=1, encoding="utf-8")
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = os.fdopen(read_fd, "rb", buffering=0)
        self._thread = threading.Thread(target=self._pump, name="native-stderr", daemon=True)
        self._thread.start()
        if faulthandler.is_enabled():
            faulthandler.enable(file=self.stream)
        atexit.register(self.restore)

    def _pump(self) -> None:
        log = logging.getLogger("native")
        pending = b""
        while True:
            try:
                chunk = self._reader.read(65536)
            except (OSError, ValueError):
                return
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._emit(log, raw)
            if len(pending) > 65536:  # a line without an end: log it in pieces
                self._emit(log, pending)
                pending = b""
        if pending:
            self._emit(log, pending)

    @staticmethod
    def _emit(log: logging.Logger, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if not text.strip():
            return
        level = logging.ERROR if "error" in text.lower() else logging.WARNING
        log.log(level, "%s", text)

    def restore(self) -> None:
        """Put the original stderr back on descriptor 2 and let the reader drain (at exit)."""
        if self._reader.closed:
            return
        sys.stderr.flush()
        os.dup2(self.original_fd, 2)  # closes the pipe's last write end: the reader sees EOF
        self._thread.join(timeout=2.0)


_native: _NativeStderr | None = None
_native_lock = threading.Lock()


def capture_native_stderr() -> TextIO:
    """Route what native libraries write on descriptor 2 through logging (once per process).

    Returns:
        A stream on the original stderr, for the log handler.
    """
    global _native
    with _native_lock:
        if _native is None:
            _native = _NativeStderr()
        return _native.stream


def _opencv_log_level(level: int) -> None:
    try:
        import cv2
    except ImportError:  # pragma: no cover - OpenCV is a dependency
        return
    levels = cv2.utils.logging
    if level <= logging.DEBUG:
        value = levels.LOG_LEVEL_DEBUG
    elif level <= logging.INFO:
        value = levels.LOG_LEVEL_WARNING  # OpenCV's INFO is start-up chatter (plugins, backends)
    elif level <= logging.WARNING:
        value = levels.LOG_LEVEL_WARNING
    else:
        value = levels.LOG_LEVEL_ERROR
    levels.setLogLevel(value)


def configure_logging(
    level: str | int = "INFO",
    fmt: Literal["text", "json"] = "text",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    native: bool | None = None,
) -> RedactingFilter:
    """Send all logs to ``stream`` (stderr) in ``fmt``, redacting ``secrets``; replaces earlier setup.

    Args:
        level: the root level (OpenCV's log level follows it).
        fmt: ``"text"`` or ``"json"``.
        secrets: values to redact.
        stream: where to write (default: the process's stderr).
        native: route native libraries' stderr through logging (:func:`capture_native_stderr`);
            default: on for ``json`` written to the process's stderr, off otherwise.

    Returns:
        The installed filter (``add_secret`` it when a secret is read later).

    Raises:
        ValueError: unknown ``fmt`` or level.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    if native is None:
        native = fmt == "json" and stream is None
    if native:
        original = capture_native_stderr()
        stream = original if stream is None else stream
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    redactor = RedactingFilter(secrets)
    handler.addFilter(redactor)
    handler.set_name("segstream")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "segstream"]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    _opencv_log_level(root.level)
    # the access log of every scrape and probe is noise at INFO
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return redactor
