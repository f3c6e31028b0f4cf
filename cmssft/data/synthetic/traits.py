"""Identity traits and the difficulty knob.

Every identity is a point in a latent cube ``[0, 1]^D``; all of its traits are
deterministic functions of that point. Three groups of traits come out of it:

* *shared*: geometry and layout a camera of either modality sees (proportions,
  garment cut, pattern geometry, accessories and where they sit);
* *RGB-specific*: colours (garments, skin, hair, accessories);
* *IR-specific*: thermal emission levels (skin, each garment, accessories).

Colour and emission are linked through a latent *material* per garment (denim is
blue-ish and moderately warm, a down jacket is any colour and cold, ...) plus a
darkness term, each with its own independent noise: the relation is learnable but
not a lookup. Difficulty pulls identities towards a few shared prototypes, so at
high difficulty many people dress alike.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

# Tags that keep the random streams of different purposes apart (first entropy word after the seed).
TAG_IDENTITY = 1
TAG_PROTOTYPE = 2
TAG_IMAGE = 3
TAG_CAMERA = 4
TAG_PERMUTATION = 5
TAG_SPLIT = 6
TAG_LAYOUT = 7
TAG_FRAME = 8

NUM_PROTOTYPES = 8

LATENT_KEYS = (
    # shared geometry / layout
    "height", "build", "hips", "head", "legs", "limb", "gender", "sleeve", "lower_cut", "coat",
    "hair_len", "up_pattern", "up_freq", "up_angle", "lo_pattern", "lo_freq", "bag", "bag_side",
    "backpack", "hat", "scarf", "prototype",
    # latent materials (drive both colour family and emission)
    "up_mat", "lo_mat",
    # RGB-specific
    "up_hue", "up_sat", "up_val", "up2_hue", "up2_val", "lo_hue", "lo_sat", "lo_val", "lo2_val",
    "skin", "hair_col", "shoe_val", "bag_hue", "bag_val", "pack_hue", "pack_val", "hat_hue", "hat_val",
    "scarf_hue",
    # IR-specific (independent noise on top of the material relation)
    "skin_ir", "hair_ir", "up_ir", "lo_ir", "up_ir_pat", "lo_ir_pat", "shoe_ir", "bag_ir", "pack_ir",
    "hat_ir", "scarf_ir",
)  # fmt: skip


@dataclass(frozen=True)
class Material:
    """A fabric: its colour family in HSV and its base thermal emission (0 cold .. 1 hot)."""

    name: str
    hue: float  # centre of the hue range
    hue_width: float  # 1.0 means any hue
    sat: tuple[float, float]
    val: tuple[float, float]
    emission: float


MATERIALS = (
    Material("cotton", 0.0, 1.0, (0.15, 0.85), (0.35, 0.95), 0.62),
    Material("denim", 0.60, 0.08, (0.30, 0.70), (0.20, 0.60), 0.52),
    Material("wool", 0.05, 0.20, (0.10, 0.55), (0.20, 0.70), 0.40),
    Material("synthetic", 0.0, 1.0, (0.55, 1.00), (0.50, 1.00), 0.74),
    Material("leather", 0.07, 0.06, (0.20, 0.60), (0.05, 0.30), 0.30),
    Material("down", 0.0, 1.0, (0.05, 0.90), (0.10, 0.90), 0.18),
)


def lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


@dataclass(frozen=True)
class DifficultyParams:
    """Every quantity the difficulty knob moves; see docs/SYNTHETIC.md for the table."""

    difficulty: float
    prototype_share: float  # how far identities are pulled towards one of NUM_PROTOTYPES prototypes
    colour_jitter: float  # per-image std of each part's RGB tint; its brightness gain std is 2x this
    emission_jitter: float  # per-image std of each IR emission level
    shape_jitter: float  # per-image relative std of body proportions
    view_mix: float  # probability that a camera sees a non-canonical viewpoint
    pose: float  # limb swing amplitude, radians
    scale: float  # relative person-size range (+-)
    shift: float  # position range (+-), fraction of the image size
    illumination: float  # RGB gain range (+-) and colour cast (x 0.5)
    camera_bias: float  # strength of per-camera colour cast, gain and IR gain
    blur: float  # Gaussian blur sigma in pixels at 128 px height
    noise: float  # sensor noise std, grey levels
    occlusion: float  # probability of an occluder
    occlusion_size: float  # largest fraction of the person height it covers
    clutter: float  # background texture contrast
    ir_contrast: float  # IR person/background separation (lower is harder)


def difficulty_params(difficulty: float) -> DifficultyParams:
    """Linear, monotone interpolation from the easiest (0) to the hardest (1) setting."""
    d = clamp(float(difficulty))
    return DifficultyParams(
        difficulty=d,
        prototype_share=lerp(0.0, 0.85, d),
        colour_jitter=lerp(0.0, 0.07, d),
        emission_jitter=lerp(0.0, 0.12, d),
        shape_jitter=lerp(0.0, 0.06, d),
        view_mix=lerp(0.0, 0.8, d),
        pose=lerp(0.0, 0.6, d),
        scale=lerp(0.0, 0.18, d),
        shift=lerp(0.0, 0.12, d),
        illumination=lerp(0.0, 0.5, d),
        camera_bias=lerp(0.0, 1.0, d),
        blur=lerp(0.4, 1.6, d),
        noise=lerp(0.0, 14.0, d),
        occlusion=lerp(0.0, 0.5, d),
        occlusion_size=lerp(0.0, 0.45, d),
        clutter=lerp(0.15, 1.0, d),
        ir_contrast=lerp(1.0, 0.45, d),
    )


@dataclass(frozen=True)
class Identity:
    """All traits of one person; colours are RGB in [0, 1], emissions in [0, 1]."""

    pid: int
    female: bool
    # shared
    height: float  # person height as a fraction of the image height
    build: float  # shoulder width / person height
    hips: float  # hip width / shoulder width
    head: float  # head height / person height
    legs: float  # leg length / person height
    limb: float  # arm thickness / person height
    sleeve: int  # 0 none, 1 short, 2 long
    lower_cut: int  # 0 trousers, 1 shorts, 2 skirt
    coat: float  # how far the upper garment reaches below the hips (fraction of leg length)
    hair_len: int  # 0 short, 1 medium, 2 long
    up_pattern: int  # 0 plain, 1 stripes, 2 checks
    up_freq: float  # pattern cycles per person height
    up_angle: float  # radians
    lo_pattern: int
    lo_freq: float
    bag: int  # 0 none, 1 shoulder bag, 2 hand bag
    bag_side: int  # +1 / -1, on the person's own right / left
    backpack: bool
    hat: bool
    scarf: bool
    # RGB-specific
    up_rgb: tuple[float, float, float]
    up2_rgb: tuple[float, float, float]
    lo_rgb: tuple[float, float, float]
    lo2_rgb: tuple[float, float, float]
    skin_rgb: tuple[float, float, float]
    hair_rgb: tuple[float, float, float]
    shoe_rgb: tuple[float, float, float]
    bag_rgb: tuple[float, float, float]
    pack_rgb: tuple[float, float, float]
    hat_rgb: tuple[float, float, float]
    scarf_rgb: tuple[float, float, float]
    # IR-specific
    skin_ir: float
    hair_ir: float
    up_ir: float
    lo_ir: float
    up_ir_pattern: float  # emission offset of the pattern's second colour
    lo_ir_pattern: float
    shoe_ir: float
    bag_ir: float
    pack_ir: float
    hat_ir: float
    scarf_ir: float


def _latent(seed: int, tag: int, index: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, tag, index]))
    return rng.random(len(LATENT_KEYS))


def identity_latent(seed: int, pid: int, prototype_share: float) -> dict[str, float]:
    """The identity's latent point, pulled ``prototype_share`` of the way to its prototype."""
    own = _latent(seed, TAG_IDENTITY, pid)
    proto_index = int(own[LATENT_KEYS.index("prototype")] * NUM_PROTOTYPES)
    proto = _latent(seed, TAG_PROTOTYPE, proto_index)
    mixed = proto + (1.0 - prototype_share) * (own - proto)
    return dict(zip(LATENT_KEYS, mixed.tolist(), strict=True))


def clamp(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo if x < lo else hi if x > hi else x


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, clamp(s), clamp(v))
    return (r, g, b)


def _scaled(rgb: tuple[float, float, float], factor: float) -> tuple[float, float, float]:
    return (clamp(rgb[0] * factor), clamp(rgb[1] * factor), clamp(rgb[2] * factor))


def _pick(u: float, n: int) -> int:
    return min(int(u * n), n - 1)


def _material_colour(mat: Material, u_hue: float, u_sat: float, u_val: float) -> tuple[float, float, float]:
    hue = mat.hue + mat.hue_width * (u_hue - 0.5)
    return _hsv(hue, lerp(*mat.sat, u_sat), lerp(*mat.val, u_val))


def _emission(mat: Material, u_val: float, u_noise: float) -> float:
    """Material sets the level; dark fabric runs a little warmer; the rest is the person's own."""
    darkness = 1.0 - u_val
    return clamp(mat.emission + 0.12 * darkness + 0.24 * (u_noise - 0.5), 0.05, 0.95)


def _skin_rgb(u: float) -> tuple[float, float, float]:
    light = np.array([0.96, 0.80, 0.69])
    dark = np.array([0.36, 0.22, 0.15])
    r, g, b = (light + (dark - light) * u).tolist()
    return (r, g, b)


def _hair_rgb(u: float) -> tuple[float, float, float]:
    palette = (
        (0.06, 0.05, 0.05),
        (0.25, 0.15, 0.08),
        (0.45, 0.30, 0.15),
        (0.80, 0.68, 0.45),
        (0.6, 0.6, 0.6),
    )
    return palette[_pick(u, len(palette))]


def make_identity(seed: int, pid: int, params: DifficultyParams) -> Identity:
    """Deterministic traits of identity ``pid`` for this dataset seed and difficulty."""
    z = identity_latent(seed, pid, params.prototype_share)
    female = z["gender"] < 0.45
    up_mat = MATERIALS[_pick(z["up_mat"], len(MATERIALS))]
    lo_mat = MATERIALS[_pick(z["lo_mat"], len(MATERIALS))]
    lower_cut = 2 if (female and z["lower_cut"] < 0.45) else (1 if z["lower_cut"] > 0.8 else 0)
    if lower_cut == 0 and z["lo_mat"] < 0.5:
        lo_mat = MATERIALS[1]  # trousers are often denim
    hair_len = 2 if female and z["hair_len"] < 0.65 else _pick(z["hair_len"], 2)
    up_rgb = _material_colour(up_mat, z["up_hue"], z["up_sat"], z["up_val"])
    lo_rgb = _material_colour(lo_mat, z["lo_hue"], z["lo_sat"], z["lo_val"])
    return Identity(
        pid=pid,
        female=female,
        height=lerp(0.78, 0.92, z["height"]),
        build=lerp(0.20, 0.29, z["build"]) * (0.92 if female else 1.0),
        hips=lerp(0.72, 0.98, z["hips"]) * (1.1 if female else 1.0),
        head=lerp(0.115, 0.145, z["head"]),
        legs=lerp(0.43, 0.51, z["legs"]),
        limb=lerp(0.048, 0.07, z["limb"]),
        sleeve=_pick(z["sleeve"], 3),
        lower_cut=lower_cut,
        coat=lerp(0.0, 0.5, z["coat"]) if z["coat"] > 0.4 else 0.0,
        hair_len=hair_len,
        up_pattern=0 if z["up_pattern"] < 0.5 else (1 if z["up_pattern"] < 0.8 else 2),
        up_freq=lerp(5.0, 16.0, z["up_freq"]),
        up_angle=float(np.pi / 2 * _pick(z["up_angle"], 4) / 2),
        lo_pattern=0 if z["lo_pattern"] < 0.75 else (1 if z["lo_pattern"] < 0.9 else 2),
        lo_freq=lerp(6.0, 14.0, z["lo_freq"]),
        bag=0 if z["bag"] < 0.55 else (1 if z["bag"] < 0.85 else 2),
        bag_side=1 if z["bag_side"] < 0.5 else -1,
        backpack=z["backpack"] > 0.72,
        hat=z["hat"] > 0.8,
        scarf=z["scarf"] > 0.8,
        up_rgb=up_rgb,
        up2_rgb=_hsv(z["up2_hue"], 0.6, z["up2_val"]),
        lo_rgb=lo_rgb,
        lo2_rgb=_scaled(lo_rgb, 0.4 + z["lo2_val"]),
        skin_rgb=_skin_rgb(z["skin"]),
        hair_rgb=_hair_rgb(z["hair_col"]),
        shoe_rgb=_hsv(0.08, 0.3, lerp(0.05, 0.9, z["shoe_val"])),
        bag_rgb=_hsv(z["bag_hue"], 0.5, lerp(0.1, 0.8, z["bag_val"])),
        pack_rgb=_hsv(z["pack_hue"], 0.6, lerp(0.1, 0.8, z["pack_val"])),
        hat_rgb=_hsv(z["hat_hue"], 0.5, lerp(0.1, 0.9, z["hat_val"])),
        scarf_rgb=_hsv(z["scarf_hue"], 0.7, 0.7),
        skin_ir=lerp(0.80, 0.98, z["skin_ir"]),
        hair_ir=lerp(0.40, 0.68, z["hair_ir"]),
        up_ir=_emission(up_mat, z["up_val"], z["up_ir"]),
        lo_ir=_emission(lo_mat, z["lo_val"], z["lo_ir"]),
        up_ir_pattern=lerp(-0.12, 0.12, z["up_ir_pat"]),
        lo_ir_pattern=lerp(-0.10, 0.10, z["lo_ir_pat"]),
        shoe_ir=lerp(0.25, 0.5, z["shoe_ir"]),
        bag_ir=lerp(0.15, 0.45, z["bag_ir"]),
        pack_ir=lerp(0.15, 0.45, z["pack_ir"]),
        hat_ir=lerp(0.3, 0.7, z["hat_ir"]),
        scarf_ir=lerp(0.35, 0.75, z["scarf_ir"]),
    )
