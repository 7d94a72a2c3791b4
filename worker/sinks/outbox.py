"""The MQTT sink's bounded outbox: messages stay here until the broker acknowledged them.

Messages keep their order of arrival. The publisher takes the oldest ones not yet sent on the current
connection, and removes a message only when its ``publish`` returned (QoS 1: PUBACK received; QoS 2:
PUBCOMP; QoS 0: handed to the socket). A message sent on a connection that then broke is still here
and is sent again on the next connection: delivery is *at least once*.

When full, ``put`` drops the *oldest* message (stale predictions are worth less than fresh ones), counts
``results_lost_total{reason="outbox_overflow"}`` per source and logs once per burst of drops.

Everything runs on the event loop; nothing here awaits.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass, field

from worker.telemetry import Telemetry

__all__ = ["Outbox", "OutgoingMessage"]

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class OutgoingMessage:
    """One MQTT publish waiting for delivery."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str  # "result" | "error" (telemetry label)
    source: str  # source id (drop accounting)
    #: called once when the broker acknowledged it (never for a message dropped or left undelivered)
    on_delivered: Callable[[], None] | None = field(default=None, compare=False)


class Outbox:
    """A bounded, ordered store of messages awaiting acknowledgement.

    Args:
        maxsize: most messages held (>= 1).
        telemetry: gets ``outbox_depth`` and ``result_lost(source, "outbox_overflow")``.
        name: the sink's name, for logs.
    """

    def __init__(self, maxsize: int, telemetry: Telemetry, name: str = "mqtt") -> None:
        if maxsize < 1:
            raise ValueError(f"outbox maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.name = name
        self._telemetry = telemetry
        self._items: OrderedDict[int, OutgoingMessage] = OrderedDict()
        self._seq = 0
        self._burst = 0  # messages dropped in the current overflow burst
        self.dropped_total = 0
        #: set on every put and every removal; the publisher clears it before it looks
        self.changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, message: OutgoingMessage) -> None:
        """Append ``message``; when full, drop the oldest (even one in flight) and count it."""
        if len(self._items) >= self.maxsize:
            _, oldest = self._items.popitem(last=False)
            self._telemetry.result_lost(oldest.source, "outbox_overflow")
            self.dropped_total += 1
            self._burst += 1
            if self._burst == 1:
                log.warning(
                    "sink[%s]: outbox full (%d messages, broker slow or unreachable): dropping the oldest",
                    self.name,
                    self.maxsize,
                )
        self._seq += 1
        self._items[self._seq] = message
        self._telemetry.outbox_depth(len(self._items))
        self.changed.set()

    def next_unsent(self, sent: Container[int]) -> tuple[int, OutgoingMessage] | None:
        """The oldest message whose sequence number is not in ``sent``, or None.

        Costs O(len(sent)): in-flight messages are the oldest ones.
        """
        for seq, message in self._items.items():
            if seq not in sent:
                return seq, message
        return None

    def ack(self, seq: int) -> OutgoingMessage | None:
        """Remove a delivered message; None when it was dropped meanwhile (overflow)."""
        message = self._items.pop(seq, None)
        if message is not None:
            self._telemetry.outbox_depth(len(self._items))
            self.changed.set()
            if self._burst and len(self._items) <= self.maxsize // 2:
                log.warning(
                    "sink[%s]: outbox draining again; %d messages were dropped in that overflow burst",
                    self.name,
                    self._burst,
                )
                self._burst = 0
        return message

    def take_all(self) -> list[OutgoingMessage]:
        """Empty the outbox and return what was in it (oldest first)."""
        messages = list(self._items.values())
        self._items.clear()
        self._telemetry.outbox_depth(0)
        self.changed.set()
        return messages

    def discard_undelivered(self) -> int:
        """At a sink's close: empty the outbox, count each message as ``result_lost(source,
        "shutdown_undelivered")``; how many there were."""
        left = self.take_all()
        for source, count in Counter(message.source for message in left).items():
            self._telemetry.result_lost(source, "shutdown_undelivered", count)
        return len(left)
