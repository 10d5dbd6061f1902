"""Flax NNX models: CLIP (`clip`), DINO ViT (`vit`), DINOv2 (`dinov2`), HF
snapshot loading (`loading`), exact PyTorch-semantics resizing (`resize`),
and the affinity-encoder seam (`encoders`, `layout`).

Nothing is imported here so that `import ssr_jax.models.resize` stays cheap;
import the submodule you need.
"""
