"""Pretrains the tiny CLIP and DINO ViT of the embedded default (SPEC §5).

Real CLIP and DINO weights cannot be downloaded where the embedded default
runs, so the project pretrains its own tiny encoders on the synthetic world
(docs/synthetic_world.md) and saves them as Hugging Face snapshots that the
very loaders of the real checkpoints read (`models.loading`). The choices
and the measured diagnostics are in docs/pretrain.md.

- **CLIP** (`models.clip.CLIP`, image and text towers): symmetric InfoNCE
  over the image–caption pairs of the *train* split (`captions.json`; val
  images are never read), learnable logit scale clamped at 100 as CLIP.
  Images are cropped by the input pipeline's own augmentation (random
  rescale, crop or zero pad, flip). [choice] `pretrain.clip.patch_loss`:
  the same InfoNCE also on the pooled projected patch tokens; their mean
  is the image embedding that CLIP-ES GradCAM differentiates (SPEC §1.4),
  which a tiny CLIP trained on the CLS token alone leaves untrained.
  [choice] identical captions in a batch are positives of each other.
- **DINO** (`models.vit.ViT`, HF `ViTModel` layout; or, with
  `model.dino_kind="dinov2"`, `models.dinov2.Dinov2`, HF `Dinov2Model` /
  `Dinov2WithRegistersModel` layout, cached apart): self-distillation
  without labels (Caron et al. 2021): a momentum (EMA) teacher, multi-crop
  (2 global + several local crops), a projection head (MLP → L2 norm →
  weight-normalised prototypes), teacher centering and sharpening. The
  teacher backbone is saved.
- [choice] Both start from tied query/key weights (`tie_query_key`), so
  that their attention groups similar patches from the first step.

`ensure_encoders` caches each snapshot under a hash of (its config
section, the world's `world.json`, `PRETRAIN_VERSION`); an entry is
written to a temporary directory and renamed into place, so an
interrupted run never leaves a snapshot that looks complete.

Everything is deterministic given `pretrain.seed` and the world.

Modules (this file only re-exports their public names, so callers keep
writing `pretrain.ensure_encoders`, `pretrain.train_clip`, ...):

- `world`: where the world and the encoder cache live, `ensure_world`,
  reading the world's images, captions and tokenizer words;
- `augment`: CLIP crops, DINO multi-crop and colour jitter;
- `training`: schedule, AdamW, mimetic init, one-call model init, batching;
- `clip`: CLIP contrastive pretraining (`train_clip`, `pretrain_clip`);
- `dino`: DINO self-distillation (`train_dino`, `pretrain_dino`);
- `cache`: the config check (`validate`) and the snapshot cache
  (`cache_key`, `is_complete`, `ensure_encoders`), which installs the
  shipped snapshots (`shipped/`, sha256 manifest) on a cache miss;
- `ship`: `python -m ssr_jax.pretrain.ship --config CFG [--write]`
  rebuilds the shipped snapshots and checks (or stores) them bit for bit.
"""

from ssr_jax.pretrain.augment import (
    clip_crops,
    colour_jitter,
    multi_crops,
    normalise,
    resized_crop,
)
from ssr_jax.pretrain.cache import (
    DINOV2_FIELDS,
    INFO_FILE,
    PRETRAIN_VERSION,
    cache_key,
    ensure_encoders,
    is_complete,
    validate,
)
from ssr_jax.pretrain.clip import (
    MAX_LOGIT_SCALE,
    ClipData,
    clip_loss,
    clip_model_config,
    contrastive_loss,
    global_logits,
    keep_tokens,
    load_clip_data,
    make_clip_step,
    patch_logits,
    pretrain_clip,
    train_clip,
)
from ssr_jax.pretrain.dino import (
    DINO,
    IBOT_FIELDS,
    DINOHead,
    affinity_kind,
    backbone_config,
    block_masks,
    dino_loss,
    dino_model_config,
    dinov2_model_config,
    ibot_cfg,
    ibot_patch_loss,
    make_dino_step,
    momentum_schedule,
    pretrain_dino,
    save_backbone,
    teacher_temp_schedule,
    train_dino,
)
from ssr_jax.pretrain.training import adamw, build, lr_schedule, tie_query_key
from ssr_jax.pretrain.world import (
    build_tokenizer,
    encoder_cache_dir,
    ensure_world,
    read_images,
    tokenizer_words,
    world_config,
    world_identity,
    world_root,
)

__all__ = [
    "ClipData", "DINO", "DINOHead", "DINOV2_FIELDS", "IBOT_FIELDS",
    "INFO_FILE",
    "MAX_LOGIT_SCALE", "PRETRAIN_VERSION", "adamw", "affinity_kind",
    "backbone_config", "block_masks", "build", "build_tokenizer",
    "cache_key", "clip_crops",
    "clip_loss", "clip_model_config", "colour_jitter", "contrastive_loss",
    "dino_loss", "dino_model_config", "dinov2_model_config",
    "encoder_cache_dir", "ensure_encoders", "ensure_world", "global_logits",
    "ibot_cfg", "ibot_patch_loss",
    "is_complete", "keep_tokens", "load_clip_data", "lr_schedule",
    "make_clip_step", "make_dino_step", "momentum_schedule", "multi_crops",
    "normalise", "patch_logits", "pretrain_clip", "pretrain_dino",
    "read_images", "resized_crop", "save_backbone", "teacher_temp_schedule",
    "tie_query_key", "tokenizer_words", "train_clip", "train_dino",
    "validate", "world_config", "world_identity", "world_root"
]
