"""Rendering a scene: object poses and rasters, scene sampling (classes,
groups, background, poses), painting, the mask with its void band and the
per-image scene record. A pure function of (seed, split, index)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ssr_jax.data.synthetic.backgrounds import (
    BgInfo,
    _background,
    _jitter,
    _mix,
)
from ssr_jax.data.synthetic.layout import IGNORE_INDEX, SPLITS
from ssr_jax.data.synthetic.shapes import PART_HSV, SHAPES, Grid, Parts, _union
from ssr_jax.data.synthetic.spec import TEXTURES, PairSpec, WorldConfig

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
