"""Line sinks: JSON Lines files and stdout, one compact JSON object per line.

Line format: the message's JSON (``FrameResult.to_json()`` / ``ErrorReport.to_json()``) with a ``"kind"``
field first, ``"result"`` or ``"error"``. The JSONL sink writes errors to the same file unless
``errors_path`` is set; with ``mode: append`` (the default) both files are opened in append mode (a
restart continues the file), with ``mode: overwrite`` they are emptied when the sink starts (one line per
frame of this run, as the demo wants).

Writes never happen on the event loop: ``publish_*`` serialize the message and append it to an
in-memory buffer; ``flush()`` (the runtime calls it after each batch) hands the buffer to the sink's own
single-thread ``BlockingPool``, which writes and flushes the file (``fsync`` optional). The buffer is also
flushed when it exceeds ``flush_bytes``, so it stays bounded even if nobody calls ``flush()``. One thread
per sink keeps lines in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.concurrency import BlockingPool
from worker.errors import SinkError
from worker.messages import ErrorReport, FrameResult
from worker.sinks.base import DEFAULT_CLOSE_TIMEOUT_S, SinkContextMixin
from worker.telemetry import NullTelemetry, Telemetry

__all__ = ["JsonlSink", "JsonlSinkConfig", "LineSink", "StdoutSink", "StdoutSinkConfig"]

log = logging.getLogger(__name__)

RESULTS, ERRORS = "results", "errors"


class JsonlSinkConfig(BaseModel):
    """``type: jsonl``: one JSON line per result (and per error) in a file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["jsonl"] = "jsonl"
    name: str = Field("jsonl", pattern=r"^[A-Za-z0-9_.-]+$")
    path: Path
    errors_path: Path | None = Field(None, description="errors to their own file (default: same file)")
    mode: Literal["append", "overwrite"] = Field(
        "append",
        description="append: a restart continues the file; overwrite: emptied at start (this run only)",
    )
    flush_bytes: int = Field(1024 * 1024, ge=1, description="flush early when this much is buffered")
    fsync: bool = Field(False, description="fsync after each flush (survives power loss, slower)")


class StdoutSinkConfig(BaseModel):
    """``type: stdout``: one compact JSON line per result on standard output (demos, debugging)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["stdout"] = "stdout"
    name: str = Field("stdout", pattern=r"^[A-Za-z0-9_.-]+$")
    mode: Literal["full", "summary"] = Field(
        "full", description="full messages, or source/frame/model/detections/latency only"
    )
    flush_bytes: int = Field(64 * 1024, ge=1)


class LineSink(SinkContextMixin):
    """Base of the line sinks: buffers encoded lines per stream, writes them in a worker thread.

    Subclasses implement ``_open`` (in the thread: returns the binary streams ``{"results": f, ...}``),
    may override ``_encode_result``, and say which streams they own (closed at the end).
    """

    def __init__(self, name: str, telemetry: Telemetry | None, flush_bytes: int, fsync: bool = False) -> None:
        self.name = name
        self.telemetry: Telemetry = telemetry or NullTelemetry()
        self._flush_bytes = flush_bytes
        self._fsync = fsync
        self._pool = BlockingPool(f"sink[{name}]", max_workers=1)
        self._streams: dict[str, IO[bytes]] = {}
        self._owned: set[str] = set()
        # in arrival order: (stream, source, kind, encoded line)
        self._buffer: list[tuple[str, str, str, bytes]] = []
        self._buffered_bytes = 0
        self._lock = asyncio.Lock()  # one flush at a time, in order
        self._started = False
        self._closed = False

    def _open(self) -> dict[str, IO[bytes]]:
        raise NotImplementedError

    def _encode_result(self, result: FrameResult) -> bytes:
        """The result's line body: a compact JSON object."""
        return result.to_json()

    async def start(self) -> None:
        """Open the output (in the sink's thread).

        Raises:
            SinkError: the file cannot be opened.
        """
        if self._started or self._closed:
            raise SinkError(f"sink[{self.name}] was already started")
        try:
            self._streams = await self._pool.run(self._open)
        except OSError as exc:
            self._pool.shutdown(wait=False)
            self._closed = True
            raise SinkError(f"sink[{self.name}]: cannot open output: {exc}") from exc
        self._started = True

    async def publish_result(self, result: FrameResult) -> None:
        await self._append(RESULTS, result.source_id, "result", self._encode_result(result))

    async def publish_error(self, report: ErrorReport) -> None:
        await self._append(ERRORS, report.source_id, "error", report.to_json())

    async def _append(self, stream: str, source: str, kind: str, body: bytes) -> None:
        """Buffer ``{"kind": kind, ...body}`` (``body``: a compact, non-empty JSON object) as one line."""
        if not self._started or self._closed:
            raise SinkError(f"sink[{self.name}] is not open")
        line = b'{"kind":"%s",%s\n' % (kind.encode(), body[1:])
        self._buffer.append((stream, source, kind, line))
        self._buffered_bytes += len(line)
        if self._buffered_bytes >= self._flush_bytes:
            await self.flush()

    async def flush(self) -> None:
        """Write and flush everything buffered so far (in the sink's thread).

        Raises:
            SinkError: the write failed; the lines of this flush are lost, counted as
                ``result_lost(source, "sink_io_error")`` and ``publish_error("io_error")``.
        """
        async with self._lock:
            entries, self._buffer = self._buffer, []
            self._buffered_bytes = 0
            if not entries:
                return
            try:
                await self._pool.run(self._write, entries)
            except OSError as exc:
                self.telemetry.publish_error("io_error")
                for _, source, _, _ in entries:
                    self.telemetry.result_lost(source, "sink_io_error")
                raise SinkError(f"sink[{self.name}]: write failed: {exc}") from exc
            for _, _, kind, _ in entries:
                self.telemetry.published(kind)

    def _write(self, entries: list[tuple[str, str, str, bytes]]) -> None:
        used: dict[int, IO[bytes]] = {}
        for stream_name, _, _, line in entries:
            stream = self._streams[stream_name]
            stream.write(line)  # buffered by the file object; order kept even when both share one file
            used[id(stream)] = stream
        for stream in used.values():
            stream.flush()
            if self._fsync:
                os.fsync(stream.fileno())

    def _close_streams(self) -> None:
        closed: set[int] = set()
        for name in self._owned:
            stream = self._streams[name]
            if id(stream) in closed:
                continue
            closed.add(id(stream))
            try:
                stream.close()
            except OSError as exc:  # data a failed flush left in the file object's buffer
                log.error("sink[%s]: closing %s failed: %s", self.name, getattr(stream, "name", name), exc)
                with contextlib.suppress(OSError):
                    stream.close()

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> int:  # noqa: ASYNC109
        """Flush and close the output within ``timeout`` s.

        Returns:
            The number of lines not written (a failed or timed-out final flush).
        """
        if self._closed:
            return 0
        pending = len(self._buffer)
        unwritten = 0
        try:
            async with asyncio.timeout(timeout):
                if self._started:
                    try:
                        await self.flush()
                    except SinkError as exc:
                        log.error("%s", exc)
                        unwritten = pending
                    await self._pool.run(self._close_streams)
        except TimeoutError:
            unwritten = pending
            log.error(
                "sink[%s]: close timed out after %.1f s; %d lines may be lost", self.name, timeout, pending
            )
        finally:
            self._closed = True
            self._pool.shutdown(wait=False)
        return unwritten


class JsonlSink(LineSink):
    """Results (and errors) as JSON Lines in ``config.path``, appended or from scratch (module docstring)."""

    def __init__(self, config: JsonlSinkConfig, *, telemetry: Telemetry | None = None) -> None:
        super().__init__(config.name, telemetry, config.flush_bytes, config.fsync)
        self.config = config

    def _open(self) -> dict[str, IO[bytes]]:
        open_mode = "ab" if self.config.mode == "append" else "wb"
        self.config.path.parent.mkdir(parents=True, exist_ok=True)
        results = self.config.path.open(open_mode)
        errors = results
        if self.config.errors_path is not None and self.config.errors_path != self.config.path:
            try:
                self.config.errors_path.parent.mkdir(parents=True, exist_ok=True)
                errors = self.config.errors_path.open(open_mode)
            except OSError:
                results.close()
                raise
        self._owned = {RESULTS, ERRORS}
        return {RESULTS: results, ERRORS: errors}


class StdoutSink(LineSink):
    """One compact JSON line per result (and error) on stdout; ``summary`` mode drops the predictions."""

    def __init__(
        self, config: StdoutSinkConfig, *, telemetry: Telemetry | None = None, stream: IO[bytes] | None = None
    ) -> None:
        super().__init__(config.name, telemetry, config.flush_bytes)
        self.config = config
        self._stream = stream

    def _open(self) -> dict[str, IO[bytes]]:
        stream = self._stream if self._stream is not None else sys.stdout.buffer
        return {RESULTS: stream, ERRORS: stream}  # not owned: never closed

    def _encode_result(self, result: FrameResult) -> bytes:
        if self.config.mode == "full":
            return result.to_json()
        summary = {
            "source": result.source_id,
            "frame_number": result.frame_number,
            "frame_id": result.frame_id,
            "model_id": result.model_id,
            "detections": count_detections(result.outputs),
            "latency_ms": round((result.processed_at - result.timestamp) * 1000.0, 1),
        }
        return json.dumps(summary, separators=(",", ":")).encode()


def count_detections(outputs: dict[str, Any]) -> int:
    """Sum of predictions over the outputs shaped ``{"predictions": {"predictions": [...]}}``.

    Example:
        >>> count_detections({"predictions": {"image": {}, "predictions": [{}, {}]}, "model_id": "a/1"})
        2
    """
    total = 0
    for value in outputs.values():
        if isinstance(value, dict) and isinstance(value.get("predictions"), list):
            total += len(value["predictions"])
    return total
