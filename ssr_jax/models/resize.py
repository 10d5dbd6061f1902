"""Separable resizing with PyTorch `F.interpolate` semantics.

`jax.image.resize` differs from PyTorch in ways that matter for parity: its
cubic kernel uses a = -0.5 (PyTorch a = -0.75), it antialiases when
downsampling, and it has no align_corners mode. The interpolation here is
two small matrices built in NumPy at trace time (shapes are static), applied
with einsum, so it is exact, jit-friendly and differentiable:

- bilinear, align_corners False/True (CLIP positional embeddings, CAM and
  logit upsampling as cv2/F.interpolate do; PAR's image resize uses True);
- bicubic (a = -0.75, border-clamped, align_corners=False), as Hugging Face
  ViT/DINO interpolate positional embeddings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("bilinear", "bicubic", "nearest")


def _source_coords(in_size: int, out_size: int, align_corners: bool):
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        if out_size == 1:
            return np.zeros(1)
        return dst * (in_size - 1) / (out_size - 1)
    return (dst + 0.5) * (in_size / out_size) - 0.5


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int, method: str = "bilinear",
                  align_corners: bool = False) -> np.ndarray:
    """[out_size, in_size] float32 matrix M with y = M @ x along one axis."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {METHODS}")
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if method == "nearest":
        # PyTorch "nearest": src = floor(dst * in / out).
        src = np.minimum(np.floor(rows * in_size / out_size).astype(int),
                         in_size - 1)
        m[rows, src] = 1.0
        return m.astype(np.float32)
    src = _source_coords(in_size, out_size, align_corners)
    if method == "bilinear":
        if not align_corners:
            src = np.maximum(src, 0.0)  # PyTorch clamps negative coords
        lo = np.floor(src).astype(int)
        frac = src - lo
        lo = np.clip(lo, 0, in_size - 1)
        hi = np.clip(lo + 1, 0, in_size - 1)
        np.add.at(m, (rows, lo), 1.0 - frac)
        np.add.at(m, (rows, hi), frac)
    else:
        base = np.floor(src).astype(int)
        t = src - base
        for k in range(-1, 3):
            idx = np.clip(base + k, 0, in_size - 1)
            np.add.at(m, (rows, idx), _cubic(k - t))
    return m.astype(np.float32)


def resize(x: jax.Array, out_hw: tuple[int, int], method: str = "bilinear",
           align_corners: bool = False, axes: tuple[int, int] = (-3, -2),
           ) -> jax.Array:
    """Resizes two spatial axes of `x` (default NHWC layout: axes -3, -2).

    Args:
      x: array with spatial axes `axes` (e.g. [B, H, W, C] or [B, K, H, W]
        with axes=(-2, -1)).
      out_hw: static output (height, width).
      method: "bilinear" | "bicubic" | "nearest" (PyTorch semantics).
      align_corners: as in `torch.nn.functional.interpolate`.

    Returns:
      The resized array, same dtype as `x`.
    """
    ah, aw = (a % x.ndim for a in axes)
    h, w = x.shape[ah], x.shape[aw]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if (h, w) == (oh, ow):
        return x
    mh = jnp.asarray(resize_matrix(h, oh, method, align_corners), x.dtype)
    mw = jnp.asarray(resize_matrix(w, ow, method, align_corners), x.dtype)
    hp = jax.lax.Precision.HIGHEST
    y = jnp.moveaxis(jnp.tensordot(mh, x, axes=[[1], [ah]], precision=hp),
                     0, ah)
    y = jnp.moveaxis(jnp.tensordot(mw, y, axes=[[1], [aw]], precision=hp),
                     0, aw)
    return y
