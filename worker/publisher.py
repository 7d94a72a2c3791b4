"""The publisher: owns the sinks, turns each frame's outcome into a result or an error report.

One object per worker, on the event loop::

    publisher = Publisher("line-3", sinks, telemetry=metrics, summary=summary, primary_step="seg",
                          class_names={"parts/1": ("bolt", "nut")}, observers=[preview, recorder])
    await publisher.start()                 # start every sink (a failure closes those already started)
    await publisher.publish_batch(result)   # per batch, in batch order: results / reports, then flush
    publisher.report_soon(report)           # a source's bad payload, a refused control message
    undelivered = await publisher.aclose(10.0)   # observers, then sinks (outbox, ``offline``)

For each ``FrameOutcome`` of a batch: an outcome with an error becomes an ``ErrorReport`` (counted as
``frame_dropped(source, reason)``); any other becomes a ``FrameResult`` for every sink, is counted
(``frames_processed``, end-to-end latency) and is handed to the result observers as a
``PublishedFrame`` (the run summary, the live preview, the annotated video, active learning). An
observer's ``on_result`` is cheap and never blocks; an observer that must not miss a frame (the
annotated video of an every-frame source) registers a *gate*, awaited before each result, that waits
until it has room.

A sink refusing a message (``SinkError``) is logged and counted (``publish_error("sink_refused")``);
it never stops the others.

Acknowledgement after delivery (at-least-once end to end): a frame may carry an ``ack`` (an MQTT
source's frames do). It is called once the frame's outcome — its result, or its error report — was
delivered by every sink that confirms delivery (``confirms_delivery``: the MQTT sink, on the broker's
PUBACK) and accepted by the others. A sink that refuses the message counts as answered (the refusal is
counted; retrying could only fail again). A message dropped by an outbox overflow or left undelivered at
shutdown is never confirmed, so its frame stays unacknowledged and the broker delivers it again.
Frames the worker stops without answering (``report_unprocessed``) are reported but never acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from worker.errors import SegstreamError
from worker.frame import Frame
from worker.messages import ErrorReport, FrameResult
from worker.recorder import RunSummary
from worker.sinks import Sink
from worker.step.detections import Detections
from worker.step.executor import BatchResult, FrameOutcome
from worker.telemetry import DropReason, Telemetry, drop_reason

__all__ = ["Gate", "PublishedFrame", "Publisher", "ResultObserver"]

log = logging.getLogger(__name__)

#: awaited before each result reaches the observers (an observer that needs backpressure)
Gate = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PublishedFrame:
    """One frame's result as it was published, for the result observers."""

    frame: Frame
    result: FrameResult
    detections: Detections | None  # the primary step's detections
    class_names: tuple[str, ...]  # the model's class names, in class id order
    latency_s: float  # capture → published


class _Confirmations:
    """Calls ``ack`` once every confirming sink confirmed (``expect`` one per sink, then ``arm``)."""

    __slots__ = ("_ack", "_left")

    def __init__(self, ack: Callable[[], None]) -> None:
        self._ack = ack
        self._left = 1  # the guard ``arm`` releases: no ack before every sink had the message

    def expect(self) -> Callable[[], None]:
        self._left += 1
        return self._one

    def arm(self) -> None:
        self._one()

    def _one(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._ack()


async def _deliver(sink: Sink, method: str, message: Any, confirmations: _Confirmations | None) -> None:
    """``sink.publish_result`` / ``publish_error``, with a delivery callback when both sides want one."""
    publish = getattr(sink, method)
    if confirmations is not None and getattr(sink, "confirms_delivery", False):
        confirm = confirmations.expect()
        try:
            await publish(message, confirm)
        except BaseException:
            confirm()  # refused: answered as far as this sink goes (the caller counts the refusal)
            raise
    else:
        await publish(message)


class ResultObserver(Protocol):
    """Something that watches the published results (summary, preview, recorder, active learning)."""

    def on_result(self, published: PublishedFrame) -> None:
        """One published result: cheap, on the event loop, never blocks."""

    async def aclose(self) -> None:
        """At shutdown, after the last result."""


class Publisher:
    """Delivers outcomes to the sinks and the result observers (see the module docstring).

    Args:
        pipeline: the pipeline's name (in every message).
        sinks: where results and reports go, in order.
        telemetry: counts results, drops, refused publishes, latency.
        summary: the run's summary (batches, errors).
        primary_step: the step whose name and detections a result carries.
        class_names: each model's class names by model id.
        observers: handed every published result, closed by ``aclose`` in this order.
        gates: awaited before each result reaches the observers.
        clock: wall clock for latencies (tests pass their own).
    """

    def __init__(
        self,
        pipeline: str,
        sinks: Sequence[Sink],
        *,
        telemetry: Telemetry,
        summary: RunSummary,
        primary_step: str,
        class_names: Mapping[str, tuple[str, ...]],
        observers: Sequence[ResultObserver] = (),
        gates: Sequence[Gate] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pipeline = pipeline
        self.sinks: tuple[Sink, ...] = tuple(sinks)
        self._telemetry = telemetry
        self._summary = summary
        self._primary_step = primary_step
        self._class_names = dict(class_names)
        self._observers = tuple(observers)
        self._gates = tuple(gates)
        self._clock = clock
        self._started: list[Sink] = []
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    def add_observer(self, observer: ResultObserver, *, gate: Gate | None = None) -> None:
        """Watch the results from now on (and ``gate`` before each); closed after the others."""
        self._observers = (*self._observers, observer)
        if gate is not None:
            self._gates = (*self._gates, gate)

    # ------------------------------------------------------------------------------------- life cycle

    async def start(self, close_timeout: float = 5.0) -> None:
        """Start every sink in order.

        Raises:
            SegstreamError: a sink could not start; the sinks already started were closed first.
        """
        for sink in self.sinks:
            try:
                await sink.start()
            except BaseException:
                await self._close_sinks(close_timeout)
                raise
            self._started.append(sink)

    def broker_connected(self) -> bool:
        """True while any sink with a broker connection is connected (readiness asks at each probe)."""
        return any(bool(sink.connected) for sink in self.sinks if sink.connected is not None)

    async def aclose(self, timeout: float) -> int:  # noqa: ASYNC109
        """Wait for the error reports under way, close the observers, then the sinks.

        Returns:
            How many accepted messages the sinks could not deliver.
        """
        if self._closed:
            return 0
        self._closed = True
        deadline = time.monotonic() + timeout
        if self._background:
            await asyncio.wait(self._background, timeout=max(0.1, deadline - time.monotonic()))
        for observer in self._observers:
            try:
                await observer.aclose()
            except Exception:
                log.exception("result observer %s failed to close", type(observer).__name__)
        return await self._close_sinks(max(0.5, deadline - time.monotonic()))

    async def _close_sinks(self, timeout: float) -> int:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        undelivered = 0
        started, self._started = self._started, []
        for sink in started:
            try:
                undelivered += await sink.close(max(0.5, deadline - time.monotonic()))
            except Exception:
                log.exception("sink %s failed to close", sink.name)
        if undelivered:
            log.error("%d messages could not be delivered before exit", undelivered)
        return undelivered

    # ------------------------------------------------------------------------------------- errors

    def report_soon(self, report: ErrorReport, ack: Callable[[], None] | None = None) -> None:
        """Count ``report`` and hand it to every sink without waiting (callable from any loop callback);
        ``ack`` is called once it was delivered (see the module docstring)."""
        self._summary.errors[report.reason] += 1
        task = asyncio.get_running_loop().create_task(
            self._deliver_report(report, ack), name="publisher.report"
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def report(self, report: ErrorReport, ack: Callable[[], None] | None = None) -> None:
        """Count ``report`` and hand it to every sink; ``ack`` once it was delivered."""
        self._summary.errors[report.reason] += 1
        await self._deliver_report(report, ack)

    async def report_unprocessed(self, frames: Sequence[Frame], reason: DropReason, message: str) -> None:
        """Frames that will get no result (the worker is stopping after a failure): one report each."""
        for frame in frames:
            self._telemetry.frame_dropped(frame.source_id, reason)
            await self.report(
                ErrorReport(
                    pipeline=self.pipeline,
                    source_id=frame.source_id,
                    reason=reason,
                    message=message,
                    frame_id=frame.frame_id,
                    frame_number=frame.frame_number,
                    topic=frame.topic,
                    idempotency_key=frame.idempotency_key,
                )
            )

    async def _deliver_report(self, report: ErrorReport, ack: Callable[[], None] | None = None) -> None:
        confirmations = _Confirmations(ack) if ack is not None else None
        for sink in self._started:
            try:
                await _deliver(sink, "publish_error", report, confirmations)
            except SegstreamError as exc:
                log.error("sink %s refused an error report: %s", sink.name, exc)
                self._telemetry.publish_error("sink_refused")
        if confirmations is not None:
            confirmations.arm()

    # ------------------------------------------------------------------------------------- results

    async def publish_batch(self, batch: BatchResult) -> None:
        """Every outcome of ``batch`` in order, then a flush of every sink."""
        self._telemetry.batch_done(len(batch.outcomes), batch.model_seconds, batch.postprocess_seconds)
        self._summary.add_batch(batch.model_seconds, batch.postprocess_seconds)
        for outcome in batch.outcomes:
            await self.publish_outcome(outcome)
        for sink in self._started:
            try:
                await sink.flush()
            except SegstreamError as exc:
                log.error("sink %s could not flush: %s", sink.name, exc)

    async def publish_outcome(self, outcome: FrameOutcome) -> None:
        """One frame: its error report, or its result to the sinks and then the observers."""
        frame = outcome.frame
        if outcome.error is not None:
            reason = outcome.error.reason
            self._telemetry.frame_dropped(frame.source_id, drop_reason(outcome.error))
            await self.report(
                ErrorReport(
                    pipeline=self.pipeline,
                    source_id=frame.source_id,
                    reason=reason,
                    message=str(outcome.error),
                    frame_id=frame.frame_id,
                    frame_number=frame.frame_number,
                    topic=frame.topic,
                    idempotency_key=frame.idempotency_key,
                ),
                frame.ack,
            )
            return
        result = FrameResult(
            pipeline=self.pipeline,
            source_id=frame.source_id,
            frame_number=frame.frame_number,
            frame_id=frame.frame_id,
            timestamp=frame.timestamp,
            step=self._primary_step,
            inference_id=outcome.inference_id,
            model_id=outcome.model_id,
            outputs=outcome.outputs or {},
            topic=frame.topic,
            idempotency_key=frame.idempotency_key,
        )
        confirmations = _Confirmations(frame.ack) if frame.ack is not None else None
        for sink in self._started:
            try:
                await _deliver(sink, "publish_result", result, confirmations)
            except SegstreamError as exc:
                log.error("sink %s refused a result of %s: %s", sink.name, frame.frame_id, exc)
                self._telemetry.publish_error("sink_refused")
        if confirmations is not None:
            confirmations.arm()
        latency = max(0.0, self._clock() - frame.timestamp)
        self._telemetry.frames_processed(frame.source_id)
        self._telemetry.e2e_latency(frame.source_id, latency)
        published = PublishedFrame(
            frame=frame,
            result=result,
            detections=outcome.detections.get(self._primary_step),
            class_names=self._class_names.get(outcome.model_id or "", ()),
            latency_s=latency,
        )
        for gate in self._gates:
            await gate()
        for observer in self._observers:
            observer.on_result(published)
