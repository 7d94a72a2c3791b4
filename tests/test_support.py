from pathlib import Path

import pytest

from tests.support.mosquitto import MosquittoBroker


def test_mosquitto_starts_stops_and_restarts_on_the_same_port(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path)
    broker.start()
    port = broker.port
    assert broker.running
    broker.restart()
    assert broker.running and broker.port == port
    broker.stop()
    assert not broker.running


def test_mosquitto_with_password(tmp_path: Path) -> None:
    pytest.importorskip("aiomqtt")
    broker = MosquittoBroker(tmp_path, username="user", password="s3cret")
    broker.start()
    try:
        assert "password_file" in broker.conf_path.read_text()
    finally:
        broker.stop()
