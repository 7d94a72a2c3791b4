"""Speed of one training step of the demo model against the network's own forward and backward.

- ``network``: ``SegNet`` forward and backward with a trivial loss (the sum of its outputs), on the
  same batch: the floor a training step cannot go below;
- ``step``: ``training.train.train_step``, what training runs per step: batch from the
  memory-mapped cache, flips, forward, ``compute_loss`` (assignment, box, class and mask terms),
  backward, gradient clipping, AdamW.

The two are alternated on the same batches of ``--batch`` generated 320x320 samples (a small cache
written to a temporary folder). Medians over ``--repeats`` of each; the ratio step/network is the
cost of everything that is not the network. Needs the ``training`` extra (torch).

Usage::

    python -m benchmarks.train_step [--threads 2] [--repeats 20] [--batch 16]
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
from training.train import TrainConfig, make_batch, train_step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--samples", type=int, default=256, help="generated samples to draw batches from")
    a = ap.parse_args(argv)
    print_header(
        f"training step vs network forward+backward, batch {a.batch} at 320x320, {a.threads} threads"
    )
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ds = build_cache(Path(tmp) / "cache", a.samples, seed=0, purpose=TRAIN, workers=a.threads)
        net = SegNet(4).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        cfg = TrainConfig(batch=a.batch, threads=a.threads)
        gen = torch.Generator().manual_seed(0)
        rng = np.random.default_rng(0)

        def network(imgs: torch.Tensor) -> None:
            out = net(imgs.contiguous(memory_format=torch.channels_last))
            loss = out.dist.sum() + out.cls_logits.sum() + out.coeffs.sum() + out.proto.sum()
            opt.zero_grad(set_to_none=True)
            (loss * 0.0).backward()

        times: dict[str, list[float]] = {"network": [], "step": []}
        positives = []
        for r in range(a.repeats + 2):
            idx = rng.choice(len(ds), a.batch, replace=False)
            imgs, _ = make_batch(ds, idx)
            t0 = time.perf_counter()
            network(imgs)
            t1 = time.perf_counter()
            positives.append(train_step(net, opt, ds, idx, gen, cfg).num_pos)
            t2 = time.perf_counter()
            if r >= 2:  # warm-up
                times["network"].append(t1 - t0)
                times["step"].append(t2 - t1)
    net_s = statistics.median(times["network"])
    step_s = statistics.median(times["step"])
    print(f"network forward+backward: {net_s * 1e3:.0f} ms per batch ({a.batch / net_s:.1f} images/s)")
    print(
        f"training step:            {step_s * 1e3:.0f} ms per batch ({a.batch / step_s:.1f} images/s), "
        f"median {int(statistics.median(positives))} positive anchors"
    )
    print(f"step/network={step_s / net_s:.2f}")


if __name__ == "__main__":
    main()
