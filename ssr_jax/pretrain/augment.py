"""Pretraining augmentation: SSR's training crops for CLIP, DINO's
multi-crop and colour jitter (`normalise`: `models.normalize`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict
from PIL import Image

from ssr_jax.data import transforms
from ssr_jax.models.normalize import normalise

__all__ = ["clip_crops", "colour_jitter", "multi_crops", "normalise",
           "resized_crop"]

Array = jax.Array


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
