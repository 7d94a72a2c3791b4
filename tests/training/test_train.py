"""Training code end to end on a tiny set: assignment, loss, a few steps, export, package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.data import TRAIN, build_cache  # noqa: E402
from training.loss import Targets, assign, compute_loss  # noqa: E402
from training.model import SegNet, make_anchors  # noqa: E402
from training.train import TrainConfig, augment, make_batch, train  # noqa: E402
from worker.models.onnx_backend import OnnxSegmentationModel  # noqa: E402


def test_assignment_picks_anchors_inside_the_box_of_the_right_class() -> None:
    feats = [torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    anchors, _ = make_anchors(feats, (8, 16, 32))
    a = anchors.shape[0]
    gt = torch.tensor([[[8.0, 8.0, 40.0, 40.0], [0.0, 0.0, 0.0, 0.0]]])
    cls = torch.tensor([[2, -1]])  # second slot is padding
    pred = gt[:, :1].expand(1, a, 4).clone()  # every anchor predicts the GT box
    scores = torch.full((1, a, 4), 0.5)
    fg, tgt, ts = assign(scores, pred, anchors, gt, cls, topk=5)
    assert int(fg.sum()) == 5
    pts = anchors[fg[0]]
    assert ((pts > 8) & (pts < 40)).all()
    assert (tgt[fg] == 0).all()
    assert (ts[fg].argmax(-1) == 2).all() and (ts[~fg] == 0).all()
    assert float(ts[fg].max()) == pytest.approx(1.0)  # IoU 1 for the best-aligned anchor


def test_loss_is_finite_and_backpropagates_to_all_heads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ds = build_cache(tmp_path / "cache", 4, seed=5, purpose=TRAIN, workers=1)
    imgs, targets = make_batch(ds, np.arange(4))
    assert imgs.shape == (4, 3, 320, 320) and targets.masks.shape[2:] == (80, 80)
    net = SegNet(4)
    parts = compute_loss(net(imgs), targets)
    assert torch.isfinite(parts.total) and parts.num_pos > 0
    parts.total.backward()
    for name in ("box", "cls", "coef"):
        grads = [p.grad for p in getattr(net, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
    assert net.proto_out.weight.grad is not None and net.proto_out.weight.grad.abs().sum() > 0


def test_augment_moves_boxes_with_the_masks() -> None:
    gen = torch.Generator().manual_seed(0)
    imgs = torch.zeros(8, 3, 32, 32)
    masks = torch.zeros(8, 1, 8, 8)
    masks[:, 0, 1:3, 4:8] = 1.0  # box x 16..32, y 4..12 at stride 4
    boxes = torch.tensor([16.0, 4.0, 32.0, 12.0]).expand(8, 1, 4).clone()
    _, t = augment(imgs, Targets(boxes, torch.zeros(8, 1, dtype=torch.long), masks), gen)
    for i in range(8):
        ys, xs = torch.nonzero(t.masks[i, 0], as_tuple=True)
        box_from_mask = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float() * 4
        assert torch.equal(t.boxes[i, 0], box_from_mask)


def test_a_few_steps_write_a_loadable_package(tmp_path: Path) -> None:
    cfg = TrainConfig(
        seed=3,
        steps=3,
        cache_size=8,
        batch=4,
        workers=1,
        log_every=1,
        cache_dir=tmp_path / "cache",
        run_dir=tmp_path / "run",
    )
    train(cfg, tmp_path / "pkg")
    meta = json.loads((tmp_path / "pkg" / "metadata.json").read_text())
    assert meta["provenance"]["steps"] == 3
    assert max(meta["provenance"]["export_check_max_abs_diff"].values()) < 1e-2
    model = OnnxSegmentationModel(tmp_path / "pkg", intra_op_threads=1)
    assert model.class_names == ("nut", "washer", "bolt", "bracket")
    (raw,) = model.infer([np.zeros((100, 200, 3), np.uint8)])
    assert raw.predictions.shape == (4 + 4 + 32, 2100)
    assert raw.prototypes.shape == (32, 80, 80)
