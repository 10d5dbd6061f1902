"""Seed evaluator: CAM seeds and pseudo labels against the masks (SPEC §2;
the paper's Tables 3 and 4).

One entry point, `score_seeds(config, clip, dino, model, split, bank=)`:
`ssr.seed_labels` jitted and data-parallel over
`input_pipeline.seed_batches`, one confusion matrix per `SEED_ENTRIES`
entry; `seed_table` renders the result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import tqdm
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ssr_jax import build, cam, data_sources, input_pipeline, metrics, ssr
from ssr_jax.evaluators import common

# Seed-score entries (`ssr.seed_labels`): the paper's Table 4 pair, Table 3
# rows, final labels.
SEED_ENTRIES = ssr.SEED_ENTRIES
SEED_DESCRIPTIONS = {
    "cam_plain": "initial CAM, plain CLIP GradCAM (Table 4, no CMPA)",
    "cam_cmpa": "initial CAM through ISA/TSA (Table 4, CMPA)",
    "initial_cam": "initial CAM as configured (Table 3 row 1)",
    "clip_attn": "+ CLIP attention propagation (Table 3 row 2)",
    "clip_dino": "+ DINO attention (Table 3 row 3)",
    "sgc": "+ superpixel mask, SGC (Table 3 row 4)",
    "pseudo_labels": "final pseudo labels (SGC + PAR)",
}


@functools.lru_cache(maxsize=16)
def _seed_step(clip_def, dino_def, model_def, mesh, config: Any,
               slots: int):
    """jit(states, bank, batch) → (confusion counts per entry, number of
    real examples, label maps per entry), with `slots` class slots (a
    bucket, `cam.batch_slots`). `config` is the hashable `_method_config`,
    so that the cache survives across calls; label maps stay on device
    unless the caller fetches them."""
    num_classes = int(config.data.num_classes)
    ignore = int(config.data.ignore_index)

    def step(clip_state, dino_state, params, rest, fg, bg, batch):
        clip = nnx.merge(clip_def, clip_state)
        dino = (nnx.merge(dino_def, dino_state) if dino_def is not None
                else None)
        model = nnx.merge(model_def, params, rest)
        labels = ssr.seed_labels(clip, dino, model, batch, fg, bg, config,
                                 slots=slots)
        keep = batch["example_valid"][:, None, None]
        gt = jnp.where(keep, batch["mask"].astype(jnp.int32), ignore)
        counts = {k: metrics.confusion_matrix_jnp(v, gt, num_classes, ignore)
                  for k, v in labels.items()}
        maps = {k: v.astype(jnp.uint8) for k, v in labels.items()}
        return counts, jnp.sum(batch["example_valid"]), maps

    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    return jax.jit(step, in_shardings=(repl,) * 6 + (data,),
                   out_shardings=(repl, repl, data))


# The config sections the pseudo-label path reads (not eval/train/optim).
_METHOD_SECTIONS = ("data", "model", "text", "cam", "cmpa", "sgc", "par",
                    "loss")


def _method_config(config):
    """A hashable copy of the sections `ssr.seed_labels` reads."""
    from ml_collections import config_dict
    return config_dict.FrozenConfigDict(
        {k: config[k] for k in _METHOD_SECTIONS})


def score_seeds(config, clip, dino, model: ssr.SSRModel, split: str, *,
                bank: dict[str, Any], max_images: int | None = None,
                size: int | None = None,
                label_entries: Sequence[str] = (),
                on_batch: Callable[[dict, dict], None] | None = None,
                require_masks: bool = True, progress: bool = False,
                ) -> dict[str, Any]:
    """CAM-seed and pseudo-label quality on `split` (SPEC §2; Tables 3–4).

    Runs `ssr.seed_labels` jitted and data-parallel over
    `input_pipeline.seed_batches` (images with masks, long side `size`,
    zero-padded squares) and accumulates one confusion matrix per entry
    against the masks at the padded size (255 on padding; dummy rows
    dropped). Every process must call it (collective).

    Args:
      config: the run config.
      clip, dino, model: encoders (dino may be None: "clip_dino" then
        equals "clip_attn") and the trained model.
      split: a split with masks (default use: `data.seed_split`).
      bank: {"fg": [C, E], "bg": [M, E]} text bank.
      max_images: > 0 keeps the first ones; None = `eval.max_images`.
      size: canvas long side; None = `eval.seed_size`.
      label_entries: entries whose label maps are passed to `on_batch`.
      on_batch: called per batch with the process-local batch (numpy) and
        {entry: uint8 [b, S, S] this process's rows}.
      require_masks: False also runs the images without a mask (they are
        passed to `on_batch` and not scored).
      progress: a tqdm bar (with `train.progress`, process 0).

    Returns:
      {"split", "size", "num_images", "entries": {entry: metrics.scores}}.
    """
    ev = config.eval
    max_images = ev.max_images if max_images is None else max_images
    size = int(ev.seed_size if size is None else size)
    batch_size = common.global_batch_size(ev.batch_size)
    mesh = build.make_mesh()
    clip_def, clip_state = nnx.split(clip)
    dino_def, dino_state = (nnx.split(dino) if dino is not None
                            else (None, None))
    model_def, params, rest = build.split_model(model)
    clip_state, dino_state, params, rest, fg, bg = common.replicated(
        (clip_state, dino_state, params, rest, jnp.asarray(bank["fg"]),
         jnp.asarray(bank["bg"])), mesh)
    unknown = set(label_entries) - set(SEED_ENTRIES)
    if unknown:
        raise ValueError(f"unknown seed entries {sorted(unknown)}; choose "
                         f"from {SEED_ENTRIES}")
    method = _method_config(config)
    buckets = cam.slot_buckets(config.data.get("class_slot_buckets", ()),
                               config.data.max_classes_per_image)
    data_sh = NamedSharding(mesh, P("data"))
    accs: dict[str, metrics.ConfusionAccumulator] = {}
    num = 0
    batches = input_pipeline.seed_batches(config, split, batch_size, size,
                                          max_images=max_images,
                                          require_masks=require_masks)
    show = progress and bool(config.train.progress) and (
        jax.process_index() == 0)
    for local in tqdm.tqdm(batches, desc=f"seeds ({split})",
                           dynamic_ncols=True, mininterval=1.0,
                           disable=not show):
        batch = {k: jax.make_array_from_process_local_data(data_sh, v)
                 for k, v in local.items() if k != "index"}
        # One compilation per class-slot bucket used (as in training).
        step = _seed_step(clip_def, dino_def, model_def, mesh, method,
                          cam.batch_slots(local["labels"], buckets))
        counts, valid, maps = step(clip_state, dino_state, params, rest, fg,
                                   bg, batch)
        for k, c in counts.items():
            accs.setdefault(k, metrics.ConfusionAccumulator(
                int(config.data.num_classes), int(config.data.ignore_index),
            )).add_counts(c, already_global=True)
        num += int(valid)
        if on_batch is not None:
            on_batch(local, {k: common.local_rows(maps[k])
                             for k in label_entries if k in maps})
    names = data_sources.class_names(config)
    entries = {k: metrics.scores(accs[k].result(), names)
               for k in SEED_ENTRIES if k in accs}
    data = data_sources.load_split(config, split)
    with_mask = [i for i in data.usable if data.mask_paths[i] is not None]
    pool = with_mask if require_masks else list(data.usable)
    taken = pool[:max_images] if max_images > 0 else pool
    masked_taken = sum(data.mask_paths[i] is not None for i in taken)
    images = common.image_accounting(
        data, num if require_masks else masked_taken, max_images=max_images,
        beyond_max=len(pool) - len(taken),
        without_mask=len(data.usable) - len(with_mask),
        unreadable=max(0, len(taken) - num), warn=on_batch is None)
    return {"split": split, "size": size, "num_images": num,
            "images": images, "entries": entries}


def seed_table(result: dict[str, Any]) -> str:
    """Markdown: one row per seed entry (mIoU, precision, recall, %)."""
    def pct(x):
        return "—" if x is None else f"{100.0 * x:.2f}"

    masked = ("" if "num_masked" not in result else
              f", scored on the {result['num_masked']} with masks")
    lines = [f"Seeds on {result['split']!r} ({result['num_images']} images"
             f"{masked}, long side {result['size']}):", "",
             "| entry | what | mIoU | precision | recall |",
             "|---|---|---:|---:|---:|"]
    for k, s in result["entries"].items():
        lines.append(f"| {k} | {SEED_DESCRIPTIONS[k]} | {pct(s['miou'])} | "
                     f"{pct(s['mean_precision'])} | "
                     f"{pct(s['mean_recall'])} |")
    return "\n".join(lines) + "\n"
