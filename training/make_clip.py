"""Make the demo clip: parts riding a conveyor belt, with COCO ground truth for every frame.

Usage::

    python -m training.make_clip --seed 0 --out worker/assets

writes ``demo_clip.mp4`` (1280x720, 25 fps, 10 s, MPEG-4 Part 2 through ``cv2.VideoWriter``) and
``demo_clip_coco.json`` (COCO instances; image ``id`` = frame index + 1, ``frame_index`` = the
frame's 0-based position in the video; masks as compressed RLE; ``bbox`` from the mask).

The scene is one long belt strip with parts fixed on it; each frame is a window that moves by a
whole number of pixels per frame, so parts move consistently from frame to frame, enter at the
left edge and leave at the right one. Exposure, colour cast and blur are the same for the whole
clip; sensor noise changes per frame. The ground truth is the exact visible mask of each part in
each frame (parts cut by the frame edge included), not a re-segmentation of the compressed video.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from training.data import CLIP
from training.synth import CLASS_NAMES, Finish, make_belt, place_parts, render

__all__ = ["CLIP_FILE", "CLIP_SPEED", "GT_FILE", "coco_categories", "make_clip", "render_clip_frames"]

CLIP_FILE = "demo_clip.mp4"
GT_FILE = "demo_clip_coco.json"
# Belt speed, pixels per frame: 600 px/s at 25 fps, so a part crosses the frame in about 2 s (about
# 0.5 m/s if the frame spans a metre of belt) and the 10 s clip shows about 50 distinct parts.
CLIP_SPEED = 24


def coco_categories() -> list[dict[str, object]]:
    """COCO categories: ``id`` = class id + 1 (COCO ids start at 1), names from ``CLASS_NAMES``."""
    return [{"id": i + 1, "name": n, "supercategory": "part"} for i, n in enumerate(CLASS_NAMES)]


def render_clip_frames(
    seed: int,
    *,
    width: int = 1280,
    height: int = 720,
    fps: int = 25,
    seconds: float = 10.0,
    speed: int = CLIP_SPEED,
    parts_per_screen: float = 9.0,
):
    """Yield ``(image_bgr, masks, class_ids)`` for each frame of the clip.

    Args:
        seed: the clip's seed (stream ``[seed, CLIP]``).
        speed: belt speed in pixels per frame (left to right).
        parts_per_screen: average number of parts in one frame.
    """
    rng = np.random.default_rng([seed, CLIP, 0])
    n = round(fps * seconds)
    travel = speed * (n - 1)
    strip_w = width + travel
    belt = make_belt(rng, height, strip_w)
    count = round(parts_per_screen * strip_w / width)
    short = height
    parts = place_parts(rng, height, strip_w, count, (0.085 * short, 0.38 * short))
    finish = Finish(
        gain=float(rng.uniform(0.9, 1.1)),
        cast=(1.0, 1.0, 1.0),
        offset=float(rng.uniform(-5, 5)),
        blur="motion",
        blur_size=3,
        noise_sigma=2.5,
    )
    light = (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
    belt_x = [p.x for p in parts]
    for t in range(n):
        x0 = travel - speed * t  # window start on the strip; the belt moves right
        frame_rng = np.random.default_rng([seed, CLIP, 1, t])
        window = belt[:, x0 : x0 + width]
        visible = []
        for p, bx in zip(parts, belt_x, strict=True):
            p.x = bx - x0
            if -p.radius < p.x < width + p.radius:
                visible.append(p)
        scene = render(window, visible, frame_rng, light=light, finish=finish, min_visible=40)
        yield scene.image, scene.masks, scene.class_ids


def make_clip(
    out: Path, seed: int = 0, *, fps: int = 25, seconds: float = 10.0, speed: int = CLIP_SPEED
) -> dict[str, object]:
    """Write the clip and its COCO ground truth into ``out``; returns a summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    video_path, gt_path = out / CLIP_FILE, out / GT_FILE
    width, height = 1280, 720
    writer = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"cannot open a video writer for {video_path}")
    images, annotations = [], []
    t0 = time.monotonic()
    try:
        for t, (img, masks, classes) in enumerate(
            render_clip_frames(seed, width=width, height=height, fps=fps, seconds=seconds, speed=speed)
        ):
            writer.write(img)
            image_id = t + 1
            images.append(
                {
                    "id": image_id,
                    "frame_index": t,
                    "file_name": f"{CLIP_FILE}#{t}",
                    "width": width,
                    "height": height,
                }
            )
            for m, c in zip(masks, classes, strict=True):
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(c) + 1,
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                        "area": int(m.sum()),
                        "bbox": [x, y, w, h],
                        "iscrowd": 0,
                    }
                )
    finally:
        writer.release()
    gt = {
        "info": {
            "description": "segstream demo clip ground truth (training/make_clip.py)",
            "seed": seed,
            "fps": fps,
            "speed_px_per_frame": speed,
            "video": CLIP_FILE,
        },
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    gt_path.write_text(json.dumps(gt, separators=(",", ":")))
    check_clip(video_path, len(images), (height, width))
    return {
        "frames": len(images),
        "instances": len(annotations),
        "video_bytes": video_path.stat().st_size,
        "gt_bytes": gt_path.stat().st_size,
        "seconds": round(time.monotonic() - t0, 1),
    }


def check_clip(path: Path, frames: int, shape: tuple[int, int]) -> None:
    """Read the video back with ``cv2.VideoCapture``; raise ``RuntimeError`` if it is not as written."""
    cap = cv2.VideoCapture(str(path))
    try:
        n = 0
        while True:
            ok, img = cap.read()
            if not ok:
                break
            if img.shape[:2] != shape:
                raise RuntimeError(f"{path}: frame {n} has shape {img.shape}, expected {shape}")
            n += 1
    finally:
        cap.release()
    if n != frames:
        raise RuntimeError(f"{path}: read back {n} frames, wrote {frames}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the demo clip and its COCO ground truth.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "worker" / "assets")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--speed", type=int, default=CLIP_SPEED, help="belt speed, pixels per frame")
    a = ap.parse_args(argv)
    print(json.dumps(make_clip(a.out, a.seed, seconds=a.seconds, speed=a.speed)))


if __name__ == "__main__":
    main()
