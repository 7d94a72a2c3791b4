"""The shipped mosquitto ACL (deploy/mosquitto/acl) with a real broker and a running worker: cameras,
operators and workers are kept apart; only an operator can retune the line; a retained control
message is refused and the listener keeps answering; signed control through real MQTT v5 properties."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.integration.helpers import (
    frame_json,
    jpeg_bytes,
    make_models_dir,
    pipeline_config,
    running,
)
from tests.sinks.helpers import Collector
from tests.support.mosquitto import MosquittoBroker
from tests.support.waiting import wait_until
from worker.control import sign_control_message
from worker.mqtt import BrokerConfig, make_client
from worker.runtime import Worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ACL = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "acl"
USERS = {"segstream": "worker-pw-1", "operator": "operator-pw-1", "camera-press-1": "camera-pw-1"}
LINE = "acl-line"
CONTROL = f"segstream/{LINE}/control"
RESULTS = f"factory/{LINE}/press-1/predictions"
FRAMES = "factory/press-line/frames/press-1"
KEY = "hmi-key-0123456789"


@pytest.fixture
def acl_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    broker = MosquittoBroker(tmp_path, users=USERS, acl_file=ACL)
    broker.start()
    for user, password in USERS.items():
        monkeypatch.setenv(f"PW_{user.replace('-', '_').upper()}", password)
    monkeypatch.setenv("SEGSTREAM_MQTT_PASSWORD", USERS["segstream"])
    monkeypatch.setenv("CONTROL_KEY_HMI", KEY)
    try:
        yield broker
    finally:
        broker.stop()


def as_user(broker: MosquittoBroker, user: str | None) -> BrokerConfig:
    if user is None:
        return BrokerConfig(host=broker.host, port=broker.port, password_env="NO_SUCH_PASSWORD_VARIABLE")
    return BrokerConfig(
        host=broker.host,
        port=broker.port,
        username=user,
        password_env=f"PW_{user.replace('-', '_').upper()}",
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
    )


async def acl_worker(broker: MosquittoBroker, models_dir: Path, **control: Any) -> Worker:
    config = pipeline_config(
        LINE,
        sources=[
            {
                "type": "mqtt",
                "id": "press-1",
                "topic": "factory/press-line/frames/+",
                "shared_group": "segstream-workers",
            }
        ],
        sinks=[
            {
                "type": "mqtt",
                "topic": "factory/{pipeline}/{source}/predictions",
                "error_topic": "segstream/{pipeline}/errors",
            }
        ],
        broker=broker,
        models_dir=models_dir,
        control=control,
    )
    doc = config.model_dump(mode="json", exclude_none=True)
    doc["broker"]["username"] = "segstream"
    return await Worker.create(type(config).model_validate(doc))


async def control_reply(
    operator: aiomqtt.Client, seen: Collector, payload: bytes, **kw: Any
) -> dict[str, Any]:
    count = len(seen.on(f"{CONTROL}/result"))
    await operator.publish(CONTROL, payload, qos=1, **kw)
    await wait_until(lambda: len(seen.on(f"{CONTROL}/result")) > count, "the control reply")
    return seen.on(f"{CONTROL}/result")[-1].json()


async def test_the_acl_keeps_cameras_operators_and_workers_apart(
    acl_broker: MosquittoBroker, tmp_path: Path
) -> None:
    worker = await acl_worker(acl_broker, make_models_dir(tmp_path / "models"))
    with pytest.raises(aiomqtt.MqttError):  # anonymous clients are refused
        async with make_client(as_user(acl_broker, None), identifier="anonymous"):
            pass
    async with (
        running(worker),
        Collector(as_user(acl_broker, "operator"), "#", identifier="operator-view", persistent=False) as seen,
        Collector(
            as_user(acl_broker, "camera-press-1"), "#", identifier="camera-view", persistent=False
        ) as spy,
        make_client(as_user(acl_broker, "operator"), identifier="operator") as operator,
        make_client(as_user(acl_broker, "camera-press-1"), identifier="camera") as camera,
    ):
        await camera.publish(FRAMES, frame_json(jpeg_bytes(1), "f1"), qos=1)
        await wait_until(lambda: len(seen.on(RESULTS)) == 1, "the result of the camera's frame")
        assert [p["class"] for p in seen.on(RESULTS)[0].json()["outputs"]["predictions"]["predictions"]] == [
            "bolt",
            "nut",
        ]
        # a camera cannot retune the line: its control message never reaches the worker
        with contextlib.suppress(aiomqtt.MqttError):
            await camera.publish(CONTROL, b'{"inputs": {"confidence": 1.0}}', qos=1)
        # nor can it publish frames of another station
        await camera.publish("factory/press-line/frames/press-2", jpeg_bytes(2), qos=1)
        reply = await control_reply(operator, seen, b'{"inputs": {"confidence": 0.7}}')
        assert reply["ok"] is True and reply["applied"] == {"confidence": 0.7}
        assert worker.control.applied == 1 and worker.control.refused == 0
        await camera.publish(FRAMES, frame_json(jpeg_bytes(3), "f3"), qos=1)
        await wait_until(lambda: len(seen.on(RESULTS)) == 2, "the second result")
        assert [p["class"] for p in seen.on(RESULTS)[1].json()["outputs"]["predictions"]["predictions"]] == [
            "bolt"
        ]
        # a retained control message (e.g. left by an old tool) is refused, and the listener goes on
        reply = await control_reply(operator, seen, b'{"inputs": {"confidence": 0.99}}', retain=True)
        assert reply["ok"] is False and "retained" in reply["error"]
        reply = await control_reply(operator, seen, b'{"inputs": {"confidence": 0.5}}')
        assert reply["ok"] is True
        await operator.publish(CONTROL, b"", qos=1, retain=True)  # clears the retained message
    assert worker.metrics.snapshot()["press-1"].received == 2  # press-2's frame was denied by the ACL
    # the camera saw nothing: not the results, not the control topic, not the replies
    assert spy.messages == []
    # the operator reads results, replies and status, but not the control topic itself (write only)
    assert {m.topic for m in seen.messages} >= {
        RESULTS,
        f"{CONTROL}/result",
        f"segstream/{LINE}/status/{worker.worker_id}",
    }
    assert CONTROL not in {m.topic for m in seen.messages}
    assert [m.json()["ok"] for m in seen.on(f"{CONTROL}/result")] == [True, False, True]


async def test_a_retained_control_message_at_start_is_refused_and_signed_control_works(
    acl_broker: MosquittoBroker, tmp_path: Path
) -> None:
    async with make_client(as_user(acl_broker, "operator"), identifier="old-tool") as tool:
        await tool.publish(CONTROL, b'{"inputs": {"confidence": 0.99}}', qos=1, retain=True)
    worker = await acl_worker(
        acl_broker, make_models_dir(tmp_path / "models"), senders={"hmi": {"secret_env": "CONTROL_KEY_HMI"}}
    )
    async with (
        Collector(
            as_user(acl_broker, "operator"), f"{CONTROL}/#", identifier="operator-view", persistent=False
        ) as seen,
        running(worker),
        make_client(as_user(acl_broker, "operator"), identifier="operator") as operator,
    ):
        await wait_until(
            lambda: len(seen.on(f"{CONTROL}/result")) == 1, "the refusal of the retained message"
        )
        assert "retained" in seen.on(f"{CONTROL}/result")[0].json()["error"]
        assert worker.runner is not None and worker.runner.runtime_inputs == {"confidence": 0.4}
        await operator.publish(CONTROL, b"", qos=1, retain=True)

        unsigned = await control_reply(operator, seen, b'{"inputs": {"confidence": 0.7}}')
        assert unsigned["ok"] is False and "known sender" in unsigned["error"]
        payload = json.dumps(
            {"inputs": {"confidence": 0.7}, "sender": "hmi", "issued_at": time.time()}
        ).encode()
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = ("signature", sign_control_message(KEY.encode(), CONTROL, payload))
        signed = await control_reply(operator, seen, payload, properties=properties)
        assert signed["ok"] is True and signed["applied"] == {"confidence": 0.7}
        replay = await control_reply(operator, seen, payload, properties=properties)
        assert replay["ok"] is False and "replay" in replay["error"]
    assert worker.runner.runtime_inputs == {"confidence": 0.7}
