"""Worker ids (unique per process unless fixed), client ids per role, and the one model-id rule."""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import make_models_dir, pipeline_config, running
from tests.sinks.helpers import Collector
from tests.support.mosquitto import MosquittoBroker
from tests.support.waiting import wait_until
from worker.ids import (
    MAX_WORKER_ID_LENGTH,
    WORKER_ID_ENV,
    client_id_for,
    make_worker_id,
    model_id_problem,
    split_model_id,
)
from worker.models.registry import InvalidModelIdError, validate_model_id
from worker.mqtt import BrokerConfig, make_client
from worker.runtime import Worker
from worker.sinks import MqttSink, MqttSinkConfig
from worker.sources.mqtt import MqttSource, MqttSourceConfig
from worker.step.parameters import StepResolver

SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def test_worker_id_has_prefix_pipeline_host_and_suffix() -> None:
    wid = make_worker_id("line3", prefix="plant", environ={}, hostname="node7", suffix="abc123")
    assert wid == "plant-line3-node7-abc123"


def test_pod_name_wins_over_the_hostname() -> None:
    wid = make_worker_id("line3", environ={"POD_NAME": "seg-7f9-x2"}, hostname="node7", suffix="s")
    assert wid == "segstream-line3-seg-7f9-x2-s"


def test_two_workers_on_one_host_get_different_ids() -> None:
    ids = {make_worker_id("line3", environ={}, hostname="same-host") for _ in range(200)}
    assert len(ids) == 200


def test_a_fixed_worker_id_is_used_as_it_is() -> None:
    assert make_worker_id("line3", environ={WORKER_ID_ENV: "seg-0"}) == "seg-0"
    with pytest.raises(ValueError, match=WORKER_ID_ENV):
        make_worker_id("line3", environ={WORKER_ID_ENV: "a b/#"})


@pytest.mark.parametrize(
    ("prefix", "pipeline", "host"),
    [
        (None, "p", "host.example.com"),
        ("we ird/+#", "p", "ho st"),
        ("x" * 200, "p", "h"),
        (None, "p" * 63, "h" * 200),
    ],
)
def test_worker_ids_are_safe_and_bounded(prefix: str | None, pipeline: str, host: str) -> None:
    wid = make_worker_id(pipeline, prefix=prefix, environ={}, hostname=host, suffix="9f9f9f")
    assert SAFE.fullmatch(wid) and len(wid) <= MAX_WORKER_ID_LENGTH, wid
    assert wid.endswith("-9f9f9f")  # the unique part survives any truncation


def test_client_ids_differ_per_role() -> None:
    wid = "segstream-p-h-1"
    ids = {
        client_id_for(wid, "sink", "mqtt"),
        client_id_for(wid, "source", "mqtt"),
        client_id_for(wid, "control"),
    }
    assert ids == {"segstream-p-h-1-sink-mqtt", "segstream-p-h-1-source-mqtt", "segstream-p-h-1-control"}


def test_sink_and_source_take_their_client_ids_from_the_injected_worker_id() -> None:
    broker = BrokerConfig()
    sink = MqttSink(MqttSinkConfig(), pipeline="p", broker=broker, worker_id="w-1")
    source = MqttSource(MqttSourceConfig(id="cam", topic="frames"), broker, pipeline="p", worker_id="w-1")
    assert (sink.worker_id, sink.client_id, source.client_id) == ("w-1", "w-1-sink-mqtt", "w-1-source-cam")
    fixed = MqttSource(MqttSourceConfig(id="cam", topic="frames", client_id="mine"), broker, worker_id="w-1")
    assert fixed.client_id == "mine"


def test_without_an_injected_id_two_sources_never_share_a_client_id() -> None:
    broker = BrokerConfig()
    config = MqttSourceConfig(id="cam", topic="frames")
    assert (
        MqttSource(config, broker, pipeline="p").client_id
        != MqttSource(config, broker, pipeline="p").client_id
    )


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        ("factory-parts/1", nullcontext(("factory-parts", "1"))),
        ("a.b_c-d/v1.2", nullcontext(("a.b_c-d", "v1.2"))),
        ("../x", pytest.raises(ValueError)),
        ("a..b/1", pytest.raises(ValueError)),
        ("a/b/c", pytest.raises(ValueError)),
        ("a", pytest.raises(ValueError)),
        ("a/", pytest.raises(ValueError)),
        ("-a/1", pytest.raises(ValueError)),
        ("p/model.onnx", pytest.raises(ValueError, match="onnx")),
        ("p/" + "1" * 101, pytest.raises(ValueError)),
        (7, pytest.raises(ValueError, match="string")),
    ],
)
def test_one_model_id_rule_for_workflows_and_the_registry(model_id: object, expected: Any) -> None:
    with expected as split:
        assert split_model_id(model_id) == split
    problem = model_id_problem(model_id)
    # the registry and the step parameters apply the same rule, with the same reason
    registry_problem = None
    try:
        validate_model_id(model_id)
    except InvalidModelIdError as exc:
        registry_problem = str(exc)
    assert registry_problem == problem
    if isinstance(model_id, str):
        refusal = StepResolver.refusal("model_id", model_id)
        assert (refusal is None) == (problem is None), refusal
        if problem is not None:
            assert refusal is not None and problem in refusal


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_one_worker_id_in_status_control_replies_and_client_ids(
    mosquitto: MosquittoBroker, tmp_path: Path, unique_topic: str
) -> None:
    config = pipeline_config(
        "ids",
        sources=[{"type": "mqtt", "id": "cam", "topic": f"{unique_topic}/frames"}],
        sinks=[{"type": "mqtt", "status_topic": "segstream/{pipeline}/status/{worker}"}],
        broker=mosquitto,
        models_dir=make_models_dir(tmp_path / "models"),
    )
    worker = await Worker.create(config)
    broker = mosquitto.config()
    async with (
        Collector(broker, "segstream/ids/#", identifier="watcher", persistent=False) as seen,
        running(worker),
        make_client(broker, identifier="operator") as operator,
    ):
        await operator.publish("segstream/ids/control", b'{"inputs": {"confidence": 0.5}}', qos=1)
        await wait_until(lambda: seen.on("segstream/ids/control/result"), "the control reply")
        await wait_until(lambda: seen.on(f"segstream/ids/status/{worker.worker_id}"), "the status")
        (sink,) = worker.sinks
        (source,) = worker.sources
        assert isinstance(sink, MqttSink) and isinstance(source, MqttSource)
        status = seen.on(f"segstream/ids/status/{worker.worker_id}")[0].json()
        reply = seen.on("segstream/ids/control/result")[0].json()
        assert status["worker"] == reply["worker"] == sink.worker_id == worker.worker_id
        assert worker.worker_id.startswith("segstream-ids-")
        assert sink.client_id == client_id_for(worker.worker_id, "sink", "mqtt")
        assert source.client_id == client_id_for(worker.worker_id, "source", "cam")
