"""Broker settings shared by the MQTT source and sinks, and the one place aiomqtt clients are made.

Secrets never live in the pipeline file: the password is read from the environment variable named by
``password_env`` (default ``SEGSTREAM_MQTT_PASSWORD``) or from ``password_file`` (e.g. a Kubernetes
secret mounted under ``/run/secrets``), and never logged. An inline ``password:`` in the ``broker``
section is refused with an error saying where to put it instead. ``tls.insecure_skip_verify`` (no
server certificate check) is logged as a warning once per broker when the first client is made.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path
from typing import Any, Literal

import aiomqtt
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["BrokerConfig", "TlsConfig", "make_client"]

log = logging.getLogger(__name__)

#: brokers already warned about (host, port): the warning is logged once, not at every reconnect
_insecure_warned: set[tuple[str, int]] = set()
_insecure_lock = threading.Lock()


class TlsConfig(BaseModel):
    """TLS towards the broker (server verification on by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    insecure_skip_verify: bool = False

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_certs) if self.ca_certs else None)
        if self.certfile:
            ctx.load_cert_chain(str(self.certfile), str(self.keyfile) if self.keyfile else None)
        if self.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


class BrokerConfig(BaseModel):
    """Where the MQTT broker is and how to log in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str | None = Field(None, description="MQTT client id prefix")
    username: str | None = None
    password: None = Field(None, description="refused: use password_env / password_file")
    password_env: str = "SEGSTREAM_MQTT_PASSWORD"
    password_file: Path | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive: int = Field(30, ge=5, le=3600)
    connect_timeout: float = Field(10.0, gt=0, le=300)
    tls: TlsConfig | None = None
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)

    @field_validator("password", mode="before")
    @classmethod
    def _no_inline_password(cls, value: object) -> None:
        if value is not None:
            raise ValueError(
                "a password must not be written in the pipeline file; set $SEGSTREAM_MQTT_PASSWORD, "
                "or name another environment variable with password_env, or a file with password_file"
            )
        return None

    @model_validator(mode="after")
    def _backoff_order(self) -> BrokerConfig:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must be <= reconnect_max_s")
        return self

    def resolved_password(self) -> str | None:
        """The password from the file, else the environment variable, else None."""
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return os.environ.get(self.password_env) or None

    def describe(self) -> str:
        """``mqtt[s]://user@host:port`` without the password, for logs."""
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


def make_client(
    config: BrokerConfig,
    *,
    identifier: str | None = None,
    will: aiomqtt.Will | None = None,
    clean_start: bool = True,
    session_expiry_s: int | None = None,
    **kwargs: Any,
) -> aiomqtt.Client:
    """Build an ``aiomqtt.Client`` for ``config`` (MQTT v5 unless configured otherwise).

    Args:
        config: broker settings.
        identifier: the MQTT client id (must be unique per connection; a persistent session needs a
            stable one).
        will: the Last Will (e.g. ``offline`` on the status topic).
        clean_start: False to resume a persistent session (v5) / clean_session=False (v3.1.1).
        session_expiry_s: v5 session expiry interval, needed for a persistent session to outlive a
            disconnect.
        **kwargs: passed to ``aiomqtt.Client`` (e.g. ``max_queued_incoming_messages``, ``queue_type``).
    """
    if config.tls is not None and config.tls.insecure_skip_verify:
        with _insecure_lock:
            first = (config.host, config.port) not in _insecure_warned
            _insecure_warned.add((config.host, config.port))
        if first:
            log.warning(
                "TLS to %s without verifying the server's certificate (tls.insecure_skip_verify): "
                "anyone on the path can impersonate the broker",
                config.describe(),
            )
    v5 = config.protocol == "5"
    properties = None
    if v5 and session_expiry_s:
        from paho.mqtt.packettypes import PacketTypes

        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho 2.2: untyped
        properties.SessionExpiryInterval = session_expiry_s
    extra: dict[str, Any] = {}
    if v5:
        extra["clean_start"] = clean_start
        extra["properties"] = properties
    else:
        extra["clean_session"] = clean_start
    return aiomqtt.Client(
        config.host,
        config.port,
        username=config.username,
        password=config.resolved_password(),
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        will=will,
        keepalive=config.keepalive,
        timeout=config.connect_timeout,
        tls_context=config.tls.context() if config.tls else None,
        **extra,
        **kwargs,
    )
