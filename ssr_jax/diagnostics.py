"""Diagnostics that separate world / encoders / reading / bug (issue 10).

Measurements of the pieces SSR's own components rely on, each a pure
function of arrays, unit-tested against slow loops (tests/test_diagnostics.py):

- `attention_purity`: for each labelled query patch, the share of its
  (row-normalised) affinity that lands on patches of its own ground-truth
  label; sums and counts for background and foreground queries, so batches
  accumulate. The property propagation (Eq. 10-11) needs: with purity 1
  a CAM can only spread inside its object.
- `cam_error_counts` / `cam_error_summary`: precision / recall of CAM seed
  labels per foreground class and where their false positives fall: on the
  class's co-occurring ("home") background kind, on other background, or on
  other objects. The paper's premise for CMPA is that CLIP over-activates
  co-occurring background; this measures whether our world reproduces it.
- `background_kind_map`: the per-pixel background kind of a synthetic-world
  image from its meta.json record (sky above the horizon, else the kind),
  and `home_kinds`: each class's home kind, for `cam_error_counts`.
- `target_mask_coverage` / `coverage_rates`: a target-zone mask's object
  recall (share of class c's pixels kept in c's zone) and background
  rejection (share of the other labelled pixels left out), for the SGC
  mask (Eq. 7-8) and the box mask.
- `boundary_recall`: share of ground-truth boundary pixels within `tol`
  pixels (Chebyshev) of a superpixel boundary, the property the superpixel
  target mask (Eq. 7-8) needs.

The constructed CMPA problem in feature space and the CMPA head training
(`cmpa_problem`, `train_cmpa_heads`, `train_heads_on_pools`,
`projected_cam_miou`) are in `diagnostics_cmpa`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

Array = jax.Array


# --- attention purity ---------------------------------------------------------


def attention_purity(aff: Array, labels: Array) -> tuple[Array, Array]:
    """Share of each labelled patch's affinity on patches of its own label.

    Each row is restricted to the labelled key patches and normalised to
    sum 1 (a row with no mass there counts 0). Foreground = label > 0.

    Args:
      aff: [B, N, N] non-negative affinity (query rows, key columns).
      labels: [B, N] int ground-truth label per patch, −1 = unlabelled
        (void / padding).

    Returns:
      (sums [2], counts [2]) float32: Σ purity and the number of query
      patches, for (background, foreground) queries. Mean purity =
      sums / counts; accumulate sums and counts over batches.
    """
    valid = labels >= 0
    a = jnp.where(valid[:, None, :], aff.astype(jnp.float32), 0.0)
    a = a / jnp.maximum(a.sum(-1, keepdims=True), 1e-12)
    same = labels[:, :, None] == labels[:, None, :]
    purity = jnp.sum(a * same, axis=-1)  # [B, N]
    fg = labels > 0
    sums = jnp.stack([jnp.sum(jnp.where(valid & ~fg, purity, 0.0)),
                      jnp.sum(jnp.where(fg, purity, 0.0))])
    counts = jnp.stack([jnp.sum(valid & ~fg), jnp.sum(fg)])
    return sums, counts.astype(jnp.float32)


def oracle_affinity(labels: Array) -> Array:
    """1 between patches of the same ground-truth label, else 0.

    Unlabelled patches (−1) get only themselves, so every row is non-zero.

    Args:
      labels: [B, N] int, −1 = unlabelled.

    Returns:
      [B, N, N] float32, purity 1 by construction.
    """
    same = (labels[:, :, None] == labels[:, None, :]) & (
        labels[:, :, None] >= 0)
    eye = jnp.eye(labels.shape[1], dtype=bool)[None]
    return (same | eye).astype(jnp.float32)


def oracle_mix(aff: Array, oracle: Array, alpha: float | Array) -> Array:
    """(1 − α)·A + α·Ô: an affinity moved toward the oracle (issue 10's
    purity threshold).

    Ô is the oracle scaled comparably: each row normalised to sum 1, then
    multiplied by A's row sum. Every query patch keeps A's total affinity
    mass; only its distribution moves toward the patches of its own label.
    For a labelled query whose keys are all labelled, the same-label
    share (`attention_purity`) is then exactly (1 − α)·p + α: linear in α
    from A's purity p to 1 (unlabelled keys, e.g. crop padding, bend it
    slightly).

    Args:
      aff: [B, N, N] non-negative affinity A (e.g. the CLIP or fused one).
      oracle: [B, N, N] `oracle_affinity` of the patch labels.
      alpha: mixing weight in [0, 1] (a float or a scalar array).

    Returns:
      [B, N, N] float32.
    """
    a = aff.astype(jnp.float32)
    o = oracle.astype(jnp.float32)
    o = o / jnp.maximum(o.sum(-1, keepdims=True), 1e-12)
    o = o * a.sum(-1, keepdims=True)
    return (1.0 - alpha) * a + alpha * o


def oracle_cams(mask: Array, cls_ids: Array, grid: tuple[int, int],
                ) -> Array:
    """The initial CAM replaced by the ground truth at the patch grid.

    For every class slot, the share of each patch's pixels whose label is
    that class (a soft map in [0, 1]: 1 inside the object, fractional on
    its rim, 0 elsewhere). Void / padding pixels count as "not the class".
    Fed to the Table 3 refinement steps, it measures each step's effect
    with the initial CAM held ideal (issue 10, "oracle initial CAM").

    Args:
      mask: [B, H, W] int ground-truth labels (0 background, class c of
        `cls_ids` is label c + 1).
      cls_ids: [B, K] int 0-based foreground class per slot, −1 = padded.
      grid: (h, w) patch grid; H, W must be multiples of it.

    Returns:
      [B, K, h, w] float32, 0 in padded slots.
    """
    b, hh, ww = mask.shape
    h, w = grid
    if hh % h or ww % w:
        raise ValueError(f"mask {hh}x{ww} is not a whole number of "
                         f"{h}x{w} patches: crop or pad it to a multiple")
    m = mask.astype(jnp.int32).reshape(b, 1, h, hh // h, w, ww // w)
    ids = cls_ids.astype(jnp.int32)[:, :, None, None, None, None]
    share = jnp.mean((m == ids + 1).astype(jnp.float32), axis=(3, 5))
    return jnp.where((cls_ids >= 0)[:, :, None, None], share, 0.0)


# --- CAM precision / recall and where the false positives fall ---------------


ERROR_KEYS = ("tp", "fp", "fn", "fp_home_bg", "fp_other_bg", "fp_object")


def cam_error_counts(pred: Array, gt: Array, bg_kind: Array,
                     home: Array, num_classes: int,
                     ignore_index: int = 255) -> dict[str, Array]:
    """Per-class pixel counts of CAM seed labels against the ground truth.

    For every foreground class c (label c, 1..C−1): TP = pred c & gt c;
    FP = pred c & gt ≠ c; FN = pred ≠ c & gt c; FP split by where it falls:
    on background pixels of c's home kind (`fp_home_bg`, the co-occurring
    background), on other background (`fp_other_bg`, including background
    of unknown kind) and on other objects (`fp_object`). Pixels with gt =
    `ignore_index` do not count.

    Args:
      pred: [B, H, W] int predicted labels (0 background).
      gt: [B, H, W] int ground truth.
      bg_kind: [B, H, W] int background kind per pixel, −1 unknown (only
        read where gt = 0).
      home: [num_classes] int home kind of each label, −1 none (entry 0,
        background, is not read).
      num_classes: C including background.
      ignore_index: void label.

    Returns:
      {key: [C] int32} for `ERROR_KEYS` (entry 0 unused, 0).
    """
    pred = pred.astype(jnp.int32).reshape(-1)
    gt = gt.astype(jnp.int32).reshape(-1)
    kind = bg_kind.astype(jnp.int32).reshape(-1)
    ok = gt != ignore_index
    home = jnp.asarray(home, jnp.int32)
    p_home = home[jnp.clip(pred, 0, num_classes - 1)]
    is_fg_pred = (pred > 0) & (pred < num_classes) & ok
    fp = is_fg_pred & (gt != pred)
    on_bg = gt == 0
    home_bg = fp & on_bg & (kind >= 0) & (kind == p_home)
    parts = {
        "tp": is_fg_pred & (gt == pred),
        "fp": fp,
        "fp_home_bg": home_bg,
        "fp_other_bg": fp & on_bg & ~home_bg,
        "fp_object": fp & ~on_bg,
    }
    out = {k: jax.ops.segment_sum(v.astype(jnp.int32),
                                  jnp.where(v, pred, 0), num_classes)
           for k, v in parts.items()}
    fn = ok & (gt > 0) & (gt < num_classes) & (pred != gt)
    out["fn"] = jax.ops.segment_sum(fn.astype(jnp.int32),
                                    jnp.where(fn, gt, 0), num_classes)
    return {k: v.at[0].set(0) for k, v in out.items()}


def cam_error_summary(counts: dict[str, Any]) -> dict[str, Any]:
    """Precision, recall and false-positive shares from summed counts.

    Args:
      counts: `cam_error_counts` output (summed over batches), arrays [C].

    Returns:
      {"precision", "recall": means over the foreground classes with a
       defined value (NaN classes skipped; None if none), "fp_share":
       {"home_bg", "other_bg", "object"}: shares of all foreground false
       positives (pooled over classes), "per_class": {c: {"precision",
       "recall", "fp_home_bg_share"}}}.
    """
    c = {k: np.asarray(v, np.float64) for k, v in counts.items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = c["tp"] / (c["tp"] + c["fp"])
        rec = c["tp"] / (c["tp"] + c["fn"])
        home_share = c["fp_home_bg"] / c["fp"]

    def mean(x):
        x = x[1:]
        x = x[np.isfinite(x)]
        return float(x.mean()) if x.size else None

    total_fp = c["fp"][1:].sum()

    def share(key):
        return float(c[key][1:].sum() / total_fp) if total_fp else None

    def num(x):
        return None if not np.isfinite(x) else float(x)

    return {"precision": mean(prec), "recall": mean(rec),
            "fp_share": {"home_bg": share("fp_home_bg"),
                         "other_bg": share("fp_other_bg"),
                         "object": share("fp_object")},
            "per_class": {int(i): {"precision": num(prec[i]),
                                   "recall": num(rec[i]),
                                   "fp_home_bg_share": num(home_share[i])}
                          for i in range(1, len(prec))}}


# --- target-zone masks (Eq. 7-8 / box): object recall, background rejection --


def target_mask_coverage(mask: Array, gt: Array, cls_ids: Array,
                         ignore_index: int = 255,
                         weights: Array | None = None) -> Array:
    """What a per-class target-zone mask keeps and what it excludes.

    For each valid class slot (class c = label c + 1), pixel counts of the
    mask upsampled to the pixel grid (nearest: a patch's value covers its
    pixels), pooled over slots and images:
    [object pixels of c kept in c's mask, object pixels of c, labelled
    pixels that are not c (background and other objects) left out of c's
    mask, labelled pixels that are not c]. Object recall = [0] / [1],
    background rejection = [2] / [3] (`coverage_rates`). Void / padding
    pixels (`ignore_index`) count in neither. With `weights` (e.g. the CAM
    the mask was made from), each pixel counts with its patch's weight:
    the share of the CAM's mass on the object that the mask keeps and the
    share of its mass off the object that it removes, which is what the
    column mask of Eq. 10-11 acts on.

    Args:
      mask: [B, K, h, w] in {0, 1} (`sgc_mask.superpixel_target_mask`,
        `sgc_mask.box_mask`).
      gt: [B, H, W] int labels, H and W multiples of h and w.
      cls_ids: [B, K] int 0-based foreground class, −1 = padded slot.
      ignore_index: the void label.
      weights: optional [B, K, h, w] non-negative per-patch weights.

    Returns:
      [4] float32 counts (weighted sums with `weights`); sum them over
      batches.
    """
    b, k, h, w = mask.shape
    hh, ww = gt.shape[1:]
    if hh % h or ww % w:
        raise ValueError(f"labels {hh}x{ww} are not a whole number of "
                         f"{h}x{w} patches: crop or pad them to a multiple")
    m = jnp.repeat(jnp.repeat(mask > 0.5, hh // h, axis=2), ww // w, axis=3)
    g = gt.astype(jnp.int32)[:, None]  # [B, 1, H, W]
    labelled = (g != ignore_index) & (g >= 0)
    slot = (cls_ids >= 0)[:, :, None, None]
    obj = (g == cls_ids.astype(jnp.int32)[:, :, None, None] + 1) & slot
    other = labelled & ~obj & slot
    if weights is None:
        wpix = jnp.ones((), jnp.float32)
    else:
        wpix = jnp.repeat(jnp.repeat(weights.astype(jnp.float32), hh // h,
                                     axis=2), ww // w, axis=3)

    def count(x):
        return jnp.sum(jnp.where(x, wpix, 0.0))

    return jnp.stack([count(obj & m), count(obj), count(other & ~m),
                      count(other)])


def coverage_rates(counts: Any) -> dict[str, float | None]:
    """{"object_recall", "background_rejection"} from summed
    `target_mask_coverage` counts (None where a denominator is 0)."""
    c = np.asarray(counts, np.float64)
    return {"object_recall": float(c[0] / c[1]) if c[1] else None,
            "background_rejection": float(c[2] / c[3]) if c[3] else None}


def background_kind_map(meta: dict[str, Any], kinds: Sequence[str],
                        height: int, width: int) -> np.ndarray:
    """Background kind per pixel of a synthetic-world image.

    Rows above `meta["horizon"]` are sky (when the world has a "sky"
    kind), the rest `meta["background"]` (data/synthetic/ renders the
    background this way; objects are drawn over it).

    Args:
      meta: the image's meta.json record ("background", "horizon").
      kinds: the world's background names in order (classes.json /
        `WorldConfig.background_names`).
      height, width: the image size.

    Returns:
      [height, width] int32 kind index into `kinds`.
    """
    bg = meta["background"]
    if bg not in kinds:
        raise ValueError(f"background {bg!r} is not one of {list(kinds)}")
    out = np.full((height, width), list(kinds).index(bg), np.int32)
    horizon = meta.get("horizon")
    if horizon and "sky" in kinds:
        out[:int(horizon)] = list(kinds).index("sky")
    return out


def home_kinds(world_cfg, kinds: Sequence[str] | None = None) -> np.ndarray:
    """[1 + C] home kind index per label (0 = background: −1; no home: −1).

    Args:
      world_cfg: `data.synthetic.WorldConfig`.
      kinds: background names (default: the config's).
    """
    kinds = list(kinds or world_cfg.background_names)
    return np.array([-1] + [kinds.index(c.home) if c.home else -1
                            for c in world_cfg.classes], np.int32)


# --- superpixel boundary recall -----------------------------------------------


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of a different label ([H, W] bool)."""
    lab = np.asarray(labels)
    b = np.zeros(lab.shape, bool)
    dy = lab[1:] != lab[:-1]
    dx = lab[:, 1:] != lab[:, :-1]
    b[1:] |= dy
    b[:-1] |= dy
    b[:, 1:] |= dx
    b[:, :-1] |= dx
    return b


def boundary_recall(superpixels: np.ndarray, gt: np.ndarray, tol: int = 2,
                    ignore_index: int = 255) -> tuple[int, int]:
    """Ground-truth boundary pixels within `tol` px of a superpixel boundary.

    A ground-truth boundary pixel is a labelled pixel (gt ≠ ignore_index)
    with a 4-neighbour of a different label (void counts as a label, so
    both sides of a void band are boundary); a superpixel boundary pixel
    likewise on the superpixel ids. "Within tol" is Chebyshev distance
    ≤ tol (a (2·tol+1)² square).

    Args:
      superpixels: [H, W] int ids.
      gt: [H, W] int labels.
      tol: tolerance in pixels (0 = the same pixel).
      ignore_index: void label.

    Returns:
      (hits, total): recall = hits / total (accumulate over images).
    """
    sp = np.asarray(superpixels)
    g = np.asarray(gt)
    if sp.shape != g.shape:
        raise ValueError(f"superpixels {sp.shape} and gt {g.shape} differ")
    gb = label_boundaries(g) & (g != ignore_index)
    sb = label_boundaries(sp)
    near = ndimage.binary_dilation(
        sb, structure=np.ones((2 * tol + 1, 2 * tol + 1), bool)) if tol \
        else sb
    return int((gb & near).sum()), int(gb.sum())
