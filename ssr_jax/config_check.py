"""Config validation: every user mistake found before any heavy work.

`validate(config)` returns a list of readable problems (empty when the config
is good). It checks types, ranges and choices, the static shapes jit needs,
and that the paths the run will read exist. The device-count check imports
JAX; everything else is plain Python.
"""

from __future__ import annotations

import importlib.util
import numbers
import os

from ml_collections import config_dict

from ssr_jax.data import specs

FIELD_HINT = (
    "Check the spelling against ssr_jax/config_defaults.py "
    "(e.g. --config.train.batch_size=8)."
)

MODES = ("train", "eval", "pseudo_labels")
SOURCES = ("folders", "tfds")
DINO_KINDS = ("dino", "dinov2")  # = ssr_jax.models.encoders.KINDS
PATCH = 16  # ViT-B/16 and ViT-S/16; the synthetic tiny encoders use 16 too


class ConfigError(ValueError):
    """A config problem found after start-up (e.g. by a loader)."""


def _choice(errors, name, value, options):
    if value not in options:
        errors.append(f"{name}={value!r}: choose one of {', '.join(options)}")


def _positive(errors, name, value, allow_zero=False):
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        errors.append(f"{name}={value!r}: must be {bound}")


def _dataset(errors, name) -> specs.DatasetSpec | None:
    """The spec of `data.name`, or None (and the error listing the
    registered datasets) when no dataset of that name is registered."""
    try:
        return specs.get(name)
    except specs.UnknownDatasetError as err:
        errors.append(str(err))
        return None


def _unit(errors, name, value):
    if not 0.0 <= value <= 1.0:
        errors.append(f"{name}={value!r}: must lie in [0, 1]")


def _seeds(errors, config, spec) -> None:
    """`seeds`: a sweep of distinct non-negative int training seeds, for
    the embedded default's training only."""
    seeds = tuple(config.get("seeds", ()) or ())
    if not seeds:
        if config.get("sweep_encoders", False):
            errors.append("sweep_encoders=True without seeds: it varies the "
                          "encoders across a seed sweep; add "
                          "--config.seeds=0,1,2 (one run: set "
                          "--config.pretrain.seed=N instead)")
        return
    bad = [s for s in seeds
           if isinstance(s, bool) or not isinstance(s, numbers.Integral)
           or s < 0]
    if bad:
        errors.append(f"seeds={seeds!r}: need non-negative integers, "
                      "comma-separated, e.g. --config.seeds=0,1,2")
    elif len(set(seeds)) != len(seeds):
        errors.append(f"seeds={seeds!r}: a seed is listed twice")
    if spec is not None and not spec.synthetic:
        errors.append(f"seeds={seeds!r}: a seed sweep is the embedded "
                      f"default's ({specs.SYNTHETIC.config_file}); for "
                      "other data run one --config.seed=N per --workdir")
    elif config.mode != "train":
        errors.append(f"seeds={seeds!r} with mode={config.mode!r}: a sweep "
                      "trains; to evaluate one seed pass "
                      "--workdir <sweep workdir>/seed<N> --config.seed=N "
                      "without --config.seeds")


def validate(config: config_dict.ConfigDict, check_devices: bool = True):
    """Returns a list of problems with `config` (empty if none)."""
    e: list[str] = []
    _choice(e, "mode", config.mode, MODES)
    d = config.data
    spec = _dataset(e, d.name)
    _choice(e, "data.normalization", d.normalization, ("imagenet", "clip"))
    _choice(e, "data.label_source", d.label_source, ("auto", "mask", "xml"))
    source = d.get("source", "folders")
    _choice(e, "data.source", source, SOURCES)
    if d.crop_size % PATCH:
        e.append(f"data.crop_size={d.crop_size}: must be a multiple of the "
                 f"patch size {PATCH}")
    _positive(e, "data.crop_size", d.crop_size)
    _positive(e, "data.num_classes", d.num_classes)
    if d.num_classes < 2:
        e.append("data.num_classes must count background plus >= 1 class")
    lo, hi = d.rescale_range
    if not 0 < lo <= hi:
        e.append(f"data.rescale_range={tuple(d.rescale_range)}: need "
                 "0 < low <= high")
    _positive(e, "data.max_classes_per_image", d.max_classes_per_image)
    buckets = d.get("class_slot_buckets", ())
    if not isinstance(buckets, (tuple, list)) or any(
            isinstance(x, bool) or not isinstance(x, numbers.Integral)
            or x < 1
            for x in buckets):
        e.append(f"data.class_slot_buckets={buckets!r}: need a tuple of "
                 "positive integers, e.g. (1, 2, 3, 6), or () for always "
                 "data.max_classes_per_image")
    _positive(e, "data.num_workers", d.num_workers, allow_zero=True)

    _choice(e, "model.dtype", config.model.dtype, ("float32", "bfloat16"))
    _choice(e, "model.dino_kind", config.model.dino_kind, DINO_KINDS)
    _choice(e, "cam.target", config.cam.target, ("ln1_output", "ln1_input"))
    _positive(e, "cam.logit_scale", config.cam.logit_scale, allow_zero=True)

    p = config.cmpa
    _choice(e, "cmpa.variant", p.variant, ("none", "feature", "intra", "cross"))
    _choice(e, "cmpa.positive", p.positive, ("kmeans", "class"))
    _positive(e, "cmpa.tau_init", p.tau_init)
    _positive(e, "cmpa.tau_min", p.tau_min)
    _positive(e, "cmpa.recluster_every", p.recluster_every)
    _positive(e, "cmpa.bank_size", p.bank_size)
    _positive(e, "cmpa.num_prototypes", p.num_prototypes, allow_zero=True)
    _positive(e, "cmpa.background_pool_weight",
              p.get("background_pool_weight", 1.0), allow_zero=True)
    _choice(e, "cmpa.pool_source", p.get("pool_source", "live"),
            ("live", "ema"))
    _unit(e, "cmpa.pool_ema_decay", p.get("pool_ema_decay", 0.99))
    if p.get("background_pool", False) and p.variant not in ("cross",
                                                             "feature"):
        e.append(f"cmpa.background_pool=True needs cmpa.variant 'cross' or "
                 f"'feature' (TSA trains), got {p.variant!r}")
    if config.cam.projected and p.variant == "none":
        e.append("cam.projected=True needs the CMPA heads; with "
                 "cmpa.variant='none' set cam.projected=False")

    s = config.sgc
    _choice(e, "sgc.mask", s.mask, ("superpixel", "box", "none"))
    _choice(e, "sgc.colour_space", s.colour_space, ("lab", "rgb"))
    _choice(e, "sgc.kmeans_init", s.get("kmeans_init", "lightness_ranks"),
            ("lightness_ranks", "kmeans++"))
    _choice(e, "sgc.segment_impl", s.segment_impl, ("segment", "onehot"))
    _choice(e, "sgc.ratio_denominator", s.get("ratio_denominator", "cluster"),
            ("cluster", "image"))
    _choice(e, "sgc.zone_unit", s.get("zone_unit", "cluster"),
            ("cluster", "superpixel", "cluster_seeded"))
    ib = s.get("intersect_box", False)
    if not isinstance(ib, bool):
        e.append(f"sgc.intersect_box={ib!r}: must be True or False (True "
                 "intersects the SGC zone with the box mask)")
    tp = s.get("transition_power", 2)
    if isinstance(tp, bool) or tp not in (1, 2):
        e.append(f"sgc.transition_power={tp!r}: choose 1 (Eq. 11 read "
                 "literally, one product) or 2 (WeCLIP's T·T)")
    pw = s.get("position_weight", 0.0)
    if not isinstance(pw, (int, float)) or isinstance(pw, bool) or pw < 0:
        e.append(f"sgc.position_weight={pw!r}: must be a number >= 0 "
                 "(0 = the colour-only K-means of Eq. 8)")
    if s.use_dino_attn and not s.use_clip_attn and s.clip_weight > 0:
        e.append("sgc.use_dino_attn without sgc.use_clip_attn: set "
                 "sgc.clip_weight=0 to propagate with DINO alone")
    for name in ("clip_weight", "dino_weight", "theta_h", "theta_r",
                 "patch_fraction", "box_threshold"):
        _unit(e, f"sgc.{name}", s[name])
    _positive(e, "sgc.clip_layers", s.clip_layers)
    _positive(e, "sgc.dino_layers", s.get("dino_layers", 1))
    _positive(e, "sgc.slic_segments", s.slic_segments)
    if s.max_segments < s.slic_segments:
        e.append(f"sgc.max_segments={s.max_segments} must be >= "
                 f"sgc.slic_segments={s.slic_segments}")
    _positive(e, "sgc.colour_k", s.colour_k)

    _positive(e, "par.iters", config.par.iters, allow_zero=True)
    for w in ("proto_weight", "seg_weight", "aff_weight"):
        _positive(e, f"loss.{w}", config.loss[w], allow_zero=True)

    o = config.optim
    _positive(e, "optim.lr", o.lr)
    _positive(e, "optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive(e, "optim.decoder_lr_mult", o.decoder_lr_mult)
    _positive(e, "optim.heads_lr_mult", o.get("heads_lr_mult", 1.0))
    _positive(e, "optim.warmup_steps", o.warmup_steps, allow_zero=True)

    t = config.train
    _positive(e, "train.batch_size", t.batch_size)
    _positive(e, "train.num_steps", t.num_steps)
    _positive(e, "train.log_every", t.log_every)
    _positive(e, "train.checkpoint_every", t.checkpoint_every, allow_zero=True)
    _positive(e, "train.keep_checkpoints", t.keep_checkpoints)

    ev = config.eval
    if ev.long_side < PATCH:
        e.append(f"eval.long_side={ev.long_side}: must be >= the patch size "
                 f"{PATCH}")
    if ev.seed_size < PATCH or ev.seed_size % PATCH:
        e.append(f"eval.seed_size={ev.seed_size}: must be a positive "
                 f"multiple of the patch size {PATCH}")
    if not ev.scales or any(x <= 0 for x in ev.scales):
        e.append(f"eval.scales={tuple(ev.scales)}: need positive scales")
    if ev.get("diagnostics", False) and spec is not None \
            and not spec.synthetic:
        e.append("eval.diagnostics=True reads the synthetic world's meta "
                 "(background kinds, class homes): it needs "
                 f"data.name={specs.SYNTHETIC.name!r} "
                 f"({specs.SYNTHETIC.config_file})")
    _positive(e, "eval.batch_size", ev.batch_size)
    _positive(e, "eval.max_images", ev.max_images, allow_zero=True)
    _positive(e, "eval.crf_workers", ev.crf_workers, allow_zero=True)
    _positive(e, "eval.crf_iters", ev.crf_iters)
    for name in ("crf_pos_xy", "crf_pos_w", "crf_bi_xy", "crf_bi_rgb",
                 "crf_bi_w"):
        _positive(e, f"eval.{name}", ev[name])
    if ev.crf and importlib.util.find_spec("pydensecrf") is None:
        e.append("eval.crf=True needs the optional DenseCRF package: "
                 "`pip install -e .[crf]` (pydensecrf2==1.1, built from "
                 "source with a C++ compiler), or set eval.crf=False")

    _seeds(e, config, spec)
    _choice(e, "distributed.initialize", config.distributed.initialize,
            ("auto", "yes", "no"))

    if source == "tfds" and spec is not None:
        # Imports tensorflow_datasets (about 2 s) and reads metadata.json.
        from ssr_jax import data_sources
        from ssr_jax.data import tfds_source

        e.extend(tfds_source.problems(config,
                                      data_sources.slic_params(config)))
    if spec is not None and spec.needs_root:
        _paths(e, config)
    if check_devices and not e:
        e.extend(device_errors(config))
    return e


def _snapshot_path(e: list[str], name: str, path: str) -> None:
    if not path:
        e.append(f"model.{name} is empty: point it at a Hugging Face "
                 "snapshot directory (config.json + model.safetensors)")
    elif os.path.isfile(path):
        e.append(f"model.{name}={path!r} is a file; a Hugging Face snapshot "
                 "DIRECTORY is expected (the folder holding config.json and "
                 f"model.safetensors): --config.model.{name}="
                 f"{os.path.dirname(path) or '.'}")
    elif not os.path.isdir(path):
        e.append(f"model.{name}={path!r} does not exist")


def splits_needed(config) -> list[str]:
    """The split lists this run reads (checked at start-up)."""
    d, t = config.data, config.train
    if config.mode == "eval":
        return [config.eval.split]
    if config.mode == "pseudo_labels":
        return [d.seed_split]
    out = [d.train_split]
    if t.eval_every:
        out.append(d.val_split)
        if config.eval.hook_seeds:
            out.append(d.seed_split)
    return list(dict.fromkeys(out))


def _paths(e: list[str], config) -> None:
    root = config.data.root
    if config.data.get("source", "folders") == "tfds":
        pass  # the TFDS dataset replaces data.root (checked above)
    elif not root:
        e.append("data.root is empty: point it at the dataset root "
                 "(layout and preparation: docs/data.md)")
    elif not os.path.isdir(root):
        e.append(f"data.root={root!r} does not exist (layout and "
                 "preparation: docs/data.md)")
    else:
        lists = os.path.join(root, "ImageSets", "Segmentation")
        have = (sorted(f[:-4] for f in os.listdir(lists)
                       if f.endswith(".txt")) if os.path.isdir(lists) else [])
        for split in splits_needed(config):
            if split not in have:
                fix = ""
                if split == "train_aug":
                    fix = (" (VOC train + SBD, see docs/data.md; or train on "
                           "VOC train: --config.data.train_split=train)")
                e.append(f"split list {os.path.join(lists, split + '.txt')} "
                         f"does not exist{fix}; lists present: "
                         f"{', '.join(have) or 'none'}")
    _snapshot_path(e, "clip_path", config.model.clip_path)
    # Eval reads only CLIP and the decoder: DINO is not needed there.
    if config.mode != "eval" and config.sgc.use_dino_attn:
        _snapshot_path(e, "dino_path", config.model.dino_path)
    elif config.model.dino_path and config.mode != "eval":
        _snapshot_path(e, "dino_path", config.model.dino_path)


def command_line_errors(config) -> list[str]:
    """Problems that only a user's override can cause (checked by main
    before `validate`)."""
    e = []
    name = config.data.name
    if name in specs.names() and specs.get(name).synthetic \
            and config.data.root:
        e.append(f"data.root={config.data.root!r}: "
                 f"{specs.get(name).config_hint} "
                 "generates and reads its own world and ignores data.root. "
                 "To run on a dataset use configs/voc.py or configs/coco.py "
                 "with --config.data.root; to move the world's cache use "
                 "--config.synthetic.root")
    return e


def device_errors(config) -> list[str]:
    """Checks against the devices (imports JAX: call after multi-host
    initialisation)."""
    import jax

    n = jax.device_count()
    if config.mode == "train" and config.train.batch_size % n:
        return [f"train.batch_size={config.train.batch_size} is not "
                f"divisible by the {n} devices; use a multiple of {n}"]
    return []
