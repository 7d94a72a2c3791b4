"""Frames that arrive as MQTT messages (aiomqtt, MQTT v5 unless the broker config says 3.1.1).

Payloads: raw JPEG/PNG bytes, or JSON with a base64 image, ``frame_id``, ``timestamp`` and
``parameters`` (bound to the workflow's ``$inputs.*`` for that frame); see ``worker.sources.decode``.
The payload size is checked on arrival, then parsing and decoding (header pixel check first) run in a
``BlockingPool`` thread, never on the event loop. A payload that fails is reported once through
``on_error`` (reason ``decode_error`` or ``oversize``), counted in ``frames_dropped_total``, and the
next message goes on.

Nothing silently lost (QoS 1, ``every_frame``):

- *Manual acknowledgement.* A QoS 1 message is acknowledged (PUBACK) only after its frame is in the
  ``FrameQueue`` (or after its error was reported). Under ``every_frame`` a full queue makes
  ``queue.put`` wait, so this source stops taking messages and stops acknowledging.
- *Flow control.* The CONNECT packet carries MQTT v5 ``Receive Maximum = receive_maximum``: the broker
  should send at most that many unacknowledged QoS 1 messages and keep the rest in the session. The
  client's incoming queue (``max_queued_incoming_messages``) holds twice that. Brokers do not always
  keep the limit (mosquitto 2.0.11 lets one more through per PUBACK; 3.1.1 has no such property), so
  the queue is guarded: when it is full it is *sealed* — it refuses every later message, so the ones
  it holds stay the oldest; refused QoS 1 messages stay unacknowledged; once the held ones are
  processed, the source reconnects at once (``"resync"``) and the persistent session redelivers the
  refused messages first, in order. Nothing is lost and order is kept; refused QoS 0 messages are
  lost and counted as ``frames_dropped_total{reason="mqtt_queue_full"}``.
- *Persistent session.* A stable client id, ``clean_start=False`` and a session expiry interval make
  the broker keep the subscription and queue QoS 1 frames while the worker is disconnected; they are
  delivered (with unacknowledged in-flight ones) after it reconnects. Delivery is at-least-once: a frame
  queued but not yet processed when the worker dies is not redelivered (it was acknowledged).
- *Redeliveries.* After a reconnect the broker may resend a message whose PUBACK it had not taken in
  yet. Across its own resync reconnects the source remembers its last ``4 x receive_maximum``
  acknowledged messages (packet id and payload digest); a resent one is acknowledged again and
  skipped, counted as ``frames_dropped_total{reason="mqtt_duplicate"}``, so a frame is not processed
  twice. After a lost connection that memory is cleared (the session, and its packet ids, may be
  new), so a resend there can still be processed twice, as QoS 1 allows.

aiomqtt 2.5 has no public switch for manual acknowledgement or Receive Maximum, so
``_configure_flow_control`` sets them on the client's paho client and CONNECT properties; it is the
only place that touches aiomqtt internals.

Shared subscription: with ``shared_group`` the source subscribes to ``$share/<group>/<topic>``, so
several workers in the group split one frame topic. Each instance needs its own client id (the default
adds the host name, i.e. the pod name). Under Kubernetes Deployments keep ``session_expiry_s`` short:
a departed pod's session can hold frames the broker assigned to it until the session expires.

The broker connection is retried around the ``async with`` with capped, jittered backoff
(``BrokerConfig.reconnect_min_s`` / ``reconnect_max_s``); every retry counts
``reconnects_total{target="broker:source"}``.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from typing import Any, Literal

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel, ConfigDict, Field

from worker.concurrency import BlockingPool
from worker.errors import FrameDecodeError
from worker.frame import Frame
from worker.ids import client_id_for, make_worker_id
from worker.messages import ErrorReport
from worker.mqtt import BrokerConfig, make_client
from worker.queues import FramePolicy, FrameQueue, QueueClosed
from worker.sources.base import Backoff, ErrorCallback
from worker.sources.decode import decode_image, parse_payload
from worker.sources.video import SOURCE_ID_PATTERN
from worker.telemetry import NullTelemetry, Telemetry

__all__ = ["MAX_PAYLOAD_BYTES_LIMIT", "MqttSource", "MqttSourceConfig"]

log = logging.getLogger(__name__)


class _QuietQueueFull(logging.Filter):
    """aiomqtt logs each message its full queue refuses; the sealed queue accounts for them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Message queue is full" not in record.getMessage()


#: the logger handed to aiomqtt/paho
_client_log = logging.getLogger(f"{__name__}.client")
_client_log.addFilter(_QuietQueueFull())

#: hard upper bound of ``max_payload_bytes`` (MQTT itself allows 256 MiB)
MAX_PAYLOAD_BYTES_LIMIT = 128 * 1024 * 1024


class MqttSourceConfig(BaseModel):
    """Frames from an MQTT topic. The broker comes from the pipeline's ``broker`` section."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["mqtt"] = "mqtt"
    id: str = Field(pattern=SOURCE_ID_PATTERN)
    topic: str = Field(min_length=1, pattern=r"^[^$].*", description="frames topic (wildcards allowed)")
    shared_group: str | None = Field(
        None, pattern=r"^[^/+#]+$", description="subscribe as $share/<group>/<topic>"
    )
    qos: Literal[0, 1] = 1
    policy: FramePolicy = "every_frame"
    queue_size: int = Field(8, ge=1, le=4096)
    max_payload_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=MAX_PAYLOAD_BYTES_LIMIT)
    max_image_pixels: int = Field(40_000_000, ge=1, le=500_000_000)
    client_id: str | None = Field(
        None, min_length=1, max_length=128, description="default: <worker id>-source-<id> (worker.ids)"
    )
    session_expiry_s: int = Field(600, ge=0, le=7 * 24 * 3600)
    receive_maximum: int = Field(16, ge=1, le=1024, description="unacknowledged QoS 1 frames in flight")

    @property
    def subscription(self) -> str:
        """The topic filter subscribed to (with the ``$share/<group>/`` prefix when shared)."""
        return f"$share/{self.shared_group}/{self.topic}" if self.shared_group else self.topic


class _Overflow:
    """Shared by one connection's incoming queue and its session loop."""

    def __init__(self) -> None:
        self.sealed = False
        self.held_back = 0


class _RecentMessages:
    """The last ``size`` QoS 1 messages this source queued and acknowledged, by packet id and digest.

    After a reconnect the broker can resend messages whose PUBACK it had not yet taken in (QoS 1 is
    at-least-once); a message with the same packet id and the same payload digest as one of the last
    few acknowledged ones is such a redelivery. Packet ids count up per session, so a new message
    does not reuse one of the last ``size`` ids before the 65535 ids wrap around. The memory is
    kept across the source's own "resync" reconnects (same session) and cleared after a lost
    connection: the broker may come back with a new session whose ids start again at 1.
    """

    def __init__(self, size: int) -> None:
        self._keys: collections.OrderedDict[tuple[int, int, bytes], None] = collections.OrderedDict()
        self._size = size

    @staticmethod
    def key(
        message: aiomqtt.Message, payload: bytes | bytearray, digest_limit: int
    ) -> tuple[int, int, bytes] | None:
        """``(packet id, length, digest)``; a payload over ``digest_limit`` bytes (refused unread)
        is not hashed, so an oversized message costs the event loop nothing."""
        if message.qos == 0:
            return None
        n = len(payload)
        digest = hashlib.blake2b(payload, digest_size=16).digest() if n <= digest_limit else b""
        return message.mid, n, digest

    def __contains__(self, key: tuple[int, int, bytes]) -> bool:
        return key in self._keys

    def clear(self) -> None:
        self._keys.clear()

    def add(self, key: tuple[int, int, bytes] | None) -> None:
        if key is None:
            return
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self._size:
            self._keys.popitem(last=False)


def _incoming_queue(
    telemetry: Telemetry, source_id: str, overflow: _Overflow
) -> type[asyncio.Queue[aiomqtt.Message]]:
    class IncomingQueue(asyncio.Queue[aiomqtt.Message]):
        """aiomqtt's incoming queue. Once full it is sealed: every later message is refused too (so
        the ones it holds stay the oldest), QoS 1 ones stay unacknowledged for redelivery, QoS 0
        ones are lost and counted."""

        def put_nowait(self, item: aiomqtt.Message) -> None:
            if not overflow.sealed:
                try:
                    super().put_nowait(item)
                    return
                except asyncio.QueueFull:
                    overflow.sealed = True
            if item.qos == 0:
                telemetry.frame_dropped(source_id, "mqtt_queue_full")
            else:
                overflow.held_back += 1
            raise asyncio.QueueFull

    return IncomingQueue


def _configure_flow_control(client: aiomqtt.Client, *, v5: bool, receive_maximum: int) -> None:
    """Manual PUBACKs, and (v5) Receive Maximum on CONNECT. aiomqtt 2.5 exposes neither."""
    client._client.manual_ack_set(True)
    if v5:
        properties = client._properties
        if properties is None:
            properties = Properties(PacketTypes.CONNECT)
            client._properties = properties
        properties.ReceiveMaximum = receive_maximum


def _decode(payload: bytes, max_bytes: int, max_pixels: int) -> tuple[Any, Any]:
    parsed = parse_payload(payload, max_bytes=max_bytes)
    try:
        return parsed, decode_image(parsed.image, max_pixels=max_pixels)
    except FrameDecodeError as exc:
        exc.frame_id = parsed.frame_id
        raise


class MqttSource:
    """Subscribes to a frames topic and puts each decoded frame into the source's queue."""

    def __init__(
        self,
        config: MqttSourceConfig,
        broker: BrokerConfig,
        *,
        telemetry: Telemetry | None = None,
        on_error: ErrorCallback | None = None,
        pipeline: str = "",
        decode_pool: BlockingPool | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.config = config
        self.broker = broker
        self.telemetry: Telemetry = telemetry or NullTelemetry()
        self.on_error = on_error
        self.pipeline = pipeline
        self._pool = decode_pool
        self._own_pool = decode_pool is None
        self._frame_number = 0
        self._recent = _RecentMessages(4 * config.receive_maximum)
        self._stop_requested = asyncio.Event()
        # worker.ids: the process's worker id (unique per process unless the user fixes it) + the role
        worker = worker_id or make_worker_id(pipeline or "segstream", prefix=broker.client_id)
        self.client_id = config.client_id or client_id_for(worker, "source", config.id)

    @property
    def source_id(self) -> str:
        return self.config.id

    async def stop(self) -> None:
        self._stop_requested.set()

    def _make_client(self, overflow: _Overflow) -> aiomqtt.Client:
        cfg = self.config
        client = make_client(
            self.broker,
            identifier=self.client_id,
            clean_start=False,
            session_expiry_s=cfg.session_expiry_s or None,
            max_queued_incoming_messages=2 * cfg.receive_maximum,
            queue_type=_incoming_queue(self.telemetry, cfg.id, overflow),
            logger=_client_log,
        )
        _configure_flow_control(client, v5=self.broker.protocol == "5", receive_maximum=cfg.receive_maximum)
        return client

    async def run(self, queue: FrameQueue) -> None:
        if self._pool is None:
            self._pool = BlockingPool(f"source[{self.source_id}].decode", 1)
        backoff = Backoff(self.broker.reconnect_min_s, self.broker.reconnect_max_s)
        stop_wait = asyncio.ensure_future(self._stop_requested.wait())
        try:
            while not self._stop_requested.is_set():
                await asyncio.wait({stop_wait}, timeout=backoff.pace())  # the attempt-rate floor
                if stop_wait.done():
                    return
                session = asyncio.ensure_future(self._session(queue, backoff))
                session.set_name(f"source[{self.source_id}].mqtt")
                done, _ = await asyncio.wait({session, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if session not in done:  # stop requested: leave the broker cleanly
                    session.cancel()
                    await asyncio.wait({session})
                    return
                outcome = session.result()
                if outcome == "closed":  # the queue was closed under us
                    return
                self.telemetry.reconnect("broker:source")
                if outcome == "lost":
                    # the broker may come back with a new session whose packet ids start again
                    self._recent.clear()
                    await asyncio.wait({stop_wait}, timeout=backoff.next_delay())
        finally:
            stop_wait.cancel()
            queue.close()
            self.telemetry.source_connected(self.source_id, False)
            if self._own_pool and self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None

    async def _session(self, queue: FrameQueue, backoff: Backoff) -> str:
        """One broker connection.

        Returns:
            ``"closed"``: the queue was closed, stop for good; ``"lost"``: the connection failed,
            reconnect after a backoff delay; ``"resync"``: the incoming queue overflowed, reconnect at
            once so the broker redelivers what was held back (in order: the session resends the
            unacknowledged messages first).
        """
        cfg = self.config
        overflow = _Overflow()
        try:
            async with self._make_client(overflow) as client:
                options = SubscribeOptions(qos=cfg.qos, retainHandling=1)
                if self.broker.protocol == "5":
                    granted = await client.subscribe(cfg.subscription, options=options)
                else:
                    granted = await client.subscribe(cfg.subscription, qos=cfg.qos)
                codes = [int(getattr(code, "value", code)) for code in granted]
                if any(code >= 0x80 for code in codes):
                    log.error("source %s: broker refused %s", self.source_id, cfg.subscription)
                    return "lost"
                self.telemetry.source_connected(self.source_id, True)
                backoff.reset()
                log.info(
                    "source %s: subscribed to %s as %s", self.source_id, cfg.subscription, self.client_id
                )
                async for message in client.messages:
                    if not await self._handle(client, message, queue):
                        return "closed"
                    if overflow.sealed and len(client.messages) == 0:
                        log.warning(
                            "source %s: the broker sent more than receive_maximum=%d frames; %d held "
                            "back unacknowledged; reconnecting for their redelivery",
                            self.source_id,
                            cfg.receive_maximum,
                            overflow.held_back,
                        )
                        return "resync"
        except aiomqtt.MqttError as exc:
            log.warning("source %s: broker connection lost (%s); reconnecting", self.source_id, exc)
        finally:
            self.telemetry.source_connected(self.source_id, False)
        return "lost"

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message, queue: FrameQueue) -> bool:
        """Decode one message and queue its frame; False if the queue is closed."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("MqttSource._handle outside run()")
        number = self._frame_number
        self._frame_number += 1
        self.telemetry.frame_received(self.source_id)
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode() if payload is not None else b""
        key = self._recent.key(message, payload, self.config.max_payload_bytes)
        if key is not None and key in self._recent:
            # a redelivery of a frame this source already queued and acknowledged
            self.telemetry.frame_dropped(self.source_id, "mqtt_duplicate")
            log.debug("source %s: message %d resent, already queued; skipped", self.source_id, message.mid)
            self._ack(client, message)
            return True
        try:
            limit = self.config.max_payload_bytes
            if len(payload) > limit:  # refused before it is copied to a thread
                raise FrameDecodeError(
                    f"payload of {len(payload)} bytes exceeds max_payload_bytes={limit}", reason="oversize"
                )
            parsed, image = await pool.run(
                _decode, bytes(payload), self.config.max_payload_bytes, self.config.max_image_pixels
            )
        except FrameDecodeError as exc:
            self._report(exc, number, str(message.topic))
            self._ack(client, message)
            self._recent.add(key)
            return True
        frame = Frame(
            source_id=self.source_id,
            frame_number=number,
            timestamp=parsed.timestamp if parsed.timestamp is not None else time.time(),
            image=image,
            frame_id=parsed.frame_id or "",
            parameters=parsed.parameters,
        )
        try:
            await queue.put(frame)
        except QueueClosed:
            return False
        self._ack(client, message)
        self._recent.add(key)
        return True

    @staticmethod
    def _ack(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        if message.qos > 0:
            client._client.ack(message.mid, message.qos)

    def _report(self, exc: FrameDecodeError, number: int, topic: str) -> None:
        self.telemetry.frame_dropped(self.source_id, exc.reason)
        log.warning(
            "source %s: frame %d on %s dropped: %s (%s)", self.source_id, number, topic, exc, exc.reason
        )
        if self.on_error is not None:
            self.on_error(
                ErrorReport(
                    pipeline=self.pipeline,
                    source_id=self.source_id,
                    reason=exc.reason,
                    message=f"{topic}: {exc}",
                    frame_id=exc.frame_id or f"{self.source_id}:{number}",
                    frame_number=number,
                )
            )
