"""What the delivering sinks (MQTT, HTTP webhook) share: an outbox drained by one background task.

``publish_*`` only check the message and put it into the bounded :class:`~worker.sinks.outbox.Outbox`;
one runner task (the subclass's ``_run``) delivers from it, whatever the remote side's state. This
class holds the one lifecycle both sinks follow:

- ``start()`` checks the settings (``_prepare``: secrets, TLS files; a ``SinkError`` at start-up, not
  later in the loop) and starts the runner; a second ``start()`` is an error.
- A message over ``max_payload_bytes`` is refused at once: ``SinkError``, counted as
  ``publish_errors_total{reason="payload_too_large"}`` and ``results_lost_total`` for its source.
- A runner that raises (a bug, or settings that can never work) stops the sink for good: it is logged
  once, kept in ``failure``, and every later ``publish_*`` raises ``SinkError`` naming it.
- ``close(timeout)`` tells the runner to stop (it delivers what it can first), waits about
  ``timeout`` s, cancels it if it is still running, and counts what is left in the outbox as
  ``results_lost_total{reason="shutdown_undelivered"}`` (returned, and logged with the target).
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod

from worker.errors import SinkError
from worker.sinks.base import DEFAULT_CLOSE_TIMEOUT_S, SinkContextMixin
from worker.sinks.outbox import Outbox, OutgoingMessage
from worker.telemetry import Telemetry

__all__ = ["OutboxSink"]

log = logging.getLogger(__name__)


class OutboxSink(SinkContextMixin):
    """Base of the sinks that deliver from an :class:`Outbox` in a background task.

    Args:
        name: the sink's name (logs, task names).
        telemetry: outbox depth and losses, payload errors.
        outbox_size: most messages kept while undelivered.
        max_payload_bytes: the largest message accepted.
        runner_role: what the runner is called in logs and its task name (``publisher``, ``sender``).
    """

    def __init__(
        self,
        *,
        name: str,
        telemetry: Telemetry,
        outbox_size: int,
        max_payload_bytes: int,
        runner_role: str,
    ) -> None:
        self.name = name
        self.telemetry = telemetry
        self.outbox = Outbox(outbox_size, telemetry, name=name)
        self._max_payload_bytes = max_payload_bytes
        self._runner_role = runner_role
        self._runner: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._closed = False
        self._failure: BaseException | None = None
        #: messages accepted and not delivered, as counted by ``close()``
        self.undelivered = 0

    # ---- what a subclass provides -----------------------------------------------------------------

    def _prepare(self) -> None:
        """Check the settings before the runner starts (secrets, TLS files); raise ``SinkError``."""

    @abstractmethod
    async def _run(self) -> None:
        """Deliver from the outbox until ``_stopping`` is set and nothing is left (or cancelled)."""

    @abstractmethod
    def _describe_target(self) -> str:
        """Where messages go, for logs (no secrets)."""

    def _on_failure(self) -> None:
        """Called once when the runner stopped for good (before the error is logged)."""

    def _on_closed(self) -> None:
        """Called at the end of ``close()``."""

    # ---- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the settings, then start the runner (it never waits for the remote side).

        Raises:
            SinkError: unusable settings, or the sink was started before.
        """
        if self._runner is not None or self._closed:
            raise SinkError(f"sink[{self.name}] was already started")
        self._prepare()
        self._runner = asyncio.create_task(self._run_guarded(), name=f"sink[{self.name}].{self._runner_role}")

    @property
    def failure(self) -> BaseException | None:
        """The error that stopped the runner for good (a bug or unusable settings), else None."""
        return self._failure

    async def flush(self) -> None:
        """Nothing to do: the runner drains the outbox continuously."""

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> int:  # noqa: ASYNC109
        """Deliver the outbox within about ``timeout`` s, then stop.

        Returns:
            The number of messages not delivered (counted as ``shutdown_undelivered``).
        """
        if self._closed:
            return self.undelivered
        self._closed = True
        self._stopping.set()
        self.outbox.changed.set()
        runner = self._runner
        if runner is not None:
            await asyncio.wait({runner}, timeout=timeout)
            while not runner.done():  # each cancel interrupts whatever the runner awaits now
                runner.cancel()
                await asyncio.wait({runner}, timeout=0.2)
            if not runner.cancelled():
                runner.exception()  # retrieved: _run_guarded already logged it
        self.undelivered = self.outbox.discard_undelivered()
        if self.undelivered:
            log.warning(
                "sink[%s]: closed with %d messages not delivered to %s",
                self.name,
                self.undelivered,
                self._describe_target(),
            )
        self._on_closed()
        return self.undelivered

    async def _run_guarded(self) -> None:
        try:
            await self._run()
        except Exception as exc:
            self._failure = exc
            self._on_failure()
            log.exception(
                "sink[%s]: %s stopped for good; results are no longer accepted", self.name, self._runner_role
            )
            raise

    # ---- accepting messages -----------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if self._closed:
            raise SinkError(f"sink[{self.name}] is closed")
        if self._failure is not None:
            raise SinkError(f"sink[{self.name}] failed: {self._failure!r}") from self._failure

    def _enqueue(self, message: OutgoingMessage) -> None:
        """Put one message into the outbox, or refuse it (closed, failed, too large)."""
        self._check_accepting()
        size = len(message.payload)
        if size > self._max_payload_bytes:
            self.telemetry.publish_error("payload_too_large")
            self.telemetry.result_lost(message.source, "payload_too_large")
            raise SinkError(
                f"sink[{self.name}]: {message.kind} of source {message.source!r} is {size} bytes, "
                f"over max_payload_bytes={self._max_payload_bytes}"
            )
        self.outbox.put(message)
