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


def test_an_inline_password_is_refused_with_where_to_put_it() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"must not be written in the pipeline file.*password_env"):
        BrokerConfig.model_validate({"host": "broker", "password": "s3cret"})
    assert BrokerConfig.model_validate({"host": "broker", "password": None}).password is None


async def test_insecure_skip_verify_is_logged_once_per_broker(caplog: pytest.LogCaptureFixture) -> None:
    from worker.mqtt import TlsConfig

    cfg = BrokerConfig(host="insecure.test", port=8883, tls=TlsConfig(insecure_skip_verify=True))
    verified = BrokerConfig(host="verified.test", port=8883, tls=TlsConfig())
    with caplog.at_level("WARNING", logger="worker.mqtt"):
        for _ in range(3):  # every reconnect makes a client
            make_client(cfg, identifier="x")
        make_client(verified, identifier="y")
    warnings = [r.getMessage() for r in caplog.records if r.name == "worker.mqtt"]
    assert len(warnings) == 1
    assert "insecure_skip_verify" in warnings[0] and "mqtts://insecure.test:8883" in warnings[0]
