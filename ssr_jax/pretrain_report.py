"""What the pretrained tiny encoders are worth to SSR (evidence, not targets).

- `zero_shot`: CLIP's multi-label quality on val: per-class ROC AUC of the
  image–prompt cosine ("a clean origami {}."), for the CLS embedding (what
  CLIP is) and for the mean projected patch token (what GradCAM reads,
  SPEC §1.4), and the same for the background prompts.
- `seed_report`: the CAM-seed protocol of SSR's Tables 2–3 on the train
  split against its masks: initial GradCAM seeds (block 12, present classes
  ∪ background prompts, no CMPA heads), then propagated with CLIP attention
  (box mask), CLIP + DINO attention (box mask) and CLIP + DINO with the
  superpixel mask (SGC), scored with `par.cams_to_labels` (no PAR) and
  `metrics`; plus the SGC seeds after PAR (the online pseudo labels). It
  also measures each affinity directly: the share of a patch's attention
  that lands on patches of its own ground-truth label (`affinity_purity`).

The oracle CMPA rows are trained and scored by `pretrain_report_cmpa`; the
row names and the printed text are in `report_format`.

`python -m ssr_jax.pretrain_report --config configs/synthetic.py` prepares
the world and the encoders (cached) and prints both reports.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from ml_collections import config_dict
from scipy import stats

from ssr_jax import (
    build,
    config_check,
    data_sources,
    diagnostics,
    input_pipeline,
    metrics,
    params,
    pretrain,
    pretrain_report_cmpa,
    sgc_mask,
    ssr,
)
from ssr_jax import cam as cam_lib
from ssr_jax import par as par_lib
from ssr_jax import sgc as sgc_lib
from ssr_jax import text as text_lib
from ssr_jax.data import specs, synthetic
from ssr_jax.models import encoders, loading
from ssr_jax.models.clip import CLIP
from ssr_jax.report_format import (
    CMPA_POOL_SOURCES,
    CMPA_STEPS,
    ORACLE_CAM_STEPS,
    ORACLE_STEPS,
    STEPS,
    format_report,
    pool_source_rows,
)

Array = jax.Array


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC (Mann–Whitney U with average ranks for ties); NaN when a
    class is all positive or all negative.

    Args:
      scores: [N] float.
      positive: [N] bool.
    """
    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2)
                 / (n_pos * n_neg))


def text_bank(clip: CLIP, tok: text_lib.TextTokenizer,
              prompts: Sequence[str], template: str) -> np.ndarray:
    """[P, E] L2-normalised embeddings of `template.format(prompt)`."""
    ids = text_lib.tokenize(tok, [template.format(p) for p in prompts],
                            clip.config.text.max_position_embeddings)
    emb = np.asarray(jax.jit(clip.encode_text)(jnp.asarray(ids)))
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def _image_embeddings(clip: CLIP, images: np.ndarray, normalization: str,
                      batch: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(CLS embeddings, mean patch-token embeddings), L2-normalised,
    float32 [N, E] each."""
    graphdef, state = nnx.split(clip)

    @jax.jit
    def embed(state, x):
        model = nnx.merge(graphdef, state)
        pixels = pretrain.normalise(x.astype(jnp.float32), normalization)
        cls, out = model.vision(pixels)
        return cls, out["tokens"][:, 1:].mean(1)

    cls, patch = [], []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        real = len(chunk)
        if real < batch:  # one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - real,
                                                     0)])
        c, p = embed(state, jnp.asarray(chunk))
        cls.append(np.asarray(c)[:real])
        patch.append(np.asarray(p)[:real])

    def unit(x):
        x = np.concatenate(x)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    return unit(cls), unit(patch)


def zero_shot(clip_path: str, root: str, split: str = "val",
              normalization: str = "clip") -> dict[str, Any]:
    """Zero-shot multi-label quality of the CLIP snapshot on `split`.

    Returns:
      {"fg_auc_cls", "fg_auc_patch", "bg_auc_cls", "bg_auc_patch": mean AUC
      over classes (background kinds), "per_class": {name: [auc_cls,
      auc_patch]}, "num_images"}.
    """
    clip = loading.load_clip(clip_path)
    tok = text_lib.load_tokenizer(clip_path)
    fg, bg, names = text_lib.dataset_prompts(specs.SYNTHETIC.name, root)
    classes = json.load(open(os.path.join(root, "classes.json")))
    template = classes.get("template", text_lib.TEMPLATE)
    ids = synthetic.read_split(root, split)
    meta = json.load(open(os.path.join(root, "meta.json")))
    images = pretrain.read_images(root, ids)
    cls, patch = _image_embeddings(clip, images, normalization)
    t_fg = text_bank(clip, tok, fg, template)
    t_bg = text_bank(clip, tok, bg, template)
    out: dict[str, Any] = {"num_images": len(ids), "per_class": {}}
    for kind, texts, words, truth in (
            ("fg", t_fg, names[1:],
             lambda m, c: c in m["labels"]),
            ("bg", t_bg, bg, lambda m, c: m["background"] == bg[c])):
        aucs = []
        for c, word in enumerate(words):
            label = c + 1 if kind == "fg" else c
            pos = np.array([truth(meta[i], label) for i in ids])
            pair = [roc_auc(cls @ texts[c], pos),
                    roc_auc(patch @ texts[c], pos)]
            out["per_class"][f"{kind}:{word}"] = pair
            aucs.append(pair)
        aucs = np.array(aucs)
        out[f"{kind}_auc_cls"] = float(np.nanmean(aucs[:, 0]))
        out[f"{kind}_auc_patch"] = float(np.nanmean(aucs[:, 1]))
    return out


def patch_labels(mask: Array, patch: int, num_classes: int,
                 ignore_index: int = 255) -> Array:
    """Majority ground-truth label per patch, −1 where a patch has no
    labelled pixel.

    Args:
      mask: [B, H, W] uint8/int labels.
      patch: patch side.
      num_classes: C.
      ignore_index: label of void/padding pixels.

    Returns:
      [B, (H/patch)·(W/patch)] int32.
    """
    b, h, w = mask.shape
    m = mask.astype(jnp.int32).reshape(b, h // patch, patch, w // patch,
                                       patch)
    onehot = jax.nn.one_hot(jnp.where(m == ignore_index, -1, m),
                            num_classes)  # void → all zeros
    counts = onehot.sum(axis=(2, 4)).reshape(b, -1, num_classes)
    return jnp.where(counts.sum(-1) > 0, counts.argmax(-1), -1).astype(
        jnp.int32)


def affinity_purity(aff: Array, labels: Array) -> tuple[Array, Array]:
    """Share of each patch's affinity mass on patches of its own label;
    `diagnostics.attention_purity` (sums and counts for [background,
    foreground] query patches)."""
    return diagnostics.attention_purity(aff, labels)


# The SGC mask grid (issue 10): θ_h, θ_r and the colour K-means start of
# the superpixel mask (Eq. 7-8), and the box mask's threshold (θ_h's
# values), each measured directly (`diagnostics.target_mask_coverage`)
# and by the seed mIoU of the rows that use it. The config's own values
# are always added.
# "colour_k": other numbers of colour clusters, each with every start and
# θ_h at the config's θ_r.
MASK_GRID = {"theta_h": (0.2, 0.3, 0.4, 0.5, 0.6),
             "theta_r": (0.3, 0.5, 0.7),
             "kmeans_init": sgc_mask.KMEANS_INITS,
             "colour_k": (16, 32)}
# mIoU rows of the grid: the mask applied to (CAM, affinity) as in the
# Table 3 rows "sgc" (learned CAM, CLIP+DINO), "oracle_attn_sgc" (learned
# CAM, oracle affinity) and "oracle_cam_sgc" (oracle CAM, CLIP+DINO).
MASK_GRID_ROWS = ("learned", "oracle_attn", "oracle_cam")

# The purity threshold (issue 10, "+CLIP attention > initial"): each base
# affinity moved toward the ground-truth oracle, (1 − α)·A + α·Ô
# (`diagnostics.oracle_mix`: Ô is the oracle with A's row sums), then the
# configured transition and the box mask, as the Table 3 rows
# "clip_attn" ("clip": w_clip·A_CLIP) and "clip_dino" ("fused": Eq. 9).
# Each α is scored on the learned CAM and on the oracle CAM
# (`AFFINITY_MIX_ROWS`); α = 0 reproduces those rows.
# "dino": only A_DINO is mixed, inside Eq. 9's fusion with the learned
# A_CLIP (w_clip·A_CLIP + w_dino·mix(A_DINO)); its purity columns are the
# mixed A_DINO's and its threshold is against "+CLIP attention" (the
# ordering "+DINO > +CLIP"), not the initial CAM.
AFFINITY_MIX_BASES = ("clip", "fused", "dino")
AFFINITY_MIX_REFS = {"clip": ("initial", "oracle_cam"),
                     "fused": ("initial", "oracle_cam"),
                     "dino": ("clip_attn", "oracle_cam_clip_attn")}
AFFINITY_MIX_ROWS = ("learned", "oracle_cam")


# Levers on the CLIP affinity (issue 10), measured in one pass: which
# blocks (`sgc.clip_layers`, the last k), the transition's power
# (`sgc.transition_power`) and the Sinkhorn rounds. Each setting gives
# the purity of the CLIP and fused affinities and of their transition
# matrices, and the box-mask rows `LEVER_ROWS` (the Table 3 rows of the
# same names; the config's own setting reproduces them).
# The round counts measured beside the config's own (the first three of
# these that differ from it: 0 / 1 / 10 at WeCLIP's 3, 1 / 3 / 10 at 0).
LEVER_SINKHORN = (0, 1, 3, 10)
# Besides the Table 3 rows, three stand-ins for A_DINO in Eq. 9's fusion
# (learned CAM, box mask), separating the two properties an affinity
# brings to the propagation: purity (the share of a patch's row on its
# own region) and saliency (the attention a patch *receives*, its column
# sum; tools/attention_mass.py: the tiny CLIP gives foreground patches
# 2.3x what background ones get, the tiny DINO none):
# - "clip_oracle_dino": A_DINO := the row-normalised ground-truth oracle
#   (pure, flat columns);
# - "clip_salient_dino": A_DINO with CLIP's saliency, `salient(A_DINO)`
#   (its purity, CLIP's column profile);
# - "clip_salient_oracle_dino": salient(oracle) (pure and salient);
# - "clip_offself_dino": A_DINO without its diagonal, `off_self(A_DINO)`
#   (tools/attention_mass.py: the tiny DINO keeps 17-30% of a foreground
#   row on the patch itself, the tiny CLIP 5-9%; what it propagates is the
#   rest).
LEVER_ROWS = ("clip_attn", "clip_dino", "oracle_cam_clip_attn",
              "clip_oracle_dino", "clip_salient_dino",
              "clip_salient_oracle_dino", "clip_offself_dino")


def off_self(aff: Array) -> Array:
    """`aff` [B, N, N] with its diagonal set to 0 and each row rescaled to
    its old sum (a row with nothing off the diagonal keeps itself)."""
    n = aff.shape[-1]
    eye = jnp.eye(n, dtype=bool)[None]
    off = jnp.where(eye, 0.0, aff)
    rows = jnp.sum(aff, axis=-1, keepdims=True)
    rest = jnp.sum(off, axis=-1, keepdims=True)
    return jnp.where(rest > 0, off / jnp.maximum(rest, 1e-12) * rows, aff)


def salient(aff: Array, received: Array) -> Array:
    """`aff` [B, N, N] with each key column k weighted by `received`
    [B, N] (e.g. another affinity's column sums), rows rescaled to
    `aff`'s own row sums: row i is aff[i, k]·r[k] / Σ_k aff[i, k]·r[k] ·
    Σ_k aff[i, k]. Where `aff` is pure (a row's mass inside the query's
    region) so is the result; the columns take r's profile."""
    w = aff * received[:, None, :]
    rows = jnp.sum(aff, axis=-1, keepdims=True)
    return w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-12) * rows


def lever_settings(sgc: sgc_lib.SGCParams, num_blocks: int,
                   ) -> list[dict[str, int]]:
    """Every clip_layers 1..num_blocks × transition power at the config's
    Sinkhorn rounds, then every `LEVER_SINKHORN` round count × power at
    the config's clip_layers."""
    powers = sgc_lib.TRANSITION_POWERS
    out = [{"clip_layers": k, "sinkhorn_iters": sgc.sinkhorn_iters,
            "transition_power": p}
           for k in range(1, num_blocks + 1) for p in powers]
    out += [{"clip_layers": sgc.clip_layers, "sinkhorn_iters": it,
             "transition_power": p}
            for it in [it for it in LEVER_SINKHORN
                       if it != sgc.sinkhorn_iters][:3]
            for p in powers]
    return out


def _levers(settings, attn, dino_aff, oracle, plab, cams, ocams,
            slot_valid, cls_ids, gt, s: sgc_lib.SGCParams, num_classes: int,
            ignore_index: int):
    """(purity [G, 4 (clip, its transition, fused, its transition), 2
    (sums, counts), 2 (bg, fg)], confusions [G, len(LEVER_ROWS), C, C])
    for `lever_settings`."""
    b, nk, h, w = cams.shape
    hw = gt.shape[1:]
    keep = slot_valid[:, :, None, None]
    masks = [sgc_mask.box_mask(c, s.box_threshold, s.impl).reshape(
        b, nk, h * w) for c in (cams, ocams)]

    def row(t, c, m):
        out = sgc_lib.propagate(t, c.reshape(b, nk, h * w), m)
        out = jnp.where(keep, out.reshape(b, nk, h, w), 0.0)
        _, labels = par_lib.cams_to_labels(out, cls_ids, hw)
        return metrics.confusion_matrix_jnp(labels, gt, num_classes,
                                            ignore_index)

    purs, confs = [], []
    for st in settings:
        clip_aff = sgc_lib.clip_affinity(attn, st["clip_layers"])
        a_c = sgc_lib.fuse_affinity(clip_aff, None, s.clip_weight,
                                    s.dino_weight)
        a_f = sgc_lib.fuse_affinity(clip_aff, dino_aff, s.clip_weight,
                                    s.dino_weight)
        received = jnp.sum(clip_aff, axis=1)
        stand_ins = [sgc_lib.fuse_affinity(clip_aff, d, s.clip_weight,
                                           s.dino_weight)
                     for d in (oracle, salient(dino_aff, received),
                               salient(oracle, received),
                               off_self(dino_aff))]
        t_c, t_f, *t_s = (sgc_lib.transition_matrix(
            a, st["sinkhorn_iters"], st["transition_power"])
            for a in (a_c, a_f, *stand_ins))
        purs.append(jnp.stack([jnp.stack(affinity_purity(x, plab))
                               for x in (a_c, t_c, a_f, t_f)]))
        confs.append(jnp.stack([row(t_c, cams, masks[0]),
                                row(t_f, cams, masks[0]),
                                row(t_c, ocams, masks[1])]
                               + [row(t, cams, masks[0]) for t in t_s]))
    return jnp.stack(purs), jnp.stack(confs)


def affinity_mix_weights(values: Sequence[float | str],
                         flag: str = "affinity_mix") -> list[float]:
    """The --affinity_mix (or --cam_mix, `flag`) weights as floats;
    ValueError (saying what to give) unless they are distinct, increasing
    and in [0, 1]."""
    try:
        alphas = [float(a) for a in values]
    except ValueError:
        alphas = None
    if alphas is None or any(not 0.0 <= a <= 1.0 for a in alphas) or (
            alphas != sorted(set(alphas))):
        raise ValueError(f"{flag}={','.join(map(str, values))}: give "
                         "distinct increasing weights in [0, 1], e.g. "
                         "0,0.25,0.5,0.75,1")
    return alphas


def purity_threshold(alphas: Sequence[float], purity: Sequence[float],
                     miou: Sequence[float], initial: float,
                     ) -> dict[str, Any]:
    """Where propagation first beats the initial CAM along a mixing curve.

    Args:
      alphas: increasing mixing weights.
      purity: the purity at each α (e.g. the foreground share).
      miou: the step's mIoU at each α.
      initial: the initial CAM's mIoU (the step must exceed it).

    Returns:
      {"alpha_star": the first grid α with miou > initial (None if none),
      "purity_star": its purity, "alpha_cross", "purity_cross": the
      crossing linearly interpolated between that α and the grid point
      before it (equal to the grid point when the first α already beats
      it; None if none)}.
    """
    out: dict[str, Any] = {"alpha_star": None, "purity_star": None,
                           "alpha_cross": None, "purity_cross": None}
    for i, (a, p, m) in enumerate(zip(alphas, purity, miou, strict=True)):
        if m > initial:
            out["alpha_star"], out["purity_star"] = float(a), float(p)
            if i == 0:
                out["alpha_cross"], out["purity_cross"] = float(a), float(p)
            else:
                a0, p0, m0 = alphas[i - 1], purity[i - 1], miou[i - 1]
                f = (initial - m0) / (m - m0)
                out["alpha_cross"] = float(a0 + f * (a - a0))
                out["purity_cross"] = float(p0 + f * (p - p0))
            break
    return out


def _affinity_mix(alphas, bases, oracle, plab, cams, ocams, slot_valid,
                  cls_ids, gt, s: sgc_lib.SGCParams, num_classes: int,
                  ignore_index: int):
    """(purity [A, bases, 2 (affinity, transition), 2 (sums, counts), 2
    (bg, fg)], confusions [A, bases, len(AFFINITY_MIX_ROWS), C, C]) of
    the `AFFINITY_MIX_BASES` affinities `bases` mixed toward `oracle` at
    each of `alphas` [A]. A base given as a tuple (A_CLIP, A_DINO) mixes
    A_DINO only and fuses it with A_CLIP (Eq. 9); its purity is the
    mixed A_DINO's (then the fused transition's)."""
    b, nk, h, w = cams.shape
    hw = gt.shape[1:]
    keep = slot_valid[:, :, None, None]
    masks = [sgc_mask.box_mask(c, s.box_threshold, s.impl).reshape(
        b, nk, h * w) for c in (cams, ocams)]

    def curve(base):
        def at(alpha):
            if isinstance(base, tuple):  # "dino": (A_CLIP, A_DINO)
                mixed = diagnostics.oracle_mix(base[1], oracle, alpha)
                a = sgc_lib.fuse_affinity(base[0], mixed, s.clip_weight,
                                          s.dino_weight)
            else:
                mixed = a = diagnostics.oracle_mix(base, oracle, alpha)
            t = sgc_lib.transition_matrix(a, s.sinkhorn_iters,
                                          s.transition_power)
            pur = jnp.stack([jnp.stack(affinity_purity(x, plab))
                             for x in (mixed, t)])
            confs = []
            for c, m in zip((cams, ocams), masks, strict=True):
                out = sgc_lib.propagate(t, c.reshape(b, nk, h * w), m)
                out = jnp.where(keep, out.reshape(b, nk, h, w), 0.0)
                _, labels = par_lib.cams_to_labels(out, cls_ids, hw)
                confs.append(metrics.confusion_matrix_jnp(
                    labels, gt, num_classes, ignore_index))
            return pur, jnp.stack(confs)
        return jax.lax.map(at, alphas)

    outs = [curve(bases[k]) for k in AFFINITY_MIX_BASES]
    return (jnp.stack([o[0] for o in outs], 1),
            jnp.stack([o[1] for o in outs], 1))


def _affinity_mix_summary(alphas: Sequence[float], pur: np.ndarray,
                          conf: np.ndarray, names: Sequence[str],
                          miou: dict[str, float]) -> dict[str, Any]:
    """The JSON of the purity threshold from the accumulated `_affinity_mix`
    sums: per base, per α, the [bg, fg] purity of the mixed affinity and
    of its transition matrix and the mIoU rows; the threshold against
    "initial" (learned CAM) and "oracle_cam" (oracle CAM)."""
    rate = pur[:, :, :, 0] / np.maximum(pur[:, :, :, 1], 1)  # [A, b, 2, 2]
    out: dict[str, Any] = {
        "alphas": [float(a) for a in alphas],
        "scaling": "oracle rows normalised to sum 1, times the base "
                   "affinity's row sums (diagnostics.oracle_mix)"}
    for j, base in enumerate(AFFINITY_MIX_BASES):
        points = []
        for i, a in enumerate(alphas):
            points.append({
                "alpha": float(a),
                "purity": rate[i, j, 0].tolist(),
                "purity_transition": rate[i, j, 1].tolist(),
                "miou": {r: metrics.scores(conf[i, j, k], names)["miou"]
                         for k, r in enumerate(AFFINITY_MIX_ROWS)}})
        thr = {}
        for row, ref in zip(AFFINITY_MIX_ROWS, AFFINITY_MIX_REFS[base],
                            strict=True):
            m = [p["miou"][row] for p in points]
            thr[row] = {
                "initial": miou[ref],
                "fg_purity": purity_threshold(
                    alphas, [p["purity"][1] for p in points], m, miou[ref]),
                "fg_purity_transition": purity_threshold(
                    alphas, [p["purity_transition"][1] for p in points], m,
                    miou[ref]),
                "bg_purity": purity_threshold(
                    alphas, [p["purity"][0] for p in points], m, miou[ref])}
        out[base] = {"points": points, "threshold": thr}
    return out


def mask_grid_settings(sgc: sgc_lib.SGCParams,
                       grid: dict[str, Sequence] | None = None,
                       ) -> list[dict[str, Any]]:
    """The mask settings of the grid: every (kmeans_init, θ_h, θ_r) of the
    superpixel mask at the config's colour_k, every (colour_k, kmeans_init,
    θ_h) at the config's θ_r for the other `grid["colour_k"]` values, then
    the box mask at every θ_h value as its threshold (the config's θ_h,
    θ_r, start and box threshold included)."""
    g = dict(MASK_GRID if grid is None else grid)
    th = sorted(set(g["theta_h"]) | {sgc.theta_h})
    tr = sorted(set(g["theta_r"]) | {sgc.theta_r})
    inits = list(dict.fromkeys(list(g["kmeans_init"]) + [sgc.kmeans_init]))
    out = [{"mask": "superpixel", "kmeans_init": i, "theta_h": float(h),
            "theta_r": float(r), "colour_k": sgc.colour_k}
           for i in inits for h in th for r in tr]
    out += [{"mask": "superpixel", "kmeans_init": i, "theta_h": float(h),
             "theta_r": float(sgc.theta_r), "colour_k": int(k)}
            for k in g.get("colour_k", ()) if k != sgc.colour_k
            for i in inits for h in th]
    out += [{"mask": "box", "threshold": float(t)}
            for t in sorted(set(th) | {sgc.box_threshold})]
    return out


def _mask_grid(settings, cams, ocams, slot_valid, cls_ids, gt, batch,
               trans_fused, trans_oracle, s: sgc_lib.SGCParams,
               num_classes: int, ignore_index: int):
    """(coverage of the masks of the learned CAM [G, 2, 4] (pixel counts,
    CAM-weighted), of the oracle CAM [G, 2, 4], confusions
    [G, len(MASK_GRID_ROWS), C, C]) for `settings`."""
    image, valid = batch["image"], batch["valid"]
    b, nk, h, w = cams.shape
    hp, wp = image.shape[1:3]
    ml, mo = [None] * len(settings), [None] * len(settings)
    groups: dict[tuple, list[int]] = {}
    for g, st in enumerate(settings):
        if st["mask"] == "box":
            ml[g] = sgc_mask.box_mask(cams, st["threshold"], s.impl)
            mo[g] = sgc_mask.box_mask(ocams, st["threshold"], s.impl)
        else:
            groups.setdefault((st["kmeans_init"], st["colour_k"]),
                              []).append(g)
    # One colour clustering per (start, k); the thresholds of its settings
    # in one vmap (the CAM's upsampling does not depend on them).
    for (init, k), idx in groups.items():
        clusters = sgc_mask.colour_clusters(
            image, batch["superpixels"], valid, colour_k=k,
            colour_iters=s.colour_iters, colour_space=s.colour_space,
            num_segments=s.num_segments, impl=s.impl, kmeans_init=init,
            kmeans_seed=s.kmeans_seed, position_weight=s.position_weight)
        th = jnp.asarray([settings[g]["theta_h"] for g in idx], jnp.float32)
        tr = jnp.asarray([settings[g]["theta_r"] for g in idx], jnp.float32)
        for c, out in ((cams, ml), (ocams, mo)):
            masks = jax.vmap(
                lambda a, r, c=c, cl=clusters, k=k:
                sgc_mask.cluster_target_mask(
                    c, cl, valid, slot_valid, colour_k=k, theta_h=a,
                    theta_r=r, patch_fraction=s.patch_fraction,
                    impl=s.impl, ratio_denominator=s.ratio_denominator,
                    zone_unit=s.zone_unit, superpixels=batch["superpixels"],
                    num_segments=s.num_segments,
                    intersect_box=s.intersect_box,
                    box_threshold=s.box_threshold))(th, tr)
            for j, g in enumerate(idx):
                out[g] = masks[j]
    ml, mo = jnp.stack(ml), jnp.stack(mo)

    def coverage(c):
        def fn(m):
            return jnp.stack([
                diagnostics.target_mask_coverage(m, gt, cls_ids,
                                                 ignore_index),
                diagnostics.target_mask_coverage(m, gt, cls_ids,
                                                 ignore_index, weights=c)])
        return fn

    keep = slot_valid[:, :, None, None]

    def score(masks):
        m_l, m_o = masks
        confs = []
        for c, m, t in ((cams, m_l, trans_fused), (cams, m_l, trans_oracle),
                        (ocams, m_o, trans_fused)):
            out = sgc_lib.propagate(t, c.reshape(b, nk, h * w),
                                    m.reshape(b, nk, h * w))
            out = jnp.where(keep, out.reshape(b, nk, h, w), 0.0)
            _, labels = par_lib.cams_to_labels(out, cls_ids, (hp, wp))
            confs.append(metrics.confusion_matrix_jnp(
                labels, gt, num_classes, ignore_index))
        return jnp.stack(confs)

    return (jax.vmap(coverage(cams))(ml), jax.vmap(coverage(ocams))(mo),
            jax.lax.map(score, (ml, mo)))


def _seed_fn(clip: CLIP, dino: Any, config: config_dict.ConfigDict,
             text_fg: Array, text_bg: Array, logit_scale: float,
             home: np.ndarray, mask_settings: Sequence[dict] = (),
             mix_alphas: Sequence[float] = (),
             levers: Sequence[dict] = (), cam_alphas: Sequence[float] = (),
             cam_mix_affinity: float = 0.0,
             cam_mix_affinity_dino: float | None = None,
             learned_pools: bool = False):
    """Jitted batch → (confusion per step [S, C, C], purity sums/counts,
    initial-CAM `diagnostics.cam_error_counts`, the pooling inputs of the
    oracle CMPA: projected patch tokens, GT pools, class ids, valid
    tokens, the mask grid's `_mask_grid` outputs for `mask_settings`
    (None when empty), the `_affinity_mix` outputs for `mix_alphas`, the
    `_levers` outputs for `levers` and the CAM mix's confusions [A,
    len(TABLE3_STEPS), C, C] for `cam_alphas`, with A_CLIP moved toward
    the oracle by `cam_mix_affinity` and A_DINO by `cam_mix_affinity_dino`
    (None: the same) (None when empty))."""
    home = jnp.asarray(home, jnp.int32)
    cg, cs = nnx.split(clip)
    dg, ds = nnx.split(dino)
    s = params.method_params(config).sgc
    num_classes = config.data.num_classes
    kmax = config.data.max_classes_per_image
    patch = clip.config.vision.patch_size
    clip_norm = config.pretrain.clip.normalization
    dino_kind = config.model.get("dino_kind", "dino")

    @jax.jit
    def fn(cs, ds, batch):
        clip = nnx.merge(cg, cs)
        dino = nnx.merge(dg, ds)
        image = batch["image"]
        b, hp, wp, _ = image.shape
        # The method's own composition (ssr.py): plain CLIP GradCAM at
        # `logit_scale`, DINO affinity on CLIP's grid, Table 3 steps.
        x11, out, grid = ssr.clip_trunk(
            clip, pretrain.normalise(image.astype(jnp.float32), clip_norm))
        cls_ids = cam_lib.present_classes(batch["labels"], kmax)
        slot_valid = cls_ids >= 0
        cams, aux = ssr.initial_cams(clip, x11, cls_ids, grid, text_fg,
                                     text_bg, config,
                                     logit_scale=logit_scale)
        attn = tuple(out["attn"]) + (aux["attn12"],)
        dino_affs = ssr.affinity_encoder_affinity(dino, image, grid, patch,
                                                  dino_kind, all_blocks=True)
        # sgc.dino_layers was checked against the depth (build.check_models)
        dino_aff = ssr.mean_affinity(
            dino_affs[-config.sgc.get("dino_layers", 1):])

        def table3(c, clip_aff=None, a_dino=None):
            """The Table 3 steps from CAM c; A_CLIP from `attn` unless
            `clip_aff` is given, A_DINO = `dino_aff` unless `a_dino` is."""
            return ssr.table3_steps(
                c, ssr.refine_fn(c, slot_valid, s, clip_attn=attn,
                                 clip_aff=clip_aff,
                                 dino_aff=dino_aff if a_dino is None
                                 else a_dino, image=image,
                                 superpixels=batch["superpixels"],
                                 valid=batch["valid"]),
                has_dino=True, base_mask="box")

        steps = table3(cams)
        steps["initial"] = steps.pop("initial_cam")
        gt = jnp.where(batch["example_valid"][:, None, None],
                       batch["mask"].astype(jnp.int32),
                       config.data.ignore_index)
        plab = patch_labels(gt, patch, num_classes,
                            config.data.ignore_index)
        # Rows sum to 1, like the attention rows it stands in for: with
        # sgc.sinkhorn_iters=0 nothing else normalises the transition, and a
        # binary oracle would sum the CAM over an object instead of
        # averaging it. With >= 1 Sinkhorn round the row scale cancels.
        oracle = diagnostics.oracle_affinity(plab)
        oracle = oracle / jnp.sum(oracle, axis=-1, keepdims=True)
        for name, mask_kind in zip(ORACLE_STEPS, ("box", "superpixel"),
                                   strict=True):
            steps[name] = sgc_lib.refine_cams_with(
                cams, slot_valid, s, clip_aff=oracle, image=image,
                superpixels=batch["superpixels"], valid=batch["valid"],
                use_clip_attn=True, use_dino_attn=False, clip_weight=1.0,
                mask_kind=mask_kind)
        ocams = diagnostics.oracle_cams(gt, cls_ids, grid)
        osteps = table3(ocams)
        for name, key in zip(ORACLE_CAM_STEPS, ssr.TABLE3_STEPS,
                             strict=True):
            steps[name] = osteps[key]
        pool = {"tokens": aux["tokens"][:, 1:],
                "pools": ocams.reshape(ocams.shape[:2] + (-1,)),
                "cls_ids": cls_ids,
                "token_valid": ssr.token_valid(batch["valid"], grid)
                & batch["example_valid"][:, None]}
        if learned_pools:
            # fixed learned pools (`cmpa_pools`): the plain initial CAM and
            # the "+SGC" CAM, clipped like the run's pooling weights
            for source, c in (("cam", cams), ("refined", steps["sgc"])):
                pool[f"pools_{source}"] = jnp.clip(c, 0.0, 1.0).reshape(
                    c.shape[:2] + (-1,))
        confs = []
        errors = None
        for name in STEPS + ORACLE_STEPS + ORACLE_CAM_STEPS:
            _, labels = par_lib.cams_to_labels(steps[name], cls_ids,
                                               (hp, wp))
            confs.append(metrics.confusion_matrix_jnp(
                labels, gt, num_classes, config.data.ignore_index))
            if name == "initial":
                errors = diagnostics.cam_error_counts(
                    labels, gt, batch["bg_kind"], home, num_classes,
                    config.data.ignore_index)
        pixels = pretrain.normalise(image.astype(jnp.float32), clip_norm)
        plabels = ssr.par_labels(steps["sgc"], cls_ids, pixels,
                                 batch["valid"], config)
        confs.append(metrics.confusion_matrix_jnp(
            plabels, gt, num_classes, config.data.ignore_index))

        clip_aff = sgc_lib.clip_affinity(attn, s.clip_layers)
        fused = sgc_lib.fuse_affinity(clip_aff, dino_aff, s.clip_weight,
                                      s.dino_weight)
        affs = {"uniform": jnp.ones_like(clip_aff), "clip": clip_aff,
                "dino": dino_aff, "fused": fused,
                "transition": sgc_lib.transition_matrix(
                    fused, s.sinkhorn_iters, s.transition_power)}
        # Each CLIP block alone (the choice behind sgc.clip_layers).
        for i, a in enumerate(attn):
            affs[f"clip_block{i + 1}"] = sgc_lib.drop_cls(
                a.astype(jnp.float32))
        # Each DINO block alone on CLIP's grid (SSR fuses the last one).
        for i, a in enumerate(dino_affs):
            affs[f"dino_block{i + 1}"] = a
        purity = {k: affinity_purity(v, plab) for k, v in affs.items()}
        mgrid = None
        if mask_settings:
            trans_oracle = sgc_lib.transition_matrix(
                sgc_lib.fuse_affinity(oracle, None, 1.0, s.dino_weight),
                s.sinkhorn_iters, s.transition_power)
            mgrid = _mask_grid(mask_settings, cams, ocams, slot_valid,
                               cls_ids, gt, batch, affs["transition"],
                               trans_oracle, s, num_classes,
                               config.data.ignore_index)
        mix = None
        if mix_alphas:
            bases = {"clip": sgc_lib.fuse_affinity(
                clip_aff, None, s.clip_weight, s.dino_weight),
                "fused": fused, "dino": (clip_aff, dino_aff)}
            mix = _affinity_mix(jnp.asarray(mix_alphas, jnp.float32), bases,
                                oracle, plab, cams, ocams, slot_valid,
                                cls_ids, gt, s, num_classes,
                                config.data.ignore_index)
        lev = None
        if levers:
            lev = _levers(levers, attn, dino_aff, oracle, plab, cams, ocams,
                          slot_valid, cls_ids, gt, s, num_classes,
                          config.data.ignore_index)
        cmix = None
        if cam_alphas:
            beta = float(cam_mix_affinity)
            beta_d = (beta if cam_mix_affinity_dino is None
                      else float(cam_mix_affinity_dino))
            mixed_table3 = table3
            if beta > 0 or beta_d > 0:  # affinities moved toward the oracle
                a_clip = diagnostics.oracle_mix(
                    sgc_lib.clip_affinity(attn, s.clip_layers), oracle, beta)
                a_dino = diagnostics.oracle_mix(dino_aff, oracle, beta_d)

                def mixed_table3(c):
                    return table3(c, a_clip, a_dino)

            def at(alpha):
                """The Table 3 rows from (1-α)·learned + α·oracle CAM."""
                st = mixed_table3((1.0 - alpha) * cams + alpha * ocams)
                out = []
                for key in ssr.TABLE3_STEPS:
                    _, labels = par_lib.cams_to_labels(st[key], cls_ids,
                                                       (hp, wp))
                    out.append(metrics.confusion_matrix_jnp(
                        labels, gt, num_classes, config.data.ignore_index))
                return jnp.stack(out)
            cmix = jax.lax.map(at, jnp.asarray(cam_alphas, jnp.float32))
        return (jnp.stack(confs), purity, errors, pool, mgrid, mix, lev,
                cmix)

    return lambda batch: fn(cs, ds, batch)


def seed_report(config: config_dict.ConfigDict, clip_path: str,
                dino_path: str, root: str, max_images: int = 0,
                batch_size: int = 20, logit_scale: str | float = "config",
                oracle_cmpa: bool = True,
                mask_grid: dict[str, Sequence] | None = None,
                affinity_mix: Sequence[float] = (),
                affinity_levers: bool = False,
                cam_mix: Sequence[float] = (),
                cam_mix_affinity: float = 0.0,
                cam_mix_affinity_dino: float | None = None,
                cmpa_pools: Sequence[str] = (),
                ) -> dict[str, Any]:
    """CAM-seed mIoU after each Table 3 step on the train split.

    Args:
      config: the synthetic config (`data`, `cam`, `sgc`, `par` are read;
        `data.root` is set to `root` on a copy).
      clip_path, dino_path: the snapshots.
      root: the world.
      max_images: first images of the split (0 = all).
      batch_size: images per jitted call.
      logit_scale: the GradCAM softmax scale: "config" (`cam.logit_scale`),
        "model" (the CLIP's own learned exp(logit_scale), which for the
        real CLIP is the 100 that CLIP-ES uses) or a number.
      oracle_cmpa: also train the oracle CMPA heads on the scored images
        (`pretrain_report_cmpa.oracle_cmpa_heads`) and score the initial
        CAM through them and through the untrained heads (rows
        `CMPA_STEPS`, a second pass).
      mask_grid: None (off) or {"theta_h", "theta_r", "kmeans_init"}
        value lists (e.g. `MASK_GRID`): the target-zone masks of
        `mask_grid_settings` measured directly (object recall and
        background rejection, masks of the learned and of the oracle CAM)
        and by the mIoU of `MASK_GRID_ROWS`.
      affinity_mix: mixing weights α in [0, 1], increasing (empty = off):
        the purity threshold (`_affinity_mix`, `AFFINITY_MIX_BASES`).
      affinity_levers: also measure `lever_settings` (`_levers`).
      cam_mix: weights α in [0, 1], increasing (empty = off): the Table 3
        rows with the initial CAM moved toward the oracle CAM,
        (1-α)·learned + α·oracle, everything else as learned (`cam_mix`
        in the result: at which initial-CAM quality each ordering holds).
      cam_mix_affinity: β in [0, 1]: in the CAM mix, A_CLIP and A_DINO are
        also moved toward the oracle affinity, (1-β)·A + β·oracle
        (`diagnostics.oracle_mix`); 0 = as learned.
      cam_mix_affinity_dino: A_DINO's own β (None = `cam_mix_affinity`).
      cmpa_pools: with `oracle_cmpa`, also train the heads on pools under
        fixed learned CAMs, each of `CMPA_POOL_SOURCES` ("cam": the plain
        initial CAM; "refined": the "+SGC" CAM), plain and with the
        background-pool term (rows `pool_source_rows`; the oracle rows use
        the ground truth).

    Returns:
      {"miou": {step: mIoU}, "scores": {step: metrics.scores dict},
      "purity": {affinity: [background, foreground] same-label share},
      "num_images", "seconds", "oracle_cmpa": training log, "mask_grid":
      list of {setting, "learned_cam": rates, "oracle_cam": rates,
      "learned_cam_mass": rates weighted by the learned CAM, "miou":
      {row: mIoU}} or None, "affinity_mix": `_affinity_mix_summary` or
      None, "affinity_levers": list of {setting, "purity": {affinity:
      [bg, fg]}, "miou": {row: mIoU}} or None}. Steps:
      STEPS + ORACLE_STEPS + ORACLE_CAM_STEPS + "sgc_par" (+ CMPA_STEPS).
    """
    start = time.perf_counter()
    alphas = affinity_mix_weights(affinity_mix)
    cam_alphas = affinity_mix_weights(cam_mix, "cam_mix")
    for name, b in (("cam_mix_affinity", cam_mix_affinity),
                    ("cam_mix_affinity_dino", cam_mix_affinity_dino)):
        if b is not None and not 0.0 <= b <= 1.0:
            raise ValueError(f"{name}={b}: give a weight in [0, 1]")
    config = config_dict.ConfigDict(config.to_dict())
    config.data.root = root
    clip = loading.load_clip(clip_path)
    dino, _ = encoders.load_affinity_encoder(
        config.model.get("dino_kind", "dino"), dino_path)
    # e.g. sgc.clip_layers above the CLIP's depth: a clear ConfigError here,
    # not a traceback from inside the jitted step.
    build.check_models(config, clip, dino)
    tok = text_lib.load_tokenizer(clip_path)
    fg, bg, names = text_lib.dataset_prompts(specs.SYNTHETIC.name, root)
    template = config.text.template
    text_fg = jnp.asarray(text_bank(clip, tok, fg, template))
    text_bg = jnp.asarray(text_bank(clip, tok, bg, template))
    if logit_scale == "config":
        # As the method reads it: 0 = the checkpoint's learned scale.
        logit_scale = float(ssr.gradcam_scale(clip, config.cam.logit_scale))
    elif logit_scale == "model":
        logit_scale = float(jnp.exp(clip.logit_scale[...]))
    kinds = list(bg)
    home = _home_from_classes(root, names, kinds)
    settings = (mask_grid_settings(params.method_params(config).sgc,
                                   mask_grid)
                if mask_grid is not None else [])
    levers = (lever_settings(params.method_params(config).sgc,
                             len(clip.vision.blocks))
              if affinity_levers else [])
    fn = _seed_fn(clip, dino, config, text_fg, text_bg, float(logit_scale),
                  home, settings, tuple(alphas), levers, tuple(cam_alphas),
                  float(cam_mix_affinity), cam_mix_affinity_dino,
                  learned_pools=bool(oracle_cmpa and cmpa_pools))
    num_classes = config.data.num_classes
    grid_cov = np.zeros((2, len(settings), 2, 4))
    grid_conf = np.zeros((len(settings), len(MASK_GRID_ROWS), num_classes,
                          num_classes), np.int64)
    keys = STEPS + ORACLE_STEPS + ORACLE_CAM_STEPS + ("sgc_par",)
    conf = np.zeros((len(keys), num_classes, num_classes), np.int64)
    lev_pur = np.zeros((len(levers), 4, 2, 2))
    lev_conf = np.zeros((len(levers), len(LEVER_ROWS), num_classes,
                         num_classes), np.int64)
    nb, nr = len(AFFINITY_MIX_BASES), len(AFFINITY_MIX_ROWS)
    mix_pur = np.zeros((len(alphas), nb, 2, 2, 2))
    mix_conf = np.zeros((len(alphas), nb, nr, num_classes, num_classes),
                        np.int64)
    cmix_conf = np.zeros((len(cam_alphas), len(ssr.TABLE3_STEPS),
                          num_classes, num_classes), np.int64)
    pur: dict[str, np.ndarray] = {}
    err: dict[str, np.ndarray] = {}
    bnd = {1: [0, 0], 2: [0, 0]}
    pools: dict[str, list] = {}
    n = 0
    size = config.data.crop_size
    meta = json.load(open(os.path.join(root, "meta.json")))
    split_names = data_sources.load_split(
        config, config.data.seed_split).names
    batches = input_pipeline.seed_batches(
        config, config.data.seed_split, batch_size, size,
        max_images=max_images, process_index=0, process_count=1)
    for batch in batches:
        batch = dict(batch)
        batch["bg_kind"] = _bg_kinds(batch, meta, split_names, kinds, size)
        c, purity, errors, pool, mgrid, mix, lev, cmix = fn(
            {k: jnp.asarray(v) for k, v in batch.items()
             if k not in ("name",)})
        if cmix is not None:
            cmix_conf += np.asarray(cmix, np.int64)
        if lev is not None:
            lev_pur += np.asarray(lev[0], np.float64)
            lev_conf += np.asarray(lev[1], np.int64)
        if mix is not None:
            mix_pur += np.asarray(mix[0], np.float64)
            mix_conf += np.asarray(mix[1], np.int64)
        if mgrid is not None:
            grid_cov += np.stack([np.asarray(mgrid[0]),
                                  np.asarray(mgrid[1])])
            grid_conf += np.asarray(mgrid[2], np.int64)
        if oracle_cmpa:
            real = np.asarray(batch["example_valid"])
            for k, v in pool.items():
                pools.setdefault(k, []).append(np.asarray(v)[real])
        conf += np.asarray(c, np.int64)
        for k, (sums, counts) in purity.items():
            pur[k] = pur.get(k, 0) + np.stack([np.asarray(sums),
                                               np.asarray(counts)])
        for k, v in errors.items():
            err[k] = err.get(k, 0) + np.asarray(v, np.int64)
        for i in np.nonzero(np.asarray(batch["example_valid"]))[0]:
            valid = np.asarray(batch["valid"][i])
            sp = np.where(valid, np.asarray(batch["superpixels"][i]), -1)
            for tol in bnd:
                hits, total = diagnostics.boundary_recall(
                    sp, np.asarray(batch["mask"][i]), tol,
                    config.data.ignore_index)
                bnd[tol][0] += hits
                bnd[tol][1] += total
        n += int(np.asarray(batch["example_valid"]).sum())
    cmpa_info = None
    if oracle_cmpa:
        all_pools = {k: np.concatenate(v) for k, v in pools.items()}
        del pools
        heads, cmpa_info = pretrain_report_cmpa.oracle_cmpa_heads(
            config, all_pools, text_fg, text_bg)
        rows = list(CMPA_STEPS)
        for source in cmpa_pools:
            src_heads, cmpa_info[f"pools_{source}"] = (
                pretrain_report_cmpa.pooled_cmpa_heads(
                    config, all_pools, text_fg, text_bg, source))
            heads.update(src_heads)
            rows += pool_source_rows(source)
        del all_pools
        # One pass over the images scores every set of heads.
        cmpa_fn = pretrain_report_cmpa.cmpa_cam_fn(
            clip, config, text_fg, text_bg, float(logit_scale))
        cmpa_conf = np.zeros((len(rows), num_classes, num_classes),
                             np.int64)
        for batch in input_pipeline.seed_batches(
                config, config.data.seed_split, batch_size, size,
                max_images=max_images, process_index=0, process_count=1):
            b = {k: jnp.asarray(v) for k, v in batch.items()
                 if k not in ("name",)}
            for i, k in enumerate(rows):
                cmpa_conf[i] += np.asarray(cmpa_fn(heads[k], b), np.int64)
        conf = np.concatenate([conf, cmpa_conf])
        keys = keys + tuple(rows)
    sc = {k: metrics.scores(conf[i], names) for i, k in enumerate(keys)}
    grid_out = None
    if mask_grid is not None:
        grid_out = [{**st,
                     "learned_cam": diagnostics.coverage_rates(
                         grid_cov[0, g, 0]),
                     "oracle_cam": diagnostics.coverage_rates(
                         grid_cov[1, g, 0]),
                     "learned_cam_mass": diagnostics.coverage_rates(
                         grid_cov[0, g, 1]),
                     "miou": {r: metrics.scores(grid_conf[g, j],
                                                names)["miou"]
                              for j, r in enumerate(MASK_GRID_ROWS)}}
                    for g, st in enumerate(settings)]
    miou = {k: sc[k]["miou"] for k in keys}
    mix_out = (_affinity_mix_summary(alphas, mix_pur, mix_conf, names, miou)
               if alphas else None)
    lev_out = None
    if levers:
        rate = lev_pur[:, :, 0] / np.maximum(lev_pur[:, :, 1], 1)
        lev_out = [{**st, "purity": dict(zip(
            ("clip", "clip_transition", "fused", "fused_transition"),
            rate[g].tolist(), strict=True)),
            "miou": {r: metrics.scores(lev_conf[g, j], names)["miou"]
                     for j, r in enumerate(LEVER_ROWS)}}
            for g, st in enumerate(levers)]
    return {"miou": miou, "scores": sc,
            "purity": {k: (v[0] / np.maximum(v[1], 1)).tolist()
                       for k, v in pur.items()},
            "initial_cam_errors": diagnostics.cam_error_summary(err),
            "boundary_recall": {f"tol{t}": h / max(tot, 1)
                                for t, (h, tot) in bnd.items()},
            "logit_scale": float(logit_scale), "num_images": n,
            "oracle_cmpa": cmpa_info, "mask_grid": grid_out,
            "affinity_mix": mix_out, "affinity_levers": lev_out,
            "cam_mix": ({**cam_mix_summary(cam_alphas, cmix_conf, names),
                         "affinity_alpha": float(cam_mix_affinity),
                         "affinity_alpha_dino": float(
                             cam_mix_affinity if cam_mix_affinity_dino is None
                             else cam_mix_affinity_dino)}
                        if cam_alphas else None),
            "seconds": time.perf_counter() - start}


# The orderings the CAM mix judges: (row, the row it must beat).
CAM_MIX_ORDERINGS = (("clip_attn", "initial_cam"), ("clip_dino", "clip_attn"),
                     ("sgc", "clip_dino"))


def cam_mix_summary(alphas: Sequence[float], conf: np.ndarray,
                    names: Sequence[str]) -> dict[str, Any]:
    """The JSON of the CAM mix: per α the Table 3 rows' mIoU; per ordering
    of `CAM_MIX_ORDERINGS` the first α at which it holds (and the initial
    CAM's mIoU there), or None."""
    points = [{"alpha": float(a),
               "miou": {k: metrics.scores(conf[i, j], names)["miou"]
                        for j, k in enumerate(ssr.TABLE3_STEPS)}}
              for i, a in enumerate(alphas)]
    first = {}
    for row, ref in CAM_MIX_ORDERINGS:
        hit = next((p for p in points if p["miou"][row] > p["miou"][ref]),
                   None)
        first[f"{row} > {ref}"] = None if hit is None else {
            "alpha": hit["alpha"], "initial_cam": hit["miou"]["initial_cam"]}
    return {"alphas": [float(a) for a in alphas], "points": points,
            "first_holds": first}


def _home_from_classes(root: str, names: Sequence[str],
                       kinds: Sequence[str]) -> np.ndarray:
    """[num_classes] home kind per label from the world's world.json
    (−1: none or unknown)."""
    home = np.full(len(names), -1, np.int32)
    try:
        world = json.load(open(os.path.join(root, "world.json")))
        classes = world["params"]["config"]["classes"]
    except (OSError, KeyError, ValueError) as e:
        logging.warning("no class homes in %s/world.json (%r): the "
                        "co-occurring-background share reads 0", root, e)
        return home
    for c in classes:
        if c.get("name") in names and c.get("home") in kinds:
            home[list(names).index(c["name"])] = list(kinds).index(c["home"])
    return home


def _bg_kinds(batch: dict, meta: dict, split_names: Sequence[str],
              kinds: Sequence[str], size: int) -> np.ndarray:
    """[b, size, size] background kind per pixel (−1 unknown: dummy
    examples, padding, or an image whose size is not size × size, i.e.
    one the seed pipeline resized)."""
    idx = np.asarray(batch["index"])
    out = np.full((len(idx), size, size), -1, np.int32)
    for i, j in enumerate(idx):
        if j < 0:
            continue
        m = meta.get(split_names[j])
        valid = np.asarray(batch["valid"][i])
        if m is None or not valid.all():
            continue
        out[i] = diagnostics.background_kind_map(m, kinds, size, size)
    return out


def main(argv: Sequence[str]) -> None:
    del argv
    config = _CONFIG.value
    try:
        alphas = affinity_mix_weights(_AFFINITY_MIX.value)
        cam_alphas = affinity_mix_weights(_CAM_MIX.value, "cam_mix")
        for name, b in (("cam_mix_affinity", _CAM_MIX_AFFINITY.value),
                        ("cam_mix_affinity_dino",
                         _CAM_MIX_AFFINITY_DINO.value)):
            if b is not None and not 0.0 <= b <= 1.0:
                raise ValueError(f"{name}={b}: give a weight in [0, 1]")
        bad = sorted(set(_CMPA_POOLS.value) - set(CMPA_POOL_SOURCES))
        if bad:
            raise ValueError(f"cmpa_pools={','.join(_CMPA_POOLS.value)}: "
                             f"{bad} unknown; choose from "
                             f"{','.join(CMPA_POOL_SOURCES)}")
        if _CMPA_POOLS.value and not _ORACLE_CMPA.value:
            raise ValueError("cmpa_pools needs the oracle CMPA pass; drop "
                             "--nooracle_cmpa")
    except ValueError as e:
        raise SystemExit(f"--{e}") from None
    errors = config_check.validate(config, check_devices=False)
    if errors:
        raise SystemExit("pretrain_report: the config has problems:\n  - "
                         + "\n  - ".join(errors))
    root = pretrain.ensure_world(config)
    clip_path, dino_path = pretrain.ensure_encoders(config, root)
    report = {"encoders": {}}
    for kind, path in (("clip", clip_path), ("dino", dino_path)):
        with open(os.path.join(path, pretrain.INFO_FILE)) as f:
            report["encoders"][kind] = {"path": path, **json.load(f)}
        print(f"{kind}: {json.dumps(report['encoders'][kind])}")
    zs = zero_shot(clip_path, root, "val", config.pretrain.clip.normalization)
    report["zero_shot"] = zs
    for scale in _LOGIT_SCALES.value:
        scale = scale if scale in ("config", "model") else float(scale)
        try:
            seeds = seed_report(
                config, clip_path, dino_path, root,
                max_images=_MAX_IMAGES.value, logit_scale=scale,
                oracle_cmpa=_ORACLE_CMPA.value,
                mask_grid=MASK_GRID if _MASK_GRID.value else None,
                affinity_mix=alphas, affinity_levers=_AFFINITY_LEVERS.value,
                cam_mix=cam_alphas,
                cam_mix_affinity=_CAM_MIX_AFFINITY.value,
                cam_mix_affinity_dino=_CAM_MIX_AFFINITY_DINO.value,
                cmpa_pools=tuple(_CMPA_POOLS.value))
        except config_check.ConfigError as e:
            raise SystemExit(f"pretrain_report: {e}") from None
        report[f"seeds_scale_{seeds['logit_scale']:g}"] = seeds
        print(f"GradCAM logit scale {seeds['logit_scale']:g}:")
        print(format_report(zs, seeds))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", "configs/synthetic.py", "config file")
    _MAX_IMAGES = flags.DEFINE_integer("max_images", 500,
                                       "train images scored (0 = all)")
    _LOGIT_SCALES = flags.DEFINE_list(
        "logit_scales", ["config", "model"],
        "GradCAM softmax scales to report: config (cam.logit_scale), "
        "model (the CLIP's learned scale) or numbers")
    _MASK_GRID = flags.DEFINE_boolean(
        "mask_grid", False, "also measure the SGC / box target-zone masks "
        "over MASK_GRID (object recall, background rejection, mIoU); "
        "roughly triples the seed stage")
    _AFFINITY_MIX = flags.DEFINE_list(
        "affinity_mix", [], "the purity threshold: mixing weights α "
        "(e.g. 0,0.25,0.5,0.75,1) of (1-α)·A + α·oracle for the CLIP and "
        "the fused affinity, purity and box-mask mIoU per α (empty = off)")
    _AFFINITY_LEVERS = flags.DEFINE_boolean(
        "affinity_levers", False, "also measure the CLIP affinity's levers "
        "in one pass (clip_layers 1..L x transition power 1/2, and three "
        "other Sinkhorn round counts of 0/1/3/10): purity and box-mask mIoU "
        "rows")
    _CAM_MIX = flags.DEFINE_list(
        "cam_mix", [], "the initial-CAM threshold: weights α (e.g. "
        "0,0.25,0.5,0.75,1) of (1-α)·learned + α·oracle initial CAM, the "
        "Table 3 rows at each (empty = off)")
    _CAM_MIX_AFFINITY = flags.DEFINE_float(
        "cam_mix_affinity", 0.0, "with --cam_mix: also move A_CLIP and "
        "A_DINO toward the oracle affinity by this weight (0 = learned)")
    _CAM_MIX_AFFINITY_DINO = flags.DEFINE_float(
        "cam_mix_affinity_dino", None, "A_DINO's own weight toward the "
        "oracle in --cam_mix (default: --cam_mix_affinity)")
    _ORACLE_CMPA = flags.DEFINE_boolean(
        "oracle_cmpa", True, "train and score the oracle CMPA rows (a "
        "second pass; --nooracle_cmpa skips them)")
    _CMPA_POOLS = flags.DEFINE_list(
        "cmpa_pools", [], "also train the CMPA heads on pools under fixed "
        "learned CAMs: cam (plain initial CAM), refined (the +SGC CAM); "
        "rows cmpa_<source>pool[_bgpool] beside the GT-pool oracle")
    _OUT = flags.DEFINE_string("out", "", "write the reports as JSON here")
    from ssr_jax import cli

    app.run(main, flags_parser=cli.flags_parser(
        "pretrain_report", "Run with --helpshort for the flags; the config "
        "fields are those of configs/synthetic.py."))
