"""Training losses (SPEC §1.9, paper Eq. 12) as pure functions of arrays.

- `balanced_seg_ce`: WeCLIP's segmentation loss (`utils/losses.py`
  `get_seg_loss`), made safe for batches without foreground or background
  the way ExCEL does it (divide by count + 1e-6).
- `affinity_loss`: WeCLIP's affinity loss on the decoder affinity
  S = sigmoid(F^T F) (`utils/camutils.py` `cams_to_affinity_label`,
  `utils/losses.py` `get_aff_loss`, `scripts/dist_clip_voc.py`
  `get_mask_by_radius`).
- `total_loss`: L = proto_weight * L_proto + seg_weight * L_seg +
  aff_weight * L_aff (Eq. 12, plus WeCLIP's optional affinity term).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LOSS_PARTS = ("proto", "seg", "aff")


def balanced_seg_ce(
    logits: Array, labels: Array, ignore_index: int = 255
) -> Array:
    """½ CE over background pixels + ½ CE over foreground pixels (SPEC §1.9).

    Args:
      logits: [B, H, W, C], already upsampled to the label size (bilinear,
        align_corners=False, as WeCLIP does).
      labels: [B, H, W] int, 0 = background, 1..C-1 = foreground,
        `ignore_index` = ignored. Labels outside [0, C) are ignored too (no
        error is possible inside jit).
      ignore_index: label value to skip.

    Returns:
      Scalar float32. Each half is the mean CE over its kept pixels; an
      empty half contributes 0 (sum / (count + 1e-6)), with finite
      gradients.
    """
    num_classes = logits.shape[-1]
    labels = labels.astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    bg = (valid & (labels == 0)).astype(jnp.float32)
    fg = (valid & (labels != 0)).astype(jnp.float32)
    bg_loss = jnp.sum(nll * bg) / (jnp.sum(bg) + 1e-6)
    fg_loss = jnp.sum(nll * fg) / (jnp.sum(fg) + 1e-6)
    return 0.5 * (bg_loss + fg_loss)


@functools.lru_cache(maxsize=32)
def radius_mask(h: int, w: int, radius: int) -> np.ndarray:
    """bool [N, N]: patches i, j within Chebyshev distance `radius`.

    WeCLIP `get_mask_by_radius`: the (2r+1)x(2r+1) window, clipped at the
    grid border.
    """
    ys, xs = np.divmod(np.arange(h * w), w)
    dy = np.abs(ys[:, None] - ys[None, :])
    dx = np.abs(xs[:, None] - xs[None, :])
    return np.maximum(dy, dx) <= radius


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch "nearest" source rows: floor(dst * in / out)."""
    src = np.floor(np.arange(out_size) * in_size / out_size).astype(int)
    return np.minimum(src, in_size - 1)


def affinity_labels(
    labels: Array, grid: tuple[int, int], radius: int = 8,
    ignore_index: int = 255,
) -> tuple[Array, Array]:
    """Positive and negative pair masks, each bool [B, N, N].

    labels [B, H, W] are downsampled to the patch grid by PyTorch nearest
    (`label[::16, ::16]` when H = 16 h); pairs with equal labels are
    positive, different labels negative; pairs outside the radius window or
    touching `ignore_index` are neither.
    """
    h, w = grid
    labels = labels.astype(jnp.int32)
    rows = _nearest_index(labels.shape[1], h)
    cols = _nearest_index(labels.shape[2], w)
    small = labels[:, rows][:, :, cols].reshape(labels.shape[0], h * w)
    valid = small != ignore_index
    pair = valid[:, :, None] & valid[:, None, :] & radius_mask(h, w, radius)
    same = small[:, :, None] == small[:, None, :]
    return pair & same, pair & ~same


def affinity_loss(
    aff: Array,
    labels: Array,
    grid: tuple[int, int],
    radius: int = 8,
    ignore_index: int = 255,
) -> Array:
    """WeCLIP's affinity loss ½·mean_pos(1 - S) + ½·mean_neg(S).

    Args:
      aff: [B, N, N] decoder affinities S = sigmoid(F^T F), in (0, 1).
      labels: [B, H, W] int pseudo labels.
      grid: (h, w) patch grid, h * w = N.
      radius: Chebyshev radius of the pairs that count (config
        loss.aff_radius).
      ignore_index: label value to skip.

    Returns:
      Scalar float32. Means run over all pairs of the batch, with the
      counts + 1 in the denominators, as WeCLIP.
    """
    h, w = grid
    if aff.shape[1:] != (h * w, h * w):
        raise ValueError(
            f"aff has shape {aff.shape}; expected [B, {h * w}, {h * w}] for "
            f"grid {grid}"
        )
    pos, neg = affinity_labels(labels, grid, radius, ignore_index)
    pos = pos.astype(jnp.float32)
    neg = neg.astype(jnp.float32)
    aff = aff.astype(jnp.float32)
    pos_loss = jnp.sum(pos * (1.0 - aff)) / (jnp.sum(pos) + 1.0)
    neg_loss = jnp.sum(neg * aff) / (jnp.sum(neg) + 1.0)
    return 0.5 * pos_loss + 0.5 * neg_loss


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The weights of Eq. 12 (`ssr_jax.params.method_params` builds them
    from `config.loss`): gamma = seg_weight; aff_weight is WeCLIP's
    affinity term (0 = off, SSR's setting)."""

    proto_weight: float = 1.0
    seg_weight: float = 0.1
    aff_weight: float = 0.0


def total_loss(parts: Mapping[str, Array], weights: LossWeights) -> Array:
    """L = proto_weight·L_proto + seg_weight·L_seg + aff_weight·L_aff.

    Eq. 12 of the paper (gamma = seg_weight) plus WeCLIP's affinity term.

    Args:
      parts: scalar losses keyed "proto", "seg", "aff"; a term whose weight
        is 0 may be absent and is skipped (its NaN cannot leak in).
      weights: the `LossWeights`.
    """
    if not isinstance(weights, LossWeights):
        raise TypeError(
            f"total_loss takes losses.LossWeights, got "
            f"{type(weights).__name__}: build it with "
            "ssr_jax.params.method_params(config).loss")
    unknown = set(parts) - set(LOSS_PARTS)
    if unknown:
        raise KeyError(
            f"unknown loss parts {sorted(unknown)}; expected a subset of "
            f"{LOSS_PARTS}"
        )
    total = jnp.zeros((), jnp.float32)
    for name in LOSS_PARTS:
        weight = getattr(weights, f"{name}_weight")
        if name in parts and weight != 0:
            total = total + weight * parts[name]
        elif weight != 0:
            raise KeyError(
                f"loss part {name!r} is missing but {name}_weight = {weight}"
            )
    return total
