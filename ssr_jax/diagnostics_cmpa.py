"""The constructed CMPA problem in feature space and CMPA head training.

`cmpa_problem` builds images in CLIP's embedding space where each class
sits on a home background kind whose tokens lean toward the class text;
`train_cmpa_heads` trains ssr_jax's own heads, masked pooling, bank,
K-means and InfoNCE on it; `projected_cams` / `projected_cam_miou` read
them through ssr_jax's own GradCAM (`cam.clip_logits_fn` / `cam.gradcam`)
with the CLIP block replaced by the identity, so that the premise "heads
trained on clean pooled features raise the projected CAM" is testable in
seconds (tests/test_mechanisms.py, docs/diagnostics.md).
`train_heads_on_pools` is the same training on given tokens and pooling
masks: the oracle CMPA of `pretrain_report` (heads trained on
ground-truth-masked pooled features, tests/test_diagnostics.py).
The measurements (purity, CAM errors, boundary recall) are in
`diagnostics`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ssr_jax import cam as cam_lib
from ssr_jax import cmpa as cmpa_lib
from ssr_jax import metrics
from ssr_jax import par as par_lib

Array = jax.Array

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
def _cmpa_train_step(variant: str, positive: str, bg_negatives: bool,
                     bg_pool: bool = False, bg_pool_weight: float = 1.0):
    """One Adam step of the CMPA loss as `ssr.loss_fn` computes it: ISA
    (batch BatchNorm statistics over `token_mask`, all tokens if None),
    `masked_average_pool` under `masks`, TSA of the texts, `cmpa_loss`
    (+ `bg_pool_weight` × `background_pool_loss` of the tokens pooled
    under 1 − max of `masks` with `bg_pool`)."""

    @nnx.jit
    def step(heads, opt, tokens, token_mask, masks, cls_ids, protos, text_fg,
             text_bg):
        def loss_fn(heads):
            v = heads.isa(tokens, mask=token_mask)
            f_img = cmpa_lib.masked_average_pool(v, masks, cls_ids >= 0)
            f_text_bg = None
            if bg_pool:  # one TSA call over both banks, as ssr.loss_fn
                f_all = heads.tsa(jnp.concatenate([text_fg, text_bg]))
                f_text = f_all[:text_fg.shape[0]]
                f_text_bg = f_all[text_fg.shape[0]:]
            else:
                f_text = heads.tsa(text_fg)
            extra = None
            if bg_negatives:
                extra = (heads.tsa(text_bg) if f_text_bg is None
                         else f_text_bg)
            loss, aux = cmpa_lib.cmpa_loss(
                variant, f_img, f_text, cls_ids >= 0, cls_ids, protos,
                heads.tau(), positive, extra_negatives=extra)
            if bg_pool:
                f_bg, bg_valid = cmpa_lib.background_pool(
                    v, masks, cls_ids >= 0, token_mask)
                l_bg, _ = cmpa_lib.background_pool_loss(
                    f_bg, bg_valid, f_text, f_text_bg, heads.tau())
                loss = loss + bg_pool_weight * l_bg
                aux = {**aux, "bg_loss": l_bg}
            return loss, (aux, f_img)
        (loss, (aux, f_img)), grads = nnx.value_and_grad(
            loss_fn, has_aux=True)(heads)
        opt.update(heads, grads)
        return loss, aux["acc"], f_img, aux.get("bg_loss", jnp.zeros(()))

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
                         bg_negatives: bool = False, bg_pool: bool = False,
                         bg_pool_weight: float = 1.0, seed: int = 0,
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
        bank (read only with `bg_negatives` or `bg_pool`).
      token_valid: [S, N] bool tokens that enter BatchNorm's statistics
        (None: all).
      steps, batch, lr: the training budget (the embedded run's
        `train.num_steps`, `train.batch_size`, `optim.lr` by default in
        pretrain_report).
      bg_pool, bg_pool_weight: `cmpa.background_pool` /
        `cmpa.background_pool_weight`: the tokens pooled under
        1 − max of `pools` held at TSA(background prompts).
      Others: `cmpa.*` head and loss settings.

    Returns:
      (heads, {"loss": [steps] (with `bg_pool`: L_proto + w·L_bg),
      "acc": [steps], "bg_loss": [steps] L_bg (0 without `bg_pool`),
      "tau": final τ}).
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
    step = _cmpa_train_step(variant, "class", bg_negatives, bg_pool,
                            float(bg_pool_weight))
    rng = np.random.default_rng(seed)
    batch = min(batch, s)
    losses, accs, bg_losses = [], [], []
    for _ in range(steps):
        idx = rng.choice(s, batch, replace=False)
        loss, acc, _, l_bg = step(heads, opt, jnp.asarray(tokens[idx]),
                            jnp.asarray(token_valid[idx]),
                            jnp.asarray(pools[idx]), jnp.asarray(cls_ids[idx]),
                            protos, text_fg, text_bg)
        losses.append(float(loss))
        accs.append(float(acc))
        bg_losses.append(float(l_bg))
    return heads, {"loss": losses, "acc": accs, "bg_loss": bg_losses,
                   "tau": float(heads.tau())}


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
      (heads, {"loss": [steps] (with `bg_pool`: L_proto + w·L_bg),
      "acc": [steps], "bg_loss": [steps] L_bg (0 without `bg_pool`),
      "tau": final τ}).
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
        loss, acc, f_img, _ = step(heads, opt, tokens_all[idx], None, masks,
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
