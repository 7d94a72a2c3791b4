"""End-to-end latency under overload: live 25 fps MQTT cameras feeding a worker that cannot keep up.

Set-up (everything real, on 127.0.0.1):

- a mosquitto broker (``tests/support/mosquitto.py``'s ``MosquittoBroker``, free port, own folder);
- the worker as a separate process (``python -m worker.cli run <pipeline>``): the demo pipeline's
  workflow with ``--sources`` MQTT sources (``policy: latest``, ``queue_size`` ``--queue-size``), the
  MQTT sink (QoS 1) and the HTTP server (``/readyz`` to know when to start, ``/metrics`` for drops
  and model time);
- in this process, one MQTT client per camera publishing the clip's frames as JSON
  ``{"image": <base64 JPEG>, "frame_id", "timestamp"}`` at 25 fps each on an absolute schedule
  (``timestamp`` = ``time.time()`` just before the publish: the capture time), and one subscriber on
  the predictions topics: latency = receive time - the result's ``timestamp``.

With enough cameras (or a 640 input) frames arrive faster than the worker processes them; the
``latest`` queues must then skip stale frames (counted) so that latency stays flat: p99 within two
model times (mean model seconds per batch, from ``/metrics``) of p50, and the last 10 s window's
p50 no more than one model time above the first's. Prints p50/p99 per 10 s window (by capture time)
and the drops, per source and by reason.

Usage::

    python -m benchmarks.latency [--seconds 60] [--sources 2] [--input-size 640] [--untrained]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import aiomqtt
import cv2
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._common import (
    DEFAULT_CLIP,
    REPO,
    add_model_arguments,
    add_thread_arguments,
    demo_pipeline_document,
    percentile,
    print_header,
    read_clip,
    resolve_models_dir,
)
from tests.support.mosquitto import MosquittoBroker, free_port

FPS = 25.0
WINDOW_S = 10.0
PIPELINE = "latency-bench"


@dataclass
class Stats:
    """What the publishers sent and the subscriber got back."""

    published: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    received: dict[str, float] = field(default_factory=dict)  # frame_id -> latency (s)
    received_at: dict[str, float] = field(default_factory=dict)  # frame_id -> receive time
    errors: list[dict[str, object]] = field(default_factory=list)
    late_publishes: int = 0
    started: float = 0.0


def encode_frames(clip: Path, limit: int) -> list[str]:
    """The clip's first ``limit`` frames as base64 JPEG strings (quality 85)."""
    out = []
    for image in read_clip(clip, limit):
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        out.append(base64.b64encode(jpeg.tobytes()).decode("ascii"))
    return out


async def publish_camera(
    broker: MosquittoBroker, source: str, topic: str, frames: list[str], seconds: float, stats: Stats
) -> None:
    """One camera: ``frames`` in a loop at 25 fps for ``seconds``, on an absolute schedule."""
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"bench-camera-{source}") as client:
        start = stats.started
        count = int(seconds * FPS)
        for n in range(count):
            delay = start + n / FPS - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0 / FPS:
                stats.late_publishes += 1
            frame_id = f"{source}:{n}"
            now = time.time()
            payload = f'{{"frame_id":"{frame_id}","timestamp":{now:.6f},"image":"{frames[n % len(frames)]}"}}'
            stats.published[source][frame_id] = now
            await client.publish(topic, payload.encode(), qos=0)


async def subscribe(broker: MosquittoBroker, stats: Stats, subscribed: asyncio.Event) -> None:
    """Collect every prediction's latency (receive time - capture timestamp)."""
    async with aiomqtt.Client(broker.host, broker.port, identifier="bench-subscriber") as client:
        await client.subscribe(f"segstream/{PIPELINE}/+/predictions", qos=1)
        await client.subscribe(f"segstream/{PIPELINE}/errors", qos=1)
        subscribed.set()
        async for message in client.messages:
            now = time.time()
            body = json.loads(message.payload)  # type: ignore[arg-type]
            if str(message.topic).endswith("/errors"):
                stats.errors.append(body)
                continue
            stats.received[body["frame_id"]] = now - float(body["timestamp"])
            stats.received_at[body["frame_id"]] = now


async def wait_ready(port: int, proc: asyncio.subprocess.Process, within_s: float) -> None:
    """Poll the worker's ``/readyz`` until it answers 200."""
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode} before it was ready")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the worker was not ready within {within_s:.0f} s")


async def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` as ``{sample name: [(labels, value)]}``."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), float(sample.value)))
    return samples


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(value for _, value in samples.get(name, []))


def report(stats: Stats, metrics: dict[str, list[tuple[dict[str, str], float]]], seconds: float) -> bool:
    """Print the figures; True when latency stayed flat."""
    model_s = _total(metrics, "segstream_model_seconds_sum") / max(
        1.0, _total(metrics, "segstream_model_seconds_count")
    )
    batch_mean = _total(metrics, "segstream_batch_size_sum") / max(
        1.0, _total(metrics, "segstream_batch_size_count")
    )
    post_s = _total(metrics, "segstream_postprocess_seconds_sum") / max(
        1.0, _total(metrics, "segstream_postprocess_seconds_count")
    )
    published = sum(len(p) for p in stats.published.values())
    received = len(stats.received)
    print(
        f"\npublished {published} frames ({published / seconds:.1f}/s), received {received} predictions "
        f"({received / seconds:.1f}/s); late publishes {stats.late_publishes}; "
        f"error reports {len(stats.errors)}"
    )
    print(
        f"worker: mean batch {batch_mean:.2f} frames, model {model_s * 1e3:.1f} ms/batch, "
        f"post-processing {post_s * 1e3:.1f} ms/batch"
    )
    drops: dict[str, float] = defaultdict(float)
    # faults (dropped) and policy skips (stale frames of the latest queues) both leave a frame unpredicted
    for name in ("segstream_frames_dropped_total", "segstream_frames_skipped_total"):
        for labels, value in metrics.get(name, []):
            drops[f"{labels.get('source', '?')}/{labels.get('reason', '?')}"] += value
    for source, sent in sorted(stats.published.items()):
        got = sum(1 for fid in sent if fid in stats.received)
        print(f"  {source}: published {len(sent)}, predicted {got}, not predicted {len(sent) - got}")
    print(
        "  worker drop counters: " + (", ".join(f"{k}={v:.0f}" for k, v in sorted(drops.items())) or "none")
    )
    never = published - received
    counted = sum(drops.values())
    print(f"  drop count: {never} frames without a prediction; the worker counted {counted:.0f} drops")

    print(f"\nlatency (capture -> prediction received) per {WINDOW_S:.0f} s window of capture time:")
    windows: dict[int, list[float]] = defaultdict(list)
    sent_per_window: dict[int, int] = defaultdict(int)
    for sent in stats.published.values():
        for fid, ts in sent.items():
            w = int((ts - stats.started) // WINDOW_S)
            sent_per_window[w] += 1
            if fid in stats.received:
                windows[w].append(stats.received[fid])
    p50s = []
    for w in sorted(sent_per_window):
        lat = windows.get(w, [])
        p50, p99 = percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3
        p50s.append(p50)
        print(
            f"  {w * WINDOW_S:5.0f}-{(w + 1) * WINDOW_S:3.0f} s: p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  "
            f"({len(lat)} of {sent_per_window[w]} frames predicted)"
        )
    all_lat = list(stats.received.values())
    p50, p99 = percentile(all_lat, 50) * 1e3, percentile(all_lat, 99) * 1e3
    model_ms = model_s * 1e3
    spread_ok = p99 - p50 <= 2 * model_ms
    growth = p50s[-1] - p50s[0] if len(p50s) >= 2 else 0.0
    growth_ok = growth <= model_ms
    print(
        f"\nover {seconds:.0f} s: p50 {p50:.1f} ms, p99 {p99:.1f} ms; p99-p50 = {p99 - p50:.1f} ms "
        f"(limit 2 model times = {2 * model_ms:.1f} ms: {'PASS' if spread_ok else 'FAIL'}); "
        f"last-window p50 - first-window p50 = {growth:+.1f} ms (limit {model_ms:.1f}: "
        f"{'PASS' if growth_ok else 'FAIL'})"
    )
    print(
        f"latency p50={p50:.0f}ms p99={p99:.0f}ms drops={never} model={model_ms:.0f}ms "
        f"{'FLAT' if spread_ok and growth_ok else 'NOT FLAT'}"
    )
    return spread_ok and growth_ok


async def run(args: argparse.Namespace) -> int:
    models_dir = resolve_models_dir(args)
    frames = encode_frames(args.clip, args.clip_frames)
    kib = sum(len(f) for f in frames) * 3 / 4 / len(frames) / 1024
    print(f"clip: {len(frames)} frames as JPEG, mean {kib:.0f} KiB")
    with tempfile.TemporaryDirectory(prefix="segstream-latency-") as tmp:
        broker = MosquittoBroker(Path(tmp))
        broker.start()
        http_port = free_port()
        sources = [f"cam{i}" for i in range(args.sources)]
        doc = demo_pipeline_document(
            model_id=args.model_id,
            sources=[
                {
                    "type": "mqtt",
                    "id": s,
                    "topic": f"bench/{s}/frames",
                    "policy": "latest",
                    "queue_size": args.queue_size,
                }
                for s in sources
            ],
            sinks=[{"type": "mqtt"}],
            max_batch_size=args.batch,
            input_size=args.input_size,
            intra_op_threads=args.intra_op_threads,
            http={"enabled": True, "host": "127.0.0.1", "port": http_port},
            broker={"host": broker.host, "port": broker.port, "client_id": "bench-worker"},
            name=PIPELINE,
            log_level="INFO",
            inference_threads=args.inference_threads,
        )
        pipeline = Path(tmp) / "pipeline.yaml"
        pipeline.write_text(yaml.safe_dump(doc))
        log_path = Path(tmp) / "worker.log"
        command = [sys.executable, "-m", "worker.cli", "run", str(pipeline)]
        if models_dir is not None:
            command += ["--models-dir", str(models_dir)]
        print(
            f"worker: {args.sources} MQTT sources (policy latest, queue_size {args.queue_size}), "
            f"max_batch_size {args.batch}, input {args.input_size or 'native'}, "
            f"intra_op_threads {doc['model'].get('intra_op_threads', 0)}, "
            f"inference_threads {doc.get('inference_threads', 1)}; "
            f"{args.sources} x {FPS:.0f} fps for {args.seconds:.0f} s",
            flush=True,
        )
        stats = Stats()
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(*command, cwd=REPO, stdout=log, stderr=log)
        tasks: list[asyncio.Task[None]] = []
        try:
            await wait_ready(http_port, proc, within_s=180)
            subscribed = asyncio.Event()
            tasks.append(asyncio.create_task(subscribe(broker, stats, subscribed)))
            await asyncio.wait_for(subscribed.wait(), 10)
            await asyncio.sleep(1.0)  # the worker's sources subscribe right after /readyz
            stats.started = time.time() + 0.5
            publishers = [
                asyncio.create_task(
                    publish_camera(broker, s, f"bench/{s}/frames", frames, args.seconds, stats)
                )
                for s in sources
            ]
            await asyncio.gather(*publishers)
            # let the last frames through: stop when nothing arrived for 2 s (at most 15 s)
            deadline = time.monotonic() + 15
            last = -1
            while time.monotonic() < deadline and len(stats.received) != last:
                last = len(stats.received)
                await asyncio.sleep(2.0)
            metrics = await scrape(http_port)
        except BaseException:
            print(f"--- worker log ({log_path}) ---\n{log_path.read_text()[-4000:]}", file=sys.stderr)
            raise
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await task
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            broker.stop()
        if proc.returncode != 0:
            print(f"warning: the worker exited with {proc.returncode}; log:\n{log_path.read_text()[-2000:]}")
    return 0 if report(stats, metrics, args.seconds) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the cameras publish (>= 60)")
    parser.add_argument("--sources", type=int, default=2, help="25 fps MQTT cameras")
    parser.add_argument("--input-size", type=int, default=None, help="model input (square); default native")
    parser.add_argument("--queue-size", type=int, default=2, help="per-source queue (policy latest)")
    parser.add_argument("--batch", type=int, default=4, help="max_batch_size")
    add_thread_arguments(parser)
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    parser.add_argument(
        "--clip-frames", type=int, default=100, help="distinct frames the cameras cycle through"
    )
    args = parser.parse_args(argv)
    print_header("latency: capture -> prediction received, live 25 fps MQTT cameras, worker overloaded")
    if args.seconds < 60:
        print(f"note: --seconds {args.seconds:.0f} is below the 60 s the figure is specified over")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
