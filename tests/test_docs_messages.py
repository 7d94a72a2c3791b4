"""``docs/messages.md``: every example is a valid message of its kind, and the consumer works verbatim
against a real mosquitto."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests.support.messages import validate_message
from tests.support.mosquitto import MosquittoBroker
from worker.messages import FrameResult
from worker.mqtt import BrokerConfig, make_client
from worker.schemas import MESSAGE_KINDS, render, shipped

REPO = Path(__file__).resolve().parents[1]
PAGE = (REPO / "docs" / "messages.md").read_text()
EXAMPLES = re.findall(r"<!-- example: (\S+) -->\n```json\n(.*?)```", PAGE, re.DOTALL)
(CONSUMER,) = re.findall(r"<!-- consumer -->\n```python\n(.*?)```", PAGE, re.DOTALL)


def test_every_kind_has_an_example() -> None:
    assert {kind for kind, _ in EXAMPLES} == set(MESSAGE_KINDS)


@pytest.mark.parametrize(("kind", "text"), EXAMPLES, ids=[kind for kind, _ in EXAMPLES])
def test_each_example_is_valid(kind: str, text: str) -> None:
    validate_message(kind, text)


def test_the_result_example_is_a_real_mask_inside_its_box() -> None:
    text = next(text for kind, text in EXAMPLES if kind == "result")
    result = FrameResult.model_validate_json(text)
    (p,) = result.outputs["predictions"]["predictions"]
    rle = p["rle_mask"]
    mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    ys, xs = np.nonzero(mask)
    assert mask.shape == (360, 640) and len(xs) > 100
    x0, y0 = p["x"] - p["width"] / 2, p["y"] - p["height"] / 2
    assert x0 - 1 <= xs.min() and xs.max() <= x0 + p["width"] + 1
    assert y0 - 1 <= ys.min() and ys.max() <= y0 + p["height"] + 1


def test_the_consumer_code_is_short() -> None:
    assert len([line for line in CONSUMER.splitlines() if line.strip()]) <= 16
    compile(CONSUMER, "consumer.py", "exec")


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_the_consumer_runs_verbatim(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    (tmp_path / "consumer.py").write_text(CONSUMER)
    (tmp_path / "result.schema.json").write_text(render(shipped("result")))
    text = next(text for kind, text in EXAMPLES if kind == "result")
    broker = BrokerConfig(host=mosquitto.host, port=mosquitto.port)
    async with make_client(broker, identifier="line") as client:  # retained: seen whenever it subscribes
        await client.publish("segstream/demo/belt/predictions", text.encode(), qos=1, retain=True)
    env = {**os.environ, "MQTT_HOST": mosquitto.host, "MQTT_PORT": str(mosquitto.port)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "consumer.py",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
    finally:
        process.kill()
        _, stderr = await process.communicate()
    assert line.decode().split() == ["belt:40", "bracket", "0.6364", str(_area(text)), "px"], stderr.decode()


def _area(text: str) -> int:
    (p,) = FrameResult.model_validate_json(text).outputs["predictions"]["predictions"]
    rle = p["rle_mask"]
    return int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}))
