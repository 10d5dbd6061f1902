"""Online pseudo labels: CAMs -> background -> PAR -> label map (SPEC §1.7).

`par` is WeCLIP's pixel-adaptive refinement (WeCLIP_model/PAR.py): each of
`iters` steps replaces every mask value by an affinity-weighted sum over 8
neighbours at each dilation (48 for the default six dilations), with
replicate padding. The affinity is a softmax over the neighbours of the
colour similarity plus `pos_weight` times a softmax of the (constant)
position term; it is computed once from the normalised image.

`pseudo_labels` follows WeCLIP's model forward: min-max each class CAM,
upsample bilinearly to the image, background = (1 - max_c CAM_c)^bg_power,
PAR on [background; classes], argmax, channel -> label id. Class slots are
padded to a static K (cls_ids -1); padded channels never win. Unlike
WeCLIP, crop padding becomes `ignore_index`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssr_jax.models.resize import resize

Array = jax.Array

# WeCLIP's 3x3 dilated kernel taps, in its order: row-major without the
# centre. Taps 0, 2, 5, 7 are the diagonals.
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0),
         (1, 1))


def _neighbours(x: Array, dilations: Sequence[int]) -> list[Array]:
    """The 8·len(dilations) replicate-padded shifts of x [..., H, W].

    Replicate padding clamps indices, so one pad by the largest dilation
    serves every dilation (six separate edge pads compile ~10x slower on
    XLA:CPU).
    """
    h, w = x.shape[-2:]
    big = max(dilations)
    p = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(big, big), (big, big)],
                mode="edge")
    return [p[..., big + dy * d:big + dy * d + h, big + dx * d:big + dx * d + w]
            for d in dilations for dy, dx in _RING]


def _position_softmax(dilations: Sequence[int],
                      temperature: float) -> Array:
    """[8·len(dilations)] softmax of -(dist / std(dist) / temperature)²."""
    diag = np.float32(np.sqrt(2.0))
    dist = jnp.asarray(np.array(
        [d * (diag if dy and dx else np.float32(1.0))
         for d in dilations for dy, dx in _RING], np.float32))
    # torch.std is unbiased; the centre pixel is not among the distances.
    std = jnp.std(dist, ddof=1)
    return jax.nn.softmax(-(dist / (std + 1e-8) / temperature) ** 2)


def par_affinity(image: Array, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
                 pos_weight: float = 0.01,
                 temperature: float = 0.3) -> Array:
    """PAR neighbour weights of an image (WeCLIP PAR.forward before its loop).

    colour: -(|I_n - I_0| / (std_n(I_n) + 1e-8) / temperature)², with the
    unbiased std over the neighbours (centre excluded) per channel, averaged
    over channels, softmax over neighbours; plus pos_weight × the position
    softmax. The weights sum to 1 + pos_weight per pixel.

    Args:
      image: [B, H, W, C] float (normalised image at the mask size).
      dilations: static dilations (WeCLIP: 1, 2, 4, 8, 12, 24).
      pos_weight: weight of the position affinity (WeCLIP 0.01).
      temperature: WeCLIP's w1 = 0.3.

    Returns:
      [B, 8·len(dilations), H, W] float32.
    """
    img = jnp.moveaxis(image.astype(jnp.float32), -1, 1)  # [B, C, H, W]
    nbs = _neighbours(img, dilations)
    count = len(nbs)
    mean = functools.reduce(jnp.add, nbs) / count
    var = functools.reduce(jnp.add, [(v - mean) ** 2 for v in nbs])
    std = jnp.sqrt(var / (count - 1))
    logits = jnp.stack(
        [(-(jnp.abs(v - img) / (std + 1e-8) / temperature) ** 2).mean(axis=1)
         for v in nbs], axis=1)  # [B, n, H, W]
    pos = _position_softmax(dilations, temperature)
    return jax.nn.softmax(logits, axis=1) + pos_weight * pos[:, None, None]


def par(image_norm: Array, masks: Array, *, iters: int = 20,
        dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
        pos_weight: float = 0.01, temperature: float = 0.3) -> Array:
    """Pixel-adaptive refinement of per-class maps (WeCLIP PAR).

    The image is first resized bilinearly with align_corners=True to the
    mask size (a no-op when they match, as in training). Then `iters` times:
    mask ← Σ_n aff_n · shift_n(mask).

    Args:
      image_norm: [B, Hi, Wi, 3] float normalised image.
      masks: [B, C, H, W] float maps (e.g. background + class CAMs).
      iters: static number of propagation steps (WeCLIP 20).
      dilations: static neighbour dilations.
      pos_weight, temperature: see `par_affinity`.

    Returns:
      [B, C, H, W] float32.
    """
    if len(dilations) < 1 or min(dilations) < 1:
        raise ValueError(f"dilations={tuple(dilations)}: need at least one "
                         "positive dilation")
    h, w = masks.shape[-2:]
    img = resize(image_norm.astype(jnp.float32), (h, w), align_corners=True)
    aff = par_affinity(img, dilations, pos_weight, temperature)

    def step(_, m):
        nbs = _neighbours(m, dilations)
        return functools.reduce(
            jnp.add, [aff[:, None, i] * v for i, v in enumerate(nbs)])

    return jax.lax.fori_loop(0, iters, step, masks.astype(jnp.float32))


def _scores(cams: Array, cls_ids: Array, out_hw: tuple[int, int],
            bg_power: float) -> tuple[Array, Array, Array]:
    """[bg; classes] scores at out_hw, channel validity and label ids."""
    slot = cls_ids >= 0  # [B, K]
    x = cams.astype(jnp.float32)
    # pytorch_grad_cam scale_cam_image: (x - min) / (1e-7 + max(x - min)).
    x = x - x.min(axis=(2, 3), keepdims=True)
    x = x / (1e-7 + x.max(axis=(2, 3), keepdims=True))
    x = resize(x, out_hw, axes=(-2, -1))
    x = jnp.where(slot[:, :, None, None], x, 0.0)
    bg = jnp.maximum(1.0 - x.max(axis=1, keepdims=True), 0.0) ** bg_power
    scores = jnp.concatenate([bg, x], axis=1)
    chan_valid = jnp.concatenate([jnp.ones_like(slot[:, :1]), slot], axis=1)
    ids = jnp.concatenate([jnp.zeros_like(cls_ids[:, :1]),
                           jnp.where(slot, cls_ids + 1, 0)], axis=1)
    return scores, chan_valid, ids.astype(jnp.int32)


def _argmax_labels(scores: Array, chan_valid: Array, ids: Array) -> Array:
    b, _, h, w = scores.shape
    s = jnp.where(chan_valid[:, :, None, None], scores, -jnp.inf)
    best = jnp.argmax(s, axis=1).reshape(b, h * w)
    return jnp.take_along_axis(ids, best, axis=1).reshape(b, h, w)


def cams_to_labels(cams: Array, cls_ids: Array, out_hw: tuple[int, int],
                   bg_power: float = 1.0) -> tuple[Array, Array]:
    """CAM seeds without PAR (for scoring CAMs, SSR Tables 2-3).

    Args:
      cams: [B, K, h, w] CAMs (any range; min-max normalised per class).
      cls_ids: [B, K] int foreground class index (0-based), -1 = padding.
      out_hw: static output (H, W).
      bg_power: background = (1 - max_c CAM_c)^bg_power.

    Returns:
      scores [B, K+1, H, W] float32 (channel 0 background, padded channels
      0) and labels [B, H, W] int32 (0 background, class c -> c + 1).
    """
    scores, chan_valid, ids = _scores(cams, cls_ids, out_hw, bg_power)
    return scores, _argmax_labels(scores, chan_valid, ids)


@dataclasses.dataclass(frozen=True)
class PARParams:
    """The `pseudo_labels` knobs as one frozen value (defaults as WeCLIP's;
    `ssr_jax.params.method_params` builds it from `config.par`)."""

    iters: int = 20
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    pos_weight: float = 0.01
    temperature: float = 0.3
    bg_power: float = 1.0

    def knobs(self) -> dict:
        """The fields as `pseudo_labels` keywords."""
        return {f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)}


def pseudo_labels(cams: Array, cls_ids: Array, image_norm: Array,
                  valid: Array, *, iters: int = 20,
                  dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
                  pos_weight: float = 0.01, temperature: float = 0.3,
                  bg_power: float = 1.0, ignore_index: int = 255) -> Array:
    """Online pseudo labels (WeCLIP model forward + PAR, SPEC §1.7).

    The PAR knobs are `PARParams`' fields (`**params.knobs()`).

    Args:
      cams: [B, K, h, w] refined CAMs.
      cls_ids: [B, K] int foreground class index, -1 = padding.
      image_norm: [B, H, W, 3] float normalised image (PAR's colours).
      valid: [B, H, W] bool, False on crop padding.
      iters, dilations, pos_weight, temperature: `par`.
      bg_power: background exponent.
      ignore_index: label written where `valid` is False.

    Returns:
      [B, H, W] int32 label ids (0 background, class c -> c + 1).
    """
    out_hw = image_norm.shape[1:3]
    scores, chan_valid, ids = _scores(cams, cls_ids, out_hw, bg_power)
    refined = par(image_norm, scores, iters=iters, dilations=dilations,
                  pos_weight=pos_weight, temperature=temperature)
    labels = _argmax_labels(refined, chan_valid, ids)
    return jnp.where(valid, labels, ignore_index).astype(jnp.int32)
