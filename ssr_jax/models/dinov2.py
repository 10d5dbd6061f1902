"""DINOv2 (facebook/dinov2-*, with or without registers) in Flax NNX,
Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` layout.

The affinity branch can use DINOv2 in place of DINO ViT/16 (WeCLIP+'s
stronger prior; `encoders.load_affinity_encoder("dinov2", …)`). The output
contract is `vit.ViT`'s: `(tokens after the final LayerNorm, out)` with
out["hidden"] (each block's output), out["attn"] (each block's head-mean
attention [B, T, T], float32) and out["grid"] = (H // 14, W // 14).

Architecture (transformers 5.24, inference):

- tokens [CLS, registers…, patches] (`layout`); registers are added after
  the position embeddings and carry none;
- position embeddings: the pretrained √n×√n grid is resized with bicubic
  (a = −0.75, align_corners=False) to `size=(H // p, W // p)` — HF
  `Dinov2Embeddings.interpolate_pos_encoding`, `antialias=False` — or, for
  `model_type="dinov2_with_registers"`, with **antialias=True** (PyTorch's
  anti-aliased bicubic, a = −0.5), as HF
  `Dinov2WithRegistersEmbeddings` does. HF skips the resize when the grid
  already matches; a same-size resize is the identity either way. (The
  original facebookresearch code resized by `scale_factor` with a +0.1
  offset; transformers 5.24 passes `size`, and that is what is matched.)
- blocks: x += γ₁·attn(norm1(x)); x += γ₂·ffn(norm2(x)) with LayerScale γ
  and ffn either fc1 → act → fc2 (width hidden·mlp_ratio) or, with
  `use_swiglu_ffn`, SwiGLU: `weights_in` (gate ‖ up, stored fused as the
  Hub checkpoints are), silu(gate)·up, `weights_out`, width
  ⌈⅔·hidden·mlp_ratio⌉₈.

Not built: the mask token (pre-training only; `loading` ignores it and writes
zeros) and the pooler (the CLS of the final tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ssr_jax.models.clip import (
    MLP,
    Attention,
    LayerNorm,
    Out,
    check_act,
    patch_grid,
    pick_fields,
    run_blocks,
    square_size,
)
from ssr_jax.models.layout import TokenLayout
from ssr_jax.models.resize import resize
from ssr_jax.models.vit import embed_patches, init_stem

Array = jax.Array
MODEL_TYPES = {"dinov2": "Dinov2Model",
               "dinov2_with_registers": "Dinov2WithRegistersModel"}


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """Defaults are `transformers.Dinov2Config`'s; `model_type` picks the HF
    class (and so the position interpolation), `num_register_tokens` is 0
    for plain DINOv2 (HF `Dinov2WithRegistersConfig` defaults it to 4)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    use_swiglu_ffn: bool = False
    num_register_tokens: int = 0
    model_type: str = "dinov2"

    def __post_init__(self):
        check_act(self.hidden_act)
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: a DINOv2 is "
                             f"one of {sorted(MODEL_TYPES)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}")
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens="
                             f"{self.num_register_tokens}: must be >= 0")
        if self.model_type == "dinov2" and self.num_register_tokens:
            raise ValueError(
                f"num_register_tokens={self.num_register_tokens} needs "
                "model_type='dinov2_with_registers' (HF Dinov2Model has no "
                "registers)")

    @property
    def grid(self) -> int:
        """Side of the pretrained square position grid."""
        return self.image_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        """Width of the plain MLP (HF: int(hidden_size · mlp_ratio))."""
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def swiglu_dim(self) -> int:
        """Width of the SwiGLU gate/up halves (HF `Dinov2SwiGLUFFN`)."""
        return (int(self.mlp_dim * 2 / 3) + 7) // 8 * 8

    @property
    def antialias(self) -> bool:
        """Whether HF resizes the positions with antialias (the registers
        class does, plain `Dinov2Model` does not)."""
        return self.model_type == "dinov2_with_registers"

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(1 + self.num_register_tokens, self.patch_size,
                           self.num_register_tokens)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> Dinov2Config:
        """From a HF `config.json` dict (missing keys take HF's defaults)."""
        d = dict(d)
        model_type = d.get("model_type") or "dinov2"
        d["model_type"] = model_type
        for key in ("image_size", "patch_size"):
            if key in d:
                d[key] = square_size(d[key], key)
        if model_type == "dinov2":
            d.pop("num_register_tokens", None)  # HF Dinov2Model ignores it
        else:
            d.setdefault("num_register_tokens", 4)
        return cls(**pick_fields(cls, d))

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that the HF class of `model_type` accepts."""
        d = dataclasses.asdict(self)
        if self.model_type == "dinov2":
            del d["num_register_tokens"]
        return {"architectures": [MODEL_TYPES[self.model_type]], **d}


class SwiGLU(nnx.Module):
    """weights_in (gate ‖ up) → silu(gate)·up → weights_out."""

    def __init__(self, dim: int, hidden: int, *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.weights_in = nnx.Linear(dim, 2 * hidden, dtype=dtype,
                                     param_dtype=dtype, rngs=rngs)
        self.weights_out = nnx.Linear(hidden, dim, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        gate, up = jnp.split(self.weights_in(x), 2, axis=-1)
        return self.weights_out(jax.nn.silu(gate) * up)


class Dinov2Block(nnx.Module):
    """Pre-LN block with LayerScale (HF `Dinov2Layer`)."""

    def __init__(self, config: Dinov2Config, *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = LayerNorm(d, eps, dtype=dtype)
        self.self_attn = Attention(d, config.num_attention_heads,
                                   qkv_bias=config.qkv_bias, dtype=dtype,
                                   rngs=rngs)
        self.layer_scale1 = nnx.Param(
            jnp.full((d,), config.layerscale_value, dtype))
        self.norm2 = LayerNorm(d, eps, dtype=dtype)
        if config.use_swiglu_ffn:
            self.mlp = SwiGLU(d, config.swiglu_dim, dtype=dtype, rngs=rngs)
        else:
            self.mlp = MLP(d, config.mlp_dim, config.hidden_act, dtype=dtype,
                           rngs=rngs)
        self.layer_scale2 = nnx.Param(
            jnp.full((d,), config.layerscale_value, dtype))

    def __call__(self, x: Array, mask: Array | None = None,
                 ) -> tuple[Array, Array]:
        """x [B, T, D] → (y [B, T, D], head-mean attention [B, T, T])."""
        a, attn = self.self_attn(self.norm1(x), mask)
        x = x + a * self.layer_scale1[...]
        x = x + self.mlp(self.norm2(x)) * self.layer_scale2[...]
        return x, attn


class Dinov2(nnx.Module):
    """DINOv2 encoder: patch conv (with bias), CLS, bicubic-resized
    positions, registers, LayerScale blocks, final LayerNorm."""

    def __init__(self, config: Dinov2Config, *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        d = config.hidden_size
        self.config = config
        init_stem(self, config, dtype, rngs)  # ViT's; registers [1, R, D]
        self.register_tokens = (
            nnx.Param(jnp.zeros((1, config.num_register_tokens, d), dtype))
            if config.num_register_tokens else None)
        self.blocks = nnx.List([Dinov2Block(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.layernorm = LayerNorm(d, config.layer_norm_eps, dtype=dtype)

    @property
    def layout(self) -> TokenLayout:
        """[CLS, registers…, patches], patch 14 (see `layout.py`)."""
        return self.config.layout

    def positions(self, grid: tuple[int, int]) -> Array:
        """[1 + h·w, D]: the CLS position and the pretrained grid resized to
        `grid` (bicubic, antialias per `config.antialias`), in float32 then
        cast back, as HF."""
        pos = self.position_embeddings[0]
        g, d = self.config.grid, pos.shape[-1]
        patch = pos[1:].reshape(g, g, d).astype(jnp.float32)
        patch = resize(patch, grid, "bicubic", axes=(0, 1),
                       antialias=self.config.antialias)
        patch = patch.reshape(grid[0] * grid[1], d).astype(pos.dtype)
        return jnp.concatenate([pos[:1], patch], axis=0)

    def embed(self, pixels: Array, patch_mask: Array | None = None,
              mask_token: Array | None = None) -> Array:
        """pixels [B, H, W, C] float, normalised → x [B, 1 + R + h·w, D] with
        (h, w) = (H // p, W // p) (masked patches as in
        `vit.embed_patches`)."""
        x, grid = embed_patches(self, pixels, patch_mask, mask_token)
        b, d = x.shape[0], x.shape[-1]
        x = x + self.positions(grid)[None]
        if self.register_tokens is None:
            return x
        reg = jnp.broadcast_to(self.register_tokens[...],
                               (b, self.config.num_register_tokens, d))
        return jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)

    def __call__(self, pixels: Array) -> tuple[Array, Out]:
        """pixels [B, H, W, C] → (tokens [B, T, D] after the final
        LayerNorm, out) with out["hidden"] (each block's output, before the
        final LayerNorm), out["attn"] (each block's head-mean attention
        [B, T, T], float32) and out["grid"] = (h, w); T = 1 + R + h·w."""
        x, out = run_blocks(self.blocks, self.embed(pixels))
        out["grid"] = patch_grid(pixels, self.config.patch_size)
        return self.layernorm(x), out
