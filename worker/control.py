"""The control topic: change the workflow's runtime inputs without a restart.

A message on ``segstream/{pipeline}/control`` (JSON) sets new values of ``$inputs.*`` for every
following frame, all or nothing, validated exactly like a definition::

    {"inputs": {"confidence": 0.6, "class_filter": ["nut", "bolt"]}}

The outcome is published (QoS 1) on ``<control topic>/result``::

    {"ok": true, "applied": {...}, "inputs": {...current values...}, "worker": "..."}
    {"ok": false, "error": "step 'seg': field 'custom_confidence' ...", "worker": "..."}

and a refused message also goes to the error topic (reason ``bad_control``). Each worker subscribes
on its own (not in a shared group), so every replica of a pipeline applies the change. Messages that
are retained on the broker are applied at connect, so a restarted worker picks up the last setting.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiomqtt

from worker.errors import ParameterError
from worker.mqtt import BrokerConfig, make_client
from worker.sources.base import Backoff
from worker.telemetry import Telemetry

__all__ = ["MAX_CONTROL_BYTES", "ControlListener", "parse_control_payload"]

log = logging.getLogger(__name__)

MAX_CONTROL_BYTES = 64 * 1024


def parse_control_payload(payload: bytes) -> dict[str, Any]:
    """The ``inputs`` mapping of a control message.

    Raises:
        ParameterError: too large, not JSON, or not ``{"inputs": {...}}``.
    """
    if len(payload) > MAX_CONTROL_BYTES:
        raise ParameterError(f"control message of {len(payload)} bytes; the limit is {MAX_CONTROL_BYTES}")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParameterError(f"control message is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict) or set(doc) - {"inputs"}:
        raise ParameterError('control message must be {"inputs": {"<input name>": <value>, ...}}')
    return dict(doc["inputs"])


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
    ) -> None:
        self.broker = broker
        self.topic = topic
        self.result_topic = f"{topic}/result"
        self._apply = apply
        self._current = current
        self._on_refused = on_refused
        self._telemetry = telemetry
        self.worker_id = worker_id
        self.applied = 0
        self.refused = 0
        #: set while subscribed to the control topic (messages sent before that are not seen)
        self.subscribed = asyncio.Event()

    def handle(self, payload: bytes) -> dict[str, Any]:
        """Apply one control message; returns the reply document."""
        try:
            accepted = self._apply(parse_control_payload(payload))
        except ParameterError as exc:
            self.refused += 1
            log.warning("control message refused: %s", exc)
            self._on_refused(str(exc))
            return {"ok": False, "error": str(exc), "worker": self.worker_id}
        self.applied += 1
        log.info("runtime inputs changed on the control topic: %s", accepted)
        return {"ok": True, "applied": accepted, "inputs": self._current(), "worker": self.worker_id}

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with capped, jittered backoff."""
        backoff = Backoff(self.broker.reconnect_min_s, self.broker.reconnect_max_s)
        while True:
            await asyncio.sleep(backoff.pace())  # the attempt-rate floor
            try:
                async with make_client(
                    self.broker, identifier=f"{self.worker_id}-control", max_queued_incoming_messages=64
                ) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    backoff.reset()
                    async for message in client.messages:
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        reply = self.handle(payload)
                        await client.publish(self.result_topic, json.dumps(reply, default=str), qos=1)
            except aiomqtt.MqttError as exc:
                self.subscribed.clear()
                self._telemetry.reconnect("broker:control")
                delay = backoff.next_delay()
                log.warning("control topic: broker connection lost (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
