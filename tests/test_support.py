from pathlib import Path

import pytest

from tests.support.mosquitto import MosquittoBroker
from tests.support.waiting import wait_until, wait_until_sync


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


async def test_wait_until_returns_the_first_truthy_value_of_sync_and_async_predicates() -> None:
    values = iter([0, None, "", "ready"])
    assert await wait_until(lambda: next(values), "a value", interval=0) == "ready"

    calls = 0

    async def later() -> int:
        nonlocal calls
        calls += 1
        return calls if calls >= 3 else 0

    assert await wait_until(later, "the third call", interval=0) == 3


async def test_wait_until_names_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0\.05 s waiting for the moon"):
        await wait_until(lambda: False, "the moon", timeout=0.05, interval=0.01)


def test_wait_until_sync() -> None:
    values = iter([False, False, 7])
    assert wait_until_sync(lambda: next(values), "seven", interval=0) == 7
    with pytest.raises(AssertionError, match="waiting for nothing"):
        wait_until_sync(lambda: 0, "nothing", timeout=0.05, interval=0.01)


def test_broker_config_points_at_the_test_broker(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path)
    config = broker.config(username="line")
    assert (config.host, config.port, config.username) == (broker.host, broker.port, "line")
    assert config.reconnect_max_s <= 0.5
