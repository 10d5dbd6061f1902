"""Builders below both loops: encoders, model, text bank, mesh, checks.

What `train`, `evaluate`, the embedded default, the pretrain report and
the benchmarks share, so that none of them imports another
(docs/DESIGN.md "Layers"):

- `make_mesh(devices)`: the 1-D "data" mesh (every device by default).
- `build_models(config)`: the frozen CLIP, the affinity encoder
  (`model.dino_kind`, loaded by `models.encoders.load_affinity_encoder`)
  and the trainable `ssr.SSRModel`.
- `check_models(config, clip, dino)`: config fields that depend on the
  loaded encoders, as one `ConfigError`.
- `build_text_bank(config, clip, workdir)`: the fg/bg text bank (cached).
- `split_model` / `merge_model`: the `SSRModel` as (graphdef, params,
  rest), params = the `nnx.Param` leaves the optimiser updates.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssr_jax import config_check, ssr, text
from ssr_jax.models import encoders, loading


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D "data" mesh over `devices` (default: all, every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


def split_model(model: nnx.Module):
    """(graphdef, params, rest): the `nnx.Param` leaves and everything else
    (BatchNorm statistics, dropout counters)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def merge_model(graphdef, params, rest) -> nnx.Module:
    """The inverse of `split_model`."""
    return nnx.merge(graphdef, params, rest)


def model_dtype(config):
    """`model.dtype` as a JAX dtype (float32 or bfloat16)."""
    return jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32


def load_affinity_encoder(config, dtype=None):
    """The affinity encoder of `model.dino_kind` at `model.dino_path`
    (`models.encoders.load_affinity_encoder`); the model carries its
    `layout`."""
    dtype = model_dtype(config) if dtype is None else dtype
    dino, _ = encoders.load_affinity_encoder(
        config.model.dino_kind, config.model.dino_path, dtype=dtype)
    return dino


def build_models(config, *, with_dino: bool = True):
    """Loads the frozen encoders and builds the trainable model.

    Args:
      with_dino: False skips loading the affinity encoder (evaluating the
        decoder needs only CLIP).

    Returns:
      (clip, dino, model): NNX modules; dino is None when unused
      (`sgc.use_dino_attn` off, or `with_dino=False`).
    """
    dtype = model_dtype(config)
    clip = loading.load_clip(config.model.clip_path, dtype=dtype)
    dino = None
    if with_dino and config.sgc.use_dino_attn:
        dino = load_affinity_encoder(config, dtype)
    model = ssr.SSRModel(
        config, clip_width=clip.vision.config.hidden_size,
        embed_dim=clip.config.projection_dim,
        rngs=nnx.Rngs(params=config.seed))
    return clip, dino, model


def check_models(config, clip, dino, *, pseudo_labels: bool = True) -> None:
    """Config fields that depend on the loaded encoders (clear errors).

    `pseudo_labels=False` (eval: decoder only) skips the fields that only
    the pseudo-label path reads (crop size, sgc.clip_layers,
    sgc.dino_layers, RFM). The affinity encoder's patch grid may differ
    from CLIP's (`encoders.patch_affinity` resamples it); only its depth is
    checked.
    """
    v = clip.vision.config
    problems = []
    depth = None if dino is None else dino.config.num_hidden_layers
    n = config.sgc.get("dino_layers", 1)
    if pseudo_labels and depth is not None and not 1 <= n <= depth:
        problems.append(f"sgc.dino_layers={n}: the affinity encoder has "
                        f"{depth} blocks")
    if pseudo_labels and config.data.crop_size % v.patch_size:
        problems.append(f"data.crop_size={config.data.crop_size} is not a "
                        f"multiple of the CLIP patch size {v.patch_size}")
    if pseudo_labels and not 1 <= config.sgc.clip_layers <= \
            v.num_hidden_layers:
        problems.append(f"sgc.clip_layers={config.sgc.clip_layers}: CLIP "
                        f"has {v.num_hidden_layers} blocks")
    if not 1 <= config.model.decoder.num_layers_in < v.num_hidden_layers:
        problems.append(
            f"model.decoder.num_layers_in={config.model.decoder.num_layers_in}"
            f": must be in [1, {v.num_hidden_layers - 1}] (blocks before the "
            "last, which GradCAM uses)")
    if pseudo_labels and config.loss.rfm and not 1 <= \
            config.loss.rfm_layers <= \
            v.num_hidden_layers:
        problems.append(f"loss.rfm_layers={config.loss.rfm_layers}: CLIP "
                        f"has {v.num_hidden_layers} blocks")
    if problems:
        raise config_check.ConfigError(
            "the config does not fit the encoders:\n  - "
            + "\n  - ".join(problems))


def build_text_bank(config, clip, workdir: str) -> dict[str, np.ndarray]:
    """The foreground / background text bank, embedded once (SPEC 1.2)."""
    if clip.text is None:
        raise ValueError(
            "build_text_bank: this CLIP's text tower was dropped "
            "(CLIP.drop_text_tower, done by train.setup once its bank is "
            "built); use Setup.bank, or load CLIP again with "
            "build.build_models / loading.load_clip")
    fg, bg, _ = text.dataset_prompts(config.data.name, config.data.root)
    tokenizer = text.load_tokenizer(config.model.clip_path)
    graphdef, state = nnx.split(clip.text)
    encode = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids)[0])
    context = min(text.CONTEXT_LENGTH,
                  clip.config.text.max_position_embeddings)

    def compute():
        return text.build_text_bank(
            lambda ids: np.asarray(encode(state, ids), np.float32),
            tokenizer, fg, bg, config.text.template, context_length=context)

    if not config.text.cache:
        return compute()
    weights = os.path.join(config.model.clip_path, "model.safetensors")
    if not os.path.exists(weights):
        weights = weights + ".index.json"
    key = text.text_bank_key(weights, fg, bg, config.text.template,
                             tokenizer=tokenizer, context_length=context)
    return text.cached_text_bank(f"{workdir}/text_bank.npz", key, compute)
