"""WeCLIP's segmentation decoder in Flax NNX (SPEC §1.8).

Structure read from zbf1991/WeCLIP @ 0f47db4:
`WeCLIP/WeCLIP_model/segformer_head.py` (`SegFormerHead`, index=11) and
`WeCLIP/WeCLIP_model/Decoder/TransDecoder.py` (`DecoderTransformer`):

- one MLP per CLIP block (Linear D->E, ReLU, Linear E->E) on that block's
  patch tokens; the L outputs concatenated in block order;
- `linear_fuse`: a 1x1 conv L*E -> E with bias (no norm, no activation),
  then `Dropout2d(0.1)`; the result is F, the decoder feature of WeCLIP's
  affinity S = sigmoid(F^T F);
- a 3-layer pre-LN CLIP transformer (width E, QuickGELU MLP x4, no final
  LayerNorm), then `linear_pred`, a 1x1 conv E -> classes with bias.

Parameters are initialised as PyTorch initialises WeCLIP's modules (uniform
+-1/sqrt(fan_in) for Linear/Conv weights and biases; Xavier-uniform packed
q/k/v projection with zero biases; zero out-projection bias), so training
starts from the same distribution. Layout is token-major NHWC: what PyTorch
holds as [B, C, h, w] is [B, N, C] here, N = h*w in row-major order.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def _torch_uniform(fan_in: int):
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), +...)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(din: int, dout: int, rngs: nnx.Rngs, **kw) -> nnx.Linear:
    """nnx.Linear with PyTorch's default initialisation (unless overridden)."""
    kw.setdefault("kernel_init", _torch_uniform(din))
    kw.setdefault("bias_init", _torch_uniform(din))
    return nnx.Linear(din, dout, rngs=rngs, **kw)


def quick_gelu(x: Array) -> Array:
    """CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


class LayerMLPs(nnx.Module):
    """L independent two-layer MLPs, one per CLIP block, run as one einsum.

    Stacked kernels: `w1 [L, D, E]`, `b1 [L, E]`, `w2 [L, E, E]`, `b2 [L, E]`
    (WeCLIP's `linears_modulelist[l].proj` / `.proj_2`, transposed).
    """

    def __init__(self, num_layers: int, in_dim: int, embed_dim: int, *,
                 rngs: nnx.Rngs):
        shapes = {
            "w1": ((num_layers, in_dim, embed_dim), in_dim),
            "b1": ((num_layers, embed_dim), in_dim),
            "w2": ((num_layers, embed_dim, embed_dim), embed_dim),
            "b2": ((num_layers, embed_dim), embed_dim),
        }
        for name, (shape, fan_in) in shapes.items():
            value = _torch_uniform(fan_in)(rngs.params(), shape)
            setattr(self, name, nnx.Param(value))

    def __call__(self, x: Array) -> Array:
        """x [L, B, N, D] -> [L, B, N, E]."""
        h = jnp.einsum("lbnd,lde->lbne", x, self.w1[...])
        h = jax.nn.relu(h + self.b1[...][:, None, None])
        h = jnp.einsum("lbne,lef->lbnf", h, self.w2[...])
        return h + self.b2[...][:, None, None]


class Attention(nnx.Module):
    """PyTorch `nn.MultiheadAttention` (self-attention, no mask, no dropout).

    `in_proj` packs q, k, v along its output axis as PyTorch's
    `in_proj_weight` [3E, E] does; `out_proj` is the output Linear.
    """

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj = _linear(
            width, 3 * width, rngs,
            kernel_init=nnx.initializers.xavier_uniform(),
            bias_init=nnx.initializers.zeros_init(),
        )
        self.out_proj = _linear(
            width, width, rngs, bias_init=nnx.initializers.zeros_init()
        )

    def __call__(self, x: Array) -> tuple[Array, Array]:
        """x [B, N, E] -> (y [B, N, E], head-averaged attention [B, N, N])."""
        b, n, e = x.shape
        dh = e // self.heads
        qkv = self.in_proj(x).reshape(b, n, 3, self.heads, dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        attn = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, e)
        return self.out_proj(y), attn.mean(axis=1)


class ResidualAttentionBlock(nnx.Module):
    """CLIP's pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        # PyTorch LayerNorm eps (WeCLIP's LayerNorm subclasses it).
        self.ln_1 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.attn = Attention(width, heads, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.c_fc = _linear(width, 4 * width, rngs)
        self.c_proj = _linear(4 * width, width, rngs)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        """x [B, N, E] -> (x [B, N, E], attention [B, N, N])."""
        y, attn = self.attn(self.ln_1(x))
        x = x + y
        x = x + self.c_proj(quick_gelu(self.c_fc(self.ln_2(x))))
        return x, attn


class Decoder(nnx.Module):
    """SegFormerHead(index=L) + DecoderTransformer, as WeCLIP (SPEC §1.8).

    About 5.99M parameters for VOC (21 classes); the arithmetic is in
    tests/test_decoder.py.
    """

    def __init__(
        self,
        in_dim: int = 768,
        num_layers_in: int = 11,
        embed_dim: int = 256,
        depth: int = 3,
        heads: int = 8,
        num_classes: int = 21,
        dropout: float = 0.1,
        *,
        rngs: nnx.Rngs,
    ):
        self.in_dim = in_dim
        self.num_layers_in = num_layers_in
        self.mlps = LayerMLPs(num_layers_in, in_dim, embed_dim, rngs=rngs)
        self.fuse = _linear(num_layers_in * embed_dim, embed_dim, rngs)
        # Dropout2d: one Bernoulli draw per (sample, channel), shared by all
        # tokens, i.e. broadcast over the token axis of [B, N, E].
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1,))
        self.blocks = nnx.List([
            ResidualAttentionBlock(embed_dim, heads, rngs=rngs)
            for _ in range(depth)
        ])
        self.pred = _linear(embed_dim, num_classes, rngs)

    def __call__(
        self,
        hidden: Array,
        grid: tuple[int, int],
        deterministic: bool,
        dropout_key: Array | None = None,
    ) -> tuple[Array, Array]:
        """Segmentation logits at patch resolution and the fused feature.

        Args:
          hidden: [L, B, N, D] patch tokens (CLS dropped) of CLIP blocks
            1..L, raw residual stream (no ln_post / projection).
          grid: (h, w) with h * w = N.
          deterministic: True disables the channel dropout.
          dropout_key: PRNG key of the dropout mask (needed when not
            deterministic); passed in, not stored, so that the train state
            holds no RNG state and a resumed run draws the same masks.

        Returns:
          logits [B, h, w, num_classes] and feat F [B, N, E] (after dropout,
          as WeCLIP's `attn_fts`).
        """
        num_layers, b, n, d = hidden.shape
        h, w = grid
        if (num_layers, d) != (self.num_layers_in, self.in_dim) or n != h * w:
            raise ValueError(
                f"hidden has shape {hidden.shape} for grid {grid}; expected "
                f"[{self.num_layers_in}, B, {h * w}, {self.in_dim}]"
            )
        x = self.mlps(hidden.astype(jnp.float32))  # [L, B, N, E]
        x = jnp.moveaxis(x, 0, 2).reshape(b, n, -1)  # block-major channels
        feat = self.dropout(self.fuse(x), deterministic=deterministic,
                            rngs=dropout_key)
        x = feat
        for block in self.blocks:
            x, _ = block(x)
        logits = self.pred(x).reshape(b, h, w, -1)
        return logits, feat
