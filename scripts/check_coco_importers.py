"""Import an active-learning dataset with labelling tools' COCO importers and compare with pycocotools.

Run it with an environment that has the importers (not the worker's), e.g.::

    python -m venv /tmp/importers
    /tmp/importers/bin/pip install datumaro label-studio-converter pycocotools
    /tmp/importers/bin/python scripts/check_coco_importers.py out/active-learning/dataset/factory-parts

- Datumaro (the dataset library behind CVAT's dataset imports): the dataset folder as ``roboflow_coco``
  (one subset per batch folder, ``<batch>/_annotations.coco.json``, the layout of a Roboflow COCO export);
  every image's masks (or polygons), labels and scores must equal pycocotools' reading.
- label-studio-converter (Label Studio's ``label-studio-converter import coco``): converts each batch
  file into Label Studio tasks. It reads polygons only: a dataset written with the default RLE
  segmentations fails there (reported), one written with ``segmentation_format: polygon`` converts.

Exit status 0 when Datumaro's import matches pycocotools for every annotation.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO


def check_datumaro(root: Path) -> int:
    import datumaro as dm

    files = sorted(root.rglob("_annotations.coco.json"))
    mismatches = 0
    checked = 0
    whole = dm.Dataset.import_from(str(root), "roboflow_coco")
    print(
        f"datumaro {dm.__version__}: roboflow_coco import of {root}: {len(whole)} items, "
        f"subsets {sorted(whole.subsets())}"
    )
    for file in files:
        coco = COCO(str(file))
        names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
        subset = whole.get_subset(file.parent.name)
        labels = whole.categories()[dm.AnnotationType.label]
        by_name = {Path(item.media.path).name if item.media else item.id: item for item in subset}
        if len(by_name) != len(coco.imgs):
            print(f"  {file}: {len(by_name)} items, pycocotools {len(coco.imgs)} images")
            mismatches += 1
        for image in coco.imgs.values():
            item = by_name.get(image["file_name"]) or by_name.get(Path(image["file_name"]).stem)
            if item is None:
                print(f"  {file}: {image['file_name']} missing in datumaro's import")
                mismatches += 1
                continue
            anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=image["id"])), key=lambda a: a["id"])
            polygons = bool(anns) and isinstance(anns[0]["segmentation"], list)
            kind = dm.AnnotationType.polygon if polygons else dm.AnnotationType.mask
            masks = [a for a in item.annotations if a.type == kind]
            masks = sorted(masks, key=lambda a: a.id)
            if len(masks) != len(anns):
                print(f"  {image['file_name']}: {len(masks)} masks in datumaro, {len(anns)} annotations")
                mismatches += 1
                continue
            for ann, mask in zip(anns, masks, strict=True):
                checked += 1
                if polygons:  # the same points
                    same_mask = np.allclose(mask.points, ann["segmentation"][0])
                else:  # the same pixels
                    same_mask = np.array_equal(mask.image.astype(bool), coco.annToMask(ann).astype(bool))
                same_label = labels[mask.label].name == names[ann["category_id"]]
                same_score = abs(float(mask.attributes.get("score", -1)) - ann["score"]) < 1e-9
                if not (same_mask and same_label and same_score):
                    print(
                        f"  {image['file_name']} ann {ann['id']}: mask {same_mask} "
                        f"label {same_label} score {same_score}"
                    )
                    mismatches += 1
    print(
        f"datumaro: {checked} annotations in {len(files)} files compared with pycocotools, "
        f"{mismatches} mismatches"
    )
    return mismatches


def check_label_studio(root: Path) -> None:
    from label_studio_converter.imports.coco import convert_coco_to_ls

    for file in sorted(root.rglob("_annotations.coco.json")):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "tasks.json"
            try:
                convert_coco_to_ls(str(file), str(out), image_root_url=str(file.parent) + "/")
                tasks = json.loads(out.read_text())
                kinds = sorted(
                    {r["type"] for t in tasks for r in t["annotations"][0]["result"]} if tasks else set()
                )
                print(f"label-studio-converter: {file.parent.name}: {len(tasks)} tasks, result types {kinds}")
            except Exception as exc:  # report what the converter does with RLE
                last = traceback.extract_tb(exc.__traceback__)[-1]
                print(
                    f"label-studio-converter: {file.parent.name}: fails with {type(exc).__name__}: {exc} "
                    f"({Path(last.filename).name}:{last.lineno})"
                )


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path("out/active-learning/dataset/factory-parts")
    mismatches = check_datumaro(root)
    try:
        check_label_studio(root)
    except ImportError as exc:
        print(f"label-studio-converter not installed: {exc}")
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
