"""A TCP listener on 127.0.0.1 that plays a broker which is down, counting every connection attempt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from worker.retry import DEFAULT_MIN_INTERVAL_S

__all__ = ["CONNACK_BAD_PASSWORD", "CountingListener", "counting_listener", "most_attempts"]

#: MQTT v5 CONNACK: session present 0, reason 0x86 "Bad User Name or Password", no properties
CONNACK_BAD_PASSWORD = bytes([0x20, 0x03, 0x00, 0x86, 0x00])


@dataclass
class CountingListener:
    """Accepts TCP connections on 127.0.0.1 and records when each arrived (loop time)."""

    mode: Literal["close", "refuse"]
    arrivals: list[float] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.arrivals.append(asyncio.get_running_loop().time())
        try:
            if self.mode == "refuse":
                await _read_packet(reader)
                writer.write(CONNACK_BAD_PASSWORD)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def between(self, start: float, end: float) -> int:
        return sum(1 for t in self.arrivals if start <= t <= end)


async def _read_packet(reader: asyncio.StreamReader) -> bytes:
    """One MQTT control packet (fixed header, variable-length remaining length, body)."""
    await reader.readexactly(1)
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    return await reader.readexactly(length)


@asynccontextmanager
async def counting_listener(mode: Literal["close", "refuse"]) -> AsyncIterator[CountingListener]:
    listener = CountingListener(mode)
    server = await asyncio.start_server(listener.handle, "127.0.0.1", 0)
    listener.port = server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()


def most_attempts(window_s: float, min_interval_s: float = DEFAULT_MIN_INTERVAL_S) -> int:
    """Attempts at least ``min_interval_s`` apart that can land in a window of ``window_s`` seconds,
    plus one already on its way when the window opened."""
    return int(window_s / min_interval_s) + 2
