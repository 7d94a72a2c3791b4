"""The control topic: change the workflow's runtime inputs without a restart, with authority.

A message on ``segstream/{pipeline}/control`` (JSON) sets new values of ``$inputs.*`` for every
following frame, all or nothing, validated exactly like a definition (the step's own types and
ranges, through :func:`worker.step.workflow.validate_runtime_inputs`)::

    {"inputs": {"confidence": 0.6, "class_filter": ["nut", "bolt"]}}

The outcome is published (QoS 1) on ``<control topic>/result``::

    {"ok": true, "applied": {...}, "inputs": {...current values...}, "worker": "..."}
    {"ok": false, "error": "step 'seg': field 'custom_confidence' ...", "worker": "..."}

and a refused message also goes to the error topic (reason ``bad_control``). Each worker subscribes
on its own (not in a shared group), so every replica of a pipeline applies the change.

Every message gets a reply, whatever its bytes: parsing is bounded (64 KiB, nesting depth 4, 256
values, 32 inputs, strings of 256 characters, integers of 12 digits, no NaN/Infinity) and any
exception on one message is a refusal for that message; the listener goes on answering.

Who may retune a line (see ``ControlConfig`` in :mod:`worker.config` and ``deploy/mosquitto/``):

- **The broker ACL** is the first gate: only the operators' accounts may publish on the control topic
  (``deploy/mosquitto/acl``). MQTT does not tell a subscriber who published a message, so the worker
  cannot check user names or client ids itself; an allow-list in the worker is an allow-list of
  *signing senders*:
- **Signed messages** (``control.senders``): each sender has a shared secret (from an environment
  variable or a file, never from the pipeline file). The message names its sender and when it was
  made, and carries an MQTT v5 user property ``signature`` =
  ``hex(HMAC-SHA256(secret, topic + "\\n" + payload))`` over the exact payload bytes::

      {"inputs": {"confidence": 0.6}, "sender": "line-hmi", "issued_at": 1733140000.5}

  A message from an unknown sender, with a missing or wrong signature, older or newer than
  ``max_age_s``, or a replay of a signature already seen, is refused. With senders configured every
  unsigned message is refused. Signing is a few lines in any language (:func:`sign_control_message`;
  ``openssl dgst -sha256 -hmac``); with mosquitto_pub: ``-V mqttv5 -D PUBLISH user-property
  signature <hex>``.
- **Retained** control messages are refused unless ``accept_retained: true``: a retained value would
  be re-applied at every start by whoever managed to retain it once. With MQTT v5 the subscription
  uses *Retain As Published*, so a message published with the retain flag is refused live as well,
  not only when the broker replays it at the next start (3.1.1 can only tell the replayed ones).
- ``allowed_inputs`` restricts which inputs the topic may change at all (e.g. only ``confidence``).

Every change is logged with who made it (the signing sender, or ``unauthenticated`` when only the
broker ACL vouches for it), what changed and the previous values; every refusal with the reason.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from worker.bounded_json import JsonLimitError, JsonLimits, check_bounds, loads_bounded
from worker.config import ControlConfig
from worker.errors import ParameterError
from worker.mqtt import BrokerConfig, make_client
from worker.sources.base import Backoff
from worker.telemetry import Telemetry

__all__ = [
    "CONTROL_JSON_LIMITS",
    "MAX_CONTROL_BYTES",
    "SIGNATURE_PROPERTY",
    "ControlListener",
    "ControlUpdate",
    "parse_control_message",
    "parse_control_payload",
    "sign_control_message",
]

log = logging.getLogger(__name__)

MAX_CONTROL_BYTES = 64 * 1024
MAX_CONTROL_INPUTS = 32
#: the MQTT v5 user property that carries a control message's signature
SIGNATURE_PROPERTY = "signature"
CONTROL_JSON_LIMITS = JsonLimits(
    max_depth=4,
    max_elements=256,
    max_string_chars=256,
    max_key_chars=64,
    max_int_digits=12,
    max_number_chars=32,
)
_SENDER_CHARS = 64
_REPLAY_MEMORY = 4096


@dataclass(frozen=True, slots=True)
class ControlUpdate:
    """A parsed control message: the new input values and, when signed, who sent it and when."""

    inputs: dict[str, Any]
    sender: str | None = None
    issued_at: float | None = None
    #: the one station (source id from the topic) the inputs are for; None: every frame
    station: str | None = None


def parse_control_message(payload: bytes) -> ControlUpdate:
    """Parse one control message (total: any bytes return or raise ``ParameterError``).

    Raises:
        ParameterError: too large, not JSON, past :data:`CONTROL_JSON_LIMITS`, or not
            ``{"inputs": {...}, "sender"?: str, "issued_at"?: number}``.
    """
    if len(payload) > MAX_CONTROL_BYTES:
        raise ParameterError(f"control message of {len(payload)} bytes; the limit is {MAX_CONTROL_BYTES}")
    try:
        doc = loads_bounded(bytes(payload), CONTROL_JSON_LIMITS)
        check_bounds(doc, CONTROL_JSON_LIMITS)
    except JsonLimitError as exc:
        raise ParameterError(f"control message refused: {exc}") from None
    shape = 'control message must be {"inputs": {"<input name>": <value>, ...}} (and "sender", "issued_at")'
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict):
        raise ParameterError(shape)
    unknown = set(doc) - {"inputs", "sender", "issued_at", "station"}
    if unknown:
        raise ParameterError(f"{shape}; unknown keys {sorted(k[:32] for k in unknown)}")
    inputs = dict(doc["inputs"])
    if len(inputs) > MAX_CONTROL_INPUTS:
        raise ParameterError(f"control message sets {len(inputs)} inputs; the limit is {MAX_CONTROL_INPUTS}")
    sender = doc.get("sender")
    if sender is not None and (not isinstance(sender, str) or not 0 < len(sender) <= _SENDER_CHARS):
        raise ParameterError(f"'sender' must be a string of 1..{_SENDER_CHARS} characters")
    issued_at = doc.get("issued_at")
    if issued_at is not None:
        if (
            isinstance(issued_at, bool)
            or not isinstance(issued_at, int | float)
            or not math.isfinite(issued_at)
        ):
            raise ParameterError("'issued_at' must be Unix seconds")
        issued_at = float(issued_at)
    station = doc.get("station")
    if station is not None and (not isinstance(station, str) or not 0 < len(station) <= 64):
        raise ParameterError("'station' must be a source id of 1..64 characters")
    return ControlUpdate(inputs=inputs, sender=sender, issued_at=issued_at, station=station)


def parse_control_payload(payload: bytes) -> dict[str, Any]:
    """The ``inputs`` mapping of a control message.

    Raises:
        ParameterError: see :func:`parse_control_message`.
    """
    return parse_control_message(payload).inputs


def sign_control_message(secret: bytes, topic: str, payload: bytes) -> str:
    """The ``signature`` user property of ``payload`` published on ``topic`` (hex HMAC-SHA256).

    Example:
        >>> sign_control_message(b"k", "segstream/line/control", b'{"inputs": {}}')[:16]
        '0d8451a696199998'
    """
    return hmac.new(secret, topic.encode() + b"\n" + bytes(payload), hashlib.sha256).hexdigest()


def _user_properties(message: aiomqtt.Message) -> dict[str, str]:
    properties = getattr(message, "properties", None)
    pairs = getattr(properties, "UserProperty", None) or []
    out: dict[str, str] = {}
    for pair in pairs[:16]:
        if isinstance(pair, tuple) and len(pair) == 2:
            out.setdefault(str(pair[0])[:64], str(pair[1])[:256])
    return out


class ControlListener:
    """Subscribes to the control topic and applies updates through ``apply``.

    Args:
        broker: the pipeline's broker.
        topic: the control topic (placeholders already filled in).
        apply: validates and applies new input values (raises ``ParameterError``); returns the accepted
            values.
        current: the current input values (for the reply).
        on_refused: called with the error message of a refused update (the runtime reports it).
        telemetry: reconnects are counted as ``broker:control``.
        worker_id: this worker's id (client id and replies).
        policy: who may change what (retained messages, signing senders, allowed inputs); default:
            ``ControlConfig()`` (retained refused, no signature required).
        clock: Unix time (for the signature's ``max_age_s``; tests inject one).
        apply_station: validates and stores inputs for one station (a message with ``"station"``,
            ``worker.stations.StationInputs.set``); None: such messages are refused.
    """

    def __init__(
        self,
        broker: BrokerConfig,
        topic: str,
        apply: Callable[[Mapping[str, Any]], dict[str, Any]],
        current: Callable[[], dict[str, Any]],
        on_refused: Callable[[str], None],
        telemetry: Telemetry,
        worker_id: str,
        *,
        policy: ControlConfig | None = None,
        clock: Callable[[], float] = time.time,
        apply_station: Callable[[str, Mapping[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.broker = broker
        self._apply_station = apply_station
        self.topic = topic
        self.result_topic = f"{topic}/result"
        self._apply = apply
        self._current = current
        self._on_refused = on_refused
        self._telemetry = telemetry
        self.worker_id = worker_id
        self.policy = policy or ControlConfig()
        self._secrets = self.policy.sender_secrets()
        self._clock = clock
        self._seen_signatures: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._unexpected_seen: set[str] = set()
        self.applied = 0
        self.refused = 0
        #: set while subscribed to the control topic (messages sent before that are not seen)
        self.subscribed = asyncio.Event()

    # ------------------------------------------------------------------------------ one message

    def handle(
        self,
        payload: bytes,
        *,
        retained: bool = False,
        properties: Mapping[str, str] | None = None,
        topic: str | None = None,
    ) -> dict[str, Any]:
        """Apply one control message; returns the reply document. Never raises (but cancellation)."""
        who = "unauthenticated"
        try:
            if retained and not self.policy.accept_retained:
                raise ParameterError(
                    "retained control messages are refused (control.accept_retained is false); "
                    "clear it with an empty retained message on the control topic"
                )
            message = parse_control_message(payload)
            who = self._authorise(message, payload, properties or {}, topic or self.topic)
            self._check_allowed(message.inputs)
            previous = self._current()
            if message.station is not None:
                if self._apply_station is None:
                    raise ParameterError(
                        f"'station' {message.station[:64]!r}: this pipeline has no per-station inputs "
                        "(an MQTT source with source_id from the topic)"
                    )
                accepted = self._apply_station(message.station, message.inputs)
            else:
                accepted = self._apply(message.inputs)
        except ParameterError as exc:
            return self._refuse(str(exc), who)
        except Exception as exc:  # one message must not stop the listener (see the module doc)
            kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
            first = kind not in self._unexpected_seen
            self._unexpected_seen.add(kind)
            log.error(
                "control message refused: unexpected %s: %s%s",
                kind,
                exc,
                "" if first else " (traceback logged before)",
                exc_info=exc if first else None,
            )
            return self._refuse(f"internal error ({type(exc).__name__})", who)
        self.applied += 1
        before = {name: previous.get(name) for name in accepted}
        log.info(
            "runtime inputs changed on the control topic by %s: %s (were %s)",
            who,
            accepted,
            before,
            extra={"sender": who, "control_topic": topic or self.topic},
        )
        reply = {"ok": True, "applied": accepted, "inputs": self._current(), "worker": self.worker_id}
        if message.station is not None:
            reply["station"] = message.station
        return reply

    def _refuse(self, error: str, who: str) -> dict[str, Any]:
        self.refused += 1
        log.warning("control message from %s refused: %s", who, error, extra={"sender": who})
        try:
            self._on_refused(error)
        except Exception:
            log.exception("reporting a refused control message failed")
        return {"ok": False, "error": error, "worker": self.worker_id}

    def _authorise(
        self, message: ControlUpdate, payload: bytes, properties: Mapping[str, str], topic: str
    ) -> str:
        """Who sent ``message`` (the signing sender, or ``unauthenticated`` when no senders are
        configured); ``ParameterError`` when the signature does not hold."""
        if not self._secrets:
            return "unauthenticated" if message.sender is None else f"unauthenticated ({message.sender[:64]})"
        sender = message.sender
        if sender is None or sender not in self._secrets:
            raise ParameterError("control message refused: not from a known sender (control.senders)")
        signature = properties.get(SIGNATURE_PROPERTY)
        if not signature:
            raise ParameterError(
                f"control message refused: no '{SIGNATURE_PROPERTY}' user property (MQTT v5) on a message "
                f"from {sender!r}"
            )
        expected = sign_control_message(self._secrets[sender], topic, payload)
        if not hmac.compare_digest(expected, signature.strip().lower()):
            raise ParameterError(f"control message refused: bad signature for sender {sender!r}")
        now = self._clock()
        max_age = self.policy.max_age_s
        if message.issued_at is None or abs(now - message.issued_at) > max_age:
            raise ParameterError(
                f"control message refused: 'issued_at' must be within {max_age:g} s of the worker's clock"
            )
        while self._seen_signatures and (
            len(self._seen_signatures) >= _REPLAY_MEMORY
            or next(iter(self._seen_signatures.values())) < now - 2 * max_age
        ):
            self._seen_signatures.popitem(last=False)
        if expected in self._seen_signatures:
            raise ParameterError("control message refused: a replay of a message already applied")
        self._seen_signatures[expected] = now
        return sender

    def _check_allowed(self, inputs: Mapping[str, Any]) -> None:
        allowed = self.policy.allowed_inputs
        if allowed is None:
            return
        refused = sorted(name[:64] for name in inputs if name not in allowed)
        if refused:
            raise ParameterError(
                f"inputs {refused} may not be changed on the control topic (control.allowed_inputs: "
                f"{sorted(allowed)})"
            )

    # ------------------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with capped, jittered backoff."""
        backoff = Backoff(self.broker.reconnect_min_s, self.broker.reconnect_max_s)
        while True:
            await asyncio.sleep(backoff.pace())  # the attempt-rate floor
            try:
                async with make_client(
                    self.broker, identifier=f"{self.worker_id}-control", max_queued_incoming_messages=64
                ) as client:
                    if self.broker.protocol == "5":
                        # Retain As Published: a retained message is seen as retained live too, not
                        # only when the broker replays it at subscribe time
                        await client.subscribe(
                            self.topic, options=SubscribeOptions(qos=1, retainAsPublished=True)
                        )
                    else:
                        await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    backoff.reset()
                    async for message in client.messages:
                        reply = self._answer(message)
                        if reply is not None:
                            await client.publish(self.result_topic, reply, qos=1)
            except aiomqtt.MqttError as exc:
                self.subscribed.clear()
                self._telemetry.reconnect("broker:control")
                delay = backoff.next_delay()
                log.warning("control topic: broker connection lost (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    def _answer(self, message: aiomqtt.Message) -> bytes | None:
        """The reply to one message, as JSON bytes (never raises but cancellation); None for the
        empty retained message that clears a retained one (nothing to answer)."""
        try:
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            if not payload and message.retain:
                log.info("control topic: a retained control message was cleared")
                return None
            reply = self.handle(
                bytes(payload),
                retained=bool(message.retain),
                properties=_user_properties(message),
                topic=str(message.topic),
            )
            return json.dumps(reply, default=str).encode()
        except Exception as exc:  # e.g. a reply that cannot be serialized
            log.exception("control topic: answering a message failed")
            return json.dumps(
                {"ok": False, "error": f"internal error ({type(exc).__name__})", "worker": self.worker_id}
            ).encode()
