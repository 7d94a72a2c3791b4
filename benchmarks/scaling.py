"""Scaling out on one MQTT line: 1 and 2 workers (one inference thread each) sharing one frames topic
through a real mosquitto.

Each run starts a fresh mosquitto on loopback and N ``segstream run`` processes of the same pipeline
(the demo's workflow and model, an MQTT source in one ``shared_group`` with ``policy: every_frame``, QoS 1,
an MQTT sink; ``inference_threads: 1``, ``model.intra_op_threads: 1``), waits until every worker is
subscribed, sends ``--warmup`` frames and waits for their results, then publishes ``--frames`` JPEG frames
of the demo clip (JSON with ``frame_id``) as fast as the broker takes them, and collects the results.

- frames/s: ``--frames`` / (last result received - first frame published): the pool's capacity with a
  backlog (every worker always has work).
- latency: result received - frame published, per frame (same clock, this process). With a backlog it
  is mostly time spent waiting in the broker and the queues; p50/p99 over the measured frames.

The last line sums up: ``workers2/workers1=<ratio of frames/s>``. The publisher, the collector and
mosquitto run on the same machine and take CPU too; on a loaded machine the ratio says more than the
absolute numbers (run it a few times).

    python -m benchmarks.scaling --frames 200
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
import yaml

from benchmarks._common import (
    DEFAULT_CLIP,
    REPO,
    add_model_arguments,
    demo_pipeline_document,
    percentile,
    print_header,
    read_clip,
    resolve_models_dir,
)
from tests.support.mosquitto import MosquittoBroker, free_port
from worker.mqtt import BrokerConfig, make_client


def _frames(count: int, size: int) -> list[bytes]:
    """``count`` JSON frame payloads cycling through the demo clip (JPEG, resized to ``size`` wide)."""
    images = read_clip(DEFAULT_CLIP, limit=60)
    encoded = []
    for image in images:
        h, w = image.shape[:2]
        small = cv2.resize(image, (size, round(h * size / w)))
        ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        encoded.append(base64.b64encode(buf.tobytes()).decode())
    return [
        json.dumps({"image": encoded[n % len(encoded)], "frame_id": f"f{n:05d}"}).encode()
        for n in range(count)
    ]


class Pool:
    """N worker processes of one pipeline file."""

    def __init__(self, tmp: Path, count: int, doc: dict[str, Any], models_dir: Path | None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.tmp = tmp
        self.count = count
        self.doc = doc
        self.models_dir = models_dir

    def start(self) -> None:
        for i in range(self.count):
            port = free_port()
            doc = {**self.doc, "http": {"host": "127.0.0.1", "port": port}}
            path = self.tmp / f"worker{i}.yaml"
            path.write_text(yaml.safe_dump(doc))
            cmd = [sys.executable, "-m", "worker.cli", "run", str(path)]
            if self.models_dir is not None:
                cmd += ["--models-dir", str(self.models_dir)]
            log = (self.tmp / f"worker{i}.log").open("wb")
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO))
            self.ports.append(port)

    def subscribed(self) -> bool:
        import urllib.request

        for i, (proc, port) in enumerate(zip(self.procs, self.ports, strict=True)):
            if proc.poll() is not None:
                raise SystemExit(f"worker {i} exited: {(self.tmp / f'worker{i}.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                    if 'segstream_source_connected{source="line"} 1.0' not in r.read().decode():
                        return False
            except OSError:
                return False
        return True

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _wait(predicate: Any, what: str, timeout: float) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"error: timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def measure(
    workers: int, args: argparse.Namespace, payloads: list[bytes], models_dir: Path | None
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="segstream-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        broker = MosquittoBroker(tmp)
        broker.start()
        config = BrokerConfig(host=broker.host, port=broker.port)
        topic = f"bench{uuid.uuid4().hex[:6]}/frames"
        doc = demo_pipeline_document(
            model_id=args.model_id,
            sources=[
                {
                    "type": "mqtt",
                    "id": "line",
                    "topic": topic,
                    "shared_group": "bench",
                    "qos": 1,
                    "policy": "every_frame",
                    "queue_size": 8,
                }
            ],
            sinks=[{"type": "mqtt", "topic": "bench/{pipeline}/{source}/predictions"}],
            max_batch_size=args.max_batch_size,
            input_size=None,
            intra_op_threads=1,
            inference_threads=1,
            broker={"host": broker.host, "port": broker.port},
        )
        pool = Pool(tmp, workers, doc, models_dir)
        received: dict[str, float] = {}
        sent: dict[str, float] = {}
        try:
            pool.start()
            await _wait(pool.subscribed, "every worker subscribed", 180)
            async with make_client(config, identifier="bench-results") as results:
                await results.subscribe(f"bench/{doc['name']}/+/predictions", qos=1)

                async def collect() -> None:
                    async for message in results.messages:
                        assert isinstance(message.payload, bytes)
                        received.setdefault(json.loads(message.payload)["frame_id"], time.perf_counter())

                collector = asyncio.create_task(collect())
                async with make_client(config, identifier="bench-camera") as camera:
                    warm = [
                        json.dumps({**json.loads(p), "frame_id": f"w{n}"}).encode()
                        for n, p in enumerate(payloads[: args.warmup])
                    ]
                    for payload in warm:
                        await camera.publish(topic, payload, qos=1)
                    await _wait(lambda: len(received) >= len(warm), "the warm-up results", 300)
                    received.clear()
                    for n, payload in enumerate(payloads):
                        sent[f"f{n:05d}"] = time.perf_counter()
                        await camera.publish(topic, payload, qos=1)
                    await _wait(lambda: all(k in received for k in sent), "every result", 900)
                collector.cancel()
        finally:
            pool.stop()
            broker.stop()
    first = min(sent.values())
    last = max(received[k] for k in sent)
    latencies = [received[k] - sent[k] for k in sent]
    return {
        "fps": len(sent) / (last - first),
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--frames", type=int, default=200, help="frames measured per run")
    parser.add_argument("--warmup", type=int, default=16, help="frames sent (and waited for) first")
    parser.add_argument("--width", type=int, default=320, help="frame width in pixels (demo clip, resized)")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--workers", default="1,2", help="pool sizes to run, comma-separated")
    args = parser.parse_args()
    print_header(
        "pool throughput (backlog of --frames on one shared frames topic) and publish->result latency, "
        "1 inference thread and 1 intra-op thread per worker"
    )
    models_dir = resolve_models_dir(args)
    payloads = _frames(args.frames, args.width)
    fps: dict[int, float] = {}
    for workers in [int(w) for w in args.workers.split(",")]:
        result = asyncio.run(measure(workers, args, payloads, models_dir))
        fps[workers] = result["fps"]
        print(
            f"workers={workers}: {result['fps']:.1f} frames/s, latency p50 {result['p50'] * 1000:.0f} ms, "
            f"p99 {result['p99'] * 1000:.0f} ms ({args.frames} frames)",
            flush=True,
        )
    if 1 in fps and 2 in fps:
        print(f"workers2/workers1={fps[2] / fps[1]:.2f}")


if __name__ == "__main__":
    main()
