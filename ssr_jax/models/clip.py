"""CLIP (image and text towers) in Flax NNX, Hugging Face `CLIPModel` layout.

SPEC.md §1 (frozen CLIP ViT-B/16). The architecture comes from the snapshot's
`config.json` (`CLIPConfig.from_hf`), so a tiny random model and the real
openai/clip-vit-base-patch16 go through the same code; `loading.py` maps the
weights. Differences from `transformers.CLIPModel` (all deliberate):

- Position embeddings: the pretrained √n×√n grid is resized to the input's
  patch grid with **bilinear, align_corners=False** on every call, as WeCLIP
  does (HF's `interpolate_pos_encoding` uses bicubic).
- `visual_projection` lives in the vision tower and `text_projection` in the
  text tower, so `CLIPVision.project` maps every token.
- Blocks return their head-averaged attention; the towers return
  `(embeds, out)` with every block's output and attention in `out` (jit
  drops what a caller does not use).

Layout is NHWC; token arrays are `[B, T, D]` with CLS first. Softmax and
LayerNorm statistics run in float32 whatever the parameter dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ssr_jax.models.resize import resize

Array = jax.Array
Out = dict[str, Any]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def check_act(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"hidden_act={name!r} is not supported; use one of "
            f"{sorted(ACTIVATIONS)}")
    return name


def square_size(value: Any, key: str) -> int:
    """HF allows `image_size`/`patch_size` as an int or a pair; we need
    square ones because the position grid is stored as √n×√n."""
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{key}={value!r}: only square sizes are "
                             "supported")
        value = value[0]
    return int(value)


def pick_fields(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


# ----------------------------------------------------------------- config --


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Vision tower; defaults are `transformers.CLIPVisionConfig`'s."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        check_act(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}")

    @property
    def grid(self) -> int:
        """Side of the pretrained square position grid."""
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Text tower; defaults are `transformers.CLIPTextConfig`'s."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        check_act(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"text hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}")
        if not isinstance(self.eos_token_id, int):
            raise ValueError(
                f"text eos_token_id={self.eos_token_id!r}: a single int is "
                "needed for EOT pooling")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers plus the shared embedding width (`projection_dim`)."""

    vision: CLIPVisionConfig = dataclasses.field(
        default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> CLIPConfig:
        """From a HF `config.json` dict (missing keys take HF's defaults).

        Like `transformers.CLIPConfig`, a non-null legacy
        `text_config_dict`/`vision_config_dict` replaces `text_config`/
        `vision_config`.
        """
        text = d.get("text_config_dict") or d.get("text_config") or {}
        vision = d.get("vision_config_dict") or d.get("vision_config") or {}
        vision = dict(vision)
        for key in ("image_size", "patch_size"):
            if key in vision:
                vision[key] = square_size(vision[key], key)
        return cls(
            vision=CLIPVisionConfig(**pick_fields(CLIPVisionConfig, vision)),
            text=CLIPTextConfig(**pick_fields(CLIPTextConfig, text)),
            **pick_fields(cls, {k: v for k, v in d.items()
                          if k in ("projection_dim",
                                   "logit_scale_init_value")}))

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that `transformers.CLIPModel` accepts."""
        text = dataclasses.asdict(self.text)
        vision = dataclasses.asdict(self.vision)
        text.update(model_type="clip_text_model",
                    projection_dim=self.projection_dim)
        vision.update(model_type="clip_vision_model",
                      projection_dim=self.projection_dim)
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": text,
            "vision_config": vision,
        }


# ----------------------------------------------------------------- layers --


class LayerNorm(nnx.Module):
    """PyTorch LayerNorm (two-pass variance) with float32 statistics and
    affine; returns the input dtype. Params `scale`, `bias` `[D]`."""

    def __init__(self, dim: int, eps: float, *, dtype: Any = jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        y = x.astype(jnp.float32)
        mean = y.mean(-1, keepdims=True)
        var = jnp.square(y - mean).mean(-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + self.eps)
        y = (y * self.scale[...].astype(jnp.float32)
             + self.bias[...].astype(jnp.float32))
        return y.astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with separate q/k/v/out projections."""

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = True,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        def dense(bias: bool) -> nnx.Linear:
            return nnx.Linear(dim, dim, use_bias=bias, dtype=dtype,
                              param_dtype=dtype, rngs=rngs)

        self.q_proj = dense(qkv_bias)
        self.k_proj = dense(qkv_bias)
        self.v_proj = dense(qkv_bias)
        self.out_proj = dense(True)
        self.heads = heads

    def __call__(self, x: Array, mask: Array | None = None,
                 ) -> tuple[Array, Array]:
        """x [B, T, D]; mask bool broadcastable to [B, heads, T, T] (True =
        may attend). Returns (y [B, T, D], head-mean attention [B, T, T]
        float32)."""
        b, t, d = x.shape
        split = (b, t, self.heads, d // self.heads)
        q = self.q_proj(x).reshape(split)
        k = self.k_proj(x).reshape(split)
        v = self.v_proj(x).reshape(split)
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k,
                            preferred_element_type=jnp.float32)
        logits = logits * (d // self.heads) ** -0.5
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bhqk,bkhc->bqhc", probs.astype(v.dtype), v)
        return self.out_proj(y.reshape(b, t, d)), probs.mean(axis=1)


class MLP(nnx.Module):
    """fc1 → activation → fc2."""

    def __init__(self, dim: int, hidden: int, act: str, *,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, param_dtype=dtype,
                              rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, param_dtype=dtype,
                              rngs=rngs)
        self.act = check_act(act)

    def __call__(self, x: Array) -> Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPBlock(nnx.Module):
    """Pre-LN transformer block (HF `CLIPEncoderLayer`; DINO's `ViTLayer`
    computes the same thing and reuses it)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *,
                 act: str = "quick_gelu", eps: float = 1e-5,
                 qkv_bias: bool = True, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(dim, eps, dtype=dtype)
        self.self_attn = Attention(dim, heads, qkv_bias=qkv_bias,
                                   dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(dim, eps, dtype=dtype)
        self.mlp = MLP(dim, mlp_dim, act, dtype=dtype, rngs=rngs)

    def ln_1(self, x: Array) -> Array:
        """The block's first LayerNorm, [B, T, D] → [B, T, D]: the
        activation GradCAM differentiates (SPEC §4)."""
        return self.layer_norm1(x)

    def __call__(self, x: Array, mask: Array | None = None,
                 ) -> tuple[Array, Array]:
        """x [B, T, D] → (y [B, T, D], attention [B, T, T])."""
        return self.from_ln1(x, self.layer_norm1(x), mask)

    def from_ln1(self, x: Array, h: Array, mask: Array | None = None,
                 ) -> tuple[Array, Array]:
        """`__call__` with `h` used in place of `ln_1(x)`; the residual still
        adds `x`. Gradients w.r.t. `h` are GradCAM's (SPEC §4)."""
        a, attn = self.self_attn(h, mask)
        x = x + a
        x = x + self.mlp(self.layer_norm2(x))
        return x, attn


def make_blocks(cfg: Any, dtype: Any, rngs: nnx.Rngs, qkv_bias: bool = True,
                ) -> nnx.List:
    """`cfg.num_hidden_layers` blocks from a tower config's fields."""
    return nnx.List([
        CLIPBlock(cfg.hidden_size, cfg.num_attention_heads,
                  cfg.intermediate_size, act=cfg.hidden_act,
                  eps=cfg.layer_norm_eps, qkv_bias=qkv_bias, dtype=dtype,
                  rngs=rngs)
        for _ in range(cfg.num_hidden_layers)])


def run_blocks(blocks: nnx.List, x: Array, start: int = 0,
               stop: int | None = None, mask: Array | None = None,
               ) -> tuple[Array, Out]:
    """Runs `blocks[start:stop]`; out = {"hidden": each block's output,
    "attn": each block's head-mean attention}."""
    hidden, attn = [], []
    for block in list(blocks)[start:stop]:
        x, a = block(x, mask)
        hidden.append(x)
        attn.append(a)
    return x, {"hidden": tuple(hidden), "attn": tuple(attn)}


def normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> Array:
    return 0.02 * jax.random.normal(rngs.params(), shape, dtype)


def resize_grid(pos: Array, grid: int, out_hw: tuple[int, int],
                method: str) -> Array:
    """pos [grid·grid, D] (row-major grid) → [h·w, D], PyTorch
    `F.interpolate(method, align_corners=False)`, computed in float32."""
    d = pos.shape[-1]
    g = pos.reshape(grid, grid, d).astype(jnp.float32)
    g = resize(g, out_hw, method, align_corners=False, axes=(0, 1))
    return g.reshape(out_hw[0] * out_hw[1], d).astype(pos.dtype)


def patch_grid(pixels: Array, patch: int) -> tuple[int, int]:
    """(H // p, W // p), as a stride-p convolution floors; errors if 0."""
    h, w = pixels.shape[-3] // patch, pixels.shape[-2] // patch
    if h == 0 or w == 0:
        raise ValueError(f"image {pixels.shape[-3]}x{pixels.shape[-2]} is "
                         f"smaller than one {patch}x{patch} patch")
    return h, w


# ----------------------------------------------------------------- towers --


class CLIPVision(nnx.Module):
    """Image tower: patch conv, CLS, resized positions, ln_pre, blocks,
    ln_post, visual projection."""

    def __init__(self, config: CLIPVisionConfig, projection_dim: int, *,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        d, p = config.hidden_size, config.patch_size
        self.config = config
        self.patch_embedding = nnx.Conv(
            config.num_channels, d, (p, p), strides=(p, p), padding="VALID",
            use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.class_embedding = nnx.Param(normal_init(rngs, (d,), dtype))
        self.position_embedding = nnx.Param(
            normal_init(rngs, (config.grid ** 2 + 1, d), dtype))
        self.pre_layrnorm = LayerNorm(d, config.layer_norm_eps, dtype=dtype)
        self.blocks = make_blocks(config, dtype, rngs)
        self.post_layernorm = LayerNorm(d, config.layer_norm_eps, dtype=dtype)
        self.visual_projection = nnx.Linear(
            d, projection_dim, use_bias=False, dtype=dtype,
            param_dtype=dtype, rngs=rngs)

    def embed(self, pixels: Array) -> Array:
        """pixels [B, H, W, C] float, normalised → x [B, 1 + h·w, D].

        (h, w) = (H // p, W // p); the pretrained position grid is resized
        bilinearly (align_corners=False) to (h, w), CLS position kept
        [WeCLIP]; then ln_pre.
        """
        h, w = patch_grid(pixels, self.config.patch_size)
        dtype = self.class_embedding.dtype
        x = self.patch_embedding(pixels.astype(dtype))
        b = x.shape[0]
        x = x.reshape(b, h * w, -1)
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        pos = self.position_embedding[...]
        grid = resize_grid(pos[1:], self.config.grid, (h, w), "bilinear")
        x = x + jnp.concatenate([pos[:1], grid], axis=0)[None]
        return self.pre_layrnorm(x)

    def run_blocks(self, x: Array, start: int = 0, stop: int | None = None,
                   ) -> tuple[Array, Out]:
        """x [B, T, D] through blocks[start:stop] → (x, out) with
        out["hidden"] (each block's [B, T, D]) and out["attn"] ([B, T, T])."""
        return run_blocks(self.blocks, x, start, stop)

    def project(self, x: Array) -> Array:
        """ln_post + visual projection on every token: [B, T, D] →
        [B, T, E]."""
        return self.visual_projection(self.post_layernorm(x))

    def __call__(self, pixels: Array) -> tuple[Array, Out]:
        """pixels [B, H, W, C] → (image_embeds [B, E], out).

        image_embeds is HF's `get_image_features` (unnormalised). out:
        "hidden" and "attn" of every block, "tokens" = project() of the final
        tokens [B, T, E], "grid" = (h, w).
        """
        x, out = self.run_blocks(self.embed(pixels))
        tokens = self.project(x)
        out["tokens"] = tokens
        out["grid"] = patch_grid(pixels, self.config.patch_size)
        return tokens[:, 0], out


class CLIPText(nnx.Module):
    """Text tower: token + position embeddings, causal blocks,
    final LayerNorm, EOT pooling, text projection."""

    def __init__(self, config: CLIPTextConfig, projection_dim: int, *,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        d = config.hidden_size
        self.config = config
        self.token_embedding = nnx.Embed(config.vocab_size, d, dtype=dtype,
                                         param_dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Param(
            normal_init(rngs, (config.max_position_embeddings, d), dtype))
        self.blocks = make_blocks(config, dtype, rngs)
        self.final_layer_norm = LayerNorm(d, config.layer_norm_eps, dtype=dtype)
        self.text_projection = nnx.Linear(
            d, projection_dim, use_bias=False, dtype=dtype,
            param_dtype=dtype, rngs=rngs)

    def eot_index(self, ids: Array) -> Array:
        """[B, L] → [B] pooling position, as HF `CLIPTextTransformer`: the
        legacy `eos_token_id == 2` configs take argmax(ids) (EOT has the
        largest id); otherwise the first position of `eos_token_id`."""
        if self.config.eos_token_id == 2:
            return jnp.argmax(ids, axis=-1)
        return jnp.argmax(ids == self.config.eos_token_id, axis=-1)

    def __call__(self, ids: Array) -> tuple[Array, Out]:
        """ids [B, L] int, L ≤ max_position_embeddings → (text_embeds
        [B, E], out) with out "hidden"/"attn" per block and "last_hidden"
        (after the final LayerNorm)."""
        length = ids.shape[-1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"text length {length} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}")
        x = self.token_embedding(ids) + self.position_embedding[:length][None]
        causal = jnp.tril(jnp.ones((length, length), bool))
        x, out = run_blocks(self.blocks, x, mask=causal)
        x = self.final_layer_norm(x)
        out["last_hidden"] = x
        pooled = jnp.take_along_axis(
            x, self.eot_index(ids)[:, None, None], axis=1)[:, 0]
        return self.text_projection(pooled), out


class CLIP(nnx.Module):
    """CLIP with `.vision`, `.text` and `.logit_scale` (log of the logit
    scale, as HF stores it). `.text` is None after `drop_text_tower`."""

    def __init__(self, config: CLIPConfig, *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.vision = CLIPVision(config.vision, config.projection_dim,
                                 dtype=dtype, rngs=rngs)
        self.text = CLIPText(config.text, config.projection_dim,
                             dtype=dtype, rngs=rngs)
        self.logit_scale = nnx.Param(
            jnp.asarray(config.logit_scale_init_value, dtype))

    def encode_image(self, pixels: Array) -> Array:
        """pixels [B, H, W, C] → unnormalised image embeddings [B, E]."""
        return self.vision(pixels)[0]

    def drop_text_tower(self) -> None:
        """Lets the text tower's arrays go (`.text` becomes None).

        The trainer calls it once the text bank is built
        (`train.setup`): the pseudo-label path, the losses and evaluation
        use only `.vision` and `.logit_scale`, and the text tower of
        ViT-B/16 CLIP is 242 MiB in float32. `nnx.split` of the module no
        longer carries a "text" state.
        """
        self.text = None

    def encode_text(self, ids: Array) -> Array:
        """ids [B, L] → unnormalised text embeddings [B, E]."""
        if self.text is None:
            raise ValueError(
                "this CLIP has no text tower: it was dropped once the text "
                "bank was built (train.setup). Load the snapshot again "
                "with ssr_jax.models.loading.load_clip to embed text.")
        return self.text(ids)[0]

    def __call__(self, pixels: Array, ids: Array) -> Array:
        """HF `logits_per_image` [B_img, B_txt]: exp(logit_scale) × cosine
        similarity, in float32."""
        img = self.encode_image(pixels).astype(jnp.float32)
        txt = self.encode_text(ids).astype(jnp.float32)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        scale = jnp.exp(self.logit_scale[...].astype(jnp.float32))
        return scale * img @ txt.T

