"""Speed of one training step of the demo model against the network's own forward and backward.

- ``network fp32``: ``SegNet`` forward and backward in float32 with a trivial loss (the sum of its
  outputs), on the same batch;
- ``network bf16``: the same under bfloat16 autocast, as training runs it where the CPU has native
  bfloat16 (``--precision auto``; output layers stay float32);
- ``step``: ``training.train.train_step`` at ``--precision``, what training runs per step: batch
  from the memory-mapped cache, flips, forward, ``compute_loss`` (assignment, box, class and mask
  terms), backward, gradient clipping, AdamW.

The three are alternated on the same batches of ``--batch`` generated 320x320 samples (a small cache
written to a temporary folder). Medians over ``--repeats`` of each. ``bf16/fp32`` is the
network's speed-up from bfloat16; ``step/network`` (the network at the step's precision) is the cost
of everything that is not the network. Needs the ``training`` extra (torch).

Usage::

    python -m benchmarks.train_step [--threads 2] [--repeats 20] [--batch 16] [--precision auto]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import print_header
from training.data import TRAIN, build_cache
from training.model import SegNet
from training.train import TrainConfig, make_batch, resolve_precision, train_step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--samples", type=int, default=256, help="generated samples to draw batches from")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    a = ap.parse_args(argv)
    precision = resolve_precision(a.precision)
    print_header(
        f"training step ({precision}) vs network forward+backward, batch {a.batch} at 320x320, "
        f"{a.threads} threads"
    )
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ds = build_cache(Path(tmp) / "cache", a.samples, seed=0, purpose=TRAIN, workers=a.threads)
        net = SegNet(4).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        cfg = TrainConfig(batch=a.batch, threads=a.threads, precision=precision)
        gen = torch.Generator().manual_seed(0)
        rng = np.random.default_rng(0)

        def network(imgs: torch.Tensor, bf16: bool) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = net(imgs.contiguous(memory_format=torch.channels_last))
            loss = out.dist.sum() + out.cls_logits.sum() + out.coeffs.sum() + out.proto.sum()
            opt.zero_grad(set_to_none=True)
            (loss * 0.0).backward()

        times: dict[str, list[float]] = {"fp32": [], "bf16": [], "step": []}
        positives = []
        for r in range(a.repeats + 2):
            idx = rng.choice(len(ds), a.batch, replace=False)
            imgs, _ = make_batch(ds, idx)
            t0 = time.perf_counter()
            network(imgs, bf16=False)
            t1 = time.perf_counter()
            network(imgs, bf16=True)
            t2 = time.perf_counter()
            positives.append(train_step(net, opt, ds, idx, gen, cfg).num_pos)
            t3 = time.perf_counter()
            if r >= 2:  # warm-up
                times["fp32"].append(t1 - t0)
                times["bf16"].append(t2 - t1)
                times["step"].append(t3 - t2)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in ("fp32", "bf16"):
        print(
            f"network forward+backward {k}: {med[k] * 1e3:.0f} ms per batch ({a.batch / med[k]:.1f} images/s)"
        )
    print(
        f"training step ({precision}):      {med['step'] * 1e3:.0f} ms per batch "
        f"({a.batch / med['step']:.1f} images/s), median {int(statistics.median(positives))} positive anchors"
    )
    print(f"bf16/fp32={med['fp32'] / med['bf16']:.2f} (network speed-up)")
    print(f"step/network={med['step'] / med[precision]:.2f}")


if __name__ == "__main__":
    main()
