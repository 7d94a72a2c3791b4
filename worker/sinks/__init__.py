"""Where results go: MQTT (bounded outbox, status topic), HTTP webhooks, JSON Lines, stdout, memory."""

from worker.sinks.base import DEFAULT_CLOSE_TIMEOUT_S, Sink, TopicTemplate
from worker.sinks.factory import SINK_REGISTRY, SinkConfig, build_sink
from worker.sinks.http import HttpAuthConfig, HttpSink, HttpSinkConfig
from worker.sinks.lines import JsonlSink, JsonlSinkConfig, StdoutSink, StdoutSinkConfig
from worker.sinks.memory import MemorySink
from worker.sinks.mqtt import MqttSink, MqttSinkConfig
from worker.sinks.outbox import Outbox, OutgoingMessage
from worker.sinks.outbox_sink import OutboxSink

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT_S",
    "SINK_REGISTRY",
    "HttpAuthConfig",
    "HttpSink",
    "HttpSinkConfig",
    "JsonlSink",
    "JsonlSinkConfig",
    "MemorySink",
    "MqttSink",
    "MqttSinkConfig",
    "Outbox",
    "OutboxSink",
    "OutgoingMessage",
    "Sink",
    "SinkConfig",
    "StdoutSink",
    "StdoutSinkConfig",
    "TopicTemplate",
    "build_sink",
]
