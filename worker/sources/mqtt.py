"""Frames that arrive as MQTT messages (aiomqtt, MQTT v5 unless the broker config says 3.1.1).

Payloads: raw JPEG/PNG bytes, or JSON with a base64 image, ``frame_id``, ``timestamp`` and
``parameters`` (bound to the workflow's ``$inputs.*`` for that frame); see ``worker.sources.decode``.
The payload size is checked on arrival, then parsing and decoding (header pixel check first) run in a
``BlockingPool`` thread, never on the event loop. A payload that fails is reported once through
``on_error`` (reason ``decode_error`` or ``oversize``), counted in ``frames_dropped_total``,
acknowledged (it has been answered, with an error report, so it cannot come back at every restart),
and the next message goes on. The source task never ends because of one message: the project's
errors are reported as above, and any other exception on one message (a bug) is reported as
``internal_error`` for that message, logged with its traceback the first time, and the source goes on.

Memory bounds: one payload is at most ``max_payload_bytes``; one decoded image at most
``max_image_pixels`` and ``max_decoded_bytes`` (estimated from the header, before decoding); and all
the decoded images of this source that are still alive anywhere in the worker (queued, batched, in
inference, held by the preview) at most ``max_inflight_bytes``: before decoding the next payload the
source waits until that budget has room for a ``max_decoded_bytes`` image, so a flood of small
payloads that decode to big images (2.7 KB of PNG, 48 MB of pixels) is back-pressured, not buffered.
The budget is released when an image is freed (a ``weakref.finalize`` on the array). The broker side
is bounded by ``receive_maximum`` (unacknowledged messages in flight) x ``max_payload_bytes``.

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
- *Back-pressure without reconnecting.* Before it comes to that, the source stops reading the
  broker's socket when the incoming queue holds ``receive_maximum`` messages and reads again once it
  has drained below (``_ReadPause``): TCP flow control makes the broker keep the rest in the session,
  nothing is refused and no reconnect is needed. Against mosquitto 2.0.11, which ignores Receive
  Maximum, a slow consumer of 150 frames with ``receive_maximum: 4`` took 18 resync reconnects
  without it and none with it. Sealing and resync remain the last resort.
- *Persistent session.* A stable client id, ``clean_start=False`` and a session expiry interval make
  the broker keep the subscription and queue QoS 1 frames while the worker is disconnected; they are
  delivered (with unacknowledged in-flight ones) after it reconnects. Delivery is at-least-once: a frame
  queued but not yet processed when the worker dies is not redelivered (it was acknowledged).
- *Resync needs a reconnect.* MQTT forbids resending a PUBLISH on the same connection (v5
  [MQTT-4.4.0-1], 3.1.1 [MQTT-4.4.0-1]: only a reconnect with a resumed session resends), and paho
  has no call that asks for one, so a refused message can only come back through a reconnect. A
  resync is therefore still a reconnect, but it is *counted apart* from real connection losses:
  ``reconnects_total{target="broker:source:resync"}`` for resyncs, ``target="broker:source"`` only
  when the broker connection failed, so dashboards of broker health do not show flow control.
- *Redeliveries.* After a reconnect the broker may resend a message whose PUBACK it had not taken in
  yet. Across its own resync reconnects the source remembers its last ``4 x receive_maximum``
  acknowledged messages (packet id, length and payload digest); a resent one is acknowledged again and
  skipped, counted as ``frames_dropped_total{reason="mqtt_duplicate"}``, so a frame is not processed
  twice. The digest is computed in the decode thread, never on the event loop: for every message as
  part of decoding, and for an arriving message only when its packet id and length match a recent
  one. After a lost connection that memory is cleared (the session, and its packet ids, may be
  new), so a resend there can still be processed twice, as QoS 1 allows.

aiomqtt 2.5 has no public switch for manual acknowledgement or Receive Maximum, so
``_Paho`` sets them on the client's paho client and CONNECT properties; it is the
only place that touches aiomqtt internals.

Shared subscription: with ``shared_group`` the source subscribes to ``$share/<group>/<topic>``, so
several workers in the group split one frame topic. Each instance needs its own client id (the default
adds the host name, i.e. the pod name). Under Kubernetes Deployments keep ``session_expiry_s`` short:
a departed pod's session can hold frames the broker assigned to it until the session expires.

The broker connection is retried around the ``async with`` with capped, jittered backoff
(``BrokerConfig.reconnect_min_s`` / ``reconnect_max_s``); every retry after a lost connection counts
``reconnects_total{target="broker:source"}``, every resync ``target="broker:source:resync"``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import hashlib
import logging
import os
import re
import string
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.concurrency import BlockingPool
from worker.errors import FrameDecodeError
from worker.frame import Frame
from worker.ids import WORKER_ID_ENV, client_id_for, make_worker_id
from worker.messages import ErrorReport
from worker.mqtt import BrokerConfig, make_client
from worker.queues import FramePolicy, FrameQueue, QueueClosed
from worker.sources.base import Backoff, ErrorCallback
from worker.sources.decode import DEFAULT_MAX_DECODED_BYTES, FramePayload, decode_payload
from worker.sources.video import SOURCE_ID_PATTERN
from worker.telemetry import NullTelemetry, Telemetry

if TYPE_CHECKING:
    from worker.stations import StationInputs

__all__ = ["MAX_PAYLOAD_BYTES_LIMIT", "RESYNC_TARGET", "MqttSource", "MqttSourceConfig"]

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
#: the reconnect target a resync counts under (real connection losses count as ``broker:source``)
RESYNC_TARGET = "broker:source:resync"
#: reason of an error report for an exception that is not one of the project's (a bug)
INTERNAL_ERROR: Final = "internal_error"
#: reason of a frame refused because its station is not allowed (not listed, over max_stations, bad id)
UNKNOWN_STATION: Final = "unknown_station"
#: a stop's drain may take this much longer than ``drain_timeout_s``: unsubscribing, the last DISCONNECT
_LEAVE_S = 1.5
#: a leaving shared-group member, unsubscribed with every frame answered, waits this long for messages
#: its session still held before it ends the session
_QUIET_S = 0.5
#: session expiry of a source whose session someone can resume (a stable client id, or not shared)
DEFAULT_SESSION_EXPIRY_S = 600

#: what a source calls to have an error report delivered, then ``ack`` called (``Publisher.report_soon``)
DeliverError = Callable[[ErrorReport, Callable[[], None] | None], None]


class _StationTemplate:
    """``source_id: "{topic[3]}"``: a station id made of topic levels (and literal text)."""

    _FIELD = re.compile(r"topic\[(\d{1,3})\]")

    def __init__(self, template: str) -> None:
        self.template = template
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"source_id {template!r}: {exc}") from exc
        fields = 0
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if not self._FIELD.fullmatch(name) or spec or conversion:
                raise ValueError(
                    f"source_id {template!r}: only {{topic[N]}} placeholders (topic level N, from 0) allowed"
                )
            fields += 1
        if not fields:
            raise ValueError(f"source_id {template!r}: needs a {{topic[N]}} placeholder")

    def station(self, topic: str) -> str | None:
        """The station id of a frame on ``topic``, or None when the topic has no such level or the id
        is not a valid source id."""
        try:
            value = self.template.format(topic=topic.split("/"))
        except (IndexError, ValueError):
            return None
        return value if re.fullmatch(SOURCE_ID_PATTERN, value) else None


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
    max_image_pixels: int = Field(20_000_000, ge=1, le=500_000_000)
    max_decoded_bytes: int = Field(
        DEFAULT_MAX_DECODED_BYTES,
        ge=1024,
        le=4 * 1024**3,
        description="most bytes one image may take once decoded (estimated from its header)",
    )
    max_inflight_bytes: int = Field(
        256 * 1024 * 1024,
        ge=2048,
        le=64 * 1024**3,
        description="decoded images of this source alive in the worker at once (bytes); >= 2 x "
        "max_decoded_bytes",
    )
    source_id: str | None = Field(
        None,
        max_length=200,
        description='per-frame source id from the topic, e.g. "{topic[3]}" for factory/line/frames/+ '
        "(levels counted from 0); default: id",
    )
    stations: list[str] | None = Field(
        None, min_length=1, max_length=4096, description="with source_id: the only station ids accepted"
    )
    max_stations: int = Field(
        64, ge=1, le=4096, description="with source_id and no stations list: most distinct station ids"
    )
    client_id: str | None = Field(
        None, min_length=1, max_length=128, description="default: <worker id>-source-<id> (worker.ids)"
    )
    session_expiry_s: int | None = Field(
        None,
        ge=0,
        le=7 * 24 * 3600,
        description="default: 0 for a shared_group member whose client id is generated (nobody can "
        "resume its session), else 600",
    )
    receive_maximum: int = Field(16, ge=1, le=1024, description="unacknowledged QoS 1 frames in flight")

    @model_validator(mode="after")
    def _budget_holds_two_images(self) -> MqttSourceConfig:
        if self.max_inflight_bytes < 2 * self.max_decoded_bytes:
            raise ValueError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) must be at least 2 x max_decoded_bytes "
                f"({self.max_decoded_bytes}): one image held downstream, one being decoded"
            )
        return self

    @field_validator("source_id")
    @classmethod
    def _check_source_id(cls, value: str | None) -> str | None:
        if value is not None:
            _StationTemplate(value)
        return value

    @field_validator("stations")
    @classmethod
    def _check_stations(cls, value: list[str] | None) -> list[str] | None:
        for station in value or ():
            if not re.fullmatch(SOURCE_ID_PATTERN, station):
                raise ValueError(f"station {station!r} is not a valid source id ({SOURCE_ID_PATTERN})")
        return value

    def resolved_session_expiry_s(self, stable_id: bool) -> int:
        """The session expiry used: the configured one, else 0 for a shared-group member without a
        stable client id (a session nobody resumes would strand the frames the broker queues for it),
        else 600."""
        if self.session_expiry_s is not None:
            return self.session_expiry_s
        return 0 if self.shared_group and not stable_id else DEFAULT_SESSION_EXPIRY_S

    @property
    def subscription(self) -> str:
        """The topic filter subscribed to (with the ``$share/<group>/`` prefix when shared)."""
        return f"$share/{self.shared_group}/{self.topic}" if self.shared_group else self.topic


class _Overflow:
    """Shared by one connection's incoming queue and its session loop."""

    def __init__(self) -> None:
        self.sealed = False
        self.held_back = 0
        #: set once connected: stops reading the socket at the high-water mark (see ``_ReadPause``)
        self.reader: _ReadPause | None = None


class _ReadPause:
    """Back-pressure through TCP: stop reading the broker's socket while the incoming queue is at its
    high-water mark, read again once it has drained below it.

    Brokers do not always keep the Receive Maximum (mosquitto 2.0.11 sends far more unacknowledged
    messages than asked, whatever its ``max_inflight_messages``), and MQTT has no way to get a refused
    message back without reconnecting. Not reading makes the broker keep the rest in its session
    queue instead, so the incoming queue rarely overflows and a resync (a reconnect) is the last
    resort, not the flow control. While paused nothing is read, PINGRESP included: a pause longer than
    the keepalive ends in a lost connection (reconnect with backoff), so the queue's frames must be
    processed within it.

    aiomqtt 2.5 registers its own reader on the socket and has no pause; this class removes it and
    puts back an equivalent one (``loop_read`` until the TLS buffer is empty; an exception ends the
    connection the way aiomqtt's does). Like ``_Paho``, it touches aiomqtt internals.
    """

    def __init__(self, client: aiomqtt.Client, on_pause: Callable[[], None]) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = None
        self._on_pause = on_pause
        self.paused = False

    def pause(self) -> None:
        if self.paused:
            return
        sock = self._client._client.socket()
        if sock is None:
            return
        self._fd = sock.fileno()
        self._loop.remove_reader(self._fd)
        self.paused = True
        self._on_pause()

    def resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        sock = self._client._client.socket()
        if sock is None or sock.fileno() != self._fd:  # the connection is gone meanwhile
            return
        self._loop.add_reader(self._fd, self._read)

    def _read(self) -> None:
        paho = self._client._client
        try:
            while True:
                paho.loop_read()
                sock = paho.socket()
                if sock is not None and hasattr(sock, "pending") and sock.pending() > 0:
                    continue
                break
        except Exception as exc:  # as aiomqtt's reader: a broken connection ends the session
            disconnected = self._client._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)


class _RecentMessages:
    """The last ``size`` QoS 1 messages this source queued and acknowledged: packet id and length,
    with the payload's digest.

    After a reconnect the broker can resend messages whose PUBACK it had not yet taken in (QoS 1 is
    at-least-once); a message with the same packet id, length and payload digest as one of the last
    few acknowledged ones is such a redelivery. Packet ids count up per session, so a new message
    does not reuse one of the last ``size`` ids before the 65535 ids wrap around. The memory is
    kept across the source's own "resync" reconnects (same session) and cleared after a lost
    connection: the broker may come back with a new session whose ids start again at 1.

    Nothing here hashes: digests come from the decode thread (:func:`_digest`), and an arriving
    message needs one only when :meth:`candidate` says its id and length match a recent message.
    """

    def __init__(self, size: int) -> None:
        self._digests: collections.OrderedDict[tuple[int, int], tuple[bytes, _Ack | None]] = (
            collections.OrderedDict()
        )
        self._size = size

    @staticmethod
    def key(message: aiomqtt.Message, payload: bytes | bytearray) -> tuple[int, int] | None:
        """``(packet id, length)``, or None for QoS 0 (never resent)."""
        if message.qos == 0:
            return None
        return message.mid, len(payload)

    def candidate(self, key: tuple[int, int] | None) -> tuple[bytes, _Ack | None] | None:
        """The digest (and pending ack) of the recent message with this id and length, or None (not a
        redelivery)."""
        return None if key is None else self._digests.get(key)

    def clear(self) -> None:
        self._digests.clear()

    def add(self, key: tuple[int, int] | None, digest: bytes, ack: _Ack | None) -> None:
        if key is None:
            return
        self._digests[key] = (digest, ack)
        self._digests.move_to_end(key)
        while len(self._digests) > self._size:
            self._digests.popitem(last=False)


def _digest(payload: bytes) -> bytes:
    """The payload digest duplicate detection compares (run in the decode thread)."""
    return hashlib.blake2b(payload, digest_size=16).digest()


#: the digest of a payload that was refused unread (over ``max_payload_bytes``): never hashed
_UNREAD = b""


class _InflightBudget:
    """Bytes of this source's decoded images still alive anywhere in the worker.

    ``admit`` waits until an image of ``need`` bytes fits; ``hold`` charges a decoded image and
    releases it when the array is freed (``weakref.finalize``, which may run on any thread).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()
        self._freed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        #: True while ``admit`` waits for room
        self.waiting = False
        #: how many payloads had to wait for room (back-pressure from the rest of the worker)
        self.waits = 0

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def hold(self, image: Any) -> None:
        nbytes = int(image.nbytes)
        with self._lock:
            self._used += nbytes
        weakref.finalize(image, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes
        # a closed loop (interpreter shutdown): nobody waits any more
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._freed.set)

    async def admit(self, need: int, pool: BlockingPool) -> None:
        waited = 0
        if self.used + need > self.limit:
            self.waits += 1
        try:
            while self.used + need > self.limit:
                self.waiting = True
                self._freed.clear()
                if self.used + need <= self.limit:  # freed between the check and the clear
                    break
                try:
                    await asyncio.wait_for(self._freed.wait(), 1.0)
                except TimeoutError:
                    waited += 1
                    if waited % 2 == 0:
                        # images kept alive only by reference cycles (an exception's traceback holding
                        # its batch) are freed by the cyclic collector; do not wait for it by chance
                        await pool.run(gc.collect)
        finally:
            self.waiting = False


@dataclass(slots=True)
class _Decoded:
    """What the decode thread hands back for one payload."""

    digest: bytes
    parsed: FramePayload | None = None
    image: Any = None
    error: FrameDecodeError | None = None


def _incoming_queue(
    telemetry: Telemetry, source_id: str, overflow: _Overflow, high_water: int
) -> type[asyncio.Queue[aiomqtt.Message]]:
    class IncomingQueue(asyncio.Queue[aiomqtt.Message]):
        """aiomqtt's incoming queue. At ``high_water`` messages the socket stops being read
        (``_ReadPause``). Once full anyway it is sealed: every later message is refused too (so the
        ones it holds stay the oldest), QoS 1 ones stay unacknowledged for redelivery, QoS 0 ones are
        lost and counted."""

        def put_nowait(self, item: aiomqtt.Message) -> None:
            if not overflow.sealed:
                try:
                    super().put_nowait(item)
                    if self.qsize() >= high_water and overflow.reader is not None:
                        overflow.reader.pause()
                    return
                except asyncio.QueueFull:
                    overflow.sealed = True
            if item.qos == 0:
                telemetry.frame_received(source_id)  # received and lost: the identity stays whole
                telemetry.frame_dropped(source_id, "mqtt_queue_full")
            else:
                overflow.held_back += 1
            raise asyncio.QueueFull

    return IncomingQueue


class _Paho:
    """The one adapter to what aiomqtt 2.5 does not expose of its paho client (manual PUBACKs, Receive
    Maximum on CONNECT, DISCONNECT with a Session Expiry Interval). ``_ReadPause`` is the only other
    code that touches aiomqtt internals. paho-mqtt 2.x supports all of it; aiomqtt keeps its paho client
    in ``Client._client`` and its CONNECT properties in ``Client._properties``.
    """

    @staticmethod
    def configure(client: aiomqtt.Client, *, v5: bool, receive_maximum: int) -> None:
        """Manual PUBACKs, and (v5) Receive Maximum on CONNECT."""
        client._client.manual_ack_set(True)
        if v5:
            properties = client._properties
            if properties is None:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                client._properties = properties
            properties.ReceiveMaximum = receive_maximum

    @staticmethod
    def ack(client: aiomqtt.Client, mid: int, qos: int) -> None:
        """Send the PUBACK of message ``mid`` (on the connection it came on)."""
        client._client.ack(mid, qos)

    @staticmethod
    async def end_session(client: aiomqtt.Client, timeout: float) -> None:  # noqa: ASYNC109
        """Disconnect with Session Expiry Interval 0 (MQTT v5 DISCONNECT property): the broker drops
        the session at once and queues nothing more for this client id. aiomqtt's ``__aexit__`` then
        sees the connection closed and returns."""
        properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        if client._client.disconnect(properties=properties) == 0:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(client._disconnected), timeout)


class _Ack:
    """The acknowledgement of one QoS 1 message, called once its frame's outcome was delivered.

    It acknowledges on the connection the message came on (``client``); after that connection is gone
    the broker delivers the message again (the session resends it), so a late call does nothing. A
    redelivery that the source recognises moves the ack to the new connection (``retarget``).
    """

    __slots__ = ("client", "delivered", "mid", "qos", "source")

    def __init__(self, source: MqttSource, client: aiomqtt.Client, mid: int, qos: int) -> None:
        self.source = source
        self.client = client
        self.mid = mid
        self.qos = qos
        self.delivered = False

    def retarget(self, client: aiomqtt.Client, mid: int) -> None:
        self.client, self.mid = client, mid

    def __call__(self) -> None:
        if self.delivered:
            return
        self.delivered = True
        self.source._acknowledged(self)


def _decode(payload: bytes, max_bytes: int, max_pixels: int, max_decoded_bytes: int) -> _Decoded:
    """Digest, parse and decode one payload (in the decode thread); a ``FrameDecodeError`` is
    returned in the result (with the sender's ``frame_id`` when it was read), never raised."""
    decoded = _Decoded(digest=_digest(payload))
    try:
        decoded.parsed, decoded.image = decode_payload(
            payload, max_bytes=max_bytes, max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes
        )
    except FrameDecodeError as exc:
        # without its traceback: that holds this frame, whose ``decoded`` holds the error (a cycle
        # that would keep the payload alive until the cyclic collector runs)
        decoded.error = exc.with_traceback(None)
    return decoded


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
        deliver_error: DeliverError | None = None,
        drain_timeout_s: float = 30.0,
        station_inputs: StationInputs | None = None,
    ) -> None:
        self.config = config
        #: per-station inputs from the control topic, put under each frame's own parameters
        self.station_inputs = station_inputs
        #: at a stop, how long to wait for the outcomes of the frames already taken (the runtime's
        #: ``shutdown_grace_s`` bounds it too); what is unacknowledged then comes back from the broker
        self.drain_timeout_s = drain_timeout_s
        self.broker = broker
        self.telemetry: Telemetry = telemetry or NullTelemetry()
        self.on_error = on_error
        #: when set, error reports go here with their ack (called once the report was delivered)
        self.deliver_error = deliver_error
        self.pipeline = pipeline
        self._pool = decode_pool
        self._own_pool = decode_pool is None
        self._frame_number = 0
        self._recent = _RecentMessages(4 * config.receive_maximum)
        self._budget: _InflightBudget | None = None
        #: exception types already logged with a traceback (later ones get one line each)
        self._unexpected_seen: set[str] = set()
        #: times the broker's socket stopped being read because the incoming queue was at its mark
        self.read_pauses = 0
        self._stop_requested = asyncio.Event()
        # worker.ids: the process's worker id (unique per process unless the user fixes it) + the role
        worker = worker_id or make_worker_id(pipeline or "segstream", prefix=broker.client_id)
        self.client_id = config.client_id or client_id_for(worker, "source", config.id)
        stable = config.client_id is not None or bool(os.environ.get(WORKER_ID_ENV))
        self.session_expiry_s = config.resolved_session_expiry_s(stable)
        self._station = _StationTemplate(config.source_id) if config.source_id else None
        self._allowed = frozenset(config.stations) if config.stations else None
        self._stations: set[str] = set()
        #: the connection acks go to (None between connections)
        self._client: aiomqtt.Client | None = None
        #: acks of frames queued or reported and not yet delivered
        self._pending: set[_Ack] = set()
        self._acked = asyncio.Event()
        #: True once the session reads messages (a stop then drains instead of cancelling)
        self._reading = False
        self._drain_deadline = 0.0

    @property
    def source_id(self) -> str:
        return self.config.id

    @property
    def pending_acks(self) -> int:
        """QoS 1 frames taken from the broker whose outcome is not yet delivered."""
        return len(self._pending)

    @property
    def stations(self) -> frozenset[str]:
        """The station ids seen so far (``source_id`` from the topic)."""
        return frozenset(self._stations)

    async def stop(self) -> None:
        if not self._stop_requested.is_set():
            self._drain_deadline = asyncio.get_running_loop().time() + self.drain_timeout_s
        self._stop_requested.set()

    def _make_client(self, overflow: _Overflow) -> aiomqtt.Client:
        cfg = self.config
        client = make_client(
            self.broker,
            identifier=self.client_id,
            clean_start=False,
            session_expiry_s=self.session_expiry_s or None,
            max_queued_incoming_messages=2 * cfg.receive_maximum,
            queue_type=_incoming_queue(self.telemetry, cfg.id, overflow, high_water=cfg.receive_maximum),
            logger=_client_log,
        )
        _Paho.configure(client, v5=self.broker.protocol == "5", receive_maximum=cfg.receive_maximum)
        return client

    async def run(self, queue: FrameQueue) -> None:
        if self._pool is None:
            self._pool = BlockingPool(f"source[{self.source_id}].decode", 1)
        self._budget = _InflightBudget(self.config.max_inflight_bytes)
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
                if session not in done:
                    if self._reading:  # connected: the session drains and leaves (see _leave)
                        await asyncio.wait({session}, timeout=self.drain_timeout_s + _LEAVE_S)
                    # still connecting (nothing taken yet), or the drain overran: what is
                    # unacknowledged comes back from the broker
                    while not session.done():
                        session.cancel()
                        await asyncio.wait({session}, timeout=1.0)
                    return
                outcome = session.result()
                if outcome == "closed":  # the queue was closed under us
                    return
                self.telemetry.reconnect(RESYNC_TARGET if outcome == "resync" else "broker:source")
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
            ``"closed"``: the queue was closed or a stop was served, stop for good; ``"lost"``: the
            connection failed, reconnect after a backoff delay; ``"resync"``: the incoming queue
            overflowed, reconnect at once so the broker redelivers what was held back (in order: the
            session resends the unacknowledged messages first).
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
                codes = [code.value if isinstance(code, ReasonCode) else int(code) for code in granted]
                if any(code >= 0x80 for code in codes):
                    log.error("source %s: broker refused %s", self.source_id, cfg.subscription)
                    return "lost"
                self.telemetry.source_connected(self.source_id, True)
                backoff.reset()
                log.info(
                    "source %s: subscribed to %s as %s (session expiry %d s)",
                    self.source_id,
                    cfg.subscription,
                    self.client_id,
                    self.session_expiry_s,
                )
                overflow.reader = reader = _ReadPause(client, self._count_read_pause)
                self._client = client
                self._reading = True
                try:
                    return await self._read(client, queue, overflow, reader)
                finally:
                    self._reading = False
                    self._client = None
        except aiomqtt.MqttError as exc:
            log.warning("source %s: broker connection lost (%s); reconnecting", self.source_id, exc)
        finally:
            self.telemetry.source_connected(self.source_id, False)
        return "lost"

    async def _read(
        self, client: aiomqtt.Client, queue: FrameQueue, overflow: _Overflow, reader: _ReadPause
    ) -> str:
        """Handle messages until the connection ends (MqttError), a resync, or a stop (``_leave``)."""
        cfg = self.config
        messages = client.messages
        stop: asyncio.Future[Any] = asyncio.ensure_future(self._stop_requested.wait())
        get: asyncio.Future[Any] | None = None
        try:
            while True:
                if get is None:
                    get = asyncio.ensure_future(anext(messages))
                done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    return await self._leave(client, queue, get, reader)
                message, get = get.result(), None
                if not await self._handle(client, message, queue):
                    return "closed"
                if reader.paused and not overflow.sealed and len(messages) < cfg.receive_maximum:
                    reader.resume()
                if overflow.sealed and len(messages) == 0:
                    log.warning(
                        "source %s: the broker sent more than receive_maximum=%d frames; %d held "
                        "back unacknowledged; reconnecting for their redelivery",
                        self.source_id,
                        cfg.receive_maximum,
                        overflow.held_back,
                    )
                    return "resync"
        finally:
            stop.cancel()
            if get is not None and not get.done():
                get.cancel()

    async def _leave(
        self,
        client: aiomqtt.Client,
        queue: FrameQueue,
        get: asyncio.Future[Any],
        reader: _ReadPause,
    ) -> str:
        """A graceful stop while connected.

        A shared-group member unsubscribes first (the broker sends its share to the others from now
        on), handles every message it was already sent, waits until the outcome of each of its frames
        was delivered and acknowledged, then disconnects with Session Expiry Interval 0: nothing is
        left queued for it at the broker. Any other source stops taking messages (those already sent
        stay unacknowledged in its persistent session, for the next run), waits for its frames'
        outcomes and acknowledgements the same way, and disconnects keeping its session. The runtime
        bounds all of it by ``shutdown_grace_s`` (cancelling the source at the deadline: what is
        unacknowledged then is delivered again, at least once).
        """
        cfg = self.config
        if cfg.shared_group:
            if not await self._drain_shared(client, queue, get, reader):
                return "closed"
        elif get.done() and not get.cancelled() and get.exception() is None:
            # taken from the queue just before the stop: handled like the others
            if not await self._handle(client, get.result(), queue):
                return "closed"
        else:
            get.cancel()
        await self._wait_delivered(client)
        if cfg.shared_group and self.broker.protocol == "5":
            await _Paho.end_session(client, _LEAVE_S / 2)
            log.info(
                "source %s: session ended (expiry 0): nothing is queued for %s",
                self.source_id,
                self.client_id,
            )
        return "closed"

    async def _drain_shared(
        self,
        client: aiomqtt.Client,
        queue: FrameQueue,
        get: asyncio.Future[Any],
        reader: _ReadPause,
    ) -> bool:
        """A shared-group member's stop (see ``_leave``): unsubscribe, handle what was already sent,
        until none came for a while; False if the queue was closed."""
        cfg = self.config
        log.info("source %s: stopping: unsubscribing from %s, draining", self.source_id, cfg.subscription)
        unsubscribe = asyncio.ensure_future(client.unsubscribe(cfg.subscription))
        acked: asyncio.Future[Any] | None = None
        try:
            while True:
                waitables: set[asyncio.Future[Any]] = {get}
                quiet: float | None = None
                if not unsubscribe.done():
                    waitables.add(unsubscribe)
                else:
                    unsubscribe.result()  # MqttError: the connection is gone; its frames come back
                    acked, quiet = self._drain_wait(client, acked)
                    if quiet is None and acked is not None:  # frames still unanswered: wait for acks
                        waitables.add(acked)
                done, _ = await asyncio.wait(waitables, timeout=quiet, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    if not await self._handle(client, get.result(), queue):
                        return False
                    get = asyncio.ensure_future(anext(client.messages))
                    if reader.paused and len(client.messages) < cfg.receive_maximum:
                        reader.resume()  # the UNSUBACK must be read too
                elif not done:
                    break
        finally:
            if not unsubscribe.done():
                unsubscribe.cancel()
            if acked is not None:
                acked.cancel()
        get.cancel()
        return True

    def _drain_wait(
        self, client: aiomqtt.Client, acked: asyncio.Future[Any] | None
    ) -> tuple[asyncio.Future[Any] | None, float | None]:
        """What a draining shared-group member waits on once unsubscribed: ``(acked, None)`` while its
        frames are unanswered (``acked`` fires on the next ack), else ``(acked, quiet period)``."""
        if any(ack.client is client for ack in self._pending):
            if acked is None or acked.done():
                self._acked.clear()
                acked = asyncio.ensure_future(self._acked.wait())
            return acked, None
        # messages the session had queued for us keep coming as acks free the broker's in-flight
        # window: leave once none came for a while
        return acked, _QUIET_S

    async def _wait_delivered(self, client: aiomqtt.Client) -> None:
        """Until every frame taken on ``client`` had its outcome delivered and acknowledged (at most
        ``drain_timeout_s``)."""
        try:
            async with asyncio.timeout_at(self._drain_deadline):
                while any(ack.client is client for ack in self._pending):
                    self._acked.clear()
                    await self._acked.wait()
        except TimeoutError:
            left = sum(ack.client is client for ack in self._pending)
            log.warning(
                "source %s: %d frames still unanswered after %.1f s; leaving them unacknowledged "
                "(the broker delivers them again)",
                self.source_id,
                left,
                self.drain_timeout_s,
            )

    def _acknowledged(self, ack: _Ack) -> None:
        """An ``_Ack`` was called: PUBACK on its connection if that is still the current one."""
        self._pending.discard(ack)
        self._acked.set()
        if ack.client is self._client:
            try:
                _Paho.ack(ack.client, ack.mid, ack.qos)
            except Exception:  # the connection broke meanwhile: the broker resends it
                log.debug("source %s: ack of message %d failed", self.source_id, ack.mid, exc_info=True)

    def _count_read_pause(self) -> None:
        self.read_pauses += 1

    @property
    def inflight_bytes(self) -> int:
        """Bytes of this source's decoded images alive in the worker now."""
        return self._budget.used if self._budget is not None else 0

    def _new_ack(self, client: aiomqtt.Client, message: aiomqtt.Message) -> _Ack | None:
        if message.qos == 0:
            return None
        ack = _Ack(self, client, message.mid, message.qos)
        self._pending.add(ack)
        return ack

    def _station_of(self, topic: str) -> tuple[str | None, str]:
        """``(station id, why not)``: the frame's source id from its topic (None: refused)."""
        if self._station is None:
            return self.source_id, ""
        station = self._station.station(topic)
        if station is None:
            return None, f"topic {topic!r} gives no valid station id from {self._station.template!r}"
        if self._allowed is not None:
            if station not in self._allowed:
                return None, f"station {station!r} (topic {topic!r}) is not in stations"
        elif station not in self._stations and len(self._stations) >= self.config.max_stations:
            return None, (
                f"station {station!r} (topic {topic!r}) would exceed max_stations={self.config.max_stations}"
            )
        self._stations.add(station)
        return station, ""

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message, queue: FrameQueue) -> bool:
        """Decode one message and queue its frame; False if the queue is closed.

        Never raises for a problem of this one message (cancellation and a closed queue aside): it
        is reported (acknowledged once the report was delivered), and the next message goes on.
        """
        pool, budget = self._pool, self._budget
        if pool is None or budget is None:
            raise RuntimeError("MqttSource._handle outside run()")
        number = self._frame_number
        self._frame_number += 1
        topic = str(message.topic)
        station, refusal = self._station_of(topic)
        label = station or self.source_id
        self.telemetry.frame_received(label)
        try:
            payload = _payload_of(message)
            key = self._recent.key(message, payload)
            oversize = len(payload) > self.config.max_payload_bytes
            if await self._skip_resent(client, message, payload, key, oversize, label, pool):
                return True
            if station is None or oversize:
                self._refuse(
                    refusal if station is None else None,
                    len(payload),
                    number,
                    topic,
                    label,
                    client,
                    message,
                    key,
                )
                return True
            await budget.admit(self.config.max_decoded_bytes, pool)
            decoded = await pool.run(
                _decode,
                bytes(payload),
                self.config.max_payload_bytes,
                self.config.max_image_pixels,
                self.config.max_decoded_bytes,
            )
            if decoded.error is not None or decoded.parsed is None:
                error = decoded.error or FrameDecodeError("payload not decoded")
                ack = self._report(error, number, topic, label, client, message, decoded.digest)
                self._recent.add(key, decoded.digest, ack)
                return True
            digest = decoded.digest
            ack = self._new_ack(client, message)
            frame = self._frame(station, number, topic, decoded.parsed, decoded.image, digest, ack)
            budget.hold(decoded.image)
            del decoded
        except Exception as exc:  # a bug on one message must not stop the source (see the module doc)
            self._report_unexpected(exc, number, topic, label, client, message)
            return True
        try:
            await queue.put(frame)
        except QueueClosed:
            if ack is not None:  # never acknowledged: the broker delivers it again
                self._pending.discard(ack)
                self._acked.set()
            return False
        self._recent.add(key, digest, ack)
        return True

    async def _skip_resent(
        self,
        client: aiomqtt.Client,
        message: aiomqtt.Message,
        payload: bytes | bytearray,
        key: tuple[int, int] | None,
        oversize: bool,
        label: str,
        pool: BlockingPool,
    ) -> bool:
        """True (and acknowledged, or its ack retargeted) if ``message`` is a redelivery of a message
        this source already queued (or answered)."""
        recent = self._recent.candidate(key)
        if recent is None:
            return False
        digest = _UNREAD if oversize else await pool.run(_digest, bytes(payload))
        if digest != recent[0]:
            return False
        self.telemetry.frame_dropped(label, "mqtt_duplicate")
        log.debug("source %s: message %d resent, already queued; skipped", label, message.mid)
        earlier = recent[1]
        if earlier is None or earlier.delivered:
            self._ack_now(client, message)
        else:  # still on its way: its ack goes to this connection when it is delivered
            earlier.retarget(client, message.mid)
        return True

    def _refuse(
        self,
        refusal: str | None,
        size: int,
        number: int,
        topic: str,
        label: str,
        client: aiomqtt.Client,
        message: aiomqtt.Message,
        key: tuple[int, int] | None,
    ) -> None:
        """Report a message refused unread: its topic gives no station (``refusal``), or (None) it
        is oversize (refused before it is copied to a thread or hashed)."""
        if refusal is not None:
            self._report(
                FrameDecodeError(refusal, reason=UNKNOWN_STATION), number, topic, label, client, message
            )
            self._recent.add(key, _UNREAD, None)
            return
        limit = self.config.max_payload_bytes
        ack = self._report(
            FrameDecodeError(f"payload of {size} bytes exceeds max_payload_bytes={limit}", reason="oversize"),
            number,
            topic,
            label,
            client,
            message,
        )
        self._recent.add(key, _UNREAD, ack)

    def _frame(
        self,
        station: str,
        number: int,
        topic: str,
        parsed: FramePayload,
        image: Any,
        digest: bytes,
        ack: _Ack | None,
    ) -> Frame:
        """The queued frame of a decoded message."""
        return Frame(
            source_id=station,
            frame_number=number,
            timestamp=parsed.timestamp if parsed.timestamp is not None else time.time(),
            image=image,
            frame_id=parsed.frame_id or "",
            parameters=self._parameters(station, parsed.parameters),
            topic=topic,
            idempotency_key=_idempotency_key(station, parsed.frame_id, digest),
            ack=ack,
        )

    def _parameters(self, station: str, own: dict[str, Any]) -> dict[str, Any]:
        """The frame's parameters: its own over its station's inputs (``worker.stations``)."""
        if self.station_inputs is None or self._station is None:
            return own
        set_for_station = self.station_inputs.get(station)
        return {**set_for_station, **own} if set_for_station else own

    @staticmethod
    def _ack_now(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        if message.qos > 0:
            _Paho.ack(client, message.mid, message.qos)

    def _report(
        self,
        exc: FrameDecodeError,
        number: int,
        topic: str,
        label: str,
        client: aiomqtt.Client,
        message: aiomqtt.Message,
        digest: bytes | None = None,
    ) -> _Ack | None:
        """Count, log and report one refused payload; its ack is called once the report was delivered."""
        self.telemetry.frame_dropped(label, exc.reason)
        frame_id = exc.frame_id or f"{label}:{number}"
        log.warning(
            "source %s: frame %d (%s) on %s dropped: %s (%s)",
            label,
            number,
            frame_id,
            topic,
            exc,
            exc.reason,
            extra={"source": label, "frame_id": frame_id},
        )
        key = _idempotency_key(label, exc.frame_id, digest)
        return self._send_report(
            exc.reason, f"{topic}: {exc}", frame_id, number, topic, label, key, client, message
        )

    def _report_unexpected(
        self,
        exc: Exception,
        number: int,
        topic: str,
        label: str,
        client: aiomqtt.Client,
        message: aiomqtt.Message,
    ) -> None:
        """An exception that is not one of the project's, on one message: report it, log it with
        its traceback the first time (one line after that), go on."""
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        first = kind not in self._unexpected_seen
        self._unexpected_seen.add(kind)
        self.telemetry.frame_dropped(label, INTERNAL_ERROR)
        frame_id = f"{label}:{number}"
        log.error(
            "source %s: frame %d on %s dropped: unexpected %s: %s%s",
            label,
            number,
            topic,
            kind,
            exc,
            "" if first else " (traceback logged before)",
            exc_info=exc if first else None,
            extra={"source": label, "frame_id": frame_id},
        )
        self._send_report(
            INTERNAL_ERROR,
            f"{topic}: internal error ({type(exc).__name__})",
            frame_id,
            number,
            topic,
            label,
            None,
            client,
            message,
        )

    def _send_report(
        self,
        reason: str,
        text: str,
        frame_id: str,
        number: int,
        topic: str,
        label: str,
        key: str | None,
        client: aiomqtt.Client,
        message: aiomqtt.Message,
    ) -> _Ack | None:
        """Hand the report to the publisher; the message is acknowledged once the report was delivered
        (with ``deliver_error``), else at once."""
        ack = self._new_ack(client, message)
        try:
            report = ErrorReport(
                pipeline=self.pipeline,
                source_id=label,
                reason=reason,
                message=text[:2000],
                frame_id=frame_id,
                frame_number=number,
                topic=topic,
                idempotency_key=key,
            )
            if self.deliver_error is not None:
                self.deliver_error(report, ack)
                return ack
            if self.on_error is not None:
                self.on_error(report)
        except Exception:  # the error path itself must not stop the source
            log.exception("source %s: reporting the error of frame %d failed", label, number)
        if ack is not None:
            ack()
        return ack


def _payload_of(message: aiomqtt.Message) -> bytes | bytearray:
    """The message payload as bytes (aiomqtt may hand back other types)."""
    payload = message.payload
    if isinstance(payload, bytes | bytearray):
        return payload
    return str(payload).encode() if payload is not None else b""


def _idempotency_key(source: str, frame_id: str | None, digest: bytes | None) -> str | None:
    """``<source>/<frame_id>`` when the sender named the frame, else ``<source>/<payload digest>``."""
    if frame_id:
        return f"{source}/{frame_id}"
    if digest:
        return f"{source}/{digest.hex()}"
    return None
