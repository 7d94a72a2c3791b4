"""The ``SourceConfig`` union (``type`` picks the model) and ``build_source`` with an explicit registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, TypeAdapter

from worker.concurrency import BlockingPool
from worker.errors import ConfigError
from worker.mqtt import BrokerConfig
from worker.sources.base import ErrorCallback, Source
from worker.sources.images import ImageFolderSource, ImageFolderSourceConfig
from worker.sources.mqtt import DeliverError, MqttSource, MqttSourceConfig
from worker.sources.video import VideoSource, VideoSourceConfig
from worker.telemetry import Telemetry

if TYPE_CHECKING:
    from worker.stations import StationInputs

__all__ = ["SOURCE_TYPES", "SourceConfig", "build_source", "parse_source_config"]

SourceConfig = Annotated[
    VideoSourceConfig | ImageFolderSourceConfig | MqttSourceConfig, Field(discriminator="type")
]

_ADAPTER: TypeAdapter[VideoSourceConfig | ImageFolderSourceConfig | MqttSourceConfig] = TypeAdapter(
    SourceConfig
)


def _video(config: Any, deps: dict[str, Any]) -> Source:
    return VideoSource(
        config, telemetry=deps["telemetry"], on_error=deps["on_error"], pipeline=deps["pipeline"]
    )


def _images(config: Any, deps: dict[str, Any]) -> Source:
    return ImageFolderSource(
        config, telemetry=deps["telemetry"], on_error=deps["on_error"], pipeline=deps["pipeline"]
    )


def _mqtt(config: Any, deps: dict[str, Any]) -> Source:
    if deps["broker"] is None:
        raise ConfigError(f"source {config.id!r} of type 'mqtt' needs the pipeline's broker", field="broker")
    return MqttSource(
        config,
        deps["broker"],
        telemetry=deps["telemetry"],
        on_error=deps["on_error"],
        pipeline=deps["pipeline"],
        decode_pool=deps["decode_pool"],
        worker_id=deps["worker_id"],
        deliver_error=deps["deliver_error"],
        station_inputs=deps["station_inputs"],
    )


#: source ``type`` -> (config model, builder)
SOURCE_TYPES: dict[str, tuple[type, Callable[[Any, dict[str, Any]], Source]]] = {
    "video": (VideoSourceConfig, _video),
    "images": (ImageFolderSourceConfig, _images),
    "mqtt": (MqttSourceConfig, _mqtt),
}


def parse_source_config(
    data: dict[str, Any],
) -> VideoSourceConfig | ImageFolderSourceConfig | MqttSourceConfig:
    """Validate one ``sources:`` entry (raises pydantic's ``ValidationError`` naming the field)."""
    return _ADAPTER.validate_python(data)


def build_source(
    config: VideoSourceConfig | ImageFolderSourceConfig | MqttSourceConfig,
    *,
    telemetry: Telemetry | None = None,
    on_error: ErrorCallback | None = None,
    pipeline: str = "",
    broker: BrokerConfig | None = None,
    decode_pool: BlockingPool | None = None,
    worker_id: str | None = None,
    deliver_error: DeliverError | None = None,
    station_inputs: StationInputs | None = None,
) -> Source:
    """Make the source object for ``config``.

    Args:
        config: a validated source config.
        telemetry: where the source reports frames, drops, connection state and reconnects.
        on_error: called (on the event loop) with an ``ErrorReport`` for each payload or outage.
        pipeline: the pipeline name, copied into error reports.
        broker: the pipeline's broker (required by ``mqtt`` sources).
        decode_pool: a shared pool for decoding MQTT payloads (else each MQTT source makes its own).
        worker_id: the process's id (``worker.ids``), the base of MQTT sources' client ids.
        deliver_error: MQTT sources: delivers an error report, then calls its ack (the message is
            acknowledged to the broker only then); default: ``on_error`` and an ack at once.
        station_inputs: MQTT sources with ``source_id`` from the topic: per-station control inputs.

    Raises:
        ConfigError: an unknown type, or an ``mqtt`` source without a broker.
    """
    try:
        _, builder = SOURCE_TYPES[config.type]
    except KeyError:
        raise ConfigError(
            f"unknown source type {config.type!r}; supported: {sorted(SOURCE_TYPES)}", field="type"
        ) from None
    deps = {
        "telemetry": telemetry,
        "on_error": on_error,
        "pipeline": pipeline,
        "broker": broker,
        "decode_pool": decode_pool,
        "worker_id": worker_id,
        "deliver_error": deliver_error,
        "station_inputs": station_inputs,
    }
    return builder(config, deps)
