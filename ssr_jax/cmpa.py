"""Cross-Modal Prototype Alignment, CMPA (Eq. 1-6; SPEC 1.3, 1.5).

Pieces, in the order the method uses them:

- `ProjectionHead`, `CMPAHeads` (Eq. 1): ISA and TSA, two independent
  Dense → BatchNorm → ReLU → Dense stacks with L2-normalised outputs, and the
  learnable temperature stored as log τ.
- `masked_average_pool` (Eq. 2): f_image of each (image, present class) =
  MAP(CAM_c ⊙ v'), the CAM under stop_gradient.
- A feature bank in the train state (`init_bank`, `update_bank`) and
  `recluster` (K-means++ + Lloyd, `kmeans`; clusters named by majority vote,
  `match_clusters`), run by the trainer every `cmpa.recluster_every` steps
  outside the train step.
- `positive_indices` (Eq. 4), `proto_loss` (Eq. 3-6) and `cmpa_loss` (the
  Table 4 variants); `background_pool` / `background_pool_loss`, an
  optional term on the image's background tokens (not in the paper).

[choice]s, each with the config field that controls it:

- `cmpa.hidden_dim` 512, `cmpa.dim` 256: ISA/TSA widths. BatchNorm follows
  PyTorch's BatchNorm1d defaults (momentum 0.1 ≡ flax momentum 0.9, eps
  1e-5; flax keeps the biased batch variance in the running average); these
  two are `ProjectionHead` arguments, not config fields.
  Batch statistics over every leading axis (all tokens of all images), which
  under `jax.jit` with a batch-sharded input is the global batch.
- `cmpa.tau_init` 0.05, `cmpa.tau_min` 0.01: τ = exp(max(log τ, log τ_min)).
- The features ISA pools (Eq. 2, reference/ssr_paper.md 9.6): per-token
  ISA of the projected patch tokens (`initial_cams` aux "tokens"), pooled
  with each class's CAM and L2-normalised again after pooling.
- `cmpa.bank_size`: a ring buffer of the latest f_image (with their class)
  stands in for "all image-text pairs in the dataset"; K-means runs on it.
  K-means on f_text is not run: a class's text feature is the same in every
  image, so it would return the C text features themselves (ssr_paper 9.8);
  P_T is the live TSA output of the foreground text bank.
- `cmpa.num_prototypes` K (0 = C), `cmpa.kmeans_iters`: Lloyd with k-means++
  init; clusters are matched to classes by majority vote of the bank labels.
  `recluster` reports `ready` once the bank holds at least K features.
- `cmpa.positive` ("kmeans" | "class"): the positive of Eq. 4 is the class of
  the cluster whose centroid is nearest to f_image (its cluster pseudo-
  label), falling back to the own class for an unmatched cluster or before
  the first recluster; "class" uses the image-level class directly.
- `cmpa.variant` (Table 4): "cross" (SSR: prototypes P_T = TSA(text));
  "intra" (image prototypes P_I, the member-weighted centroids of the
  clusters voted to each class, falling back to the class mean of the bank;
  before the first recluster, the in-batch class means of f_image, so that
  the variant trains from step 0; prototypes are constants); "feature"
  (direct fine-tuning without prototypes: each f_image against the TSA text
  features of the classes in the batch, positive = own class); "none".
  TSA receives gradients only from "cross" and "feature".
- `cmpa.background_pool` (False), `cmpa.background_pool_weight` (1.0):
  adds w·L_bg (`background_pool_loss`) to L_proto: the image's tokens
  pooled under 1 − max_c CAM_c must match TSA(background prompts) rather
  than any class's TSA(text). Not in the paper; L_proto alone never
  constrains background tokens, and ISA is shared by all tokens
  (docs/diagnostics.md). "cross" and "feature" only.
- `cmpa.pool_source` ("live" | "ema"), `cmpa.pool_ema_decay` (0.99): which
  heads project the GradCAM whose CAM masks the pooled features (Eq. 2).
  "live" (the paper's reading): the heads being trained, so the CAM that
  pools their training features comes from themselves (a self-feeding
  loop). "ema": a slow copy, ema ← decay·ema + (1 − decay)·live after
  every step (`ema_update`), kept in the train state as "heads_ema".
  Not in the paper (docs/diagnostics.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ssr_jax.models.normalize import l2_normalize

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
VARIANTS = ("none", "feature", "intra", "cross")
POSITIVE_MODES = ("kmeans", "class")
POOL_SOURCES = ("live", "ema")
# Finite "−inf" for masked logits: a true −inf gives NaN gradients through
# `where` when a whole row is masked.
_NEG = -1e30


class ProjectionHead(nnx.Module):
    """ISA or TSA (Eq. 1): Dense → BatchNorm → ReLU → Dense, L2-normalised."""

    def __init__(self, in_dim: int, hidden_dim: int, dim: int, *,
                 momentum: float = 0.9, epsilon: float = 1e-5,
                 rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(in_dim, hidden_dim, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden_dim, momentum=momentum,
                                epsilon=epsilon, rngs=rngs)
        self.fc2 = nnx.Linear(hidden_dim, dim, rngs=rngs)

    def __call__(self, x: Array, *, use_running_average: bool = False,
                 mask: Array | None = None) -> Array:
        """Projects features.

        Args:
          x: [..., in_dim].
          use_running_average: False (training) normalises with the
            statistics of `x` over all leading axes and updates the running
            averages; True uses the running averages (every sample
            independent, as the GradCAM path needs).
          mask: optional [...] bool; only True rows enter the batch
            statistics (e.g. real patch tokens).

        Returns:
          [..., dim] unit vectors (float32).
        """
        z = self.fc1(x.astype(jnp.float32))
        z = self.bn(z, use_running_average=use_running_average,
                    mask=None if mask is None else mask[..., None])
        return l2_normalize(self.fc2(jax.nn.relu(z)))


@dataclasses.dataclass(frozen=True)
class CMPAParams:
    """The CMPA knobs the method functions take, as one frozen value
    (`ssr_jax.params.method_params` builds it from `config.cmpa`).

    hidden_dim, dim, tau_init, tau_min, tied_init, identity_init size and
    start the heads (`CMPAHeads.from_params`); variant, positive,
    background_negatives, valid_tokens_only, background_pool and
    background_pool_weight choose the loss (`cmpa_loss`,
    `background_pool_loss`, `ssr.loss_fn`); num_prototypes (0 = C),
    kmeans_iters, bank_size and recluster_every drive the trainer's
    `recluster`.
    """

    variant: str = "cross"
    hidden_dim: int = 512
    dim: int = 256
    tau_init: float = 0.05
    tau_min: float = 0.01
    tied_init: bool = True
    identity_init: bool = False
    positive: str = "kmeans"
    background_negatives: bool = False
    valid_tokens_only: bool = False
    background_pool: bool = False
    background_pool_weight: float = 1.0
    num_prototypes: int = 0
    kmeans_iters: int = 20
    bank_size: int = 4096
    recluster_every: int = 5000
    pool_source: str = "live"
    pool_ema_decay: float = 0.99


class CMPAHeads(nnx.Module):
    """ISA, TSA and the learnable temperature of Eq. 3 (stored as log τ)."""

    def __init__(self, image_dim: int, text_dim: int, *,
                 hidden_dim: int = 512, dim: int = 256,
                 tau_init: float = 0.05, tau_min: float = 0.01,
                 tied_init: bool = True, identity_init: bool = False,
                 rngs: nnx.Rngs):
        if not 0 < tau_min <= tau_init:
            raise ValueError(
                f"cmpa.tau_init={tau_init} and cmpa.tau_min={tau_min}: need "
                "0 < tau_min <= tau_init (a clamped τ gets no gradient)")
        self.isa = ProjectionHead(image_dim, hidden_dim, dim, rngs=rngs)
        self.tsa = ProjectionHead(text_dim, hidden_dim, dim, rngs=rngs)
        if tied_init:
            # [choice] `cmpa.tied_init`: TSA starts as a copy of ISA (then
            # trains independently). CLIP's image and text embeddings share
            # one space, and one random ReLU map keeps their angles roughly
            # (the arc-cosine kernel), so the projected GradCAM starts near
            # CLIP's own instead of from two unrelated random maps (noise).
            if image_dim != text_dim:
                raise ValueError(
                    f"cmpa.tied_init needs equal image and text widths, got "
                    f"{image_dim} and {text_dim}")
            nnx.update(self.tsa, jax.tree_util.tree_map(
                jnp.copy, nnx.state(self.isa, nnx.Param)))
        if identity_init:
            # [choice] `cmpa.identity_init`: both heads start as x -> x/|x|
            # (padded with zeros to dim), so the projected GradCAM at step 0
            # is plain CLIP's up to per-token normalisation, and training's
            # effect on the CAM is measured from a known start
            # (docs/diagnostics.md).
            for head, width in ((self.isa, image_dim), (self.tsa, text_dim)):
                _identity_start(head, width)
        self.log_tau = nnx.Param(jnp.asarray(math.log(tau_init), jnp.float32))
        self.log_tau_min = math.log(tau_min)

    @classmethod
    def from_params(cls, params: CMPAParams, image_dim: int, text_dim: int,
                    *, rngs: nnx.Rngs) -> CMPAHeads:
        """Heads sized by `params` (hidden_dim, dim, tau_init, tau_min,
        tied_init, identity_init)."""
        return cls(image_dim, text_dim, hidden_dim=params.hidden_dim,
                   dim=params.dim, tau_init=params.tau_init,
                   tau_min=params.tau_min, tied_init=params.tied_init,
                   identity_init=params.identity_init, rngs=rngs)

    def tau(self) -> Array:
        """τ = exp(max(log τ, log τ_min)), a float32 scalar."""
        return jnp.exp(jnp.maximum(self.log_tau[...], self.log_tau_min))


def _identity_start(head: ProjectionHead, width: int) -> None:
    """fc1 = [I, −I, 0], fc2 = [I; −I; 0] (zero biases): with the BatchNorm
    at its initial running statistics (mean 0, var 1, scale 1, bias 0),
    ReLU(x) − ReLU(−x) = x, so the head is x/|x| up to the BN epsilon
    (a factor 1/sqrt(1 + eps) that the L2 normalisation removes)."""
    hidden = head.fc1.kernel.shape[1]
    dim = head.fc2.kernel.shape[1]
    if hidden < 2 * width or dim < width:
        raise ValueError(
            f"cmpa.identity_init needs cmpa.hidden_dim >= 2 x the CLIP "
            f"embedding width ({2 * width}) and cmpa.dim >= it ({width}); "
            f"got hidden_dim={hidden}, dim={dim}")
    eye = jnp.eye(width, dtype=jnp.float32)
    fc1 = jnp.zeros((width, hidden), jnp.float32)
    fc1 = fc1.at[:, :width].set(eye).at[:, width:2 * width].set(-eye)
    fc2 = jnp.zeros((hidden, dim), jnp.float32)
    fc2 = fc2.at[:width, :width].set(eye).at[width:2 * width, :width].set(
        -eye)
    head.fc1.kernel.value = fc1
    head.fc1.bias.value = jnp.zeros_like(head.fc1.bias.value)
    head.fc2.kernel.value = fc2
    head.fc2.bias.value = jnp.zeros_like(head.fc2.bias.value)


def ema_update(ema, live, decay: float):
    """One step of the slow copy of the heads ([choice]
    `cmpa.pool_source="ema"`): ema ← decay·ema + (1 − decay)·live on every
    floating leaf (parameters and BatchNorm running statistics), the live
    value on any other leaf.

    Args:
      ema, live: pytrees of the same structure (e.g. {"params", "rest"} of
        the heads).
      decay: in [0, 1]; 1 keeps the start, 0 follows the live heads.

    Returns:
      The updated pytree (the structure of `ema`).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"cmpa.pool_ema_decay={decay}: must lie in [0, 1]")

    def one(e, x):
        if jnp.issubdtype(jnp.asarray(e).dtype, jnp.floating):
            return (decay * e + (1.0 - decay) * x.astype(e.dtype)).astype(
                e.dtype)
        return x

    return jax.tree_util.tree_map(one, ema, live)


def masked_average_pool(features: Array, cams: Array,
                        slot_valid: Array) -> Array:
    """f_image = MAP(CAM_c ⊙ v') per (image, class slot) (Eq. 2).

    Σ_n CAM(n)·v'(n) / Σ_n CAM(n), then L2-normalised. The CAM is a
    constant (stop_gradient). An all-zero CAM or a padded slot gives 0.

    Args:
      features: [B, N, d] per-token features v' (ISA outputs).
      cams: [B, K, N] non-negative CAMs on the same N tokens.
      slot_valid: [B, K] bool.

    Returns:
      [B, K, d] float32.
    """
    cams = jax.lax.stop_gradient(cams.astype(jnp.float32))
    num = jnp.einsum("bkn,bnd->bkd", cams, features.astype(jnp.float32),
                     precision=HIGHEST)
    den = cams.sum(-1, keepdims=True)
    pooled = l2_normalize(num / jnp.maximum(den, 1e-12))
    return jnp.where(slot_valid[..., None] & (den > 0), pooled, 0.0)


def background_pool(features: Array, cams: Array, slot_valid: Array,
                    token_mask: Array | None = None) -> tuple[Array, Array]:
    """f_bg = MAP((1 − max_c CAM_c) ⊙ v') per image: the image's tokens
    pooled under its background ([choice] `cmpa.background_pool`).

    Σ_n w(n)·v'(n) / Σ_n w(n) with w = 1 − max over the valid slots of
    the CAM (clipped to [0, 1]), 0 where `token_mask` is False; then
    L2-normalised. The weights are constants (stop_gradient), as in Eq. 2.

    Args:
      features: [B, N, d] per-token features v' (ISA outputs).
      cams: [B, K, N] CAMs in [0, 1] on the same tokens.
      slot_valid: [B, K] bool.
      token_mask: optional [B, N] bool (e.g. tokens with a valid pixel).

    Returns:
      (f_bg [B, d] float32, 0 where the weights sum to 0; valid [B] bool).
    """
    cams = jax.lax.stop_gradient(cams.astype(jnp.float32))
    fg = jnp.max(jnp.where(slot_valid[:, :, None], cams, 0.0), axis=1)
    wgt = jnp.clip(1.0 - fg, 0.0, 1.0)
    if token_mask is not None:
        wgt = wgt * token_mask.astype(jnp.float32)
    num = jnp.einsum("bn,bnd->bd", wgt, features.astype(jnp.float32),
                     precision=HIGHEST)
    den = wgt.sum(-1, keepdims=True)
    valid = den[:, 0] > 0
    pooled = l2_normalize(num / jnp.maximum(den, 1e-12))
    return jnp.where(valid[:, None], pooled, 0.0), valid


def background_pool_loss(f_bg: Array, bg_valid: Array, f_text: Array,
                         f_text_bg: Array, tau: Array,
                         ) -> tuple[Array, dict[str, Array]]:
    """A term that holds background tokens away from the classes
    ([choice] `cmpa.background_pool`, docs/diagnostics.md).

    The pooled background feature f_bg (`background_pool`) against the
    prototypes [TSA(background prompts); TSA(foreground texts)] at
    temperature τ: every background prompt is a positive and every class
    a negative,
    L_bg = −log Σ_{m∈bg} exp(f_bg·b_m/τ) / Σ_{all} exp(f_bg·p/τ),
    the mean over images with a background pool (0 when there are none).

    Args:
      f_bg: [B, d]; bg_valid: [B] bool.
      f_text: [C, d] TSA of the foreground text bank.
      f_text_bg: [M, d] TSA of the background prompts.
      tau: scalar temperature.

    Returns:
      (loss scalar, {"bg_acc": share of the pooled backgrounds whose
       highest logit is a background prompt}).
    """
    logits = jnp.einsum("bd,pd->bp", f_bg.astype(jnp.float32),
                        jnp.concatenate([f_text_bg, f_text]).astype(
                            jnp.float32), precision=HIGHEST) / tau
    m = f_text_bg.shape[0]
    nll = (jax.nn.logsumexp(logits, -1)
           - jax.nn.logsumexp(logits[:, :m], -1))
    denom = jnp.maximum(bg_valid.sum(), 1).astype(jnp.float32)
    loss = jnp.where(bg_valid, nll, 0.0).sum() / denom
    hit = jnp.argmax(logits, -1) < m
    acc = jnp.where(bg_valid, hit, False).sum() / denom
    return loss, {"bg_acc": acc}


# --- feature bank (train state) ---------------------------------------------


def init_bank(size: int, dim: int) -> dict[str, Array]:
    """An empty ring buffer of f_image (`cmpa.bank_size` rows).

    Returns:
      {"feats": [size, dim] float32, "cls": [size] int32 (−1 = empty),
       "ptr": [] int32, the next row to write}.
    """
    if size < 1 or dim < 1:
        raise ValueError(f"bank size={size}, dim={dim}: both must be >= 1")
    return {"feats": jnp.zeros((size, dim), jnp.float32),
            "cls": jnp.full((size,), -1, jnp.int32),
            "ptr": jnp.zeros((), jnp.int32)}


def update_bank(bank: dict[str, Array], feats: Array,
                cls_ids: Array) -> dict[str, Array]:
    """Writes the valid slots into the ring buffer, in row-major order.

    Padded slots (cls_ids −1) are skipped; write positions come from a
    cumulative sum over the valid slots, so shapes stay static. If one update
    has more valid slots than the bank holds, only the last `size` are kept.

    Args:
      bank: from `init_bank`.
      feats: [B, K, d] f_image (stored under stop_gradient, float32).
      cls_ids: [B, K] int32.

    Returns:
      The updated bank.
    """
    size = bank["cls"].shape[0]
    f = jax.lax.stop_gradient(feats).reshape(-1, feats.shape[-1])
    c = cls_ids.reshape(-1)
    valid = c >= 0
    rank = jnp.cumsum(valid.astype(jnp.int32)) - 1
    n = valid.sum().astype(jnp.int32)
    write = valid & (rank >= n - size)
    pos = jnp.where(write, (bank["ptr"] + rank) % size, size)
    return {"feats": bank["feats"].at[pos].set(f.astype(jnp.float32),
                                              mode="drop"),
            "cls": bank["cls"].at[pos].set(c, mode="drop"),
            "ptr": (bank["ptr"] + n) % size}


# --- K-means and prototypes -------------------------------------------------


def _sq_dist(x: Array, c: Array) -> Array:
    """[S, d], [k, d] -> [S, k] squared Euclidean distances."""
    xc = jnp.einsum("sd,kd->sk", x, c, precision=HIGHEST)
    return jnp.maximum(
        (x * x).sum(-1)[:, None] - 2 * xc + (c * c).sum(-1)[None, :], 0.0)


def kmeans_pp_init(x: Array, valid: Array, k: int, key: Array) -> Array:
    """k-means++ seeding over the valid rows (jax.random).

    The first centre is uniform over valid rows, each next one drawn with
    probability ∝ D², the squared distance to the nearest chosen centre
    (uniform over valid rows again once every row is covered).

    Args:
      x: [S, d] points.
      valid: [S] bool.
      k: static number of centres.
      key: PRNG key.

    Returns:
      [k, d] initial centres (rows of x).
    """
    x = x.astype(jnp.float32)
    uniform = valid.astype(jnp.float32)

    def draw(i, weights):
        logits = jnp.where(weights > 0, jnp.log(weights), -jnp.inf)
        return x[jax.random.categorical(jax.random.fold_in(key, i), logits)]

    first = draw(0, uniform)
    centres = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(first)
    d2 = _sq_dist(x, first[None])[:, 0] * uniform

    def body(i, carry):
        centres, d2 = carry
        weights = jnp.where(d2.sum() > 0, d2, uniform)
        new = draw(i, weights)
        d2 = jnp.minimum(d2, _sq_dist(x, new[None])[:, 0] * uniform)
        return centres.at[i].set(new), d2

    centres, _ = jax.lax.fori_loop(1, k, body, (centres, d2))
    return centres


def _assign(x: Array, valid: Array, centres: Array) -> Array:
    return jnp.where(valid, jnp.argmin(_sq_dist(x, centres), -1), -1)


def lloyd(x: Array, valid: Array, centres: Array,
          iters: int) -> tuple[Array, Array]:
    """`iters` Lloyd updates from `centres`; invalid rows are ignored.

    Each update assigns every valid row to its nearest centre (ties: lowest
    index) and moves each centre to the mean of its rows; a centre with no
    rows stays where it is.

    Args:
      x: [S, d]; valid: [S] bool; centres: [k, d]; iters: static count.

    Returns:
      (centres [k, d], assign [S] int32 against the final centres, −1 for
      invalid rows).
    """
    x = x.astype(jnp.float32)
    k = centres.shape[0]
    w = valid.astype(jnp.float32)[:, None]

    def body(_, c):
        a = jnp.where(valid, _assign(x, valid, c), k)
        sums = jax.ops.segment_sum(x * w, a, k + 1)[:k]
        counts = jax.ops.segment_sum(w, a, k + 1)[:k]
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c)

    centres = jax.lax.fori_loop(0, iters, body, centres.astype(jnp.float32))
    return centres, _assign(x, valid, centres).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def kmeans(x: Array, valid: Array, k: int, iters: int,
           key: Array) -> tuple[Array, Array]:
    """K-means: k-means++ seeding, then `iters` Lloyd updates.

    Args:
      x: [S, d] points; valid: [S] bool; k, iters: static; key: PRNG key.

    Returns:
      (centroids [k, d], assign [S] int32, −1 for invalid rows).
    """
    return lloyd(x, valid, kmeans_pp_init(x, valid, k, key), iters)


def match_clusters(assign: Array, cls: Array, valid: Array, k: int,
                   num_classes: int) -> Array:
    """Names each cluster by the majority class of its members.

    Args:
      assign: [S] cluster per row (−1 = none).
      cls: [S] class per row.
      valid: [S] bool.
      k, num_classes: static.

    Returns:
      cluster_class: [k] int32, the most frequent class (ties: the lowest),
      −1 for a cluster with no members.
    """
    ok = valid & (assign >= 0) & (cls >= 0)
    votes = jnp.zeros((k, num_classes), jnp.int32).at[
        jnp.where(ok, assign, k), jnp.where(ok, cls, 0)].add(1, mode="drop")
    return jnp.where(votes.sum(-1) > 0, jnp.argmax(votes, -1),
                     -1).astype(jnp.int32)


def prototype_count(num_prototypes: int, num_classes: int) -> int:
    """K of the K-means: `num_prototypes`, 0 meaning C (ssr_paper 9.8).

    Args:
      num_prototypes: `cmpa.num_prototypes` (0 = C).
      num_classes: C, foreground classes (`data.num_classes` − 1).
    """
    k = int(num_prototypes) or num_classes
    if k < 1:
        raise ValueError(f"cmpa.num_prototypes={k}: must be >= 0")
    return k


def init_protos(k: int, dim: int, num_classes: int) -> dict[str, Array]:
    """Prototypes before the first recluster (`ready` False), same pytree
    structure and shapes as `recluster`'s output."""
    return {"centroids": jnp.zeros((k, dim), jnp.float32),
            "cluster_class": jnp.full((k,), -1, jnp.int32),
            "class_centroids": jnp.zeros((num_classes, dim), jnp.float32),
            "class_valid": jnp.zeros((num_classes,), bool),
            "ready": jnp.zeros((), bool)}


@functools.partial(jax.jit, static_argnames=("k", "iters", "num_classes"))
def recluster(bank: dict[str, Array], *, k: int, iters: int, key: Array,
              num_classes: int) -> dict[str, Array]:
    """Image prototypes P_I from the bank (SPEC 1.5, ssr_paper 2.3).

    Args:
      bank: from `update_bank`.
      k: number of prototypes K (`cmpa.num_prototypes`, 0 → C upstream).
      iters: `cmpa.kmeans_iters`.
      key: PRNG key for the k-means++ seeding.
      num_classes: C, foreground classes.

    Returns:
      {"centroids": [k, d], "cluster_class": [k] int32 (majority vote, −1
       empty), "class_centroids": [C, d] unit vectors, P_I per class (the
       member-weighted mean of the centroids voted to the class, else the
       bank mean of the class, else 0), "class_valid": [C] bool,
       "ready": [] bool (the bank holds >= k features)}.
    """
    x, cls = bank["feats"], bank["cls"]
    valid = cls >= 0
    centroids, assign = kmeans(x, valid, k, iters, key)
    cluster_class = match_clusters(assign, cls, valid, k, num_classes)
    sizes = jnp.zeros((k,), jnp.float32).at[
        jnp.where(valid, assign, k)].add(1.0, mode="drop")
    vote = (cluster_class[:, None] == jnp.arange(num_classes)[None, :])
    weight = vote * sizes[:, None]  # [k, C]
    from_clusters = jnp.einsum("kc,kd->cd", weight, centroids,
                               precision=HIGHEST)
    onehot = (cls[:, None] == jnp.arange(num_classes)[None, :])
    onehot = (onehot & valid[:, None]).astype(jnp.float32)  # [S, C]
    from_bank = jnp.einsum("sc,sd->cd", onehot, x, precision=HIGHEST)
    has_cluster = weight.sum(0) > 0
    class_centroids = l2_normalize(
        jnp.where(has_cluster[:, None], from_clusters, from_bank))
    return {"centroids": centroids, "cluster_class": cluster_class,
            "class_centroids": class_centroids,
            "class_valid": has_cluster | (onehot.sum(0) > 0),
            "ready": valid.sum() >= k}


# --- the loss ---------------------------------------------------------------


def positive_indices(f_img: Array, cls_ids: Array, protos: dict[str, Array],
                     mode: str) -> Array:
    """pos_idx of Eq. 4 for every (image, class slot).

    Args:
      f_img: [B, K, d] f_image.
      cls_ids: [B, K] int32, −1 = padded.
      protos: from `recluster` / `init_protos`.
      mode: `cmpa.positive`; "class": the slot's class; "kmeans": the class
        of the cluster with the nearest centroid (the cluster pseudo-label),
        the own class when that cluster is unmatched or before the first
        recluster.

    Returns:
      [B, K] int32 class indices, −1 in padded slots.
    """
    if mode not in POSITIVE_MODES:
        raise ValueError(f"cmpa.positive={mode!r}: choose one of "
                         f"{POSITIVE_MODES}")
    if mode == "class":
        return jnp.where(cls_ids >= 0, cls_ids, -1).astype(jnp.int32)
    b, k, d = f_img.shape
    f = jax.lax.stop_gradient(f_img).reshape(-1, d).astype(jnp.float32)
    nearest = jnp.argmin(_sq_dist(f, protos["centroids"]), -1).reshape(b, k)
    cand = protos["cluster_class"][nearest]
    pos = jnp.where(protos["ready"] & (cand >= 0), cand, cls_ids)
    return jnp.where(cls_ids >= 0, pos, -1).astype(jnp.int32)


def _proto_terms(f_img: Array, slot_valid: Array, prototypes: Array,
                 positives: Array, tau: Array,
                 proto_valid: Array | None) -> tuple[Array, Array, Array]:
    num_protos = prototypes.shape[0]
    if proto_valid is None:
        proto_valid = jnp.ones((num_protos,), bool)
    logits = jnp.einsum("bkd,cd->bkc", f_img.astype(jnp.float32),
                        prototypes.astype(jnp.float32),
                        precision=HIGHEST) / tau
    logits = jnp.where(proto_valid, logits, _NEG)
    safe_pos = jnp.clip(positives, 0, num_protos - 1)
    ok = slot_valid & (positives >= 0) & proto_valid[safe_pos]
    target = jnp.take_along_axis(logits, safe_pos[..., None], -1)[..., 0]
    nll = jax.nn.logsumexp(logits, -1) - target
    n = ok.sum()
    denom = jnp.maximum(n, 1).astype(jnp.float32)
    loss = jnp.where(ok, nll, 0.0).sum() / denom
    hit = jnp.argmax(logits, -1) == safe_pos
    acc = jnp.where(ok, hit, False).sum() / denom
    return loss, acc, n


def proto_loss(f_img: Array, slot_valid: Array, prototypes: Array,
               positives: Array, tau: Array,
               proto_valid: Array | None = None) -> Array:
    """L_proto, the prototype InfoNCE of Eq. 3-6.

    p = f_image · P / τ over the prototypes (Eq. 3); softmax cross-entropy
    against the positive (Eq. 4-6), mean over the valid slots, 0 when there
    are none.

    Args:
      f_img: [B, K, d] f_image.
      slot_valid: [B, K] bool.
      prototypes: [P, d] (P_T or P_I).
      positives: [B, K] int32 index into the prototypes (−1 = skip).
      tau: scalar temperature.
      proto_valid: optional [P] bool; False prototypes leave the softmax and
        slots whose positive is one of them are skipped.

    Returns:
      Scalar loss.
    """
    return _proto_terms(f_img, slot_valid, prototypes, positives, tau,
                        proto_valid)[0]


def _batch_class_means(f_img: Array, cls_ids: Array,
                       num_classes: int) -> tuple[Array, Array]:
    """In-batch image prototypes: [C, d] unit class means, [C] present."""
    onehot = (cls_ids[..., None] == jnp.arange(num_classes)).astype(
        jnp.float32)  # [B, K, C]
    sums = jnp.einsum("bkc,bkd->cd", onehot,
                      jax.lax.stop_gradient(f_img).astype(jnp.float32),
                      precision=HIGHEST)
    return l2_normalize(sums), onehot.sum((0, 1)) > 0


def cmpa_loss(variant: str, f_img: Array, f_text: Array, slot_valid: Array,
              cls_ids: Array, protos: dict[str, Array], tau: Array,
              positive_mode: str = "kmeans",
              extra_negatives: Array | None = None
              ) -> tuple[Array, dict[str, Array]]:
    """The CMPA loss of one Table 4 variant (`cmpa.variant`).

    Args:
      variant: "cross" (SSR, Eq. 3-6 against P_T = f_text) | "intra" (image
        prototypes P_I) | "feature" (direct fine-tuning: in-batch InfoNCE
        against the text features of the batch's classes) | "none".
      f_img: [B, K, d] f_image (Eq. 2).
      f_text: [C, d] TSA of the foreground text bank (live, so TSA learns).
      slot_valid: [B, K] bool.
      cls_ids: [B, K] int32, −1 = padded.
      protos: from `recluster` / `init_protos`.
      tau: scalar temperature (`CMPAHeads.tau()`).
      positive_mode: `cmpa.positive`, for "cross" and "intra".
      extra_negatives: optional [M, d] prototypes appended to the softmax
        as negatives only (never a positive), e.g. TSA of the background
        prompts ([choice] `cmpa.background_negatives`); "cross" and
        "feature" only.

    Returns:
      (loss scalar, {"acc": fraction of valid slots whose highest logit is
       the positive, "tau": τ, "num_valid": number of slots in the loss}).
    """
    if variant not in VARIANTS:
        raise ValueError(f"cmpa.variant={variant!r}: choose one of "
                         f"{VARIANTS}")
    slot_valid = slot_valid & (cls_ids >= 0)
    num_classes = f_text.shape[0]
    if variant == "none":
        zero = jnp.zeros((), jnp.float32)
        return zero, {"acc": zero, "tau": jnp.asarray(tau, jnp.float32),
                      "num_valid": jnp.zeros((), jnp.int32)}
    if variant == "cross":
        prototypes, proto_valid = f_text, None
        positives = positive_indices(f_img, cls_ids, protos, positive_mode)
    elif variant == "intra":
        batch_protos, batch_valid = _batch_class_means(f_img, cls_ids,
                                                       num_classes)
        ready = protos["ready"]
        prototypes = jax.lax.stop_gradient(jnp.where(
            ready, protos["class_centroids"], batch_protos))
        proto_valid = jnp.where(ready, protos["class_valid"], batch_valid)
        positives = positive_indices(f_img, cls_ids, protos, positive_mode)
    else:  # feature
        onehot = cls_ids[..., None] == jnp.arange(num_classes)
        prototypes, proto_valid = f_text, onehot.any((0, 1))
        positives = jnp.where(cls_ids >= 0, cls_ids, -1)
    if extra_negatives is not None:
        if variant == "intra":
            raise ValueError("extra_negatives (cmpa.background_negatives) "
                             "needs cmpa.variant 'cross' or 'feature'")
        m = extra_negatives.shape[0]
        prototypes = jnp.concatenate(
            [prototypes, extra_negatives.astype(prototypes.dtype)])
        if proto_valid is None:
            proto_valid = jnp.ones((num_classes,), bool)
        proto_valid = jnp.concatenate([proto_valid, jnp.ones((m,), bool)])
    loss, acc, n = _proto_terms(f_img, slot_valid, prototypes, positives,
                                tau, proto_valid)
    return loss, {"acc": acc, "tau": jnp.asarray(tau, jnp.float32),
                  "num_valid": n.astype(jnp.int32)}
