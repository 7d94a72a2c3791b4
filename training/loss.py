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
  ground-truth box and normalised by its area. Mask logits for all positives of the batch come from
  one batched matrix product over positives padded per image.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F

from training.model import RawOutput, dist_to_xyxy

__all__ = ["LossParts", "Targets", "assign", "box_iou_pairs", "compute_loss"]

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


def compute_loss(
    out: RawOutput,
    targets: Targets,
    *,
    gains: tuple[float, float, float, float] = (7.5, 1.5, 0.5, 7.5),
) -> LossParts:
    """Total loss and its parts (box GIoU, box L1, class BCE, mask BCE) for a batch."""
    b = out.cls_logits.shape[0]
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

    # masks: positives padded per image, one bmm with the prototypes
    hp, wp = out.proto.shape[2:]
    counts = fg.sum(1)
    pmax = int(counts.max())
    slot = (fg.cumsum(1) - 1)[bi, ai]
    coef_pad = out.coeffs.new_zeros(b, pmax, out.coeffs.shape[-1])
    coef_pad[bi, slot] = out.coeffs[bi, ai]
    gt_pad = torch.zeros(b, pmax, dtype=torch.long)
    gt_pad[bi, slot] = gi
    valid_pad = torch.zeros(b, pmax, dtype=torch.bool)
    valid_pad[bi, slot] = True
    logits = torch.bmm(coef_pad, out.proto.flatten(2))  # (B, P, Hp*Wp)
    tmask = targets.masks.flatten(2).gather(1, gt_pad[..., None].expand(-1, -1, hp * wp))
    box_p = targets.boxes.gather(1, gt_pad[..., None].expand(-1, -1, 4)) / PROTO_STRIDE
    bx1, by1, bx2, by2 = box_p.unbind(-1)
    bx1, by1, bx2, by2 = bx1[..., None], by1[..., None], bx2[..., None], by2[..., None]
    xs = (torch.arange(wp, dtype=logits.dtype) + 0.5).repeat(hp)[None, None]
    ys = (torch.arange(hp, dtype=logits.dtype) + 0.5).repeat_interleave(wp)[None, None]
    crop = ((xs >= bx1) & (xs < bx2) & (ys >= by1) & (ys < by2)).float()  # (B, P, Hp*Wp)
    bce = F.binary_cross_entropy_with_logits(logits, tmask, reduction="none")
    area = crop.sum(-1).clamp(min=1.0)
    per = (bce * crop).sum(-1) / area
    loss_mask = per[valid_pad].mean()
    total = gains[0] * loss_box + gains[1] * loss_l1 + gains[2] * loss_cls + gains[3] * loss_mask
    return LossParts(
        total, loss_box.detach(), loss_l1.detach(), loss_cls.detach(), loss_mask.detach(), num_pos
    )
