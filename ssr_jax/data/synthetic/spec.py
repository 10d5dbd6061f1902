"""The world's configuration: classes (silhouette, colour family, texture,
home background), background kinds, touching pairs and `WorldConfig`."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ssr_jax.data.synthetic.shapes import SHAPES

PATCH_SIZE = 16
TEXTURES = ("solid", "stripes", "dots", "checker", "grain")

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


def caption_problems(prob: Any, scope: Any) -> list[str]:
    """What is wrong with `WorldConfig.caption_background_prob` / `_scope`
    (empty when both are good); the config check (`pretrain.validate`)
    reports them as `synthetic.*` fields."""
    e = []
    if (isinstance(prob, bool) or not isinstance(prob, (int, float))
            or not 0.0 <= prob <= 1.0):
        e.append(f"caption_background_prob={prob!r}: must be in [0, 1] "
                 "(1 = every caption names the background)")
    if scope not in ("all", "home"):
        e.append(f"caption_background_scope={scope!r}: choose 'all' or "
                 "'home'")
    return e


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
      caption_background_prob: P(a caption names the background), drawn
        per caption. 1 (default) = every caption names it, so the tiny CLIP
        can tell a class from its home background. Below 1 the captions say
        "a boat." where the image shows a boat on water, as much real
        alt-text does, so language supervision ties a class to its
        co-occurring background (the confound CMPA targets). Left out of
        `to_dict()` (so of world.json and the world's identity) at 1.
      caption_background_scope: which captions that draw applies to:
        "all" (default) or "home", only images whose background is the home
        of a class in them ("a boat." for a boat on water, but always "a
        boat on the sand."): the language ties a class to its typical
        context while every background word stays grounded by the other
        images. Left out of `to_dict()` at "all".
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
    caption_background_prob: float = 1.0
    caption_background_scope: str = "all"

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
        problems = caption_problems(self.caption_background_prob,
                                    self.caption_background_scope)
        if problems:
            raise ValueError(problems[0])
        if self.void_width < 0 or self.captions_per_image < 1:
            raise ValueError("void_width >= 0 and captions_per_image >= 1")
        if image_size is not None and (
                image_size % PATCH_SIZE or image_size < 64):
            raise ValueError(
                f"image_size={image_size}: use a multiple of {PATCH_SIZE} "
                ">= 64 (the tiny ViTs use patch 16), e.g. 128 or 160")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # Added after worlds were shipped with encoders keyed on their
        # parameters: at its default the field is left out, so those worlds
        # (and the shipped encoders' keys) keep their identity.
        if d["caption_background_prob"] == 1.0:
            del d["caption_background_prob"]
        if d["caption_background_scope"] == "all":
            del d["caption_background_scope"]
        return d

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
        if self.caption_background_prob < 1.0:
            where = ("" if self.caption_background_scope == "all" else
                     " when it is the home of a class in the image")
            lines.append(f"A caption names the background{where} with "
                         f"probability {self.caption_background_prob:.0%}.")
        return "\n".join(lines)
