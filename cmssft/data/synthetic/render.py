"""Drawing one person image with OpenCV primitives.

The person is first drawn as a *label map* (which body part or accessory covers
each pixel) at twice the output size; colours (RGB) or emission levels (IR) are
then looked up per label, garment patterns, shading and a camera background are
added, and the result is reduced to the output size, blurred and made noisy.
Because both modalities go through the same label map, an identity's RGB and IR
images share its silhouette, garment cut, pattern geometry and accessories,
while colour and emission come from separate (correlated) traits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from cmssft.data.records import Modality
from cmssft.data.synthetic.traits import TAG_CAMERA, DifficultyParams, Identity

SUPERSAMPLE = 2

# Label values of the part map.
BG, SKIN, HAIR, UPPER, LOWER, SHOE, BAG, PACK, HAT, SCARF, OCCLUDER = range(11)
NUM_LABELS = 11
PERSON_LABELS = np.array([False, True, True, True, True, True, True, True, True, True, False])

VIEWS = ("front", "back", "left", "right")


@dataclass(frozen=True)
class CameraStyle:
    """What one camera adds to every image it takes: scene, colour cast, gain, framing habits."""

    camera: int
    modality: Modality
    indoor: bool
    wall: tuple[float, float, float]  # RGB, or emission replicated for IR
    floor: tuple[float, float, float]
    horizon: float  # fraction of the image height where wall meets floor
    texture_seed: int
    pillars: tuple[tuple[float, float, float], ...]  # (centre x, width, brightness factor), fractions
    cast: tuple[float, float, float]  # per-channel RGB gain
    gain: float
    scale_bias: float
    view_weights: tuple[float, float, float, float]  # front, back, left, right


@dataclass(frozen=True)
class Geometry:
    """Per-image geometric nuisance; shared by the two halves of a RegDB visible/thermal pair."""

    view: str
    scale: float
    dx: float  # fraction of the width
    dy: float  # fraction of the height
    arm_swing: tuple[float, float]  # radians
    leg_swing: tuple[float, float]
    elbow: tuple[float, float]
    shape: tuple[float, float, float]  # multipliers of build, leg length, head size
    occluder: tuple[int, float, float] | None  # (side 0 bottom / 1 left / 2 right, size, shade)
    light: float  # horizontal light direction in [-1, 1]


def camera_style(
    seed: int, camera: int, modality: Modality, indoor: bool, params: DifficultyParams
) -> CameraStyle:
    """The fixed style of one camera; its colour cast, gain and habits scale with ``camera_bias``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, TAG_CAMERA, camera]))
    bias = params.camera_bias
    if modality == Modality.RGB:
        base = rng.uniform(0.35, 0.8) if indoor else rng.uniform(0.45, 0.85)
        tint = rng.uniform(-0.12, 0.12, 3) + (
            np.array([0.06, 0.02, -0.06]) if indoor else np.array([-0.03, 0.03, 0.0])
        )
        wall = np.clip(base + tint, 0, 1)
        floor = np.clip(wall * rng.uniform(0.55, 0.95) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    else:
        level = rng.uniform(0.12, 0.28) if indoor else rng.uniform(0.2, 0.35)
        wall = np.full(3, level)
        floor = np.full(3, level + (rng.uniform(0.05, 0.15) if not indoor else rng.uniform(-0.05, 0.05)))
    pillars = tuple(
        (float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.08, 0.3)), float(rng.uniform(0.6, 1.4)))
        for _ in range(int(rng.integers(1, 4)))
    )
    view_raw = rng.dirichlet(np.ones(4))
    return CameraStyle(
        camera=camera,
        modality=modality,
        indoor=indoor,
        wall=tuple(wall.tolist()),  # type: ignore[arg-type]
        floor=tuple(floor.tolist()),  # type: ignore[arg-type]
        horizon=float(rng.uniform(0.45, 0.8)),
        texture_seed=int(rng.integers(2**31)),
        pillars=pillars,
        cast=tuple((1.0 + bias * rng.uniform(-0.15, 0.15, 3)).tolist()),  # type: ignore[arg-type]
        gain=float(1.0 + bias * rng.uniform(-0.25, 0.2)),
        scale_bias=float(bias * rng.uniform(-0.08, 0.05)),
        view_weights=tuple((0.5 * view_raw + 0.125).tolist()),  # type: ignore[arg-type]
    )


def draw_geometry(
    rng: np.random.Generator, style: CameraStyle, params: DifficultyParams, view: str | None = None
) -> Geometry:
    """Viewpoint, pose, framing and occlusion of one image; ``view`` forces the viewpoint."""
    if view is None:
        view = "front"
        if rng.random() < params.view_mix:
            view = VIEWS[int(rng.choice(4, p=np.array(style.view_weights) / sum(style.view_weights)))]
    pose = params.pose
    occluder = None
    if rng.random() < params.occlusion:
        side = int(rng.choice(3, p=[0.6, 0.2, 0.2]))
        occluder = (side, float(rng.uniform(0.3, 1.0) * params.occlusion_size), float(rng.random()))
    swing = float(rng.normal(0.0, pose))
    leg = float(rng.normal(0.0, pose * 0.6))
    return Geometry(
        view=view,
        scale=float(1.0 + style.scale_bias + rng.uniform(-params.scale, params.scale)),
        dx=float(rng.uniform(-params.shift, params.shift)),
        dy=float(rng.uniform(-params.shift, params.shift) * 0.5),
        arm_swing=(swing, -swing + float(rng.normal(0.0, pose * 0.3))),
        leg_swing=(leg, -leg),
        elbow=(abs(float(rng.normal(0.1, pose * 0.5))), abs(float(rng.normal(0.1, pose * 0.5)))),
        shape=tuple((1.0 + params.shape_jitter * rng.standard_normal(3)).tolist()),  # type: ignore[arg-type]
        occluder=occluder,
        light=float(rng.uniform(-1.0, 1.0)),
    )


# --------------------------------------------------------------------------- label map


class _Canvas:
    """Person-frame drawing helpers: x, y in person heights from the head-top centre."""

    def __init__(self, labels: np.ndarray, cx: float, top: float, ph: float) -> None:
        self.labels, self.cx, self.top, self.ph = labels, cx, top, ph

    def pt(self, x: float, y: float) -> tuple[int, int]:
        return (int(round(self.cx + x * self.ph)), int(round(self.top + y * self.ph)))

    def px(self, length: float) -> int:
        return max(1, int(round(length * self.ph)))

    def poly(self, points: list[tuple[float, float]], label: int) -> None:
        pts = np.array([self.pt(x, y) for x, y in points], dtype=np.int32)
        cv2.fillPoly(self.labels, [pts], label)

    def rect(self, x0: float, y0: float, x1: float, y1: float, label: int) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], label)

    def line(self, a: tuple[float, float], b: tuple[float, float], width: float, label: int) -> None:
        cv2.line(self.labels, self.pt(*a), self.pt(*b), label, self.px(width))

    def ellipse(self, x: float, y: float, ax: float, ay: float, label: int, angle: float = 0.0) -> None:
        cv2.ellipse(self.labels, self.pt(x, y), (self.px(ax), self.px(ay)), angle, 0, 360, label, -1)


@dataclass(frozen=True)
class _Body:
    """Key heights and half-widths of one drawn person, in person heights."""

    head: float
    shoulder_y: float
    waist_y: float
    hip_y: float
    knee_y: float
    shoulder: float
    waist: float
    hip: float
    limb: float
    face_x: float  # horizontal head offset (side views)
    facing: int  # +1 facing image right, -1 left, 0 front/back
    mirror: int  # image-x sign of the person's right-hand side


def _body(ident: Identity, geo: Geometry) -> _Body:
    head = ident.head * geo.shape[2]
    legs = ident.legs * geo.shape[1]
    shoulder_y = head + 0.045
    hip_y = 1.0 - legs
    squeeze = 0.55 if geo.view in ("left", "right") else 1.0
    shoulder = ident.build * geo.shape[0] / 2 * squeeze
    hip = shoulder * ident.hips
    facing = {"left": -1, "right": 1}.get(geo.view, 0)
    return _Body(
        head=head,
        shoulder_y=shoulder_y,
        waist_y=(shoulder_y + hip_y) / 2 + 0.05,
        hip_y=hip_y,
        knee_y=hip_y + legs * 0.5,
        shoulder=shoulder,
        waist=min(shoulder, hip) * 0.85,
        hip=hip,
        limb=ident.limb,
        face_x=0.012 * facing,
        facing=facing,
        mirror=-1 if geo.view in ("front", "left") else 1,
    )


def _limb_points(
    start: tuple[float, float], angle: float, bend: float, lengths: tuple[float, float]
) -> tuple[tuple[float, float], tuple[float, float]]:
    mid = (start[0] + lengths[0] * math.sin(angle), start[1] + lengths[0] * math.cos(angle))
    end = (mid[0] + lengths[1] * math.sin(angle + bend), mid[1] + lengths[1] * math.cos(angle + bend))
    return mid, end


def _draw_legs(c: _Canvas, ident: Identity, geo: Geometry, b: _Body) -> None:
    spread = b.hip * (0.25 if b.facing else 0.5)
    width = b.limb * 1.45
    thigh = b.knee_y - b.hip_y
    shin = 0.975 - b.knee_y
    for i, sign in enumerate((-1, 1)):
        swing = geo.leg_swing[i]
        angle = swing * b.facing if b.facing else sign * 0.04 + 0.25 * swing
        hip = (sign * spread, b.hip_y)
        knee, ankle = _limb_points(
            hip, angle, 0.0 if b.facing == 0 else -abs(swing) * 0.5 * b.facing, (thigh, shin)
        )
        if ident.lower_cut == 0:
            c.line(hip, knee, width, LOWER)
            c.line(knee, ankle, width * 0.95, LOWER)
        else:
            c.line(hip, knee, width * 0.9, SKIN)
            c.line(knee, ankle, width * 0.85, SKIN)
            if ident.lower_cut == 1:
                short_end = (hip[0] + 0.55 * (knee[0] - hip[0]), hip[1] + 0.55 * (knee[1] - hip[1]))
                c.line(hip, short_end, width * 1.1, LOWER)
        foot_dx = 0.03 * b.facing
        c.ellipse(
            ankle[0] + foot_dx, ankle[1] + 0.008, width * (0.85 if b.facing else 0.55), width * 0.35, SHOE
        )
    c.rect(-b.hip, b.hip_y - 0.06, b.hip, b.hip_y + 0.05, LOWER)
    if ident.lower_cut == 2:
        flare = b.hip * 1.4
        c.poly(
            [(-b.hip, b.hip_y - 0.06), (b.hip, b.hip_y - 0.06), (flare, b.knee_y), (-flare, b.knee_y)], LOWER
        )


def _draw_torso(c: _Canvas, ident: Identity, b: _Body) -> None:
    coat_y = b.hip_y + ident.coat * (1.0 - b.hip_y) * 0.6
    flare = b.hip * (1.0 + 0.4 * ident.coat)
    c.poly(
        [
            (-b.shoulder, b.shoulder_y),
            (b.shoulder, b.shoulder_y),
            (b.waist, b.waist_y),
            (flare, coat_y),
            (-flare, coat_y),
            (-b.waist, b.waist_y),
        ],
        UPPER,
    )


def _draw_arm(c: _Canvas, ident: Identity, geo: Geometry, b: _Body, i: int) -> tuple[float, float]:
    sign = (-1, 1)[i]
    swing = geo.arm_swing[i]
    if b.facing:
        x0, angle, bend = 0.0, swing, -geo.elbow[i] * b.facing - 0.1 * b.facing
    else:
        x0, angle, bend = (
            sign * (b.shoulder - b.limb * 0.4),
            sign * (0.1 + 0.2 * abs(swing)),
            -sign * geo.elbow[i],
        )
    shoulder = (x0, b.shoulder_y + b.limb * 0.5)
    elbow, wrist = _limb_points(shoulder, angle, bend, (0.17, 0.16))
    upper_label = SKIN if ident.sleeve == 0 else UPPER
    lower_label = UPPER if ident.sleeve == 2 else SKIN
    c.line(shoulder, elbow, b.limb, upper_label)
    c.line(elbow, wrist, b.limb * 0.9, lower_label)
    if ident.sleeve == 0:
        c.ellipse(shoulder[0], shoulder[1], b.limb * 0.6, b.limb * 0.6, UPPER)
    hand = (wrist[0] + 0.02 * math.sin(angle + bend), wrist[1] + 0.02)
    c.ellipse(hand[0], hand[1], b.limb * 0.5, b.limb * 0.6, SKIN)
    return hand


def _draw_head(c: _Canvas, ident: Identity, geo: Geometry, b: _Body, hair_behind: bool) -> None:
    half = b.head * 0.40
    hx = b.face_x
    c.rect(hx - half * 0.4, b.head * 0.8, hx + half * 0.4, b.shoulder_y + 0.01, SKIN)
    long_bottom = {0: None, 1: b.head + 0.02, 2: b.shoulder_y + 0.11}[ident.hair_len]
    if geo.view == "back":
        c.ellipse(hx, b.head * 0.5, half, b.head * 0.5, HAIR)
        if long_bottom is not None and not hair_behind:
            c.rect(hx - half * 1.05, b.head * 0.5, hx + half * 1.05, long_bottom, HAIR)
        return
    if long_bottom is not None and hair_behind:
        back = -b.facing * half * 0.4
        c.rect(hx + back - half * 1.05, b.head * 0.5, hx + back + half * 1.05, long_bottom, HAIR)
    if hair_behind:
        return
    c.ellipse(hx, b.head * 0.46, half * 1.04, b.head * 0.5, HAIR)
    c.ellipse(hx + b.facing * half * 0.15, b.head * 0.57, half * 0.9, b.head * 0.43, SKIN)
    if b.facing:
        c.ellipse(hx - b.facing * half * 0.35, b.head * 0.42, half * 0.7, b.head * 0.42, HAIR)


def _draw_accessories_back(c: _Canvas, ident: Identity, geo: Geometry, b: _Body) -> None:
    """Parts that sit behind the torso from this viewpoint."""
    if ident.backpack and b.facing:
        edge = -b.facing * (b.shoulder + 0.09)
        c.rect(min(edge, 0.0), b.shoulder_y + 0.02, max(edge, 0.0), b.waist_y + 0.05, PACK)
    if ident.bag == 1 and b.facing and ident.bag_side * b.mirror * b.facing < 0:
        c.rect(-0.07, b.hip_y - 0.07, 0.07, b.hip_y + 0.05, BAG)


def _draw_accessories_front(c: _Canvas, ident: Identity, geo: Geometry, b: _Body, hands: list) -> None:
    """Parts that sit in front of the torso: backpack (seen from behind), straps, bags, scarf."""
    if ident.backpack and geo.view == "back":
        c.rect(-b.shoulder * 0.75, b.shoulder_y + 0.03, b.shoulder * 0.75, b.waist_y + 0.06, PACK)
    elif ident.backpack and geo.view == "front":
        for s in (-1, 1):
            c.line(
                (s * b.shoulder * 0.6, b.shoulder_y), (s * b.shoulder * 0.5, b.waist_y), b.limb * 0.35, PACK
            )
    side = ident.bag_side * b.mirror
    if ident.bag == 1:
        if b.facing == 0:
            c.line(
                (-side * b.shoulder * 0.6, b.shoulder_y), (side * b.hip, b.hip_y - 0.03), b.limb * 0.3, BAG
            )
            c.rect(side * b.hip - 0.06, b.hip_y - 0.07, side * b.hip + 0.07, b.hip_y + 0.05, BAG)
        elif side * b.facing > 0:
            c.line((0.0, b.shoulder_y), (0.0, b.hip_y - 0.05), b.limb * 0.3, BAG)
            c.rect(-0.07, b.hip_y - 0.07, 0.07, b.hip_y + 0.05, BAG)
    elif ident.bag == 2:
        hx, hy = hands[0] if side < 0 or len(hands) == 1 else hands[1]
        c.rect(hx - 0.045, hy, hx + 0.045, hy + 0.09, BAG)
    if ident.scarf:
        c.ellipse(b.face_x, b.shoulder_y - 0.005, b.head * 0.45, 0.03, SCARF)
        if geo.view == "front":
            c.rect(0.005, b.shoulder_y, 0.04, b.shoulder_y + 0.12, SCARF)


def _draw_occluder(labels: np.ndarray, geo: Geometry, c: _Canvas) -> None:
    if geo.occluder is None:
        return
    side, size, _ = geo.occluder
    height, width = labels.shape
    if side == 0:
        y0 = int(round(c.top + (1.0 - size) * c.ph))
        labels[max(0, y0) :, :] = OCCLUDER
    else:
        reach = int(round((0.5 * size - 0.15) * c.ph))  # how far past the body centre it reaches
        centre = int(round(c.cx))
        if side == 1:
            labels[:, : max(0, centre + reach)] = OCCLUDER
        else:
            labels[:, min(width, centre - reach) :] = OCCLUDER


def draw_labels(ident: Identity, geo: Geometry, height: int, width: int) -> tuple[np.ndarray, _Canvas]:
    """The part-label map of one person at ``height x width``, and the person frame used."""
    labels = np.zeros((height, width), dtype=np.uint8)
    ph = min(ident.height * geo.scale, 0.98) * height
    top = (height - ph) / 2 + geo.dy * height
    c = _Canvas(labels, width / 2 + geo.dx * width, top, ph)
    b = _body(ident, geo)
    _draw_head(c, ident, geo, b, hair_behind=True)
    far = 0 if b.facing > 0 else 1
    if b.facing:
        _draw_arm(c, ident, geo, b, far)
    _draw_accessories_back(c, ident, geo, b)
    _draw_legs(c, ident, geo, b)
    _draw_torso(c, ident, b)
    hands = [_draw_arm(c, ident, geo, b, i) for i in ((1 - far,) if b.facing else (0, 1))]
    _draw_accessories_front(c, ident, geo, b, hands)
    _draw_head(c, ident, geo, b, hair_behind=False)
    if ident.hat:
        half = b.head * 0.42
        c.ellipse(b.face_x, b.head * 0.22, half * 1.1, b.head * 0.26, HAT)
        c.line((b.face_x - half * 1.3, b.head * 0.3), (b.face_x + half * 1.3, b.head * 0.3), 0.012, HAT)
    _draw_occluder(labels, geo, c)
    return labels, c


# --------------------------------------------------------------------------- appearance


def _stripes(freq: float, angle: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``sin(2 pi f (u sin a + v cos a)) > 0.2`` as an outer product of 1-D sines (cheap)."""
    a = 2 * math.pi * freq * math.sin(angle) * u
    b = 2 * math.pi * freq * math.cos(angle) * v
    return (np.sin(b)[:, None] * np.cos(a)[None, :] + np.cos(b)[:, None] * np.sin(a)[None, :]) > 0.2


def _pattern(kind: int, freq: float, angle: float, u: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    if kind == 0:
        return None
    stripes = _stripes(freq, angle, u, v)
    return stripes if kind == 1 else stripes ^ _stripes(freq, angle + math.pi / 2, u, v)


def _pattern_mask(ident: Identity, labels: np.ndarray, c: _Canvas, mirror: int) -> np.ndarray | None:
    """Where garment pixels take their second colour; patterns move with the body."""
    if ident.up_pattern == 0 and ident.lo_pattern == 0:
        return None
    height, width = labels.shape
    u = (np.arange(width, dtype=np.float32) - c.cx) / c.ph * mirror
    v = (np.arange(height, dtype=np.float32) - c.top) / c.ph
    mask = np.zeros(labels.shape, dtype=bool)
    upper = _pattern(ident.up_pattern, ident.up_freq, ident.up_angle, u, v)
    if upper is not None:
        mask |= upper & (labels == UPPER)
    lower = _pattern(ident.lo_pattern, ident.lo_freq, 0.0, u, v)
    if lower is not None:
        mask |= lower & (labels == LOWER)
    return mask


def _rgb_table(
    ident: Identity, geo: Geometry, rng: np.random.Generator, params: DifficultyParams
) -> np.ndarray:
    """Colour per label (rows 0..10) and per label's pattern colour (rows 11..21), jittered per image."""
    table = np.zeros((2 * NUM_LABELS, 3), dtype=np.float32)
    rows = {
        SKIN: ident.skin_rgb,
        HAIR: ident.hair_rgb,
        UPPER: ident.up_rgb,
        LOWER: ident.lo_rgb,
        SHOE: ident.shoe_rgb,
        BAG: ident.bag_rgb,
        PACK: ident.pack_rgb,
        HAT: ident.hat_rgb,
        SCARF: ident.scarf_rgb,
        NUM_LABELS + UPPER: ident.up2_rgb,
        NUM_LABELS + LOWER: ident.lo2_rgb,
    }
    for row, colour in rows.items():
        table[row] = colour
    j = params.colour_jitter
    if j > 0:
        gain = 1.0 + 2.0 * j * rng.standard_normal((2 * NUM_LABELS, 1))
        table = table * gain + j * rng.standard_normal((2 * NUM_LABELS, 3))
    shade = geo.occluder[2] if geo.occluder else 0.5
    table[OCCLUDER] = np.array([0.2, 0.25, 0.3]) + shade * np.array([0.6, 0.5, 0.4])
    table[BG] = 0.0
    return np.clip(table, 0.0, 1.0).astype(np.float32)


def _ir_table(
    ident: Identity, geo: Geometry, rng: np.random.Generator, params: DifficultyParams
) -> np.ndarray:
    """Emission per label (rows 0..10) and per pattern (rows 11..21), jittered per image."""
    table = np.zeros(2 * NUM_LABELS, dtype=np.float32)
    levels = (
        (SKIN, ident.skin_ir),
        (HAIR, ident.hair_ir),
        (UPPER, ident.up_ir),
        (LOWER, ident.lo_ir),
        (SHOE, ident.shoe_ir),
        (BAG, ident.bag_ir),
        (PACK, ident.pack_ir),
        (HAT, ident.hat_ir),
        (SCARF, ident.scarf_ir),
    )
    for row, level in levels:
        table[row] = level
    table += params.emission_jitter * rng.standard_normal(2 * NUM_LABELS).astype(np.float32)
    table[NUM_LABELS:] = table[:NUM_LABELS]
    table[NUM_LABELS + UPPER] += ident.up_ir_pattern
    table[NUM_LABELS + LOWER] += ident.lo_ir_pattern
    table[OCCLUDER] = 0.2 + 0.3 * (geo.occluder[2] if geo.occluder else 0.5)
    table[BG] = 0.0
    return np.clip(table, 0.0, 1.0)[:, None]


def _lookup(codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[codes]`` through cv2.LUT, several times faster than numpy fancy indexing."""
    channels = table.shape[1]
    full = np.zeros((256, 1, channels), dtype=np.float32)
    full[: len(table), 0] = table
    src = codes if channels == 1 else cv2.merge([codes] * channels)
    out = cv2.LUT(src, full[:, :, 0] if channels == 1 else full)
    return out if out.ndim == 3 else out[:, :, None]


def _background(
    style: CameraStyle, rng: np.random.Generator, params: DifficultyParams, h: int, w: int
) -> np.ndarray:
    """Wall above the horizon, floor below, pillars and low-frequency texture; jittered per image."""
    channels = 1 if style.modality == Modality.IR else 3
    horizon = int(round((style.horizon + rng.uniform(-0.04, 0.04) * params.clutter) * h))
    bg = np.empty((h, w, channels), dtype=np.float32)
    bg[:horizon] = style.wall[:channels]
    bg[horizon:] = style.floor[:channels]
    shift = rng.uniform(-0.1, 0.1) * params.clutter
    for centre, size, factor in style.pillars:
        x0 = int(round((centre + shift - size / 2) * w))
        x1 = int(round((centre + shift + size / 2) * w))
        if x1 > 0 and x0 < w:
            bg[:horizon, max(0, x0) : x1] *= 1.0 + (factor - 1.0) * params.clutter
    fixed = np.random.default_rng(style.texture_seed).standard_normal((6, 3, 1)).astype(np.float32)
    texture = cv2.resize(fixed + 0.5 * rng.standard_normal((6, 3, 1)).astype(np.float32), (w, h))
    return np.clip(bg + 0.1 * params.clutter * texture[:, :, None], 0.0, 1.0)


def _shading(coverage: np.ndarray, c: _Canvas, light: float) -> np.ndarray:
    """Rounded-body shading: limbs' edges darker than their middles, plus a side light."""
    sigma = max(0.5, 0.03 * c.ph)
    soft = cv2.GaussianBlur(coverage, (0, 0), sigma)
    side = (np.arange(coverage.shape[1], dtype=np.float32) - c.cx) / c.ph * light * 0.6
    return np.clip(soft * 1.6, 0, 1) + side[None, :]


def render_image(
    ident: Identity,
    style: CameraStyle,
    geo: Geometry,
    rng: np.random.Generator,
    params: DifficultyParams,
    height: int,
    width: int,
) -> tuple[np.ndarray, np.ndarray]:
    """A BGR uint8 ``height x width x 3`` image (grey replicated for IR) and its boolean person mask.

    Parts are drawn at ``SUPERSAMPLE`` x the size and area-averaged, which anti-aliases the edges;
    background, shading and camera effects are computed at the output size.
    """
    is_ir = style.modality == Modality.IR
    labels, c = draw_labels(ident, geo, height * SUPERSAMPLE, width * SUPERSAMPLE)
    codes = labels
    pattern = _pattern_mask(ident, labels, c, mirror=-1 if geo.view == "back" else 1)
    if pattern is not None:
        codes = labels + pattern.astype(np.uint8) * NUM_LABELS
    table = (_ir_table if is_ir else _rgb_table)(ident, geo, rng, params)
    size = (width, height)
    layer = cv2.resize(_lookup(codes, table), size, interpolation=cv2.INTER_AREA)  # premultiplied colour
    planes = np.stack([PERSON_LABELS[labels], labels != BG], axis=2).astype(np.float32)
    planes = cv2.resize(planes, size, interpolation=cv2.INTER_AREA)
    person, alpha = planes[:, :, 0], planes[:, :, 1]
    if layer.ndim == 2:
        layer = layer[:, :, None]
    small_canvas = _Canvas(labels, c.cx / SUPERSAMPLE, c.top / SUPERSAMPLE, c.ph / SUPERSAMPLE)
    shade = _shading(person, small_canvas, 0.0 if is_ir else geo.light)
    shade = (0.9 + 0.1 * shade) if is_ir else (0.68 + 0.32 * shade)  # IR: warm core, cooler outline
    bg = _background(style, rng, params, height, width)
    layer = layer * shade[:, :, None]
    if is_ir:
        level = float(bg.mean())
        layer = (level * alpha)[:, :, None] + (layer - (level * alpha)[:, :, None]) * params.ir_contrast
    scene = layer + (1.0 - alpha)[:, :, None] * bg
    return _finish(scene, style, rng, params, is_ir), person > 0.5


def _finish(
    image: np.ndarray, style: CameraStyle, rng: np.random.Generator, params: DifficultyParams, is_ir: bool
) -> np.ndarray:
    """Camera response: illumination / gain, optics blur, sensor noise, 8-bit BGR."""
    height = image.shape[0]
    sigma = params.blur * height / 128 * (1.3 if is_ir else 1.0) * rng.uniform(0.7, 1.3)
    image = cv2.GaussianBlur(image, (0, 0), sigma)
    if is_ir:
        grey = image if image.ndim == 2 else image[:, :, 0]
        lo, hi = float(grey.min()), float(grey.max())
        gain = style.gain * (1.0 + 0.5 * params.illumination * rng.uniform(-1, 1))
        low = 0.05 + 0.1 * params.illumination * rng.random()
        grey = low + (grey - lo) * (float(np.clip(0.85 * gain, 0.3, 0.94)) / max(hi - lo, 1e-3))
        grey = grey * 255.0 + params.noise * rng.standard_normal(grey.shape, dtype=np.float32)
        out = np.clip(grey, 0, 255).astype(np.uint8)
        return cv2.merge([out, out, out])
    gain = style.gain * (1.0 + params.illumination * rng.uniform(-1, 1))
    cast = np.asarray(style.cast) * (1.0 + 0.5 * params.illumination * rng.uniform(-0.3, 0.3, 3))
    image = image[:, :, ::-1] * (gain * 255.0 * cast[::-1]).astype(np.float32)
    if params.noise > 0:
        image += params.noise * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)
