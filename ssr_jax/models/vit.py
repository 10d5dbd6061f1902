"""DINO ViT (facebook/dino-vits16) in Flax NNX, Hugging Face `ViTModel` layout.

SPEC.md §6: SGC fuses the head-averaged last-block attention of a frozen DINO
ViT-S/16. A `ViTLayer` computes exactly a pre-LN `CLIPBlock` (with exact GELU
and `qkv_bias`), so the blocks are reused; `loading.py` maps HF's
`encoder.layer.N.attention.attention.query` etc. onto them.

Position embeddings follow HF `interpolate_pos_encoding=True` (transformers
5.24): the pretrained √n×√n grid is resized with bicubic (a = −0.75,
align_corners=False) to `size=(H // p, W // p)`. HF skips the resize when the
grid already matches; a same-size bicubic resize is the identity, so always
resizing is the same function. The pooler is not built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ssr_jax.models.clip import (
    LayerNorm,
    Out,
    check_act,
    make_blocks,
    normal_init,
    patch_grid,
    pick_fields,
    resize_grid,
    run_blocks,
    square_size,
)
from ssr_jax.models.layout import TokenLayout

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Defaults are `transformers.ViTConfig`'s."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True

    def __post_init__(self):
        check_act(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}")

    @property
    def grid(self) -> int:
        """Side of the pretrained square position grid."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> ViTConfig:
        """From a HF `config.json` dict (missing keys take HF's defaults)."""
        d = dict(d)
        for key in ("image_size", "patch_size"):
            if key in d:
                d[key] = square_size(d[key], key)
        return cls(**pick_fields(cls, d))

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that `transformers.ViTModel` accepts."""
        return {"architectures": ["ViTModel"], "model_type": "vit",
                **dataclasses.asdict(self)}


def init_stem(module: nnx.Module, config: Any, dtype: Any,
              rngs: nnx.Rngs) -> None:
    """Sets the stem HF's `ViTModel` and `Dinov2Model` share on `module`,
    initialised in this order: `patch_embedding` (p×p conv with bias),
    `cls_token` [1, 1, D] and `position_embeddings` [1, 1 + n, D] (HF
    shapes, kept as stored; n = `config.grid`²)."""
    d, p = config.hidden_size, config.patch_size
    module.patch_embedding = nnx.Conv(
        config.num_channels, d, (p, p), strides=(p, p), padding="VALID",
        use_bias=True, dtype=dtype, param_dtype=dtype, rngs=rngs)
    module.cls_token = nnx.Param(normal_init(rngs, (1, 1, d), dtype))
    module.position_embeddings = nnx.Param(
        normal_init(rngs, (1, config.grid ** 2 + 1, d), dtype))


def embed_patches(module: nnx.Module, pixels: Array,
                  patch_mask: Array | None = None,
                  mask_token: Array | None = None,
                  ) -> tuple[Array, tuple[int, int]]:
    """The stem of `init_stem` on pixels [B, H, W, C] → ([CLS, patches]
    [B, 1 + h·w, D] without positions, (h, w) = (H // p, W // p)).

    With `patch_mask` (bool [B, h·w]) the masked patches' embeddings are
    replaced by `mask_token` ([D]) before the positions are added, as HF's
    `bool_masked_pos` (masked-patch pretraining, e.g. iBOT)."""
    h, w = patch_grid(pixels, module.config.patch_size)
    dtype = module.cls_token.dtype
    x = module.patch_embedding(pixels.astype(dtype))
    b, d = x.shape[0], x.shape[-1]
    x = x.reshape(b, h * w, d)
    if patch_mask is not None:
        if mask_token is None:
            raise ValueError("patch_mask needs a mask_token")
        x = jnp.where(patch_mask[..., None],
                      jnp.asarray(mask_token, dtype).reshape(1, 1, d), x)
    cls = jnp.broadcast_to(module.cls_token[...], (b, 1, d))
    return jnp.concatenate([cls, x], axis=1), (h, w)


class ViT(nnx.Module):
    """ViT encoder: patch conv (with bias), CLS, bicubic-resized positions,
    pre-LN blocks, final LayerNorm."""

    def __init__(self, config: ViTConfig, *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        d = config.hidden_size
        self.config = config
        init_stem(self, config, dtype, rngs)
        self.blocks = make_blocks(config, dtype, rngs,
                                  qkv_bias=config.qkv_bias)
        self.layernorm = LayerNorm(d, config.layer_norm_eps, dtype=dtype)

    @property
    def layout(self) -> TokenLayout:
        """[CLS, patches] (see `layout.py`)."""
        return TokenLayout(1, self.config.patch_size)

    def embed(self, pixels: Array, patch_mask: Array | None = None,
              mask_token: Array | None = None) -> Array:
        """pixels [B, H, W, C] float, normalised → x [B, 1 + h·w, D] with
        (h, w) = (H // p, W // p) and bicubic-resized positions (masked
        patches as in `embed_patches`)."""
        x, (h, w) = embed_patches(self, pixels, patch_mask, mask_token)
        pos = self.position_embeddings[0]
        grid = resize_grid(pos[1:], self.config.grid, (h, w), "bicubic")
        return x + jnp.concatenate([pos[:1], grid], axis=0)[None]

    def __call__(self, pixels: Array) -> tuple[Array, Out]:
        """pixels [B, H, W, C] → (tokens [B, T, D] after the final
        LayerNorm, out) with out["hidden"] (each block's output, before the
        final LayerNorm), out["attn"] (each block's head-mean attention
        [B, T, T], float32) and out["grid"] = (h, w)."""
        x, out = run_blocks(self.blocks, self.embed(pixels))
        out["grid"] = patch_grid(pixels, self.config.patch_size)
        return self.layernorm(x), out

