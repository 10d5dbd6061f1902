"""Evaluation: segmentation (val), CAM seeds and pseudo labels (SPEC §2).

Entry points:

- `evaluate(config, workdir)` (`--config.mode=eval`): restores only the
  trained parameters and BatchNorm statistics (`eval.checkpoint`), runs the
  multi-scale + flip protocol on `eval.split`, writes
  `<workdir>/eval/<split>[_crf]/metrics.json`, `metrics.md` and prediction
  PNGs (VOC palette) under `predictions/`, prints the Markdown table.
- `export_pseudo_labels(config, workdir)` (`--config.mode=pseudo_labels`):
  the online pseudo labels of `data.seed_split` as PNGs at each image's
  original size (for multi-stage users), and the CAM-seed scores of the
  paper's Tables 3 and 4 against the masks.
- `evaluate_segmentation`, `score_seeds`: the reusable pieces.
- `make_eval_hook`: what the trainer calls every `train.eval_every` steps.

Segmentation protocol [WeCLIP test_msc_flip_voc.py]: resize the image
bilinearly (PyTorch semantics, no antialias) so that its long side is
`eval.long_side`; for each scale in `eval.scales` resize again, run the
image and its mirror image through CLIP blocks 1..L and the decoder
(deterministic), upsample each logit map bilinearly to the scale-1.0 logit
grid, flip the mirror's back and average the two, then average over
scales — logits, before any softmax, as WeCLIP. The average is upsampled
bilinearly to the original image size; argmax (or softmax → DenseCRF →
argmax with `eval.crf`).

[choice] Sizes are rounded to the nearest multiple of the patch size (at
least one patch), both for the long-side resize and for every scale;
WeCLIP truncates (`int(h * ratio)`) and its patch convolution then drops
the remainder, which makes the mirror image see different pixels. For the
common VOC sizes (500×375) the two agree exactly (512×384 and 384×288);
rounding keeps the number of jit shapes bounded (at most long_side/patch
per orientation) and the flip average exactly symmetric.

Batching: every process knows every image size (`voc.Split.sizes`), so the
split is planned once — images grouped by their scale-1.0 shape, each group
cut into global batches of `eval.batch_size` (rounded up to a multiple of
the device count, the last batch of a group padded with dummies) — and all
processes run the same shapes in the same order, data-parallel over the
"data" mesh axis with the train state's replicated sharding. Process p
reads rows [p·b, (p+1)·b) of each batch. One jitted function serves every
shape (jax.jit's cache; one compile per distinct shape), and it is cached
across calls (`_seg_step`), so the in-training hook compiles once.
Post-processing (upsampling to the original size, argmax, DenseCRF, PNGs)
runs on the host in a bounded pool, one image at a time.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from ssr_jax import (
    build,
    checkpointing,
    config_check,
    crf,
    input_pipeline,
    logs,
    metrics,
    ssr,
    xla_guard,
)
from ssr_jax.data import DataError, voc
from ssr_jax.data.transforms import long_side_hw, resize_nearest
from ssr_jax.models.resize import resize, resize_matrix

Array = jax.Array
PyTree = Any

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


# --- shapes -------------------------------------------------------------------
def round_to_patch(x: float, patch: int) -> int:
    """Nearest multiple of `patch`, at least `patch` ([choice], module doc)."""
    return max(patch, int(math.floor(x / patch + 0.5)) * patch)


def eval_hw(hw: Sequence[int], long_side: int, patch: int
            ) -> tuple[int, int]:
    """Scale-1.0 size: long side `long_side`, both sides patch multiples."""
    h, w = int(hw[0]), int(hw[1])
    ratio = long_side / max(h, w)
    return round_to_patch(h * ratio, patch), round_to_patch(w * ratio, patch)


def scale_hw(hw1: Sequence[int], scale: float, patch: int
             ) -> tuple[int, int]:
    """Size of one test scale of a scale-1.0 image of size `hw1`."""
    return (round_to_patch(hw1[0] * scale, patch),
            round_to_patch(hw1[1] * scale, patch))


def resize_image(image: np.ndarray, hw: Sequence[int]) -> np.ndarray:
    """uint8 [H, W, 3] → float32 [h, w, 3] (0..255), PyTorch bilinear
    (align_corners=False, no antialias) as WeCLIP's F.interpolate."""
    x = image.astype(np.float32)
    if tuple(hw) == x.shape[:2]:
        return x
    mh = resize_matrix(x.shape[0], int(hw[0]))
    mw = resize_matrix(x.shape[1], int(hw[1]))
    x = np.tensordot(mh, x, axes=(1, 0))
    return np.einsum("Ww,hwc->hWc", mw, x, optimize=True)


# --- the segmentation forward (inside jit) ------------------------------------
def single_scale_logits(clip, model: ssr.SSRModel, images: Array, *,
                        num_layers_in: int, normalization: str) -> Array:
    """Decoder logits of one batch at one size (SPEC §1.8, deterministic).

    Args:
      clip: the Flax CLIP (frozen).
      model: the trained `ssr.SSRModel`.
      images: [B, H, W, 3] float RGB in 0..255, H and W patch multiples.
      num_layers_in: CLIP blocks 1..L feeding the decoder (block 12 is not
        needed).
      normalization: `data.normalization`.

    Returns:
      [B, H/p, W/p, C] float32 logits.
    """
    vision = clip.vision
    patch = vision.config.patch_size
    grid = (images.shape[1] // patch, images.shape[2] // patch)
    x = vision.embed(ssr.normalise(images, normalization))
    _, out = vision.run_blocks(x, 0, num_layers_in)
    hidden = jnp.stack([h[:, 1:] for h in out["hidden"]])
    logits, _ = model.decoder(hidden, grid, deterministic=True)
    return logits.astype(jnp.float32)


def msc_logits(clip, model: ssr.SSRModel, images: Array, *,
               scales: Sequence[float], flip: bool, num_layers_in: int,
               normalization: str) -> Array:
    """Multi-scale (+ flip) averaged logits [WeCLIP test_msc_flip_voc.py].

    Args:
      clip, model, num_layers_in, normalization: `single_scale_logits`.
      images: [B, H1, W1, 3] float 0..255 at scale 1.0 (patch multiples).
      scales: static test scales; sizes rounded with `scale_hw`.
      flip: also run the mirror images and average with them.

    Returns:
      [B, H1/p, W1/p, C] float32 logits averaged over scales and flips at
      the scale-1.0 logit grid (before softmax).
    """
    b, h1, w1, _ = images.shape
    patch = clip.vision.config.patch_size
    grid1 = (h1 // patch, w1 // patch)
    total = None
    for s in scales:
        x = resize(images.astype(jnp.float32), scale_hw((h1, w1), s, patch))
        if flip:
            x = jnp.concatenate([x, x[:, :, ::-1]], axis=0)
        logits = resize(single_scale_logits(
            clip, model, x, num_layers_in=num_layers_in,
            normalization=normalization), grid1)
        if flip:
            logits = 0.5 * (logits[:b] + logits[b:, :, ::-1])
        total = logits if total is None else total + logits
    return total / len(scales)


# --- meshes, placement, caches ------------------------------------------------
def global_batch_size(requested: int) -> int:
    """`requested` rounded up to a multiple of the device count."""
    n = jax.device_count()
    return max(n, -(-int(requested) // n) * n)


def _local_rows(x: Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    shards = sorted(x.addressable_shards,
                    key=lambda s: s.index[0].start or 0)
    seen, parts = set(), []
    for s in shards:
        key = s.index[0].start or 0
        if key not in seen:
            seen.add(key)
            parts.append(np.asarray(s.data))
    return np.concatenate(parts)


def _replicated(tree: PyTree, mesh) -> PyTree:
    """Places `tree` replicated on `mesh` (a no-op where it already is).

    Multi-process, `device_put` cannot send a process-local array to a
    global sharding: local leaves (e.g. freshly loaded encoders) are
    assembled with `make_array_from_process_local_data` (the same values
    on every process); global leaves (the train state) are kept.
    """
    sharding = NamedSharding(mesh, P())

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding,
                                                      np.asarray(x))

    return jax.tree.map(put, tree)


@functools.lru_cache(maxsize=8)
def _seg_step(clip_def, model_def, mesh, scales: tuple[float, ...],
              flip: bool, num_layers_in: int, normalization: str):
    """jit(clip_state, params, rest, images) → msc logits; cached per
    structure so repeated evaluations (the training hook) reuse compiles."""
    def step(clip_state, params, rest, images):
        clip = nnx.merge(clip_def, clip_state)
        model = nnx.merge(model_def, params, rest)
        return msc_logits(clip, model, images, scales=scales, flip=flip,
                          num_layers_in=num_layers_in,
                          normalization=normalization)

    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    return jax.jit(step, in_shardings=(repl, repl, repl, data),
                   out_shardings=data)


# --- host post-processing pool ------------------------------------------------
def _num_workers(config) -> int:
    n = int(config.eval.crf_workers)
    return n if n > 0 else max(1, (os.cpu_count() or 2) // 2)


class _HostPool:
    """A bounded pool for per-image post-processing.

    Threads for the plain argmax (NumPy releases the GIL), spawned processes
    for DenseCRF (pydensecrf keeps the GIL: two threads ran no faster than
    one; spawn, because forking a process that runs JAX is unsafe). At
    most 2·workers images are in flight, so host memory stays bounded
    whatever the split size. `submit` and `drain` are generators: iterate
    them, or nothing is queued.
    """

    def __init__(self, workers: int, processes: bool):
        if processes:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"))
        else:
            self._pool = concurrent.futures.ThreadPoolExecutor(workers)
        self._limit = 2 * workers
        self._pending: list[tuple[concurrent.futures.Future, Any]] = []

    def submit(self, fn, *args, meta: Any) -> Iterator[tuple[Any, Any]]:
        """Queues fn(*args); yields (meta, result) of finished jobs."""
        self._pending.append((self._pool.submit(fn, *args), meta))
        while len(self._pending) >= self._limit:
            yield from self._pop()

    def _pop(self) -> Iterator[tuple[Any, Any]]:
        future, meta = self._pending.pop(0)
        yield meta, future.result()

    def drain(self) -> Iterator[tuple[Any, Any]]:
        while self._pending:
            yield from self._pop()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def save_label_png(path: str, labels: np.ndarray) -> None:
    """Writes uint8 [H, W] class ids as a VOC-palette PNG (indices kept)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    im = Image.fromarray(np.asarray(labels, np.uint8))
    im.putpalette(voc.palette())
    im.save(path)


# --- segmentation evaluation --------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Batch:
    hw1: tuple[int, int]
    indices: np.ndarray  # int64 [B_global]; −1 = dummy


def plan_batches(sizes: np.ndarray, examples: np.ndarray, long_side: int,
                 patch: int, batch_size: int) -> list[_Batch]:
    """Groups `examples` by scale-1.0 shape into padded global batches.

    Args:
      sizes: int [N, 2] (H, W) of every listed id.
      examples: int [U] ids to evaluate, in list order.
      long_side, patch: see `eval_hw`.
      batch_size: global batch size.

    Returns:
      Batches in a fixed order (shapes sorted; list order inside a shape),
      the same on every process.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i in examples:
        groups.setdefault(eval_hw(sizes[i], long_side, patch),
                          []).append(int(i))
    out = []
    for hw1 in sorted(groups):
        ids = groups[hw1]
        for k in range(0, len(ids), batch_size):
            chunk = np.full(batch_size, -1, np.int64)
            part = ids[k:k + batch_size]
            chunk[:len(part)] = part
            out.append(_Batch(hw1, chunk))
    return out


class _Loader:
    """Reads and resizes this process's rows of planned batches."""

    def __init__(self, config, split: voc.Split, workers: int):
        self.split = split
        self.strict = bool(config.data.strict)
        self.num_classes = int(config.data.num_classes)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
        self.skipped: list[str] = []  # reasons, data.strict=False

    def _one(self, idx: int, hw1: tuple[int, int]) -> dict | None:
        if idx < 0:
            return None
        try:
            image = self.split.read_image(idx)
            mask = self.split.read_mask(idx, self.num_classes)
        except DataError as e:
            if self.strict:
                raise
            logs.warn(f"skipping (data.strict=False): {e}")
            self.skipped.append(str(e))
            return None
        return {"image": image, "mask": mask, "resized":
                resize_image(image, hw1), "name": self.split.names[idx]}

    def submit(self, batch: _Batch, rows: slice
               ) -> list[concurrent.futures.Future]:
        return [self._pool.submit(self._one, int(i), batch.hw1)
                for i in batch.indices[rows]]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _clip_patch(clip) -> int:
    return int(clip.vision.config.patch_size)


def evaluate_segmentation(config, clip, model: ssr.SSRModel, split: str,
                          out_dir: str | None = None, *,
                          max_images: int | None = None,
                          save_predictions: bool | None = None,
                          max_predictions: int = 0,
                          use_crf: bool | None = None) -> dict[str, Any]:
    """Scores the decoder's segmentation of `split` (SPEC §2).

    Every process must call it (collective); process p predicts its rows
    of every planned batch and writes its own prediction PNGs.

    Args:
      config: the run config (`eval.*`, `data.*`, `model.decoder`).
      clip: the frozen Flax CLIP (its arrays may already be replicated).
      model: the trained `ssr.SSRModel`.
      split: list name under ImageSets/Segmentation.
      out_dir: where `predictions/<name>.png` go; None = no files.
      max_images: > 0 keeps the first ids of the split; None =
        `eval.max_images`.
      save_predictions: None = `eval.save_predictions` (needs `out_dir`).
      max_predictions: > 0 caps the PNGs written per process.
      use_crf: None = `eval.crf`.

    Returns:
      `metrics.scores` of the accumulated confusion matrix (None when no
      image of the split has a mask: predictions only) plus "num_images"
      (evaluated), "num_scored" (with a mask), "num_shapes" (jit shapes).
    """
    ev = config.eval
    max_images = ev.max_images if max_images is None else max_images
    save = ev.save_predictions if save_predictions is None else (
        save_predictions)
    save = bool(save) and out_dir is not None
    use_crf = ev.crf if use_crf is None else use_crf
    crf_params = crf.CRFParams.from_config(ev) if use_crf else None
    if use_crf:
        crf.require_densecrf()
    patch = _clip_patch(clip)
    data = voc.load_split(config, split)
    examples = data.usable[:max_images] if max_images > 0 else data.usable
    batch_size = global_batch_size(ev.batch_size)
    plan = plan_batches(data.sizes, examples, int(ev.long_side), patch,
                        batch_size)
    num_shapes = len({b.hw1 for b in plan})
    logging.info("eval %s: %d images, %d shapes, %d batches of %d",
                 split, len(examples), num_shapes, len(plan), batch_size)

    mesh = build.make_mesh()
    clip_def, clip_state = nnx.split(clip)
    model_def, params, rest = build.split_model(model)
    clip_state, params, rest = _replicated((clip_state, params, rest), mesh)
    step = _seg_step(clip_def, model_def, mesh,
                     tuple(float(s) for s in ev.scales), bool(ev.flip),
                     int(config.model.decoder.num_layers_in),
                     str(config.data.normalization))
    data_sh = NamedSharding(mesh, P("data"))
    local = batch_size // jax.process_count()
    rows = slice(jax.process_index() * local,
                 (jax.process_index() + 1) * local)

    num_classes = int(config.data.num_classes)
    acc = metrics.ConfusionAccumulator(num_classes,
                                       int(config.data.ignore_index))
    loader = _Loader(config, data, int(config.data.num_workers))
    pool = _HostPool(_num_workers(config), processes=use_crf)
    pred_dir = os.path.join(out_dir, "predictions") if save else ""
    counts = {"scored": 0, "written": 0}

    def finish(meta, pred):
        if meta["mask"] is not None:
            acc.add(pred, meta["mask"])
            counts["scored"] += 1
        if save and (max_predictions <= 0
                     or counts["written"] < max_predictions):
            save_label_png(os.path.join(pred_dir, meta["name"] + ".png"),
                           pred)
            counts["written"] += 1

    def post(items, logits):
        for item, lg in zip(items, logits, strict=True):
            if item is None:
                continue
            h0, w0 = item["image"].shape[:2]
            mh = resize_matrix(lg.shape[0], h0)
            mw = resize_matrix(lg.shape[1], w0)
            image = item["image"] if use_crf else None
            meta = {"mask": item["mask"], "name": item["name"]}
            yield from pool.submit(crf.predict, lg, mh, mw, image,
                                   crf_params, meta=meta)

    bar = tqdm.tqdm(total=len(plan), desc=f"eval ({split})",
                    dynamic_ncols=True, mininterval=1.0,
                    disable=not (out_dir is not None and config.train.progress
                                 and jax.process_index() == 0))
    try:
        futures = loader.submit(plan[0], rows) if plan else []
        previous = None
        for k, batch in enumerate(plan):
            bar.update(1)
            items = [f.result() for f in futures]
            if k + 1 < len(plan):
                futures = loader.submit(plan[k + 1], rows)
            images = np.zeros((local, *batch.hw1, 3), np.float32)
            for j, item in enumerate(items):
                if item is not None:
                    images[j] = item["resized"]
                    del item["resized"]
            logits = step(clip_state, params, rest,
                          jax.make_array_from_process_local_data(
                              data_sh, images))
            # Host work on the previous batch overlaps this device step.
            if previous is not None:
                for meta, pred in post(previous[0],
                                       _local_rows(previous[1])):
                    finish(meta, pred)
            previous = (items, logits)
        if previous is not None:
            for meta, pred in post(previous[0], _local_rows(previous[1])):
                finish(meta, pred)
        for meta, pred in pool.drain():
            finish(meta, pred)
    finally:
        bar.close()
        loader.close()
        pool.close()

    conf = acc.result()
    has_masks = any(data.mask_paths[i] is not None for i in examples)
    result: dict[str, Any] = {}
    if has_masks:
        result = metrics.scores(conf, voc.class_names(config))
    result.update(num_images=int(len(examples)),
                  num_scored=int(_sum_over_processes(counts["scored"])),
                  num_shapes=num_shapes)
    unreadable = _sum_over_processes(len(loader.skipped))
    without_mask = sum(data.mask_paths[i] is None for i in examples)
    result["images"] = image_accounting(
        data, result["num_scored"], max_images=max_images,
        beyond_max=len(data.usable) - len(examples),
        without_mask=without_mask,
        unreadable=unreadable, unreadable_reasons=loader.skipped,
        warn=out_dir is not None)
    if not has_masks:
        result["miou"] = None
    return result


def image_accounting(data: voc.Split, scored: int, *, max_images: int,
                     beyond_max: int, without_mask: int, unreadable: int,
                     unreadable_reasons: Sequence[str] = (),
                     warn: bool = True) -> dict[str, Any]:
    """How many images of a split were scored, and why the others were not
    (recorded in metrics.json / seeds.json; with `warn`, a shortfall is
    also printed as a warning)."""
    listed = len(data.names)
    out = {
        "listed": listed,
        "scored": int(scored),
        "not_scored": {
            "unusable (data.strict=False)": int(data.summary.num_skipped),
            f"beyond eval.max_images={max_images}": int(beyond_max),
            "no mask": int(without_mask),
            "unreadable when read (data.strict=False)": int(unreadable),
        },
        "unusable_examples": list(data.summary.problems[:10]),
        "unreadable_examples": list(unreadable_reasons)[:10],
    }
    missing = {k: v for k, v in out["not_scored"].items() if v}
    if missing and warn:
        logs.warn(f"split {data.name!r}: scored {scored} of {listed} listed "
                  "images; not scored: " + ", ".join(
                      f"{v} {k}" for k, v in missing.items()))
    return out


def _sum_over_processes(x: int) -> int:
    if jax.process_count() == 1:
        return int(x)
    from jax.experimental import multihost_utils
    return int(np.sum(multihost_utils.process_allgather(
        np.asarray(x, np.int32))))


# --- CAM seeds and pseudo labels ----------------------------------------------
@functools.lru_cache(maxsize=8)
def _seed_step(clip_def, dino_def, model_def, mesh, config: Any):
    """jit(states, bank, batch) → (confusion counts per entry, number of
    real examples, label maps per entry). `config` is the hashable
    `_method_config`, so that the cache survives across calls; label maps
    stay on device unless the caller fetches them."""
    num_classes = int(config.data.num_classes)
    ignore = int(config.data.ignore_index)

    def step(clip_state, dino_state, params, rest, fg, bg, batch):
        clip = nnx.merge(clip_def, clip_state)
        dino = (nnx.merge(dino_def, dino_state) if dino_def is not None
                else None)
        model = nnx.merge(model_def, params, rest)
        labels = ssr.seed_labels(clip, dino, model, batch, fg, bg, config)
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
    batch_size = global_batch_size(ev.batch_size)
    mesh = build.make_mesh()
    clip_def, clip_state = nnx.split(clip)
    dino_def, dino_state = (nnx.split(dino) if dino is not None
                            else (None, None))
    model_def, params, rest = build.split_model(model)
    clip_state, dino_state, params, rest, fg, bg = _replicated(
        (clip_state, dino_state, params, rest, jnp.asarray(bank["fg"]),
         jnp.asarray(bank["bg"])), mesh)
    unknown = set(label_entries) - set(SEED_ENTRIES)
    if unknown:
        raise ValueError(f"unknown seed entries {sorted(unknown)}; choose "
                         f"from {SEED_ENTRIES}")
    step = _seed_step(clip_def, dino_def, model_def, mesh,
                      _method_config(config))
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
        counts, valid, maps = step(clip_state, dino_state, params, rest, fg,
                                   bg, batch)
        for k, c in counts.items():
            accs.setdefault(k, metrics.ConfusionAccumulator(
                int(config.data.num_classes), int(config.data.ignore_index),
            )).add_counts(c, already_global=True)
        num += int(valid)
        if on_batch is not None:
            on_batch(local, {k: _local_rows(maps[k]) for k in label_entries
                             if k in maps})
    names = voc.class_names(config)
    entries = {k: metrics.scores(accs[k].result(), names)
               for k in SEED_ENTRIES if k in accs}
    data = voc.load_split(config, split)
    with_mask = [i for i in data.usable if data.mask_paths[i] is not None]
    pool = with_mask if require_masks else list(data.usable)
    taken = pool[:max_images] if max_images > 0 else pool
    masked_taken = sum(data.mask_paths[i] is not None for i in taken)
    images = image_accounting(
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


# --- checkpoints --------------------------------------------------------------
def checkpoint_location(config, workdir: str) -> tuple[str, int | None]:
    """(checkpoint directory, step or None = latest) from `eval.checkpoint`.

    "" → the latest step of `train.checkpoint_dir` (default
    `<workdir>/checkpoints`); "2000" → that step there; a path → a step
    directory (`.../checkpoints/2000`) or a directory of steps (latest).
    """
    default = config.train.checkpoint_dir or os.path.join(workdir,
                                                          "checkpoints")
    spec = str(config.eval.checkpoint).strip()
    if not spec:
        return default, None
    if spec.isdigit():
        return default, int(spec)
    path = epath.Path(spec)
    if path.name.isdigit() and (path / "state").exists():
        return str(path.parent), int(path.name)
    return spec, None


def restore_model(config, workdir: str, model: ssr.SSRModel
                  ) -> tuple[ssr.SSRModel, int, str]:
    """Restores the trained parameters and BatchNorm statistics only.

    The optimiser, feature bank and prototypes stay on disk
    (`Checkpointer.restore_subset`). Problems (no checkpoint, another
    model shape, e.g. another `data.num_classes`) raise
    `config_check.ConfigError` with the checkpoint's own explanation.

    Returns:
      (model with the restored state, step, checkpoint directory).
    """
    directory, step = checkpoint_location(config, workdir)
    # The saved "rest" also holds the dropout RNG state, which eval does
    # not need: restore only its BatchNorm statistics.
    graphdef, params, stats, other = nnx.split(model, nnx.Param,
                                               nnx.BatchStat, ...)
    target = _replicated({"params": params, "rest": stats}, build.make_mesh())
    try:
        ckpt = checkpointing.Checkpointer(directory, save_every=0,
                                          read_only=True)
        step, sub = ckpt.restore_subset(target, step=step, required=True)
    except checkpointing.CheckpointError as e:
        raise config_check.ConfigError(
            f"cannot restore the model for {config.mode}: {e}") from None
    logging.info("restored params of step %d from %s", step, directory)
    model = nnx.merge(graphdef, sub["params"], sub["rest"], other)
    return model, step, directory


def _check_crf(config) -> None:
    if config.eval.crf:
        try:
            crf.require_densecrf()
        except crf.CRFUnavailableError as e:
            raise config_check.ConfigError(str(e)) from None


def refuse_overwrite(config, out_dir: str, report: str) -> None:
    """ConfigError (before any model loads) when `out_dir/report` is left
    from an earlier run and `eval.overwrite` is off."""
    path = os.path.join(out_dir, report)
    if os.path.exists(path) and not config.eval.overwrite:
        raise config_check.ConfigError(
            f"{path} exists from an earlier run. Pass "
            "--config.eval.overwrite=True to replace it (and its PNGs), or "
            "move it away first.")


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# --- modes --------------------------------------------------------------------
def evaluate(config, workdir: str) -> dict[str, Any]:
    """`--config.mode=eval`: restore, evaluate `eval.split`, write reports.

    Writes `<workdir>/eval/<split>[_crf]/metrics.json` (the report
    returned here), `metrics.md` and `predictions/<id>.png` (VOC palette,
    `eval.save_predictions`); prints the Markdown table.
    """
    logs.setup_logging(workdir)
    _check_crf(config)
    out_dir = os.path.join(workdir, "eval", config.eval.split
                           + ("_crf" if config.eval.crf else ""))
    refuse_overwrite(config, out_dir, "metrics.json")
    # The decoder reads CLIP only: DINO is not loaded for eval.
    clip, dino, model = build.build_models(config, with_dino=False)
    build.check_models(config, clip, dino, pseudo_labels=False)
    model, step, directory = restore_model(config, workdir, model)
    ev = config.eval
    split = ev.split
    out_dir = os.path.join(workdir, "eval", split + ("_crf" if ev.crf
                                                      else ""))
    scores = evaluate_segmentation(config, clip, model, split, out_dir)
    report = {
        "split": split, "checkpoint": {"directory": directory,
                                       "step": step},
        "protocol": {"long_side": int(ev.long_side),
                     "scales": [float(s) for s in ev.scales],
                     "flip": bool(ev.flip), "crf": bool(ev.crf)},
        "scores": scores,
        "xla": xla_guard.report(),
    }
    if jax.process_index() == 0:
        _write_json(os.path.join(out_dir, "metrics.json"), report)
        if scores.get("per_class"):
            table = metrics.markdown_table(scores)
        else:
            table = (f"{scores['num_images']} images of {split!r} have no "
                     "masks: predictions only.\n")
        images = scores.get("images", {})
        header = (f"# {split}, step {step}{' + CRF' if ev.crf else ''}\n\n"
                  f"Scales {list(ev.scales)}, flip {bool(ev.flip)}, long "
                  f"side {ev.long_side}. Images scored: "
                  f"{images.get('scored')} of {images.get('listed')} "
                  "listed (not scored: see metrics.json \"images\").\n\n")
        _write_text(os.path.join(out_dir, "metrics.md"), header + table)
        print(header + table, flush=True)
    return report


def export_pseudo_labels(config, workdir: str) -> dict[str, Any]:
    """`--config.mode=pseudo_labels`: pseudo-label PNGs + seed scores.

    Split: `data.seed_split` (set it to e.g. train_aug for a multi-stage
    run). The online pseudo labels (CAM → SGC → PAR, as in training) are
    computed at long side `eval.seed_size`, cropped to the image and
    resized back to its original size (nearest), and written as VOC-palette
    PNGs to `<workdir>/pseudo_labels/<split>/labels/<id>.png`. The seed
    scores of every `SEED_ENTRIES` row go to `seeds.json` / `seeds.md`
    there. Every image of the split is labelled; the scores are over the
    images that have a mask (`num_masked` of `num_images`; none: no
    scores).
    """
    logs.setup_logging(workdir)
    refuse_overwrite(config, os.path.join(workdir, "pseudo_labels",
                                          config.data.seed_split),
                     "seeds.json")
    clip, dino, model = build.build_models(config)
    if dino is None and config.model.dino_path:
        dino = build.load_affinity_encoder(
            config, dtype=clip.vision.class_embedding.dtype)
    build.check_models(config, clip, dino)
    model, step, directory = restore_model(config, workdir, model)
    bank = build.build_text_bank(config, clip, workdir)
    split = config.data.seed_split
    out_dir = os.path.join(workdir, "pseudo_labels", split)
    data = voc.load_split(config, split)
    size = int(config.eval.seed_size)

    def write(local, kept):
        for j, idx in enumerate(local["index"]):
            if not local["example_valid"][j]:
                continue
            h0, w0 = (int(v) for v in data.sizes[idx])
            h, w = long_side_hw((h0, w0), size)
            labels = resize_nearest(kept["pseudo_labels"][j, :h, :w],
                                    (h0, w0))
            save_label_png(os.path.join(out_dir, "labels",
                                        data.names[idx] + ".png"), labels)

    result = score_seeds(config, clip, dino, model, split, bank=bank,
                         label_entries=("pseudo_labels",), on_batch=write,
                         require_masks=False, progress=True)
    done = data.usable[:config.eval.max_images or None]
    result["num_masked"] = sum(data.mask_paths[i] is not None for i in done)
    result["checkpoint"] = {"directory": directory, "step": step}
    result["xla"] = xla_guard.report()
    if jax.process_index() == 0:
        _write_json(os.path.join(out_dir, "seeds.json"), result)
        table = seed_table(result)
        _write_text(os.path.join(out_dir, "seeds.md"), table)
        print(table, flush=True)
    return result


# --- in-training hook ---------------------------------------------------------
def make_eval_hook(config, workdir: str, *, clip, dino, model_graphdef,
                   bank: dict[str, Any],
                   writer: logs.MetricWriter | None = None
                   ) -> Callable[[int, PyTree], dict[str, float | None]]:
    """What the trainer calls every `train.eval_every` steps.

    hook(step, state) merges `state["params"]`/`state["rest"]` into the
    model, scores the decoder on `data.val_split` and (with
    `eval.hook_seeds`) the seeds on `data.seed_split`, both on the first
    `eval.max_images` images, single process-collective pass each; no CRF
    and no files. Results are logged with `writer` under "eval/..." and
    returned. Pass `clip`/`dino` built on the replicated frozen states
    (`nnx.merge(clip_graphdef, frozen["clip"])`) so nothing is copied;
    compiled functions are cached across calls.
    """
    del workdir  # the writer owns the output location

    def hook(step: int, state: PyTree) -> dict[str, float | None]:
        model = nnx.merge(model_graphdef, state["params"], state["rest"])
        split = config.data.val_split
        seg = evaluate_segmentation(config, clip, model, split, None,
                                    save_predictions=False, use_crf=False)
        out = {f"eval/{split}_miou": seg.get("miou"),
               f"eval/{split}_precision": seg.get("mean_precision"),
               f"eval/{split}_recall": seg.get("mean_recall")}
        if config.eval.hook_seeds:
            seeds = score_seeds(config, clip, dino, model,
                                config.data.seed_split, bank=bank)
            out.update({f"eval/seeds_{k}_miou": s["miou"]
                        for k, s in seeds["entries"].items()})
        if writer is not None:
            writer.write_scalars(step, {k: v for k, v in out.items()
                                        if v is not None})
        return out

    return hook
