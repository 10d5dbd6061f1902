"""Training helpers shared by the CLIP and DINO pretraining: schedule,
AdamW, mimetic query/key initialisation, one-call model init, memoised
steps, batching, progress and loss checks."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import config_dict
from tqdm import tqdm

from ssr_jax.models.normalize import l2_normalize

Array = jax.Array
PyTree = Any


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


def memoised(builder: Callable) -> Callable:
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


# L2 normalisation with the epsilon the tiny encoders were trained with.
l2n = functools.partial(l2_normalize, eps=1e-12)


def epoch_batches(rng: np.random.Generator, n: int, batch: int, steps: int):
    """Yields `steps` index arrays [batch]: epochs of a seeded permutation
    (a batch may span two epochs), so every image is seen equally often."""
    order = np.empty(0, np.int64)
    for _ in range(steps):
        while order.size < batch:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:batch]
        order = order[batch:]


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    return tqdm(iterable, total=total, desc=desc, disable=not enabled,
                dynamic_ncols=True, mininterval=1.0)


def first_step_seconds(measurements: dict[str, Array], start: float,
                cpu_start: float) -> list[float]:
    """[wall, CPU] seconds from the start to the end of the first step
    (data loading, model init and XLA compilation)."""
    jax.block_until_ready(measurements)
    return [time.perf_counter() - start, cpu_seconds() - cpu_start]


def check_losses(losses: Sequence[Any], section: str) -> np.ndarray:
    """float64 [steps]; FloatingPointError naming the first bad step."""
    losses = np.asarray(jax.device_get(list(losses)), np.float64)
    if not np.all(np.isfinite(losses)):
        bad = int(np.argmax(~np.isfinite(losses)))
        raise FloatingPointError(f"{section} pretraining diverged at step "
                                 f"{bad}: lower {section}.lr")
    return losses


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system
