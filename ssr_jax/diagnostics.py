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
- `boundary_recall`: share of ground-truth boundary pixels within `tol`
  pixels (Chebyshev) of a superpixel boundary, the property the superpixel
  target mask (Eq. 7-8) needs.

Also the constructed CMPA problem in feature space
(`cmpa_problem`, `train_cmpa_heads`, `projected_cam_miou`): ssr_jax's own
heads, masked pooling, bank, K-means and InfoNCE, read through ssr_jax's
own GradCAM (`cam.clip_logits_fn` / `cam.gradcam`) with the CLIP block
replaced by the identity, so that the premise "heads trained on clean
pooled features raise the projected CAM" is testable in seconds
(tests/test_mechanisms.py, docs/diagnostics.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy import ndimage

from ssr_jax import cam as cam_lib
from ssr_jax import cmpa as cmpa_lib
from ssr_jax import metrics
from ssr_jax import par as par_lib

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


# --- constructed CMPA problem in feature space --------------------------------


@dataclasses.dataclass(frozen=True)
class CMPAProblem:
    """A constructed multi-image problem in CLIP's embedding space.

    tokens [B, 1 + N, E] (CLS first, zeros), obj [B, N] bool object mask,
    cls [B] int class (0-based), text_fg [C, E], text_bg [M, E] unit
    vectors, grid (h, w).
    """
    tokens: np.ndarray
    obj: np.ndarray
    cls: np.ndarray
    text_fg: np.ndarray
    text_bg: np.ndarray
    grid: tuple[int, int]


def cmpa_problem(num_images: int = 64, num_classes: int = 4, dim: int = 16,
                 grid: tuple[int, int] = (6, 6), confound: float = 0.5,
                 noise: float = 0.1, home_prob: float = 1.0,
                 text_overlap: float = 0.0, seed: int = 0) -> CMPAProblem:
    """The issue's "first lead" problem: each class sits on a home
    background kind whose tokens lean toward the class text.

    Texts: C class and C background unit vectors (random, nearly
    orthogonal in `dim` dimensions). Each image has one class c and one
    rectangular object (a quarter to half of the grid); object tokens are
    t_c + noise, background tokens b_m + confound·t_c + noise where
    m = c's home kind with probability `home_prob` (else another kind),
    all L2-normalised. confound 0: CLIP's plain GradCAM already separates
    object from background; confound 1: background tokens are half class.
    `text_overlap` a in [0, 1): every text is unit((1 − a)·r + a·u) with
    one shared random u, so class texts are similar (cos ≈ a²/(a² +
    (1 − a)²)) and the InfoNCE is not solved at step 0.

    Returns:
      `CMPAProblem`.
    """
    rng = np.random.default_rng(seed)
    h, w = grid
    n = h * w

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    texts = unit(rng.normal(size=(2 * num_classes, dim)))
    if text_overlap:
        shared = unit(rng.normal(size=(dim,)))
        texts = unit((1 - text_overlap) * texts + text_overlap * shared)
    text_fg, text_bg = texts[:num_classes], texts[num_classes:]
    cls = rng.integers(0, num_classes, num_images)
    obj = np.zeros((num_images, h, w), bool)
    tokens = np.zeros((num_images, 1 + n, dim), np.float32)
    for i in range(num_images):
        oh, ow = rng.integers(h // 2, h - 1 + 1), rng.integers(w // 2, w)
        y0, x0 = rng.integers(0, h - oh + 1), rng.integers(0, w - ow + 1)
        obj[i, y0:y0 + oh, x0:x0 + ow] = True
        c = cls[i]
        m = c if rng.random() < home_prob else rng.choice(
            [k for k in range(num_classes) if k != c])
        fg = text_fg[c] + noise * rng.normal(size=(n, dim))
        bg = (text_bg[m] + confound * text_fg[c]
              + noise * rng.normal(size=(n, dim)))
        tok = np.where(obj[i].reshape(n, 1), fg, bg)
        tokens[i, 1:] = unit(tok)
    return CMPAProblem(tokens, obj.reshape(num_images, n), cls,
                       text_fg.astype(np.float32),
                       text_bg.astype(np.float32), grid)


def projected_cams(problem: CMPAProblem, heads: cmpa_lib.CMPAHeads | None,
                   logit_scale: float = 20.0) -> Array:
    """GradCAM of ssr_jax (`cam.clip_logits_fn`, `cam.gradcam`) on the
    problem's tokens, the CLIP block and projection being the identity.

    Args:
      problem: from `cmpa_problem`.
      heads: CMPA heads (read with running BN statistics, as
        `ssr.initial_cams`), or None for plain CLIP.
      logit_scale: the GradCAM softmax scale.

    Returns:
      [B, 1, h, w] CAMs of each image's class.
    """
    tokens = jnp.asarray(problem.tokens)
    cls_ids = jnp.asarray(problem.cls, jnp.int32)[:, None]
    text_fg = jnp.asarray(problem.text_fg)
    text_bg = jnp.asarray(problem.text_bg)
    if heads is None:
        return _plain_cams(tokens, cls_ids, text_fg, text_bg,
                           tuple(problem.grid), float(logit_scale))
    return _head_cams(heads, tokens, cls_ids, text_fg, text_bg,
                      tuple(problem.grid), float(logit_scale))


def _gradcam_identity_block(tokens, cls_ids, text_fg, text_bg, grid,
                            logit_scale, head_fns):
    fn = cam_lib.clip_logits_fn(
        lambda a: (a, jnp.zeros(a.shape[:2] + a.shape[1:2])),
        lambda y: y, text_fg, text_bg, cls_ids, logit_scale=logit_scale,
        heads=head_fns)
    return cam_lib.gradcam(fn, tokens, cls_ids >= 0, grid)[0]


@functools.partial(jax.jit, static_argnums=(4, 5))
def _plain_cams(tokens, cls_ids, text_fg, text_bg, grid, logit_scale):
    return _gradcam_identity_block(tokens, cls_ids, text_fg, text_bg, grid,
                                   logit_scale, None)


@functools.partial(nnx.jit, static_argnums=(5, 6))
def _head_cams(heads, tokens, cls_ids, text_fg, text_bg, grid, logit_scale):
    head_fns = (lambda v: heads.isa(v, use_running_average=True),
                lambda t: heads.tsa(t, use_running_average=True))
    return _gradcam_identity_block(tokens, cls_ids, text_fg, text_bg, grid,
                                   logit_scale, head_fns)


def cams_miou(cams: Array, problem: CMPAProblem) -> float:
    """mIoU (background + C classes) of `par.cams_to_labels` seeds on the
    token grid against the object masks."""
    cls_ids = jnp.asarray(problem.cls, jnp.int32)[:, None]
    _, labels = par_lib.cams_to_labels(cams, cls_ids, problem.grid)
    c = problem.text_fg.shape[0]
    gt = np.where(problem.obj, problem.cls[:, None] + 1, 0).reshape(
        labels.shape)
    conf = metrics.confusion_matrix(np.asarray(labels), gt, c + 1)
    return float(metrics.scores(conf)["miou"])


def projected_cam_miou(problem: CMPAProblem,
                       heads: cmpa_lib.CMPAHeads | None,
                       logit_scale: float = 20.0) -> float:
    """`cams_miou` of `projected_cams`."""
    return cams_miou(projected_cams(problem, heads, logit_scale), problem)


@functools.lru_cache(maxsize=16)
def _cmpa_train_step(variant: str, positive: str, bg_negatives: bool):
    """One Adam step of the CMPA loss as `ssr.loss_fn` computes it: ISA
    (batch BatchNorm statistics over `token_mask`, all tokens if None),
    `masked_average_pool` under `masks`, TSA of the texts, `cmpa_loss`."""

    @nnx.jit
    def step(heads, opt, tokens, token_mask, masks, cls_ids, protos, text_fg,
             text_bg):
        def loss_fn(heads):
            v = heads.isa(tokens, mask=token_mask)
            f_img = cmpa_lib.masked_average_pool(v, masks, cls_ids >= 0)
            f_text = heads.tsa(text_fg)
            extra = heads.tsa(text_bg) if bg_negatives else None
            loss, aux = cmpa_lib.cmpa_loss(
                variant, f_img, f_text, cls_ids >= 0, cls_ids, protos,
                heads.tau(), positive, extra_negatives=extra)
            return loss, (aux, f_img)
        (loss, (aux, f_img)), grads = nnx.value_and_grad(
            loss_fn, has_aux=True)(heads)
        opt.update(heads, grads)
        return loss, aux["acc"], f_img

    return step


def train_heads_on_pools(tokens: np.ndarray, pools: np.ndarray,
                         cls_ids: np.ndarray, text_fg: Array,
                         text_bg: Array, *, token_valid: np.ndarray | None
                         = None, steps: int = 300, batch: int = 16,
                         lr: float = 2e-4, hidden_dim: int = 512,
                         dim: int = 256, tau_init: float = 0.05,
                         tau_min: float = 0.01, tied_init: bool = True,
                         identity_init: bool = False,
                         variant: str = "cross",
                         bg_negatives: bool = False, seed: int = 0,
                         ) -> tuple[cmpa_lib.CMPAHeads, dict[str, Any]]:
    """CMPA heads trained on given pooling masks (the oracle CMPA).

    The "GT pools" reading of tools/cmpa_probe.py on real tokens: with
    `pools` = `oracle_cams` of the ground truth, f_image (Eq. 2) pools the
    object's own tokens only, so the heads learn from clean pooled
    features; the projected CAM through them, scored beside plain CLIP's,
    says what CMPA can give when the pooling is not at fault. Each step
    draws `batch` images, runs ISA (training-mode BatchNorm over the valid
    tokens), `masked_average_pool` under their pools, TSA of the texts and
    `cmpa_loss` with the image's own class as the positive
    (`positive="class"`: no bank or K-means), then Adam at `lr`.

    Args:
      tokens: [S, N, E] projected patch tokens (CLIP's, no CLS).
      pools: [S, K, N] non-negative pooling masks per class slot.
      cls_ids: [S, K] int 0-based class per slot, −1 = padded.
      text_fg: [C, E] foreground text bank; text_bg: [M, E] background
        bank (read only with `bg_negatives`).
      token_valid: [S, N] bool tokens that enter BatchNorm's statistics
        (None: all).
      steps, batch, lr: the training budget (the embedded run's
        `train.num_steps`, `train.batch_size`, `optim.lr` by default in
        pretrain_report).
      Others: `cmpa.*` head and loss settings.

    Returns:
      (heads, {"loss": [steps], "acc": [steps], "tau": final τ}).
    """
    tokens = np.asarray(tokens, np.float32)
    pools = np.asarray(pools, np.float32)
    cls_ids = np.asarray(cls_ids, np.int32)
    s, n, e = tokens.shape
    if pools.shape[0] != s or pools.shape[2] != n or cls_ids.shape != \
            pools.shape[:2]:
        raise ValueError(f"tokens {tokens.shape}, pools {pools.shape} and "
                         f"cls_ids {cls_ids.shape} do not match: need "
                         "[S, N, E], [S, K, N] and [S, K]")
    if not (cls_ids >= 0).any():
        raise ValueError("no image has a labelled class slot: nothing to "
                         "train the heads on")
    if token_valid is None:
        token_valid = np.ones((s, n), bool)
    text_fg = jnp.asarray(text_fg, jnp.float32)
    text_bg = jnp.asarray(text_bg, jnp.float32)
    c = text_fg.shape[0]
    heads = cmpa_lib.CMPAHeads(e, text_fg.shape[1], hidden_dim=hidden_dim,
                               dim=dim, tau_init=tau_init, tau_min=tau_min,
                               tied_init=tied_init,
                               identity_init=identity_init,
                               rngs=nnx.Rngs(seed))
    opt = nnx.Optimizer(heads, optax.adam(lr), wrt=nnx.Param)
    protos = cmpa_lib.init_protos(c, dim, c)
    step = _cmpa_train_step(variant, "class", bg_negatives)
    rng = np.random.default_rng(seed)
    batch = min(batch, s)
    losses, accs = [], []
    for _ in range(steps):
        idx = rng.choice(s, batch, replace=False)
        loss, acc, _ = step(heads, opt, jnp.asarray(tokens[idx]),
                            jnp.asarray(token_valid[idx]),
                            jnp.asarray(pools[idx]), jnp.asarray(cls_ids[idx]),
                            protos, text_fg, text_bg)
        losses.append(float(loss))
        accs.append(float(acc))
    return heads, {"loss": losses, "acc": accs, "tau": float(heads.tau())}


POOLS = ("gt", "plain_cam", "plain_label", "self_cam", "ema_cam")


def train_cmpa_heads(problem: CMPAProblem, pool: str = "gt", *,
                     steps: int = 150, batch: int = 16, lr: float = 1e-3,
                     hidden_dim: int = 64, dim: int = 32,
                     tau_init: float = 0.05, tied_init: bool = True,
                     identity_init: bool = False, ema: float = 0.99,
                     variant: str = "cross", positive: str = "class",
                     bank_size: int = 256, recluster_every: int = 20,
                     logit_scale: float = 20.0, bg_negatives: bool = False,
                     seed: int = 0) -> tuple[cmpa_lib.CMPAHeads,
                                             dict[str, Any]]:
    """Trains ssr_jax's CMPA heads on the problem, as `ssr.loss_fn` does.

    Per step: ISA on the batch's tokens (batch BN statistics),
    `masked_average_pool` under a mask chosen by `pool`, TSA of the class
    texts, `cmpa_loss` (bank, `recluster` K-means and cluster positives
    when `positive="kmeans"`), Adam.

    Args:
      pool: "gt" (object masks, the oracle), "plain_cam" (the fixed plain
        CLIP GradCAM), "plain_label" (its binary seed, `par.cams_to_labels`:
        a stand-in for pooling under a pseudo label), "self_cam" (the
        GradCAM through the heads being trained, recomputed every step, as
        ssr.py does) or "ema_cam" (the GradCAM through an EMA copy of the
        heads, momentum `ema`).
      identity_init: `cmpa.identity_init` (heads start as x -> x/|x|).
      bg_negatives: `cmpa.background_negatives`: TSA(background prompts)
        as extra negatives of the InfoNCE (never positives).
      Others: head widths, loss and optimiser knobs.

    Returns:
      (heads, {"loss": [steps], "acc": [steps], "tau": final τ}).
    """
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}: choose one of {POOLS}")
    e = problem.text_fg.shape[1]
    c = problem.text_fg.shape[0]
    heads = cmpa_lib.CMPAHeads(e, e, hidden_dim=hidden_dim, dim=dim,
                               tau_init=tau_init, tied_init=tied_init,
                               identity_init=identity_init,
                               rngs=nnx.Rngs(seed))
    ema_heads = nnx.clone(heads) if pool == "ema_cam" else None
    opt = nnx.Optimizer(heads, optax.adam(lr), wrt=nnx.Param)
    text_fg = jnp.asarray(problem.text_fg)
    text_bg = jnp.asarray(problem.text_bg)
    tokens_all = jnp.asarray(problem.tokens[:, 1:])
    plain = None
    if pool in ("plain_cam", "plain_label"):
        cams = projected_cams(problem, None, logit_scale)
        plain = cams.reshape(len(problem.cls), 1, -1)
        if pool == "plain_label":
            _, lab = par_lib.cams_to_labels(
                cams, jnp.asarray(problem.cls, jnp.int32)[:, None],
                problem.grid)
            plain = (lab > 0).astype(jnp.float32).reshape(plain.shape)
    k = c
    bank = cmpa_lib.init_bank(bank_size, dim)
    protos = cmpa_lib.init_protos(k, dim, c)

    step = _cmpa_train_step(variant, positive, bg_negatives)

    rng = np.random.default_rng(seed)
    losses, accs = [], []
    for t in range(steps):
        idx = rng.choice(len(problem.cls), batch, replace=False)
        cls_ids = jnp.asarray(problem.cls[idx], jnp.int32)[:, None]
        if pool == "gt":
            masks = jnp.asarray(problem.obj[idx], jnp.float32)[:, None]
        elif pool in ("plain_cam", "plain_label"):
            masks = plain[idx]
        else:
            sub = dataclasses.replace(
                problem, tokens=problem.tokens[idx], obj=problem.obj[idx],
                cls=problem.cls[idx])
            masks = projected_cams(
                sub, heads if pool == "self_cam" else ema_heads,
                logit_scale).reshape(batch, 1, -1)
        loss, acc, f_img = step(heads, opt, tokens_all[idx], None, masks,
                                cls_ids, protos, text_fg, text_bg)
        bank = cmpa_lib.update_bank(bank, f_img, cls_ids)
        if ema_heads is not None:
            nnx.update(ema_heads, jax.tree_util.tree_map(
                lambda e_, n_: ema * e_ + (1 - ema) * n_,
                nnx.state(ema_heads), nnx.state(heads)))
        if positive == "kmeans" and (t + 1) % recluster_every == 0:
            protos = cmpa_lib.recluster(bank, k=k, iters=10,
                                        key=jax.random.PRNGKey(t),
                                        num_classes=c)
        losses.append(float(loss))
        accs.append(float(acc))
    return heads, {"loss": losses, "acc": accs, "tau": float(heads.tau())}
