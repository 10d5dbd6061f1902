"""Tiny random Hugging Face models saved as snapshots, for tests.

`make_tiny_clip(dir)` / `make_tiny_dino(dir)` build a small random
`transformers.CLIPModel` / `ViTModel`, perturb every parameter (so LayerNorm
scales, biases and q/k/v are all distinct and a swapped or untransposed
tensor shows up), `save_pretrained` it to `dir` and return the path.
`hf_clip(path)` / `hf_dino(path)` load them back as eager-attention torch
models in eval mode, the PyTorch reference.

Overrides: `vision_<field>=` / `text_<field>=` go to the CLIP sub-configs,
other keywords to the top-level config (e.g. `projection_dim`, or any
`ViTConfig` field for DINO); `seed` picks the weights.
"""

from __future__ import annotations

import os
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
