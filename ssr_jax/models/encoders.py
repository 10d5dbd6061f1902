"""The affinity-encoder seam: which self-supervised ViT gives SGC its
affinity, how it is loaded, and how its attention lands on CLIP's grid.

SPEC.md §6 fuses CLIP's attention with a frozen DINO's last-block attention
(A = w_clip·A_CLIP + w_dino·A_DINO, both [B, N, N] on CLIP's patch grid).
Two encoders can fill the DINO slot:

  kind     model          tokens                     patch  snapshot
  "dino"   vit.ViT        [CLS, patches]             16     dino-vits16
  "dinov2" dinov2.Dinov2  [CLS, registers, patches]  14     dinov2-*

Each declares its `TokenLayout` (`model.layout`); `load_affinity_encoder`
is the one place an affinity encoder is loaded, and `patch_affinity` turns
its head-averaged last-block attention into a patch-to-patch affinity on
CLIP's grid. Both encoders take ImageNet-normalised pixels (as `ssr` feeds
DINO today). With DINO ViT/16 and CLIP/16 the grids coincide and
`patch_affinity` is exactly `sgc.drop_cls`, so kind="dino" behaves as
before; DINOv2/14 sees the same image on a finer grid (e.g. 320 px: 22x22
patches of 14 covering 308 px vs CLIP's 20x20 of 16) and is resampled.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssr_jax.models import loading
from ssr_jax.models.layout import TokenLayout
from ssr_jax.models.resize import overlap_matrix

Array = jax.Array
KINDS = ("dino", "dinov2")  # config_check.DINO_KINDS must list the same
# The input normalisation each kind was trained with (`ssr.normalise`
# kinds): both DINO and DINOv2 take ImageNet mean/std (their HF
# preprocessor configs), whatever `data.normalization` CLIP gets.
NORMALIZATION = {"dino": "imagenet", "dinov2": "imagenet"}
_LOADERS = {"dino": (loading.load_dino, loading.DINO_SPEC),
            "dinov2": (loading.load_dinov2, loading.DINOV2_SPEC)}

__all__ = ["KINDS", "NORMALIZATION", "TokenLayout", "load_affinity_encoder",
           "patch_affinity", "resampling_matrices"]


def load_affinity_encoder(kind: str, path: str | os.PathLike,
                          dtype: Any = jnp.float32) -> tuple[Any, TokenLayout]:
    """The affinity branch's frozen encoder and its token layout.

    Args:
      kind: "dino" (HF `ViTModel`, e.g. facebook/dino-vits16) or "dinov2"
        (HF `Dinov2Model` / `Dinov2WithRegistersModel`).
      path: HF snapshot directory (config.json + model.safetensors).
      dtype: float32 or bfloat16.

    Returns:
      (model, layout): `model(pixels)` → (tokens, out) with out["attn"]
      (each block's head-mean attention [B, T, T]) and out["grid"];
      `layout` = `model.layout`.

    Raises:
      ValueError: unknown kind.
      loading.WeightsError: a bad snapshot, or one of the other kind (the
        message names the kind to set).
    """
    if kind not in KINDS:
        raise ValueError(f"affinity encoder kind={kind!r}: choose one of "
                         f"{', '.join(KINDS)} (model.dino_kind)")
    load, spec = _LOADERS[kind]
    found = _model_type(path)
    for other, (_, other_spec) in _LOADERS.items():
        if other != kind and found in other_spec.model_types:
            raise loading.WeightsError(
                f"{os.fspath(path)!r} holds a {other_spec.what} (model_type="
                f"{found!r}), not a {spec.what}: set model.dino_kind="
                f"{other!r} or point model.dino_path at a {spec.what} "
                "snapshot")
    model = load(path, dtype)
    return model, model.layout


def _model_type(path: str | os.PathLike) -> str | None:
    """config.json's model_type, or None (the loader reports bad input)."""
    try:
        with open(os.path.join(path, loading.CONFIG)) as f:
            found = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def _axis(src_cells: int, src_step: float, dst_cells: int,
          dst_step: float) -> tuple[np.ndarray, np.ndarray]:
    """(query [dst, src], key [src, dst]) box-resampling matrices of one
    axis: query rows average the source cells a target cell overlaps; key
    rows split each source cell's mass over the target cells it overlaps."""
    return (overlap_matrix(src_cells, src_step, dst_cells, dst_step),
            overlap_matrix(dst_cells, dst_step, src_cells, src_step))


def resampling_matrices(layout: TokenLayout, source_grid: tuple[int, int],
                        target_grid: tuple[int, int],
                        target_patch: int | None = None,
                        ) -> tuple[np.ndarray, ...]:
    """(query_h [h, h2], query_w [w, w2], key_h [h2, h], key_w [w2, w]), the
    NumPy matrices `patch_affinity` applies (see there)."""
    (h2, w2), (h, w) = source_grid, target_grid
    if target_patch is None:
        steps = ((1.0 / h2, 1.0 / h), (1.0 / w2, 1.0 / w))
    else:
        p2 = float(layout.patch_size)
        steps = ((p2, float(target_patch)),) * 2
    qh, kh = _axis(h2, steps[0][0], h, steps[0][1])
    qw, kw = _axis(w2, steps[1][0], w, steps[1][1])
    return qh, qw, kh, kw


def patch_affinity(attn: Array, layout: TokenLayout,
                   source_grid: tuple[int, int],
                   target_grid: tuple[int, int], *,
                   target_patch: int | None = None) -> Array:
    """Patch-to-patch affinity of an encoder's attention on CLIP's grid.

    Drops the prefix tokens (CLS and registers) and, when the encoder's
    patch grid differs from CLIP's, resamples both the query and the key
    axis by **box (area-overlap) resampling**:

        A' = (Qh ⊗ Qw) · A · (Kh ⊗ Kw)

    where Q[i, j] = |i ∩ j| / |i ∩ ⋃j| (target cell i's rows are the
    overlap-weighted average of the source rows it covers) and
    K[j, i] = |j ∩ i| / |j ∩ ⋃i| (source cell j's attention mass is split
    over the target cells it overlaps). This is the exact transfer of the
    attention viewed as a piecewise-constant density over (query point,
    key point) on the image: A'[i, k] is the attention that the average
    point of CLIP patch i pays to the area of CLIP patch k. Hence:

    - equal tilings give the identity: `patch_affinity` is exactly
      `sgc.drop_cls` for DINO ViT/16 on CLIP/16 (kind="dino" unchanged);
    - mass is conserved: row sums of A' are the Q-average of the source row
      sums (the patch share of each query's attention, 1 minus what went to
      CLS/registers), so rows that summed to 1 still do; rows are *not*
      renormalised, like `drop_cls`, so that the CLIP:DINO fusion weights
      (Eq. 9) keep their meaning;
    - no spurious spread: a target cell receives mass only from source cells
      it physically overlaps, so a block-structured affinity stays
      block-structured, mixed only in the cells that straddle a boundary.

    Bilinear resizing of both axes (the other natural choice) is neither
    mass-conserving on the key axis nor local to the overlap (it mixes a
    source cell into targets up to one source cell away, blurring block
    boundaries); adaptive average pooling snaps to integer bins and does
    not handle a finer source grid.

    Geometry: with `target_patch` (CLIP's patch size) both grids are placed
    in input pixels from the top-left corner, each covering grid·patch
    pixels (a stride-p conv floors, so e.g. DINOv2/14 covers 308 of 320 px;
    a CLIP cell partly uncovered averages only its covered part, and source
    cells outside CLIP's extent lose their mass). Without it, both grids are
    taken to span the same extent ([0, 1] per axis).

    Args:
      attn: [B, T, T] head-averaged attention (e.g. `out["attn"][-1]`),
        T = layout.num_tokens(source_grid).
      layout: the encoder's `TokenLayout`.
      source_grid: the encoder's patch grid (h2, w2) (`out["grid"]`).
      target_grid: CLIP's patch grid (h, w).
      target_patch: CLIP's patch size in pixels, or None.

    Returns:
      [B, h·w, h·w] float32, row-major patches, as `sgc.fuse_affinity`
      expects for A_DINO.
    """
    (h2, w2), (h, w) = tuple(source_grid), tuple(target_grid)
    want = layout.num_tokens((h2, w2))
    if attn.ndim != 3 or attn.shape[1:] != (want, want):
        raise ValueError(
            f"attention {tuple(attn.shape)} does not fit the encoder layout "
            f"({layout.num_prefix_tokens} prefix tokens + a {h2}x{w2} patch "
            f"grid = {want} tokens): expected [B, {want}, {want}]")
    a = attn[:, layout.patch_start:, layout.patch_start:].astype(jnp.float32)
    qh, qw, kh, kw = resampling_matrices(layout, (h2, w2), (h, w),
                                         target_patch)
    if all(m.shape[0] == m.shape[1] and np.array_equal(m, np.eye(len(m)))
           for m in (qh, qw, kh, kw)):
        return a
    b = a.shape[0]
    hp = jax.lax.Precision.HIGHEST
    a = a.reshape(b, h2, w2, h2, w2)
    a = jnp.einsum("ia,jb,nabcd->nijcd", qh, qw, a, precision=hp)
    a = jnp.einsum("nijcd,ck,dl->nijkl", a, kh, kw, precision=hp)
    return a.reshape(b, h * w, h * w)
