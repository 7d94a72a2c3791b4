"""The bounded thread pool and the BLAS thread cap."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from tests.integration.helpers import workflow_v4
from worker.concurrency import BlockingPool, limit_blas_threads, run_in_pool
from worker.config import PipelineConfig


@pytest.fixture
def restore_blas() -> Iterator[None]:
    with threadpool_limits(limits=None):  # puts the original limits back on exit
        yield


def _blas_threads() -> set[int]:
    return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}


def test_blas_threads_are_capped_process_wide(restore_blas: None) -> None:
    assert np.ones((64, 64)) @ np.ones((64, 64)) is not None  # numpy's BLAS is loaded
    limit_blas_threads(1)
    assert _blas_threads() == {1}
    seen: list[set[int]] = []
    thread = threading.Thread(target=lambda: seen.append(_blas_threads()))
    thread.start()
    thread.join()
    assert seen == [{1}]  # not a per-thread setting


def test_blas_thread_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        limit_blas_threads(0)


def test_pipeline_default_is_one_blas_thread() -> None:
    config = PipelineConfig.model_validate(
        {
            "name": "p",
            "sources": [{"type": "video", "id": "cam", "url": "clip.mp4"}],
            "sinks": [{"type": "stdout"}],
            "workflow": workflow_v4(),
        }
    )
    assert config.blas_threads == 1


async def test_pool_runs_blocking_calls_off_the_loop_and_is_bounded() -> None:
    pool = BlockingPool("test", 2)
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    gate = threading.Event()
    two_running = asyncio.Event()
    running = 0
    peak = 0
    lock = threading.Lock()

    def work(i: int) -> tuple[int, int]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            if running == 2:
                loop.call_soon_threadsafe(two_running.set)
        gate.wait(30)
        with lock:
            running -= 1
        return i, threading.get_ident()

    tasks = [asyncio.ensure_future(run_in_pool(pool, work, i)) for i in range(5)]
    await asyncio.wait_for(two_running.wait(), timeout=30)  # both threads busy, the rest queued
    gate.set()
    results = await asyncio.gather(*tasks)
    pool.shutdown()
    assert [i for i, _ in results] == list(range(5))
    assert all(ident != loop_thread for _, ident in results)
    assert peak == 2
    with pytest.raises(ValueError, match="max_workers"):
        BlockingPool("bad", 0)
