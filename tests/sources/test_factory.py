"""The SourceConfig union, build_source's registry, and the package's public names."""

from __future__ import annotations

import importlib

import pytest
from pydantic import ValidationError

import worker.sources
from worker.errors import ConfigError
from worker.mqtt import BrokerConfig
from worker.sources import (
    SOURCE_TYPES,
    ImageFolderSource,
    MqttSource,
    Source,
    VideoSource,
    build_source,
    parse_source_config,
)


@pytest.mark.parametrize(
    ("data", "cls"),
    [
        ({"type": "video", "id": "cam1", "url": "rtsp://10.1.1.5/live"}, VideoSource),
        ({"type": "images", "id": "dir", "path": "/tmp"}, ImageFolderSource),
        ({"type": "mqtt", "id": "line3", "topic": "factory/line3/frames", "shared_group": "seg"}, MqttSource),
    ],
)
def test_build_each_type(data: dict[str, object], cls: type) -> None:
    config = parse_source_config(data)
    source = build_source(config, broker=BrokerConfig(), pipeline="p")
    assert isinstance(source, cls) and isinstance(source, Source)
    assert source.source_id == data["id"]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"type": "webcam", "id": "x"}, "does not match any of the expected tags"),
        ({"type": "video", "id": "x", "url": "a.mp4", "polcy": "latest"}, "polcy"),
        ({"type": "mqtt", "id": "x", "topic": "t", "qos": 2}, "qos"),
        ({"id": "x", "url": "a.mp4"}, "type"),
    ],
)
def test_invalid_configs_name_the_field(data: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        parse_source_config(data)


def test_mqtt_source_needs_the_broker() -> None:
    with pytest.raises(ConfigError, match="broker"):
        build_source(parse_source_config({"type": "mqtt", "id": "m", "topic": "t"}))


def test_registry_keys_are_the_configs_type_tags() -> None:
    assert {key: cfg.model_fields["type"].default for key, (cfg, _) in SOURCE_TYPES.items()} == {
        "video": "video",
        "images": "images",
        "mqtt": "mqtt",
    }


@pytest.mark.parametrize("module", ["base", "decode", "factory", "images", "mqtt", "reader", "video"])
def test_exported_members(module: str) -> None:
    mod = importlib.import_module(f"worker.sources.{module}")
    for name in mod.__all__:
        assert hasattr(mod, name), f"worker.sources.{module}.__all__ lists missing {name}"
    for name in worker.sources.__all__:
        assert hasattr(worker.sources, name)
