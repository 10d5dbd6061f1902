"""Pixel and embedding normalisations shared by the encoders, the method and
the pretraining (a leaf: jax only).

- `normalise`: pixels in [0, 255] → mean/std normalised with the statistics
  an encoder was trained with ("imagenet": DINO, DINOv2; "clip": CLIP).
- `l2_normalize`: x / ||x|| along an axis, 0 for a zero vector, with finite
  gradients everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
STATS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
         "clip": (CLIP_MEAN, CLIP_STD)}


def normalise(image: Array, kind: str = "imagenet") -> Array:
    """Pixels in [0, 255] [..., 3] (uint8 or float) → float32, mean/std
    normalised with the `kind` statistics ("imagenet" or "clip";
    SPEC 1.11)."""
    if kind not in STATS:
        raise ValueError(f"normalization {kind!r}: choose one of "
                         f"{sorted(STATS)}")
    mean, std = STATS[kind]
    x = image.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean)) / jnp.asarray(std)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-24) -> Array:
    """x / ||x|| along `axis`: x · rsqrt(max(Σx², eps)), so a zero vector
    gives 0 and the gradient stays finite."""
    return x * jax.lax.rsqrt(
        jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))
