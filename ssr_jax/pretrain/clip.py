"""CLIP contrastive pretraining of the tiny CLIP (`models.clip.CLIP`).

Symmetric InfoNCE over the image–caption pairs of the *train* split
(`captions.json`; val images are never read), learnable logit scale clamped
at 100 as CLIP. Images are cropped by the input pipeline's own augmentation
(random rescale, crop or zero pad, flip). [choice] `pretrain.clip.patch_loss`:
the same InfoNCE also on the pooled projected patch tokens; their mean is the
image embedding that CLIP-ES GradCAM differentiates (SPEC §1.4), which a tiny
CLIP trained on the CLS token alone leaves untrained. [choice] identical
captions in a batch are positives of each other.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from ml_collections import config_dict

import ssr_jax.pretrain.training as tr
from ssr_jax import text as text_lib
from ssr_jax.data import synthetic
from ssr_jax.models import loading
from ssr_jax.models.clip import (
    CLIP,
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
)
from ssr_jax.pretrain.augment import clip_crops, normalise
from ssr_jax.pretrain.world import build_tokenizer, read_images, read_json

Array = jax.Array

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps exp(logit_scale) at 100


def clip_model_config(cfg: config_dict.ConfigDict, vocab_size: int,
                      bos_id: int, eos_id: int, pad_id: int) -> CLIPConfig:
    """The tiny CLIP's architecture from `pretrain.clip` and the tokenizer."""
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_width,
        intermediate_size=cfg.vision_width * cfg.mlp_ratio,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size,
        patch_size=cfg.patch_size)
    txt = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_width,
        intermediate_size=cfg.text_width * cfg.mlp_ratio,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.context_length, pad_token_id=pad_id,
        bos_token_id=bos_id, eos_token_id=eos_id)
    return CLIPConfig(vision=vision, text=txt,
                      projection_dim=cfg.projection_dim,
                      logit_scale_init_value=math.log(1 / 0.07))


def contrastive_loss(logits: Array, same: Array) -> Array:
    """Symmetric InfoNCE (CLIP) with multi-positive targets.

    Args:
      logits: [B, B] image i × text j logits (scale × cosine).
      same: [B, B] bool, True where texts i and j are identical (diagonal
        True); each row's target spreads uniformly over its positives.

    Returns:
      Scalar loss, ½ (image→text CE + text→image CE).
    """
    target = same / same.sum(-1, keepdims=True)
    i2t = optax.softmax_cross_entropy(logits, target).mean()
    t2i = optax.softmax_cross_entropy(logits.T, target).mean()
    return 0.5 * (i2t + t2i)


def global_logits(img: Array, txt: Array, scale: Array) -> Array:
    """CLIP logits: scale × cos(image i, text j).

    Args:
      img: [B, E] image embeddings.
      txt: [B, E] text embeddings.
      scale: scalar exp(logit_scale).

    Returns:
      [B, B] float32.
    """
    return scale * tr.l2n(img.astype(jnp.float32)) @ tr.l2n(
        txt.astype(jnp.float32)).T


def patch_logits(patches: Array, txt: Array, scale: Array,
                 temperature: float) -> Array:
    """Text-conditioned pooling of patch tokens (PACL, Mukhoti et al. 2023).

    For image i and text j the image embedding is the average of i's patch
    tokens weighted by softmax_n(cos(patch_n, text_j) / temperature), so a
    caption is matched by the patches that show what it says: the patch
    tokens themselves become aligned with the text, which is what GradCAM
    on the mean patch token reads (SPEC §1.4).

    Args:
      patches: [B, N, E] projected patch tokens.
      txt: [B, E] text embeddings.
      scale: scalar exp(logit_scale).
      temperature: softmax temperature over the patches.

    Returns:
      [B, B] float32 logits, scale × cos(pooled_ij, text_j).
    """
    p = patches.astype(jnp.float32)
    t = tr.l2n(txt.astype(jnp.float32))
    sim = jnp.einsum("bne,ke->bkn", tr.l2n(p), t)
    weights = jax.nn.softmax(sim / temperature, axis=-1)
    pooled = jnp.einsum("bkn,bne->bke", weights, p)
    return scale * jnp.einsum("bke,ke->bk", tr.l2n(pooled), t)


def keep_tokens(x: Array, key: Array, keep: int) -> Array:
    """FLIP token dropping: CLS plus `keep` patch tokens of each image,
    drawn uniformly without replacement, in their original order.

    Args:
      x: [B, 1 + N, D] embedded tokens (positions already added).
      key: PRNG key.
      keep: static number of patch tokens kept, 1 ≤ keep ≤ N.

    Returns:
      [B, 1 + keep, D].
    """
    b, t, _ = x.shape
    scores = jax.random.uniform(key, (b, t - 1))
    idx = jnp.sort(jnp.argsort(scores, axis=1)[:, :keep], axis=1) + 1
    idx = jnp.concatenate([jnp.zeros((b, 1), idx.dtype), idx], axis=1)
    return jnp.take_along_axis(x, idx[:, :, None], axis=1)


def clip_loss(model: CLIP, pixels: Array, ids: Array, key: Array,
              patch_weight: float, patch_pool: str = "mean",
              pool_temperature: float = 0.1, token_keep: float = 1.0,
              ) -> tuple[Array, dict[str, Array]]:
    """CLIP loss of a batch: InfoNCE of the CLS embedding, plus
    `patch_weight` × InfoNCE of the pooled projected patch tokens.

    Args:
      model: the CLIP.
      pixels: [B, H, W, 3] normalised.
      ids: [B, L] token ids.
      key: PRNG key (token dropping).
      patch_weight: weight of the patch term (0 = plain CLIP).
      patch_pool: "mean" (the embedding GradCAM reads) or "pacl"
        (`patch_logits`).
      pool_temperature: PACL's softmax temperature.
      token_keep: share of patch tokens the image tower sees (FLIP,
        Li et al. 2023: dropping half of them halves the cost per image).

    Returns:
      (loss, {"cls": ..., "patch": ..., "scale": ...}).
    """
    vision = model.vision
    x = vision.embed(pixels)
    n = x.shape[1] - 1
    keep = max(1, min(n, round(token_keep * n)))
    if keep < n:
        x = keep_tokens(x, key, keep)
    x, _ = vision.run_blocks(x)
    tokens = vision.project(x)
    txt = model.encode_text(ids)
    scale = jnp.exp(model.logit_scale[...].astype(jnp.float32))
    same = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
    l_cls = contrastive_loss(global_logits(tokens[:, 0], txt, scale), same)
    if patch_pool == "pacl":
        logits = patch_logits(tokens[:, 1:], txt, scale, pool_temperature)
    elif patch_pool == "mean":
        logits = global_logits(tokens[:, 1:].mean(1), txt, scale)
    else:
        raise ValueError(f"pretrain.clip.patch_pool={patch_pool!r}: choose "
                         "'mean' or 'pacl'")
    l_patch = contrastive_loss(logits, same)
    loss = (l_cls + patch_weight * l_patch) / (1.0 + patch_weight)
    return loss, {"cls": l_cls, "patch": l_patch, "scale": scale}


@dataclasses.dataclass
class ClipData:
    """The CLIP training set: train images and their tokenized captions."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    ids: np.ndarray  # int32 [N, captions, L]


def load_clip_data(root: str, tokenizer: text_lib.TextTokenizer,
                   context_length: int) -> ClipData:
    """Train images and captions (`captions.json` holds no val id)."""
    names = synthetic.read_split(root, "train")
    caps = read_json(os.path.join(root, "captions.json"))
    missing = [n for n in names if n not in caps]
    if missing:
        raise ValueError(f"{len(missing)} train images have no caption in "
                         f"{root}/captions.json (e.g. {missing[0]}); "
                         "regenerate the world")
    per = min(len(caps[n]) for n in names)
    flat = [c for n in names for c in caps[n][:per]]
    ids = text_lib.tokenize(tokenizer, flat, context_length)
    return ClipData(read_images(root, names),
                    ids.reshape(len(names), per, context_length))


@tr.memoised
def make_clip_step(graphdef: nnx.GraphDef, cfg: config_dict.ConfigDict,
                   ) -> tuple[optax.GradientTransformation, Callable]:
    """(tx, the jitted CLIP train step): step(state, crops uint8
    [B, S, S, 3], ids [B, L], key) → (state, measurements); state =
    {"params", "opt"} (donated), opt = tx.init(params)."""
    tx = tr.adamw(cfg)

    def loss_fn(params, pixels, ids, key):
        model = nnx.merge(graphdef, params)
        return clip_loss(model, pixels, ids, key, cfg.patch_loss,
                         cfg.patch_pool, cfg.pool_temperature,
                         cfg.token_keep)

    def step(state, crops, ids, key):
        pixels = normalise(crops.astype(jnp.float32), cfg.normalization)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], pixels, ids, key)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0,
                                         MAX_LOGIT_SCALE)
        return {"params": params, "opt": opt}, {"loss": loss, **aux}

    return tx, jax.jit(step, donate_argnums=(0,))


def train_clip(config: config_dict.ConfigDict, root: str,
               tokenizer_dir: str, progress: bool = True,
               ) -> tuple[CLIP, dict[str, Any]]:
    """Trains the tiny CLIP on the world's train images and captions.

    Args:
      config: the synthetic config (`pretrain.seed`, `pretrain.clip`).
      root: the world.
      tokenizer_dir: a directory holding the word tokenizer
        (`build_tokenizer`).
      progress: tqdm bar.

    Returns:
      (model, info) with info: steps, first/final_loss (mean of the
      first/last 10 steps), logit_scale, seconds (wall), cpu_seconds (user
      + system of this process), setup_and_compile_seconds ([wall, CPU]
      until the first step ended).
    """
    cfg = config.pretrain.clip
    start, cpu0 = time.perf_counter(), tr.cpu_seconds()
    tok = text_lib.load_tokenizer(tokenizer_dir)
    vocab = tok.backend.get_vocab()
    data = load_clip_data(root, tok, cfg.context_length)
    mcfg = clip_model_config(cfg, len(vocab), vocab[text_lib.BOS],
                             vocab[text_lib.EOS], tok.pad_id)
    seed = config.pretrain.seed

    def make():
        model = CLIP(mcfg, rngs=nnx.Rngs(seed))
        if cfg.tied_qk_scale > 0:
            tr.tie_query_key(model.vision.blocks, cfg.tied_qk_scale)
        return model

    graphdef, params = tr.build(make)
    tx, step_fn = make_clip_step(graphdef, cfg)
    state = {"params": params, "opt": tx.init(params)}
    rng = np.random.default_rng([seed, 1])
    key = jax.random.key(seed)
    losses = []
    batches = tr.epoch_batches(rng, len(data.images), cfg.batch_size, cfg.steps)
    bar = tr.progress_bar(batches, cfg.steps, "pretrain CLIP", progress)
    for i, idx in enumerate(bar):
        crops = clip_crops(data.images[idx], rng, cfg.image_size,
                           cfg.rescale_range, cfg.hflip)
        pick = rng.integers(0, data.ids.shape[1], size=len(idx))
        state, m = step_fn(state, crops, data.ids[idx, pick],
                           jax.random.fold_in(key, i))
        losses.append(m["loss"])
        if i == 0:
            first = tr.first_step_seconds(m, start, cpu0)
        if progress and (i % 10 == 0 or i == cfg.steps - 1):
            bar.set_postfix(loss=f"{float(m['loss']):.3f}",
                            scale=f"{float(m['scale']):.1f}")
    losses = tr.check_losses(losses, "pretrain.clip")
    model = nnx.merge(graphdef, state["params"])
    info = {"steps": cfg.steps, "final_loss": float(losses[-10:].mean()),
            "first_loss": float(losses[:10].mean()),
            "setup_and_compile_seconds": first,
            "logit_scale": float(jnp.exp(model.logit_scale[...])),
            "seconds": time.perf_counter() - start,
            "cpu_seconds": tr.cpu_seconds() - cpu0}
    logging.info("CLIP pretrained: %d steps in %.1f s wall (%.1f s CPU), "
                 "loss %.3f -> %.3f, logit scale %.1f", cfg.steps,
                 info["seconds"], info["cpu_seconds"], info["first_loss"],
                 info["final_loss"], info["logit_scale"])
    return model, info


def pretrain_clip(config: config_dict.ConfigDict, root: str, out_dir: str,
                  progress: bool = True) -> dict[str, Any]:
    """Builds the tokenizer, trains the tiny CLIP (`train_clip`) and writes
    the HF snapshot to `out_dir`: config.json, model.safetensors and the
    tokenizer files (vocab.json, merges.txt, tokenizer.json, ...). Returns
    `train_clip`'s info."""
    build_tokenizer(root, out_dir, config.pretrain.clip.context_length)
    model, info = train_clip(config, root, out_dir, progress)
    loading.save_clip(model, out_dir)
    return info
