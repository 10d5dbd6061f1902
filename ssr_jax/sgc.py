"""Superpixel-Guided Correction (SSR Eq. 7-11) and the CLIP-ES/WeCLIP CAA.

CAMs are refined by one propagation step over a patch affinity (SPEC §1.6):

    CAM_c^refine = (T ⊙ Mask_c) · CAM_c                      (Eq. 10-11)

where T is the transition matrix of the fused CLIP/DINO attention (Eq. 9)
and Mask_c zeroes the columns (source patches) outside class c's target
zone. The zone is either SSR's superpixel clusters (Eq. 7-8) or the
CLIP-ES/WeCLIP `scoremap2bbox` boxes (the baseline), or nothing.

Every function is a pure, jittable function of batched arrays with static
shapes: class slots are padded to a static K (`slot_valid [B, K]`),
superpixel ids to a static S (-1 = padding), and superpixel reductions go
through `ssr_jax.segment_ops` with its `impl` switch. Nothing loops over
images or classes in Python.

Shapes: cams `[B, K, h, w]` on the patch grid (N = h·w), image uint8
`[B, H, W, 3]` with H = s·h, W = s·w, superpixels int32 `[B, H, W]`,
valid bool `[B, H, W]` (False on crop padding).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssr_jax import segment_ops
from ssr_jax.models.resize import resize

Array = jax.Array
_HP = jax.lax.Precision.HIGHEST
COLOUR_SPACES = ("lab", "rgb")
MASK_KINDS = ("superpixel", "box", "none")
KMEANS_INITS = ("lightness_ranks", "kmeans++")

# skimage.color.rgb2lab constants: sRGB primaries to XYZ and the D65 white
# point for the 2-degree observer.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_D65 = np.array([0.95047, 1.0, 1.08883])


# --- colours and superpixel clusters (Eq. 8) ---------------------------------


def rgb_to_lab(rgb: Array) -> Array:
    """sRGB in [0, 255] (uint8 or float) -> CIELAB, as skimage `rgb2lab`.

    Args:
      rgb: [..., 3] sRGB values in [0, 255].

    Returns:
      [..., 3] float32 (L, a, b) under D65, 2-degree observer.
    """
    x = jnp.asarray(rgb).astype(jnp.float32) / 255.0
    lin = jnp.where(x > 0.04045, ((jnp.maximum(x, 0.04045) + 0.055) / 1.055)
                    ** 2.4, x / 12.92)
    m = jnp.asarray(_XYZ_FROM_RGB / _D65[:, None], jnp.float32)
    t = jnp.einsum("...c,dc->...d", lin, m, precision=_HP)
    f = jnp.where(t > 0.008856, jnp.cbrt(t), 7.787 * t + 16.0 / 116.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy),
                      200.0 * (fy - fz)], axis=-1)


def superpixel_colours(image: Array, superpixels: Array, num_segments: int,
                       colour_space: str = "lab", impl: str = "segment",
                       valid: Array | None = None) -> tuple[Array, Array]:
    """Mean colour and pixel count of every superpixel.

    Args:
      image: [B, H, W, 3] sRGB in [0, 255] (uint8 or float).
      superpixels: [B, H, W] int ids in [0, num_segments); others = padding.
      num_segments: static S.
      colour_space: "lab" (CIELAB, skimage semantics) or "rgb" (0-255).
      impl: segment_ops implementation, "segment" | "onehot".
      valid: optional [B, H, W] bool; False pixels (crop padding) are
        dropped as if their id were -1.

    Returns:
      (mean [B, S, 3] float32, count [B, S] float32); empty segments give 0.
    """
    if colour_space not in COLOUR_SPACES:
        raise ValueError(f"colour_space={colour_space!r}: choose one of "
                         f"{COLOUR_SPACES}")
    b, h, w, _ = image.shape
    if colour_space == "lab":
        colours = rgb_to_lab(image)
    else:
        colours = jnp.asarray(image).astype(jnp.float32)
    ids = superpixels if valid is None else jnp.where(valid, superpixels, -1)
    ids = ids.reshape(b, h * w)
    colours = colours.reshape(b, h * w, 3)
    mean = segment_ops.segment_reduce(colours, ids, num_segments, "mean",
                                      impl)
    count = segment_ops.segment_count(ids, num_segments, impl)
    return mean, count


def _kmeans_init(colours: Array, seg_valid: Array, k: int) -> Array:
    """Deterministic centres: evenly spaced ranks of the L-sorted points."""
    num = colours.shape[1]
    key = jnp.where(seg_valid, colours[..., 0], jnp.inf)
    order = jnp.argsort(key, axis=1, stable=True)  # ties: lower index first
    n = seg_valid.sum(axis=1).astype(jnp.int32)  # [B]
    two_i_plus_1 = 2 * jnp.arange(k, dtype=jnp.int32) + 1
    # floor((i + 0.5) * n / k) in exact integer arithmetic.
    ranks = (two_i_plus_1[None, :] * n[:, None]) // (2 * k)
    ranks = jnp.clip(ranks, 0, num - 1)
    idx = jnp.take_along_axis(order, ranks, axis=1)  # [B, k]
    return jnp.take_along_axis(colours, idx[..., None], axis=1)


def _kmeanspp_init(colours: Array, seg_valid: Array, k: int,
                   seed: int = 0, trials: int = 0) -> Array:
    """Greedy k-means++ centres over the valid points, seeded.

    The first centre is drawn uniformly over the valid points; each next
    centre is the best of `trials` candidates drawn with probability ∝ D²
    (squared distance to the nearest chosen centre), "best" meaning the
    lowest total D² after adding it (sklearn's greedy k-means++;
    trials 0 = 2 + floor(ln k), sklearn's default). Every image uses the
    same PRNG stream (`seed`), so an image's centres depend on its own
    points only, not on its position in the batch or on the batch size.
    When every valid point is already a centre (n <= chosen), D² is 0 and
    the draw falls back to uniform (centres then coincide).

    Args:
      colours: [B, S, C] float32 points.
      seg_valid: [B, S] bool.
      k: static number of centres.
      seed: PRNG seed (`sgc.kmeans_seed`).
      trials: static candidates per centre, 0 = 2 + floor(ln k).

    Returns:
      [B, k, C] float32 centres (points of `colours`).
    """
    trials = trials or 2 + int(math.log(k))
    key = jax.random.PRNGKey(seed)
    uniform = seg_valid.astype(jnp.float32)  # [B, S]
    any_valid = seg_valid.any(axis=1)

    def sq(c):  # [B, C] -> [B, S]
        return jnp.sum((colours - c[:, None, :]) ** 2, -1)

    def draw(i, weights, n):  # [B, S] -> [B, n] indices
        w = jnp.where(weights.sum(1, keepdims=True) > 0, weights, uniform)
        w = jnp.where(any_valid[:, None], w, 1.0)  # no valid point: any
        logits = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)),
                           -jnp.inf)
        keys = jax.random.split(jax.random.fold_in(key, i), n)
        # Same keys for every image: vmap over the batch, not the keys.
        return jax.vmap(lambda lg: jax.vmap(
            lambda kk: jax.random.categorical(kk, lg))(keys))(logits)

    first = draw(0, uniform, 1)[:, 0]
    c0 = jnp.take_along_axis(colours, first[:, None, None], axis=1)[:, 0]
    centres = jnp.zeros((colours.shape[0], k, colours.shape[2]),
                        jnp.float32).at[:, 0].set(c0)
    d2 = sq(c0) * uniform

    def body(i, carry):
        centres, d2 = carry
        cand = draw(i, d2, trials)  # [B, T]
        pts = jnp.take_along_axis(colours, cand[..., None], axis=1)  # [B,T,C]
        dc = jnp.sum((colours[:, None] - pts[:, :, None]) ** 2, -1)
        new_d2 = jnp.minimum(d2[:, None], dc * uniform[:, None])  # [B,T,S]
        best = jnp.argmin(new_d2.sum(-1), axis=1)  # first minimum
        pick = jnp.take_along_axis(pts, best[:, None, None], axis=1)[:, 0]
        d2 = jnp.take_along_axis(new_d2, best[:, None, None], axis=1)[:, 0]
        return centres.at[:, i].set(pick), d2

    centres, _ = jax.lax.fori_loop(1, k, body, (centres, d2))
    return centres


def colour_kmeans(colours: Array, seg_valid: Array, k: int, iters: int,
                  impl: str = "segment", init: str = "lightness_ranks",
                  seed: int = 0) -> Array:
    """Lloyd K-means over superpixel mean colours, C = K-means(SLIC(I)) (Eq. 8).

    Each non-empty superpixel is one unweighted point. Initial centres: sort
    the valid points by their first channel (L in Lab; stable, so ties keep
    the lower superpixel index first) and take the points at ranks
    floor((i + 0.5)·n / k), i = 0..k-1, n = number of valid points (when
    n < k some centres coincide) — `init="lightness_ranks"`, the default;
    or `init="kmeans++"`, seeded greedy k-means++ (`_kmeanspp_init`).
    [choice] `sgc.kmeans_init`: lightness ranks give a colour that covers
    many superpixels several centres and a small colour none, so two
    distinct colours of similar lightness (a red object and a brown
    region, green and yellow) can share one cluster; k-means++ spreads the
    centres over the colours present (docs/diagnostics.md). The default
    stays "lightness_ranks" (the embedded table was measured with it).
    Then `iters` rounds of (assign, update);
    the returned labels are the assignment to the final centres. Ties in
    assignment go to the lowest cluster index; an empty cluster keeps its
    centre.

    Args:
      colours: [B, S, C] float points.
      seg_valid: [B, S] bool, False for empty/padded superpixels.
      k: static number of clusters.
      iters: static number of Lloyd updates.
      impl: segment_ops implementation for the centroid update.
      init: "lightness_ranks" | "kmeans++" (`sgc.kmeans_init`).
      seed: PRNG seed of the kmeans++ start (`sgc.kmeans_seed`).

    Returns:
      [B, S] int32 cluster ids in [0, k), -1 where `seg_valid` is False.
    """
    if k < 1:
        raise ValueError(f"k={k}: the colour K-means needs k >= 1")
    if init not in KMEANS_INITS:
        raise ValueError(f"sgc.kmeans_init={init!r}: choose one of "
                         f"{KMEANS_INITS}")
    colours = colours.astype(jnp.float32)
    if init == "kmeans++":
        centres = _kmeanspp_init(colours, seg_valid, k, seed)
    else:
        centres = _kmeans_init(colours, seg_valid, k)

    def assign(c):
        d = jnp.sum((colours[:, :, None, :] - c[:, None, :, :]) ** 2, -1)
        return jnp.where(seg_valid, jnp.argmin(d, axis=-1), -1).astype(
            jnp.int32)

    def update(_, c):
        labels = assign(c)
        mean = segment_ops.segment_reduce(colours, labels, k, "mean", impl)
        count = segment_ops.segment_count(labels, k, impl)
        return jnp.where(count[..., None] > 0, mean, c)

    centres = jax.lax.fori_loop(0, iters, update, centres)
    return assign(centres)


def target_ratio(cams_pix: Array, pixel_cluster: Array, k: int,
                 theta_h: float, impl: str = "segment") -> Array:
    """High-confidence activation share of every colour cluster (SSR §3.1).

    r_{c,k} = Σ_{p∈C_k} CAM_c(p)·[CAM_c(p) > θ_h] / Σ_{p∈C_k} CAM_c(p),
    0 where the denominator is 0.

    Args:
      cams_pix: [B, K, H, W] CAMs on the pixel grid.
      pixel_cluster: [B, H, W] int cluster id per pixel, -1 = ignored
        (crop padding, empty superpixels).
      k: static number of colour clusters.
      theta_h: high-confidence threshold θ_h (strict).
      impl: segment_ops implementation.

    Returns:
      [B, K, k] float32 ratios in [0, 1].
    """
    b, nk, h, w = cams_pix.shape
    v = cams_pix.astype(jnp.float32).reshape(b, nk, h * w).transpose(0, 2, 1)
    high = jnp.where(v > theta_h, v, 0.0)
    sums = segment_ops.segment_reduce(
        jnp.concatenate([high, v], axis=-1), pixel_cluster.reshape(b, h * w),
        k, "sum", impl)  # [B, k, 2K]: one pass for numerator and denominator
    num, den = sums[..., :nk], sums[..., nk:]
    r = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    return r.transpose(0, 2, 1)


def _check_grid(cams: Array, pixel_shape: Sequence[int]) -> tuple[int, int]:
    h, w = cams.shape[-2:]
    ph, pw = pixel_shape
    if ph % h or pw % w:
        raise ValueError(
            f"pixel grid {ph}x{pw} is not a multiple of the CAM grid {h}x{w}; "
            "crop the image to a multiple of the patch size")
    return ph // h, pw // w


def superpixel_target_mask(cams: Array, image: Array, superpixels: Array,
                           valid: Array, slot_valid: Array, *,
                           colour_k: int = 8, colour_iters: int = 10,
                           colour_space: str = "lab", theta_h: float = 0.4,
                           theta_r: float = 0.5, patch_fraction: float = 0.5,
                           num_segments: int = 256,
                           impl: str = "segment",
                           kmeans_init: str = "lightness_ranks",
                           kmeans_seed: int = 0) -> Array:
    """SGC column mask on the patch grid (Eq. 7-8).

    Superpixel mean colours are clustered (Eq. 8); for each class, clusters
    whose high-confidence ratio r_k exceeds θ_r form the target region
    (pixels of crop padding and empty superpixels never count). A patch is
    target if at least `patch_fraction` of its valid pixels are target. A
    valid class with no target patch falls back to all ones (no mask);
    padded slots give 0.

    Args:
      cams: [B, K, h, w] CAMs in [0, 1].
      image: [B, H, W, 3] sRGB 0-255, H = s·h, W = s·w.
      superpixels: [B, H, W] int ids in [0, num_segments), -1 = padding.
      valid: [B, H, W] bool, False on crop padding.
      slot_valid: [B, K] bool.
      colour_k, colour_iters, colour_space: the colour K-means (Eq. 8).
      theta_h: high-confidence CAM threshold.
      theta_r: ratio threshold for a target cluster (strict).
      patch_fraction: target-pixel share that makes a patch target.
      num_segments: static S (padding of superpixel ids).
      impl: segment_ops implementation.
      kmeans_init, kmeans_seed: the colour K-means start (`colour_kmeans`).

    Returns:
      [B, K, h, w] float32 in {0, 1}.
    """
    b, nk, h, w = cams.shape
    big_h, big_w = superpixels.shape[1:]
    sh, sw = _check_grid(cams, (big_h, big_w))
    ids = jnp.where(valid, superpixels, -1)
    mean, count = superpixel_colours(image, ids, num_segments, colour_space,
                                     impl)
    seg_cluster = colour_kmeans(mean, count > 0, colour_k, colour_iters, impl,
                                kmeans_init, kmeans_seed)
    # +1/-1 so padded pixels and empty superpixels both map to cluster -1.
    pixel_cluster = segment_ops.gather_segments(
        seg_cluster + 1, ids.reshape(b, big_h * big_w)) - 1  # [B, P]

    cams_pix = resize(cams.astype(jnp.float32), (big_h, big_w),
                      axes=(-2, -1))
    r = target_ratio(cams_pix, pixel_cluster.reshape(b, big_h, big_w),
                     colour_k, theta_h, impl)
    target_cluster = jnp.concatenate(
        [r > theta_r, jnp.zeros((b, nk, 1), bool)], axis=-1)  # [B, K, k+1]
    lookup = jnp.where(pixel_cluster < 0, colour_k, pixel_cluster)
    pix_target = jnp.take_along_axis(
        target_cluster, jnp.broadcast_to(lookup[:, None, :],
                                         (b, nk, big_h * big_w)), axis=2)

    hits = pix_target.reshape(b, nk, h, sh, w, sw).sum((3, 5))
    nvalid = valid.reshape(b, 1, h, sh, w, sw).sum((3, 5))
    patch = (nvalid > 0) & (hits >= patch_fraction * nvalid)
    empty = ~patch.any(axis=(2, 3), keepdims=True)
    mask = jnp.where(empty, True, patch) & slot_valid[:, :, None, None]
    return mask.astype(jnp.float32)


# --- CLIP-ES / WeCLIP box mask -----------------------------------------------


@functools.lru_cache(maxsize=64)
def _box_threshold_table(threshold: float) -> np.ndarray:
    # CLIP-ES computes int(threshold * np.max(uint8 map)) in float64; a
    # table over the 256 possible maxima reproduces that truncation exactly.
    return np.array([int(float(threshold) * m) for m in range(256)],
                    np.int32)


def _connected_components(fg: Array) -> Array:
    """8-connected component labels by min-label propagation.

    Args:
      fg: [..., h, w] bool.

    Returns:
      [..., h, w] int32: the smallest flat index of the pixel's component
      on foreground, h·w on background.
    """
    h, w = fg.shape[-2:]
    n = h * w
    lead = fg.shape[:-2]
    start = jnp.where(fg, jnp.arange(n, dtype=jnp.int32).reshape(h, w), n)
    pad = [(0, 0)] * len(lead) + [(1, 1), (1, 1)]

    def step(labels):
        p = jnp.pad(labels, pad, constant_values=n)
        nb = functools.reduce(jnp.minimum, [
            p[..., dy:dy + h, dx:dx + w] for dy in range(3)
            for dx in range(3)])
        nb = jnp.where(fg, nb, n).reshape(lead + (n,))
        # Pointer jumping: a label is the index of a pixel of the same
        # component whose own label is no larger; following it halves long
        # chains (snakes) without changing the fixed point.
        jumped = jnp.take_along_axis(nb, jnp.minimum(nb, n - 1), axis=-1)
        return jnp.where(fg, jumped.reshape(lead + (h, w)), n)

    def body(carry):
        labels, _ = carry
        new = step(labels)
        return new, jnp.any(new != labels)

    labels, _ = jax.lax.while_loop(lambda c: c[1], body,
                                   (start, jnp.array(True)))
    return labels


def box_mask(cams: Array, threshold: float = 0.4,
             impl: str = "segment") -> Array:
    """CLIP-ES `scoremap2bbox` class mask on the patch grid (WeCLIP CAA).

    Reproduces clip/utils.py `scoremap2bbox(multi_contour_eval=True)` and the
    fill in clip_tool.py: u = uint8(255·cam) (truncation), foreground
    u > int(threshold·max u) (cv2 THRESH_BINARY is strict), one box per
    8-connected component (the boxes of cv2 RETR_TREE contours: hole
    contours lie inside their outer box), each filled as
    [y0:y1, x0:x1] with y1 = min(y_max + 1, h - 1), x1 = min(x_max + 1,
    w - 1), so a component touching the bottom/right border loses that row/
    column; no component gives an empty mask.

    Args:
      cams: [B, K, h, w] CAMs in [0, 1].
      threshold: static box threshold (VOC 0.4, COCO 0.7).
      impl: segment_ops implementation for the per-component extents.

    Returns:
      [B, K, h, w] float32 in {0, 1}.
    """
    b, nk, h, w = cams.shape
    n = h * w
    u = jnp.floor(jnp.clip(cams.astype(jnp.float32) * 255.0, 0.0, 255.0))
    u = u.astype(jnp.int32)
    table = jnp.asarray(_box_threshold_table(threshold))
    thr = table[u.max(axis=(2, 3))]  # [B, K]
    fg = u > thr[:, :, None, None]

    labels = _connected_components(fg).reshape(b * nk, n)
    ids = jnp.where(labels < n, labels, -1)
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                          jnp.arange(w, dtype=jnp.float32), indexing="ij")
    coords = jnp.stack([yy.ravel(), xx.ravel(), -yy.ravel(), -xx.ravel()],
                       axis=-1)  # max of -y is -min y
    ext = segment_ops.segment_reduce(
        jnp.broadcast_to(coords, (b * nk, n, 4)), ids, n, "max", impl)
    present = segment_ops.segment_count(ids, n, impl) > 0  # [BK, n]
    y0, x0 = -ext[..., 2], -ext[..., 3]
    y1 = jnp.minimum(ext[..., 0] + 1, h - 1)
    x1 = jnp.minimum(ext[..., 1] + 1, w - 1)
    ar_h = jnp.arange(h, dtype=jnp.float32)
    ar_w = jnp.arange(w, dtype=jnp.float32)
    rows = ((ar_h >= y0[..., None]) & (ar_h < y1[..., None])
            & present[..., None])  # [BK, n, h]
    cols = (ar_w >= x0[..., None]) & (ar_w < x1[..., None])  # [BK, n, w]
    cover = jnp.einsum("cnh,cnw->chw", rows.astype(jnp.float32),
                       cols.astype(jnp.float32), precision=_HP)
    return (cover > 0).astype(jnp.float32).reshape(b, nk, h, w)


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


def transition_matrix(affinity: Array, sinkhorn_iters: int = 3) -> Array:
    """Transition matrix T of an affinity, WeCLIP `compute_trans_mat`.

    `sinkhorn_iters` rounds of (column-normalise, then row-normalise), then
    symmetrise (T + Tᵀ)/2 and square once, T ← T·T (one propagation step
    with T²). Zero columns/rows stay 0 instead of giving NaN.

    Args:
      affinity: [B, N, N] non-negative.
      sinkhorn_iters: static number of rounds (WeCLIP: 3).

    Returns:
      [B, N, N] float32.
    """
    def body(_, t):
        return _normalise(_normalise(t, axis=-2), axis=-1)

    t = jax.lax.fori_loop(0, sinkhorn_iters, body,
                          affinity.astype(jnp.float32))
    t = 0.5 * (t + jnp.swapaxes(t, -1, -2))
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
                sinkhorn_iters: int = 3, box_threshold: float = 0.4,
                colour_k: int = 8, colour_iters: int = 10,
                colour_space: str = "lab", theta_h: float = 0.4,
                theta_r: float = 0.5, patch_fraction: float = 0.5,
                num_segments: int = 256, impl: str = "segment",
                kmeans_init: str = "lightness_ranks",
                kmeans_seed: int = 0) -> Array:
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
      clip_layers, clip_weight, dino_weight, sinkhorn_iters: the affinity.
      box_threshold: `box_mask` threshold.
      colour_k, colour_iters, colour_space, theta_h, theta_r,
        patch_fraction, num_segments, kmeans_init, kmeans_seed:
        `superpixel_target_mask`.
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
    trans = transition_matrix(aff, sinkhorn_iters)

    if mask_kind == "superpixel":
        if image is None or superpixels is None or valid is None:
            raise ValueError("mask_kind='superpixel' needs image, "
                             "superpixels and valid")
        mask = superpixel_target_mask(
            cams, image, superpixels, valid, slot_valid, colour_k=colour_k,
            colour_iters=colour_iters, colour_space=colour_space,
            theta_h=theta_h, theta_r=theta_r, patch_fraction=patch_fraction,
            num_segments=num_segments, impl=impl, kmeans_init=kmeans_init,
            kmeans_seed=kmeans_seed).reshape(b, nk, h * w)
    elif mask_kind == "box":
        mask = box_mask(cams, box_threshold, impl).reshape(b, nk, h * w)
    else:
        mask = None
    out = propagate(trans, cams.reshape(b, nk, h * w), mask)
    return jnp.where(keep, out.reshape(b, nk, h, w), 0.0)


def refine_cams_from_config(cams: Array, slot_valid: Array, sgc, *,
                            impl: str = "segment", **kwargs) -> Array:
    """`refine_cams` with its knobs read from `config.sgc`.

    Args:
      cams, slot_valid: as `refine_cams`.
      sgc: the `config.sgc` ConfigDict (see config_defaults.py).
      impl: segment_ops implementation.
      **kwargs: the arrays (clip_attn, dino_attn or dino_aff, image,
        superpixels, valid, optionally clip_aff) and any `refine_cams`
        knob to take instead of the config's (e.g. `use_dino_attn` and
        `mask_kind` for each Table 3 step).

    Returns:
      [B, K, h, w] float32.
    """
    knobs = dict(
        use_clip_attn=sgc.use_clip_attn, use_dino_attn=sgc.use_dino_attn,
        mask_kind=sgc.mask, clip_layers=sgc.clip_layers,
        clip_weight=sgc.clip_weight, dino_weight=sgc.dino_weight,
        sinkhorn_iters=sgc.sinkhorn_iters, box_threshold=sgc.box_threshold,
        colour_k=sgc.colour_k, colour_iters=sgc.colour_iters,
        colour_space=sgc.colour_space, theta_h=sgc.theta_h,
        theta_r=sgc.theta_r, patch_fraction=sgc.patch_fraction,
        num_segments=sgc.max_segments,
        kmeans_init=sgc.get("kmeans_init", "lightness_ranks"),
        kmeans_seed=sgc.get("kmeans_seed", 0))
    knobs.update(kwargs)
    return refine_cams(cams, slot_valid, impl=impl, **knobs)
