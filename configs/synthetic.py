r"""The embedded default: SSR on the procedurally generated world (SPEC §5).

  python -m ssr_jax.main --config configs/synthetic.py --workdir runs/synth

generates the world (docs/synthetic_world.md), pretrains a tiny CLIP and a
tiny DINO ViT on it (or reuses the cached ones, `ssr_jax/pretrain/`),
trains SSR on the image-level labels and scores it on the held-out masks.
Nothing is downloaded.

Arguments: "" (the full default, 10.5 min on 2 CPU cores from a fresh
clone with the shipped encoders and empty caches, 8 min once cached,
2026-12-05), "smoke" (a shrunk world and encoders: 2 min 13 s from a
fresh clone with the shipped encoders, 2026-12-05, as in the README),
"tiny" (about a
minute from empty caches, seconds once cached; for tests). Each may be
followed by ",dinov2" (or "dinov2" alone, the full default): the affinity
encoder is then a tiny DINOv2 with patch 14 (`model.dino_kind="dinov2"`,
`_dinov2`), e.g. `configs/synthetic.py:smoke,dinov2`.

Caches (both keyed by content, both safe to delete):
- the world: `synthetic.root`, default
  `$XDG_CACHE_HOME/ssr_jax/synthetic/seed<s>-train<n>-val<m>-px<size>`
  (`~/.cache` when XDG_CACHE_HOME is unset; `pretrain.world_root`);
- the encoders: `pretrain.cache_dir`, default
  `$XDG_CACHE_HOME/ssr_jax/encoders`, one HF snapshot directory per
  encoder named by the hash of its config section and the world
  (`pretrain.ensure_encoders`).
"""

from ml_collections import config_dict

from ssr_jax import config_defaults

VARIANTS = ("", "smoke", "tiny")  # sizes; each also with ",dinov2"
OPTIONS = ("dinov2",)


def _world(c: config_dict.ConfigDict) -> None:
    c.synthetic = w = config_dict.ConfigDict()
    w.seed = 0
    w.num_train = 1500
    w.num_val = 300
    w.image_size = 160  # 10x10 patch grid at patch 16
    w.root = ""  # "" = ~/.cache/ssr_jax/synthetic/<parameters>
    # [choice] P(a train caption names the background) (WorldConfig.
    # caption_background_prob). 1 = every caption does, the world the
    # shipped encoders were trained on. Below 1 the tiny CLIP learns from
    # captions like "a boat." for a boat on water, so its CAM can tie a
    # class to its home background, the co-occurrence confound CMPA is
    # meant to correct (docs/diagnostics.md, session 22). Another value is
    # another world (its own root and encoder cache entries).
    w.caption_background_prob = 1.0
    # [choice] "all": that probability applies to every caption; "home":
    # only where the background is the home of a class in the image (the
    # language ties "boat" to water, yet "water" stays grounded by other
    # images). Ignored at caption_background_prob=1.
    w.caption_background_scope = "all"


def _pretrain(c: config_dict.ConfigDict) -> None:
    c.pretrain = p = config_dict.ConfigDict()
    p.seed = 0
    p.cache_dir = ""  # "" = ~/.cache/ssr_jax/encoders
    p.progress = True  # tqdm bars per stage
    # [choice] False: on a cache miss use the snapshot shipped in the
    # package for the same key (ssr_jax/pretrain/shipped, sha256-checked;
    # saves ~7 min of CPU pretraining on a fresh clone); True: train both
    # encoders anyway, replacing the cached entries (docs/pretrain.md,
    # "Shipped encoders"). Not part of the cache key.
    p.force = False

    # Tiny CLIP: the very `models.clip.CLIP` of ViT-B/16, shrunk. Trained
    # at 112 px (7x7 grid) and used by SSR at 160 px (10x10, positions
    # resized bilinearly), as ViT-B/16 is trained at 224 and used at 320.
    p.clip = k = config_dict.ConfigDict()
    k.vision_width = 64
    k.vision_layers = 4
    k.vision_heads = 4
    k.patch_size = 16
    k.image_size = 112  # pretraining crop and position grid (7x7)
    k.text_width = 64
    k.text_layers = 3
    k.text_heads = 4
    k.context_length = 32  # longest caption of the world: 31 tokens
    k.mlp_ratio = 4
    k.projection_dim = 64
    k.steps = 1000
    k.batch_size = 64
    k.lr = 2e-3
    k.final_lr_ratio = 0.05
    k.warmup_steps = 40
    k.weight_decay = 0.05
    k.b2 = 0.98  # CLIP's Adam beta2
    k.grad_clip = 1.0
    # SSR's crop (rescale 0.5-2 of a 160 px image, 160 crop) scaled by
    # 112/160: the same object sizes in pixels at ratio 1.
    k.rescale_range = (0.35, 1.0)
    k.hflip = True
    k.normalization = "clip"  # real CLIP's mean/std
    k.patch_loss = 1.0  # [choice] InfoNCE weight of the pooled patch tokens
    k.patch_pool = "mean"  # [choice] mean (what GradCAM reads) | pacl
    k.pool_temperature = 0.1  # PACL softmax temperature over patches
    k.token_keep = 1.0  # FLIP: share of patch tokens seen in training
    k.tied_qk_scale = 1.5  # [choice] W_k = W_q init (mimetic); 0 = off

    # Tiny DINO ViT (self-distillation), HF ViTModel layout, patch 16.
    p.dino = d = config_dict.ConfigDict()
    d.width = 64
    d.layers = 4
    d.heads = 4
    d.patch_size = 16
    d.mlp_ratio = 4
    d.head_hidden = 256
    d.head_bottleneck = 64
    d.num_prototypes = 256
    d.global_size = 160  # = image size: SSR reads it on the 10x10 grid
    d.local_size = 64
    d.num_local = 4
    d.global_scale = (0.4, 1.0)  # share of the image area (DINO)
    d.local_scale = (0.05, 0.4)
    d.jitter_strength = 0.4
    d.jitter_prob = 0.8
    d.gray_prob = 0.2
    d.steps = 150
    d.batch_size = 32
    d.lr = 2e-3
    d.final_lr_ratio = 0.01
    d.warmup_steps = 10
    d.weight_decay = 0.04
    d.b2 = 0.999
    d.grad_clip = 3.0
    d.student_temp = 0.1  # DINO
    d.teacher_temp = 0.07  # DINO: 0.04 warmed up to 0.07 over 30 epochs
    d.warmup_teacher_temp = 0.04
    d.teacher_temp_warmup_epochs = 30
    # DINO's 0.996 suits 100+ epochs; this run lasts ~3 epochs.
    d.teacher_momentum = 0.98  # cosine to 1
    d.center_momentum = 0.9  # DINO
    d.freeze_prototypes_epochs = 1  # DINO freezes the last layer 1 epoch
    d.tied_qk_scale = 1.5  # [choice] W_k = W_q init (mimetic); 0 = off
    # iBOT's masked-patch loss (pretrain.dino.IBOT_FIELDS); 0 = DINO only.
    d.ibot_weight = 0.0
    d.mask_prob = 0.5
    d.mask_ratio = (0.1, 0.5)
    d.mask_min_patches = 4


def _encoder_dependent(c: config_dict.ConfigDict) -> None:
    """SSR fields that follow from the tiny encoders' depth."""
    layers = c.pretrain.clip.vision_layers
    # [choice] The affinity reads every block of the tiny CLIP (WeCLIP reads
    # the last 8 of ViT-B/16's 12; the real-data presets keep that). The
    # tiny CLIP's attention is purest in its first block (fg purity per
    # block 0.64 / 0.49 / 0.37 / 0.35), so WeCLIP's share (the last 3 of 4)
    # leaves out the block that carries the object: with all 4 the "+CLIP
    # attention" step gains on the initial CAM (39.4 vs 35.4 on the train
    # split, pretrain_report) and over three seeds of the embedded run it
    # holds (+3.5, sd 1.0; pseudo labels 37.5 -> 37.9, +0.3 to +0.4 at
    # every seed); docs/diagnostics.md, session 20.
    c.sgc.clip_layers = layers
    # WeCLIP: the decoder reads blocks 1..11 of 12, i.e. all but the last.
    c.model.decoder.num_layers_in = max(1, layers - 1)


def _ssr(c: config_dict.ConfigDict) -> None:
    """SSR itself on the world: the real pipeline, CPU-sized numbers."""
    # [choice] GradCAM at the tiny CLIP's own learned logit scale (about 21);
    # CLIP-ES's 100 is the real CLIP's learned scale and saturates the tiny
    # one's softmax (docs/pretrain.md: 4-10 mIoU of initial seeds).
    c.cam.logit_scale = 0.0
    # The tiny CLIP was pretrained with CLIP's mean/std; feed it those (the
    # WeCLIP ImageNet quirk is kept for the real CLIP). DINO always gets
    # ImageNet statistics, as it was pretrained.
    c.data.normalization = "clip"
    # WeCLIP's optimiser (lr 2e-4, decoder x10, warmup, poly): the paper's
    # lr 1e-5 is for 30k steps at batch 128, not a few hundred CPU steps.
    config_defaults.apply_preset(c, "weclip", "synthetic")
    # [choice] The CMPA heads at a tenth of that rate (2e-5; the decoder keeps
    # 2e-3). At 2e-4, heads trained on ground-truth-masked pools lower the
    # initial CAM by 10.7 points on the full world; at 2e-5 they raise it by
    # 2.1, and in the embedded smoke run the CMPA CAM gains +1.8 / +2.5 (seeds
    # 0 / 1) on the train split (docs/diagnostics.md, 2026-12-05). The paper's
    # lr 1e-5 may be the CMPA part's own (shared/reference/ssr_paper.md §9.3).
    c.optim.heads_lr_mult = 0.1
    # [choice] Eq. 9-11 read literally: the fused attention, whose rows the
    # softmax already normalises, propagates the CAM in one product
    # (CAM_refine = A*·CAM), without WeCLIP's 3 Sinkhorn rounds and T·T
    # (kept for the real CLIP). On the tiny encoders the Sinkhorn column
    # normalisation removes the ~2.3x attention mass that foreground
    # patches receive (tools/attention_mass.py) and T·T halves the
    # foreground purity (0.48 -> 0.30); with this reading the train-split
    # pseudo labels rise 30.0 -> 37.3 and "+CLIP attention" 24.5 -> 34.8
    # (pretrain_report, docs/diagnostics.md "purity threshold"; 3 seeds in
    # the README). The transition is still symmetrised, as WeCLIP.
    c.sgc.sinkhorn_iters = 0
    c.sgc.transition_power = 1
    c.train.batch_size = 16
    c.train.num_steps = 300
    c.train.log_every = 10
    c.train.eval_every = 0  # embedded.py scores once at the end
    c.train.checkpoint_every = 100
    c.cmpa.recluster_every = 100  # [paper] 5,000 of 30,000 steps; same share
    c.cmpa.bank_size = 1024
    c.data.num_workers = 2
    c.eval.long_side = c.synthetic.image_size  # native size of the world
    c.eval.seed_size = c.synthetic.image_size
    c.eval.batch_size = 16
    c.eval.max_images = 0


def _smoke(c: config_dict.ConfigDict) -> None:
    c.synthetic.num_train = 400
    c.synthetic.num_val = 100
    k = c.pretrain.clip
    k.vision_width, k.vision_layers = 48, 3
    k.text_layers = 2
    k.steps, k.batch_size, k.warmup_steps = 150, 32, 15
    d = c.pretrain.dino
    d.width, d.layers = 48, 3
    d.num_local = 2
    d.num_prototypes = 128
    d.head_hidden = 128
    d.steps, d.batch_size, d.warmup_steps = 40, 16, 4
    c.train.num_steps = 60
    c.train.batch_size = 8
    c.train.checkpoint_every = 60
    c.cmpa.recluster_every = 20
    c.cmpa.bank_size = 256


def _tiny(c: config_dict.ConfigDict) -> None:
    c.synthetic.num_train = 16
    c.synthetic.num_val = 4
    c.synthetic.image_size = 64
    k = c.pretrain.clip
    k.vision_width, k.vision_layers, k.vision_heads = 32, 2, 2  # >= 2: the
    # decoder reads the blocks before the last, GradCAM the last
    k.text_width, k.text_layers, k.text_heads = 32, 1, 2
    k.image_size = 48  # 3x3 grid, resized to 4x4 on the 64 px world
    k.mlp_ratio = 2
    k.projection_dim = 16
    k.steps, k.batch_size, k.warmup_steps = 3, 8, 1
    k.lr = 1e-3
    d = c.pretrain.dino
    d.width, d.layers, d.heads = 32, 1, 2
    d.mlp_ratio = 2
    d.head_hidden, d.head_bottleneck, d.num_prototypes = 32, 16, 64
    d.global_size, d.local_size, d.num_local = 64, 32, 2
    d.steps, d.batch_size, d.warmup_steps = 3, 8, 1
    d.lr = 1e-3
    d.freeze_prototypes_epochs = 0
    c.pretrain.progress = False
    config_defaults.shrink_for_tests(c)


def _dinov2(c: config_dict.ConfigDict) -> None:
    """The affinity encoder as a tiny DINOv2 (HF `Dinov2Model`), trained by
    the same self-distillation (`pretrain.dino`) with its own patch size.

    [choice] Patch 14, DINOv2's: on the 160 px world it reads an 11x11 grid
    (154 px) where CLIP/16 reads 10x10, so SGC gets its affinity through
    the resampling of `models.encoders.patch_affinity`, as with a real
    DINOv2 on CLIP ViT-B/16; on the 64 px tiny world both grids are 4x4 but
    of 14 vs 16 px cells (the resampling is still not the identity). The
    crops are the DINO ones floored to multiples of 14 (global = the
    largest grid the world's images hold, so SSR uses the positions at the
    size they were trained at; local 64 → 56 px), which keeps the local
    crops' token count of the DINO run (4x4; 2x2 on the tiny world).
    Registers: 0 (HF `Dinov2Model`); `pretrain.dino.registers=4` gives
    `Dinov2WithRegistersModel`.
    """
    c.model.dino_kind = "dinov2"
    d = c.pretrain.dino
    d.patch_size = 14
    d.registers = 0
    d.global_size = c.synthetic.image_size // d.patch_size * d.patch_size
    d.local_size = d.local_size // d.patch_size * d.patch_size


def _parse(arg: str) -> tuple[str, set[str]]:
    """"size[,option...]" → (size, options); ValueError when unknown."""
    parts = [p.strip() for p in (arg or "").split(",")]
    sizes = [p for p in parts if p not in OPTIONS]
    options = {p for p in parts if p in OPTIONS}
    if len(sizes) > 1 and "" in sizes:
        sizes = [p for p in sizes if p]
    if len(sizes) > 1 or (sizes and sizes[0] not in VARIANTS):
        raise ValueError(
            f"bad config argument {arg!r}: use '' (the full default), "
            "'smoke' or 'tiny', optionally with ',dinov2' (e.g. "
            "'smoke,dinov2', or 'dinov2' for the full default)")
    return (sizes[0] if sizes else ""), options


def get_config(arg: str = ""):
    arg, options = _parse(arg)
    c = config_defaults.base_config()

    # --- data: the synthetic world -------------------------------------------
    # name, crop 160, 11 classes, at most 4 per image, splits train / val /
    # train: the spec in ssr_jax/data/specs.py (classes.json agrees).
    config_defaults.apply_dataset(c, "synthetic")
    _world(c)

    # --- tiny encoders: pretraining ------------------------------------------
    _pretrain(c)

    _ssr(c)
    if arg == "smoke":
        _smoke(c)
    elif arg == "tiny":
        _tiny(c)
    if "dinov2" in options:
        _dinov2(c)
    _encoder_dependent(c)
    if arg == "tiny":
        c.data.crop_size = c.synthetic.image_size
    return c
