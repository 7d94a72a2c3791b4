"""Start-up checks of a valid pipeline against the machine it runs on: what would otherwise make the worker
retry forever with no hint.

``segstream validate`` prints every problem found here; ``segstream run`` prints them, one line each, and
exits with ``EXIT_FAILED`` before loading a model. Each problem names the setting and how to fix it:

- an MQTT source or sink (or the control topic) without a ``broker`` section;
- a broker login whose password is missing: ``password_env`` written in the file but not set in the
  environment, or a ``username`` with neither the variable (default ``SEGSTREAM_MQTT_PASSWORD``) nor
  ``password_file``; a ``password_file`` or TLS file that is not there;
- a video source that is a file (no network scheme) that does not exist, an image folder that is not a
  folder.

A live camera (``rtsp://``, ``http://``, ...) that is unreachable is not a start-up problem: the source
keeps retrying with backoff, logging the reason and counting ``segstream_reconnects_total``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from worker.config import PipelineConfig
from worker.mqtt import BrokerConfig

__all__ = ["problems"]


def problems(config: PipelineConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every start-up problem of ``config`` on this machine (empty: none), one line each."""
    env = os.environ if environ is None else environ
    found: list[str] = []
    broker = config.broker
    mqtt_sources = [s.id for s in config.sources if s.type == "mqtt"]
    mqtt_sinks = [s.name for s in config.sinks if s.type == "mqtt"]
    if broker is None:
        found += [
            f"source {sid!r} is an MQTT source but the pipeline has no broker section" for sid in mqtt_sources
        ]
        found += [
            f"sink {name!r} is an MQTT sink but the pipeline has no broker section" for name in mqtt_sinks
        ]
    elif mqtt_sources or mqtt_sinks or config.control.enabled:
        found += _broker_problems(broker, env)
    for source in config.sources:
        if source.type == "video" and not source.is_live:
            path = Path(source.url.removeprefix("file://"))
            if not source.url.isdigit() and not path.exists():
                found.append(f"source {source.id!r}: video file {source.url!r} does not exist")
        elif source.type == "images" and not Path(source.path).is_dir():
            found.append(f"source {source.id!r}: image folder {str(source.path)!r} is not a folder")
    return found


def _broker_problems(broker: BrokerConfig, env: Mapping[str, str]) -> list[str]:
    found: list[str] = []
    if broker.password_file is not None:
        if not broker.password_file.is_file():
            found.append(f"broker.password_file {str(broker.password_file)!r} does not exist")
    elif not env.get(broker.password_env):
        if "password_env" in broker.model_fields_set:
            found.append(
                f"broker.password_env names ${broker.password_env}, which is not set: set it to the "
                "broker password (or remove password_env)"
            )
        elif broker.username:
            found.append(
                f"broker.username is {broker.username!r} but no password is given: set "
                f"${broker.password_env} (or broker.password_file)"
            )
    if broker.tls is not None:
        for name in ("ca_certs", "certfile", "keyfile"):
            path = getattr(broker.tls, name)
            if path is not None and not Path(path).is_file():
                found.append(f"broker.tls.{name} {str(path)!r} does not exist")
    return found
