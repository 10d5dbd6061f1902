"""Colour and noise helpers and the textured background kinds."""

from __future__ import annotations

import colorsys
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

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
