"""A small YOLOv8-style instance-segmentation network (about 2M parameters).

Backbone of strided 3x3 convolutions and C2f blocks (widths 16/32/64/128/192, one block per stage,
SPPF at the end), an FPN/PAN neck over strides 8/16/32, decoupled heads (box distances, class
logits, 32 mask coefficients) and a prototype branch at stride 4 (stride-8 neck features upsampled
and fused with the stride-4 backbone features).

``forward`` returns the raw training outputs (``RawOutput``). ``ExportWrapper`` turns them into the
layout of Ultralytics/Roboflow segmentation exports (``../../shared/spec/step.md`` section 3):
``output0 [B, 4 + C + 32, N]`` (cx, cy, w, h in input pixels, sigmoid class scores, coefficients)
and ``output1 [B, 32, h/4, w/4]`` prototypes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["STRIDES", "ExportWrapper", "RawOutput", "SegNet", "fp32_conv", "make_anchors"]

STRIDES = (8, 16, 32)
NUM_COEFFS = 32


class Conv(nn.Module):
    """Conv2d + BatchNorm + SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block with two convolutions and ``n`` bottlenecks (YOLOv8)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class RawOutput(NamedTuple):
    """Training outputs, anchors flattened over the three levels (``A`` anchors).

    Attributes:
        dist: ``(B, A, 4)`` left/top/right/bottom distances from the anchor point, input pixels.
        cls_logits: ``(B, A, C)``.
        coeffs: ``(B, A, 32)`` mask coefficients.
        proto: ``(B, 32, H/4, W/4)`` mask prototypes.
        anchors: ``(A, 2)`` anchor points (x, y) in input pixels.
        strides: ``(A, 1)``.
    """

    dist: torch.Tensor
    cls_logits: torch.Tensor
    coeffs: torch.Tensor
    proto: torch.Tensor
    anchors: torch.Tensor
    strides: torch.Tensor


def make_anchors(feats: list[torch.Tensor], strides: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points (cell centres, input pixels) and strides for feature maps ``feats``."""
    points, stride_list = [], []
    for f, s in zip(feats, strides, strict=True):
        h, w = f.shape[2], f.shape[3]
        sx = (torch.arange(w, dtype=f.dtype, device=f.device) + 0.5) * s
        sy = (torch.arange(h, dtype=f.dtype, device=f.device) + 0.5) * s
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((xx, yy), -1).reshape(-1, 2))
        stride_list.append(torch.full((h * w, 1), float(s), dtype=f.dtype, device=f.device))
    return torch.cat(points), torch.cat(stride_list)


def fp32_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` in float32 even inside a bfloat16 ``torch.autocast`` region.

    The output layers (box distances, class logits, mask coefficients, prototypes) stay in float32
    under mixed-precision training: bfloat16 keeps 8 bits of mantissa, about a pixel at the far
    end of a stride-32 box distance. Outside autocast (inference, export) this is plain ``conv(x)``.
    """
    if not torch.is_autocast_enabled(x.device.type):
        return conv(x)
    with torch.autocast(x.device.type, enabled=False):
        return conv(x.float())


class Head(nn.Module):
    def __init__(self, c_in: int, c_hidden: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(Conv(c_in, c_hidden, 3), Conv(c_hidden, c_hidden, 3))
        self.out = nn.Conv2d(c_hidden, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_conv(self.out, self.body(x))


class SegNet(nn.Module):
    """The segmentation network.

    Args:
        num_classes: number of classes ``C``.
        widths: channel widths of the five backbone stages (strides 2, 4, 8, 16, 32).
        head_width: hidden width of each head branch.
    """

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, int, int, int, int] = (16, 32, 64, 128, 192),
        head_width: int = 32,
    ) -> None:
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        self.num_classes = num_classes
        self.stem = Conv(3, w1, 3, 2)
        self.s2 = nn.Sequential(Conv(w1, w2, 3, 2), C2f(w2, w2))
        self.s3 = nn.Sequential(Conv(w2, w3, 3, 2), C2f(w3, w3))
        self.s4 = nn.Sequential(Conv(w3, w4, 3, 2), C2f(w4, w4))
        self.s5 = nn.Sequential(Conv(w4, w5, 3, 2), C2f(w5, w5), SPPF(w5, w5))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = C2f(w5 + w4, w4, shortcut=False)
        self.td3 = C2f(w4 + w3, w3, shortcut=False)
        self.down3 = Conv(w3, w3, 3, 2)
        self.bu4 = C2f(w3 + w4, w4, shortcut=False)
        self.down4 = Conv(w4, w4, 3, 2)
        self.bu5 = C2f(w4 + w5, w5, shortcut=False)
        level_ch = (w3, w4, w5)
        self.box = nn.ModuleList(Head(c, head_width, 4) for c in level_ch)
        self.cls = nn.ModuleList(Head(c, head_width, num_classes) for c in level_ch)
        self.coef = nn.ModuleList(Head(c, head_width, NUM_COEFFS) for c in level_ch)
        self.proto_in = Conv(w3, 64, 3)
        self.proto_fuse = Conv(64 + w2, 32, 1)
        self.proto_mid = Conv(32, 32, 3)
        self.proto_out = nn.Conv2d(32, NUM_COEFFS, 1)
        self._init_biases()

    def _init_biases(self) -> None:
        for head, s in zip(self.cls, STRIDES, strict=True):
            # prior: about 5 objects per 320x320 image over all cells of this level
            b = math.log(5 / self.num_classes / (320 / s) ** 2)
            nn.init.constant_(head.out.bias, b)
        for head in self.box:
            nn.init.constant_(head.out.bias, 1.0)

    def forward(self, x: torch.Tensor) -> RawOutput:
        """Args: ``x`` ``(B, 3, H, W)`` float RGB in [0, 1], H and W multiples of 32."""
        p2 = self.s2(self.stem(x))
        p3 = self.s3(p2)
        p4 = self.s4(p3)
        p5 = self.s5(p4)
        n4 = self.td4(torch.cat((self.up(p5), p4), 1))
        n3 = self.td3(torch.cat((self.up(n4), p3), 1))
        o4 = self.bu4(torch.cat((self.down3(n3), n4), 1))
        o5 = self.bu5(torch.cat((self.down4(o4), p5), 1))
        feats = [n3, o4, o5]
        b = x.shape[0]
        dist, cls, coef = [], [], []
        for i, f in enumerate(feats):
            s = STRIDES[i]
            dist.append((F.softplus(self.box[i](f)) * s).flatten(2))
            cls.append(self.cls[i](f).flatten(2))
            coef.append(self.coef[i](f).flatten(2))
        proto = self.proto_in(n3)
        proto = self.proto_fuse(torch.cat((self.up(proto), p2), 1))
        proto = fp32_conv(self.proto_out, self.proto_mid(proto))
        anchors, strides = make_anchors(feats, STRIDES)
        return RawOutput(
            dist=torch.cat(dist, 2).transpose(1, 2).reshape(b, -1, 4),
            cls_logits=torch.cat(cls, 2).transpose(1, 2),
            coeffs=torch.cat(coef, 2).transpose(1, 2),
            proto=proto,
            anchors=anchors,
            strides=strides,
        )


def dist_to_xyxy(dist: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``(..., A, 4)`` ltrb distances + ``(A, 2)`` points -> ``(..., A, 4)`` xyxy boxes."""
    lt, rb = dist[..., :2], dist[..., 2:]
    return torch.cat((anchors - lt, anchors + rb), -1)


class ExportWrapper(nn.Module):
    """Wraps ``SegNet`` to produce the Ultralytics segmentation export layout."""

    def __init__(self, net: SegNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        lt, rb = out.dist[..., :2], out.dist[..., 2:]
        x1y1 = out.anchors - lt
        x2y2 = out.anchors + rb
        cxcy = (x1y1 + x2y2) / 2
        wh = x2y2 - x1y1
        y = torch.cat((cxcy, wh, out.cls_logits.sigmoid(), out.coeffs), -1)
        return y.transpose(1, 2), out.proto
