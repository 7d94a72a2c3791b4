"""MQTT sink: results and error reports to templated topics, through a bounded outbox, with a status topic.

Delivery: ``publish_result`` / ``publish_error`` only put the message into the ``Outbox`` (never wait for
the network). One publisher task per connection drains it in order, at most ``max_inflight`` publishes
at a time, and a message leaves the outbox only when ``aiomqtt.Client.publish`` returned. In aiomqtt 2.5
``publish(qos=1)`` returns when paho's ``on_publish`` fires, which for QoS 1 is on PUBACK (QoS 2: PUBCOMP);
if the connection breaks first, the call never returns on its own, so a watch task iterating
``client.messages`` (which raises ``MqttError`` on disconnection) ends the connection's ``TaskGroup`` and
every unacknowledged message is sent again on the next connection. Each connection uses a fresh client
object, so paho never re-sends anything by itself: the outbox is the one source of truth. Delivery is
**at least once**: a message whose PUBACK was lost with the connection arrives twice.

Durability: the outbox lives in memory; it survives broker restarts and network outages (bounded by
``outbox_size``, oldest dropped first and counted), not a restart of the worker process.

Connection loop: the ``async with client`` is wrapped in a loop with the worker's one retry policy,
:class:`worker.retry.Backoff` (full jitter between 0 and ``BrokerConfig.reconnect_min_s * 2**n``, capped at
``reconnect_max_s``; at least ``DEFAULT_MIN_INTERVAL_S`` between two attempts), as in aiomqtt's
``docs/reconnection.md``; each new attempt counts ``reconnect("broker:sink")`` and ``broker_connected``
follows the state. The policy holds during shutdown too: ``close()`` cuts the current wait short once (one
more attempt at once, still within the attempt-rate floor), after which the loop keeps backing off until
``close()``'s timeout ends it; a broker that is down (or refuses the login) at shutdown gets a handful of
attempts, not a flood.

Delivery confirmation: ``publish_result`` / ``publish_error`` take an ``on_delivered`` callback, called on
the event loop once the broker acknowledged that message (QoS 1: PUBACK; never for a message dropped by
overflow or left undelivered at shutdown). The publisher uses it to acknowledge an MQTT frame only after
its result is safe at the broker (``worker.publisher``; at-least-once end to end).

Status: on every connect the sink publishes a retained JSON ``{"status": "online", ...}`` to the status
topic (default ``segstream/{pipeline}/status/{worker}``: one retained status per worker, so replicas never
overwrite each other; ``mosquitto_sub -t 'segstream/<pipeline>/status/+' -v`` lists the pool); its Last
Will is a retained ``{"status": "offline", "reason": "connection_lost"}``, which the broker publishes if
the worker vanishes without a DISCONNECT; ``close()`` publishes a retained ``offline`` itself and
disconnects cleanly (no Will). A ``status_topic`` without ``{worker}`` is shared by every replica, and the
last one to speak wins.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import aiomqtt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.errors import SinkError
from worker.ids import client_id_for, make_worker_id
from worker.messages import ErrorReport, FrameResult
from worker.mqtt import BrokerConfig, make_client
from worker.retry import Backoff
from worker.sinks.base import TopicTemplate
from worker.sinks.outbox import OutgoingMessage
from worker.sinks.outbox_sink import OutboxSink
from worker.telemetry import NullTelemetry, Telemetry

__all__ = ["MqttSink", "MqttSinkConfig"]

log = logging.getLogger(__name__)

RESULT_FIELDS = ("pipeline", "source", "step")
ERROR_FIELDS = ("pipeline", "source")
STATUS_FIELDS = ("pipeline", "worker")


class MqttSinkConfig(BaseModel):
    """``type: mqtt`` in a pipeline file's ``sinks``; the broker itself is the pipeline's ``broker``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["mqtt"] = "mqtt"
    name: str = Field("mqtt", pattern=r"^[A-Za-z0-9_.-]+$")
    topic: str = Field(
        "segstream/{pipeline}/{source}/predictions", description="placeholders: {pipeline} {source} {step}"
    )
    error_topic: str = Field("segstream/{pipeline}/errors", description="placeholders: {pipeline} {source}")
    status_topic: str = Field(
        "segstream/{pipeline}/status/{worker}",
        description="retained online/offline of this worker; placeholders: {pipeline} {worker}",
    )
    qos: Literal[0, 1, 2] = 1
    retain: bool = Field(False, description="retain result messages (status is always retained)")
    outbox_size: int = Field(10_000, ge=1, le=10_000_000, description="messages kept while undelivered")
    max_inflight: int = Field(32, ge=1, le=65_535, description="publishes awaiting acknowledgement at once")
    ack_timeout_s: float = Field(30.0, gt=0, description="a publish unacknowledged this long: reconnect")
    max_payload_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=268_435_455)

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        TopicTemplate(value, RESULT_FIELDS)
        return value

    @field_validator("error_topic")
    @classmethod
    def _check_error_topic(cls, value: str) -> str:
        TopicTemplate(value, ERROR_FIELDS)
        return value

    @field_validator("status_topic")
    @classmethod
    def _check_status_topic(cls, value: str) -> str:
        TopicTemplate(value, STATUS_FIELDS)
        return value


class MqttSink(OutboxSink):
    """Publish results and error reports to an MQTT broker (see the module docstring for guarantees).

    Args:
        config: the sink's settings.
        pipeline: the pipeline's name (``{pipeline}`` in topics, status payload).
        broker: broker address, credentials and TLS, shared with other MQTT users of the worker.
        telemetry: receives published/error counts, outbox depth, connection state, drops.
        worker_id: this process's id (``worker.ids.make_worker_id``) in status messages and the MQTT
            client id; the runtime passes the one of the process (default: a new one).
        backoff: the reconnect policy (default: ``Backoff(broker.reconnect_min_s, broker.reconnect_max_s)``).
    """

    def __init__(
        self,
        config: MqttSinkConfig,
        *,
        pipeline: str,
        broker: BrokerConfig,
        telemetry: Telemetry | None = None,
        worker_id: str | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(
            name=config.name,
            telemetry=telemetry or NullTelemetry(),
            outbox_size=config.outbox_size,
            max_payload_bytes=config.max_payload_bytes,
            runner_role="publisher",
        )
        self.config = config
        self.pipeline = pipeline
        self.broker = broker
        self.worker_id = worker_id or make_worker_id(pipeline, prefix=broker.client_id)
        self.client_id = client_id_for(self.worker_id, "sink", config.name)
        self._backoff = backoff or Backoff(broker.reconnect_min_s, broker.reconnect_max_s)
        self._topic = TopicTemplate(config.topic, RESULT_FIELDS)
        self._error_topic = TopicTemplate(config.error_topic, ERROR_FIELDS)
        self.status_topic = TopicTemplate(config.status_topic, STATUS_FIELDS).format(
            pipeline=pipeline, worker=self.worker_id
        )
        self._online = asyncio.Event()
        self._inflight: set[int] = set()  # sequence numbers sent on the current connection, unacknowledged

    # ---- public interface -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while connected and the ``online`` status was acknowledged."""
        return self._online.is_set()

    @property
    def inflight(self) -> int:
        """Publishes sent on the current connection and not yet acknowledged."""
        return len(self._inflight)

    async def wait_connected(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait up to ``timeout`` s for the sink to be connected; True when it is."""
        try:
            async with asyncio.timeout(timeout):
                await self._online.wait()
        except TimeoutError:
            return False
        return True

    def _prepare(self) -> None:
        """Check the broker settings (password file, TLS files): ``start()`` fails on unreadable ones."""
        try:
            self.broker.resolved_password()
            if self.broker.tls is not None:
                self.broker.tls.context()
        except (OSError, ValueError) as exc:
            raise SinkError(f"sink[{self.name}]: bad broker settings: {exc}") from exc

    def _describe_target(self) -> str:
        return self.broker.describe()

    #: ``publish_*`` take ``on_delivered`` (called when the broker acknowledged the message)
    confirms_delivery = True

    async def publish_result(
        self, result: FrameResult, on_delivered: Callable[[], None] | None = None
    ) -> None:
        """Queue one result for ``topic`` (returns at once; the broker may be down); ``on_delivered``
        is called once the broker acknowledged it."""
        self._check_accepting()
        topic = self._topic.format(pipeline=self.pipeline, source=result.source_id, step=result.step)
        self._enqueue_publish(topic, result.to_json(), "result", result.source_id, on_delivered)

    async def publish_error(
        self, report: ErrorReport, on_delivered: Callable[[], None] | None = None
    ) -> None:
        """Queue one error report for ``error_topic`` (``on_delivered`` as for results)."""
        self._check_accepting()
        topic = self._error_topic.format(pipeline=self.pipeline, source=report.source_id)
        self._enqueue_publish(topic, report.to_json(), "error", report.source_id, on_delivered)

    def _on_closed(self) -> None:
        self._online.clear()
        self.telemetry.broker_connected(False)

    def _enqueue_publish(
        self, topic: str, payload: bytes, kind: str, source: str, on_delivered: Callable[[], None] | None
    ) -> None:
        qos, retain = self.config.qos, self.config.retain
        self._enqueue(OutgoingMessage(topic, payload, qos, retain, kind, source, on_delivered))

    # ---- connection loop --------------------------------------------------------------------------

    def _status(self, status: str, reason: str | None = None) -> bytes:
        body: dict[str, Any] = {"status": status, "worker": self.worker_id, "pipeline": self.pipeline}
        if reason is not None:
            body["reason"] = reason
        if status == "online" or reason == "shutdown":
            body["timestamp"] = time.time()
        return json.dumps(body, separators=(",", ":")).encode()

    def _make_client(self) -> aiomqtt.Client:
        will = aiomqtt.Will(self.status_topic, self._status("offline", "connection_lost"), qos=1, retain=True)
        try:
            client = make_client(
                self.broker,
                identifier=self.client_id,
                will=will,
                max_inflight_messages=self.config.max_inflight,
            )
        except (OSError, ValueError) as exc:
            raise SinkError(f"sink[{self.name}]: cannot build an MQTT client: {exc}") from exc
        # the window is ours (max_inflight): aiomqtt's "N pending publish calls" warning is noise
        client.pending_calls_threshold = self.config.max_inflight + 1
        return client

    def _on_failure(self) -> None:
        self._set_online(False)

    async def _run(self) -> None:
        """Connect, publish until told to stop, reconnect with backoff after any broker error."""
        backoff = self._backoff
        outage_since: float | None = None
        while True:
            if self._stopping.is_set() and not self.outbox:
                return  # nothing left to deliver; the Will already says offline if we were cut off
            await asyncio.sleep(backoff.pace())  # the attempt-rate floor, whatever the state
            if backoff.attempt or outage_since is not None:
                self.telemetry.reconnect("broker:sink")
            try:
                async with self._make_client() as client:
                    await client.publish(self.status_topic, self._status("online"), qos=1, retain=True)
                    self._set_online(True)
                    if outage_since is not None:
                        log.warning(
                            "sink[%s]: reconnected to %s after %.1f s; %d messages waiting",
                            self.name,
                            self.broker.describe(),
                            time.monotonic() - outage_since,
                            len(self.outbox),
                        )
                    backoff.reset()
                    outage_since = None
                    await self._session(client)
                    offline = self._status("offline", "shutdown")
                    await client.publish(self.status_topic, offline, qos=1, retain=True)
                self._set_online(False)
                return
            except* aiomqtt.MqttError as group:
                self._set_online(False)
                error = group.exceptions[0]
                if outage_since is None:  # one count per outage, not per reconnect attempt
                    self.telemetry.publish_error("broker_unavailable")
                    outage_since = time.monotonic()
                    log.warning(
                        "sink[%s]: broker %s unavailable (%s); %d messages kept in the outbox, reconnecting",
                        self.name,
                        self.broker.describe(),
                        error,
                        len(self.outbox),
                    )
                else:
                    log.debug("sink[%s]: reconnect attempt %d failed: %s", self.name, backoff.attempt, error)
            await self._back_off(backoff.next_delay())

    async def _back_off(self, delay: float) -> None:
        """Wait ``delay`` s; a ``close()`` arriving meanwhile ends this one wait early.

        Once stopping, every wait is served in full: the outbox is retried at the policy's pace until
        ``close()``'s timeout cancels the loop (no tight loop against a broker that is down).
        """
        if self._stopping.is_set():
            await asyncio.sleep(delay)
            return
        try:
            async with asyncio.timeout(delay):
                await self._stopping.wait()
        except TimeoutError:
            pass

    def _set_online(self, online: bool) -> None:
        if online == self._online.is_set():
            return
        if online:
            self._online.set()
        else:
            self._online.clear()
        self.telemetry.broker_connected(online)

    async def _session(self, client: aiomqtt.Client) -> None:
        """Drain the outbox over one connection until stopping with nothing left; MqttError on loss."""
        async with asyncio.TaskGroup() as tg:
            watch = tg.create_task(self._watch(client), name=f"sink[{self.name}].watch")
            await self._drain(client, tg)
            watch.cancel()
        # the TaskGroup waited for every publish in flight (some may belong to messages dropped by
        # overflow meanwhile)

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        """Raise ``MqttError`` when the connection drops (the sink subscribes to nothing)."""
        async for _ in client.messages:
            pass

    async def _drain(self, client: aiomqtt.Client, tg: asyncio.TaskGroup) -> None:
        window = asyncio.Semaphore(self.config.max_inflight)
        sent: set[int] = set()  # sequence numbers sent on this connection, not yet acknowledged
        self._inflight = sent
        while True:
            await window.acquire()
            while True:
                self.outbox.changed.clear()
                item = self.outbox.next_unsent(sent)
                if item is not None:
                    break
                if self._stopping.is_set() and not self.outbox:
                    window.release()
                    return
                await self.outbox.changed.wait()
            seq, message = item
            sent.add(seq)
            tg.create_task(self._send(client, seq, message, sent, window), name=f"sink[{self.name}].send")

    async def _send(
        self,
        client: aiomqtt.Client,
        seq: int,
        message: OutgoingMessage,
        sent: set[int],
        window: asyncio.Semaphore,
    ) -> None:
        try:
            await client.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=message.retain,
                timeout=self.config.ack_timeout_s,
            )
        finally:
            window.release()
        sent.discard(seq)
        if self.outbox.ack(seq) is not None:
            self.telemetry.published(message.kind)
            if message.on_delivered is not None:
                try:
                    message.on_delivered()
                except Exception:  # a bug in the callback must not end the connection
                    log.exception("sink[%s]: delivery callback failed", self.name)
