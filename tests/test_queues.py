import asyncio

import numpy as np
import pytest

from worker.frame import Frame
from worker.queues import FrameQueue, QueueClosed
from worker.telemetry import RecordingTelemetry


def frame(n: int) -> Frame:
    return Frame("cam", n, 0.0, np.zeros((2, 2, 3), np.uint8))


async def test_latest_drops_oldest_and_counts() -> None:
    tel = RecordingTelemetry()
    q = FrameQueue("cam", 2, "latest", tel)
    for n in range(5):
        await q.put(frame(n))
    assert [q.get_nowait().frame_number for _ in range(2)] == [3, 4]  # type: ignore[union-attr]
    assert q.get_nowait() is None
    assert tel.skipped[("cam", "stale")] == 3


async def test_every_frame_waits_for_room() -> None:
    q = FrameQueue("cam", 1, "every_frame")
    await q.put(frame(0))
    pending = asyncio.create_task(q.put(frame(1)))
    await asyncio.sleep(0.01)
    assert not pending.done()
    assert q.get_nowait().frame_number == 0  # type: ignore[union-attr]
    await asyncio.wait_for(pending, 1)
    assert q.get_nowait().frame_number == 1  # type: ignore[union-attr]


async def test_close_keeps_queued_frames_and_rejects_new_ones() -> None:
    q = FrameQueue("cam", 3, "every_frame")
    await q.put(frame(0))
    q.close()
    assert q.closed and not q.exhausted
    with pytest.raises(QueueClosed):
        await q.put(frame(1))
    assert q.get_nowait().frame_number == 0  # type: ignore[union-attr]
    assert q.exhausted


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        FrameQueue("cam", 0, "latest")
    with pytest.raises(ValueError, match="policy"):
        FrameQueue("cam", 1, "sometimes")  # type: ignore[arg-type]
