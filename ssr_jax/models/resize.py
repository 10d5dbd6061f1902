"""Separable resizing with PyTorch `F.interpolate` semantics.

`jax.image.resize` differs from PyTorch in ways that matter for parity: its
cubic kernel uses a = -0.5 (PyTorch a = -0.75), it antialiases when
downsampling, and it has no align_corners mode. The interpolation here is
two small matrices built in NumPy at trace time (shapes are static), applied
with einsum, so it is exact, jit-friendly and differentiable:

- bilinear, align_corners False/True (CLIP positional embeddings, CAM and
  logit upsampling as cv2/F.interpolate do; PAR's image resize uses True);
- bicubic (a = -0.75, border-clamped, align_corners=False), as Hugging Face
  ViT/DINO/DINOv2 interpolate positional embeddings;
- `antialias=True` (bilinear or bicubic, align_corners=False): PyTorch's
  separable anti-aliased kernels (`_upsample_bicubic2d_aa`, PIL's filters:
  bicubic a = -0.5, support widened by the scale when downsampling, weights
  renormalised per output, no border clamping), as HF
  `Dinov2WithRegistersEmbeddings` interpolates its positions.

`overlap_matrix` is not an interpolation but an exact box (area-overlap)
resampling between two tilings of one segment; `encoders.patch_affinity`
uses it to move patch affinities between encoder grids.
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


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


def _antialias_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    """PyTorch `_compute_weights_aa` (UpSampleKernel.cpp), align_corners=False
    and no explicit scale: scale = in/out, support = (filter radius)·max(scale,
    1), taps j in [int(c − support + .5), int(c + support + .5)) ∩ [0, in),
    weight filter((j − c + .5)/max(scale, 1)), each row normalised."""
    radius, fn = ((1.0, _triangle) if method == "bilinear"
                  else (2.0, lambda x: _cubic(x, a=-0.5)))
    scale = in_size / out_size
    support = radius * scale if scale >= 1.0 else radius
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = fn((taps - center + 0.5) * invscale)
        total = w.sum()
        if total != 0.0:
            w = w / total
        m[i, lo:hi] = w
    return m


@functools.lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int, method: str = "bilinear",
                  align_corners: bool = False, antialias: bool = False,
                  ) -> np.ndarray:
    """[out_size, in_size] float32 matrix M with y = M @ x along one axis."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {METHODS}")
    if antialias:
        if method == "nearest" or align_corners:
            raise ValueError(
                "antialias=True needs method 'bilinear' or 'bicubic' with "
                "align_corners=False (as PyTorch supports it here)")
        return _antialias_matrix(in_size, out_size, method).astype(np.float32)
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
           antialias: bool = False) -> jax.Array:
    """Resizes two spatial axes of `x` (default NHWC layout: axes -3, -2).

    Args:
      x: array with spatial axes `axes` (e.g. [B, H, W, C] or [B, K, H, W]
        with axes=(-2, -1)).
      out_hw: static output (height, width).
      method: "bilinear" | "bicubic" | "nearest" (PyTorch semantics).
      align_corners: as in `torch.nn.functional.interpolate`.
      antialias: as in `torch.nn.functional.interpolate` (bilinear and
        bicubic, align_corners=False only).

    Returns:
      The resized array, same dtype as `x`.
    """
    ah, aw = (a % x.ndim for a in axes)
    h, w = x.shape[ah], x.shape[aw]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if (h, w) == (oh, ow):
        return x
    mh = jnp.asarray(resize_matrix(h, oh, method, align_corners, antialias),
                     x.dtype)
    mw = jnp.asarray(resize_matrix(w, ow, method, align_corners, antialias),
                     x.dtype)
    hp = jax.lax.Precision.HIGHEST
    y = jnp.moveaxis(jnp.tensordot(mh, x, axes=[[1], [ah]], precision=hp),
                     0, ah)
    y = jnp.moveaxis(jnp.tensordot(mw, y, axes=[[1], [aw]], precision=hp),
                     0, aw)
    return y


@functools.lru_cache(maxsize=256)
def overlap_matrix(in_cells: int, in_step: float, out_cells: int,
                   out_step: float) -> np.ndarray:
    """Box resampling between two tilings of a segment starting at 0.

    Input cell i covers [i·in_step, (i+1)·in_step), output cell o covers
    [o·out_step, (o+1)·out_step). Returns the [out_cells, in_cells] float32
    matrix M[o, i] = |o ∩ i| / |o ∩ (all input cells)|: the average over
    output cell o of a piecewise-constant input (rows sum to 1). An output
    cell no input cell overlaps has an all-zero row. Equal tilings give the
    identity; `overlap_matrix(o, so, i, si)` row o' is the share of input
    cell o' that each output cell receives, i.e. mass conservation.
    """
    if in_cells <= 0 or out_cells <= 0 or in_step <= 0 or out_step <= 0:
        raise ValueError("overlap_matrix needs positive cell counts and steps")
    ei = np.arange(in_cells + 1, dtype=np.float64) * in_step
    eo = np.arange(out_cells + 1, dtype=np.float64) * out_step
    lo = np.maximum(eo[:-1, None], ei[None, :-1])
    hi = np.minimum(eo[1:, None], ei[None, 1:])
    m = np.maximum(hi - lo, 0.0)
    total = m.sum(axis=1, keepdims=True)
    m = np.where(total > 0, m / np.where(total > 0, total, 1.0), 0.0)
    return m.astype(np.float32)
