"""Training code end to end on a tiny set: assignment, loss, a few steps, export, package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.data import TRAIN, build_cache  # noqa: E402
from training.loss import Targets, assign, compute_loss, mask_loss  # noqa: E402
from training.model import ExportWrapper, SegNet, make_anchors  # noqa: E402
from training.train import (  # noqa: E402
    TrainConfig,
    augment,
    cpu_has_bf16,
    make_batch,
    resolve_precision,
    train,
    train_step,
    zoom,
)
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


def test_mask_loss_equals_the_cropped_bce_over_the_whole_prototype_map() -> None:
    torch.manual_seed(0)
    b, m, hp, wp = 3, 4, 12, 10
    proto = torch.randn(b, 32, hp, wp, requires_grad=True)
    masks = torch.rand(b, m, hp, wp)
    boxes = torch.tensor(
        [
            [0.0, 0.0, 40.0, 48.0],  # the whole map
            [5.0, 7.0, 23.0, 19.0],  # fractional edges: cells whose centres are inside count
            [10.5, 10.5, 11.5, 11.5],  # covers no cell centre (cells 2.625-2.875): adds 0
            [30.0, 2.0, 40.0, 30.0],
        ]
    ).expand(b, m, 4)
    targets = Targets(boxes.clone(), torch.zeros(b, m, dtype=torch.long), masks)
    bi = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    gi = torch.tensor([0, 1, 1, 2, 3, 0, 3, 1])
    coeffs = torch.randn(len(bi), 32, requires_grad=True)
    got = mask_loss(coeffs, proto, targets, bi, gi)
    with_dice = mask_loss(coeffs, proto, targets, bi, gi, dice=0.5)
    # reference: the full map for each positive, cropped by cell centres, mean over the crop
    xs = torch.arange(wp) + 0.5
    ys = torch.arange(hp) + 0.5
    per, dice = [], []
    for k in range(len(bi)):
        x1, y1, x2, y2 = (boxes[bi[k], gi[k]] / 4).tolist()
        crop = ((ys[:, None] >= y1) & (ys[:, None] < y2) & (xs[None] >= x1) & (xs[None] < x2)).float()
        logits = torch.einsum("c,chw->hw", coeffs[k], proto[bi[k]])
        target = masks[bi[k], gi[k]]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        per.append((bce * crop).sum() / crop.sum().clamp(min=1))
        p = logits.sigmoid() * crop
        dice.append(1 - (2 * (p * target).sum() + 1) / (p.sum() + (target * crop).sum() + 1))
    want = torch.stack(per).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    want_dice = want + 0.5 * torch.stack(dice).mean()
    assert with_dice.item() == pytest.approx(want_dice.item(), rel=1e-6)
    # the box over no cell centre (slot 2) adds nothing to either term
    assert all(per[k].item() == 0.0 and dice[k].item() == 0.0 for k in range(len(gi)) if gi[k] == 2)
    for g, w in ((got, want), (with_dice, want_dice)):
        g_got = torch.autograd.grad(g, (coeffs, proto), retain_graph=True)
        g_want = torch.autograd.grad(w, (coeffs, proto), retain_graph=True)
        for a, e in zip(g_got, g_want, strict=True):
            assert torch.allclose(a, e, atol=1e-6)


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


def _box_of(mask: torch.Tensor, cell: int = 4) -> torch.Tensor:
    ys, xs = torch.nonzero(mask > 1e-3, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float() * cell


def test_zoom_scales_and_crops_images_masks_and_boxes_together() -> None:
    gen = torch.Generator().manual_seed(0)
    s = 64
    imgs = torch.zeros(6, 3, s, s)
    imgs[:, 0, 16:32, 24:40] = 1.0  # a red square, x 24..40, y 16..32
    masks = torch.zeros(6, 2, s // 4, s // 4)
    masks[:, 0, 4:8, 6:10] = 1.0  # the same square at stride 4
    masks[:, 1, 0:1, 15:16] = 0.05  # a sliver in the top-right corner: 0.8 visible pixels
    boxes = torch.tensor([[24.0, 16.0, 40.0, 32.0], [60.0, 0.0, 64.0, 4.0]]).expand(6, 2, 4).clone()
    cls = torch.tensor([1, 2]).expand(6, 2).clone()
    out, t = zoom(imgs, Targets(boxes, cls, masks), gen, prob=1.0, max_zoom=2.0, min_area=12.0)
    assert out.shape == imgs.shape and t.masks.shape == masks.shape
    assert not torch.equal(out, imgs)
    for i in range(6):
        if t.class_ids[i, 0] < 0:
            continue
        red = out[i, 0] > 0.5
        ys, xs = torch.nonzero(red, as_tuple=True)
        # the box follows the pixels (to the resampling's blur) and the mask (to one cell)
        assert abs(float(t.boxes[i, 0, 0]) - float(xs.min())) <= 2
        assert abs(float(t.boxes[i, 0, 2]) - float(xs.max() + 1)) <= 2
        assert abs(float(t.boxes[i, 0, 1]) - float(ys.min())) <= 2
        box = _box_of(t.masks[i, 0])
        assert (t.boxes[i, 0, :2] >= box[:2]).all() and (t.boxes[i, 0, 2:] <= box[2:]).all()
    assert (t.class_ids[:, 0] == 1).sum() >= 3  # the square mostly stays in the window
    # the sliver (at most 0.8 * 2 * 2 visible pixels after zooming) becomes padding, never a ghost
    assert (t.class_ids[:, 1] == -1).all()
    assert (t.masks[:, 1] == 0).all() and (t.boxes[:, 1] == 0).all()


def test_zoom_is_a_no_op_when_off() -> None:
    gen = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, 32, 32)
    t = Targets(torch.zeros(2, 1, 4), torch.full((2, 1), -1), torch.zeros(2, 1, 8, 8))
    out, t2 = zoom(imgs, t, gen, prob=1.0, max_zoom=1.0)
    assert out is imgs and t2 is t
    out, t2 = zoom(imgs, t, gen, prob=0.0, max_zoom=1.6)
    assert out is imgs and t2 is t


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
    # training.evaluate --write also records the chosen default input size in the ONNX file
    import onnx

    from training.evaluate import set_onnx_imgsz

    before = model.infer([np.zeros((100, 200, 3), np.uint8)])[0].predictions
    set_onnx_imgsz(tmp_path / "pkg" / "weights.onnx", (384, 384))
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "pkg" / "weights.onnx")).metadata_props}
    assert props["imgsz"] == "[384, 384]" and props["task"] == "segment"
    again = OnnxSegmentationModel(tmp_path / "pkg", intra_op_threads=1, input_size=(320, 320))
    assert np.array_equal(again.infer([np.zeros((100, 200, 3), np.uint8)])[0].predictions, before)


def test_precision_setting_resolves_to_bf16_or_fp32() -> None:
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") == ("bf16" if cpu_has_bf16() else "fp32")
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("fp16")


def test_under_bf16_autocast_the_output_layers_stay_float32() -> None:
    torch.manual_seed(0)
    net = SegNet(4).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
    for name in ("dist", "cls_logits", "coeffs", "proto"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == torch.float32, name
        assert got.shape == want.shape, name
        # bfloat16 inside the network: close to, not equal to, the float32 outputs
        assert torch.allclose(got, want, atol=0.25, rtol=0.05), name
    # outside autocast (inference, ONNX export) nothing changes: plain float32 throughout
    with torch.no_grad():
        y0, p0 = ExportWrapper(net)(x)
    assert y0.dtype == torch.float32 and torch.equal(p0, ref.proto)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_lowers_the_loss_on_a_repeated_batch(tmp_path: Path, precision: str) -> None:
    torch.manual_seed(0)
    ds = build_cache(tmp_path / "cache", 4, seed=5, purpose=TRAIN, workers=1)
    net = SegNet(4).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    cfg = TrainConfig(batch=4, precision=precision)
    gen = torch.Generator().manual_seed(0)
    idx = np.arange(4)
    losses = []
    for _ in range(6):
        parts = train_step(net, opt, ds, idx, gen, cfg)
        assert torch.isfinite(parts.total)
        losses.append(float(parts.total.detach()))
    assert all(p.dtype == torch.float32 for p in net.parameters())  # master weights stay float32
    assert losses[-1] < losses[0]
