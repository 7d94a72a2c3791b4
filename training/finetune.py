"""Fine-tune a model package on a labelled COCO dataset (the active-learning layout), write a new package.

Usage::

    python -m training.finetune --data out/active-learning/dataset/factory-parts \\
        --from worker/bundled_models/factory-parts/1 --steps 300 --out models/factory-parts/2
    python -m training.evaluate --package models/factory-parts/2 --write    # thresholds + metrics

``--data`` takes dataset folders, batch folders or ``_annotations.coco.json`` files (any number): every
``_annotations.coco.json`` below them is read, with its images next to it (the layout the worker's
active learning writes, which is also a Roboflow COCO export's layout; a labelling tool's COCO export
works when its images sit beside its annotations file). Segmentations can be RLE (compressed or not)
or polygons; categories are matched to the model's classes by name. Every image counts, one without
annotations as a frame with no parts.

The starting point is the package's ``weights.onnx`` itself (the bundled ``factory-parts/1`` by
default): its exporter folded each batch norm into the convolution before it, so
:func:`load_onnx_weights` puts the folded weights into the convolutions and turns the batch norms
into identities (scale 1, mean 0, variance ``1 - eps``, the folded bias as their shift), which gives
back the exported function exactly; :func:`training.export.check_export` confirms it before training.
The batch norms stay in evaluation mode while fine-tuning (their statistics are not re-estimated on a
small set; their scale and shift still learn). Training is the usual step (``training.train.train_step``:
flips, loss, AdamW) at a low learning rate, frames letterboxed to ``--size`` exactly like the worker's
pre-processing. The new package keeps the base package's class names, input size and padding; its
``recommended_parameters`` and metrics are dropped (they belonged to the old weights): run
``training.evaluate --write`` on it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import onnx
import torch
from onnx import numpy_helper
from pycocotools.coco import COCO
from torch import nn

from training.data import MAX_INSTANCES, PAD_VALUE, CachedDataset, letterbox_params
from training.export import check_export, export_onnx
from training.model import SegNet
from training.train import REPO, TrainConfig, resolve_precision, train_step

__all__ = ["annotation_files", "finetune", "load_coco_dataset", "load_onnx_weights"]

ANNOTATIONS_FILE = "_annotations.coco.json"
DEFAULT_BASE = REPO / "worker" / "bundled_models" / "factory-parts" / "1"


def annotation_files(paths: Iterable[Path]) -> list[Path]:
    """Every ``_annotations.coco.json`` in or below ``paths`` (files are taken as they are), sorted."""
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob(ANNOTATIONS_FILE)))
        else:
            raise FileNotFoundError(f"no such dataset, batch or annotations file: {path}")
    if not found:
        raise FileNotFoundError(f"no {ANNOTATIONS_FILE} under {[str(p) for p in paths]}")
    return found


def _letterbox_masks(masks: Sequence[np.ndarray], height: int, width: int, size: int) -> np.ndarray:
    _, nh, nw, top, left = letterbox_params(height, width, size)
    proto = size // 4
    out = np.zeros((len(masks), proto, proto), np.uint8)
    for k, mask in enumerate(masks):
        full = np.zeros((size, size), np.float32)
        full[top : top + nh, left : left + nw] = cv2.resize(
            mask.astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA
        )
        out[k] = np.round(cv2.resize(full, (proto, proto), interpolation=cv2.INTER_AREA) * 255).astype(
            np.uint8
        )
    return out


def load_coco_dataset(
    files: Sequence[Path], class_names: Sequence[str], *, size: int = 320
) -> tuple[CachedDataset, dict[str, int]]:
    """Training arrays from COCO files (images beside each file), letterboxed to ``size``.

    Boxes are the tight boxes of the masks (as the synthetic training set's); instances are kept
    largest first, at most ``MAX_INSTANCES`` per image.

    Returns:
        The dataset and counts: ``images``, ``instances``, ``truncated`` (instances over the cap),
        ``empty_masks`` (annotations whose mask has no pixel, skipped).

    Raises:
        ValueError: a category name the model does not have, or an image that cannot be read.
    """
    images, boxes_list, class_list, mask_chunks = [], [], [], []
    stats = {"images": 0, "instances": 0, "truncated": 0, "empty_masks": 0}
    for file in files:
        coco = COCO(str(file))
        cat_to_class = {}
        for cat in coco.dataset.get("categories", []):
            if cat["name"] not in class_names:
                used = coco.getAnnIds(catIds=[cat["id"]])
                if used:
                    raise ValueError(
                        f"{file}: category {cat['name']!r} ({len(used)} annotations) is not a class of the "
                        f"model {list(class_names)}"
                    )
                continue
            cat_to_class[cat["id"]] = list(class_names).index(cat["name"])
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            path = file.parent / info["file_name"]
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"{file}: cannot read image {path}")
            h, w = bgr.shape[:2]
            masks, classes = [], []
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)):
                mask = coco.annToMask({**ann, "image_id": image_id}).astype(bool)
                if mask.shape != (h, w):
                    raise ValueError(f"{file}: annotation {ann['id']} is {mask.shape}, its image {(h, w)}")
                if not mask.any():
                    stats["empty_masks"] += 1
                    continue
                masks.append(mask)
                classes.append(cat_to_class[ann["category_id"]])
            order = sorted(range(len(masks)), key=lambda k: -int(masks[k].sum()))
            stats["truncated"] += max(0, len(order) - MAX_INSTANCES)
            order = order[:MAX_INSTANCES]
            masks = [masks[k] for k in order]
            classes = [classes[k] for k in order]
            scale, nh, nw, top, left = letterbox_params(h, w, size)
            canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
            canvas[top : top + nh, left : left + nw] = cv2.resize(
                bgr, (nw, nh), interpolation=cv2.INTER_LINEAR
            )
            box = np.zeros((len(masks), 4), np.float32)
            for k, mask in enumerate(masks):
                ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                box[k] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
            images.append(canvas[:, :, ::-1])  # RGB, like the training cache
            boxes_list.append(box * scale + np.array([left, top, left, top], np.float32))
            class_list.append(np.array(classes, np.int64))
            mask_chunks.append(_letterbox_masks(masks, h, w, size))
            stats["images"] += 1
            stats["instances"] += len(masks)
    n = len(images)
    if n == 0:
        raise ValueError(f"no images in {[str(f) for f in files]}")
    boxes = np.zeros((n, MAX_INSTANCES, 4), np.float32)
    class_ids = np.full((n, MAX_INSTANCES), -1, np.int16)
    mask_index = np.full((n, MAX_INSTANCES), -1, np.int32)
    total = 0
    for i, (b, c) in enumerate(zip(boxes_list, class_list, strict=True)):
        k = len(c)
        boxes[i, :k] = b
        class_ids[i, :k] = c
        mask_index[i, :k] = np.arange(total, total + k)
        total += k
    proto = size // 4
    masks_arr = np.concatenate(mask_chunks) if total else np.zeros((0, proto, proto), np.uint8)
    ds = CachedDataset(np.ascontiguousarray(np.stack(images)), boxes, class_ids, mask_index, masks_arr)
    return ds, stats


def _conv_call_order(net: SegNet, size: int = 64) -> list[nn.Conv2d]:
    """The network's convolutions in the order a forward pass runs them (the exported graph's order)."""
    order: list[nn.Conv2d] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))  # type: ignore[arg-type]
        for m in net.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return order


@torch.no_grad()
def load_onnx_weights(net: SegNet, onnx_path: Path) -> int:
    """Put the weights of an exported ``SegNet`` (batch norms folded) back into ``net``.

    The i-th ``Conv`` node of the graph is the i-th convolution a forward pass runs; a convolution
    followed by a batch norm (the ``Conv`` blocks) gets the folded weight and bias, and its batch norm
    becomes the identity plus that bias.

    Returns:
        The number of convolutions loaded.

    Raises:
        ValueError: the graph's convolutions do not match the network's in number or shape.
    """
    model = onnx.load(str(onnx_path))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "Conv"]
    convs = _conv_call_order(net)
    if len(nodes) != len(convs):
        raise ValueError(f"{onnx_path}: {len(nodes)} Conv nodes, the network has {len(convs)} convolutions")
    bn_after = {}
    for module in net.modules():
        if hasattr(module, "conv") and hasattr(module, "bn"):
            bn_after[id(module.conv)] = module.bn
    for i, (node, conv) in enumerate(zip(nodes, convs, strict=True)):
        weight = init[node.input[1]]
        bias = init[node.input[2]] if len(node.input) > 2 else np.zeros(weight.shape[0], np.float32)
        if tuple(weight.shape) != tuple(conv.weight.shape):
            raise ValueError(
                f"Conv {i} ({node.name}): weight {weight.shape}, the network's {tuple(conv.weight.shape)}"
            )
        conv.weight.copy_(torch.from_numpy(np.array(weight)))
        bn = bn_after.get(id(conv))
        if bn is None:
            if conv.bias is None:
                raise ValueError(f"Conv {i} ({node.name}) has a bias, the network's convolution has none")
            conv.bias.copy_(torch.from_numpy(np.array(bias)))
        else:
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(np.array(bias)))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    return len(convs)


def _freeze_batch_norms(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()


def finetune(
    data: Sequence[Path],
    *,
    base: Path = DEFAULT_BASE,
    out: Path,
    steps: int = 300,
    batch: int = 8,
    lr: float = 2e-4,
    size: int = 320,
    seed: int = 0,
    precision: str = "auto",
    threads: int = 2,
    log_every: int = 25,
) -> dict[str, object]:
    """Fine-tune the package at ``base`` on the COCO data, write the new package to ``out``.

    Returns:
        The new package's metadata.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    base_meta = json.loads((Path(base) / "metadata.json").read_text())
    class_names = tuple(base_meta["class_names"])
    files = annotation_files(data)
    ds, stats = load_coco_dataset(files, class_names, size=size)
    print(f"data: {len(files)} annotation files, {json.dumps(stats)}", flush=True)
    net = SegNet(len(class_names)).to(memory_format=torch.channels_last)
    loaded = load_onnx_weights(net, Path(base) / "weights.onnx")
    start_diff = check_export(net, Path(base) / "weights.onnx", shapes=((1, size, size),))
    print(f"start: {loaded} convolutions from {base}/weights.onnx (max abs diff {start_diff})", flush=True)
    cfg = TrainConfig(batch=batch, size=size, precision=precision, zoom_prob=0.0, seed=seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    rng = np.random.default_rng([seed, 7])
    gen = torch.Generator().manual_seed(seed)
    net.train()
    _freeze_batch_norms(net)
    t0 = time.monotonic()
    losses: list[float] = []
    for step in range(1, steps + 1):
        idx = rng.choice(len(ds), size=min(batch, len(ds)), replace=len(ds) < batch)
        parts = train_step(net, opt, ds, idx, gen, cfg)
        losses.append(float(parts.total.detach()))
        if step % log_every == 0 or step == steps:
            recent = losses[-log_every:]
            print(
                f"step {step} loss {sum(recent) / len(recent):.3f} ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
    net.eval()
    out = Path(out)
    input_size = tuple(base_meta.get("input_size", (size, size)))
    onnx_path = export_onnx(net, out / "weights.onnx", class_names=class_names, input_size=input_size)
    diffs = check_export(net, onnx_path)
    meta: dict[str, object] = {
        key: value
        for key, value in base_meta.items()
        if key not in ("recommended_parameters", "metrics", "provenance")
    }
    meta["provenance"] = {
        "made_by": "python -m training.finetune",
        "base": str(base),
        "base_provenance_date": (base_meta.get("provenance") or {}).get("date"),
        "data": [str(f) for f in files],
        "data_stats": stats,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "size": size,
        "seed": seed,
        "precision": resolve_precision(precision),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_seconds": round(time.monotonic() - t0, 1),
        "export_check_max_abs_diff": diffs,
        "weights_bytes": onnx_path.stat().st_size,
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"package written to {out}", flush=True)
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="dataset/batch folders or COCO files")
    ap.add_argument("--from", dest="base", type=Path, default=DEFAULT_BASE, help="the package to start from")
    ap.add_argument("--out", type=Path, required=True, help="the new package's folder")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument(
        "--size", type=int, default=320, help="square training input (the base was trained at 320)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    finetune(
        a.data,
        base=a.base,
        out=a.out,
        steps=a.steps,
        batch=a.batch,
        lr=a.lr,
        size=a.size,
        seed=a.seed,
        precision=a.precision,
        threads=a.threads,
    )


if __name__ == "__main__":
    main()
