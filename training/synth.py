"""Synthetic conveyor-belt scenes of machine parts with exact instance masks.

Everything here is deterministic from a ``numpy.random.Generator``: the same seed gives the same
pixels and masks. A scene is a textured belt (``make_belt``) plus a list of ``Part`` objects, each a
set of polygons in its own coordinates (outer outline plus holes; holes are not part of the mask),
placed at a position and angle and rendered with shading, a soft shadow and anti-aliased edges.
``render`` returns the image and one full-frame boolean mask per visible instance (the visible part:
later parts occlude earlier ones).

Classes (ids are the model's class ids):

====  =======  ==========================================================
id    name     shape
====  =======  ==========================================================
0     nut      hexagon with a round hole
1     washer   ring (circle with a round hole), slightly elliptic at times
2     bolt     shaft with a wider head (side view), thin and elongated
3     bracket  L-shaped or straight plate with one or two round holes
====  =======  ==========================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = [
    "CLASS_NAMES",
    "Finish",
    "Part",
    "Scene",
    "apply_finish",
    "make_belt",
    "place_parts",
    "random_scene",
    "render",
    "sample_finish",
    "sample_part",
]

CLASS_NAMES: tuple[str, ...] = ("nut", "washer", "bolt", "bracket")

_SHIFT = 4  # fixed-point bits for sub-pixel polygon drawing
_SCALE = 1 << _SHIFT

# Finishes: base BGR colours of typical part surfaces.
_METAL_FINISHES = np.array(
    [
        [185, 185, 190],  # bright zinc
        [150, 152, 155],  # steel
        [95, 95, 100],  # dark steel
        [60, 165, 205],  # yellow zinc / brass
        [40, 40, 45],  # black oxide
        [120, 150, 170],  # bronze-ish
    ],
    dtype=np.float32,
)
_PAINT_FINISHES = np.array(
    [
        [40, 40, 200],  # red
        [200, 110, 30],  # blue
        [40, 160, 60],  # green
        [30, 200, 230],  # yellow
        [170, 170, 170],  # grey
        [40, 110, 230],  # orange
    ],
    dtype=np.float32,
)


@dataclass(slots=True)
class Part:
    """One part: shape in its own coordinates, pose and appearance.

    Attributes:
        class_id: index into ``CLASS_NAMES``.
        outer: ``(K, 2)`` float32 outline in part coordinates (pixels, centred on 0).
        holes: list of ``(K, 2)`` float32 hole outlines (not part of the mask).
        color: BGR float32 base colour ``(3,)``.
        x, y: centre position in frame pixels.
        angle: rotation in radians.
        shine: 0..1 strength of the specular-like gradient.
    """

    class_id: int
    outer: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)
    color: np.ndarray = field(default_factory=lambda: np.full(3, 150, np.float32))
    x: float = 0.0
    y: float = 0.0
    angle: float = 0.0
    shine: float = 0.5

    @property
    def radius(self) -> float:
        """Largest distance of the outline from the part's centre."""
        return float(np.sqrt((self.outer**2).sum(axis=1)).max())


@dataclass(slots=True)
class Scene:
    """A rendered frame and its instances (visible masks, in drawing order)."""

    image: np.ndarray  # (H, W, 3) uint8 BGR
    masks: list[np.ndarray]  # each (H, W) bool
    class_ids: list[int]


def _circle(r: float, n: int = 40, sx: float = 1.0, sy: float = 1.0) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([np.cos(t) * r * sx, np.sin(t) * r * sy], axis=1).astype(np.float32)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)


def sample_part(rng: np.random.Generator, class_id: int, size: float) -> Part:
    """Draw a random part of ``class_id`` whose largest extent is about ``size`` pixels."""
    r = size / 2.0
    metal = _METAL_FINISHES[rng.integers(len(_METAL_FINISHES))]
    color = np.clip(metal * rng.uniform(0.8, 1.15) + rng.normal(0, 8, 3), 10, 245).astype(np.float32)
    shine = float(rng.uniform(0.2, 0.9))
    holes: list[np.ndarray] = []
    if class_id == 0:  # nut: hexagon + hole
        t = np.arange(6) * (math.pi / 3) + rng.uniform(0, math.pi / 3)
        outer = np.stack([np.cos(t) * r, np.sin(t) * r], axis=1).astype(np.float32)
        holes.append(_circle(r * rng.uniform(0.38, 0.55), 32))
    elif class_id == 1:  # washer: ring, maybe slightly tilted
        sy = float(rng.uniform(0.8, 1.0))
        outer = _circle(r, 48, 1.0, sy)
        holes.append(_circle(r * rng.uniform(0.35, 0.55), 32, 1.0, sy))
    elif class_id == 2:  # bolt: shaft + head, side view
        length = size
        aspect = rng.uniform(3.0, 7.0)
        w = max(length / aspect, 3.0)
        head_w = w * rng.uniform(1.5, 2.2)
        head_l = w * rng.uniform(0.6, 1.1)
        x0 = -length / 2
        shaft = _rect(x0 + head_l, -w / 2, length / 2, w / 2)
        tip = rng.uniform(0.0, 0.35) * w
        shaft[1, 1] += tip
        shaft[2, 1] -= tip
        head = _rect(x0, -head_w / 2, x0 + head_l, head_w / 2)
        # outline: head then shaft, as one polygon
        outer = np.array(
            [
                head[0],
                head[1],
                [x0 + head_l, -w / 2],
                shaft[1],
                shaft[2],
                [x0 + head_l, w / 2],
                head[2],
                head[3],
            ],
            dtype=np.float32,
        )
    else:  # bracket: L or straight plate with holes
        color = np.clip(
            _PAINT_FINISHES[rng.integers(len(_PAINT_FINISHES))] * rng.uniform(0.75, 1.1)
            + rng.normal(0, 10, 3),
            10,
            245,
        ).astype(np.float32)
        if rng.random() < 0.35:
            color = metal.copy()
        length = size
        t = length * rng.uniform(0.22, 0.4)
        if rng.random() < 0.7:  # L shape
            leg = length * rng.uniform(0.5, 0.9)
            h = length / 2
            outer = np.array(
                [[-h, -h], [h, -h], [h, -h + t], [-h + t, -h + t], [-h + t, -h + leg], [-h, -h + leg]],
                dtype=np.float32,
            )
            holes.append(_circle(t * 0.28, 24) + np.array([h - t * 0.9, -h + t / 2], np.float32))
            if leg > 2.2 * t:
                holes.append(_circle(t * 0.28, 24) + np.array([-h + t / 2, -h + leg - t * 0.8], np.float32))
            shift = outer.mean(axis=0)
            outer = outer - shift
            holes = [hh - shift for hh in holes]
        else:  # straight plate, rounded feel via octagon-ish corners
            h, ht = length / 2, t * 0.8
            c = ht * 0.4
            outer = np.array(
                [
                    [-h + c, -ht],
                    [h - c, -ht],
                    [h, -ht + c],
                    [h, ht - c],
                    [h - c, ht],
                    [-h + c, ht],
                    [-h, ht - c],
                    [-h, -ht + c],
                ],
                dtype=np.float32,
            )
            hr = ht * rng.uniform(0.3, 0.45)
            holes.append(_circle(hr, 24) + np.array([-h + ht, 0], np.float32))
            holes.append(_circle(hr, 24) + np.array([h - ht, 0], np.float32))
    return Part(class_id=class_id, outer=outer, holes=holes, color=color, shine=shine)


def make_belt(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured conveyor-belt background ``(height, width, 3)`` float32 BGR (0..255).

    Belt runs horizontally: seams and ribs are vertical lines, with a lengthwise gradient,
    blotches (dirt/wear) and fine grain.
    """
    base = rng.uniform(30, 150)
    tint = rng.normal(0, 10, 3)
    if rng.random() < 0.25:  # coloured belts (green/blue/tan)
        tint = np.array([[30, 40, -20], [-20, 30, -25], [-25, 0, 30]][rng.integers(3)], np.float64)
        tint *= rng.uniform(0.5, 1.3)
    img = np.empty((height, width, 3), np.float32)
    img[:] = np.clip(base + tint, 5, 250).astype(np.float32)
    # gradient across the belt (lighting)
    gy = np.linspace(-1, 1, height, dtype=np.float32)[:, None, None]
    gx = np.linspace(-1, 1, width, dtype=np.float32)[None, :, None]
    img += (gy * rng.uniform(-25, 25) + gx * rng.uniform(-20, 20)).astype(np.float32)
    # low-frequency blotches
    small = rng.normal(0, 1, (max(2, height // 40), max(2, width // 40))).astype(np.float32)
    blot = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    img += blot[:, :, None] * rng.uniform(3, 14)
    # ribs / seams across the belt
    kind = rng.integers(3)
    if kind == 0:
        period = rng.uniform(6, 30) * width / 320
        phase = rng.uniform(0, period)
        xs = np.arange(width, dtype=np.float32)
        rib = (np.sin((xs + phase) * 2 * math.pi / period) > rng.uniform(0.2, 0.8)).astype(np.float32)
        img += (rib * rng.uniform(-18, 18))[None, :, None]
    elif kind == 1:
        period = rng.uniform(40, 160) * width / 320
        xs = np.arange(width, dtype=np.float32)
        seam = (np.mod(xs + rng.uniform(0, period), period) < max(1.0, width / 320)).astype(np.float32)
        img -= (seam * rng.uniform(15, 45))[None, :, None]
    # fine grain (fabric), a bit anisotropic
    grain = rng.normal(0, 1, (height, width)).astype(np.float32)
    grain = cv2.blur(grain, (int(rng.integers(1, 4)), 1))
    img += grain[:, :, None] * rng.uniform(2, 8)
    return img


def _polys_px(part: Part) -> tuple[np.ndarray, list[np.ndarray]]:
    c, s = math.cos(part.angle), math.sin(part.angle)
    rot = np.array([[c, -s], [s, c]], dtype=np.float32)
    off = np.array([part.x, part.y], np.float32)

    def tf(p: np.ndarray) -> np.ndarray:
        return p @ rot.T + off

    return tf(part.outer), [tf(h) for h in part.holes]


def _fill(mask: np.ndarray, polys: list[np.ndarray], ox: float, oy: float, value: int) -> None:
    pts = [np.round((p - np.array([ox, oy], np.float32)) * _SCALE).astype(np.int32) for p in polys]
    cv2.fillPoly(mask, pts, value, lineType=cv2.LINE_8, shift=_SHIFT)


def part_mask(part: Part, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """The part's own (unoccluded) mask inside its bounding crop.

    Returns:
        ``(crop, x0, y0)``: crop ``(h, w)`` bool and its top-left offset in the frame; an empty
        ``(0, 0)`` crop when the part is outside the frame.
    """
    outer, holes = _polys_px(part)
    x0 = max(math.floor(outer[:, 0].min()) - 1, 0)
    y0 = max(math.floor(outer[:, 1].min()) - 1, 0)
    x1 = min(math.ceil(outer[:, 0].max()) + 2, width)
    y1 = min(math.ceil(outer[:, 1].max()) + 2, height)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), bool), 0, 0
    crop = np.zeros((y1 - y0, x1 - x0), np.uint8)
    _fill(crop, [outer], x0, y0, 1)
    if holes:
        _fill(crop, holes, x0, y0, 0)
    return crop.astype(bool), x0, y0


def render(
    belt: np.ndarray,
    parts: list[Part],
    rng: np.random.Generator,
    *,
    light: tuple[float, float] = (0.0, 0.0),
    min_visible: int = 12,
    finish: Finish | None = None,
) -> Scene:
    """Render ``parts`` (in order, later on top) on ``belt`` and finish the frame.

    Args:
        belt: ``(H, W, 3)`` float32 background (not modified).
        parts: parts with positions; later parts occlude earlier ones.
        rng: randomness for the photometric finish (noise, blur, exposure).
        light: direction of the light, for shadows (dx, dy in pixels per 10 px of size).
        min_visible: instances with fewer visible pixels are dropped from the ground truth.
        finish: exposure/blur/noise settings; drawn from ``rng`` when None (a video passes the
            same settings for every frame; the sensor noise is drawn per frame either way).

    Returns:
        The ``Scene`` with uint8 image and the visible mask of each kept instance.
    """
    height, width = belt.shape[:2]
    img = belt.copy()
    full_masks: list[np.ndarray] = []
    kept_class: list[int] = []
    sx, sy = light
    for part in parts:
        crop, x0, y0 = part_mask(part, height, width)
        if crop.size == 0 or not crop.any():
            continue
        h, w = crop.shape
        # soft shadow, offset by the light direction
        pad = int(max(3, part.radius * 0.25))
        dx = round(sx * part.radius * 0.12)
        dy = round(sy * part.radius * 0.12)
        X0, Y0 = max(x0 - pad, 0), max(y0 - pad, 0)
        X1, Y1 = min(x0 + w + pad, width), min(y0 + h + pad, height)
        sh = np.zeros((Y1 - Y0, X1 - X0), np.float32)
        tx0, ty0 = x0 - X0 + dx, y0 - Y0 + dy
        a0, b0 = max(tx0, 0), max(ty0, 0)
        a1, b1 = min(tx0 + w, sh.shape[1]), min(ty0 + h, sh.shape[0])
        if a1 > a0 and b1 > b0:
            sh[b0:b1, a0:a1] = crop[b0 - ty0 : b1 - ty0, a0 - tx0 : a1 - tx0]
            k = 2 * int(max(1, part.radius * 0.12)) + 1
            sh = cv2.GaussianBlur(sh, (k, k), 0)
            img[Y0:Y1, X0:X1] *= (1.0 - 0.45 * sh)[:, :, None]
        # part surface: base colour, directional gradient, speckle
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ca, sa = math.cos(part.angle + 0.7), math.sin(part.angle + 0.7)
        u = ((xx + x0 - part.x) * ca + (yy + y0 - part.y) * sa) / max(part.radius, 1.0)
        shade = 1.0 + part.shine * 0.35 * u
        surf = part.color[None, None, :] * shade[:, :, None]
        surf += rng.normal(0, 4, (h, w, 1)).astype(np.float32)
        alpha = cv2.GaussianBlur(crop.astype(np.float32), (3, 3), 0.6)
        # darken the rim a little (edges of real parts read darker)
        inner = cv2.erode(crop.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(np.float32)
        surf *= (0.75 + 0.25 * inner)[:, :, None]
        region = img[y0 : y0 + h, x0 : x0 + w]
        region[:] = region * (1 - alpha[:, :, None]) + surf * alpha[:, :, None]
        full = np.zeros((height, width), bool)
        full[y0 : y0 + h, x0 : x0 + w] = crop
        for m in full_masks:
            m &= ~full
        full_masks.append(full)
        kept_class.append(part.class_id)
    img = apply_finish(img, finish or sample_finish(rng), rng)
    out = np.clip(img, 0, 255).astype(np.uint8)
    masks, classes = [], []
    for m, c in zip(full_masks, kept_class, strict=True):
        if int(m.sum()) >= min_visible:
            masks.append(m)
            classes.append(c)
    return Scene(image=out, masks=masks, class_ids=classes)


@dataclass(frozen=True, slots=True)
class Finish:
    """Photometric finish of a frame: exposure gain, colour cast, offset, blur and noise level."""

    gain: float
    cast: tuple[float, float, float]
    offset: float
    blur: str  # "none", "gaussian" or "motion"
    blur_size: int
    noise_sigma: float


def sample_finish(rng: np.random.Generator) -> Finish:
    """Draw a random ``Finish``."""
    gain = float(rng.uniform(0.7, 1.3))
    cast = tuple(float(v) for v in rng.normal(1.0, 0.05, 3))
    offset = float(rng.uniform(-15, 15))
    r = rng.random()
    blur, size = "none", 0
    if r < 0.25:
        blur, size = "gaussian", int(rng.integers(1, 3)) * 2 + 1
    elif r < 0.45:  # motion blur along the belt
        blur, size = "motion", int(rng.integers(3, 8))
    return Finish(gain, (cast[0], cast[1], cast[2]), offset, blur, size, float(rng.uniform(1, 7)))


def apply_finish(img: np.ndarray, finish: Finish, rng: np.random.Generator) -> np.ndarray:
    """Apply ``finish`` to a float32 BGR image (returns a new image); sensor noise from ``rng``."""
    img = img * finish.gain * np.asarray(finish.cast, np.float32) + finish.offset
    if finish.blur == "gaussian":
        img = cv2.GaussianBlur(img, (finish.blur_size, finish.blur_size), 0)
    elif finish.blur == "motion":
        img = cv2.blur(img, (finish.blur_size, 1))
    return img + rng.normal(0, finish.noise_sigma, img.shape).astype(np.float32)


def place_parts(
    rng: np.random.Generator,
    height: int,
    width: int,
    count: int,
    size_range: tuple[float, float],
    max_occlusion: float = 0.5,
) -> list[Part]:
    """Place ``count`` random parts, rejecting placements that hide over ``max_occlusion`` of a part."""
    parts: list[Part] = []
    areas: list[int] = []
    crops: list[tuple[np.ndarray, int, int]] = []
    occ = np.zeros((height, width), np.int16)  # topmost index + 1 at each pixel
    for _ in range(count * 4):
        if len(parts) >= count:
            break
        cls = int(rng.integers(len(CLASS_NAMES)))
        size = float(np.exp(rng.uniform(math.log(size_range[0]), math.log(size_range[1]))))
        if cls == 2:
            size *= 1.25
        part = sample_part(rng, cls, size)
        margin = part.radius * 0.6
        part.x = float(rng.uniform(-margin, width + margin))
        part.y = float(rng.uniform(-margin, height + margin))
        part.angle = float(rng.uniform(0, 2 * math.pi))
        crop, x0, y0 = part_mask(part, height, width)
        if crop.size == 0 or crop.sum() < 30:
            continue
        h, w = crop.shape
        region = occ[y0 : y0 + h, x0 : x0 + w]
        covered = region[crop]
        ok = True
        if covered.size:
            ids, cnt = np.unique(covered[covered > 0], return_counts=True)
            for i, n in zip(ids, cnt, strict=True):
                prev = int(i) - 1
                # visible area of prev after this placement
                pc, px0, py0 = crops[prev]
                vis = int((occ[py0 : py0 + pc.shape[0], px0 : px0 + pc.shape[1]][pc] == i).sum())
                if vis - n < (1 - max_occlusion) * areas[prev]:
                    ok = False
                    break
        if not ok:
            continue
        parts.append(part)
        areas.append(int(crop.sum()))
        crops.append((crop, x0, y0))
        region[crop] = len(parts)
    return parts


def random_scene(
    rng: np.random.Generator,
    height: int = 320,
    width: int = 320,
    *,
    size_range: tuple[float, float] | None = None,
    max_parts: int = 9,
    min_parts: int = 1,
) -> Scene:
    """A random still scene: belt plus ``min_parts..max_parts`` parts of random classes and poses
    (no part at all in 3 % of scenes). Placements that would hide over half of a part are
    rejected, so a crowded scene may hold fewer parts than drawn.

    Sizes are drawn log-uniformly from ``size_range`` (default: 5%..30% of the shorter side).
    """
    if size_range is None:
        short = min(height, width)
        size_range = (0.05 * short, 0.30 * short)
    belt = make_belt(rng, height, width)
    count = int(rng.integers(min_parts, max_parts + 1)) if rng.random() > 0.03 else 0
    parts = place_parts(rng, height, width, count, size_range)
    light = (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
    return render(belt, parts, rng, light=light)
