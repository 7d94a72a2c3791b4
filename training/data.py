"""Training samples from the synthetic generator, and the on-disk dataset cache.

A *sample* is one frame as the model sees it: a ``size x size`` RGB image (square scenes rendered
directly, or wide scenes letterboxed like the worker's pre-processing does with a 16:9 camera), its
boxes (xyxy, input pixels), class ids, and each instance's mask at prototype resolution
(``size / 4``, soft uint8 0..255 from area averaging of the exact mask).

Crowded frames (``dense``, for training: ``training.train --dense``): a share of the wide frames
is drawn with ``DENSE_PARTS`` parts instead of 1..12, closer to the demo clip. The shipped clip
shows 9.6 instances per frame, 4.6 % of them split into several pieces by parts lying on them (the
first clip, with a slower belt: 12.5 and 13.7 %); ordinary wide frames show 6.4 (6.2 % split),
crowded ones 12.3 (9.0 %). The draw that picks them happens only when ``dense > 0``, so the
validation, test and clip streams are the same frames as ever.

Random streams: frame ``i`` of purpose ``p`` with seed ``s`` uses
``numpy.random.default_rng([s, p, i])``; purposes ``TRAIN``, ``VAL``, ``TEST`` and ``CLIP`` never
share a stream, so held-out frames are never seen in training.

The cache (``build_cache``) stores ``n`` samples as ``.npy`` files in one folder, generated with a
process pool, and is loaded with memory mapping by ``load_cache``. Instances are padded to
``MAX_INSTANCES`` per image (class -1 marks padding) so a batch is built by plain indexing.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from training.synth import Scene, random_scene
from worker.models.letterbox import PAD_VALUE

__all__ = [
    "CLIP",
    "MAX_INSTANCES",
    "TEST",
    "TRAIN",
    "VAL",
    "CachedDataset",
    "Sample",
    "build_cache",
    "eval_frame",
    "letterbox_params",
    "load_cache",
    "make_sample",
]

TRAIN, VAL, TEST, CLIP = 0, 1, 2, 3
MAX_INSTANCES = 16
WIDE_FRACTION = 0.35  # share of samples that are letterboxed wide (16:9) frames
DENSE_PARTS = (10, 16)  # parts drawn in a crowded wide frame (``dense``)


@dataclass(slots=True)
class Sample:
    """One model-input frame and its targets."""

    image: np.ndarray  # (S, S, 3) uint8 RGB
    boxes: np.ndarray  # (K, 4) float32 xyxy in input pixels
    class_ids: np.ndarray  # (K,) int64
    masks: np.ndarray  # (K, S/4, S/4) uint8, 0..255


def letterbox_params(height: int, width: int, size: int) -> tuple[float, int, int, int, int]:
    """Scale, resized size and padding of the letterbox of a ``height x width`` frame.

    Returns:
        ``(scale, new_h, new_w, pad_top, pad_left)``.
    """
    scale = min(size / width, size / height)
    new_w, new_h = round(width * scale), round(height * scale)
    return scale, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


def eval_frame(seed: int, purpose: int, index: int, size: int = 320, *, dense: float = 0.0) -> Scene:
    """The original-resolution frame ``index`` of a stream (square or wide, as in training).

    ``dense``: share of the wide frames drawn crowded (``DENSE_PARTS`` parts); 0 leaves the stream
    exactly as it is without the option.
    """
    rng = np.random.default_rng([seed, purpose, index])
    if rng.random() < WIDE_FRACTION:
        h, w = int(size * 9 / 8), size * 2  # 16:9 at twice the model size (e.g. 640x360)
        short = h
        size_range = (0.085 * short, 0.38 * short)
        if dense > 0 and rng.random() < dense:
            lo, hi = DENSE_PARTS
            return random_scene(rng, h, w, size_range=size_range, min_parts=lo, max_parts=hi)
        return random_scene(rng, h, w, size_range=size_range, max_parts=12)
    return random_scene(rng, size, size)


def _boxes_from_masks(masks: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(masks), 4), np.float32)
    for k, m in enumerate(masks):
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        out[k] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return out


def make_sample(seed: int, purpose: int, index: int, size: int = 320, *, dense: float = 0.0) -> Sample:
    """Render frame ``index`` of the stream and turn it into a model-input sample.

    Square frames are used as they are; wide frames are letterboxed (bilinear resize, centred,
    padded with 114) exactly as inference pre-processing does. A random share of frames is passed
    through JPEG compression (the clip and cameras are compressed video).
    """
    scene = eval_frame(seed, purpose, index, size, dense=dense)
    rng = np.random.default_rng([seed, purpose, index, 1])
    img = scene.image
    h, w = img.shape[:2]
    boxes = _boxes_from_masks(scene.masks)
    proto = size // 4
    if (h, w) != (size, size):
        scale, nh, nw, top, left = letterbox_params(h, w, size)
        canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
        canvas[top : top + nh, left : left + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
        img = canvas
        boxes = boxes * scale + np.array([left, top, left, top], np.float32)
        masks = []
        for m in scene.masks:
            full = np.zeros((size, size), np.float32)
            full[top : top + nh, left : left + nw] = cv2.resize(
                m.astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA
            )
            masks.append(full)
    else:
        masks = [m.astype(np.float32) for m in scene.masks]
    if rng.random() < 0.4:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 95))])
        if ok:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    small = [
        np.round(cv2.resize(m, (proto, proto), interpolation=cv2.INTER_AREA) * 255).astype(np.uint8)
        for m in masks
    ]
    masks_arr = np.stack(small) if small else np.zeros((0, proto, proto), np.uint8)
    keep = (boxes[:, 2] - boxes[:, 0] >= 2) & (boxes[:, 3] - boxes[:, 1] >= 2)
    return Sample(
        image=np.ascontiguousarray(img[:, :, ::-1]),
        boxes=boxes[keep][:MAX_INSTANCES],
        class_ids=np.asarray(scene.class_ids, np.int64)[keep][:MAX_INSTANCES],
        masks=masks_arr[keep][:MAX_INSTANCES],
    )


@dataclass(slots=True)
class CachedDataset:
    """Padded training arrays (memory-mapped images).

    Attributes:
        images: ``(N, S, S, 3)`` uint8 RGB.
        boxes: ``(N, M, 4)`` float32 xyxy (zeros for padding).
        class_ids: ``(N, M)`` int16, -1 for padding.
        mask_index: ``(N, M)`` int32 index into ``masks``, -1 for padding.
        masks: ``(T, S/4, S/4)`` uint8 soft masks of all instances.
    """

    images: np.ndarray
    boxes: np.ndarray
    class_ids: np.ndarray
    mask_index: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _work(args: tuple[int, int, int, int, float]) -> tuple[int, Sample]:
    seed, purpose, index, size, dense = args
    return index, make_sample(seed, purpose, index, size, dense=dense)


def build_cache(
    folder: Path,
    n: int,
    *,
    seed: int,
    purpose: int = TRAIN,
    size: int = 320,
    workers: int = 2,
    dense: float = 0.0,
) -> CachedDataset:
    """Generate ``n`` samples into ``folder`` (reused as is when it already holds the same set)."""
    folder = Path(folder)
    meta = {"n": n, "seed": seed, "purpose": purpose, "size": size, "max_instances": MAX_INSTANCES, "v": 2}
    if dense > 0:
        meta["dense"] = dense
    meta_path = folder / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return load_cache(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    images = np.lib.format.open_memmap(
        folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3)
    )
    boxes = np.zeros((n, MAX_INSTANCES, 4), np.float32)
    class_ids = np.full((n, MAX_INSTANCES), -1, np.int16)
    mask_index = np.full((n, MAX_INSTANCES), -1, np.int32)
    mask_chunks: list[np.ndarray] = []
    total = 0
    t0 = time.monotonic()
    jobs = [(seed, purpose, i, size, dense) for i in range(n)]
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) as pool:
        for done, (i, s) in enumerate(pool.imap(_work, jobs, chunksize=32), start=1):
            k = len(s.class_ids)
            images[i] = s.image
            boxes[i, :k] = s.boxes
            class_ids[i, :k] = s.class_ids
            mask_index[i, :k] = np.arange(total, total + k)
            mask_chunks.append(s.masks)
            total += k
            if done % 1000 == 0:
                rate = done / (time.monotonic() - t0)
                print(f"cache: {done}/{n} samples ({rate:.0f}/s, eta {(n - done) / rate:.0f} s)", flush=True)
    images.flush()
    del images
    proto = size // 4
    masks = np.concatenate(mask_chunks) if total else np.zeros((0, proto, proto), np.uint8)
    np.save(folder / "boxes.npy", boxes)
    np.save(folder / "class_ids.npy", class_ids)
    np.save(folder / "mask_index.npy", mask_index)
    np.save(folder / "masks.npy", masks)
    meta_path.write_text(json.dumps(meta))
    print(f"cache: {n} samples, {total} instances in {time.monotonic() - t0:.0f} s", flush=True)
    return load_cache(folder)


def load_cache(folder: Path) -> CachedDataset:
    """Load a cache written by ``build_cache`` (images memory-mapped)."""
    folder = Path(folder)
    return CachedDataset(
        images=np.load(folder / "images.npy", mmap_mode="r"),
        boxes=np.load(folder / "boxes.npy"),
        class_ids=np.load(folder / "class_ids.npy"),
        mask_index=np.load(folder / "mask_index.npy"),
        masks=np.load(folder / "masks.npy"),
    )


def instance_count(ds: CachedDataset) -> int:
    """Number of real instances in the dataset."""
    return int((ds.class_ids >= 0).sum())
