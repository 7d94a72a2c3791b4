"""MQTT source settings for a fleet: the station template, the allow-list, the session expiry default."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.sources.mqtt import MqttSourceConfig, _StationTemplate


def test_the_station_is_a_level_of_the_topic() -> None:
    template = _StationTemplate("{topic[3]}")
    assert template.station("factory/line-1/frames/st1") == "st1"
    assert template.station("factory/line-1/frames") is None  # no level 3
    assert template.station("factory/line-1/frames/bad id") is None  # not a valid source id
    assert _StationTemplate("{topic[1]}-{topic[3]}").station("f/l1/frames/st1") == "l1-st1"


@pytest.mark.parametrize("template", ["{topic}", "{source}", "{topic[1]!r}", "station", "{topic[x]}"])
def test_a_template_other_than_topic_levels_is_refused(template: str) -> None:
    with pytest.raises(ValidationError, match="source_id"):
        MqttSourceConfig(id="s", topic="a/+", source_id=template)


def test_the_allow_list_holds_valid_source_ids() -> None:
    with pytest.raises(ValidationError, match="station"):
        MqttSourceConfig(id="s", topic="a/+", source_id="{topic[1]}", stations=["ok", "not ok"])


def test_the_session_expiry_default_is_safe_for_replicas() -> None:
    shared = MqttSourceConfig(id="s", topic="a/+", shared_group="g")
    assert shared.resolved_session_expiry_s(stable_id=False) == 0  # nobody can resume a random id
    assert shared.resolved_session_expiry_s(stable_id=True) == 600  # a StatefulSet pod comes back
    assert MqttSourceConfig(id="s", topic="a").resolved_session_expiry_s(stable_id=False) == 600
    fixed = MqttSourceConfig(id="s", topic="a", shared_group="g", session_expiry_s=30)
    assert fixed.resolved_session_expiry_s(stable_id=False) == 30
