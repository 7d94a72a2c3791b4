"""Batcher: size, wait, fairness, no waiting on slow sources, end of stream. Queues are driven by hand."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import pytest

from worker.batching import Batcher
from worker.frame import Frame
from worker.queues import FrameQueue

IMAGE = np.zeros((2, 2, 3), dtype=np.uint8)


def frame(source: str, n: int, *, received: float | None = None) -> Frame:
    if received is None:
        return Frame(source, n, time.time(), IMAGE)
    return Frame(source, n, time.time(), IMAGE, received_monotonic=received)


def make_queues(*sources: str, maxsize: int = 100) -> tuple[asyncio.Event, list[FrameQueue]]:
    ready = asyncio.Event()
    return ready, [FrameQueue(s, maxsize, "every_frame", ready=ready) for s in sources]


def ids(batch: list[Frame]) -> list[str]:
    return [f.frame_id for f in batch]


async def settle(rounds: int = 20) -> None:
    """Let every ready task run a few times (no wall-clock time involved)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_full_batches_are_returned_at_once_and_the_rest_at_end_of_stream() -> None:
    ready, (q,) = make_queues("a")
    for n in range(10):
        await q.put(frame("a", n))
    q.close()
    # a max_wait of a minute: a full batch must not wait for it
    batcher = Batcher([q], ready, max_batch_size=4, max_wait_ms=60_000)
    batches = [b async for b in batcher]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [f.frame_number for b in batches for f in b] == list(range(10))
    assert await batcher.next_batch() == []


async def test_a_partial_batch_waits_for_more_frames_until_max_wait() -> None:
    ready, (q,) = make_queues("a")
    batcher = Batcher([q], ready, max_batch_size=4, max_wait_ms=200)
    task = asyncio.create_task(batcher.next_batch())
    await settle()
    assert not task.done()  # nothing queued: waits
    first = frame("a", 0)
    await q.put(first)
    await settle()
    assert not task.done()  # one frame, batch of 4: waits for company (up to 200 ms)
    await q.put(frame("a", 1))
    batch = await asyncio.wait_for(task, timeout=10)
    assert ids(batch) == ["a:0", "a:1"]
    # the lower bound is robust on a loaded machine: it can only take longer
    assert time.monotonic() - first.received_monotonic >= 0.2


async def test_max_wait_clock_starts_when_the_oldest_frame_arrived() -> None:
    ready, (q,) = make_queues("a")
    # this frame already waited 10 s in its queue (e.g. while the previous batch ran the model)
    await q.put(frame("a", 0, received=time.monotonic() - 10))
    # max_wait (5 s) is already over for it: the batch is cut at once, not 5 s after it was taken
    batcher = Batcher([q], ready, max_batch_size=8, max_wait_ms=5_000)
    batch = await asyncio.wait_for(batcher.next_batch(), timeout=4)
    assert ids(batch) == ["a:0"]


async def test_zero_wait_takes_only_what_is_there() -> None:
    ready, (a, b) = make_queues("a", "b")
    await a.put(frame("a", 0))
    await b.put(frame("b", 0))
    batcher = Batcher([a, b], ready, max_batch_size=8, max_wait_ms=0)
    assert ids(await asyncio.wait_for(batcher.next_batch(), timeout=10)) == ["a:0", "b:0"]


async def test_round_robin_across_sources_and_batches() -> None:
    ready, (a, b, c) = make_queues("a", "b", "c")
    for n in range(6):
        await a.put(frame("a", n))
    await b.put(frame("b", 0))
    for n in range(3):
        await c.put(frame("c", n))
    batcher = Batcher([a, b, c], ready, max_batch_size=4, max_wait_ms=0)
    got = [ids(await batcher.next_batch()) for _ in range(3)]
    assert got == [
        ["a:0", "b:0", "c:0", "a:1"],
        # the second batch starts after "a" (which was served last): b is empty, so c first
        ["c:1", "a:2", "c:2", "a:3"],
        ["a:4", "a:5"],
    ]


async def test_a_busy_source_cannot_starve_a_quiet_one() -> None:
    ready, (busy, quiet) = make_queues("busy", "quiet", maxsize=1000)
    batcher = Batcher([busy, quiet], ready, max_batch_size=4, max_wait_ms=0)
    served_quiet = 0
    for round_ in range(20):
        for n in range(8):  # busy always has more than a batch queued
            await busy.put(frame("busy", round_ * 8 + n))
        await quiet.put(frame("quiet", round_))
        batch = await batcher.next_batch()
        assert len(batch) == 4
        served_quiet += sum(f.source_id == "quiet" for f in batch)
    assert served_quiet == 20  # each quiet frame made it into the very batch cut after it arrived


async def test_never_waits_for_a_slow_source_when_the_batch_is_full() -> None:
    ready, (fast, slow) = make_queues("fast", "slow")
    for n in range(3):
        await fast.put(frame("fast", n))
    batcher = Batcher([fast, slow], ready, max_batch_size=3, max_wait_ms=60_000)
    batch = await asyncio.wait_for(batcher.next_batch(), timeout=10)
    assert ids(batch) == ["fast:0", "fast:1", "fast:2"]
    assert not slow.closed  # the slow source is still open and silent


async def test_an_exhausted_source_does_not_end_the_stream_while_others_are_open() -> None:
    ready, (done, live) = make_queues("done", "live")
    done.close()
    batcher = Batcher([done, live], ready, max_batch_size=2, max_wait_ms=0)
    task = asyncio.create_task(batcher.next_batch())
    await settle()
    assert not task.done()
    await live.put(frame("live", 0))
    assert ids(await asyncio.wait_for(task, timeout=10)) == ["live:0"]


async def test_a_waiting_batcher_ends_when_the_last_queue_closes() -> None:
    ready, (a, b) = make_queues("a", "b")
    batcher = Batcher([a, b], ready, max_batch_size=2, max_wait_ms=60_000)
    collected: list[list[str]] = []

    async def consume() -> None:
        async for batch in batcher:
            collected.append(ids(batch))

    task = asyncio.create_task(consume())
    await a.put(frame("a", 0))
    a.close()
    await settle()
    b.close()  # the partial batch is returned at once: nothing more can come
    await asyncio.wait_for(task, timeout=10)
    assert collected == [["a:0"]]
    assert batcher.exhausted


async def test_no_queues_means_no_batches() -> None:
    ready = asyncio.Event()
    assert await Batcher([], ready, max_batch_size=1, max_wait_ms=0).next_batch() == []


@pytest.mark.parametrize(
    ("size", "wait", "shared", "expectation"),
    [
        (1, 0, True, nullcontext()),
        (0, 0, True, pytest.raises(ValueError, match="max_batch_size")),
        (1, -1, True, pytest.raises(ValueError, match="max_wait_ms")),
        (1, 0, False, pytest.raises(ValueError, match="ready event")),
    ],
)
async def test_arguments_are_checked(
    size: int, wait: float, shared: bool, expectation: AbstractContextManager[object]
) -> None:
    ready = asyncio.Event()
    queue = FrameQueue("a", 1, "latest", ready=ready if shared else asyncio.Event())
    with expectation:
        Batcher([queue], ready, max_batch_size=size, max_wait_ms=wait)


async def test_a_paused_source_is_not_taken_from_its_queue_fills_and_resume_wakes_the_batcher() -> None:
    ready, (a, b) = make_queues("a", "b", maxsize=2)
    batcher = Batcher([a, b], ready, max_batch_size=4, max_wait_ms=0)
    batcher.pause("a")  # a's frames wait for its server (the inference loop parks them)
    for n in range(2):
        await a.put(frame("a", n))
        await b.put(frame("b", n))
    assert ids(await batcher.next_batch()) == ["b:0", "b:1"]
    blocked = asyncio.create_task(a.put(frame("a", 2)))  # a's queue is full: its reader waits
    waiting = asyncio.create_task(batcher.next_batch())
    await settle()
    assert not blocked.done() and not waiting.done()
    batcher.resume("a")
    assert ids(await waiting) == ["a:0", "a:1"]
    await blocked
    assert ids(await batcher.next_batch()) == ["a:2"]
