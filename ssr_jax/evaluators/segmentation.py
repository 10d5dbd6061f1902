"""Segmentation evaluator: multi-scale + flip (+ DenseCRF) on a split.

One entry point, `evaluate_segmentation(config, clip, model, split,
out_dir)`; the pieces it is made of (`eval_hw`, `scale_hw`,
`resize_image`, `single_scale_logits`, `msc_logits`, `plan_batches`,
`save_label_png`) are public for the tests and the benchmarks.

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
import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from ssr_jax import build, crf, data_sources, logs, metrics, ssr
from ssr_jax.data import DataError, voc
from ssr_jax.evaluators import common
from ssr_jax.models.resize import resize, resize_matrix

Array = jax.Array
PyTree = Any


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


def save_label_png(path: str, labels: np.ndarray,
                   palette: tuple[int, ...] | None = None) -> None:
    """Writes uint8 [H, W] class ids as a palette PNG (indices kept), in
    the dataset spec's `palette` (default VOC's)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    im = Image.fromarray(np.asarray(labels, np.uint8))
    im.putpalette(palette or voc.palette())
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


def _read_ahead(loader: _Loader, plan: Sequence[_Batch], rows: slice
                ) -> Iterator[tuple[_Batch, list[dict | None]]]:
    """Yields (batch, this process's items) in plan order; batch k+1's
    reads are queued as soon as batch k's are in, so they overlap whatever
    the consumer does with batch k."""
    futures = loader.submit(plan[0], rows) if plan else []
    for k, batch in enumerate(plan):
        items = [f.result() for f in futures]
        if k + 1 < len(plan):
            futures = loader.submit(plan[k + 1], rows)
        yield batch, items


def _one_behind(iterable):
    """Yields each element once the next one has been produced (the last
    at the end): element k-1 is consumed after element k was made."""
    previous, have = None, False
    for x in iterable:
        if have:
            yield previous
        previous, have = x, True
    if have:
        yield previous


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
    data = data_sources.load_split(config, split)
    examples = data.usable[:max_images] if max_images > 0 else data.usable
    batch_size = common.global_batch_size(ev.batch_size)
    plan = plan_batches(data.sizes, examples, int(ev.long_side), patch,
                        batch_size)
    num_shapes = len({b.hw1 for b in plan})
    logging.info("eval %s: %d images, %d shapes, %d batches of %d",
                 split, len(examples), num_shapes, len(plan), batch_size)

    mesh = build.make_mesh()
    clip_def, clip_state = nnx.split(clip)
    model_def, params, rest = build.split_model(model)
    clip_state, params, rest = common.replicated(
        (clip_state, params, rest), mesh)
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
    palette = data_sources.spec(config).palette

    def finish(meta, pred):
        if meta["mask"] is not None:
            acc.add(pred, meta["mask"])
            counts["scored"] += 1
        if save and (max_predictions <= 0
                     or counts["written"] < max_predictions):
            save_label_png(os.path.join(pred_dir, meta["name"] + ".png"),
                           pred, palette)
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
    def dispatch(batches):
        """(batch, items) → (items, logits): the device step, dispatched
        asynchronously (it returns before the step has run)."""
        for batch, items in batches:
            bar.update(1)
            images = np.zeros((local, *batch.hw1, 3), np.float32)
            for j, item in enumerate(items):
                if item is not None:
                    images[j] = item["resized"]
                    del item["resized"]
            yield items, step(clip_state, params, rest,
                              jax.make_array_from_process_local_data(
                                  data_sh, images))

    # The pipeline, in the order things happen for batch k: its images were
    # read while batch k-1 ran (`_read_ahead`); its step is dispatched;
    # then the host post-processes batch k-1 (`_one_behind`) while the
    # device runs batch k; the pool's last jobs are drained at the end.
    try:
        for items, logits in _one_behind(
                dispatch(_read_ahead(loader, plan, rows))):
            for meta, pred in post(items, common.local_rows(logits)):
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
        result = metrics.scores(conf, data_sources.class_names(config))
    result.update(num_images=int(len(examples)),
                  num_scored=int(common.sum_over_processes(counts["scored"])),
                  num_shapes=num_shapes)
    unreadable = common.sum_over_processes(len(loader.skipped))
    without_mask = sum(data.mask_paths[i] is None for i in examples)
    result["images"] = common.image_accounting(
        data, result["num_scored"], max_images=max_images,
        beyond_max=len(data.usable) - len(examples),
        without_mask=without_mask,
        unreadable=unreadable, unreadable_reasons=loader.skipped,
        warn=out_dir is not None)
    if not has_masks:
        result["miou"] = None
    return result
