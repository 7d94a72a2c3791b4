"""Fixtures of the end-to-end tests: the test model package and MQTT clients on the test broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.helpers import make_models_dir
from tests.support.mosquitto import MosquittoBroker
from worker.mqtt import BrokerConfig


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A models folder holding the test model ``parts/1`` (known boxes, masks that fill them)."""
    return make_models_dir(tmp_path / "models")


@pytest.fixture
def broker_config(mosquitto: MosquittoBroker) -> BrokerConfig:
    """Settings of the test's broker, for the test's own publishers and collectors."""
    return BrokerConfig(host=mosquitto.host, port=mosquitto.port, reconnect_min_s=0.1, reconnect_max_s=0.5)
