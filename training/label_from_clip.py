"""Stand in for a labeller on the demo: give frames sampled from the demo clip their ground truth.

The worker's active learning (``pipelines/active-learning.yaml``) writes the frames it picks from the
demo clip with the model's predictions as pre-annotations. A person would correct those in a
labelling tool; for the demo the clip's exact ground truth (``worker/assets/demo_clip_coco.json``)
does it: every image of each batch (found by its ``segstream.frame_number``) gets the ground-truth
annotations of that frame instead of the predictions, and the file is rewritten atomically.

Usage::

    python -m training.label_from_clip out/active-learning/dataset/factory-parts
    python -m training.finetune --data out/active-learning/dataset/factory-parts --out models/factory-parts/2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from training.finetune import annotation_files
from worker.active_learning.dataset import atomic_write

__all__ = ["label_from_clip"]

DEFAULT_GT = Path(__file__).resolve().parent.parent / "worker" / "assets" / "demo_clip_coco.json"


def label_from_clip(files: list[Path], gt_path: Path = DEFAULT_GT) -> int:
    """Replace each image's annotations by the clip's ground truth of its frame; returns images labelled.

    Raises:
        ValueError: an image without a frame number, or a frame the ground truth does not have.
    """
    gt = json.loads(gt_path.read_text())
    gt_names = {c["id"]: c["name"] for c in gt["categories"]}
    by_frame: dict[int, list[dict[str, Any]]] = {}
    frame_of = {img["id"]: img["frame_index"] for img in gt["images"]}
    for ann in gt["annotations"]:
        by_frame.setdefault(frame_of[ann["image_id"]], []).append(ann)
    labelled = 0
    for file in files:
        coco = json.loads(file.read_text())
        cat_ids = {c["name"]: c["id"] for c in coco["categories"]}
        for name in gt_names.values():
            if name not in cat_ids:
                cat_ids[name] = max(cat_ids.values(), default=0) + 1
                coco["categories"].append({"id": cat_ids[name], "name": name, "supercategory": "none"})
        annotations = []
        for image in coco["images"]:
            frame = (image.get("segstream") or {}).get("frame_number")
            if frame is None or frame not in frame_of.values():
                raise ValueError(f"{file}: image {image['file_name']} is not a frame of the demo clip")
            if (image["width"], image["height"]) != (1280, 720):
                raise ValueError(f"{file}: image {image['file_name']} was downsized; labels need 1280x720")
            for ann in by_frame.get(frame, []):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image["id"],
                        "category_id": cat_ids[gt_names[ann["category_id"]]],
                        "segmentation": ann["segmentation"],
                        "area": ann["area"],
                        "bbox": ann["bbox"],
                        "iscrowd": 0,
                    }
                )
            labelled += 1
        coco["annotations"] = annotations
        atomic_write(file, json.dumps(coco, separators=(",", ":")).encode())
    return labelled


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, nargs="+", help="dataset/batch folders or COCO files")
    ap.add_argument("--gt", type=Path, default=DEFAULT_GT, help="the clip's ground truth (COCO)")
    a = ap.parse_args(argv)
    files = annotation_files(a.data)
    print(f"labelled {label_from_clip(files, a.gt)} images in {len(files)} files from {a.gt}")


if __name__ == "__main__":
    main()
