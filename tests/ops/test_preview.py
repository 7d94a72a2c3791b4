"""PreviewHub: nothing kept or encoded without a viewer; lazy, shared, rate-limited JPEGs with one."""

from __future__ import annotations

import asyncio

import cv2
import numpy as np
import pytest

from tests.ops.conftest import ManualClock, make_detections
from worker.ops.preview import PreviewHub


def _frame(value: int = 90, shape: tuple[int, int] = (240, 320)) -> np.ndarray:
    return np.full((*shape, 3), value, np.uint8)


async def test_no_viewer_keeps_nothing_and_encodes_nothing() -> None:
    hub = PreviewHub()
    hub.set_sources(["cam1"])
    for _ in range(5):
        assert not hub.wants("cam1")
        hub.offer("cam1", _frame(), make_detections((240, 320), [(10, 10, 100, 100)], [0]), ["bolt"])
    assert hub.latest_seq("cam1") == 0
    assert await hub.frame("cam1") is None
    assert hub._pool is None  # no encoding thread was ever started
    assert hub.stats()[0].frames == 5  # the frame rate is still measured


async def test_viewer_gets_an_annotated_jpeg_shared_and_cached() -> None:
    hub = PreviewHub(max_width=160)
    try:
        with hub.viewer():
            assert hub.wants("cam1")
            dets = make_detections((240, 320), [(40, 40, 200, 200)], [1])
            hub.offer("cam1", _frame(), dets, ["a", "b"])
            first, second = await asyncio.gather(hub.frame("cam1"), hub.frame("cam1"))
            assert first is second is not None  # one encoding for both callers
            assert (first.seq, first.width, first.height, first.detections) == (1, 160, 120, 1)
            decoded = cv2.imdecode(np.frombuffer(first.jpeg, np.uint8), cv2.IMREAD_COLOR)
            assert decoded.shape == (120, 160, 3)
            # the mask (inner half of the box) is drawn: its centre is no longer the background grey
            assert np.abs(decoded[60, 60].astype(int) - 90).max() > 30
            assert await hub.frame("cam1") is first  # nothing new: cached
    finally:
        hub.close()


async def test_encoding_is_rate_limited_per_source() -> None:
    clock = ManualClock()
    hub = PreviewHub(max_fps=2.0, clock=clock)
    try:
        with hub.viewer():
            hub.offer("cam1", _frame(10), None, [])
            first = await hub.frame("cam1")
            clock.advance(0.1)
            hub.offer("cam1", _frame(200), None, [])
            assert await hub.frame("cam1") is first  # within 1/max_fps: the previous JPEG
            clock.advance(0.5)
            newer = await hub.frame("cam1")
            assert newer is not None and first is not None and newer.seq == first.seq + 1
    finally:
        hub.close()


async def test_leaving_viewer_releases_the_frame() -> None:
    hub = PreviewHub()
    with hub.viewer():
        hub.offer("cam1", _frame(), None, [])
        assert hub.latest_seq("cam1") == 1
    assert not hub.wants("cam1")
    hub.offer("cam1", _frame(), None, [])
    assert hub.latest_seq("cam1") == 0


def test_snapshot_lease_expires() -> None:
    clock = ManualClock()
    hub = PreviewHub(lease_s=5.0, clock=clock)
    hub.set_sources(["cam1", "cam2"])
    hub.touch("cam1")
    assert hub.wants("cam1") and not hub.wants("cam2")
    clock.advance(5.1)
    assert not hub.wants("cam1")


def test_fps_estimate_follows_the_offer_rate_and_drops_to_zero_when_quiet() -> None:
    clock = ManualClock()
    hub = PreviewHub(clock=clock)
    for _ in range(50):
        hub.offer("cam1", _frame(), None, [], latency_s=0.2)
        clock.advance(0.1)
    (stats,) = hub.stats()
    assert stats.fps == pytest.approx(10.0, rel=0.01)
    assert stats.latency_s == pytest.approx(0.2)
    clock.advance(10)
    assert hub.stats()[0].fps == 0.0


def test_disabled_hub_never_wants_frames() -> None:
    hub = PreviewHub(enabled=False)
    with hub.viewer():
        assert not hub.wants("cam1")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_fps": 0}, "max_fps"), ({"jpeg_quality": 0}, "jpeg_quality"), ({"max_width": 8}, "max_width")],
)
def test_settings_are_checked(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PreviewHub(**kwargs)  # type: ignore[arg-type]
