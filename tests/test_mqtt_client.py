from pathlib import Path

import aiomqtt
import pytest

from tests.support.mosquitto import MosquittoBroker
from worker.mqtt import BrokerConfig, make_client


async def test_client_talks_v5_to_a_real_broker(broker_config: BrokerConfig, unique_topic: str) -> None:
    cfg = broker_config
    async with make_client(cfg, identifier="t-sub") as sub, make_client(cfg, identifier="t-pub") as pub:
        await sub.subscribe(f"{unique_topic}/#", qos=1)
        await pub.publish(f"{unique_topic}/x", b"hello", qos=1)
        async for msg in sub.messages:
            assert msg.payload == b"hello"
            break


async def test_password_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = MosquittoBroker(tmp_path, username="line", password="s3cret")
    broker.start()
    try:
        cfg = broker.config(username="line")
        monkeypatch.setenv("SEGSTREAM_MQTT_PASSWORD", "s3cret")
        async with make_client(cfg, identifier="env") as client:
            await client.publish("t", b"1", qos=1)
        monkeypatch.delenv("SEGSTREAM_MQTT_PASSWORD")
        (tmp_path / "pw").write_text("s3cret\n")
        cfg_file = cfg.model_copy(update={"password_file": tmp_path / "pw"})
        async with make_client(cfg_file, identifier="file") as client:
            await client.publish("t", b"1", qos=1)
        with pytest.raises(aiomqtt.MqttError):
            async with make_client(cfg.model_copy(update={"password_env": "NOPE"}), identifier="bad"):
                pass
        assert "s3cret" not in repr(cfg) and "s3cret" not in cfg.describe()
    finally:
        broker.stop()
