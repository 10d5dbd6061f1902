"""Flax NNX models: CLIP (`clip`), DINO ViT (`vit`), HF snapshot loading
(`loading`) and exact PyTorch-semantics resizing (`resize`).

Nothing is imported here so that `import ssr_jax.models.resize` stays cheap;
import the submodule you need.
"""
