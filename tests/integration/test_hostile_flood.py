"""The bad-input flood (issue 12): thousands of hostile payloads among valid frames, through a real
mosquitto into a running worker. No crash, exactly one error report per bad payload, a result for
every valid frame, and the process's resident memory bounded.

The default run is the issue's full flood, 10,000 bad + 500 valid payloads (about 40 s on a loaded
2-core machine); ``SEGSTREAM_FLOOD_BAD`` / ``SEGSTREAM_FLOOD_GOOD`` scale it (e.g. down on a slower one).
The figures (duration, RSS before / peak / after, in-flight budget waits) are printed; ``-s`` shows them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import frame_json, jpeg_bytes, pipeline_config, running
from tests.sinks.helpers import Collector
from tests.support.mosquitto import MosquittoBroker
from tests.support.poison import bomb_png, good_jpeg, good_png
from tests.support.waiting import wait_until
from worker.mqtt import BrokerConfig, make_client
from worker.runtime import Worker

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

N_BAD = int(os.environ.get("SEGSTREAM_FLOOD_BAD", "10000"))
N_GOOD = int(os.environ.get("SEGSTREAM_FLOOD_GOOD", "500"))
MAX_PAYLOAD = 128 * 1024
#: resident memory the flood may add. Measured +9 MiB (10,000 + 500, 2 loaded cores); generous for
#: allocator noise, far below what an unbounded buffer would take (one decoded PNG bomb is 48 MB)
RSS_GROWTH_LIMIT = 64 * 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def bad_payloads(n: int, seed: int = 1) -> Iterator[tuple[bytes, str]]:
    """``n`` hostile payloads of many kinds, each with the reason its report must carry."""
    rng = random.Random(seed)
    good = good_jpeg()
    good_b64 = base64.b64encode(good).decode()
    bomb_json = json.dumps({"image": base64.b64encode(bomb_png()).decode()}).encode()
    kinds = [
        lambda i: (rng.randbytes(rng.randint(0, 3000)), "decode_error"),  # random bytes
        lambda i: (good[: rng.randint(4, len(good) - 3)], "decode_error"),  # truncated JPEG
        lambda i: (good_png(i)[: -rng.randint(13, 40)], "decode_error"),  # corrupt PNG
        lambda i: (bomb_png(), "oversize"),  # 48 MB decoded from a few KB
        lambda i: (bomb_json, "oversize"),
        lambda i: (b'{"image": ' + b"[" * 1000 + b"]" * 1000 + b"}", "decode_error"),  # deep
        lambda i: (f'{{"image": "{good_b64}", "timestamp": {"9" * 400}}}'.encode(), "decode_error"),
        lambda i: (json.dumps({"image": 5, "frame_id": i}).encode(), "decode_error"),  # wrong types
        lambda i: (json.dumps({"image": good_b64, "parameters": [i]}).encode(), "decode_error"),
        lambda i: (json.dumps({"image": "@@" + good_b64[:50]}).encode(), "decode_error"),  # bad base64
        lambda i: (frame_json(good, confidence=1.5 + i), "bad_parameter"),  # out of range
        lambda i: (frame_json(good, no_such_input=i), "bad_parameter"),  # unknown parameter
    ]
    for i in range(n):
        if i % 100 == 99:
            yield rng.randbytes(MAX_PAYLOAD + 1), "oversize"
        else:
            yield kinds[i % len(kinds)](i)


async def test_a_flood_of_bad_payloads_among_valid_frames(
    mosquitto: MosquittoBroker,
    broker_config: BrokerConfig,
    models_dir: Path,
    unique_topic: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # one warning per bad payload is what the worker logs; pytest would keep 10,000 records in this
    # process's memory (about 55 MiB), which is the test's memory, not the worker's
    caplog.set_level(logging.ERROR, logger="worker")
    frames_topic = f"{unique_topic}/frames"
    config = pipeline_config(
        "flood",
        sources=[
            {
                "type": "mqtt",
                "id": "cam1",
                "topic": frames_topic,
                "max_payload_bytes": MAX_PAYLOAD,
                "max_decoded_bytes": 16 * 1024 * 1024,
                "max_inflight_bytes": 64 * 1024 * 1024,
                "receive_maximum": 32,
                "queue_size": 16,
            }
        ],
        sinks=[{"type": "mqtt", "topic": "plant/{pipeline}/{source}/predictions"}],
        broker=mosquitto,
        models_dir=models_dir,
    )
    worker = await Worker.create(config)
    results_topic = "plant/flood/cam1/predictions"
    errors_topic = "segstream/flood/errors"
    expected_reasons: dict[str, int] = {}
    payloads: list[bytes] = []
    good_every = max(1, (N_BAD + N_GOOD) // max(N_GOOD, 1))
    bad = bad_payloads(N_BAD)
    good_sent = 0
    for i in range(N_BAD + N_GOOD):
        if good_sent < N_GOOD and (i % good_every == 0 or i >= N_BAD + good_sent):
            payloads.append(frame_json(jpeg_bytes(good_sent % 7), f"good-{good_sent}"))
            good_sent += 1
        else:
            payload, reason = next(bad)
            payloads.append(payload)
            expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    assert good_sent == N_GOOD and sum(expected_reasons.values()) == N_BAD

    async with (
        Collector(broker_config, "plant/#", identifier="results", persistent=False) as results,
        Collector(broker_config, errors_topic, identifier="errors", persistent=False) as errors,
        running(worker) as task,
        make_client(broker_config, identifier="camera") as camera,
    ):
        # warm up (model, pools, allocator), then take the baseline
        for n in range(20):
            await camera.publish(frames_topic, frame_json(jpeg_bytes(n), f"warm-{n}"), qos=1)
        await wait_until(lambda: len(results.on(results_topic)) == 20, "the warm-up frames")
        baseline = rss_bytes()
        peak = baseline
        stop_sampling = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop_sampling.is_set():
                peak = max(peak, rss_bytes())
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        for at in range(0, len(payloads), 200):
            await asyncio.gather(*(camera.publish(frames_topic, p, qos=1) for p in payloads[at : at + 200]))
            assert not task.done(), "the worker stopped during the flood"
        await wait_until(
            lambda: len(results.on(results_topic)) == 20 + N_GOOD and len(errors.messages) == N_BAD,
            f"{N_GOOD} results and {N_BAD} error reports",
            timeout=300,
        )
        elapsed = time.monotonic() - started
        stop_sampling.set()
        await sampler
        after = rss_bytes()
        assert not task.done() and worker.health.readiness().ok
        source = worker.sources[0]
        budget_waits = source._budget.waits if source._budget is not None else 0  # type: ignore[attr-defined]

    reports = [m.json() for m in errors.messages]
    got_reasons: dict[str, int] = {}
    for report in reports:
        got_reasons[report["reason"]] = got_reasons.get(report["reason"], 0) + 1
    assert got_reasons == expected_reasons
    assert len({r["frame_number"] for r in reports}) == N_BAD  # one report per bad payload
    ids = [m.json()["frame_id"] for m in results.on(results_topic)]
    assert sorted(ids) == sorted([f"warm-{n}" for n in range(20)] + [f"good-{n}" for n in range(N_GOOD)])
    mib = 1024 * 1024
    print(
        f"\nflood: {N_BAD} bad + {N_GOOD} valid payloads in {elapsed:.1f} s "
        f"({(N_BAD + N_GOOD) / elapsed:.0f}/s); RSS baseline {baseline / mib:.0f} MiB, "
        f"peak {peak / mib:.0f} MiB (+{(peak - baseline) / mib:.0f}), after {after / mib:.0f} MiB "
        f"(+{(after - baseline) / mib:.0f}); in-flight budget waits {budget_waits}; reasons {got_reasons}"
    )
    assert peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew by {(peak - baseline) / mib:.0f} MiB"
