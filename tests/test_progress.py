"""The progress line: its text, its redraw rate (an injected clock), and when it is shown at all."""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass

from worker.ops.metrics import SourceSnapshot
from worker.progress import ProgressLine, progress_stream, render_progress


@dataclass
class _Source:
    source_id: str
    expected_frames: int | None


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_line_says_done_total_fps_and_eta() -> None:
    assert render_progress(120, 250, 120, 5.0) == "progress: 120/250 frames (48%), 24.0 fps, ETA 0:05"
    assert render_progress(0, 250, 0, 0.0).endswith("0.0 fps, ETA ?")
    assert render_progress(250, 250, 240, 10.0) == "progress: 250/250 frames (100%), 24.0 fps, ETA 0:00"
    assert render_progress(1, 100_000, 1, 1.0).endswith("ETA 27:46:39")


def test_redraws_at_most_twice_a_second_and_counts_only_sources_of_known_length() -> None:
    out, clock = io.StringIO(), _Clock()
    snap = {
        "file": SourceSnapshot(processed=8, dropped=1, skipped=1),
        "camera": SourceSnapshot(processed=500),  # live: no length, not counted
    }
    line = ProgressLine(
        out, [_Source("file", 40), _Source("camera", None)], lambda: snap, min_interval_s=0.5, clock=clock
    )
    clock.now += 2.0
    assert line.draw()
    assert out.getvalue() == "\r\x1b[Kprogress: 10/40 frames (25%), 4.0 fps, ETA 0:08"
    clock.now += 0.3
    assert not line.draw()  # too soon
    clock.now += 0.2
    assert line.draw()
    assert out.getvalue().count("\r\x1b[Kprogress:") == 2
    snap["file"] = SourceSnapshot(processed=40)
    line.finish()
    assert out.getvalue().endswith("progress: 40/40 frames (100%), 16.0 fps, ETA 0:00\n")


def test_nothing_is_drawn_while_no_length_is_known() -> None:
    out = io.StringIO()
    line = ProgressLine(out, [_Source("camera", None)], dict)
    assert not line.draw(force=True)
    line.finish()
    assert out.getvalue() == ""


def test_a_log_record_erases_the_line_first() -> None:
    out, clock = io.StringIO(), _Clock()
    line = ProgressLine(out, [_Source("f", 4)], lambda: {"f": SourceSnapshot(processed=1)}, clock=clock)
    handler = logging.StreamHandler(out)
    handler.addFilter(line._filter)
    log = logging.getLogger("test.progress")
    log.addHandler(handler)
    try:
        clock.now += 1.0
        line.draw()
        log.warning("something happened")
        log.warning("and again")  # the line is already erased: nothing more to erase
    finally:
        log.removeHandler(handler)
    assert out.getvalue() == (
        "\r\x1b[Kprogress: 1/4 frames (25%), 1.0 fps, ETA 0:03\r\x1b[Ksomething happened\nand again\n"
    )


def test_shown_on_a_terminal_with_text_logs_only() -> None:
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert progress_stream("text", tty) is tty
            assert progress_stream("json", tty) is None
        assert progress_stream("text", io.StringIO()) is None
    finally:
        os.close(master)
        os.close(slave)
