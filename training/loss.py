"""Batched task-aligned assignment and the detection + segmentation loss.

Everything works on whole-batch tensors with ground truth padded to ``M`` instances per image
(``gt_valid`` marks real ones); there is no per-image Python loop. Shapes below: ``B`` images,
``A`` anchors, ``M`` padded ground-truth slots, ``C`` classes, ``Hp x Wp`` prototype resolution.

- Assignment (TOOD / YOLOv8 style): for each ground truth, the anchors whose points lie inside its
  box are scored with ``score^alpha * IoU^beta``; the ``topk`` best become candidates; an anchor
  claimed by several ground truths goes to the one it overlaps most. Class targets are the
  normalised alignment scores.
- Loss: BCE on class logits, GIoU + L1 (in strides) on boxes, and BCE on mask logits
  (``coeffs @ proto``) against the ground-truth masks at prototype resolution, cropped to the
  ground-truth box and normalised by its area, optionally plus a soft Dice loss on the same cells.
  Mask logits are computed only inside the boxes, for all positives of the batch at once
  (``mask_loss``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F

from training.model import RawOutput, dist_to_xyxy

__all__ = ["LossParts", "Targets", "assign", "box_iou_pairs", "compute_loss", "mask_loss"]

EPS = 1e-9
PROTO_STRIDE = 4


class Targets(NamedTuple):
    """Padded ground truth of a batch.

    Attributes:
        boxes: ``(B, M, 4)`` float xyxy, input pixels.
        class_ids: ``(B, M)`` long, -1 for padding.
        masks: ``(B, M, Hp, Wp)`` float in [0, 1] (soft masks at prototype resolution).
    """

    boxes: torch.Tensor
    class_ids: torch.Tensor
    masks: torch.Tensor


class LossParts(NamedTuple):
    total: torch.Tensor
    box: torch.Tensor
    l1: torch.Tensor
    cls: torch.Tensor
    mask: torch.Tensor
    num_pos: int


def box_iou_pairs(a: torch.Tensor, b: torch.Tensor, giou: bool = False) -> torch.Tensor:
    """IoU (or GIoU) of boxes ``a`` and ``b`` broadcast against each other (xyxy, last dim 4)."""
    ix1 = torch.maximum(a[..., 0], b[..., 0])
    iy1 = torch.maximum(a[..., 1], b[..., 1])
    ix2 = torch.minimum(a[..., 2], b[..., 2])
    iy2 = torch.minimum(a[..., 3], b[..., 3])
    inter = (ix2 - ix1).clamp(min=0) * (iy2 - iy1).clamp(min=0)
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    union = area_a + area_b - inter + EPS
    iou = inter / union
    if not giou:
        return iou
    cx1 = torch.minimum(a[..., 0], b[..., 0])
    cy1 = torch.minimum(a[..., 1], b[..., 1])
    cx2 = torch.maximum(a[..., 2], b[..., 2])
    cy2 = torch.maximum(a[..., 3], b[..., 3])
    hull = (cx2 - cx1) * (cy2 - cy1) + EPS
    return iou - (hull - union) / hull


@torch.no_grad()
def assign(
    scores: torch.Tensor,
    pred_boxes: torch.Tensor,
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_cls: torch.Tensor,
    *,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task-aligned assignment for a whole batch.

    Args:
        scores: ``(B, A, C)`` sigmoid class scores (detached).
        pred_boxes: ``(B, A, 4)`` predicted xyxy boxes.
        anchors: ``(A, 2)`` anchor points.
        gt_boxes: ``(B, M, 4)`` xyxy.
        gt_cls: ``(B, M)`` long, -1 for padding.

    Returns:
        ``(fg, target_gt, target_scores)``: ``(B, A)`` bool foreground, ``(B, A)`` long index of
        the assigned ground truth (0 where not foreground), ``(B, A, C)`` soft class targets.
    """
    b, a, c = scores.shape
    m = gt_boxes.shape[1]
    if m == 0:
        return (
            torch.zeros(b, a, dtype=torch.bool),
            torch.zeros(b, a, dtype=torch.long),
            torch.zeros_like(scores),
        )
    valid = gt_cls >= 0  # (B, M)
    cls = gt_cls.clamp(min=0)
    ax, ay = anchors[:, 0], anchors[:, 1]
    inside = (
        (ax[None, None] > gt_boxes[..., 0:1])
        & (ax[None, None] < gt_boxes[..., 2:3])
        & (ay[None, None] > gt_boxes[..., 1:2])
        & (ay[None, None] < gt_boxes[..., 3:4])
        & valid[..., None]
    )  # (B, M, A)
    s = scores.transpose(1, 2).gather(1, cls[..., None].expand(b, m, a))  # (B, M, A)
    ious = box_iou_pairs(gt_boxes[:, :, None, :], pred_boxes[:, None, :, :]).clamp(min=0)
    align = s.pow(alpha) * ious.pow(beta) * inside
    k = min(topk, a)
    top_idx = align.topk(k, dim=-1).indices  # (B, M, k)
    cand = torch.zeros_like(inside).scatter_(-1, top_idx, True) & inside
    # anchors claimed by several ground truths: keep the one with the highest IoU
    multi = cand.sum(1) > 1  # (B, A)
    best = (ious * cand).argmax(1)  # (B, A)
    one = F.one_hot(best, m).transpose(1, 2).bool()  # (B, M, A)
    cand = torch.where(multi[:, None, :], one & cand, cand)
    fg = cand.any(1)
    target_gt = cand.float().argmax(1)
    align = align * cand
    align_max = align.amax(-1, keepdim=True)
    iou_max = (ious * cand).amax(-1, keepdim=True)
    norm = (align * iou_max / (align_max + EPS)).amax(1)  # (B, A)
    tcls = cls.gather(1, target_gt)  # (B, A)
    target_scores = F.one_hot(tcls, c).float() * (norm * fg)[..., None]
    return fg, target_gt, target_scores


def mask_loss(
    coeffs: torch.Tensor,
    proto: torch.Tensor,
    targets: Targets,
    bi: torch.Tensor,
    gi: torch.Tensor,
    *,
    dice: float = 0.0,
) -> torch.Tensor:
    """Mean over positives of the BCE of mask logits inside the ground-truth box, plus ``dice``
    times the mean soft Dice loss ``1 - (2|p t| + 1) / (|p| + |t| + 1)`` over the same cells.

    Args:
        coeffs: ``(P, 32)`` mask coefficients of the positives.
        proto: ``(B, 32, Hp, Wp)`` prototypes.
        targets: the batch's ground truth (soft masks at prototype resolution).
        bi, gi: ``(P,)`` image and ground-truth slot of each positive.

    The logits ``coeffs @ proto`` are computed only at the prototype cells whose centres lie inside
    the positive's ground-truth box (a small share of the map for parts of this size): all cells of all
    positives are listed in one flat index (``repeat_interleave`` over per-box cell counts) and
    evaluated with one gather and a row-wise dot product; per-positive means come from one
    ``index_add_``. Boxes that cover no cell centre add 0 to the mean.
    """
    b, c, hp, wp = proto.shape
    box = targets.boxes[bi, gi] / PROTO_STRIDE  # (P, 4) in cells
    # cells i with i + 0.5 in [x1, x2): i from ceil(x1 - 0.5) to ceil(x2 - 0.5) - 1
    x0 = torch.ceil(box[:, 0] - 0.5).clamp(0, wp).long()
    x1 = torch.ceil(box[:, 2] - 0.5).clamp(0, wp).long()
    y0 = torch.ceil(box[:, 1] - 0.5).clamp(0, hp).long()
    y1 = torch.ceil(box[:, 3] - 0.5).clamp(0, hp).long()
    w = (x1 - x0).clamp(min=0)
    h = (y1 - y0).clamp(min=0)
    counts = w * h  # (P,)
    num = coeffs.shape[0]
    owner = torch.repeat_interleave(torch.arange(num), counts)  # (N,)
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(owner.shape[0]) - start[owner]
    ww = w[owner]
    yy = y0[owner] + torch.div(local, ww, rounding_mode="floor")
    xx = x0[owner] + local % ww
    img = bi[owner]
    cells = proto.permute(0, 2, 3, 1).reshape(b * hp * wp, c)
    flat = (img * hp + yy) * wp + xx
    logits = (coeffs[owner] * cells[flat]).sum(-1)  # (N,)
    target = targets.masks[img, gi[owner], yy, xx]
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    per = torch.zeros(num, dtype=bce.dtype).index_add_(0, owner, bce)
    loss = (per / counts.clamp(min=1)).mean()
    if dice > 0:
        # Dice weighs each positive's mask as a whole, whatever its size: a one-cell error on a
        # thin bolt shaft costs it much more than the per-cell BCE says
        prob = logits.sigmoid()
        zeros = torch.zeros(num, dtype=prob.dtype)
        inter = zeros.index_add(0, owner, prob * target)
        total = zeros.index_add(0, owner, prob + target)
        loss = loss + dice * (1.0 - (2.0 * inter + 1.0) / (total + 1.0)).mean()
    return loss


def compute_loss(
    out: RawOutput,
    targets: Targets,
    *,
    gains: tuple[float, float, float, float] = (7.5, 1.5, 0.5, 7.5),
    mask_dice: float = 0.0,
) -> LossParts:
    """Total loss and its parts (box GIoU, box L1, class BCE, mask BCE [+ Dice]) for a batch."""
    pred_boxes = dist_to_xyxy(out.dist, out.anchors)
    fg, tgt, tscores = assign(
        out.cls_logits.detach().sigmoid(), pred_boxes.detach(), out.anchors, targets.boxes, targets.class_ids
    )
    tss = tscores.sum().clamp(min=1.0)
    loss_cls = F.binary_cross_entropy_with_logits(out.cls_logits, tscores, reduction="sum") / tss
    num_pos = int(fg.sum())
    zero = out.dist.sum() * 0.0
    if num_pos == 0:
        total = gains[2] * loss_cls + zero + out.coeffs.sum() * 0.0 + out.proto.sum() * 0.0
        return LossParts(total, zero, zero, loss_cls, zero, 0)

    bi, ai = fg.nonzero(as_tuple=True)
    gi = tgt[bi, ai]
    t_box = targets.boxes[bi, gi]  # (P, 4)
    p_box = pred_boxes[bi, ai]
    weight = tscores[bi, ai].sum(-1)
    giou = box_iou_pairs(p_box, t_box, giou=True)
    loss_box = ((1.0 - giou) * weight).sum() / tss
    anc = out.anchors[ai]
    stride = out.strides[ai]
    t_dist = torch.cat((anc - t_box[:, :2], t_box[:, 2:] - anc), -1).clamp(min=0) / stride
    p_dist = out.dist[bi, ai] / stride
    loss_l1 = (F.smooth_l1_loss(p_dist, t_dist, reduction="none").mean(-1) * weight).sum() / tss

    loss_mask = mask_loss(out.coeffs[bi, ai], out.proto, targets, bi, gi, dice=mask_dice)
    total = gains[0] * loss_box + gains[1] * loss_l1 + gains[2] * loss_cls + gains[3] * loss_mask
    return LossParts(
        total, loss_box.detach(), loss_l1.detach(), loss_cls.detach(), loss_mask.detach(), num_pos
    )
