"""Pretrains the tiny CLIP and DINO ViT of the embedded default (SPEC §5).

Real CLIP and DINO weights cannot be downloaded where the embedded default
runs, so the project pretrains its own tiny encoders on the synthetic world
(docs/synthetic_world.md) and saves them as Hugging Face snapshots that the
very loaders of the real checkpoints read (`models.loading`). The choices
and the measured diagnostics are in docs/pretrain.md.

- **CLIP** (`models.clip.CLIP`, image and text towers): symmetric InfoNCE
  over the image–caption pairs of the *train* split (`captions.json`; val
  images are never read), learnable logit scale clamped at 100 as CLIP.
  Images are cropped by the input pipeline's own augmentation (random
  rescale, crop or zero pad, flip). [choice] `pretrain.clip.patch_loss`:
  the same InfoNCE also on the pooled projected patch tokens; their mean
  is the image embedding that CLIP-ES GradCAM differentiates (SPEC §1.4),
  which a tiny CLIP trained on the CLS token alone leaves untrained.
  [choice] identical captions in a batch are positives of each other.
- **DINO** (`models.vit.ViT`, HF `ViTModel` layout): self-distillation
  without labels (Caron et al. 2021): a momentum (EMA) teacher, multi-crop
  (2 global + several local crops), a projection head (MLP → L2 norm →
  weight-normalised prototypes), teacher centering and sharpening. The
  teacher backbone is saved.
- [choice] Both start from tied query/key weights (`tie_query_key`), so
  that their attention groups similar patches from the first step.

`ensure_encoders` caches each snapshot under a hash of (its config
section, the world's `world.json`, `PRETRAIN_VERSION`); an entry is
written to a temporary directory and renamed into place, so an
interrupted run never leaves a snapshot that looks complete.

Everything is deterministic given `pretrain.seed` and the world.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from ml_collections import config_dict
from PIL import Image
from tqdm import tqdm

from ssr_jax import config_check
from ssr_jax import text as text_lib
from ssr_jax.data import synthetic, transforms
from ssr_jax.models import loading
from ssr_jax.models.clip import (
    CLIP,
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
)
from ssr_jax.models.vit import ViT, ViTConfig

Array = jax.Array
PyTree = Any

# Bump when a change to this file changes the weights it produces.
PRETRAIN_VERSION = 1
INFO_FILE = "pretrain.json"  # written last: marks a complete cache entry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps exp(logit_scale) at 100


# --- paths ------------------------------------------------------------------


def _cache_base() -> str:
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")


def world_root(config: config_dict.ConfigDict) -> str:
    """`synthetic.root`, or by default a directory named by the world's
    parameters under `$XDG_CACHE_HOME/ssr_jax/synthetic` (~/.cache), so
    that worlds of different sizes (full, smoke) never replace each other."""
    w = config.synthetic
    if w.root:
        return os.path.abspath(os.path.expanduser(w.root))
    tag = (f"seed{w.seed}-train{w.num_train}-val{w.num_val}-"
           f"px{w.image_size}")
    return os.path.join(_cache_base(), "ssr_jax", "synthetic", tag)


def encoder_cache_dir(config: config_dict.ConfigDict) -> str:
    """`pretrain.cache_dir`, default `$XDG_CACHE_HOME/ssr_jax/encoders`."""
    if config.pretrain.cache_dir:
        return os.path.abspath(os.path.expanduser(config.pretrain.cache_dir))
    return os.path.join(_cache_base(), "ssr_jax", "encoders")


def ensure_world(config: config_dict.ConfigDict) -> str:
    """Generates the synthetic world of `config.synthetic` if needed
    (idempotent, atomic: `data.synthetic.generate`); returns its root."""
    w = config.synthetic
    root = world_root(config)
    info = synthetic.generate(root, seed=w.seed, num_train=w.num_train,
                              num_val=w.num_val, image_size=w.image_size,
                              progress=bool(config.pretrain.progress))
    if info["generated"]:
        logging.info("synthetic world written to %s in %.1f s", root,
                     info["seconds"])
    return root


# --- world data -------------------------------------------------------------


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def world_identity(root: str) -> dict[str, Any]:
    """The world's `world.json` version, parameters and file digest."""
    path = os.path.join(root, "world.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {root!r} is not a complete synthetic world; "
            "generate it with ssr_jax.data.synthetic.generate (or "
            "pretrain.ensure_world)")
    w = _read_json(path)
    return {"version": w["version"], "params": w["params"],
            "digest": w["digest"]}


def read_images(root: str, names: Sequence[str]) -> np.ndarray:
    """uint8 [N, H, W, 3] of `JPEGImages/<name>.jpg` (all the same size)."""
    images = []
    for n in names:
        with Image.open(os.path.join(root, "JPEGImages", f"{n}.jpg")) as im:
            images.append(np.asarray(im.convert("RGB")))
    return np.stack(images)


def tokenizer_words(root: str) -> list[str]:
    """Words for `text.build_word_tokenizer`: the world's vocabulary, the
    prompt template's words and every class and background prompt."""
    c = _read_json(os.path.join(root, text_lib.SYNTHETIC_CLASSES_FILE))
    template = c.get("template", text_lib.TEMPLATE).replace("{}", " ")
    return (list(c["vocabulary"]) + [template] + list(c["prompts"])
            + list(c["background_prompts"]))


def build_tokenizer(root: str, out_dir: str, context_length: int) -> str:
    """Writes the world's word tokenizer into `out_dir` (a CLIP snapshot);
    `model_max_length` is the tiny CLIP's context length, so that
    `transformers.CLIPTokenizer` pads to what the model accepts."""
    text_lib.build_word_tokenizer(tokenizer_words(root), out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    cfg = _read_json(path)
    cfg["model_max_length"] = int(context_length)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


# --- augmentation ---------------------------------------------------------


def normalise(x: Array, kind: str) -> Array:
    """Pixels in [0, 255] [..., 3] → mean/std normalised ("clip" or
    "imagenet" statistics)."""
    mean, std = ((CLIP_MEAN, CLIP_STD) if kind == "clip"
                 else (IMAGENET_MEAN, IMAGENET_STD))
    return (x / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)


def clip_crops(images: np.ndarray, rng: np.random.Generator, size: int,
               scale_range: tuple[float, float], hflip: bool) -> np.ndarray:
    """SSR's training crops (SPEC §1.11), by the input pipeline's own code
    (`data.transforms`): rescale by r ~ U(scale_range) with PIL bilinear,
    flip, `size`² crop or zero pad.

    Args:
      images: uint8 [B, H, W, 3].
      rng: NumPy generator.
      size: crop side.
      scale_range: (low, high) rescale ratio.
      hflip: random horizontal flip.

    Returns:
      uint8 [B, size, size, 3].
    """
    return np.stack([transforms.augment_image(im, transforms.sample_augment(
        rng, im.shape[:2], size, tuple(scale_range), hflip)) for im in images])


def resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                 area_range: tuple[float, float],
                 ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
                 ) -> np.ndarray:
    """torchvision `RandomResizedCrop` + flip, DINO's multi-crop.

    A box of area a·H·W (a ~ U(area_range)) and aspect ratio log-uniform in
    `ratio_range` (clipped to the image), at a uniform position, resized
    to `size`² with PIL bilinear, flipped with probability ½.

    Args:
      image: uint8 [H, W, 3].
      rng: NumPy generator.
      size: output side.
      area_range: (low, high) share of the image area.
      ratio_range: (low, high) width / height.

    Returns:
      uint8 [size, size, 3].
    """
    h, w = image.shape[:2]
    area = rng.uniform(*area_range) * h * w
    ratio = math.exp(rng.uniform(math.log(ratio_range[0]),
                                 math.log(ratio_range[1])))
    cw = min(max(math.sqrt(area * ratio), 1.0), w)
    ch = min(max(math.sqrt(area / ratio), 1.0), h)
    x0 = rng.uniform() * (w - cw)
    y0 = rng.uniform() * (h - ch)
    out = np.asarray(Image.fromarray(image).resize(
        (size, size), resample=Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)))
    return out[:, ::-1] if rng.uniform() < 0.5 else out


def multi_crops(images: np.ndarray, rng: np.random.Generator,
                cfg: config_dict.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """DINO's 2 global and `num_local` local crops of every image.

    Returns:
      (global uint8 [2, B, G, G, 3], local uint8 [num_local, B, L, L, 3]).
    """
    def crops(n, size, area):
        return np.stack([np.stack([resized_crop(im, rng, size, tuple(area))
                                   for im in images]) for _ in range(n)])
    return (crops(2, cfg.global_size, cfg.global_scale),
            crops(cfg.num_local, cfg.local_size, cfg.local_scale))


def colour_jitter(image: Array, key: Array, strength: float,
                  jitter_prob: float, gray_prob: float) -> Array:
    """DINO's photometric augmentation without hue: with `jitter_prob`,
    brightness, contrast and saturation factors in 1 ± strength; then
    grayscale with `gray_prob`.

    Args:
      image: [H, W, 3] float in [0, 255].
      key: PRNG key.
      strength, jitter_prob, gray_prob: as above.

    Returns:
      [H, W, 3] float in [0, 255].
    """
    kj, kb, kc, ks, kg = jax.random.split(key, 5)
    weights = jnp.asarray((0.299, 0.587, 0.114))

    def factor(k):
        return jax.random.uniform(k, (), minval=1 - strength,
                                  maxval=1 + strength)

    x = jnp.clip(image * factor(kb), 0, 255)
    mean = (x @ weights).mean()
    x = jnp.clip((x - mean) * factor(kc) + mean, 0, 255)
    gray = (x @ weights)[..., None]
    x = jnp.clip(gray + (x - gray) * factor(ks), 0, 255)
    out = jnp.where(jax.random.bernoulli(kj, jitter_prob), x, image)
    gray = jnp.broadcast_to((out @ weights)[..., None], out.shape)
    return jnp.where(jax.random.bernoulli(kg, gray_prob), gray, out)


# --- training helpers -------------------------------------------------


def lr_schedule(peak: float, steps: int, warmup: int,
                final_ratio: float = 0.0) -> optax.Schedule:
    """Linear warmup to `peak`, then cosine decay to `final_ratio`·peak."""
    warmup = max(0, min(warmup, steps - 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(steps, warmup + 1), peak * final_ratio)


def tie_query_key(blocks: Sequence[nnx.Module], scale: float) -> None:
    """Sets W_k = W_q = scale·W_q in every attention block, in place.

    The query–key half of mimetic initialisation (Trockman & Kolter 2023,
    "Mimetic initialization of self-attention layers"): with W_q W_kᵀ
    positive semi-definite, attention starts as feature similarity
    (tokens attend to tokens that look alike), the structure attention
    has in pretrained ViTs, instead of uniform; it speeds up training of
    ViTs on small data sets. Only the initial values change, not the
    architecture.

    Args:
      blocks: `CLIPBlock`s (CLIP vision tower or ViT).
      scale: multiplies W_q; larger values make the initial attention
        sharper (logits grow as scale²).
    """
    for block in blocks:
        attn = block.self_attn
        w = attn.q_proj.kernel[...] * scale
        attn.q_proj.kernel.set_value(w)
        attn.k_proj.kernel.set_value(jnp.array(w))  # its own buffer


def _decay_mask(params: PyTree) -> PyTree:
    """Weight decay on matrices only (kernels, prototypes); none on biases,
    LayerNorms, embeddings, position tables or the logit scale (CLIP)."""
    def keep(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        return leaf.ndim >= 2 and name in ("kernel", "prototypes")
    return jax.tree_util.tree_map_with_path(keep, params)


def adamw(cfg: config_dict.ConfigDict) -> optax.GradientTransformation:
    """Optional global-norm clipping, then AdamW with `lr_schedule`."""
    schedule = lr_schedule(cfg.lr, cfg.steps, cfg.warmup_steps,
                           cfg.final_lr_ratio)
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=0.9, b2=cfg.b2,
                             weight_decay=cfg.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts)


def build(make: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, parameters as a pure dict) of the module `make()` builds,
    initialised in one jitted call (built eagerly, every initialiser op of
    a model compiles on its own: seconds even for a tiny one). The call
    runs once, so XLA's backend optimisation is turned off: it would
    double the compile time and save nothing."""
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())),
                   compiler_options={"xla_backend_optimization_level": 0})
    return graphdef, init()


def _memoised(builder: Callable) -> Callable:
    """`builder(graphdef, cfg, *args)` cached on (graphdef, cfg's values,
    args), so that equal models and configs share one jitted step (and its
    compilation) within a process."""
    @functools.lru_cache(maxsize=8)
    def cached(graphdef, cfg_json, *args):
        return builder(graphdef, config_dict.ConfigDict(json.loads(cfg_json)),
                       *args)

    @functools.wraps(builder)
    def wrapper(graphdef, cfg, *args):
        return cached(graphdef, json.dumps(cfg.to_dict(), sort_keys=True),
                      *args)
    return wrapper


def _l2n(x: Array) -> Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True),
                                         1e-12))


def _batches(rng: np.random.Generator, n: int, batch: int, steps: int):
    """Yields `steps` index arrays [batch]: epochs of a seeded permutation
    (a batch may span two epochs), so every image is seen equally often."""
    order = np.empty(0, np.int64)
    for _ in range(steps):
        while order.size < batch:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:batch]
        order = order[batch:]


def _progress(iterable, total: int, desc: str, enabled: bool):
    return tqdm(iterable, total=total, desc=desc, disable=not enabled,
                dynamic_ncols=True, mininterval=1.0)


def _first_step(measurements: dict[str, Array], start: float,
                cpu_start: float) -> list[float]:
    """[wall, CPU] seconds from the start to the end of the first step
    (data loading, model init and XLA compilation)."""
    jax.block_until_ready(measurements)
    return [time.perf_counter() - start, _cpu_seconds() - cpu_start]


def _check_losses(losses: Sequence[Any], section: str) -> np.ndarray:
    """float64 [steps]; FloatingPointError naming the first bad step."""
    losses = np.asarray(jax.device_get(list(losses)), np.float64)
    if not np.all(np.isfinite(losses)):
        bad = int(np.argmax(~np.isfinite(losses)))
        raise FloatingPointError(f"{section} pretraining diverged at step "
                                 f"{bad}: lower {section}.lr")
    return losses


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# --- CLIP -------------------------------------------------------------------


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
    return scale * _l2n(img.astype(jnp.float32)) @ _l2n(
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
    t = _l2n(txt.astype(jnp.float32))
    sim = jnp.einsum("bne,ke->bkn", _l2n(p), t)
    weights = jax.nn.softmax(sim / temperature, axis=-1)
    pooled = jnp.einsum("bkn,bne->bke", weights, p)
    return scale * jnp.einsum("bke,ke->bk", _l2n(pooled), t)


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
    caps = _read_json(os.path.join(root, "captions.json"))
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


@_memoised
def make_clip_step(graphdef: nnx.GraphDef, cfg: config_dict.ConfigDict,
                   ) -> tuple[optax.GradientTransformation, Callable]:
    """(tx, the jitted CLIP train step): step(state, crops uint8
    [B, S, S, 3], ids [B, L], key) → (state, measurements); state =
    {"params", "opt"} (donated), opt = tx.init(params)."""
    tx = adamw(cfg)

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
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    tok = text_lib.load_tokenizer(tokenizer_dir)
    vocab = tok.backend.get_vocab()
    data = load_clip_data(root, tok, cfg.context_length)
    mcfg = clip_model_config(cfg, len(vocab), vocab[text_lib.BOS],
                             vocab[text_lib.EOS], tok.pad_id)
    seed = config.pretrain.seed

    def make():
        model = CLIP(mcfg, rngs=nnx.Rngs(seed))
        if cfg.tied_qk_scale > 0:
            tie_query_key(model.vision.blocks, cfg.tied_qk_scale)
        return model

    graphdef, params = build(make)
    tx, step_fn = make_clip_step(graphdef, cfg)
    state = {"params": params, "opt": tx.init(params)}
    rng = np.random.default_rng([seed, 1])
    key = jax.random.key(seed)
    losses = []
    batches = _batches(rng, len(data.images), cfg.batch_size, cfg.steps)
    bar = _progress(batches, cfg.steps, "pretrain CLIP", progress)
    for i, idx in enumerate(bar):
        crops = clip_crops(data.images[idx], rng, cfg.image_size,
                           cfg.rescale_range, cfg.hflip)
        pick = rng.integers(0, data.ids.shape[1], size=len(idx))
        state, m = step_fn(state, crops, data.ids[idx, pick],
                           jax.random.fold_in(key, i))
        losses.append(m["loss"])
        if i == 0:
            first = _first_step(m, start, cpu0)
        if progress and (i % 10 == 0 or i == cfg.steps - 1):
            bar.set_postfix(loss=f"{float(m['loss']):.3f}",
                            scale=f"{float(m['scale']):.1f}")
    losses = _check_losses(losses, "pretrain.clip")
    model = nnx.merge(graphdef, state["params"])
    info = {"steps": cfg.steps, "final_loss": float(losses[-10:].mean()),
            "first_loss": float(losses[:10].mean()),
            "setup_and_compile_seconds": first,
            "logit_scale": float(jnp.exp(model.logit_scale[...])),
            "seconds": time.perf_counter() - start,
            "cpu_seconds": _cpu_seconds() - cpu0}
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


# --- DINO -------------------------------------------------------------------


def dino_model_config(cfg: config_dict.ConfigDict,
                      image_size: int) -> ViTConfig:
    """The tiny DINO ViT's architecture from `pretrain.dino`."""
    return ViTConfig(hidden_size=cfg.width, num_hidden_layers=cfg.layers,
                     num_attention_heads=cfg.heads,
                     intermediate_size=cfg.width * cfg.mlp_ratio,
                     layer_norm_eps=1e-6, image_size=image_size,
                     patch_size=cfg.patch_size)


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
        x = _l2n(self.fc3(x))
        w = self.prototypes[...]
        w = w * jax.lax.rsqrt(jnp.sum(w * w, axis=0, keepdims=True))
        return x @ w


class DINO(nnx.Module):
    """Backbone + head; `__call__(pixels [B, H, W, 3]) → [B, K]` from the
    CLS token after the final LayerNorm."""

    def __init__(self, vit_config: ViTConfig, cfg: config_dict.ConfigDict,
                 *, rngs: nnx.Rngs):
        self.backbone = ViT(vit_config, rngs=rngs)
        self.head = DINOHead(vit_config.hidden_size, cfg.head_hidden,
                             cfg.head_bottleneck, cfg.num_prototypes,
                             rngs=rngs)

    def __call__(self, pixels: Array) -> Array:
        tokens, _ = self.backbone(pixels)
        return self.head(tokens[:, 0])


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


@_memoised
def make_dino_step(graphdef: nnx.GraphDef, cfg: config_dict.ConfigDict,
                   steps_per_epoch: float,
                   ) -> tuple[optax.GradientTransformation, Callable]:
    """(tx, the jitted DINO step): step(state, global crops uint8
    [2, B, G, G, 3], local crops uint8 [V, B, L, L, 3], key) → (state,
    measurements); state = {"student", "teacher", "opt", "center", "step"}
    (donated), opt = tx.init(student). `steps_per_epoch` converts DINO's
    epoch-based schedules to steps."""
    tx = adamw(cfg)
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

    def forward(params, crops):
        """crops [V, B, S, S, 3] → logits [V, B, K]."""
        model = nnx.merge(graphdef, params)
        v, b = crops.shape[:2]
        return model(crops.reshape((v * b,) + crops.shape[2:])).reshape(
            v, b, -1)

    def step(state, glob, loc, key):
        kg, kl = jax.random.split(key)
        glob, loc = photometric(glob, kg), photometric(loc, kl)
        t_g = jax.lax.stop_gradient(forward(state["teacher"], glob))
        temp = t_temp(state["step"])

        def loss_fn(params):
            student = (list(forward(params, glob))
                       + list(forward(params, loc)))
            return dino_loss(student, list(t_g), state["center"],
                             cfg.student_temp, temp)

        loss, grads = jax.value_and_grad(loss_fn)(state["student"])
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
        return new, {
            "loss": loss, "teacher_temp": temp,
            "teacher_entropy": -jnp.sum(
                probs * jnp.log(probs + 1e-12), -1).mean(),
            "teacher_mean_entropy": -jnp.sum(used * jnp.log(used + 1e-12)),
        }

    return tx, jax.jit(step, donate_argnums=(0,))


def train_dino(config: config_dict.ConfigDict, root: str,
               progress: bool = True) -> tuple[ViT, dict[str, Any]]:
    """Trains the tiny DINO ViT on the world's train images (no labels, no
    captions).

    Returns:
      (teacher backbone, info) with info as `train_clip`'s, plus
      teacher_entropy and teacher_mean_entropy of the last step instead of
      the logit scale (a collapse monitor: the per-image entropy should
      stay well below the entropy of the batch-mean distribution, which
      should stay high).
    """
    cfg = config.pretrain.dino
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    images = read_images(root, synthetic.read_split(root, "train"))
    seed = config.pretrain.seed

    def make():
        model = DINO(dino_model_config(cfg, cfg.global_size), cfg,
                     rngs=nnx.Rngs(seed + 1))
        if cfg.tied_qk_scale > 0:
            tie_query_key(model.backbone.blocks, cfg.tied_qk_scale)
        return model

    graphdef, params = build(make)
    tx, step_fn = make_dino_step(graphdef, cfg, len(images) / cfg.batch_size)
    state = {"student": params, "teacher": jax.tree.map(jnp.copy, params),
             "opt": tx.init(params),
             "center": jnp.zeros((cfg.num_prototypes,), jnp.float32),
             "step": jnp.zeros((), jnp.int32)}
    rng = np.random.default_rng([seed, 2])
    key = jax.random.key(seed + 1)
    history = []
    batches = _batches(rng, len(images), cfg.batch_size, cfg.steps)
    bar = _progress(batches, cfg.steps, "pretrain DINO", progress)
    for i, idx in enumerate(bar):
        glob, loc = multi_crops(images[idx], rng, cfg)
        state, m = step_fn(state, glob, loc, jax.random.fold_in(key, i))
        history.append(m)
        if i == 0:
            first = _first_step(m, start, cpu0)
        if progress and (i % 10 == 0 or i == cfg.steps - 1):
            bar.set_postfix(loss=f"{float(m['loss']):.3f}",
                            H=f"{float(m['teacher_entropy']):.2f}")
    history = jax.device_get(history)
    losses = _check_losses([h["loss"] for h in history], "pretrain.dino")
    model = nnx.merge(graphdef, state["teacher"])
    last = history[-1]
    info = {"steps": cfg.steps, "final_loss": float(losses[-10:].mean()),
            "first_loss": float(losses[:10].mean()),
            "setup_and_compile_seconds": first,
            "teacher_entropy": float(last["teacher_entropy"]),
            "teacher_mean_entropy": float(last["teacher_mean_entropy"]),
            "seconds": time.perf_counter() - start,
            "cpu_seconds": _cpu_seconds() - cpu0}
    logging.info("DINO pretrained: %d steps in %.1f s wall (%.1f s CPU), "
                 "loss %.3f -> %.3f, teacher entropy %.2f (batch mean "
                 "%.2f)", cfg.steps, info["seconds"], info["cpu_seconds"],
                 info["first_loss"], info["final_loss"],
                 info["teacher_entropy"], info["teacher_mean_entropy"])
    return model.backbone, info


def pretrain_dino(config: config_dict.ConfigDict, root: str, out_dir: str,
                  progress: bool = True) -> dict[str, Any]:
    """Trains the tiny DINO ViT (`train_dino`) and writes the teacher
    backbone to `out_dir` as a HF `ViTModel` snapshot; returns the info."""
    backbone, info = train_dino(config, root, progress)
    loading.save_dino(backbone, out_dir)
    return info


# --- config -----------------------------------------------------------------


def validate(config: config_dict.ConfigDict) -> list[str]:
    """Problems with `config.pretrain` (empty when it is good).

    Both encoders must cut images into the same token grid as SSR reads
    (patch 16, `config_check.PATCH`): SGC fuses their affinities patch by
    patch.
    """
    e: list[str] = []
    k, d = config.pretrain.clip, config.pretrain.dino
    for name, value in (("clip.patch_size", k.patch_size),
                        ("dino.patch_size", d.patch_size)):
        if value != config_check.PATCH:
            e.append(f"pretrain.{name}={value}: must be "
                     f"{config_check.PATCH}, the patch of SSR's token grid")
    for name, value, patch in (
            ("clip.image_size", k.image_size, k.patch_size),
            ("dino.global_size", d.global_size, d.patch_size),
            ("dino.local_size", d.local_size, d.patch_size)):
        if value < patch or value % patch:
            e.append(f"pretrain.{name}={value}: must be a positive "
                     f"multiple of the patch size {patch}")
    for sec, name, heads in (("clip", "vision_width", k.vision_heads),
                             ("clip", "text_width", k.text_heads),
                             ("dino", "width", d.heads)):
        width = config.pretrain[sec][name]
        if heads < 1 or width % heads:
            e.append(f"pretrain.{sec}.{name}={width} is not a multiple of "
                     f"its {heads} attention heads")
    for sec in ("clip", "dino"):
        c = config.pretrain[sec]
        for name in ("steps", "batch_size", "lr"):
            if not c[name] > 0:
                e.append(f"pretrain.{sec}.{name}={c[name]}: must be > 0")
    lo, hi = k.rescale_range
    if not 0 < lo <= hi:
        e.append(f"pretrain.clip.rescale_range={tuple(k.rescale_range)}: "
                 "need 0 < low <= high")
    for name in ("global_scale", "local_scale"):
        lo, hi = d[name]
        if not 0 < lo <= hi <= 1:
            e.append(f"pretrain.dino.{name}={tuple(d[name])}: need "
                     "0 < low <= high <= 1 (shares of the image area)")
    if not 0 < k.token_keep <= 1:
        e.append(f"pretrain.clip.token_keep={k.token_keep}: must lie in "
                 "(0, 1]")
    if k.patch_pool not in ("mean", "pacl"):
        e.append(f"pretrain.clip.patch_pool={k.patch_pool!r}: choose "
                 "'mean' or 'pacl'")
    if k.normalization not in ("clip", "imagenet"):
        e.append(f"pretrain.clip.normalization={k.normalization!r}: choose "
                 "'clip' or 'imagenet'")
    if k.context_length < 3:
        e.append(f"pretrain.clip.context_length={k.context_length}: needs "
                 "room for BOS, a word and EOS")
    return e


# --- cache ------------------------------------------------------------------


def cache_key(config: config_dict.ConfigDict, kind: str, root: str) -> str:
    """sha256 (first 20 hex) of what determines the `kind` snapshot: its
    `pretrain.<kind>` section (architecture and training), `pretrain.seed`,
    the world's identity and `PRETRAIN_VERSION`."""
    if kind not in ("clip", "dino"):
        raise ValueError(f"kind={kind!r}: choose 'clip' or 'dino'")
    payload = {"kind": kind, "version": PRETRAIN_VERSION,
               "seed": config.pretrain.seed,
               "config": config.pretrain[kind].to_dict(),
               "world": world_identity(root)}
    blob = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def is_complete(path: str, key: str) -> bool:
    """A cache entry is complete when its `pretrain.json` (written last)
    names `key` and the snapshot files are present."""
    try:
        info = _read_json(os.path.join(path, INFO_FILE))
    except (OSError, ValueError):
        return False
    return (info.get("key") == key
            and os.path.isfile(os.path.join(path, loading.CONFIG))
            and os.path.isfile(os.path.join(path, loading.WEIGHTS)))


def _cached(kind: str, train_fn: Callable[[str], dict[str, Any]], key: str,
            cache_dir: str) -> str:
    """The complete entry `<cache_dir>/<kind>-<key>`, trained by
    `train_fn(tmp_dir)` into a temporary sibling and renamed into place if
    absent."""
    final = os.path.join(cache_dir, f"{kind}-{key}")
    if is_complete(final, key):
        logging.info("reusing cached %s encoder %s", kind, final)
        return final
    os.makedirs(cache_dir, exist_ok=True)
    tmp = os.path.join(cache_dir, f".{kind}-{key}.tmp-{socket.gethostname()}"
                       f"-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        info = train_fn(tmp)
        info.update(kind=kind, key=key)
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        if os.path.isdir(final) and not is_complete(final, key):
            shutil.rmtree(final)  # a leftover that is not a complete entry
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final, key):  # else: another process won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_encoders(config: config_dict.ConfigDict, root: str,
                    cache_dir: str | None = None) -> tuple[str, str]:
    """(clip_path, dino_path): HF snapshot directories of the tiny encoders
    for the world at `root`, pretrained on a cache miss.

    Each encoder is cached on its own key (`cache_key`), so a change to the
    CLIP section does not retrain DINO. `cache_dir` defaults to
    `encoder_cache_dir(config)`.
    """
    problems = validate(config)
    if problems:
        raise ValueError("bad pretraining config:\n  "
                         + "\n  ".join(problems))
    cache_dir = cache_dir or encoder_cache_dir(config)
    progress = bool(config.pretrain.progress)
    clip_path = _cached(
        "clip", lambda d: pretrain_clip(config, root, d, progress),
        cache_key(config, "clip", root), cache_dir)
    dino_path = _cached(
        "dino", lambda d: pretrain_dino(config, root, d, progress),
        cache_key(config, "dino", root), cache_dir)
    return clip_path, dino_path
