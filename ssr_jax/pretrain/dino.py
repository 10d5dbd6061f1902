"""DINO self-distillation pretraining of the tiny affinity encoder of
`model.dino_kind`: a DINO ViT (`models.vit.ViT`, HF `ViTModel` layout) or a
DINOv2 (`models.dinov2.Dinov2`, HF `Dinov2Model` layout, or
`Dinov2WithRegistersModel` with `pretrain.dino.registers` > 0).

Self-distillation without labels (Caron et al. 2021): a momentum (EMA)
teacher, multi-crop (2 global + several local crops), a projection head (MLP
→ L2 norm → weight-normalised prototypes), teacher centering and sharpening.
The teacher backbone is saved. Both kinds train with this same DINO
objective on the CLS token, optionally with iBOT's masked-patch loss
(`pretrain.dino.ibot_weight` > 0; Zhou et al. 2022, also DINOv2's patch
objective): the student sees the global crops with block-masked patches
(a learned mask token in place of their embeddings) and predicts, at each
masked patch, the teacher's prototype distribution of the unmasked patch
(own centre, same temperatures, the CLS head shared). [choice] KoLeo and
Sinkhorn-Knopp centering (DINOv2's other additions) are not built; what
the `dinov2` kind exercises is the architecture (LayerScale, registers,
patch 14, bicubic position resizing) and its HF snapshot, read back
through the encoder seam (`models.encoders`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from ml_collections import config_dict

import ssr_jax.pretrain.training as tr
from ssr_jax.data import synthetic
from ssr_jax.models import loading
from ssr_jax.models.clip import run_blocks
from ssr_jax.models.dinov2 import Dinov2, Dinov2Config
from ssr_jax.models.vit import ViT, ViTConfig
from ssr_jax.pretrain.augment import colour_jitter, multi_crops, normalise
from ssr_jax.pretrain.world import read_images

Array = jax.Array
KINDS = ("dino", "dinov2")  # = models.encoders.KINDS (model.dino_kind)
# `pretrain.dino` fields of the iBOT masked-patch loss and their defaults
# (absent = default). With ibot_weight 0 they are left out of the cache key
# (`key_section`), so adding them changed no existing snapshot's key.
IBOT_FIELDS = {
    "ibot_weight": 0.0,  # weight of the patch loss (iBOT: 1); 0 = DINO only
    "mask_prob": 0.5,  # share of global crops masked (iBOT 0.5)
    "mask_ratio": (0.1, 0.5),  # masked share of a crop's patches, uniform
    "mask_min_patches": 4,  # smallest masked block (BEiT/iBOT 16 of 14x14)
}


def ibot_cfg(cfg: config_dict.ConfigDict) -> dict[str, Any]:
    """The iBOT fields of `pretrain.dino`, defaults filled in."""
    return {k: cfg.get(k, v) for k, v in IBOT_FIELDS.items()}


def key_section(section: dict[str, Any]) -> dict[str, Any]:
    """`pretrain.dino` as the cache key sees it: without the iBOT fields
    when the patch loss is off (they change nothing then), with all of them
    (defaults filled in) when it is on."""
    section = dict(section)
    if not section.get("ibot_weight", 0.0):
        for name in IBOT_FIELDS:
            section.pop(name, None)
        return section
    return {**IBOT_FIELDS, **section}


def block_masks(rng: np.random.Generator, n: int, grid: tuple[int, int],
                prob: float, ratio: Sequence[float], min_patches: int,
                ) -> np.ndarray:
    """iBOT's masks: bool [n, h·w]. Each of the n crops is masked with
    probability `prob`; a masked crop gets a share r ~ U(ratio) of its
    patches covered by random rectangles (BEiT's block-wise generator:
    area ≥ `min_patches`, aspect ratio log-uniform in [0.3, 1/0.3]), added
    until r·h·w patches are covered or no rectangle fits."""
    h, w = grid
    out = np.zeros((n, h, w), bool)
    lo_ar, hi_ar = np.log(0.3), np.log(1 / 0.3)
    for i in range(n):
        if rng.random() >= prob:
            continue
        target = int(round(rng.uniform(*ratio) * h * w))
        m, count = out[i], 0
        while count < target:
            room, placed = target - count, False
            for _ in range(10):
                area = rng.uniform(min(min_patches, room), room)
                ar = np.exp(rng.uniform(lo_ar, hi_ar))
                bh = int(round(np.sqrt(area * ar)))
                bw = int(round(np.sqrt(area / ar)))
                if not (0 < bh <= h and 0 < bw <= w):
                    continue
                top = rng.integers(0, h - bh + 1)
                left = rng.integers(0, w - bw + 1)
                new = bh * bw - int(m[top:top + bh, left:left + bw].sum())
                if 0 < new <= room:
                    m[top:top + bh, left:left + bw] = True
                    count += new
                    placed = True
                    break
            if not placed:
                break
    return out.reshape(n, h * w)


def affinity_kind(config: config_dict.ConfigDict) -> str:
    """`model.dino_kind`: which affinity encoder the pretraining builds."""
    return config.model.get("dino_kind", "dino")


def dino_model_config(cfg: config_dict.ConfigDict,
                      image_size: int) -> ViTConfig:
    """The tiny DINO ViT's architecture from `pretrain.dino`."""
    return ViTConfig(hidden_size=cfg.width, num_hidden_layers=cfg.layers,
                     num_attention_heads=cfg.heads,
                     intermediate_size=cfg.width * cfg.mlp_ratio,
                     layer_norm_eps=1e-6, image_size=image_size,
                     patch_size=cfg.patch_size)


def dinov2_model_config(cfg: config_dict.ConfigDict,
                        image_size: int) -> Dinov2Config:
    """The tiny DINOv2's architecture from `pretrain.dino`: HF
    `Dinov2Model` or, with `registers` > 0, `Dinov2WithRegistersModel`.
    [choice] LayerScale starts at HF's default 1.0 (the DINOv2 recipe's
    1e-5 is for 12+ blocks trained for 100+ epochs; the tiny run lasts a
    few epochs) and the FFN is the plain MLP (SwiGLU is ViT-g's)."""
    registers = int(cfg.get("registers", 0))
    return Dinov2Config(
        hidden_size=cfg.width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
        layer_norm_eps=1e-6, image_size=image_size,
        patch_size=cfg.patch_size, num_register_tokens=registers,
        model_type="dinov2_with_registers" if registers else "dinov2")


def backbone_config(kind: str, cfg: config_dict.ConfigDict,
                    image_size: int) -> ViTConfig | Dinov2Config:
    """The affinity encoder's architecture of `kind` from `pretrain.dino`."""
    if kind not in KINDS:
        raise ValueError(f"model.dino_kind={kind!r}: choose one of "
                         f"{', '.join(KINDS)}")
    make = dino_model_config if kind == "dino" else dinov2_model_config
    return make(cfg, image_size)


class DINOHead(nnx.Module):
    """DINO projection head: 3-layer MLP (GELU) → L2 norm → weight-normalised
    linear to the prototypes (norm_last_layer=True: unit columns)."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int,
                 num_prototypes: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(in_dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.fc3 = nnx.Linear(hidden, bottleneck, rngs=rngs)
        self.prototypes = nnx.Param(0.02 * jax.random.truncated_normal(
            rngs.params(), -2.0, 2.0, (bottleneck, num_prototypes)))

    def __call__(self, x: Array) -> Array:
        """x [B, D] → logits [B, num_prototypes]."""
        x = jax.nn.gelu(self.fc1(x), approximate=False)
        x = jax.nn.gelu(self.fc2(x), approximate=False)
        x = tr.l2n(self.fc3(x))
        w = self.prototypes[...]
        w = w * jax.lax.rsqrt(jnp.sum(w * w, axis=0, keepdims=True))
        return x @ w


class DINO(nnx.Module):
    """Backbone (a `ViT` for a `ViTConfig`, a `Dinov2` for a
    `Dinov2Config`) + head; `__call__(pixels [B, H, W, 3]) → [B, K]` from
    the CLS token after the final LayerNorm."""

    def __init__(self, vit_config: ViTConfig | Dinov2Config,
                 cfg: config_dict.ConfigDict, *, rngs: nnx.Rngs):
        self.backbone = (Dinov2(vit_config, rngs=rngs)
                         if isinstance(vit_config, Dinov2Config)
                         else ViT(vit_config, rngs=rngs))
        self.head = DINOHead(vit_config.hidden_size, cfg.head_hidden,
                             cfg.head_bottleneck, cfg.num_prototypes,
                             rngs=rngs)
        # iBOT's mask token (zeros, as iBOT); training only, not saved.
        self.mask_token = (nnx.Param(jnp.zeros((vit_config.hidden_size,)))
                           if ibot_cfg(cfg)["ibot_weight"] else None)

    def __call__(self, pixels: Array) -> Array:
        tokens, _ = self.backbone(pixels)
        return self.head(tokens[:, 0])

    def logits(self, pixels: Array, patch_mask: Array | None = None,
               ) -> tuple[Array, Array]:
        """pixels [B, H, W, 3] (patches masked where `patch_mask` [B, h·w]
        is True) → (CLS logits [B, K], patch logits [B, h·w, K]), the one
        head shared (iBOT's shared head)."""
        bb = self.backbone
        token = None if patch_mask is None else self.mask_token[...]
        x, _ = run_blocks(bb.blocks, bb.embed(pixels, patch_mask, token))
        x = bb.layernorm(x)
        return (self.head(x[:, 0]),
                self.head(x[:, bb.layout.patch_start:]))


def dino_loss(student: Sequence[Array], teacher: Sequence[Array],
              center: Array, student_temp: float,
              teacher_temp: Array) -> Array:
    """DINO cross-entropy H(P_t, P_s) over every (teacher crop, other
    student crop) pair, averaged over pairs and images.

    Args:
      student: V arrays [B, K], student logits of every crop (the global
        crops first, in the teacher's order).
      teacher: G arrays [B, K], teacher logits of the global crops.
      center: [K] teacher centre.
      student_temp: τ_s (0.1).
      teacher_temp: τ_t (scalar, warmed up).

    Returns:
      Scalar loss.
    """
    t_probs = [jax.nn.softmax((t - center) / teacher_temp, axis=-1)
               for t in teacher]
    s_logp = [jax.nn.log_softmax(s / student_temp, axis=-1)
              for s in student]
    total, pairs = 0.0, 0
    for i, t in enumerate(t_probs):
        for j, s in enumerate(s_logp):
            if i == j:
                continue
            total = total + jnp.mean(-jnp.sum(t * s, axis=-1))
            pairs += 1
    return total / pairs


def ibot_patch_loss(student: Array, teacher: Array, masks: Array,
                    center: Array, student_temp: float,
                    teacher_temp: Array) -> Array:
    """iBOT's masked-patch cross-entropy: at every masked patch of a global
    crop, H(P_t, P_s) between the teacher's (unmasked crop, centred,
    sharpened) and the student's (masked crop) prototype distributions;
    per crop the mean over its masked patches (crops with none count 0),
    then the mean over crops.

    Args:
      student: [G, B, N, K] student patch logits (masked crops).
      teacher: [G, B, N, K] teacher patch logits (the same crops unmasked).
      masks: bool [G, B, N].
      center: [K] the teacher's patch centre.
      student_temp, teacher_temp: as `dino_loss`.
    """
    t = jax.nn.softmax((teacher - center) / teacher_temp, axis=-1)
    s = jax.nn.log_softmax(student / student_temp, axis=-1)
    ce = -jnp.sum(t * s, axis=-1)  # [G, B, N]
    m = masks.astype(ce.dtype)
    per_crop = jnp.sum(ce * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)
    return jnp.mean(per_crop)


def momentum_schedule(base: float, steps: int) -> Callable[[Array], Array]:
    """Teacher EMA momentum, cosine from `base` to 1 (DINO)."""
    def fn(step):
        t = step / max(steps - 1, 1)
        return 1.0 - (1.0 - base) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    return fn


def teacher_temp_schedule(cfg: config_dict.ConfigDict,
                          steps_per_epoch: float,
                          ) -> Callable[[Array], Array]:
    """τ_t warmed up linearly from `warmup_teacher_temp` to `teacher_temp`
    over `teacher_temp_warmup_epochs`, then constant (DINO)."""
    warmup = max(cfg.teacher_temp_warmup_epochs * steps_per_epoch, 1.0)

    def fn(step):
        t = jnp.clip(step / warmup, 0.0, 1.0)
        return (cfg.warmup_teacher_temp
                + t * (cfg.teacher_temp - cfg.warmup_teacher_temp))
    return fn


@tr.memoised
def make_dino_step(graphdef: nnx.GraphDef, cfg: config_dict.ConfigDict,
                   steps_per_epoch: float,
                   ) -> tuple[optax.GradientTransformation, Callable]:
    """(tx, the jitted DINO step): step(state, global crops uint8
    [2, B, G, G, 3], local crops uint8 [V, B, L, L, 3], key) → (state,
    measurements); state = {"student", "teacher", "opt", "center", "step"}
    (donated), opt = tx.init(student). `steps_per_epoch` converts DINO's
    epoch-based schedules to steps."""
    tx = tr.adamw(cfg)
    momentum = momentum_schedule(cfg.teacher_momentum, cfg.steps)
    t_temp = teacher_temp_schedule(cfg, steps_per_epoch)
    freeze = cfg.freeze_prototypes_epochs * steps_per_epoch

    def photometric(x, key):
        """Colour jitter per crop, then ImageNet normalisation (DINO)."""
        keys = jax.random.split(key, x.shape[0] * x.shape[1]).reshape(
            x.shape[:2])
        x = jax.vmap(jax.vmap(lambda im, k: colour_jitter(
            im, k, cfg.jitter_strength, cfg.jitter_prob,
            cfg.gray_prob)))(x.astype(jnp.float32), keys)
        return normalise(x, "imagenet")

    ibot_w = ibot_cfg(cfg)["ibot_weight"]

    def forward(params, crops):
        """crops [V, B, S, S, 3] → logits [V, B, K]."""
        model = nnx.merge(graphdef, params)
        v, b = crops.shape[:2]
        return model(crops.reshape((v * b,) + crops.shape[2:])).reshape(
            v, b, -1)

    def forward_patches(params, crops, masks):
        """crops [V, B, S, S, 3], masks bool [V, B, N] or None → (CLS
        logits [V, B, K], patch logits [V, B, N, K])."""
        model = nnx.merge(graphdef, params)
        v, b = crops.shape[:2]
        flat = None if masks is None else masks.reshape(v * b, -1)
        c, p = model.logits(crops.reshape((v * b,) + crops.shape[2:]), flat)
        return c.reshape(v, b, -1), p.reshape((v, b) + p.shape[1:])

    def step(state, glob, loc, key, masks=None):
        kg, kl = jax.random.split(key)
        glob, loc = photometric(glob, kg), photometric(loc, kl)
        temp = t_temp(state["step"])
        if ibot_w:
            t_g, t_p = jax.lax.stop_gradient(
                forward_patches(state["teacher"], glob, None))
        else:
            t_g = jax.lax.stop_gradient(forward(state["teacher"], glob))

        def loss_fn(params):
            if not ibot_w:
                student = (list(forward(params, glob))
                           + list(forward(params, loc)))
                loss = dino_loss(student, list(t_g), state["center"],
                                 cfg.student_temp, temp)
                return loss, (loss, jnp.zeros(()))
            s_g, s_p = forward_patches(params, glob, masks)
            cls = dino_loss(list(s_g) + list(forward(params, loc)),
                            list(t_g), state["center"], cfg.student_temp,
                            temp)
            patch = ibot_patch_loss(s_p, t_p, masks, state["center_patch"],
                                    cfg.student_temp, temp)
            return cls + ibot_w * patch, (cls, patch)

        (loss, (cls_loss, patch_loss)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state["student"])
        frozen = state["step"] < freeze
        grads["head"]["prototypes"] = jnp.where(
            frozen, 0.0, grads["head"]["prototypes"])
        updates, opt = tx.update(grads, state["opt"], state["student"])
        student = optax.apply_updates(state["student"], updates)
        m = momentum(state["step"])
        teacher = jax.tree.map(lambda t, s: m * t + (1 - m) * s,
                               state["teacher"], student)
        center = (cfg.center_momentum * state["center"]
                  + (1 - cfg.center_momentum) * t_g.mean(axis=(0, 1)))
        probs = jax.nn.softmax((t_g - state["center"]) / temp, -1)
        used = jnp.mean(probs, axis=(0, 1))
        new = {"student": student, "teacher": teacher, "opt": opt,
               "center": center, "step": state["step"] + 1}
        if ibot_w:
            new["center_patch"] = (
                cfg.center_momentum * state["center_patch"]
                + (1 - cfg.center_momentum) * t_p.mean(axis=(0, 1, 2)))
        return new, {
            "loss": loss, "cls_loss": cls_loss, "patch_loss": patch_loss,
            "teacher_temp": temp,
            "teacher_entropy": -jnp.sum(
                probs * jnp.log(probs + 1e-12), -1).mean(),
            "teacher_mean_entropy": -jnp.sum(used * jnp.log(used + 1e-12)),
        }

    return tx, jax.jit(step, donate_argnums=(0,))


def train_dino(config: config_dict.ConfigDict, root: str,
               progress: bool = True) -> tuple[ViT | Dinov2, dict[str, Any]]:
    """Trains the tiny affinity encoder of `model.dino_kind` (DINO ViT or
    DINOv2) on the world's train images (no labels, no captions).

    Returns:
      (teacher backbone, info) with info as `train_clip`'s, plus
      teacher_entropy and teacher_mean_entropy of the last step instead of
      the logit scale (a collapse monitor: the per-image entropy should
      stay well below the entropy of the batch-mean distribution, which
      should stay high).
    """
    cfg = config.pretrain.dino
    kind = affinity_kind(config)
    start, cpu0 = time.perf_counter(), tr.cpu_seconds()
    images = read_images(root, synthetic.read_split(root, "train"))
    seed = config.pretrain.seed

    def make():
        model = DINO(backbone_config(kind, cfg, cfg.global_size), cfg,
                     rngs=nnx.Rngs(seed + 1))
        if cfg.tied_qk_scale > 0:
            tr.tie_query_key(model.backbone.blocks, cfg.tied_qk_scale)
        return model

    graphdef, params = tr.build(make)
    tx, step_fn = make_dino_step(graphdef, cfg, len(images) / cfg.batch_size)
    state = {"student": params, "teacher": jax.tree.map(jnp.copy, params),
             "opt": tx.init(params),
             "center": jnp.zeros((cfg.num_prototypes,), jnp.float32),
             "step": jnp.zeros((), jnp.int32)}
    ibot_fields = ibot_cfg(cfg)
    if ibot_fields["ibot_weight"]:
        state["center_patch"] = jnp.zeros_like(state["center"])
        grid = (cfg.global_size // cfg.patch_size,) * 2
    rng = np.random.default_rng([seed, 2])
    key = jax.random.key(seed + 1)
    history = []
    batches = tr.epoch_batches(rng, len(images), cfg.batch_size, cfg.steps)
    name = {"dino": "DINO", "dinov2": "DINOv2"}[kind]
    bar = tr.progress_bar(batches, cfg.steps, f"pretrain {name}", progress)
    for i, idx in enumerate(bar):
        glob, loc = multi_crops(images[idx], rng, cfg)
        masks = None
        # drawn after the crops: DINO's random stream is kept
        if ibot_fields["ibot_weight"]:
            masks = block_masks(
                rng, 2 * len(idx), grid, ibot_fields["mask_prob"],
                ibot_fields["mask_ratio"], ibot_fields["mask_min_patches"],
            ).reshape(2, len(idx), -1)
        state, m = step_fn(state, glob, loc, jax.random.fold_in(key, i),
                           masks)
        history.append(m)
        if i == 0:
            first = tr.first_step_seconds(m, start, cpu0)
        if progress and (i % 10 == 0 or i == cfg.steps - 1):
            bar.set_postfix(loss=f"{float(m['loss']):.3f}",
                            H=f"{float(m['teacher_entropy']):.2f}")
    history = jax.device_get(history)
    losses = tr.check_losses([h["loss"] for h in history], "pretrain.dino")
    model = nnx.merge(graphdef, state["teacher"])
    last = history[-1]
    info = {"steps": cfg.steps, "final_loss": float(losses[-10:].mean()),
            "first_loss": float(losses[:10].mean()),
            "setup_and_compile_seconds": first,
            "teacher_entropy": float(last["teacher_entropy"]),
            "teacher_mean_entropy": float(last["teacher_mean_entropy"]),
            "seconds": time.perf_counter() - start,
            "cpu_seconds": tr.cpu_seconds() - cpu0}
    if ibot_fields["ibot_weight"]:
        info["final_patch_loss"] = float(np.mean(
            [h["patch_loss"] for h in history[-10:]]))
        info["final_cls_loss"] = float(np.mean(
            [h["cls_loss"] for h in history[-10:]]))
    logging.info("%s pretrained: %d steps in %.1f s wall (%.1f s CPU), "
                 "loss %.3f -> %.3f, teacher entropy %.2f (batch mean "
                 "%.2f)", name, cfg.steps, info["seconds"],
                 info["cpu_seconds"], info["first_loss"], info["final_loss"],
                 info["teacher_entropy"], info["teacher_mean_entropy"])
    return model.backbone, info


def pretrain_dino(config: config_dict.ConfigDict, root: str, out_dir: str,
                  progress: bool = True) -> dict[str, Any]:
    """Trains the tiny affinity encoder (`train_dino`) and writes the
    teacher backbone to `out_dir` as a HF snapshot of its kind (`ViTModel`,
    `Dinov2Model` or `Dinov2WithRegistersModel`) that
    `models.encoders.load_affinity_encoder(model.dino_kind, out_dir)`
    reads; returns the info."""
    backbone, info = train_dino(config, root, progress)
    save_backbone(backbone, out_dir)
    return info


def save_backbone(backbone: ViT | Dinov2, out_dir: str) -> None:
    """Writes a trained backbone as the HF snapshot of its kind:
    `ViTModel` (DINO ViT), `Dinov2Model` or `Dinov2WithRegistersModel`."""
    if isinstance(backbone, Dinov2):
        loading.save_dinov2(backbone, out_dir)
    else:
        loading.save_dino(backbone, out_dir)
