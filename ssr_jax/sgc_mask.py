"""SGC's target zone Mask_c (SSR Eq. 7-8) and the CLIP-ES/WeCLIP box mask.

The mask of Eq. 10-11 (`sgc.propagate`) zeroes the columns (source
patches) outside class c's target zone. Two zones, each a pure, jittable
function of batched arrays with static shapes:

- `superpixel_target_mask` (SSR, Eq. 7-8): superpixel mean colours
  (`superpixel_colours`, CIELAB as skimage `rgb2lab`) are clustered by a
  colour K-means (`colour_kmeans`, C = K-means(SLIC(I))); clusters whose
  high-confidence CAM share (`target_ratio`) exceeds θ_r form the zone.
  [choice] readings of Eq. 7 in `cluster_target_mask` (defaults = the
  reading above): the ratio's denominator (`sgc.ratio_denominator`), the
  unit that passes θ_r (`sgc.zone_unit`: clusters, superpixels, or
  clusters cut to their superpixels above θ_h) and an intersection with
  the box mask (`sgc.intersect_box`).
- `box_mask` (the baseline): CLIP-ES `scoremap2bbox` boxes of the CAM's
  8-connected components.

Class slots are padded to a static K (`slot_valid [B, K]`), superpixel ids
to a static S (-1 = padding), and superpixel reductions go through
`ssr_jax.segment_ops` with its `impl` switch.

Shapes: cams `[B, K, h, w]` on the patch grid, image uint8 `[B, H, W, 3]`
with H = s·h, W = s·w, superpixels int32 `[B, H, W]`, valid bool
`[B, H, W]` (False on crop padding).
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
KMEANS_INITS = ("lightness_ranks", "kmeans++")
# [choice] readings of Eq. 7 (issue 10; ssr_paper.md §3.1, §9.11):
# the ratio's denominator and the unit that passes or fails θ_r.
RATIO_DENOMINATORS = ("cluster", "image")
ZONE_UNITS = ("cluster", "superpixel", "cluster_seeded")


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


def superpixel_positions(superpixels: Array, num_segments: int,
                         impl: str = "segment") -> Array:
    """Mean (row / H, col / W) of every superpixel's pixels.

    Args:
      superpixels: [B, H, W] int ids in [0, num_segments); others (-1,
        crop padding) are dropped.
      num_segments: static S.
      impl: segment_ops implementation.

    Returns:
      [B, S, 2] float32 in [0, 1); empty segments give 0.
    """
    b, h, w = superpixels.shape
    rows = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    cols = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    grid = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), -1)
    pos = jnp.broadcast_to(grid.reshape(1, h * w, 2), (b, h * w, 2))
    return segment_ops.segment_reduce(pos, superpixels.reshape(b, h * w),
                                      num_segments, "mean", impl)


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
                 theta_h: float, impl: str = "segment",
                 denominator: str = "cluster") -> Array:
    """High-confidence activation share of every colour cluster (SSR §3.1).

    r_{c,k} = Σ_{p∈C_k} CAM_c(p)·[CAM_c(p) > θ_h] / D_{c,k}, 0 where the
    denominator is 0, with D_{c,k} = Σ_{p∈C_k} CAM_c(p) (`denominator=
    "cluster"`, the default reading) or the class's total activation over
    every pixel that has a unit, Σ_{p: id(p) ≥ 0} CAM_c(p) (`"image"`,
    [choice] `sgc.ratio_denominator`: the paper's "total activation" may be
    the whole image's, ssr_paper.md §9.11). The units need not be colour
    clusters: any [B, H, W] id map works (superpixels for `sgc.zone_unit=
    "superpixel"`).

    Args:
      cams_pix: [B, K, H, W] CAMs on the pixel grid.
      pixel_cluster: [B, H, W] int cluster (unit) id per pixel, -1 =
        ignored (crop padding, empty superpixels).
      k: static number of clusters (units).
      theta_h: high-confidence threshold θ_h (strict).
      impl: segment_ops implementation.
      denominator: "cluster" | "image".

    Returns:
      [B, K, k] float32 ratios in [0, 1].
    """
    if denominator not in RATIO_DENOMINATORS:
        raise ValueError(f"sgc.ratio_denominator={denominator!r}: choose one "
                         f"of {RATIO_DENOMINATORS}")
    b, nk, h, w = cams_pix.shape
    v = cams_pix.astype(jnp.float32).reshape(b, nk, h * w).transpose(0, 2, 1)
    high = jnp.where(v > theta_h, v, 0.0)
    sums = segment_ops.segment_reduce(
        jnp.concatenate([high, v], axis=-1), pixel_cluster.reshape(b, h * w),
        k, "sum", impl)  # [B, k, 2K]: one pass for numerator and denominator
    num, den = sums[..., :nk], sums[..., nk:]
    if denominator == "image":  # every pixel with a unit: the valid image
        den = jnp.broadcast_to(den.sum(axis=1, keepdims=True), den.shape)
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


def colour_clusters(image: Array, superpixels: Array, valid: Array, *,
                    colour_k: int = 8, colour_iters: int = 10,
                    colour_space: str = "lab", num_segments: int = 256,
                    impl: str = "segment",
                    kmeans_init: str = "lightness_ranks",
                    kmeans_seed: int = 0,
                    position_weight: float = 0.0) -> Array:
    """Colour cluster of every pixel, C = K-means(SLIC(I)) (Eq. 8).

    The CAM-independent half of `superpixel_target_mask`: superpixel mean
    colours (crop padding excluded) clustered by `colour_kmeans`, mapped
    back to the pixels.

    Args:
      image, superpixels, valid, num_segments, impl: as
        `superpixel_target_mask`.
      colour_k, colour_iters, colour_space, kmeans_init, kmeans_seed: the
        colour K-means.
      position_weight: [choice] `sgc.position_weight`, 0 (the paper's
        colour-only K-means) by default. Above 0 each superpixel's point
        also holds its mean position, (row / H, col / W) × 100 ×
        position_weight, so that crossing the whole image weighs like
        position_weight × the whole L range: distant regions of one
        colour can fall into different clusters (a spatial term in the
        target zone; docs/diagnostics.md).

    Returns:
      [B, H, W] int32 cluster id in [0, colour_k), −1 on crop padding and
      empty superpixels.
    """
    b, big_h, big_w = superpixels.shape
    ids = jnp.where(valid, superpixels, -1)
    mean, count = superpixel_colours(image, ids, num_segments, colour_space,
                                     impl)
    if position_weight < 0:
        raise ValueError(f"sgc.position_weight={position_weight}: must be "
                         ">= 0 (0 = colour only)")
    if position_weight > 0:
        mean = jnp.concatenate(
            [mean, superpixel_positions(ids, num_segments, impl)
             * (100.0 * position_weight)], axis=-1)
    seg_cluster = colour_kmeans(mean, count > 0, colour_k, colour_iters, impl,
                                kmeans_init, kmeans_seed)
    # +1/-1 so padded pixels and empty superpixels both map to cluster -1.
    pixel_cluster = segment_ops.gather_segments(
        seg_cluster + 1, ids.reshape(b, big_h * big_w)) - 1  # [B, P]
    return pixel_cluster.reshape(b, big_h, big_w)


def _units_to_pixels(unit_values: Array, units: Array) -> Array:
    """[B, K, U] bool per unit -> [B, K, P] bool per pixel (False where the
    pixel's unit id is -1 or out of range)."""
    per_pixel = segment_ops.gather_segments(
        unit_values.transpose(0, 2, 1).astype(jnp.float32), units)
    return per_pixel.transpose(0, 2, 1) > 0


def cluster_target_mask(cams: Array, pixel_cluster: Array | None,
                        valid: Array, slot_valid: Array, *,
                        colour_k: int = 8, theta_h: float = 0.4,
                        theta_r: float = 0.5, patch_fraction: float = 0.5,
                        impl: str = "segment",
                        ratio_denominator: str = "cluster",
                        zone_unit: str = "cluster",
                        superpixels: Array | None = None,
                        num_segments: int = 256,
                        intersect_box: bool = False,
                        box_threshold: float = 0.4) -> Array:
    """The CAM-dependent half of `superpixel_target_mask` (Eq. 7).

    The zone's unit (`zone_unit`, [choice] `sgc.zone_unit`, issue 10):
    - "cluster" (default, our reading of Eq. 7): a colour cluster whose
      ratio r_k (`target_ratio`) exceeds θ_r is target as a whole,
      wherever its pixels lie;
    - "superpixel": the same ratio rule applied to each SLIC superpixel
      (a spatial unit, no colour clustering; `pixel_cluster` is unused);
    - "cluster_seeded": a passing colour cluster contributes only those
      of its superpixels that hold at least one pixel with CAM > θ_h (so
      a large background cluster touched by a few high-confidence pixels
      does not come in whole).
    `ratio_denominator` is `target_ratio`'s `denominator` (the units'
    own activation, or the class's over the valid image). With
    `intersect_box` ([choice] `sgc.intersect_box`) the patch mask is
    intersected with `box_mask(cams, box_threshold)` (SGC correcting
    CAA's box rather than replacing it). The empty-mask fallback (a valid
    class with no target patch gets all ones) applies to the final mask.

    Args:
      cams, valid, slot_valid, theta_h, theta_r, patch_fraction, impl: as
        `superpixel_target_mask`.
      pixel_cluster: [B, H, W] from `colour_clusters` (None allowed with
        zone_unit "superpixel").
      colour_k: the number of colour clusters.
      ratio_denominator: "cluster" | "image".
      zone_unit: "cluster" | "superpixel" | "cluster_seeded".
      superpixels: [B, H, W] int ids in [0, num_segments), -1 = padding;
        needed unless zone_unit is "cluster".
      num_segments: static S.
      intersect_box: static; AND the zone with the box mask.
      box_threshold: the box mask's threshold (static).

    Returns:
      [B, K, h, w] float32 in {0, 1}.
    """
    if zone_unit not in ZONE_UNITS:
        raise ValueError(f"sgc.zone_unit={zone_unit!r}: choose one of "
                         f"{ZONE_UNITS}")
    if zone_unit != "cluster" and superpixels is None:
        raise ValueError(f"sgc.zone_unit={zone_unit!r} needs the superpixel "
                         "ids (superpixels=)")
    if zone_unit != "superpixel" and pixel_cluster is None:
        raise ValueError(f"sgc.zone_unit={zone_unit!r} needs the colour "
                         "clusters (pixel_cluster=)")
    b, nk, h, w = cams.shape
    big_h, big_w = valid.shape[1:]
    npix = big_h * big_w
    sh, sw = _check_grid(cams, (big_h, big_w))
    cams_pix = resize(cams.astype(jnp.float32), (big_h, big_w),
                      axes=(-2, -1))
    sp_ids = None
    if superpixels is not None and zone_unit != "cluster":
        sp_ids = jnp.where(valid, superpixels, -1).reshape(b, npix)
    if zone_unit == "superpixel":
        units, num_units = sp_ids, num_segments
    else:
        units, num_units = pixel_cluster.reshape(b, npix), colour_k
    r = target_ratio(cams_pix, units.reshape(b, big_h, big_w), num_units,
                     theta_h, impl, ratio_denominator)
    pix_target = _units_to_pixels(r > theta_r, units)  # [B, K, P]
    if zone_unit == "cluster_seeded":
        v = cams_pix.reshape(b, nk, npix).transpose(0, 2, 1)  # [B, P, K]
        seeded = segment_ops.segment_reduce(
            (v > theta_h).astype(jnp.float32), sp_ids, num_segments, "sum",
            impl) > 0  # [B, S, K]
        pix_target = pix_target & _units_to_pixels(
            seeded.transpose(0, 2, 1), sp_ids)

    hits = pix_target.reshape(b, nk, h, sh, w, sw).sum((3, 5))
    nvalid = valid.reshape(b, 1, h, sh, w, sw).sum((3, 5))
    patch = (nvalid > 0) & (hits >= patch_fraction * nvalid)
    if intersect_box:
        patch = patch & (box_mask(cams, box_threshold, impl) > 0)
    empty = ~patch.any(axis=(2, 3), keepdims=True)
    mask = jnp.where(empty, True, patch) & slot_valid[:, :, None, None]
    return mask.astype(jnp.float32)


def superpixel_target_mask(cams: Array, image: Array, superpixels: Array,
                           valid: Array, slot_valid: Array, *,
                           colour_k: int = 8, colour_iters: int = 10,
                           colour_space: str = "lab", theta_h: float = 0.4,
                           theta_r: float = 0.5, patch_fraction: float = 0.5,
                           num_segments: int = 256,
                           impl: str = "segment",
                           kmeans_init: str = "lightness_ranks",
                           kmeans_seed: int = 0,
                           position_weight: float = 0.0,
                           ratio_denominator: str = "cluster",
                           zone_unit: str = "cluster",
                           intersect_box: bool = False,
                           box_threshold: float = 0.4) -> Array:
    """SGC column mask on the patch grid (Eq. 7-8).

    Superpixel mean colours are clustered (Eq. 8); for each class, clusters
    whose high-confidence ratio r_k exceeds θ_r form the target region
    (pixels of crop padding and empty superpixels never count). A patch is
    target if at least `patch_fraction` of its valid pixels are target. A
    valid class with no target patch falls back to all ones (no mask);
    padded slots give 0. `colour_clusters` then `cluster_target_mask`
    (which holds the [choice] readings `ratio_denominator`, `zone_unit`
    and `intersect_box`; the defaults are the reading above).

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
      position_weight: the position term of `colour_clusters`.
      ratio_denominator, zone_unit, intersect_box, box_threshold: as
        `cluster_target_mask` (zone_unit "superpixel" skips the colour
        K-means).

    Returns:
      [B, K, h, w] float32 in {0, 1}.
    """
    _check_grid(cams, superpixels.shape[1:])
    pixel_cluster = None
    if zone_unit != "superpixel":
        pixel_cluster = colour_clusters(
            image, superpixels, valid, colour_k=colour_k,
            colour_iters=colour_iters, colour_space=colour_space,
            num_segments=num_segments, impl=impl, kmeans_init=kmeans_init,
            kmeans_seed=kmeans_seed, position_weight=position_weight)
    return cluster_target_mask(cams, pixel_cluster, valid, slot_valid,
                               colour_k=colour_k, theta_h=theta_h,
                               theta_r=theta_r,
                               patch_fraction=patch_fraction, impl=impl,
                               ratio_denominator=ratio_denominator,
                               zone_unit=zone_unit, superpixels=superpixels,
                               num_segments=num_segments,
                               intersect_box=intersect_box,
                               box_threshold=box_threshold)


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
