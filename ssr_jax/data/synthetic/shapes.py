"""Object silhouettes: signed distances of each class's parts in
object-local units, and the fixed colours of some parts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

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
