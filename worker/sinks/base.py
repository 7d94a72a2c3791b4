"""The interface every sink implements, and MQTT topic templates.

Life cycle (the runtime drives it; every sink is also an async context manager doing the same)::

    sink = build_sink(config, pipeline="line-3", broker=broker, telemetry=metrics)
    await sink.start()                      # open files / start the connection loop; never waits for a broker
    await sink.publish_result(result)       # per frame; never blocks on the network or the disk
    await sink.publish_error(report)        # per failed frame or payload
    await sink.flush()                      # after each batch (line sinks write their buffer here)
    undelivered = await sink.close(10.0)    # flush, wait for acknowledgements, say goodbye; bounded time

``publish_*`` raise ``SinkError`` only when the sink cannot accept the message at all (closed, failed for
good, a topic that cannot be built); a broker that is down is not such a case.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from worker.errors import SinkError
from worker.messages import ErrorReport, FrameResult

__all__ = ["DEFAULT_CLOSE_TIMEOUT_S", "Sink", "SinkContextMixin", "TopicTemplate"]

DEFAULT_CLOSE_TIMEOUT_S = 10.0


@runtime_checkable
class Sink(Protocol):
    """Where results and error reports go."""

    name: str

    @property
    def connected(self) -> bool | None:
        """Whether the sink's remote service (a broker) is connected; None for sinks without one."""

    async def start(self) -> None:
        """Get ready to accept messages (must not wait for a remote service to be up)."""

    async def publish_result(self, result: FrameResult) -> None:
        """Accept one frame's result for delivery."""

    async def publish_error(self, report: ErrorReport) -> None:
        """Accept one error report for delivery."""

    async def flush(self) -> None:
        """End of a batch: push out what is buffered (no-op for sinks that do not buffer)."""

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> int:  # noqa: ASYNC109
        """Deliver what is pending within ``timeout`` seconds, release everything.

        Returns:
            How many accepted messages were *not* delivered (0 on a clean shutdown).
        """


class SinkContextMixin:
    """``async with sink:`` = ``start()`` ... ``close()``; ``connected`` None (no remote service)."""

    @property
    def connected(self) -> bool | None:
        return None

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> int:  # noqa: ASYNC109
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class TopicTemplate:
    """An MQTT topic with ``{name}`` placeholders, checked when the config is loaded.

    Args:
        template: e.g. ``"segstream/{pipeline}/{source}/predictions"``.
        allowed: the placeholder names this topic may use.

    Raises:
        ValueError: an unknown placeholder, a format spec or conversion, a wildcard (``+``, ``#``) or an
            empty topic.

    Example:
        >>> TopicTemplate("plant/{pipeline}/{source}", {"pipeline", "source"}).format(
        ...     pipeline="line-3", source="cam1")
        'plant/line-3/cam1'
    """

    def __init__(self, template: str, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        if not template:
            raise ValueError("topic template must not be empty")
        fields: set[str] = set()
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"topic template {template!r}: {exc}") from exc
        for literal, name, spec, conversion in parsed:
            _check_topic_text(literal, what=f"topic template {template!r}")
            if name is None:
                continue
            if name not in allowed:
                raise ValueError(
                    f"topic template {template!r}: unknown placeholder {{{name}}}; allowed: "
                    + ", ".join(f"{{{a}}}" for a in sorted(allowed))
                )
            if spec or conversion:
                raise ValueError(f"topic template {template!r}: no format specs or conversions allowed")
            fields.add(name)
        self.template = template
        self.fields = frozenset(fields)
        self._cache: dict[tuple[tuple[str, str], ...], str] = {}

    def format(self, **values: str) -> str:
        """The topic for these values (cached; values are checked for MQTT wildcards).

        Raises:
            SinkError: a value contains ``+``, ``#`` or NUL, or a placeholder has no value.
        """
        key = tuple(sorted((k, v) for k, v in values.items() if k in self.fields))
        topic = self._cache.get(key)
        if topic is not None:
            return topic
        for name, value in key:
            try:
                _check_topic_text(value, what=f"value {value!r} of {{{name}}}")
            except ValueError as exc:
                raise SinkError(str(exc)) from exc
        try:
            topic = self.template.format(**dict(key))
        except KeyError as exc:
            raise SinkError(f"topic template {self.template!r} needs a value for {exc}") from exc
        if len(self._cache) < 10_000:
            self._cache[key] = topic
        return topic

    def __repr__(self) -> str:
        return f"TopicTemplate({self.template!r})"


def _check_topic_text(text: str, *, what: str) -> None:
    for bad in ("+", "#", "\x00"):
        if bad in text:
            raise ValueError(f"{what} must not contain {bad!r} (MQTT wildcard or NUL)")
