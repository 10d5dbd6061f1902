"""Tiny random Hugging Face models saved as snapshots, for tests.

`make_tiny_clip(dir)` / `make_tiny_dino(dir)` / `make_tiny_dinov2(dir)` build
a small random `transformers.CLIPModel` / `ViTModel` / `Dinov2Model` (or
`Dinov2WithRegistersModel` when `num_register_tokens=` is given), perturb
every parameter (so LayerNorm scales, biases, LayerScales, registers and
q/k/v are all distinct and a swapped or untransposed tensor shows up),
`save_pretrained` it to `dir` and return the path. `hf_clip(path)` /
`hf_dino(path)` / `hf_dinov2(path)` load them back as eager-attention torch
models in eval mode, the PyTorch reference; `bilinear_positions(clip)` makes
a HF CLIP resize its position grid as WeCLIP (and ssr_jax) do.

Overrides: `vision_<field>=` / `text_<field>=` go to the CLIP sub-configs,
other keywords to the top-level config (e.g. `projection_dim`, or any
`ViTConfig` / `Dinov2Config` field for DINO / DINOv2); `seed` picks the
weights.
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch
import transformers

TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=16)
TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=64, max_position_embeddings=16,
                      pad_token_id=1, bos_token_id=62, eos_token_id=63)
TINY_DINO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, image_size=32, patch_size=16,
                 qkv_bias=True, hidden_act="gelu", layer_norm_eps=1e-12)

# The real configurations (openai/clip-vit-base-patch16, dino-vits16).
FULL_CLIP_VISION = dict(hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=16)
FULL_CLIP_TEXT = dict(hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8,
                      vocab_size=49408, max_position_embeddings=77,
                      bos_token_id=49406, eos_token_id=49407)
FULL_DINO = dict(hidden_size=384, intermediate_size=1536,
                 num_hidden_layers=12, num_attention_heads=6, image_size=224,
                 patch_size=16, qkv_bias=True, hidden_act="gelu",
                 layer_norm_eps=1e-12)

# DINOv2: a 4x4 pretrained grid of 14-pixel patches (image_size 56).
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   mlp_ratio=2, image_size=56, patch_size=14,
                   layer_norm_eps=1e-6)
# facebook/dinov2-small and -base (and their -with-registers, which add
# num_register_tokens=4): ViT-S/14 and ViT-B/14 at image_size 518 (37x37).
FULL_DINOV2_S = dict(hidden_size=384, num_hidden_layers=12,
                     num_attention_heads=6, mlp_ratio=4, image_size=518,
                     patch_size=14, layer_norm_eps=1e-6)
FULL_DINOV2_B = dict(hidden_size=768, num_hidden_layers=12,
                     num_attention_heads=12, mlp_ratio=4, image_size=518,
                     patch_size=14, layer_norm_eps=1e-6)


def _perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _save(model: torch.nn.Module, directory: str | os.PathLike) -> str:
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return os.fspath(directory)


def make_tiny_clip(directory: str | os.PathLike, *, seed: int = 0,
                   perturb: float = 0.05, **overrides: Any) -> str:
    """Saves a random CLIPModel to `directory` and returns the path."""
    vision, text, top = dict(TINY_CLIP_VISION), dict(TINY_CLIP_TEXT), {}
    for key, value in overrides.items():
        if key.startswith("vision_"):
            vision[key.removeprefix("vision_")] = value
        elif key.startswith("text_"):
            text[key.removeprefix("text_")] = value
        else:
            top[key] = value
    top.setdefault("projection_dim", 24)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                     **top)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config)
    if perturb:
        _perturb(model, seed, perturb)
    return _save(model, directory)


def make_tiny_dino(directory: str | os.PathLike, *, seed: int = 0,
                   perturb: float = 0.05, **overrides: Any) -> str:
    """Saves a random ViTModel (with pooler, as dino-vits16 has) to
    `directory` and returns the path."""
    config = transformers.ViTConfig(**{**TINY_DINO, **overrides})
    torch.manual_seed(seed)
    model = transformers.ViTModel(config)
    if perturb:
        _perturb(model, seed, perturb)
    return _save(model, directory)


def make_tiny_dinov2(directory: str | os.PathLike, *, seed: int = 0,
                     perturb: float = 0.05, base: dict | None = None,
                     **overrides: Any) -> str:
    """Saves a random Dinov2Model (or Dinov2WithRegistersModel if
    `num_register_tokens` is among the overrides) to `directory` and
    returns the path. `base` replaces TINY_DINOV2 (e.g. FULL_DINOV2_S)."""
    fields = {**(TINY_DINOV2 if base is None else base), **overrides}
    if "num_register_tokens" in fields:
        config = transformers.Dinov2WithRegistersConfig(**fields)
        cls = transformers.Dinov2WithRegistersModel
    else:
        config = transformers.Dinov2Config(**fields)
        cls = transformers.Dinov2Model
    torch.manual_seed(seed)
    model = cls(config)
    if perturb:
        _perturb(model, seed, perturb)
    return _save(model, directory)


def hf_clip(path: str | os.PathLike) -> transformers.CLIPModel:
    """The PyTorch reference: eager attention (so attentions are returned),
    eval mode, float32."""
    model = transformers.CLIPModel.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def hf_dino(path: str | os.PathLike) -> transformers.ViTModel:
    """The PyTorch reference ViTModel; see `hf_clip`."""
    model = transformers.ViTModel.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def hf_dinov2(path: str | os.PathLike) -> transformers.PreTrainedModel:
    """The PyTorch reference Dinov2Model / Dinov2WithRegistersModel (by the
    snapshot's model_type); see `hf_clip`."""
    model = transformers.AutoModel.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def bilinear_positions(model: transformers.CLIPModel,
                       ) -> transformers.CLIPModel:
    """Makes HF CLIP resize its position grid bilinearly (align_corners=False)
    to (H // p, W // p), as WeCLIP does, instead of HF's bicubic. Call the
    model with `interpolate_pos_encoding=True`; the native size is resized
    too (a same-size bilinear resize is the identity)."""
    emb = model.vision_model.embeddings

    def interpolate(self, embeddings, height, width):
        pos = self.position_embedding.weight[None]
        side = int(round((pos.shape[1] - 1) ** 0.5))
        dim = pos.shape[-1]
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(
            grid, size=(height // self.patch_size, width // self.patch_size),
            mode="bilinear", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat([pos[:, :1], grid], dim=1)

    emb.interpolate_pos_encoding = types.MethodType(interpolate, emb)
    return model
