"""Default values shared by every config in `configs/`.

Plain `ml_collections`, no heavy imports: config files import this module.
Tags in comments follow SPEC.md: [paper] stated by SSR, [WeCLIP] inherited
from the WeCLIP code, [choice] our decision where the paper is silent. Every
[choice] is a field here so that a user can change it from the command line,
e.g. `--config.sgc.theta_r=0.6`.
"""

from ml_collections import config_dict

from ssr_jax.data import specs

# Dataset presets (classes, splits, class limits, batch and schedule per
# optimiser preset) live in the dataset specs, ssr_jax/data/specs.py.
VOC_MAX_CLASSES_PER_IMAGE = specs.VOC.max_classes_per_image
COCO_MAX_CLASSES_PER_IMAGE = specs.COCO.max_classes_per_image


def base_config() -> config_dict.ConfigDict:
    """Everything shared by VOC, COCO and the synthetic world."""
    c = config_dict.ConfigDict()
    c.mode = "train"  # train | eval | pseudo_labels
    c.seed = 0
    # Training seeds of a sweep, e.g. --config.seeds=0,1,2: () = one run
    # with `seed`. Embedded default only (ssr_jax/embedded.py `sweep`):
    # <workdir>/seed<N>/ each, sweep.json with mean ± sd.
    c.seeds = ()
    # With `seeds`: seed N of the sweep also pretrains (or reuses from the
    # cache) its own tiny encoders with `pretrain.seed=N`, so the spread
    # covers the encoders' draw as well as SSR's training. Off: the
    # encoders are fixed (`pretrain.seed`) and only SSR's seed varies.
    c.sweep_encoders = False

    # --- data ---------------------------------------------------------------
    c.data = d = config_dict.ConfigDict()
    voc = specs.VOC  # the defaults below are VOC's (`apply_dataset`)
    d.name = voc.name  # a registered dataset: specs.names()
    d.root = ""  # dataset root (layout and preparation: docs/data.md)
    d.train_split = voc.train_split  # list file under ImageSets/Segmentation
    d.val_split = voc.val_split
    d.seed_split = voc.seed_split  # where CAM seeds / pseudo labels are scored
    d.strict = True  # corrupt image: error (True) or counted skip (False)
    d.num_classes = voc.num_classes  # including background
    d.ignore_index = voc.ignore_index
    d.crop_size = voc.crop_size  # [WeCLIP] training crop, patch multiple
    d.rescale_range = (0.5, 2.0)  # [WeCLIP] random rescale ratio
    d.hflip = True  # [WeCLIP] random horizontal flip
    d.normalization = "imagenet"  # [WeCLIP quirk] imagenet | clip mean/std
    d.max_classes_per_image = voc.max_classes_per_image  # static padding
    # Class-slot counts the train step is compiled for (issue 15): each
    # batch runs GradCAM/SGC/PAR on the smallest that holds its largest
    # class count (entries above max_classes_per_image are dropped, which
    # is always added: VOC (1, 2, 3, 6), COCO (1, 2, 3, 6, 18)); one
    # compilation per bucket used. () = always max_classes_per_image.
    d.class_slot_buckets = (1, 2, 3, 6)
    d.label_source = "auto"  # auto | mask | xml: where image labels come from
    d.num_workers = 4  # input-pipeline threads (SLIC runs there)
    d.prefetch = 8  # batches prefetched per process
    d.cache_dir = ""  # label/SLIC caches; "" = ~/.cache/ssr_jax/data/...
    d.shuffle_seed = 0
    # Where examples are read from: "folders" (the files under data.root)
    # or "tfds" (the array_record TFDS dataset that `python -m
    # ssr_jax.data.build` wrote under data.tfds_dir, superpixels included;
    # docs/data.md "TFDS datasets").
    d.source = "folders"
    d.tfds_dir = ""  # TFDS data_dir: local path or gs:// bucket

    # --- model --------------------------------------------------------------
    c.model = m = config_dict.ConfigDict()
    m.clip_path = ""  # HF snapshot dir of openai/clip-vit-base-patch16
    m.dino_path = ""  # HF snapshot dir of facebook/dino-vits16 (or DINOv2)
    # [choice] affinity encoder behind dino_path: "dino" (ViT-S/16, the
    # paper's) | "dinov2" (ViT/14, with or without registers, WeCLIP+'s);
    # see ssr_jax/models/encoders.py.
    m.dino_kind = "dino"
    m.dtype = "float32"  # frozen-encoder compute dtype: float32 | bfloat16
    m.decoder = dec = config_dict.ConfigDict()
    dec.num_layers_in = 11  # [WeCLIP] CLIP blocks 1..11 feed the decoder
    dec.embed_dim = 256  # [WeCLIP] per-block MLP width and fuse width
    dec.depth = 3  # [WeCLIP] transformer decoder layers
    dec.heads = 8  # [WeCLIP]
    dec.dropout = 0.1  # [WeCLIP] Dropout2d after the fuse conv

    # --- text bank ----------------------------------------------------------
    c.text = t = config_dict.ConfigDict()
    t.template = "a clean origami {}."  # [WeCLIP] prompt template
    t.cache = True  # cache the embedded bank beside the workdir (.npz)

    # --- initial CAM (GradCAM) ---------------------------------------------
    c.cam = cam = config_dict.ConfigDict()
    # [choice] logits through the CMPA heads, how CMPA raises the initial CAM.
    cam.projected = True
    # [choice] GradCAM activation: "ln1_output" is what CLIP-ES/WeCLIP hook
    # (forward hook on resblocks[-1].ln_1); "ln1_input" is the block input.
    cam.target = "ln1_output"
    # [WeCLIP] cosine similarity scale; 0 = the CLIP checkpoint's learned
    # exp(logit_scale) (100 for OpenAI CLIP, which is where 100 comes from).
    cam.logit_scale = 100.0

    # --- CMPA (Eq. 1-6) -----------------------------------------------------
    c.cmpa = p = config_dict.ConfigDict()
    # [choice] Table 4 variants: none | feature | intra | cross (SSR)
    p.variant = "cross"
    p.hidden_dim = 512  # [choice] ISA/TSA: Dense(512)-BN-ReLU-Dense(dim)
    p.dim = 256  # [choice] d2
    p.tied_init = True  # [choice] TSA initialised as a copy of ISA
    # [choice] both heads start as x -> x/|x| (needs hidden_dim >= 2 x and
    # dim >= the CLIP embedding width): the projected CAM starts at plain
    # CLIP's. Off: the embedded table was measured without it.
    p.identity_init = False
    # [choice] leave crop-padding tokens out of ISA's BatchNorm statistics
    # and the masked pooling. Off: the embedded table was measured with
    # them in (docs/diagnostics.md).
    p.valid_tokens_only = False
    # [choice] TSA(background prompts) as extra negatives of the InfoNCE
    # (never positives). Off: the paper's Eq. 3-6 has only the foreground
    # text prototypes (docs/diagnostics.md measures it on a constructed
    # problem).
    p.background_negatives = False
    # [choice] add w x L_bg to L_proto: the tokens pooled under 1 - max CAM
    # must match TSA(background prompts), not a class's TSA(text)
    # (cmpa.background_pool_loss). Off: not in the paper; measured with the
    # oracle rows in docs/diagnostics.md.
    p.background_pool = False
    p.background_pool_weight = 1.0
    # [choice] the heads whose GradCAM masks the pooled features (Eq. 2):
    # "live" (the heads being trained; the paper's reading) | "ema" (a slow
    # copy, ema = decay x ema + (1 - decay) x live after each step, in the
    # train state), which breaks the loop where the CAM that pools the
    # heads' training features comes from those heads. With "ema" the whole
    # pseudo-label path runs with the slow copy. Off: not in the paper;
    # measured in docs/diagnostics.md.
    p.pool_source = "live"
    p.pool_ema_decay = 0.99
    p.tau_init = 0.05  # [paper] learnable temperature, stored as log tau
    p.tau_min = 0.01  # [choice] clamp for log tau
    p.recluster_every = 5000  # [paper] prototype update interval (steps)
    p.positive = "kmeans"  # [choice] kmeans (cluster pseudo-label) | class
    p.num_prototypes = 0  # [choice] K; 0 = number of foreground classes
    p.kmeans_iters = 20  # [choice] Lloyd iterations
    p.bank_size = 4096  # [choice] feature bank (ring buffer) in train state

    # --- SGC (Eq. 7-11) -----------------------------------------------------
    c.sgc = s = config_dict.ConfigDict()
    s.use_clip_attn = True  # Table 3 step 2: propagate with CLIP attention
    s.use_dino_attn = True  # Table 3 step 3: fuse DINO attention
    # Table 3 step 4: superpixel (SGC) | box (WeCLIP/CLIP-ES CAA) | none
    s.mask = "superpixel"
    s.clip_weight = 0.4  # [paper] CLIP:DINO = 0.4:0.6
    s.dino_weight = 0.6  # [paper]
    s.clip_layers = 8  # [WeCLIP] mean of the last 8 blocks' attention
    # [paper assumption] A_DINO = the last block's head-mean attention
    # (shared/reference/ssr_paper.md ambiguity 12); n > 1 = the mean of the
    # last n blocks, as for CLIP.
    s.dino_layers = 1
    s.sinkhorn_iters = 3  # [WeCLIP] column/row normalisation rounds
    # [choice] power of the symmetrised transition matrix: 2 = WeCLIP's
    # T·T (compute_trans_mat) | 1 = the paper's Eq. 11 read literally
    # (CAM_refine = A*·CAM, one product). Default kept: the embedded table
    # was measured with 2; issue 10 measures 1 (docs/diagnostics.md).
    s.transition_power = 2
    s.box_threshold = 0.4  # [WeCLIP] scoremap2bbox threshold (COCO 0.7)
    s.slic_segments = 100  # [choice] skimage SLIC n_segments
    s.slic_compactness = 10.0  # [choice]
    s.max_segments = 256  # [choice] static padding of superpixel ids
    s.slic_cache = True  # [choice] SLIC once per image, ids transformed
    s.colour_k = 8  # [choice] K of the colour K-means over superpixels
    s.colour_iters = 10  # [choice] Lloyd iterations of the colour K-means
    s.colour_space = "lab"  # [choice] lab | rgb
    # [choice] start of the colour K-means: lightness_ranks (centres at
    # evenly spaced L ranks of the superpixels; can merge distinct colours
    # of similar lightness, docs/diagnostics.md) | kmeans++ (seeded greedy
    # k-means++, separates them). Default kept: the embedded table was
    # measured with it.
    s.kmeans_init = "lightness_ranks"
    s.kmeans_seed = 0  # PRNG seed of the kmeans++ start
    # [choice] position term of the colour K-means (0 = colour only, the
    # paper's Eq. 8): each superpixel point also holds its mean position
    # x 100 x this, so one colour far apart can split (docs/diagnostics.md)
    s.position_weight = 0.0
    # [choice] readings of Eq. 7 (issue 10, docs/diagnostics.md; defaults =
    # the reading the embedded table was measured with):
    # the ratio r_k's denominator: cluster (the cluster's own activation) |
    # image (the class's total activation over the valid image)
    s.ratio_denominator = "cluster"
    # the unit that passes θ_r: cluster (a colour cluster, whole) |
    # superpixel (each SLIC superpixel, no colour K-means) | cluster_seeded
    # (a passing cluster's superpixels holding a pixel with CAM > θ_h)
    s.zone_unit = "cluster"
    # True: the zone is intersected with the box mask (box_threshold), SGC
    # correcting CAA's box instead of replacing it
    s.intersect_box = False
    s.theta_h = 0.4  # [choice] high-confidence threshold (COCO 0.7)
    s.theta_r = 0.5  # [choice] ratio threshold for a target cluster
    s.patch_fraction = 0.5  # [choice] patch is target if >= this pixel share
    s.segment_impl = "segment"  # segment (scatter, CPU/GPU) | onehot (TPU)

    # --- pseudo labels / PAR -----------------------------------------------
    c.par = r = config_dict.ConfigDict()
    r.iters = 20  # [WeCLIP]
    r.dilations = (1, 2, 4, 8, 12, 24)  # [WeCLIP]
    r.pos_weight = 0.01  # [WeCLIP] colour + 0.01 * position affinity
    r.temperature = 0.3  # [WeCLIP]
    r.bg_power = 1.0  # [WeCLIP] background = (1 - max cam) ** bg_power

    # --- losses (Eq. 12) ----------------------------------------------------
    c.loss = lo = config_dict.ConfigDict()
    lo.proto_weight = 1.0  # [paper]
    lo.seg_weight = 0.1  # [paper] gamma
    lo.aff_weight = 0.0  # [WeCLIP] affinity loss, off for SSR (0.1 in WeCLIP)
    lo.aff_radius = 8  # [WeCLIP]
    lo.rfm = False  # [WeCLIP] refinement module, off for SSR
    lo.rfm_start = 15000  # [WeCLIP] step at which RFM switches on
    lo.rfm_layers = 6  # [WeCLIP] blocks gated by RFM (COCO 10)

    # --- optimiser ----------------------------------------------------------
    c.optim = o = config_dict.ConfigDict()
    o.preset = "paper"
    o.lr = 1e-5  # [paper]
    o.weight_decay = 2e-3  # [paper]
    o.decoder_lr_mult = 1.0  # [WeCLIP] 10 in the weclip preset
    # [choice] the CMPA heads (ISA, TSA, log τ) at lr × heads_lr_mult. 1.0 in
    # both presets; the synthetic default uses 0.1 (docs/diagnostics.md: at
    # WeCLIP's 2e-4 the heads lower the CAM even on ground-truth pools).
    # ssr_paper.md §9.3: the paper's lr 1e-5 may be the CMPA part's only.
    o.heads_lr_mult = 1.0
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.warmup_steps = 50  # [WeCLIP] linear warmup
    o.warmup_ratio = 1e-6  # [WeCLIP]
    o.poly_power = 1.0  # [WeCLIP] poly decay; 0 = constant after warmup
    o.grad_clip = 0.0  # [choice] global-norm clip, 0 = off

    # --- training loop ------------------------------------------------------
    c.train = tr = config_dict.ConfigDict()
    tr.batch_size = 128  # [paper] global batch
    tr.num_steps = 30000  # [paper]
    tr.log_every = 50
    tr.eval_every = 2000  # 0 = no in-training eval
    tr.checkpoint_every = 1000
    tr.keep_checkpoints = 3
    # Orbax checkpoint directory; "" = <workdir>/checkpoints. May be gs://
    # (multi-host TPU: every host writes its shards there; launch/tpu_vm.sh).
    tr.checkpoint_dir = ""
    tr.progress = True  # tqdm progress bar

    # --- evaluation ---------------------------------------------------------
    c.eval = ev = config_dict.ConfigDict()
    ev.checkpoint = ""  # eval mode: checkpoint dir or step ("" = latest)
    ev.split = "val"
    # Global images per eval step, rounded up to a multiple of the devices.
    ev.batch_size = 8
    # [WeCLIP] long side; [choice] sizes rounded to patch multiples.
    ev.long_side = 512
    ev.scales = (1.0, 0.75)  # [WeCLIP] test scales, logits averaged
    ev.flip = True  # [WeCLIP] also average the mirror image's logits
    # [choice] long side of the padded canvas where seeds are scored.
    ev.seed_size = 512
    ev.hook_seeds = True  # in-training eval also scores the CAM seeds
    ev.crf = False  # DenseCRF (needs the optional pydensecrf2)
    ev.crf_iters = 10  # [WeCLIP]
    ev.crf_pos_xy = 3.0
    ev.crf_pos_w = 3.0
    ev.crf_bi_xy = 64.0
    ev.crf_bi_rgb = 5.0
    ev.crf_bi_w = 4.0
    ev.crf_workers = 0  # 0 = half the CPU cores (DenseCRF is memory hungry)
    ev.save_predictions = True  # PNGs with the VOC palette
    # eval / pseudo_labels refuse to replace the reports of an earlier run
    # (eval/<split>/metrics.json, pseudo_labels/<split>/seeds.json).
    ev.overwrite = False
    ev.max_images = 0  # first images of each split evaluated; 0 = all
    # Synthetic world only (embedded default): also run the plain-CLIP
    # diagnostics of pretrain_report.seed_report (attention purity, oracle-
    # affinity Table 3 rows, initial-CAM P/R and false positives by
    # background kind, superpixel boundary recall) on the first
    # `diagnostics_images` seed images; results.json "diagnostics".
    ev.diagnostics = False
    ev.diagnostics_images = 500
    # With eval.diagnostics: also the SGC / box target-zone mask grid
    # (pretrain_report.MASK_GRID: object recall, background rejection and
    # the mIoU of the rows that use each mask), results.json
    # "diagnostics"["mask_grid"]. Off: it roughly triples the stage's time.
    ev.diagnostics_mask_grid = False

    # --- multi-host ---------------------------------------------------------
    c.distributed = dist = config_dict.ConfigDict()
    dist.initialize = "auto"  # auto (env vars / TPU VM) | yes | no
    dist.coordinator_address = ""
    dist.num_processes = 0
    dist.process_id = -1
    return c


def apply_dataset(c: config_dict.ConfigDict, dataset: str) -> None:
    """Sets the `data.*` fields (and the other fields the dataset changes,
    `spec.overrides`) from the registered spec of `dataset`."""
    spec = specs.get(dataset)
    d = c.data
    d.name = spec.name
    d.num_classes = spec.num_classes
    d.train_split = spec.train_split
    d.val_split = spec.val_split
    d.seed_split = spec.seed_split
    d.max_classes_per_image = spec.max_classes_per_image
    d.ignore_index = spec.ignore_index
    d.crop_size = spec.crop_size
    for path, value in spec.overrides:
        section, _, field = path.rpartition(".")
        c[section][field] = value


def apply_preset(c: config_dict.ConfigDict, preset: str, dataset: str) -> None:
    """Optimiser presets: `paper` (SSR's numbers) and `weclip` (WeCLIP's);
    the batch size and schedule of each are the dataset spec's."""
    spec = specs.get(dataset)
    if preset == "paper":
        c.optim.preset = "paper"
        c.optim.lr = 1e-5
        c.optim.weight_decay = 2e-3
        c.optim.decoder_lr_mult = 1.0
    elif preset == "weclip":
        c.optim.preset = "weclip"
        c.optim.lr = 2e-4
        c.optim.weight_decay = 0.01
        c.optim.decoder_lr_mult = 10.0
    else:
        raise ValueError(
            f"unknown preset {preset!r}; choose 'paper' or 'weclip'"
        )
    c.train.batch_size = spec.batch_size[preset]
    c.optim.warmup_steps = 50
    c.optim.poly_power = 1.0
    c.train.num_steps = spec.num_steps


def shrink_for_tests(c: config_dict.ConfigDict) -> None:
    """The `tiny` variant: same code path, laptop-sized numbers."""
    c.data.crop_size = 64
    c.data.num_workers = 2
    c.data.prefetch = 2
    c.train.batch_size = 2
    c.train.num_steps = 2
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 1
    c.train.progress = False
    c.cmpa.bank_size = 64
    c.cmpa.recluster_every = 1
    c.cmpa.kmeans_iters = 3
    c.sgc.clip_layers = 2  # tiny test encoders have 3 blocks
    c.model.decoder.num_layers_in = 2
    c.sgc.slic_segments = 16
    c.sgc.max_segments = 64
    c.sgc.colour_iters = 3
    c.par.iters = 2
    c.eval.long_side = 64
    c.eval.seed_size = 64
    c.eval.batch_size = 2
    c.eval.max_images = 2


def dataset_config(dataset: str, arg: str) -> config_dict.ConfigDict:
    """Config of a registered dataset in the VOC layout (`voc`, `coco`, or
    one added in ssr_jax/data/specs.py) from an argument like
    "weclip,tiny"."""
    parts = [p.strip() for p in (arg or "paper").split(",") if p.strip()]
    presets = [p for p in parts if p in ("paper", "weclip")]
    unknown = [p for p in parts if p not in ("paper", "weclip", "tiny")]
    if unknown or len(presets) > 1:
        raise ValueError(
            f"bad config argument {arg!r}: use one of 'paper'/'weclip', "
            "optionally followed by ',tiny'"
        )
    c = base_config()
    apply_dataset(c, dataset)
    apply_preset(c, presets[0] if presets else "paper", dataset)
    if "tiny" in parts:
        shrink_for_tests(c)
    return c
