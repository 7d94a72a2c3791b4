"""Train the demo segmentation model from scratch on CPU and write the model package.

Usage::

    python -m training.train --seed 0 --minutes 43 --out worker/bundled_models/factory-parts/1

Steps: generate (or reuse) the cached synthetic training set, train with AdamW, a learning rate on
a cosine tied to elapsed time (the budget ends with a fully decayed rate) and an exponential moving
average of the weights, then export the EMA weights to ``<out>/weights.onnx``, check the export
against PyTorch and write ``<out>/metadata.json``. ``python -m training.evaluate`` then adds the
metrics and recommended confidence thresholds.

With ``--minutes`` the number of steps depends on the machine's speed; ``--steps`` fixes it instead
(bit-for-bit reproducible runs on the same software).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from training.data import MAX_INSTANCES, PAD_VALUE, TRAIN, CachedDataset, build_cache
from training.export import check_export, export_onnx
from training.loss import PROTO_STRIDE, LossParts, Targets, compute_loss
from training.model import SegNet
from training.synth import CLASS_NAMES

__all__ = [
    "ModelEMA",
    "TrainConfig",
    "augment",
    "cpu_has_bf16",
    "make_batch",
    "resolve_precision",
    "train",
    "train_step",
    "write_package",
    "zoom",
]

REPO = Path(__file__).resolve().parent.parent


class TrainConfig:
    """Hyper-parameters of a run (plain attributes, set from the command line)."""

    def __init__(self, **kw: object) -> None:
        self.seed = 0
        self.minutes = 43.0  # plus ~100 s of dataset generation: under 45 minutes in all
        self.steps = 0  # > 0: fixed number of steps instead of a time budget
        self.cache_size = 10_000
        # share of the wide training frames drawn crowded (``training.data``): in two 43-minute bf16
        # runs 0.5 lifted the clip's segm mAP50 from 0.879 to 0.919 (held-out 0.745 -> 0.750)
        self.dense = 0.5
        self.batch = 16
        self.size = 320
        self.lr = 2e-3
        self.weight_decay = 5e-4
        self.warmup = 0.03  # share of the budget
        self.final_lr = 0.02  # share of lr at the end of the cosine
        # the shipped factory-parts/1 was trained with 0.9995 (mean age of the averaged weights ~2000
        # steps); 0.997 (~330 steps) was tried and scored the same on held-out frames (segm mAP50
        # 0.878 vs 0.877) and lower on the clip (0.638 vs 0.688)
        self.ema_decay = 0.9995
        self.mask_dice = 0.0  # weight of the soft Dice term added to the mask BCE (``training.loss``)
        # zoomed batches (``zoom``) are off: a 40-minute run with half the batches zoomed by up to
        # 1.6x reached validation segm mAP50:95 0.720 (best at a 576 input) against 0.734 at 448
        self.zoom_prob = 0.0
        self.max_zoom = 1.6
        # "bf16": the network's forward runs under bfloat16 autocast (output layers and loss in
        # float32); "fp32": plain float32; "auto": bf16 where the CPU has native bfloat16 (see
        # ``cpu_has_bf16``)
        self.precision = "auto"
        self.threads = 2
        self.workers = 2
        self.log_every = 25
        self.cache_dir = REPO / "training" / "cache"
        self.run_dir = REPO / "training" / "runs" / "latest"
        for k, v in kw.items():
            if not hasattr(self, k):
                raise TypeError(f"unknown training option {k!r}")
            setattr(self, k, v)


class ModelEMA:
    """Exponential moving average of a model's weights (decay ramps up over the first updates)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / 500))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


def make_batch(ds: CachedDataset, idx: np.ndarray) -> tuple[torch.Tensor, Targets]:
    """Images ``(B, 3, S, S)`` float in [0, 1] and padded targets for dataset rows ``idx``."""
    idx = np.sort(idx)
    imgs = torch.from_numpy(np.ascontiguousarray(ds.images[idx])).permute(0, 3, 1, 2).float().div_(255.0)
    boxes = torch.from_numpy(ds.boxes[idx])
    cls = torch.from_numpy(ds.class_ids[idx].astype(np.int64))
    mi = ds.mask_index[idx]
    masks = torch.from_numpy(ds.masks[np.maximum(mi, 0)]).float().div_(255.0)
    masks[torch.from_numpy(mi < 0)] = 0.0
    return imgs, Targets(boxes, cls, masks)


def augment(imgs: torch.Tensor, t: Targets, gen: torch.Generator) -> tuple[torch.Tensor, Targets]:
    """Random horizontal/vertical flips and transposes (all 8 square symmetries), per image.

    Square inputs only. Each transform is applied to a random subset of the batch at once
    (``torch.where`` over the batch), to images, boxes and masks alike.
    """
    b, _, s, _ = imgs.shape
    boxes, masks = t.boxes.clone(), t.masks
    valid = (t.class_ids >= 0)[..., None]
    for op in ("hflip", "vflip", "transpose"):
        sel = torch.rand(b, generator=gen) < 0.5
        if not bool(sel.any()):
            continue
        s4 = sel[:, None, None, None]
        if op == "hflip":
            imgs = torch.where(s4, imgs.flip(-1), imgs)
            masks = torch.where(s4, masks.flip(-1), masks)
            nb = torch.stack((s - boxes[..., 2], boxes[..., 1], s - boxes[..., 0], boxes[..., 3]), -1)
        elif op == "vflip":
            imgs = torch.where(s4, imgs.flip(-2), imgs)
            masks = torch.where(s4, masks.flip(-2), masks)
            nb = torch.stack((boxes[..., 0], s - boxes[..., 3], boxes[..., 2], s - boxes[..., 1]), -1)
        else:
            imgs = torch.where(s4, imgs.transpose(-1, -2), imgs)
            masks = torch.where(s4, masks.transpose(-1, -2), masks)
            nb = boxes[..., [1, 0, 3, 2]]
        boxes = torch.where(sel[:, None, None] & valid, nb, boxes)
    return imgs.contiguous(), Targets(boxes, t.class_ids, masks.contiguous())


def zoom(
    imgs: torch.Tensor,
    t: Targets,
    gen: torch.Generator,
    *,
    prob: float = 0.5,
    max_zoom: float = 1.6,
    min_area: float = 12.0,
) -> tuple[torch.Tensor, Targets]:
    """Zoom into a random share of batches: upscale by ``z`` in ``[1, max_zoom]``, crop a window.

    The worker runs the model at a larger input than it was trained at (``training.evaluate``
    picks the size), so frames reach it upscaled; this shows the network such frames and larger
    parts at the training size and cost. One ``z`` per batch (one interpolation), a random window
    per image; window offsets are whole prototype cells so images and masks stay aligned. Boxes are
    scaled, shifted, clipped to the window and tightened to the cells where the cropped mask is
    non-zero; instances with less than ``min_area`` visible mask pixels (input pixels) become
    padding.
    """
    if max_zoom <= 1.0 or float(torch.rand(1, generator=gen)) >= prob:
        return imgs, t
    b, _, s, _ = imgs.shape
    cell = PROTO_STRIDE
    big = round(s * (1 + (max_zoom - 1) * float(torch.rand(1, generator=gen))) / cell) * cell
    if big <= s:
        return imgs, t
    z = big / s
    up = F.interpolate(imgs, size=(big, big), mode="bilinear", align_corners=False)
    mp = s // cell
    mup = F.interpolate(t.masks, size=(big // cell, big // cell), mode="bilinear", align_corners=False)
    span = (big - s) // cell
    off = torch.randint(0, span + 1, (b, 2), generator=gen)  # (x, y) in cells
    out_img = torch.empty_like(imgs)
    out_mask = torch.empty_like(t.masks)
    for i in range(b):
        ox, oy = int(off[i, 0]), int(off[i, 1])
        out_img[i] = up[i, :, oy * cell : oy * cell + s, ox * cell : ox * cell + s]
        out_mask[i] = mup[i, :, oy : oy + mp, ox : ox + mp]
    shift = (off * cell).float().repeat(1, 2)[:, None, :]  # (B, 1, 4) x, y, x, y
    boxes = (t.boxes * z - shift).clamp(0, s)
    on = out_mask > 1e-3
    cols, rows = on.any(-2), on.any(-1)  # (B, M, mp)
    idx = torch.arange(mp, dtype=boxes.dtype)
    big_i = torch.full_like(idx, float(mp))
    x0 = torch.where(cols, idx, big_i).amin(-1) * cell
    x1 = (torch.where(cols, idx, -big_i).amax(-1) + 1) * cell
    y0 = torch.where(rows, idx, big_i).amin(-1) * cell
    y1 = (torch.where(rows, idx, -big_i).amax(-1) + 1) * cell
    boxes = torch.stack(
        (
            torch.maximum(boxes[..., 0], x0),
            torch.maximum(boxes[..., 1], y0),
            torch.minimum(boxes[..., 2], x1),
            torch.minimum(boxes[..., 3], y1),
        ),
        -1,
    )
    area = out_mask.sum((-1, -2)) * cell * cell
    keep = (
        (t.class_ids >= 0)
        & (area >= min_area)
        & (boxes[..., 2] - boxes[..., 0] >= 2)
        & (boxes[..., 3] - boxes[..., 1] >= 2)
    )
    cls = torch.where(keep, t.class_ids, torch.full_like(t.class_ids, -1))
    boxes = torch.where(keep[..., None], boxes, torch.zeros_like(boxes))
    out_mask = torch.where(keep[..., None, None], out_mask, torch.zeros_like(out_mask))
    return out_img, Targets(boxes, cls, out_mask)


def train_step(
    net: SegNet,
    opt: torch.optim.Optimizer,
    ds: CachedDataset,
    idx: np.ndarray,
    gen: torch.Generator,
    cfg: TrainConfig,
) -> LossParts:
    """One optimisation step on dataset rows ``idx``: batch, zoom, flips, loss, backward, AdamW."""
    imgs, targets = make_batch(ds, idx)
    imgs, targets = zoom(imgs, targets, gen, prob=cfg.zoom_prob, max_zoom=cfg.max_zoom)
    imgs, targets = augment(imgs, targets, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_precision(cfg.precision) == "bf16"):
        out = net(imgs.contiguous(memory_format=torch.channels_last))
    parts = compute_loss(out, targets, mask_dice=cfg.mask_dice)
    opt.zero_grad(set_to_none=True)
    parts.total.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
    opt.step()
    return parts


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16, read from Linux's
    ``/proc/cpuinfo``); without it bfloat16 autocast is emulated and slower than float32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str) -> str:
    """``"bf16"`` or ``"fp32"`` for a configured ``precision`` (``"auto"``, ``"bf16"`` or ``"fp32"``)."""
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision


def _lr_at(cfg: TrainConfig, frac: float) -> float:
    if frac < cfg.warmup:
        return cfg.lr * (0.1 + 0.9 * frac / cfg.warmup)
    p = min(1.0, (frac - cfg.warmup) / (1 - cfg.warmup))
    return cfg.lr * (cfg.final_lr + (1 - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * p)))


def write_package(
    net: SegNet, out: Path, *, cfg: TrainConfig, provenance: dict[str, object]
) -> dict[str, object]:
    """Export ``net`` to ``out/weights.onnx``, check it, and write ``out/metadata.json``.

    Recommended parameters and metrics already in an existing ``metadata.json`` are dropped:
    they belong to the previous weights (``training.evaluate`` writes new ones).
    """
    out = Path(out)
    onnx_path = export_onnx(
        net, out / "weights.onnx", class_names=CLASS_NAMES, input_size=(cfg.size, cfg.size)
    )
    diffs = check_export(net, onnx_path)
    meta: dict[str, object] = {
        "schema_version": 1,
        "class_names": list(CLASS_NAMES),
        "input_size": [cfg.size, cfg.size],
        "pad_value": PAD_VALUE,
        "stride": 32,
        "task": "segment",
        "dynamic_input": True,
        "provenance": {
            **provenance,
            "export_check_max_abs_diff": diffs,
            "weights_bytes": onnx_path.stat().st_size,
        },
    }
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def train(cfg: TrainConfig, out: Path | None) -> SegNet:
    """Run training; write the package to ``out`` when given. Returns the EMA model."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 99])
    gen = torch.Generator().manual_seed(cfg.seed)
    t_cache = time.monotonic()
    name = f"train-seed{cfg.seed}-n{cfg.cache_size}-s{cfg.size}" + (f"-d{cfg.dense:g}" if cfg.dense else "")
    ds = build_cache(
        Path(cfg.cache_dir) / name,
        cfg.cache_size,
        seed=cfg.seed,
        purpose=TRAIN,
        size=cfg.size,
        workers=cfg.workers,
        dense=cfg.dense,
    )
    cache_s = time.monotonic() - t_cache
    n_inst = int((ds.class_ids >= 0).sum())
    print(
        f"dataset: {len(ds)} images, {n_inst} instances (max {MAX_INSTANCES}/image), {cache_s:.0f} s",
        flush=True,
    )

    net = SegNet(len(CLASS_NAMES)).to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.999),
    )
    ema = ModelEMA(net, cfg.ema_decay)
    budget = cfg.minutes * 60.0
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    step, seen, last_log, last_ckpt = 0, 0, t0, t0
    perm = rng.permutation(len(ds))
    pos = 0
    sums = np.zeros(5)
    net.train()
    while True:
        elapsed = time.monotonic() - t0
        frac = step / cfg.steps if cfg.steps > 0 else elapsed / budget
        if frac >= 1.0:
            break
        lr = _lr_at(cfg, frac)
        for g in opt.param_groups:
            g["lr"] = lr
        if pos + cfg.batch > len(perm):
            perm, pos = rng.permutation(len(ds)), 0
        idx = perm[pos : pos + cfg.batch]
        pos += cfg.batch
        parts = train_step(net, opt, ds, idx, gen, cfg)
        ema.update(net)
        step += 1
        seen += len(idx)
        sums += [
            float(parts.total.detach()),
            float(parts.box),
            float(parts.l1),
            float(parts.cls),
            float(parts.mask),
        ]
        if step % cfg.log_every == 0:
            now = time.monotonic()
            avg = sums / cfg.log_every
            sums[:] = 0
            rate = cfg.log_every * cfg.batch / (now - last_log)
            last_log = now
            print(
                f"step {step} t {now - t0:.0f}s lr {lr:.2e} loss {avg[0]:.3f} (giou {avg[1]:.3f}"
                f" l1 {avg[2]:.3f} cls {avg[3]:.3f} mask {avg[4]:.3f}) pos {parts.num_pos} {rate:.1f} img/s",
                flush=True,
            )
            if now - last_ckpt > 300:
                torch.save({"ema": ema.ema.state_dict(), "step": step}, run_dir / "last.pt")
                last_ckpt = now
    train_s = time.monotonic() - t0
    print(f"done: {step} steps, {seen} images in {train_s / 60:.1f} min", flush=True)
    torch.save({"ema": ema.ema.state_dict(), "step": step}, run_dir / "last.pt")
    model = ema.ema
    if out is not None:
        provenance = {
            "made_by": "python -m training.train",
            "seed": cfg.seed,
            "train_minutes": round(train_s / 60, 2),
            "time_budget_minutes": cfg.minutes if cfg.steps <= 0 else None,
            "steps": step,
            "batch": cfg.batch,
            "images_seen": seen,
            "dataset_images": len(ds),
            "dataset_instances": n_inst,
            "dataset_dense": cfg.dense,
            "dataset_generation_seconds": round(cache_s, 1),
            "parameters": n_params,
            "lr": cfg.lr,
            "ema_decay": cfg.ema_decay,
            "mask_dice": cfg.mask_dice,
            "zoom": {"prob": cfg.zoom_prob, "max": cfg.max_zoom},
            "input_size_trained": cfg.size,
            "precision": resolve_precision(cfg.precision),
            "threads": cfg.threads,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        meta = write_package(model, out, cfg=cfg, provenance=provenance)
        print(f"package written to {out}: {json.dumps(meta['provenance'])}", flush=True)
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--minutes", type=float, default=43.0, help="training time budget (excludes data generation)"
    )
    ap.add_argument("--steps", type=int, default=0, help="fixed number of steps instead of a time budget")
    ap.add_argument("--cache-size", type=int, default=10_000, help="number of generated training images")
    ap.add_argument("--dense", type=float, default=0.5, help="share of wide training frames drawn crowded")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--size", type=int, default=320, help="square training input size (scenes are rendered at it)"
    )
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema-decay", type=float, default=0.9995, help="decay of the weights' moving average")
    ap.add_argument(
        "--mask-dice", type=float, default=0.0, help="weight of a soft Dice term added to the mask BCE"
    )
    ap.add_argument("--zoom-prob", type=float, default=0.0, help="share of batches zoomed in (see zoom)")
    ap.add_argument("--max-zoom", type=float, default=1.6, help="largest zoom factor (1 turns zoom off)")
    ap.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="bf16: bfloat16 autocast for the network (output layers and loss stay float32); "
        "auto: bf16 where the CPU has native bfloat16",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="processes generating the dataset")
    ap.add_argument("--run-dir", type=Path, default=REPO / "training" / "runs" / "latest")
    ap.add_argument("--out", type=Path, default=None, help="model package folder to write")
    a = ap.parse_args(argv)
    cfg = TrainConfig(
        seed=a.seed,
        minutes=a.minutes,
        steps=a.steps,
        cache_size=a.cache_size,
        dense=a.dense,
        batch=a.batch,
        size=a.size,
        lr=a.lr,
        ema_decay=a.ema_decay,
        mask_dice=a.mask_dice,
        zoom_prob=a.zoom_prob,
        max_zoom=a.max_zoom,
        precision=a.precision,
        threads=a.threads,
        workers=a.workers,
        run_dir=a.run_dir,
    )
    train(cfg, a.out)


if __name__ == "__main__":
    main()
