"""Logging: text by default, JSON lines on request, secrets redacted everywhere."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from worker.logging_setup import RedactingFilter, configure_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("password=hunter2 next", "password=*** next"),
        ('{"api_key": "abc123XYZ", "x": 1}', '{"api_key": "***", "x": 1}'),
        ("API-KEY: zz99 and token=t0k3n&x=1", "API-KEY: *** and token=***&x=1"),
        ("mqtts://user:p%40ss@broker:8883/x", "mqtts://user:***@broker:8883/x"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc", "Authorization: Bearer ***"),
        ("frame cam1:42 decoded in 3 ms", "frame cam1:42 decoded in 3 ms"),
        ("passenger=3 tokenizer=bpe", "passenger=3 tokenizer=bpe"),
    ],
)
def test_patterns(text: str, expected: str) -> None:
    assert RedactingFilter().redact(text) == expected


def test_configured_secret_values() -> None:
    f = RedactingFilter(["S3cretValue", "ab"])
    assert f.redact("got S3cretValue twice: S3cretValue") == "got *** twice: ***"
    # a very short secret only as a whole word, so it cannot shred unrelated text
    assert f.redact("ab tab abc") == "*** tab abc"
    f.add_secret("late-secret")
    assert f.redact("x late-secret y") == "x *** y"
    f.add_secret("")  # ignored
    assert f.redact("x y") == "x y"


def test_json_lines_with_ids_and_no_secrets(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", secrets=["hunter22"], stream=out)
    log = logging.getLogger("worker.sources.test")
    log.info("opened %s", "rtsp://cam:hunter22@10.0.0.5/stream", extra={"source": "cam1"})
    log.debug("not shown")
    try:
        raise ConnectionError("login failed with hunter22")
    except ConnectionError:
        log.warning("cannot decode", exc_info=True, extra={"source": "cam1", "frame_id": "cam1:42"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "INFO" and first["logger"] == "worker.sources.test"
    assert first["msg"] == "opened rtsp://cam:***@10.0.0.5/stream" and first["source"] == "cam1"
    assert first["ts"].endswith("Z")
    assert second["frame_id"] == "cam1:42" and "ConnectionError: login failed with ***" in second["exc"]
    assert "hunter22" not in out.getvalue()


def test_text_is_the_default_and_shows_ids(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging(stream=out, secrets=["pw-123456"])
    logging.getLogger("worker.step").warning(
        "bad parameter pw-123456", extra={"source": "cam2", "frame_id": "cam2:7"}
    )
    line = out.getvalue().strip()
    assert line.endswith("WARNING worker.step: bad parameter *** [source=cam2 frame_id=cam2:7]")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_reconfiguring_replaces_the_handler(restore_root: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(stream=first)
    configure_logging(stream=second)
    logging.getLogger("x").warning("once")
    assert first.getvalue() == "" and second.getvalue().count("once") == 1


def test_unknown_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging(fmt="xml")  # type: ignore[arg-type]


def test_structured_extra_fields_stay_structured_and_redacted(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", secrets=["hunter22"], stream=out)
    summary = {"frames": 3, "errors": {"decode_error": 1}, "paths": ["mqtt://u:hunter22@b", "x"]}
    logging.getLogger("worker.runtime").info("run summary", extra={"summary": summary})
    (record,) = (json.loads(line) for line in out.getvalue().splitlines())
    assert record["summary"] == {"frames": 3, "errors": {"decode_error": 1}, "paths": ["mqtt://u:***@b", "x"]}
