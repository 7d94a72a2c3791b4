"""The clip's per-part analysis: tracks, recall per part, split instances ignored."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from training.clip_parts import clip_speed, link_tracks, mark_split_instances, matched_at_50, track_report


def _ann(ann_id: int, image_id: int, cls: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cls,
        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        "area": int(mask.sum()),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def _clip() -> dict:
    """Three 60x120 frames: a nut and a bolt moving 6 px right a frame; a bracket in two pieces."""
    images, anns = [], []
    for t in range(3):
        images.append({"id": t + 1, "width": 120, "height": 60})
        nut = np.zeros((60, 120), bool)
        nut[10:30, 10 + 6 * t : 30 + 6 * t] = True
        bolt = np.zeros((60, 120), bool)
        bolt[35:40, 5 + 6 * t : 45 + 6 * t] = True
        bracket = np.zeros((60, 120), bool)
        bracket[5:25, 80 + 6 * t : 86 + 6 * t] = True
        bracket[35:55, 80 + 6 * t : 86 + 6 * t] = True  # the same part, seen on both sides of another
        for cls, m in ((1, nut), (3, bolt), (4, bracket)):
            anns.append(_ann(len(anns) + 1, t + 1, cls, m))
    categories = [{"id": i, "name": n} for i, n in enumerate(("nut", "washer", "bolt", "bracket"), start=1)]
    info = {"speed_px_per_frame": 6}
    return {"info": info, "images": images, "annotations": anns, "categories": categories}


def test_instances_link_into_one_track_per_part() -> None:
    gt = _clip()
    tracks = link_tracks(gt, speed=6)
    assert len(tracks) == 3
    assert [[a["image_id"] for a in tr] for tr in tracks] == [[1, 2, 3]] * 3
    assert {tr[0]["category_id"] for tr in tracks} == {1, 3, 4}
    # at the wrong speed the boxes do not line up: every instance starts its own track
    assert len(link_tracks(gt, speed=-30)) == 9
    # by default the speed is the one the clip recorded (6 for clips that recorded none)
    assert clip_speed(gt) == 6.0 and len(link_tracks(gt)) == 3
    assert clip_speed({"images": [], "annotations": []}) == 6.0
    gt["info"]["speed_px_per_frame"] = -30
    assert len(link_tracks(gt)) == 9


def test_recall_per_track_counts_matched_instances() -> None:
    gt = _clip()
    nut_anns = [a for a in gt["annotations"] if a["category_id"] == 1]
    # detections: the nut in frames 1 and 2 only (its exact mask), a wrong-class box elsewhere
    results = [
        {"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"], "score": 0.9}
        for a in nut_anns[:2]
    ]
    results.append(
        {"image_id": 3, "category_id": 2, "segmentation": nut_anns[2]["segmentation"], "score": 0.8}
    )
    matched = matched_at_50(gt, results)
    assert [matched[a["id"]] for a in nut_anns] == [True, True, False]
    rows = track_report(link_tracks(gt), matched)
    assert [r["missed"] for r in rows] == [3, 3, 1]  # bolt and bracket never found, the nut once
    nut = next(r for r in rows if r["class"] == "nut")
    assert nut["instances"] == 3 and nut["recall"] == 2 / 3
    assert (nut["first_frame"], nut["last_frame"]) == (0, 2)
    assert all(v is False for v in matched_at_50(gt, []).values())


def test_instances_in_several_pieces_are_marked_crowd() -> None:
    gt = _clip()
    out, n = mark_split_instances(gt)
    assert n == 3
    assert [a["iscrowd"] for a in out["annotations"] if a["category_id"] == 4] == [1, 1, 1]
    assert all(a["iscrowd"] == 0 for a in out["annotations"] if a["category_id"] != 4)
    assert all(a["iscrowd"] == 0 for a in gt["annotations"])  # the input is left alone
    # with the piece threshold above half the mask, neither half counts as a piece of its own
    _, n = mark_split_instances(gt, min_piece=0.6)
    assert n == 0
