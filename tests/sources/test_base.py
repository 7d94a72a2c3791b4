"""The thread-to-loop hand-over (every_frame waits, latest never does); Backoff: tests/test_retry.py."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from tests.support.waiting import wait_until
from worker.frame import Frame
from worker.queues import FrameQueue
from worker.sources.base import ThreadHandover
from worker.telemetry import RecordingTelemetry


def frame(n: int) -> Frame:
    return Frame("s", n, time.time(), np.zeros((2, 2, 3), np.uint8))


async def test_every_frame_handover_blocks_the_thread_until_there_is_room() -> None:
    loop = asyncio.get_running_loop()
    queue = FrameQueue("s", 1, "every_frame")
    stop = threading.Event()
    handover = ThreadHandover(queue, loop, stop, RecordingTelemetry())
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.extend(handover.put(frame(i)) for i in range(3)))
    thread.start()
    await wait_until(lambda: len(queue) == 1)
    await asyncio.sleep(0.1)
    assert thread.is_alive() and len(queue) == 1  # the reader waits: backpressure
    taken = []
    while len(taken) < 3:
        got = queue.get_nowait()
        if got is not None:
            taken.append(got.frame_number)
        await asyncio.sleep(0.01)
    await asyncio.to_thread(thread.join, 5)
    assert taken == [0, 1, 2] and results == [True, True, True]


async def test_every_frame_handover_gives_up_on_stop_and_on_close() -> None:
    loop = asyncio.get_running_loop()
    queue = FrameQueue("s", 1, "every_frame")
    stop = threading.Event()
    handover = ThreadHandover(queue, loop, stop, RecordingTelemetry())
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.extend(handover.put(frame(i)) for i in range(2)))
    thread.start()
    await wait_until(lambda: len(queue) == 1)
    stop.set()
    await asyncio.to_thread(thread.join, 5)
    assert results == [True, False] and not thread.is_alive()

    queue2 = FrameQueue("s", 1, "every_frame")
    handover2 = ThreadHandover(queue2, loop, threading.Event(), RecordingTelemetry())
    queue2.close()
    assert await asyncio.to_thread(handover2.put, frame(0)) is False and handover2.closed


async def test_latest_handover_never_blocks_and_counts_what_the_loop_cannot_take() -> None:
    loop = asyncio.get_running_loop()
    telemetry = RecordingTelemetry()
    queue = FrameQueue("s", 2, "latest", telemetry)
    handover = ThreadHandover(queue, loop, threading.Event(), telemetry, max_pending=2)

    # the loop is busy (this coroutine does not yield): hand-overs pile up, then are dropped
    def burst() -> list[bool]:
        return [handover.put(frame(i)) for i in range(10)]

    started = time.monotonic()
    thread_results: list[bool] = []
    thread = threading.Thread(target=lambda: thread_results.extend(burst()))
    thread.start()
    thread.join(5)  # deliberately blocking: the loop cannot run the puts meanwhile
    assert time.monotonic() - started < 2 and thread_results == [True] * 10
    assert telemetry.skipped[("s", "stale")] == 8  # only 2 could wait for the loop
    await wait_until(lambda: len(queue) == 2)
    assert [queue.get_nowait().frame_number for _ in range(2)] == [0, 1]  # type: ignore[union-attr]
