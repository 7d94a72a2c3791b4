"""Test helpers for sinks: a broker that keeps sessions across restarts, and a reconnecting collector."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from tests.support.messages import validate_received
from tests.support.mosquitto import MosquittoBroker
from worker.mqtt import BrokerConfig, make_client

__all__ = ["Collector", "PersistentMosquitto", "Received"]


class PersistentMosquitto(MosquittoBroker):
    """mosquitto that saves sessions and queued messages on stop and loads them on start.

    A consumer with a persistent session (clean_start=False, session expiry) then misses nothing across
    a broker restart, whatever the order in which it and the sink reconnect.
    """

    def _write_conf(self) -> None:
        super()._write_conf()
        text = self.conf_path.read_text().replace("persistence false\n", "")
        store = self.workdir / "store"
        store.mkdir(exist_ok=True)
        text += f"persistence true\npersistence_location {store}/\nautosave_interval 0\n"
        self.conf_path.write_text(text)


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Collector:
    """Subscribe to ``topic`` with QoS 1 and keep every message; reconnects (persistent session).

    Every message on a topic segstream publishes to (``.../predictions``, ``/errors``, ``/status``,
    ``/control/result``; ``tests.support.messages.kind_of_topic``) is validated against its JSON Schema;
    a message that is not valid fails the ``async with`` block at its end, listed with its violations.
    """

    broker: BrokerConfig
    topic: str
    identifier: str = "collector"
    persistent: bool = True
    messages: list[Received] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    invalid: list[str] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            client = make_client(
                self.broker,
                identifier=self.identifier,
                clean_start=not self.persistent,
                session_expiry_s=3600 if self.persistent else None,
            )
            try:
                async with client:
                    await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        payload = message.payload
                        assert isinstance(payload, bytes)
                        try:
                            validate_received(str(message.topic), payload)
                        except AssertionError as exc:
                            self.invalid.append(f"{message.topic}: {exc}")
                        self.messages.append(
                            Received(str(message.topic), payload, message.qos, message.retain)
                        )
            except aiomqtt.MqttError:
                self.subscribed.clear()
                await asyncio.sleep(0.1)

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run(), name=f"collector[{self.identifier}]")
        await asyncio.wait_for(self.subscribed.wait(), timeout=20)
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if exc_type is None:  # the block's own failure wins
            assert not self.invalid, "messages that violate their schema:\n" + "\n".join(self.invalid)

    def on(self, topic: str) -> list[Received]:
        return [m for m in self.messages if m.topic == topic]
