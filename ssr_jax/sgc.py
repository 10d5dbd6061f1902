"""Superpixel-Guided Correction (SSR Eq. 9-11) and the CLIP-ES/WeCLIP CAA.

CAMs are refined by one propagation step over a patch affinity (SPEC §1.6):

    CAM_c^refine = (T ⊙ Mask_c) · CAM_c                      (Eq. 10-11)

where T is the transition matrix of the fused CLIP/DINO attention (Eq. 9)
and Mask_c zeroes the columns (source patches) outside class c's target
zone. The zone (`ssr_jax/sgc_mask.py`) is either SSR's superpixel clusters
(Eq. 7-8) or the CLIP-ES/WeCLIP `scoremap2bbox` boxes (the baseline), or
nothing.

`refine_cams` takes every knob as a keyword; `SGCParams` holds them as one
frozen value (built from `config.sgc` by `ssr_jax.params.method_params`)
and `refine_cams_with(cams, slot_valid, params, ...)` applies it.

Every function is a pure, jittable function of batched arrays with static
shapes: class slots are padded to a static K (`slot_valid [B, K]`).
Nothing loops over images or classes in Python.

Shapes: cams `[B, K, h, w]` on the patch grid (N = h·w), image uint8
`[B, H, W, 3]` with H = s·h, W = s·w, superpixels int32 `[B, H, W]`,
valid bool `[B, H, W]` (False on crop padding).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ssr_jax.sgc_mask import box_mask, superpixel_target_mask

Array = jax.Array
_HP = jax.lax.Precision.HIGHEST
MASK_KINDS = ("superpixel", "box", "none")


# --- affinity and propagation (Eq. 9-11) --------------------------------------


def drop_cls(attn: Array) -> Array:
    """[..., 1 + N, 1 + N] token attention -> [..., N, N] patch-to-patch."""
    return attn[..., 1:, 1:]


def clip_affinity(attn: Array | Sequence[Array], last_n: int = 8) -> Array:
    """CLIP affinity: mean attention of the last n blocks, CLS dropped.

    Args:
      attn: [L, B, T, T] or a sequence of L arrays [B, T, T] (head-averaged
        attention of every block, CLS first, T = 1 + N).
      last_n: number of final blocks averaged (WeCLIP/CLIP-ES: 8).

    Returns:
      [B, N, N] float32.
    """
    num = len(attn) if isinstance(attn, (list, tuple)) else attn.shape[0]
    if not 1 <= last_n <= num:
        raise ValueError(f"last_n={last_n}: need 1 <= last_n <= {num} "
                         "(the number of attention maps given)")
    if isinstance(attn, (list, tuple)):
        stack = jnp.stack([a.astype(jnp.float32) for a in attn[-last_n:]])
    else:
        stack = attn[-last_n:].astype(jnp.float32)
    return drop_cls(stack.mean(axis=0))


def rfm_similarity(feat: Array) -> Array:
    """RFM's similarity S = sigmoid(F·Fᵀ) of the decoder feature F.

    Args:
      feat: [B, N, E] decoder feature F (detach it first in training).

    Returns:
      [B, N, N] float32.
    """
    f = feat.astype(jnp.float32)
    return jax.nn.sigmoid(jnp.einsum("bne,bme->bnm", f, f,
                                     precision=jax.lax.Precision.HIGHEST))


def rfm_affinity(attn: Array | Sequence[Array], feat: Array,
                 last_n: int = 6) -> Array:
    """WeCLIP's refinement module (RFM): decoder-gated CLIP affinity.

    Off by default in SSR (`loss.rfm`), kept for comparison. With
    S = sigmoid(F·Fᵀ) from the (detached) decoder feature (`rfm_similarity`),
    the gating of `rfm_gate` (reference/weclip_code.md §1.4).

    Args:
      attn: [L, B, T, T] or L arrays [B, T, T], CLS first.
      feat: [B, N, E] decoder feature F.
      last_n: blocks considered (WeCLIP: VOC 6, COCO 10).

    Returns:
      [B, N, N] float32.
    """
    return rfm_gate(attn, rfm_similarity(feat), last_n)


def rfm_gate(attn: Array | Sequence[Array], sim: Array,
             last_n: int = 6) -> Array:
    """RFM's gating of the CLIP attention by a given similarity S.

    Each of the last n blocks' attention A_l (CLS dropped) gets
    d_l = Σ_ij (S − A_l) (signed); the blocks with d_l ≤ mean_l(d_l) are
    averaged and the result is multiplied by S (reference/weclip_code.md
    §1.4).

    Args:
      attn: [L, B, T, T] or L arrays [B, T, T], CLS first.
      sim: [B, N, N] similarity S (e.g. `rfm_similarity`), N = T − 1.
      last_n: blocks considered (WeCLIP: VOC 6, COCO 10).

    Returns:
      [B, N, N] float32.
    """
    num = len(attn) if isinstance(attn, (list, tuple)) else attn.shape[0]
    if not 1 <= last_n <= num:
        raise ValueError(f"last_n={last_n}: need 1 <= last_n <= {num}")
    if isinstance(attn, (list, tuple)):
        stack = jnp.stack([a.astype(jnp.float32) for a in attn[-last_n:]])
    else:
        stack = attn[-last_n:].astype(jnp.float32)
    a = drop_cls(stack)  # [L, B, N, N]
    sim = sim.astype(jnp.float32)
    if sim.shape != a.shape[1:]:
        raise ValueError(f"sim has shape {sim.shape}; the attention without "
                         f"CLS needs {a.shape[1:]}")
    d = (sim[None] - a).sum(axis=(-2, -1))  # [L, B]
    keep = (d <= d.mean(axis=0, keepdims=True)).astype(jnp.float32)
    k = keep[:, :, None, None]
    mean = (k * a).sum(0) / (k.sum(0) + 1e-5)
    return mean * sim


def fuse_affinity(clip_aff: Array | None, dino_aff: Array | None,
                  clip_weight: float = 0.4,
                  dino_weight: float = 0.6) -> Array:
    """A = w_clip·A_CLIP + w_dino·A_DINO over the affinities given (Eq. 9).

    Args:
      clip_aff: [B, N, N] or None.
      dino_aff: [B, N, N] or None (patch-to-patch; see `drop_cls`).
      clip_weight, dino_weight: fusion weights (paper 0.4 : 0.6).

    Returns:
      [B, N, N] float32.
    """
    parts = [wt * a.astype(jnp.float32)
             for a, wt in ((clip_aff, clip_weight), (dino_aff, dino_weight))
             if a is not None]
    if not parts:
        raise ValueError("fuse_affinity needs a CLIP or a DINO affinity")
    if len(parts) == 2 and clip_aff.shape != dino_aff.shape:
        raise ValueError(f"CLIP affinity {clip_aff.shape} and DINO affinity "
                         f"{dino_aff.shape} differ; both encoders must see "
                         "the same token grid")
    return functools.reduce(jnp.add, parts)


def _normalise(x: Array, axis: int) -> Array:
    s = x.sum(axis=axis, keepdims=True)
    return jnp.where(s > 0, x / jnp.where(s > 0, s, 1.0), 0.0)


TRANSITION_POWERS = (1, 2)


def transition_matrix(affinity: Array, sinkhorn_iters: int = 3,
                      power: int = 2) -> Array:
    """Transition matrix T of an affinity, WeCLIP `compute_trans_mat`.

    `sinkhorn_iters` rounds of (column-normalise, then row-normalise), then
    symmetrise S = (T + Tᵀ)/2 and raise it to `power`: 2 is WeCLIP's
    S·S (one propagation step with S²), 1 is S itself (the paper's Eq. 11
    read literally, CAM_refine = A*·CAM with one product). Zero
    columns/rows stay 0 instead of giving NaN.

    Args:
      affinity: [B, N, N] non-negative.
      sinkhorn_iters: static number of rounds (WeCLIP: 3).
      power: static 1 or 2 (`TRANSITION_POWERS`; WeCLIP: 2).

    Returns:
      [B, N, N] float32.
    """
    if power not in TRANSITION_POWERS:
        raise ValueError(f"transition power {power!r}: choose one of "
                         f"{TRANSITION_POWERS} (2 = WeCLIP's T·T, 1 = one "
                         "product, Eq. 11 read literally)")

    def body(_, t):
        return _normalise(_normalise(t, axis=-2), axis=-1)

    t = jax.lax.fori_loop(0, sinkhorn_iters, body,
                          affinity.astype(jnp.float32))
    t = 0.5 * (t + jnp.swapaxes(t, -1, -2))
    if power == 1:
        return t
    return jnp.einsum("bij,bjk->bik", t, t, precision=_HP)


def propagate(trans: Array, cams: Array, mask: Array | None = None) -> Array:
    """CAM_refine = (T ⊙ Mask)·CAM, all classes at once (Eq. 10-11).

    The mask zeroes columns j (source patches) outside the target zone:
    r_i = Σ_j T_ij · m_j · cam_j.

    Args:
      trans: [B, N, N] transition matrix.
      cams: [B, K, N].
      mask: [B, K, N] in {0, 1}, or None for no mask.

    Returns:
      [B, K, N] float32.
    """
    src = cams.astype(jnp.float32)
    if mask is not None:
        src = src * mask
    return jnp.einsum("bij,bkj->bki", trans.astype(jnp.float32), src,
                      precision=_HP)


def refine_cams(cams: Array, slot_valid: Array, *,
                clip_attn: Array | Sequence[Array] | None = None,
                dino_attn: Array | None = None,
                dino_aff: Array | None = None,
                clip_aff: Array | None = None,
                image: Array | None = None,
                superpixels: Array | None = None,
                valid: Array | None = None,
                use_clip_attn: bool = True, use_dino_attn: bool = True,
                mask_kind: str = "superpixel", clip_layers: int = 8,
                clip_weight: float = 0.4, dino_weight: float = 0.6,
                sinkhorn_iters: int = 3, transition_power: int = 2,
                box_threshold: float = 0.4,
                colour_k: int = 8, colour_iters: int = 10,
                colour_space: str = "lab", theta_h: float = 0.4,
                theta_r: float = 0.5, patch_fraction: float = 0.5,
                num_segments: int = 256, impl: str = "segment",
                kmeans_init: str = "lightness_ranks",
                kmeans_seed: int = 0,
                position_weight: float = 0.0,
                ratio_denominator: str = "cluster",
                zone_unit: str = "cluster",
                intersect_box: bool = False) -> Array:
    """CAM refinement for each step of SSR's Table 3 (Eq. 7-11).

    - no attention: the input CAMs (Table 3, row 1);
    - CLIP attention: T of the last `clip_layers` blocks (row 2);
    - CLIP + DINO: T of w_clip·A_CLIP + w_dino·A_DINO (row 3);
    - `mask_kind`: "superpixel" (SGC, row 4), "box" (CLIP-ES/WeCLIP CAA)
      or "none".
    The transition matrix is computed once per image and shared by every
    class. The output is not re-normalised (pseudo labels min-max it).

    Args:
      cams: [B, K, h, w] CAMs in [0, 1].
      slot_valid: [B, K] bool; padded slots give 0.
      clip_attn: [L, B, 1+N, 1+N] or L arrays [B, 1+N, 1+N] (CLIP blocks'
        head-averaged attention, CLS first); needed if `use_clip_attn`.
      dino_attn: [B, 1+N, 1+N] DINO last-block head-averaged attention;
        needed if `use_dino_attn` and no `dino_aff`.
      dino_aff: optional precomputed [B, N, N] patch-to-patch affinity of
        the affinity encoder on the CAM grid (`encoders.patch_affinity`),
        used instead of `drop_cls(dino_attn)` (any encoder, any grid).
      clip_aff: optional precomputed [B, N, N] CLIP affinity used instead
        of the mean of `clip_attn` (e.g. WeCLIP's RFM, `rfm_affinity`).
      image, superpixels, valid: [B, H, W, 3] uint8, [B, H, W] int32,
        [B, H, W] bool; needed for the superpixel mask.
      use_clip_attn, use_dino_attn, mask_kind: the Table 3 switches.
      clip_layers, clip_weight, dino_weight, sinkhorn_iters,
        transition_power: the affinity and its transition matrix.
      box_threshold: `box_mask` threshold.
      colour_k, colour_iters, colour_space, theta_h, theta_r,
        patch_fraction, num_segments, kmeans_init, kmeans_seed,
        position_weight, ratio_denominator, zone_unit, intersect_box:
        `superpixel_target_mask` (the box of `intersect_box` uses
        `box_threshold`).
      impl: segment_ops implementation.

    Returns:
      [B, K, h, w] float32.
    """
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind={mask_kind!r}: choose one of "
                         f"{MASK_KINDS}")
    b, nk, h, w = cams.shape
    keep = slot_valid[:, :, None, None]
    cams = cams.astype(jnp.float32)
    if not (use_clip_attn or use_dino_attn):
        return jnp.where(keep, cams, 0.0)

    given_clip_aff, clip_aff = clip_aff, None
    given_dino_aff, dino_aff = dino_aff, None
    if use_clip_attn:
        if given_clip_aff is not None:
            clip_aff = given_clip_aff
        elif clip_attn is None:
            raise ValueError("use_clip_attn=True needs clip_attn")
        else:
            clip_aff = clip_affinity(clip_attn, clip_layers)
    if use_dino_attn:
        if given_dino_aff is not None:
            dino_aff = given_dino_aff
        elif dino_attn is None:
            raise ValueError("use_dino_attn=True needs dino_attn or dino_aff")
        else:
            dino_aff = drop_cls(dino_attn)
    aff = fuse_affinity(clip_aff, dino_aff, clip_weight, dino_weight)
    if aff.shape != (b, h * w, h * w):
        raise ValueError(f"affinity {aff.shape} does not match the CAM grid "
                         f"{h}x{w} (expected {(b, h * w, h * w)})")
    trans = transition_matrix(aff, sinkhorn_iters, transition_power)

    if mask_kind == "superpixel":
        if image is None or superpixels is None or valid is None:
            raise ValueError("mask_kind='superpixel' needs image, "
                             "superpixels and valid")
        mask = superpixel_target_mask(
            cams, image, superpixels, valid, slot_valid, colour_k=colour_k,
            colour_iters=colour_iters, colour_space=colour_space,
            theta_h=theta_h, theta_r=theta_r, patch_fraction=patch_fraction,
            num_segments=num_segments, impl=impl, kmeans_init=kmeans_init,
            kmeans_seed=kmeans_seed, position_weight=position_weight,
            ratio_denominator=ratio_denominator, zone_unit=zone_unit,
            intersect_box=intersect_box,
            box_threshold=box_threshold).reshape(b, nk, h * w)
    elif mask_kind == "box":
        mask = box_mask(cams, box_threshold, impl).reshape(b, nk, h * w)
    else:
        mask = None
    out = propagate(trans, cams.reshape(b, nk, h * w), mask)
    return jnp.where(keep, out.reshape(b, nk, h, w), 0.0)


@dataclasses.dataclass(frozen=True)
class SGCParams:
    """Every `refine_cams` knob as one frozen value (defaults as
    `refine_cams`'s). `ssr_jax.params.method_params` builds it from
    `config.sgc` (`mask` → `mask_kind`, `max_segments` → `num_segments`,
    `segment_impl` → `impl`)."""

    use_clip_attn: bool = True
    use_dino_attn: bool = True
    mask_kind: str = "superpixel"
    clip_layers: int = 8
    clip_weight: float = 0.4
    dino_weight: float = 0.6
    sinkhorn_iters: int = 3
    transition_power: int = 2
    box_threshold: float = 0.4
    colour_k: int = 8
    colour_iters: int = 10
    colour_space: str = "lab"
    theta_h: float = 0.4
    theta_r: float = 0.5
    patch_fraction: float = 0.5
    num_segments: int = 256
    impl: str = "segment"
    kmeans_init: str = "lightness_ranks"
    kmeans_seed: int = 0
    position_weight: float = 0.0
    ratio_denominator: str = "cluster"
    zone_unit: str = "cluster"
    intersect_box: bool = False

    def knobs(self) -> dict:
        """The fields as `refine_cams` keywords."""
        return {f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)}


def refine_cams_with(cams: Array, slot_valid: Array, params: SGCParams,
                     **kwargs) -> Array:
    """`refine_cams` with its knobs taken from `params`.

    Args:
      cams, slot_valid: as `refine_cams`.
      params: the knobs (`SGCParams`).
      **kwargs: the arrays (clip_attn, dino_attn or dino_aff, image,
        superpixels, valid, optionally clip_aff) and any `refine_cams`
        knob to take instead of `params`' (e.g. `use_dino_attn` and
        `mask_kind` for each Table 3 step).

    Returns:
      [B, K, h, w] float32.
    """
    knobs = params.knobs()
    knobs.update(kwargs)
    return refine_cams(cams, slot_valid, **knobs)
