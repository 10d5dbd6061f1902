"""The procedurally generated WSSS world of the embedded default (SPEC §5).

Images of 1-4 objects of a few foreground classes (distinct silhouettes,
colour families and textures) on textured background kinds, written in the
PASCAL VOC layout so that the real loaders read them:

    <root>/JPEGImages/<id>.jpg               RGB, JPEG quality 95, 4:4:4
    <root>/SegmentationClass/<id>.png        palette PNG, 0..C, 255 = void
    <root>/SegmentationClassAug -> SegmentationClass   (relative symlink)
    <root>/ImageSets/Segmentation/{train,train_aug,val}.txt
    <root>/classes.json                      names, prompts, vocabulary
    <root>/captions.json                     train ids only (alt-text)
    <root>/meta.json                         per-image scene record
    <root>/world.json                        parameters, version, digest

The world carries the difficulties SSR is meant to fix (SPEC §1, the
paper's "over-activation in background areas and in non-target foreground
regions"):

1. background co-occurrence: a class sits on its "home" background kind
   with a configured probability (boat on water 0.9, train on rails 0.9,
   ...), so the image-level label predicts the background;
2. touching pairs: chair beside table, person riding a bike, drawn
   touching and partly occluding each other;
3. parts of objects share colours with some backgrounds (white sail and
   plane vs clouds and foam, black tyres vs asphalt, skin vs sand, green
   stem vs grass), while object outlines are colour edges (antialiased
   signed-distance shapes), so superpixels align with the masks.

Everything is a pure function of (seed, split, index): one NumPy generator
per image, no global state, so worlds are byte-identical across runs on
the same library versions and can be generated in any order.
`docs/synthetic_world.md` describes the world and its measured statistics.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ssr_jax.data import voc

WORLD_VERSION = 1
PATCH_SIZE = 16
IGNORE_INDEX = 255
SPLITS = ("train", "val")
TEXTURES = ("solid", "stripes", "dots", "checker", "grain")
TEXTURE_WORDS = {"solid": "", "stripes": "striped", "dots": "dotted",
                 "checker": "checkered", "grain": "wooden"}
PROMPT_TEMPLATE = "a clean origami {}."

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassSpec:
    """One foreground class.

    Attributes:
      name: class name; also the prompt word and the caption word.
      shape: key of `SHAPES` (the silhouette and its coloured parts).
      hsv: base colour of the "main" part, HSV in [0, 1] (hue in turns).
      colour_word: the caption adjective for that colour family.
      texture: texture of the main part with probability
        `WorldConfig.texture_prob` (else another texture).
      size: range of the shape's [-1, 1] extent, as a fraction of the
        image side.
      max_rotation: rotation range in degrees (uniform in ±max_rotation).
      home: background kind the class mostly appears on ("" = none).
      home_prob: P(background == home | class present).
      weight: relative probability of being drawn as a group head.
      plural: caption plural ("" = name + "s").
    """

    name: str
    shape: str
    hsv: tuple[float, float, float]
    colour_word: str
    texture: str
    size: tuple[float, float]
    max_rotation: float = 8.0
    home: str = ""
    home_prob: float = 0.0
    weight: float = 1.0
    plural: str = ""


@dataclasses.dataclass(frozen=True)
class BackgroundSpec:
    """One background kind; `name` is its prompt and caption word."""

    name: str
    phrase: str  # caption phrase, e.g. "on the water"
    horizon: bool  # may show sky above a horizon line
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """Two classes that often appear together, touching.

    When either class heads a group, the other joins it with probability
    `prob`. relation "beside": `second` stands next to `first`, overlapping
    its side (chair at a table); "rider": `second` sits on `first` and is
    drawn in front of it (person on a bike).
    """

    first: str
    second: str
    prob: float
    relation: str  # beside | rider


def _hsv(h_deg: float, s: float, v: float) -> tuple[float, float, float]:
    return (h_deg / 360.0, s, v)


DEFAULT_CLASSES = (
    ClassSpec("boat", "boat", _hsv(5, 0.8, 0.8), "red", "stripes",
              (0.45, 0.7), home="water", home_prob=0.9),
    ClassSpec("train", "train", _hsv(220, 0.7, 0.65), "blue", "solid",
              (0.65, 0.95), max_rotation=2.0, home="rails", home_prob=0.9),
    ClassSpec("plane", "plane", _hsv(210, 0.06, 0.93), "white", "solid",
              (0.48, 0.74), max_rotation=180.0, home="sky", home_prob=0.85),
    ClassSpec("car", "car", _hsv(50, 0.85, 0.9), "yellow", "solid",
              (0.47, 0.7), max_rotation=5.0, home="road", home_prob=0.7),
    ClassSpec("flower", "flower", _hsv(320, 0.7, 0.85), "pink", "solid",
              (0.42, 0.62), max_rotation=15.0, home="grass", home_prob=0.6),
    ClassSpec("chair", "chair", _hsv(25, 0.65, 0.45), "brown", "grain",
              (0.47, 0.66), max_rotation=4.0, weight=0.4),
    ClassSpec("table", "table", _hsv(175, 0.6, 0.62), "teal", "checker",
              (0.5, 0.74), max_rotation=3.0, weight=0.4),
    ClassSpec("person", "person", _hsv(275, 0.55, 0.62), "purple", "solid",
              (0.45, 0.64), max_rotation=6.0, weight=0.4, plural="people"),
    ClassSpec("bike", "bike", _hsv(28, 0.9, 0.95), "orange", "solid",
              (0.56, 0.76), max_rotation=5.0, weight=0.4),
    ClassSpec("ball", "ball", _hsv(190, 0.75, 0.8), "cyan", "dots",
              (0.22, 0.4), max_rotation=180.0, weight=0.7),
)

DEFAULT_BACKGROUNDS = (
    BackgroundSpec("water", "on the water", horizon=True),
    BackgroundSpec("rails", "on the rails", horizon=True),
    BackgroundSpec("grass", "on the grass", horizon=True),
    BackgroundSpec("sky", "in the sky", horizon=False),
    # Sand and wall host no anchored class: weighted up to be seen enough.
    BackgroundSpec("sand", "on the sand", horizon=True, weight=2.0),
    BackgroundSpec("wall", "by a wall", horizon=False, weight=2.0),
    BackgroundSpec("road", "on the road", horizon=True),
)

DEFAULT_PAIRS = (
    PairSpec("chair", "table", 0.7, "beside"),
    PairSpec("bike", "person", 0.7, "rider"),
)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Every knob of the world. `describe()` renders it for the README.

    Attributes:
      classes: foreground classes; label id of classes[i] is i + 1.
      backgrounds: background kinds.
      pairs: touching class pairs.
      group_probs: P(1, 2, 3, ... groups); a group is one object, a pair,
        or two instances of one class.
      max_objects: cap on objects per image (so on classes per image).
      duplicate_prob: P(a second instance) for a group head with no pair.
      texture_prob: P(the class's own texture) for the main part.
      horizon_prob: P(sky above a horizon) for kinds that allow it.
      min_visible_frac: an object keeps at least this share of its area
        visible (not occluded, not outside the image, not void).
      min_visible_area: ... and at least this share of the image area.
      void_width: pixels within this Chebyshev distance of an instance
        boundary are void (255) as in VOC; 0 = no void.
      pixel_noise: Gaussian sensor noise, std in 8-bit levels.
      jpeg_quality: JPEG quality of JPEGImages (4:4:4 chroma).
      captions_per_image: captions written per train image.
      placement_tries: placement attempts per group before it is dropped.
    """

    classes: tuple[ClassSpec, ...] = DEFAULT_CLASSES
    backgrounds: tuple[BackgroundSpec, ...] = DEFAULT_BACKGROUNDS
    pairs: tuple[PairSpec, ...] = DEFAULT_PAIRS
    group_probs: tuple[float, ...] = (0.5, 0.35, 0.15)
    max_objects: int = 4
    duplicate_prob: float = 0.12
    texture_prob: float = 0.75
    horizon_prob: float = 0.3
    min_visible_frac: float = 0.4
    min_visible_area: float = 0.006
    void_width: int = 1
    pixel_noise: float = 3.0
    jpeg_quality: int = 95
    captions_per_image: int = 3
    placement_tries: int = 25

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def background_names(self) -> list[str]:
        return [b.name for b in self.backgrounds]

    def subset(self, num_classes: int) -> WorldConfig:
        """The first `num_classes` classes, pairs among them kept."""
        if not 1 <= num_classes <= len(self.classes):
            raise ValueError(
                f"num_classes={num_classes}: choose 1..{len(self.classes)}")
        classes = self.classes[:num_classes]
        names = {c.name for c in classes}
        pairs = tuple(p for p in self.pairs
                      if p.first in names and p.second in names)
        return dataclasses.replace(self, classes=classes, pairs=pairs)

    def validate(self, image_size: int | None = None) -> None:
        """Raises ValueError naming what is wrong and how to fix it."""
        names = self.class_names
        kinds = self.background_names
        if not self.classes:
            raise ValueError("WorldConfig.classes is empty; give >= 1 class")
        if len(names) > 254:
            raise ValueError(f"{len(names)} classes: at most 254 fit the "
                             "palette (255 is void)")
        for group, what in ((names, "class"), (kinds, "background")):
            dup = sorted({n for n in group if group.count(n) > 1})
            if dup:
                raise ValueError(f"duplicate {what} names {dup}")
            bad = [n for n in group if not n.isalpha() or not n.islower()]
            if bad:
                raise ValueError(
                    f"{what} names {bad} must be single lower-case words "
                    "(they are prompt tokens)")
        if set(names) & set(kinds):
            raise ValueError(f"names used both as class and background: "
                             f"{sorted(set(names) & set(kinds))}")
        for c in self.classes:
            if c.shape not in SHAPES:
                raise ValueError(f"class {c.name!r}: unknown shape "
                                 f"{c.shape!r}; choose from {sorted(SHAPES)}")
            if c.texture not in TEXTURES:
                raise ValueError(f"class {c.name!r}: unknown texture "
                                 f"{c.texture!r}; choose from {TEXTURES}")
            if c.home and c.home not in kinds:
                raise ValueError(f"class {c.name!r}: home {c.home!r} is not "
                                 f"a background kind {kinds}")
            if not 0.0 <= c.home_prob <= 1.0 or c.weight < 0:
                raise ValueError(f"class {c.name!r}: home_prob must be in "
                                 "[0, 1] and weight >= 0")
            if not 0.0 < c.size[0] <= c.size[1] <= 1.0:
                raise ValueError(f"class {c.name!r}: size {c.size} must be "
                                 "0 < lo <= hi <= 1")
        if sum(c.weight for c in self.classes) <= 0:
            raise ValueError("all class weights are 0")
        seen = set()
        for p in self.pairs:
            if p.first not in names or p.second not in names:
                raise ValueError(
                    f"pair ({p.first}, {p.second}) names a class not in "
                    f"{names}; drop the pair or use WorldConfig.subset()")
            if p.relation not in ("beside", "rider"):
                raise ValueError(f"pair ({p.first}, {p.second}): relation "
                                 f"{p.relation!r} is not beside|rider")
            if {p.first, p.second} & seen or p.first == p.second:
                raise ValueError("a class may belong to at most one pair")
            seen |= {p.first, p.second}
            if not 0.0 <= p.prob <= 1.0:
                raise ValueError(f"pair ({p.first}, {p.second}): prob "
                                 "must be in [0, 1]")
        probs = np.asarray(self.group_probs, float)
        if probs.ndim != 1 or len(probs) == 0 or (probs < 0).any() or abs(
                probs.sum() - 1.0) > 1e-6:
            raise ValueError(f"group_probs {self.group_probs} must be "
                             "non-negative and sum to 1")
        if self.max_objects < len(probs):
            raise ValueError(f"max_objects={self.max_objects} < the "
                             f"{len(probs)} groups group_probs allows")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in 1..100")
        if self.void_width < 0 or self.captions_per_image < 1:
            raise ValueError("void_width >= 0 and captions_per_image >= 1")
        if image_size is not None and (
                image_size % PATCH_SIZE or image_size < 64):
            raise ValueError(
                f"image_size={image_size}: use a multiple of {PATCH_SIZE} "
                ">= 64 (the tiny ViTs use patch 16), e.g. 128 or 160")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """Markdown tables of the classes, backgrounds and difficulties."""
        lines = ["| id | class | shape | colour | texture | size | home |",
                 "|---|---|---|---|---|---|---|"]
        for i, c in enumerate(self.classes, 1):
            home = f"{c.home} ({c.home_prob:.0%})" if c.home else "-"
            lines.append(
                f"| {i} | {c.name} | {c.shape} | {c.colour_word} | "
                f"{c.texture} | {c.size[0]:.2f}-{c.size[1]:.2f} | {home} |")
        lines += ["", "| background | caption phrase | horizon (sky above) |",
                  "|---|---|---|"]
        for b in self.backgrounds:
            hz = f"{self.horizon_prob:.0%}" if b.horizon else "never"
            lines.append(f"| {b.name} | {b.phrase} | {hz} |")
        lines += ["", "Touching pairs:"]
        for p in self.pairs:
            lines.append(f"- {p.first} + {p.second} ({p.relation}): "
                         f"{p.prob:.0%} of the groups headed by either")
        gp = ", ".join(f"{i + 1}: {p:.0%}" for i, p in
                       enumerate(self.group_probs))
        lines += [
            "",
            f"Groups per image ({gp}); at most {self.max_objects} objects; "
            f"second instance {self.duplicate_prob:.0%}; own texture "
            f"{self.texture_prob:.0%}; every object keeps >= "
            f"{self.min_visible_frac:.0%} of its area and >= "
            f"{self.min_visible_area:.1%} of the image visible; void border "
            f"{self.void_width} px each side of every instance boundary.",
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Shapes: signed distances in object-local units (u right, v down)
# ---------------------------------------------------------------------------

Grid = tuple[np.ndarray, np.ndarray]
Parts = list[tuple[str, np.ndarray]]


def _circle(g: Grid, cx: float, cy: float, r: float) -> np.ndarray:
    return np.hypot(g[0] - cx, g[1] - cy) - r


def _ring(g: Grid, cx: float, cy: float, r: float, half: float) -> np.ndarray:
    return np.abs(np.hypot(g[0] - cx, g[1] - cy) - r) - half


def _box(g: Grid, cx: float, cy: float, hw: float, hh: float,
         r: float = 0.0) -> np.ndarray:
    qx = np.abs(g[0] - cx) - hw + r
    qy = np.abs(g[1] - cy) - hh + r
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - r


def _capsule(g: Grid, a: tuple[float, float], b: tuple[float, float],
             r: float) -> np.ndarray:
    ex, ey = b[0] - a[0], b[1] - a[1]
    wx, wy = g[0] - a[0], g[1] - a[1]
    t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    return np.hypot(wx - t * ex, wy - t * ey) - r


def _polygon(g: Grid, pts: Sequence[tuple[float, float]]) -> np.ndarray:
    """Exact signed distance to a simple polygon (negative inside)."""
    u, v = g
    d2 = np.full(u.shape, np.inf)
    inside = np.zeros(u.shape, bool)
    n = len(pts)
    for i in range(n):
        ax, ay = pts[i]
        bx, by = pts[i - 1]
        ex, ey = bx - ax, by - ay
        wx, wy = u - ax, v - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        d2 = np.minimum(d2, (wx - t * ex) ** 2 + (wy - t * ey) ** 2)
        crosses = (ay > v) != (by > v)
        if ey != 0.0:
            x_at = ax + (v - ay) * ex / ey
            inside ^= crosses & (u < x_at)
    return np.where(inside, -1.0, 1.0) * np.sqrt(d2)


def _union(*sdfs: np.ndarray) -> np.ndarray:
    return np.minimum.reduce(sdfs)


def _mirror_v(pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x, -y) for x, y in pts]


def _shape_boat(g: Grid) -> Parts:
    sail = _union(_polygon(g, [(0.0, 0.22), (0.0, -1.0), (0.75, 0.22)]),
                  _polygon(g, [(-0.12, 0.22), (-0.12, -0.72),
                               (-0.68, 0.22)]))
    hull = _polygon(g, [(-1.0, 0.28), (1.0, 0.28), (0.7, 0.78),
                        (-0.72, 0.78)])
    return [("sail", sail), ("main", hull)]


def _shape_train(g: Grid) -> Parts:
    wheels = _union(*[_circle(g, x, 0.45, 0.13)
                      for x in (-0.75, -0.45, 0.45, 0.75)])
    body = _box(g, 0.0, 0.0, 1.0, 0.45, 0.18)
    windows = _union(*[_box(g, x, -0.14, 0.11, 0.13, 0.03)
                       for x in (-0.66, -0.33, 0.0, 0.33, 0.66)])
    return [("dark", wheels), ("main", body), ("window", windows)]


def _shape_plane(g: Grid) -> Parts:
    wing = [(-0.28, 0.0), (0.25, 0.0), (-0.18, -0.95), (-0.42, -0.95)]
    tail = [(-0.95, 0.0), (-0.72, 0.0), (-0.9, -0.4), (-1.0, -0.4)]
    body = _union(_capsule(g, (-0.86, 0.0), (0.86, 0.0), 0.14),
                  _polygon(g, wing), _polygon(g, _mirror_v(wing)),
                  _polygon(g, tail), _polygon(g, _mirror_v(tail)))
    return [("main", body), ("window", _circle(g, 0.68, 0.0, 0.075))]


def _shape_car(g: Grid) -> Parts:
    body = _union(_box(g, 0.0, 0.2, 1.0, 0.28, 0.12),
                  _polygon(g, [(-0.55, -0.04), (0.45, -0.04), (0.25, -0.55),
                               (-0.35, -0.55)]))
    window = _polygon(g, [(-0.45, -0.1), (0.35, -0.1), (0.2, -0.46),
                          (-0.3, -0.46)])
    wheels = _union(_circle(g, -0.55, 0.5, 0.24), _circle(g, 0.55, 0.5, 0.24))
    hubs = _union(_circle(g, -0.55, 0.5, 0.09), _circle(g, 0.55, 0.5, 0.09))
    return [("main", body), ("window", window), ("dark", wheels),
            ("hub", hubs)]


def _shape_flower(g: Grid) -> Parts:
    stem = _union(_capsule(g, (0.0, -0.3), (0.0, 1.0), 0.07),
                  _polygon(g, [(0.02, 0.52), (0.48, 0.22), (0.52, 0.34),
                               (0.06, 0.7)]))
    petals = _union(*[
        _circle(g, 0.36 * math.cos(a), -0.45 + 0.36 * math.sin(a), 0.29)
        for a in (2 * math.pi * k / 5 - math.pi / 2 for k in range(5))])
    return [("stem", stem), ("main", petals),
            ("centre", _circle(g, 0.0, -0.45, 0.19))]


def _shape_chair(g: Grid) -> Parts:
    chair = _union(_box(g, -0.42, -0.45, 0.13, 0.55, 0.04),
                   _box(g, 0.0, 0.08, 0.55, 0.1),
                   _box(g, -0.44, 0.55, 0.09, 0.45),
                   _box(g, 0.44, 0.55, 0.09, 0.45))
    return [("main", chair)]


def _shape_table(g: Grid) -> Parts:
    legs = _union(_box(g, -0.78, 0.3, 0.09, 0.45),
                  _box(g, 0.78, 0.3, 0.09, 0.45))
    return [("wood", legs), ("main", _box(g, 0.0, -0.3, 1.0, 0.25, 0.03))]


def _shape_person(g: Grid) -> Parts:
    legs = _union(_capsule(g, (-0.13, 0.25), (-0.2, 0.9), 0.1),
                  _capsule(g, (0.13, 0.25), (0.2, 0.9), 0.1))
    torso = _union(
        _polygon(g, [(-0.28, -0.5), (0.28, -0.5), (0.32, 0.3),
                     (-0.32, 0.3)]),
        _capsule(g, (-0.27, -0.44), (-0.44, 0.14), 0.08),
        _capsule(g, (0.27, -0.44), (0.44, 0.14), 0.08))
    return [("legs", legs), ("main", torso),
            ("skin", _circle(g, 0.0, -0.74, 0.2))]


def _shape_bike(g: Grid) -> Parts:
    wheels = _union(_ring(g, -0.6, 0.33, 0.33, 0.075),
                    _ring(g, 0.6, 0.33, 0.33, 0.075))
    frame = _union(*[_capsule(g, a, b, 0.07) for a, b in (
        ((-0.6, 0.33), (-0.05, 0.33)), ((-0.05, 0.33), (0.38, -0.3)),
        ((-0.05, 0.33), (-0.3, -0.3)), ((-0.3, -0.3), (0.38, -0.3)),
        ((-0.6, 0.33), (-0.3, -0.3)), ((0.6, 0.33), (0.42, -0.42)))])
    extras = _union(_box(g, -0.32, -0.38, 0.17, 0.06, 0.03),
                    _capsule(g, (0.42, -0.42), (0.6, -0.55), 0.06))
    return [("dark", wheels), ("main", frame), ("dark", extras)]


def _shape_ball(g: Grid) -> Parts:
    return [("main", _circle(g, 0.0, 0.0, 1.0))]


# Shape function and its local bounding box (u0, v0, u1, v1).
SHAPES: dict[str, tuple[Callable[[Grid], Parts],
                        tuple[float, float, float, float]]] = {
    "boat": (_shape_boat, (-1.0, -1.0, 1.0, 0.78)),
    "train": (_shape_train, (-1.0, -0.45, 1.0, 0.58)),
    "plane": (_shape_plane, (-1.0, -0.95, 1.0, 0.95)),
    "car": (_shape_car, (-1.0, -0.55, 1.0, 0.74)),
    "flower": (_shape_flower, (-0.65, -1.1, 0.65, 1.07)),
    "chair": (_shape_chair, (-0.55, -1.0, 0.55, 1.0)),
    "table": (_shape_table, (-1.0, -0.55, 1.0, 0.75)),
    "person": (_shape_person, (-0.52, -0.94, 0.52, 1.0)),
    "bike": (_shape_bike, (-1.01, -0.61, 1.01, 0.74)),
    "ball": (_shape_ball, (-1.0, -1.0, 1.0, 1.0)),
}

# Fixed-colour parts (HSV, hue in turns). Several resemble some background
# on purpose: sail ~ clouds/foam, dark ~ asphalt/rails, skin ~ sand,
# stem ~ grass, wood ~ chair.
PART_HSV = {
    "sail": (0.12, 0.06, 0.95),
    "window": (0.55, 0.25, 0.92),
    "dark": (0.6, 0.1, 0.16),
    "hub": (0.6, 0.05, 0.7),
    "stem": (0.29, 0.7, 0.45),
    "centre": (0.14, 0.9, 0.95),
    "wood": (0.07, 0.6, 0.4),
    "skin": (0.08, 0.35, 0.88),
    "legs": (0.62, 0.6, 0.3),
}

# ---------------------------------------------------------------------------
# Colour and noise helpers
# ---------------------------------------------------------------------------


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0),
                                        min(max(v, 0.0), 1.0)))


def _jitter(rng: np.random.Generator, hsv: Sequence[float], dh: float,
            ds: float, dv: float) -> np.ndarray:
    h, s, v = hsv
    return _rgb(h + rng.uniform(-dh, dh), s + rng.uniform(-ds, ds),
                v + rng.uniform(-dv, dv))


@functools.lru_cache(maxsize=64)
def _interp_matrix(n: int, cells: int) -> np.ndarray:
    """[n, cells + 1] smoothstep interpolation weights onto n pixels."""
    t = (np.arange(n) + 0.5) / n * cells
    i = np.minimum(np.floor(t).astype(int), cells - 1)
    f = t - i
    f = f * f * (3.0 - 2.0 * f)
    m = np.zeros((n, cells + 1))
    m[np.arange(n), i] = 1.0 - f
    m[np.arange(n), i + 1] = f
    m.flags.writeable = False  # cached and shared
    return m


def _noise(rng: np.random.Generator, h: int, w: int, cy: int,
           cx: int) -> np.ndarray:
    """Value noise [h, w] in [0, 1] with cy x cx cells."""
    grid = rng.random((cy + 1, cx + 1))
    return _interp_matrix(h, cy) @ grid @ _interp_matrix(w, cx).T


def _fractal(rng: np.random.Generator, h: int, w: int, cells: int,
             octaves: int = 3) -> np.ndarray:
    """Octave sum of value noise, stretched to [0, 1]."""
    total = np.zeros((h, w))
    for o in range(octaves):
        c = cells * 2 ** o
        total += 0.5 ** o * _noise(rng, h, w, c, c)
    lo, hi = total.min(), total.max()
    return (total - lo) / max(hi - lo, 1e-9)


def _smooth01(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of colours a, b ([3] or [H, W, 3]) by t [H, W]."""
    return a + (b - a) * t[..., None]


# ---------------------------------------------------------------------------
# Backgrounds: (rng, h, w, top) -> (rgb [h, w, 3] in [0, 1], info)
# `top` is the horizon row: ground structure (rails, lanes) stays below it.
# ---------------------------------------------------------------------------

BgInfo = dict[str, Any]


def _bg_water(rng: np.random.Generator, h: int, w: int,
              top: int) -> tuple[np.ndarray, BgInfo]:
    hue = 0.56 + rng.uniform(-0.02, 0.02)
    sat, val = rng.uniform(0.55, 0.75), rng.uniform(0.5, 0.66)
    light, deep = _rgb(hue, sat, val), _rgb(hue + 0.01, sat + 0.1, val - 0.2)
    y = np.arange(h)[:, None]
    x = np.arange(w)[None, :]
    warp = _fractal(rng, h, w, 3, 2)
    period = rng.uniform(8.0, 14.0)
    wave = np.sin(2 * np.pi * (y / period + 0.9 * warp)
                  + 0.6 * np.sin(2 * np.pi * x / rng.uniform(25, 60)))
    img = _mix(deep, light, 0.35 + 0.65 * _noise(rng, h, w, 3, 3))
    img = img * (1.0 + 0.12 * _smooth01(wave)[..., None])
    foam = (rng.random((h, w)) > 0.9) & (wave > 0.8)
    foam &= _noise(rng, h, w, 5, 5) > 0.45
    img[foam] = _mix(img[foam], np.array([0.93, 0.95, 0.97]),
                     np.full(foam.sum(), 0.8))
    return img, {}


def _bg_rails(rng: np.random.Generator, h: int, w: int,
              top: int) -> tuple[np.ndarray, BgInfo]:
    gravel = _rgb(0.08 + rng.uniform(-0.02, 0.02), rng.uniform(0.1, 0.2),
                  rng.uniform(0.4, 0.5))
    shade = (0.7 + 0.35 * rng.random((h, w))
             + 0.25 * (_noise(rng, h, w, 6, 6) - 0.5))
    img = gravel[None, None, :] * shade[..., None]
    gauge = rng.uniform(0.13, 0.18) * h
    n_tracks = 2 if rng.random() < 0.35 else 1
    lo, hi = top + 0.12 * h, 0.88 * h - gauge
    y0 = rng.uniform(lo, max(lo, hi - (n_tracks - 1) * 2.2 * gauge))
    rail_rows = []
    sleeper = _rgb(0.07, 0.5, rng.uniform(0.26, 0.34))
    steel = _rgb(0.6, 0.05, rng.uniform(0.72, 0.82))
    period = rng.uniform(9.0, 13.0)
    x = np.arange(w)
    ys = np.arange(h)[:, None]
    for k in range(n_tracks):
        a = y0 + k * 2.2 * gauge
        b = a + gauge
        ties = ((x + rng.uniform(0, period)) % period) < 0.45 * period
        band = (ys >= a - 0.3 * gauge) & (ys <= b + 0.3 * gauge)
        img[band & ties[None, :]] = sleeper
        for r in (a, b):
            rows = (ys >= r - 1.2) & (ys <= r + 1.2)
            img[np.broadcast_to(rows, (h, w))] = steel
            img[np.broadcast_to((ys > r + 1.2) & (ys <= r + 2.2),
                                (h, w))] = steel * 0.6
        rail_rows.append(float(b))
    return img, {"rails": rail_rows}


def _bg_grass(rng: np.random.Generator, h: int, w: int,
              top: int) -> tuple[np.ndarray, BgInfo]:
    base = _jitter(rng, (0.27, 0.65, 0.5), 0.03, 0.1, 0.08)
    blades = _noise(rng, h, w, max(2, h // 14), max(2, w // 2))
    patches = _noise(rng, h, w, 3, 3)
    shade = 0.7 + 0.35 * blades + 0.25 * (patches - 0.5)
    shade += 0.1 * (rng.random((h, w)) - 0.5)
    return base[None, None, :] * shade[..., None], {}


def _bg_sky(rng: np.random.Generator, h: int, w: int,
            top: int) -> tuple[np.ndarray, BgInfo]:
    top_c = _rgb(0.59 + rng.uniform(-0.02, 0.02), rng.uniform(0.45, 0.65),
                 rng.uniform(0.75, 0.88))
    bottom_c = _rgb(0.57, rng.uniform(0.15, 0.25), rng.uniform(0.92, 0.98))
    t = np.broadcast_to(np.linspace(0.0, 1.0, h)[:, None], (h, w))
    img = _mix(top_c, bottom_c, t)
    cloud = _fractal(rng, h, w, 2, 3)
    cover = _smooth01((cloud - rng.uniform(0.5, 0.65)) / 0.12)
    white = _rgb(0.6, 0.03, rng.uniform(0.9, 1.0))
    shade = 1.0 - 0.12 * _noise(rng, h, w, 6, 6)
    return _mix(img, white[None, None, :] * shade[..., None], cover), {}


def _bg_sand(rng: np.random.Generator, h: int, w: int,
             top: int) -> tuple[np.ndarray, BgInfo]:
    base = _rgb(rng.uniform(0.09, 0.12), rng.uniform(0.28, 0.4),
                rng.uniform(0.78, 0.88))
    a = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:h, 0:w]
    warp = _fractal(rng, h, w, 3, 2)
    ripple = np.sin(2 * np.pi * ((x * np.cos(a) + y * np.sin(a))
                                 / rng.uniform(8, 14) + 0.7 * warp))
    shade = (1.0 + 0.06 * ripple + 0.1 * (rng.random((h, w)) - 0.5)
             + 0.12 * (_noise(rng, h, w, 3, 3) - 0.5))
    return base[None, None, :] * shade[..., None], {}


def _bg_wall(rng: np.random.Generator, h: int, w: int,
             top: int) -> tuple[np.ndarray, BgInfo]:
    bh = rng.uniform(9.0, 13.0)
    bw = bh * rng.uniform(2.0, 2.6)
    y, x = np.mgrid[0:h, 0:w].astype(float)
    y += rng.uniform(0, bh)
    row = np.floor(y / bh).astype(int)
    xs = x + rng.uniform(0, bw) + (row % 2) * bw / 2
    col = np.floor(xs / bw).astype(int)
    n_rows, n_cols = row.max() + 1, col.max() + 1
    # Red-brown bricks: hue 0.01-0.05 (red dominant), so RGB directly.
    val = rng.uniform(0.45, 0.65, (n_rows, n_cols, 1))
    sat = rng.uniform(0.5, 0.7, (n_rows, n_cols, 1))
    green = rng.uniform(0.06, 0.3, (n_rows, n_cols, 1))
    table = val * np.concatenate(
        [np.ones_like(sat), 1 - sat * (1 - green), 1 - sat], axis=-1)
    img = table[row, col] * (0.9 + 0.2 * rng.random((h, w)))[..., None]
    mortar = ((y % bh) < 2.0) | ((xs % bw) < 2.0)
    img[mortar] = _rgb(0.08, 0.08, rng.uniform(0.7, 0.8))
    return img, {}


def _bg_road(rng: np.random.Generator, h: int, w: int,
             top: int) -> tuple[np.ndarray, BgInfo]:
    base = _rgb(0.6, 0.04, rng.uniform(0.25, 0.35))
    shade = (1.0 + 0.3 * (rng.random((h, w)) - 0.5)
             + 0.2 * (_noise(rng, h, w, 4, 4) - 0.5))
    img = base[None, None, :] * shade[..., None]
    y, x = np.mgrid[0:h, 0:w]
    line_y = rng.uniform(top + 0.2 * (h - top), 0.8 * h)
    dash, gap = rng.uniform(12, 20), rng.uniform(8, 14)
    yellow = rng.random() < 0.5
    paint = _rgb(0.14, 0.8, 0.9) if yellow else _rgb(0.0, 0.0, 0.92)
    lane = (np.abs(y - line_y) < 1.6) & (
        ((x + rng.uniform(0, dash + gap)) % (dash + gap)) < dash)
    img[lane] = paint
    return img, {}


BACKGROUNDS: dict[str, Callable[..., tuple[np.ndarray, BgInfo]]] = {
    "water": _bg_water, "rails": _bg_rails, "grass": _bg_grass,
    "sky": _bg_sky, "sand": _bg_sand, "wall": _bg_wall, "road": _bg_road,
}


def _background(rng: np.random.Generator, kind: str, h: int, w: int,
                horizon: int | None) -> tuple[np.ndarray, BgInfo]:
    """The background kind, with sky above row `horizon` when given."""
    if kind not in BACKGROUNDS:
        raise ValueError(f"background kind {kind!r} has no texture; "
                         f"known kinds: {sorted(BACKGROUNDS)}")
    img, info = BACKGROUNDS[kind](rng, h, w, horizon or 0)
    if horizon:
        sky, _ = _bg_sky(rng, horizon, w, 0)
        img[:horizon] = sky
    return img.astype(np.float32), info


# ---------------------------------------------------------------------------
# Objects: pose -> raster (signed distances on the bounding box)
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Object:
    cls: int  # index into config.classes (label id - 1)
    cx: float
    cy: float
    scale: float  # pixels per local unit
    angle: float  # radians
    flip: bool
    texture: str
    relation: str  # single | duplicate | beside | rider
    group: int
    # filled by _raster
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # y0, y1, x0, x1 (image)
    parts: Parts = dataclasses.field(default_factory=list)  # px sdf, cropped
    sdf: np.ndarray | None = None  # px sdf on `box`
    local: Grid | None = None
    area: int = 0  # pixels of the whole shape, inside the image or not


def _corners(obj: _Object, shape: str) -> tuple[np.ndarray, np.ndarray]:
    """Image x, y [4] of the corners of the shape's local box."""
    _, (u0, v0, u1, v1) = SHAPES[shape]
    cu = np.array([u0, u1, u0, u1]) * (-1.0 if obj.flip else 1.0)
    cv = np.array([v0, v0, v1, v1])
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    return (obj.cx + obj.scale * (c * cu - s * cv),
            obj.cy + obj.scale * (s * cu + c * cv))


def _raster(obj: _Object, shape: str, h: int, w: int) -> None:
    """Signed distances (pixels) of the object's parts on its bounding box."""
    fn = SHAPES[shape][0]
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    px, py = _corners(obj, shape)
    fy0, fy1 = math.floor(py.min()) - 2, math.ceil(py.max()) + 2
    fx0, fx1 = math.floor(px.min()) - 2, math.ceil(px.max()) + 2
    # float32 halves the cost; distances need ~0.01 px, not more.
    ys = (np.arange(fy0, fy1) + 0.5 - obj.cy).astype(np.float32)
    xs = (np.arange(fx0, fx1) + 0.5 - obj.cx).astype(np.float32)
    dx, dy = np.meshgrid(xs, ys)
    u = (c * dx + s * dy) / obj.scale
    v = (-s * dx + c * dy) / obj.scale
    if obj.flip:
        u = -u
    parts = [(role, d * obj.scale) for role, d in fn((u, v))]
    full = _union(*[d for _, d in parts])
    obj.area = int((full < 0).sum())
    y0, y1 = max(fy0, 0), min(fy1, h)
    x0, x1 = max(fx0, 0), min(fx1, w)
    obj.box = (y0, max(y1, y0), x0, max(x1, x0))
    sl = (slice(y0 - fy0, y1 - fy0), slice(x0 - fx0, x1 - fx0))
    obj.parts = [(role, d[sl]) for role, d in parts]
    obj.sdf = full[sl]
    obj.local = (u[sl], v[sl])


def _instance_map(objs: Sequence[_Object], h: int, w: int) -> np.ndarray:
    """[h, w] int: 0 background, i + 1 for objs[i]; later objects on top."""
    inst = np.zeros((h, w), np.int32)
    for i, o in enumerate(objs):
        y0, y1, x0, x1 = o.box
        if y1 > y0 and x1 > x0:
            region = inst[y0:y1, x0:x1]
            region[o.sdf < 0] = i + 1
    return inst


def _window(x: np.ndarray, r: int, op: np.ufunc) -> np.ndarray:
    """op-reduction of x [h, w] over (2r + 1)^2 windows cut at the border.
    """
    rows = x.copy()
    for d in range(1, r + 1):
        op(rows[d:], x[:-d], out=rows[d:])
        op(rows[:-d], x[d:], out=rows[:-d])
    out = rows.copy()
    for d in range(1, r + 1):
        op(out[:, d:], rows[:, :-d], out=out[:, d:])
        op(out[:, :-d], rows[:, d:], out=out[:, :-d])
    return out


def _void(inst: np.ndarray, width: int) -> np.ndarray:
    """Pixels within Chebyshev distance `width` of an instance boundary."""
    if width == 0:
        return np.zeros(inst.shape, bool)
    return _window(inst, width, np.minimum) != _window(inst, width,
                                                        np.maximum)


def _visible_ok(objs: Sequence[_Object], cfg: WorldConfig, h: int,
                w: int) -> bool:
    inst = _instance_map(objs, h, w)
    inst[_void(inst, cfg.void_width)] = 0
    counts = np.bincount(inst.ravel(), minlength=len(objs) + 1)[1:]
    need = cfg.min_visible_area * h * w
    return all(n >= need and n >= cfg.min_visible_frac * o.area
               for n, o in zip(counts, objs, strict=True))


# ---------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------


def _sample_groups(rng: np.random.Generator,
                   cfg: WorldConfig) -> list[tuple[list[int], str]]:
    """Class groups [(class indices in drawing order, relation)].

    At most one background-anchored class kind per image (classes with
    different homes never meet), so P(home | class) is the configured
    `home_prob` and not diluted by conflicts.
    """
    names = cfg.class_names
    partner: dict[int, tuple[PairSpec, int]] = {}
    for p in cfg.pairs:
        a, b = names.index(p.first), names.index(p.second)
        partner[a] = (p, b)
        partner[b] = (p, a)
    weights = np.array([c.weight for c in cfg.classes], float)
    n_groups = int(rng.choice(len(cfg.group_probs), p=cfg.group_probs)) + 1
    groups: list[tuple[list[int], str]] = []
    present: set[int] = set()
    home = ""
    n_obj = 0
    while len(groups) < n_groups and n_obj < cfg.max_objects:
        wts = weights.copy()
        for i, c in enumerate(cfg.classes):
            if i in present or (home and c.home and c.home != home):
                wts[i] = 0.0
        if wts.sum() <= 0:
            break
        head = int(rng.choice(len(wts), p=wts / wts.sum()))
        r_pair, r_dup = rng.random(), rng.random()
        members, relation = [head], "single"
        room = cfg.max_objects - n_obj >= 2
        if head in partner:
            spec, other = partner[head]
            if room and other not in present and r_pair < spec.prob:
                first, second = names.index(spec.first), names.index(
                    spec.second)
                members, relation = [first, second], spec.relation
        elif room and r_dup < cfg.duplicate_prob:
            members, relation = [head, head], "duplicate"
        groups.append((members, relation))
        present.update(members)
        n_obj += len(members)
        home = home or next((cfg.classes[m].home for m in members
                             if cfg.classes[m].home), "")
    return groups


def _sample_background(rng: np.random.Generator, cfg: WorldConfig,
                       classes: Sequence[int]) -> str:
    """The anchored class's home with its home_prob, else another kind."""
    kinds = cfg.background_names
    weights = np.array([b.weight for b in cfg.backgrounds], float)
    anchored = [cfg.classes[c] for c in classes if cfg.classes[c].home]
    r = rng.random()
    if anchored:
        spec = anchored[0]
        if r < spec.home_prob:
            return spec.home
        weights[kinds.index(spec.home)] = 0.0
        if weights.sum() <= 0:
            return spec.home
    return kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]


def _texture(rng: np.random.Generator, cfg: WorldConfig, cls: int) -> str:
    own = cfg.classes[cls].texture
    if rng.random() < cfg.texture_prob:
        return own
    others = [t for t in TEXTURES if t not in (own, "grain")]
    return others[int(rng.integers(len(others)))]


def _pose(rng: np.random.Generator, cfg: WorldConfig, cls: int, h: int,
          w: int, horizon: int | None, bg: str, info: BgInfo, relation: str,
          group: int) -> _Object:
    """Free placement; objects stand below the horizon, trains on rails."""
    spec = cfg.classes[cls]
    _, (_, _, _, v1) = SHAPES[spec.shape]
    scale = rng.uniform(*spec.size) * h / 2.0
    angle = math.radians(rng.uniform(-spec.max_rotation, spec.max_rotation))
    flip = bool(rng.random() < 0.5)
    cx = rng.uniform(0.12, 0.88) * w
    if spec.home == "sky":
        cy = rng.uniform(0.12, 0.88) * h
    else:
        ground_lo = (horizon + 0.12 * h) if horizon else 0.3 * h
        ground = rng.uniform(ground_lo, 1.02 * h)
        cy = ground - v1 * scale
    if bg == "rails" and spec.shape == "train" and info.get("rails"):
        rails = info["rails"]
        cy = rails[int(rng.integers(len(rails)))] - 0.5 * scale
        angle = 0.0
    return _Object(cls, cx, cy, scale, angle, flip, _texture(rng, cfg, cls),
                   relation, group)


def _pose_group(rng: np.random.Generator, cfg: WorldConfig,
                members: list[int], relation: str, h: int, w: int,
                horizon: int | None, bg: str, info: BgInfo,
                group: int) -> list[_Object]:
    first = _pose(rng, cfg, members[0], h, w, horizon, bg, info, relation,
                  group)
    if len(members) == 1:
        return [first]
    second = _pose(rng, cfg, members[1], h, w, horizon, bg, info, relation,
                   group)
    if relation == "beside":
        # Chair (first) faces the table (second); the seat slides under the
        # table top, feet on one ground line.
        side = 1.0 if rng.random() < 0.5 else -1.0
        first.flip = side < 0
        first.angle = second.angle = 0.0
        ground = first.cy + SHAPES[cfg.classes[members[0]].shape][1][3] * (
            first.scale)
        second.cx = first.cx + side * (0.5 * first.scale
                                       + rng.uniform(0.45, 0.65)
                                       * second.scale)
        second.cy = ground - SHAPES[cfg.classes[members[1]].shape][1][3] * (
            second.scale)
        objs = [first, second] if rng.random() < 0.5 else [second, first]
        return objs
    if relation == "rider":
        # Person (second) on the bike's seat, legs over the frame, in front.
        second.scale = first.scale * rng.uniform(0.9, 1.1)
        sign = -1.0 if first.flip else 1.0
        second.angle = first.angle
        second.cx = first.cx + sign * (-0.3 * first.scale
                                       + rng.uniform(-0.08, 0.08)
                                       * first.scale)
        second.cy = first.cy - 0.38 * first.scale - 0.25 * second.scale
        return [first, second]
    return [first, second]


@dataclasses.dataclass
class Scene:
    """One rendered image and its records."""

    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray  # uint8 [H, W]: 0 background, 1..C, 255 void
    meta: dict[str, Any]


def render_scene(seed: int, split: str, index: int, image_size: int,
                 config: WorldConfig | None = None) -> Scene:
    """Renders image `index` of `split`; a pure function of its arguments.

    Returns:
      Scene with image uint8 [S, S, 3], mask uint8 [S, S] (label id = class
      index + 1, 255 void) and meta (classes, background, objects, ...).
    """
    cfg = config or WorldConfig()
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use one of {SPLITS}")
    h = w = image_size
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    groups = _sample_groups(rng, cfg)
    classes = [c for members, _ in groups for c in members]
    bg = _sample_background(rng, cfg, classes)
    horizon = None
    if cfg.backgrounds[cfg.background_names.index(bg)].horizon and (
            rng.random() < cfg.horizon_prob):
        horizon = int(rng.uniform(0.22, 0.42) * h)
    img, info = _background(rng, bg, h, w, horizon)

    objs: list[_Object] = []
    for g, (members, relation) in enumerate(groups):
        # A group that finds no room is dropped (~0.1% of groups by
        # default), but never the first: every image has a label.
        tries = cfg.placement_tries * (10 if g == 0 else 1)
        for _ in range(tries):
            cand = _pose_group(rng, cfg, members, relation, h, w, horizon,
                               bg, info, g)
            for o in cand:
                _raster(o, cfg.classes[o.cls].shape, h, w)
            if _visible_ok(objs + cand, cfg, h, w):
                objs += cand
                break
        if not objs:
            raise ValueError(
                f"could not place {[cfg.class_names[m] for m in members]} "
                f"in a {h}x{w} image in {tries} tries: lower the class "
                "sizes or min_visible_frac / min_visible_area")

    light = rng.normal(size=2)
    light /= np.linalg.norm(light)
    for o in objs:
        _paint(rng, img, o, cfg, light)

    # Camera: contrast, brightness, white balance, sensor noise (8-bit).
    contrast, bright = rng.uniform(0.9, 1.1), rng.uniform(-0.05, 0.05)
    gains = rng.uniform(0.95, 1.05, 3) * 255.0
    scale = (contrast * gains).astype(np.float32)
    offset = ((0.5 - 0.5 * contrast + bright) * gains + 0.5).astype(
        np.float32)
    out = img.astype(np.float32) * scale + offset
    out += rng.standard_normal(img.shape, np.float32) * np.float32(
        cfg.pixel_noise)
    image = np.clip(out, 0, 255).astype(np.uint8)

    inst = _instance_map(objs, h, w)
    void = _void(inst, cfg.void_width)
    labels = np.array([0] + [o.cls + 1 for o in objs], np.uint8)
    mask = labels[inst]
    mask[void] = IGNORE_INDEX
    visible_inst = np.where(void, 0, inst)
    counts = np.bincount(visible_inst.ravel(), minlength=len(objs) + 1)
    meta = _scene_meta(cfg, objs, bg, horizon, inst, visible_inst, counts,
                       mask)
    return Scene(image, mask, meta)


def _paint(rng: np.random.Generator, img: np.ndarray, o: _Object,
           cfg: WorldConfig, light: np.ndarray) -> None:
    """Composites the object's parts (antialiased by their distances)."""
    y0, y1, x0, x1 = o.box
    if y1 <= y0 or x1 <= x0:
        return
    spec = cfg.classes[o.cls]
    u, v = o.local
    region = img[y0:y1, x0:x1]
    main = _jitter(rng, spec.hsv, 0.025, 0.08, 0.08)
    shade = 1.0 + 0.15 * np.clip(light[0] * u + light[1] * v, -1.5, 1.5)
    pattern = _pattern(rng, o.texture, u, v, o.scale)
    lighter = rng.random() < 0.5
    second = main + (1.0 - main) * 0.55 if lighter else main * 0.55
    for role, d in o.parts:
        if role == "main":
            col = _mix(main, second, pattern)
        else:
            col = _jitter(rng, PART_HSV[role], 0.015, 0.05, 0.05)
        col = (col * shade[..., None]).astype(np.float32)
        alpha = np.clip(0.5 - d, 0.0, 1.0)[..., None]
        col -= region
        col *= alpha
        region += col


def _pattern(rng: np.random.Generator, texture: str, u: np.ndarray,
             v: np.ndarray, scale: float) -> np.ndarray:
    """Texture mix weight in [0, 1] ([h, w]) in object-local coordinates.

    Periods are in pixels (6-12 px, about one per patch) so that a texture
    looks the same on small and large objects; edges are ~1 px wide.
    """
    if texture == "solid":
        return np.zeros(u.shape)
    period = rng.uniform(6.0, 12.0) / scale  # in local units
    a = rng.uniform(0.0, np.pi)
    if texture == "stripes":
        s = np.sin(2 * np.pi * (u * math.cos(a) + v * math.sin(a)) / period)
        return np.clip(0.5 + s * scale * period / (2 * np.pi), 0.0, 1.0)
    if texture == "checker":
        s = np.sin(np.pi * u / period) * np.sin(np.pi * v / period)
        return np.clip(0.5 + s * scale * period / np.pi, 0.0, 1.0)
    if texture == "dots":
        fu = (u / period) % 1.0 - 0.5
        fv = (v / period) % 1.0 - 0.5
        r = np.hypot(fu, fv) * period * scale
        return np.clip(0.5 + (0.28 * period * scale - r), 0.0, 1.0)
    if texture == "grain":
        s = np.sin(2 * np.pi * (v + 0.15 * np.sin(2 * np.pi * u * 0.7 + a))
                   / (0.6 * period))
        return 0.8 * ((s + 1.0) / 2.0) ** 3
    raise ValueError(f"unknown texture {texture!r}; choose from {TEXTURES}")


def _scene_meta(cfg: WorldConfig, objs: Sequence[_Object], bg: str,
                horizon: int | None, inst: np.ndarray,
                visible_inst: np.ndarray, counts: np.ndarray,
                mask: np.ndarray) -> dict[str, Any]:
    """Per-image record. Object pixel counts: area_px (whole shape),
    inside_px (inside the image), occluded_px (inside but covered by later
    objects), visible_px (shown and not void)."""
    objects = []
    shown = np.bincount(inst.ravel(), minlength=len(objs) + 1)
    for i, o in enumerate(objs):
        ys, xs = np.nonzero(visible_inst == i + 1)
        objects.append({
            "class": cfg.classes[o.cls].name,
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                     int(ys.max()) + 1],
            "texture": o.texture,
            "relation": o.relation,
            "group": o.group,
            "area_px": o.area,
            "inside_px": int((o.sdf < 0).sum()),
            "occluded_px": int((o.sdf < 0).sum() - shown[i + 1]),
            "visible_px": int(counts[i + 1]),
        })
    labels = sorted({o.cls + 1 for o in objs})
    touching = []
    for p in cfg.pairs:
        a = cfg.class_names.index(p.first) + 1
        b = cfg.class_names.index(p.second) + 1
        if a in labels and b in labels and masks_touch(
                mask, a, b, 2 * cfg.void_width + 1):
            touching.append([p.first, p.second])
    return {
        "labels": labels,
        "classes": [cfg.classes[c - 1].name for c in labels],
        "background": bg,
        "horizon": horizon,
        "objects": objects,
        "touching": touching,
    }


def masks_touch(mask: np.ndarray, a: int, b: int, reach: int) -> bool:
    """True if a pixel of label a is within Chebyshev `reach` of label b.

    `reach` = 2 * void_width + 1 bridges the void line between neighbours.
    """
    ma = mask == a
    mb = mask == b
    if not ma.any() or not mb.any():
        return False
    return bool((_window(ma, reach, np.logical_or) & mb).any())


# ---------------------------------------------------------------------------
# Captions and vocabulary
# ---------------------------------------------------------------------------


def _phrases(cfg: WorldConfig, meta: dict[str, Any],
             attributes: bool) -> list[tuple[str, str]]:
    """(class name, noun phrase) per class, largest visible first."""
    area: dict[str, int] = {}
    count: dict[str, int] = {}
    texture: dict[str, str] = {}
    for o in meta["objects"]:
        area[o["class"]] = area.get(o["class"], 0) + o["visible_px"]
        count[o["class"]] = count.get(o["class"], 0) + 1
        texture.setdefault(o["class"], o["texture"])
    out = []
    for name in sorted(area, key=lambda n: -area[n]):
        spec = cfg.classes[cfg.class_names.index(name)]
        words = []
        if attributes:
            words = [w for w in (TEXTURE_WORDS[texture[name]],
                                 spec.colour_word) if w]
        if count[name] > 1:
            words = ["two"] + words + [spec.plural or name + "s"]
        else:
            first = (words or [name])[0]
            words = ["an" if first[0] in "aeiou" else "a"] + words + [name]
        out.append((name, " ".join(words)))
    return out


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions(cfg: WorldConfig, meta: dict[str, Any],
             rng: np.random.Generator) -> list[str]:
    """Alt-text style captions naming the objects and the background.

    Styles, cycled up to `captions_per_image`: a full description with
    attributes ("a photo of a striped red boat and a pink flower on the
    water."); the most visible object and the background ("a boat on the
    water." or "water with a boat."); the text bank's template with one noun
    per class ("a clean origami boat and flower on the water."), so that
    "clean" and "origami" are in the vocabulary and carry no meaning. A
    horizon adds "under the sky".
    """
    bg = cfg.backgrounds[cfg.background_names.index(meta["background"])]
    where = bg.phrase + (" under the sky" if meta["horizon"] else "")
    full = [p for _, p in _phrases(cfg, meta, attributes=True)]
    plain = _phrases(cfg, meta, attributes=False)
    if not plain:
        styles = [f"a photo of {bg.name}.", f"{bg.name}."]
    else:
        short = (f"{plain[0][1]} {where}." if rng.random() < 0.5
                 else f"{bg.name} with {plain[0][1]}.")
        nouns = _join([name for name, _ in plain])
        styles = [f"a photo of {_join(full)} {where}.", short,
                  f"{PROMPT_TEMPLATE.format(nouns)[:-1]} {where}."]
    return [styles[i % len(styles)] for i in range(cfg.captions_per_image)]


def vocabulary(cfg: WorldConfig) -> list[str]:
    """Every word captions and prompts can use (for a word-level tokenizer).
    """
    words = set(PROMPT_TEMPLATE.replace("{}.", "").split())
    words |= {"a", "an", "photo", "of", "and", "with", "two", "under",
              "sky"}
    words |= {w for w in TEXTURE_WORDS.values() if w}
    for c in cfg.classes:
        words |= {c.name, c.colour_word, c.plural or c.name + "s"}
    for b in cfg.backgrounds:
        words |= {b.name} | set(b.phrase.split())
    return sorted(words)


# ---------------------------------------------------------------------------
# Writing the world
# ---------------------------------------------------------------------------


voc_palette = voc.palette  # the VOC colour map (one copy, in voc.py)


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, "JPEG", quality=quality,
                                       subsampling=0)
    return buf.getvalue()


def _encode_mask(mask: np.ndarray) -> bytes:
    im = Image.fromarray(mask, "L")
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _json_bytes(obj: Any, compact: bool = False) -> bytes:
    # indent=None keeps json's C encoder: 10x faster on meta.json.
    text = json.dumps(obj, sort_keys=True, indent=None if compact else 1,
                      separators=(",", ":") if compact else None)
    return (text + "\n").encode()


def _params(seed: int, num_train: int, num_val: int, image_size: int,
            cfg: WorldConfig) -> dict[str, Any]:
    return {"seed": seed, "num_train": num_train, "num_val": num_val,
            "image_size": image_size, "config": cfg.to_dict()}


def image_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    """world.json matches and every listed file is present."""
    try:
        world = json.loads((root / "world.json").read_text())
    except (OSError, ValueError):
        return False
    # A JSON round trip turns tuples into lists: compare like with like.
    if world.get("version") != WORLD_VERSION or world.get(
            "params") != json.loads(json.dumps(params)):
        return False
    n = params["num_train"] + params["num_val"]
    try:
        jpgs = sum(1 for _ in (root / "JPEGImages").iterdir())
        pngs = sum(1 for _ in (root / "SegmentationClass").iterdir())
        lists = all((root / "ImageSets" / "Segmentation" / f).is_file()
                    for f in ("train.txt", "train_aug.txt", "val.txt"))
    except OSError:
        return False
    return jpgs == n and pngs == n and lists


def _temp_prefix(root: Path) -> str:
    return f".{root.name}.tmp-"


def _remove_stale_temps(root: Path) -> None:
    """Deletes temp dirs of dead generators of this host for `root`."""
    if not root.parent.is_dir():
        return
    host = socket.gethostname()
    for d in root.parent.glob(_temp_prefix(root) + "*"):
        tail = d.name[len(_temp_prefix(root)):].split("-")
        if len(tail) < 3 or "-".join(tail[:-2]) != host:
            continue
        try:
            os.kill(int(tail[-2]), 0)
        except (ProcessLookupError, ValueError):
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by another user


def generate(root: str | os.PathLike, *, seed: int = 0,
             num_train: int = 1500, num_val: int = 300,
             image_size: int = 160, config: WorldConfig | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Writes the world under `root` in the VOC layout; idempotent.
    `progress`: a tqdm bar per split on stderr.

    A complete world with the same parameters (world.json) is left as is.
    Otherwise the world is written into a temporary sibling directory and
    renamed onto `root`, so an interrupted run never leaves a half world
    that looks complete; an older generated world at `root` is replaced. A
    non-empty `root` that is not a generated world is refused.

    Returns:
      info dict: root, generated (False if it already existed), seconds,
      counts, digest (SHA-256 over every file but world.json), stats.
    """
    cfg = config or WorldConfig()
    cfg.validate(image_size)
    if num_train < 1 or num_val < 0:
        raise ValueError(f"num_train={num_train}, num_val={num_val}: need "
                         "num_train >= 1 and num_val >= 0")
    root = Path(root).absolute()
    params = _params(seed, num_train, num_val, image_size, cfg)
    if _is_complete(root, params):
        world = json.loads((root / "world.json").read_text())
        return {"root": str(root), "generated": False, "seconds": 0.0,
                **{k: world[k] for k in ("counts", "digest", "stats")}}
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} is a file; choose a directory")
    if root.is_dir() and any(root.iterdir()) and not (
            root / "world.json").exists():
        raise FileExistsError(
            f"{root} is not empty and holds no synthetic world.json; "
            "refusing to overwrite it: choose another root or empty it")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)

    start = time.perf_counter()
    tmp = root.parent / (f"{_temp_prefix(root)}{socket.gethostname()}-"
                         f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        counts, digest, stats = _write_world(tmp, seed, num_train, num_val,
                                             image_size, cfg, params,
                                             progress)
        _swap_into_place(tmp, root, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"root": str(root), "generated": True,
            "seconds": time.perf_counter() - start, "counts": counts,
            "digest": digest, "stats": stats}


def _swap_into_place(tmp: Path, root: Path, params: dict[str, Any]) -> None:
    if _is_complete(root, params):
        return  # another process wrote the same world meanwhile
    old = None
    if root.exists():
        old = root.parent / (f"{_temp_prefix(root)}{socket.gethostname()}-"
                             f"{os.getpid()}-old{uuid.uuid4().hex[:8]}")
        if any(root.iterdir()):
            os.rename(root, old)
        else:
            root.rmdir()
            old = None
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process finished first: keep its world if it is ours.
        if not _is_complete(root, params):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_world(tmp: Path, seed: int, num_train: int, num_val: int,
                 image_size: int, cfg: WorldConfig, params: dict[str, Any],
                 progress: bool = False,
                 ) -> tuple[dict[str, int], str, dict[str, Any]]:
    from tqdm import tqdm  # noqa: PLC0415


    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp / sub).mkdir(parents=True)
    # VOC + SBD readers take train_aug masks from SegmentationClassAug.
    os.symlink("SegmentationClass", tmp / "SegmentationClassAug",
               target_is_directory=True)
    hashes: dict[str, str] = {}

    def put(rel: str, data: bytes) -> None:
        (tmp / rel).write_bytes(data)
        hashes[rel] = hashlib.sha256(data).hexdigest()

    metas: dict[str, Any] = {}
    caps: dict[str, list[str]] = {}
    ids: dict[str, list[str]] = {}
    for split, n in (("train", num_train), ("val", num_val)):
        ids[split] = []
        for i in tqdm(range(n), desc=f"world ({split})", disable=not progress,
                      dynamic_ncols=True, mininterval=1.0):
            sid = image_id(split, i)
            scene = render_scene(seed, split, i, image_size, cfg)
            put(f"JPEGImages/{sid}.jpg",
                _encode_jpeg(scene.image, cfg.jpeg_quality))
            put(f"SegmentationClass/{sid}.png", _encode_mask(scene.mask))
            metas[sid] = {"split": split, **scene.meta}
            if split == "train":
                crng = np.random.default_rng([seed, 2, i])
                caps[sid] = captions(cfg, scene.meta, crng)
            ids[split].append(sid)
    lists = {"train": ids["train"], "train_aug": ids["train"],
             "val": ids["val"]}
    for name, names in lists.items():
        put(f"ImageSets/Segmentation/{name}.txt",
            ("\n".join(names) + "\n").encode() if names else b"")
    put("classes.json", _json_bytes(classes_record(cfg, image_size)))
    put("captions.json", _json_bytes(caps, compact=True))
    put("meta.json", _json_bytes(metas, compact=True))
    digest = hashlib.sha256("".join(
        f"{k}\0{hashes[k]}\n" for k in sorted(hashes)).encode()).hexdigest()
    counts = {"train": num_train, "val": num_val}
    stats = meta_statistics(cfg, metas)
    world = {"version": WORLD_VERSION, "params": params, "counts": counts,
             "digest": digest, "stats": stats}
    # Written last: its presence marks a complete world.
    (tmp / "world.json").write_bytes(_json_bytes(world))
    return counts, digest, stats


def classes_record(cfg: WorldConfig, image_size: int) -> dict[str, Any]:
    """The classes.json content (schema in the module docstring)."""
    return {
        "classes": ["background"] + cfg.class_names,
        "prompts": cfg.class_names,
        "background_prompts": cfg.background_names,
        "template": PROMPT_TEMPLATE,
        "num_classes": len(cfg.classes) + 1,
        "ignore_index": IGNORE_INDEX,
        "max_classes_per_image": cfg.max_objects,
        "image_size": image_size,
        "colour_words": {c.name: c.colour_word for c in cfg.classes},
        "homes": {c.name: [c.home, c.home_prob] for c in cfg.classes
                  if c.home},
        "pairs": [[p.first, p.second, p.relation, p.prob]
                  for p in cfg.pairs],
        "vocabulary": vocabulary(cfg),
    }


# ---------------------------------------------------------------------------
# Statistics (the evidence that the difficulties are there)
# ---------------------------------------------------------------------------


def meta_statistics(cfg: WorldConfig,
                    metas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rates measured on the written scenes (all splits together).

    Returns: images; class_freq (share of images with the class);
    home_rate {class: P(home background | class)}; home_share {class:
    P(class | its home background)}; pair_rate {"a+b": P(b | a) and P(a | b)
    together, i.e. P(both | either)}; touch_rate {"a+b": P(touching | both)};
    objects_per_image and classes_per_image histograms; occluded and
    truncated (share of objects with > 5% of their area covered by later
    objects / outside the image).
    """
    n = len(metas)
    names = cfg.class_names
    has = {c: [m for m in metas.values() if c in m["classes"]]
           for c in names}
    by_bg = {b: [m for m in metas.values() if m["background"] == b]
             for b in cfg.background_names}
    home_rate, home_share = {}, {}
    for c in cfg.classes:
        if c.home and has[c.name]:
            home_rate[c.name] = round(sum(
                m["background"] == c.home for m in has[c.name])
                / len(has[c.name]), 4)
        if c.home and by_bg[c.home]:
            home_share[c.name] = round(sum(
                c.name in m["classes"] for m in by_bg[c.home])
                / len(by_bg[c.home]), 4)
    pair_rate, touch_rate = {}, {}
    for p in cfg.pairs:
        either = [m for m in metas.values()
                  if p.first in m["classes"] or p.second in m["classes"]]
        both = [m for m in either
                if p.first in m["classes"] and p.second in m["classes"]]
        key = f"{p.first}+{p.second}"
        pair_rate[key] = round(len(both) / max(len(either), 1), 4)
        touch_rate[key] = round(sum(
            [p.first, p.second] in m["touching"] for m in both)
            / max(len(both), 1), 4)
    objs = [o for m in metas.values() for o in m["objects"]]
    hist_o: dict[str, int] = {}
    hist_c: dict[str, int] = {}
    for m in metas.values():
        k = str(len(m["objects"]))
        hist_o[k] = hist_o.get(k, 0) + 1
        k = str(len(m["classes"]))
        hist_c[k] = hist_c.get(k, 0) + 1
    return {
        "images": n,
        "class_freq": {c: round(len(has[c]) / max(n, 1), 4) for c in names},
        "background_freq": {b: round(len(v) / max(n, 1), 4)
                            for b, v in by_bg.items()},
        "home_rate": home_rate,
        "home_share": home_share,
        "pair_rate": pair_rate,
        "touch_rate": touch_rate,
        "objects_per_image": dict(sorted(hist_o.items())),
        "classes_per_image": dict(sorted(hist_c.items())),
        "occluded": round(sum(o["occluded_px"] > 0.05 * o["area_px"]
                              for o in objs) / max(len(objs), 1), 4),
        "truncated": round(sum(o["inside_px"] < 0.95 * o["area_px"]
                               for o in objs) / max(len(objs), 1), 4),
        "horizon": round(sum(m["horizon"] is not None
                             for m in metas.values()) / max(n, 1), 4),
    }


def read_split(root: str | os.PathLike, split: str) -> list[str]:
    path = Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
    return [s for s in path.read_text().split() if s]


def _miou(conf: np.ndarray) -> float:
    tp = np.diag(conf).astype(float)
    denom = conf.sum(0) + conf.sum(1) - tp
    present = conf.sum(1) > 0
    return float(np.mean(tp[present] / denom[present]))


def _confusion(gt: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    keep = gt != IGNORE_INDEX
    return np.bincount(k * gt[keep].astype(int) + pred[keep],
                       minlength=k * k).reshape(k, k)


def oracle_statistics(root: str | os.PathLike, split: str = "val", *,
                      fit_split: str = "train", slic_segments: int = 100,
                      slic_compactness: float = 10.0,
                      max_images: int = 0) -> dict[str, float]:
    """mIoU of three oracles on `split` (evaluation aids, not the method).

    - colour: the majority label of each quantised RGB colour (16 levels
      per channel), fitted on `fit_split`'s masks. High would mean colour
      alone segments the world (a shortcut); the world aims for moderate.
    - superpixel: SLIC (skimage, Lab) with each superpixel given its
      majority ground-truth label: the ceiling of superpixel-aligned
      masks. High means object outlines are colour edges.
    - patch: each 16x16 patch given its majority label: the ceiling of a
      patch-level CAM without any boundary refinement.
    """
    from skimage.segmentation import slic  # heavy: only for this aid

    root = Path(root)
    k = len(json.loads((root / "classes.json").read_text())["classes"])

    def load(sid: str) -> tuple[np.ndarray, np.ndarray]:
        img = np.asarray(Image.open(root / "JPEGImages" / f"{sid}.jpg"))
        mask = np.asarray(Image.open(root / "SegmentationClass"
                                     / f"{sid}.png"))
        return img, mask

    def limit(ids: list[str]) -> list[str]:
        return ids[:max_images] if max_images else ids

    votes = np.zeros((16 ** 3, k), np.int64)
    for sid in limit(read_split(root, fit_split)):
        img, mask = load(sid)
        q = (img // 16).astype(int)
        code = (q[..., 0] * 16 + q[..., 1]) * 16 + q[..., 2]
        keep = mask != IGNORE_INDEX
        np.add.at(votes, (code[keep], mask[keep].astype(int)), 1)
    colour_label = votes.argmax(1)
    confs = {n: np.zeros((k, k), np.int64)
             for n in ("colour", "superpixel", "patch")}
    for sid in limit(read_split(root, split)):
        img, mask = load(sid)
        q = (img // 16).astype(int)
        code = (q[..., 0] * 16 + q[..., 1]) * 16 + q[..., 2]
        confs["colour"] += _confusion(mask, colour_label[code], k)
        seg = slic(img, n_segments=slic_segments,
                   compactness=slic_compactness, start_label=0)
        confs["superpixel"] += _confusion(mask, _majority(seg, mask, k), k)
        h, w = mask.shape
        grid = (np.arange(h)[:, None] // PATCH_SIZE * (w // PATCH_SIZE)
                + np.arange(w)[None, :] // PATCH_SIZE)
        confs["patch"] += _confusion(mask, _majority(grid, mask, k), k)
    return {n: round(_miou(c), 4) for n, c in confs.items()}


def _majority(seg: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Each region of `seg` labelled with its majority non-void label."""
    keep = mask != IGNORE_INDEX
    n = int(seg.max()) + 1
    votes = np.zeros((n, k), np.int64)
    np.add.at(votes, (seg[keep], mask[keep].astype(int)), 1)
    return votes.argmax(1)[seg]


# ---------------------------------------------------------------------------
# Contact sheet
# ---------------------------------------------------------------------------


def contact_sheet(root: str | os.PathLike, path: str | os.PathLike, *,
                  split: str = "train", num: int = 16, cols: int = 4,
                  tile: int = 128, alpha: float = 0.45) -> None:
    """A grid of image | mask-overlay pairs, palette-quantised PNG."""
    root = Path(root)
    ids = read_split(root, split)[:num]
    pal = np.array(voc_palette(), np.uint8).reshape(256, 3)
    rows = math.ceil(len(ids) / cols)
    sheet = Image.new("RGB", (cols * 2 * tile + (cols - 1) * 4,
                              rows * tile + (rows - 1) * 4), (255, 255, 255))
    for n, sid in enumerate(ids):
        img = Image.open(root / "JPEGImages" / f"{sid}.jpg").convert("RGB")
        mask = np.asarray(Image.open(root / "SegmentationClass"
                                     / f"{sid}.png"))
        arr = np.asarray(img).astype(float)
        over = pal[mask].astype(float)
        blend = np.where((mask > 0)[..., None],
                         (1 - alpha) * arr + alpha * over, arr * 0.6)
        blend[mask == IGNORE_INDEX] = 255.0
        pair = [img, Image.fromarray(blend.astype(np.uint8))]
        r, c = divmod(n, cols)
        for j, im in enumerate(pair):
            im = im.resize((tile, tile), Image.BILINEAR)
            sheet.paste(im, (c * (2 * tile + 4) + j * tile, r * (tile + 4)))
    sheet = sheet.quantize(colors=128, method=Image.Quantize.MEDIANCUT,
                           dither=Image.Dither.NONE)
    sheet.save(path, optimize=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: generate a world, optionally a sheet and statistics."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m ssr_jax.data.synthetic",
        description="Generate the synthetic WSSS world (VOC layout).")
    ap.add_argument("--root", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-train", type=int, default=1500)
    ap.add_argument("--num-val", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--num-classes", type=int, default=0,
                    help="use the first N default classes (0 = all)")
    ap.add_argument("--sheet", default="", help="write a contact sheet PNG")
    ap.add_argument("--oracles", action="store_true",
                    help="print the colour / superpixel / patch oracles")
    args = ap.parse_args(argv)
    cfg = WorldConfig()
    if args.num_classes:
        cfg = cfg.subset(args.num_classes)
    info = generate(args.root, seed=args.seed, num_train=args.num_train,
                    num_val=args.num_val, image_size=args.image_size,
                    config=cfg)
    print(json.dumps(info, indent=1))
    if args.sheet:
        contact_sheet(args.root, args.sheet)
    if args.oracles:
        print(json.dumps(oracle_statistics(args.root), indent=1))


if __name__ == "__main__":
    main()
