"""Sink configs as one discriminated union, and the explicit registry that builds a sink from its config.

A pipeline file lists its sinks::

    sinks:
      - type: mqtt
        topic: "segstream/{pipeline}/{source}/predictions"
      - type: jsonl
        path: /var/lib/segstream/line-3.jsonl
      - type: stdout
        mode: summary
      - type: http
        url: https://mes.example.com/segstream/results
        auth: {token_env: SEGSTREAM_WEBHOOK_TOKEN}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from pydantic import Field

from worker.errors import ConfigError
from worker.mqtt import BrokerConfig
from worker.sinks.base import Sink
from worker.sinks.http import HttpSink, HttpSinkConfig
from worker.sinks.lines import JsonlSink, JsonlSinkConfig, StdoutSink, StdoutSinkConfig
from worker.sinks.mqtt import MqttSink, MqttSinkConfig
from worker.telemetry import Telemetry

__all__ = ["SINK_REGISTRY", "SinkConfig", "build_sink"]

SinkConfig = Annotated[
    MqttSinkConfig | JsonlSinkConfig | StdoutSinkConfig | HttpSinkConfig, Field(discriminator="type")
]

SinkBuilder = Callable[..., Sink]


def _build_mqtt(
    config: MqttSinkConfig,
    *,
    pipeline: str,
    broker: BrokerConfig | None,
    telemetry: Telemetry | None,
    worker_id: str | None = None,
) -> Sink:
    if broker is None:
        raise ConfigError(
            f"sink {config.name!r} (type mqtt) needs the pipeline's broker settings", field="broker"
        )
    return MqttSink(config, pipeline=pipeline, broker=broker, telemetry=telemetry, worker_id=worker_id)


def _build_jsonl(
    config: JsonlSinkConfig,
    *,
    pipeline: str,
    broker: BrokerConfig | None,
    telemetry: Telemetry | None,
    worker_id: str | None = None,
) -> Sink:
    return JsonlSink(config, telemetry=telemetry)


def _build_stdout(
    config: StdoutSinkConfig,
    *,
    pipeline: str,
    broker: BrokerConfig | None,
    telemetry: Telemetry | None,
    worker_id: str | None = None,
) -> Sink:
    return StdoutSink(config, telemetry=telemetry)


def _build_http(
    config: HttpSinkConfig,
    *,
    pipeline: str,
    broker: BrokerConfig | None,
    telemetry: Telemetry | None,
    worker_id: str | None = None,
) -> Sink:
    return HttpSink(config, pipeline=pipeline, telemetry=telemetry)


#: ``type`` -> builder; a new sink type is one config model in the union plus one entry here
SINK_REGISTRY: dict[str, SinkBuilder] = {
    "mqtt": _build_mqtt,
    "jsonl": _build_jsonl,
    "stdout": _build_stdout,
    "http": _build_http,
}


def build_sink(
    config: MqttSinkConfig | JsonlSinkConfig | StdoutSinkConfig | HttpSinkConfig,
    *,
    pipeline: str,
    broker: BrokerConfig | None,
    telemetry: Telemetry | None,
    worker_id: str | None = None,
) -> Sink:
    """Build the (not yet started) sink described by ``config``.

    ``worker_id`` is the process's id (``worker.ids.make_worker_id``): MQTT sinks use it in their
    client id and status; without it an MQTT sink makes its own.

    Raises:
        ConfigError: unknown sink type, or an MQTT sink without broker settings.
    """
    try:
        builder = SINK_REGISTRY[config.type]
    except KeyError:
        raise ConfigError(f"unknown sink type {config.type!r}", field="type") from None
    return builder(config, pipeline=pipeline, broker=broker, telemetry=telemetry, worker_id=worker_id)
