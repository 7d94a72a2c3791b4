"""What metrics, the HTTP server and a closed preview page cost: the pipeline with and without them.

Two arms, the same pipeline otherwise (the demo workflow, the demo clip as a file source, the JSONL
sink, ``--batch`` frames per batch), alternated ``--repeats`` times in the order A B B A A B … so that
a drift of the machine's speed hits both alike:

- ``bare``: no HTTP server, and a ``Metrics`` whose recording methods do nothing (every call the
  stages make still happens, only the Prometheus bookkeeping is gone), no preview.
- ``observed``: what production runs plus the demo's preview: the real ``Metrics``, the aiohttp
  server with ``/metrics``, ``/healthz``, ``/readyz`` and the preview page enabled (nobody watching),
  and a scraper in the same process fetching ``/metrics`` and ``/healthz`` every ``--scrape-every``
  seconds (Prometheus scrapes every 15 s by default; 1 s is the harsher case).

Prints the median frames/s and process CPU milliseconds per frame of each arm and the overhead
``1 - observed/bare`` of throughput; the target is < 2 %. The last line sums up, e.g.
``overhead=0.6% observed/bare=0.994``.

``--case active-learning`` compares sampling off and on instead (both with the real ``Metrics``, no
HTTP server): ``bare`` is the demo step as it ships (``disable_active_learning: true``); ``observed``
sets ``disable_active_learning: false`` with the ``active_learning`` section of
``pipelines/active-learning.yaml`` (close-to-threshold, detection count and random strategies, its
limits, downsizing and JPEG quality), writing a real dataset into a temporary folder; ``--al-minutely``
overrides its per-minute limit (a higher one makes the writer thread busier).

Usage::

    python -m benchmarks.overhead [--frames 250] [--repeats 5] [--batch 4] [--untrained]
    python -m benchmarks.overhead --case active-learning [--al-minutely 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks._common import (
    DEFAULT_CLIP,
    REPO,
    PipelineRun,
    add_model_arguments,
    add_thread_arguments,
    demo_pipeline_document,
    print_header,
    resolve_models_dir,
    run_counted_pipeline,
)
from worker import __version__
from worker.config import PipelineConfig, read_document
from worker.ops.metrics import Metrics
from worker.telemetry import Telemetry

TARGET_OVERHEAD = 0.02
_RECORDING = [name for name in vars(Telemetry) if not name.startswith("_")] + ["loop_lag"]


class _SilentMetrics(Metrics):
    """``Metrics`` whose recording methods are no-ops: the baseline without Prometheus bookkeeping."""


def _noop(*_args: Any, **_kwargs: Any) -> None:
    return None


for _name in _RECORDING:
    setattr(_SilentMetrics, _name, _noop)


def _active_learning(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    section = dict(read_document(REPO / "pipelines" / "active-learning.yaml")["active_learning"])
    section["root"] = str(root)
    if args.al_minutely is not None:
        section["limits"] = {**section.get("limits", {}), "minutely": args.al_minutely}
    return section


def _config(args: argparse.Namespace, jsonl: Path, *, observed: bool) -> PipelineConfig:
    if args.case == "active-learning":
        return _sampling_config(args, jsonl, sampling=observed)
    http = {"enabled": True, "host": "127.0.0.1", "port": 0, "preview": True} if observed else None
    doc = demo_pipeline_document(
        model_id=args.model_id,
        sources=[{"type": "video", "id": "belt", "url": str(args.clip), "queue_size": 8}],
        sinks=[{"type": "jsonl", "path": str(jsonl)}],
        max_batch_size=args.batch,
        input_size=None,
        intra_op_threads=args.intra_op_threads,
        inference_threads=args.inference_threads,
        http=http,
    )
    return PipelineConfig.model_validate(doc)


def _sampling_config(args: argparse.Namespace, jsonl: Path, *, sampling: bool) -> PipelineConfig:
    extra = {"active_learning": _active_learning(args, jsonl.with_suffix(".dataset"))} if sampling else {}
    doc = demo_pipeline_document(
        model_id=args.model_id,
        sources=[{"type": "video", "id": "belt", "url": str(args.clip), "queue_size": 8}],
        sinks=[{"type": "jsonl", "path": str(jsonl)}],
        max_batch_size=args.batch,
        input_size=None,
        intra_op_threads=args.intra_op_threads,
        inference_threads=args.inference_threads,
        **extra,
    )
    for step in doc["workflow"]["steps"]:
        step["disable_active_learning"] = not sampling
    return PipelineConfig.model_validate(doc)


def _written(config: PipelineConfig) -> int:
    """Images in the dataset a sampling run wrote."""
    assert config.active_learning is not None
    return sum(
        len(json.loads(path.read_bytes())["images"])
        for path in config.active_learning.root.glob("*/*/_annotations.coco.json")
    )


async def _scrape(worker: Any, every_s: float, counts: list[int]) -> None:
    """Fetch ``/metrics`` and ``/healthz`` every ``every_s`` seconds while the worker runs."""
    await worker.started.wait()  # the HTTP server is up (and its port known) before this is set
    base = f"http://127.0.0.1:{worker.http_port}"
    async with aiohttp.ClientSession() as session:
        while True:
            for path in ("/metrics", "/healthz"):
                async with session.get(base + path) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{path} answered {response.status}")
            counts[0] += 1
            await asyncio.sleep(every_s)


async def _run_arm(
    args: argparse.Namespace, models_dir: Path | None, tmp: Path, *, observed: bool
) -> PipelineRun:
    config = _config(args, tmp / ("observed.jsonl" if observed else "bare.jsonl"), observed=observed)
    if args.case == "active-learning":
        if config.active_learning is not None:
            shutil.rmtree(config.active_learning.root, ignore_errors=True)
        run = await run_counted_pipeline(config, models_dir, args.frames)
        if config.active_learning is not None:
            written = _written(config)
            if written == 0:
                raise RuntimeError("the sampling run wrote no samples")
            print(f"         sampling on: {written} samples written", flush=True)
        return run
    if not observed:
        metrics = _SilentMetrics(config.name, version=__version__, sources=[s.id for s in config.sources])
        return await run_counted_pipeline(config, models_dir, args.frames, metrics=metrics)
    scrapes = [0]
    run = await run_counted_pipeline(
        config, models_dir, args.frames, during=lambda w: _scrape(w, args.scrape_every, scrapes)
    )
    if scrapes[0] == 0:
        raise RuntimeError("the scraper never got an answer from the observed worker")
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP, help="video file (default: the demo clip)")
    parser.add_argument("--frames", type=int, default=250, help="frames per run (the demo clip has 250)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each arm")
    parser.add_argument("--batch", type=int, default=4, help="max_batch_size")
    parser.add_argument("--scrape-every", type=float, default=1.0, help="seconds between scrapes")
    parser.add_argument(
        "--case",
        choices=("observability", "active-learning"),
        default="observability",
        help="observability: metrics + HTTP + closed preview vs none; active-learning: sampling on vs off",
    )
    parser.add_argument("--al-minutely", type=int, default=None, help="active-learning: per-minute limit")
    add_thread_arguments(parser)
    args = parser.parse_args(argv)
    if args.case == "active-learning":
        print_header("overhead: active-learning sampling on (observed) vs. off (bare)")
    else:
        print_header("overhead: pipeline with metrics + HTTP server + closed preview vs. without them")
    models_dir = resolve_models_dir(args)
    probe = _config(args, Path("unused.jsonl"), observed=False)
    print(
        f"pipeline: demo workflow, video file source, JSONL sink, batch {args.batch}, "
        f"intra_op_threads={probe.model.intra_op_threads}, inference_threads={probe.inference_threads}"
    )
    runs: dict[bool, list[PipelineRun]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="segstream-overhead-") as tmp:
        asyncio.run(_run_arm(args, models_dir, Path(tmp), observed=False))  # warm-up (page cache, JIT-free)
        for i in range(2 * args.repeats):
            observed = (i % 4) in (1, 2)  # A B B A A B B A ...
            run = asyncio.run(_run_arm(args, models_dir, Path(tmp), observed=observed))
            runs[observed].append(run)
            label = (
                ("on      " if observed else "off     ")
                if args.case == "active-learning"
                else ("observed" if observed else "bare    ")
            )
            print(
                f"run {i + 1:2d} {label} {run.fps:6.1f} fps  {run.cpu_ms_per_frame:6.2f} CPU ms/frame",
                flush=True,
            )
    fps = {k: statistics.median(r.fps for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r.cpu_ms_per_frame for r in v) for k, v in runs.items()}
    ratio = fps[True] / fps[False]
    overhead = 1.0 - ratio
    print(
        f"median over {args.repeats} runs each, {args.frames} frames, batch {args.batch}:\n"
        f"  bare      {fps[False]:6.1f} fps  {cpu[False]:6.2f} CPU ms/frame\n"
        f"  observed  {fps[True]:6.1f} fps  {cpu[True]:6.2f} CPU ms/frame "
        + (
            "(active-learning sampling on)"
            if args.case == "active-learning"
            else f"(scrape every {args.scrape_every:g} s, preview enabled, no viewer)"
        )
    )
    ok = overhead < TARGET_OVERHEAD
    print(f"target: throughput overhead < {TARGET_OVERHEAD:.0%}: {'PASS' if ok else 'FAIL'}")
    print(f"overhead={overhead:.1%} observed/bare={ratio:.3f} cpu_observed/bare={cpu[True] / cpu[False]:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
