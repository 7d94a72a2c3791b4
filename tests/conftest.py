"""The root fixtures: real services on loopback, their client settings, per-test topics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mosquitto import MosquittoBroker
from worker.mqtt import BrokerConfig


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A fresh mosquitto broker on a free 127.0.0.1 port for one test (stop/restart allowed)."""
    broker = MosquittoBroker(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def broker_config(mosquitto: MosquittoBroker) -> BrokerConfig:
    """Client settings of the test's broker (``mosquitto.config(...)`` for other values)."""
    return mosquitto.config()


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> str:
    """A topic prefix named after the test, so tests never see each other's messages."""
    return "segstream-test/" + request.node.name.replace("[", "_").replace("]", "_")
