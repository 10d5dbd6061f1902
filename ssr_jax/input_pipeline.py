"""Input pipelines: grain (no TensorFlow) over the VOC-layout readers.

Training (`train_iterator`): the split's usable examples → a grain shuffle,
reseeded every epoch (`data.shuffle_seed`) → repeated forever → per-example
decode + WeCLIP augmentation + SLIC in `data.num_workers` grain threads →
batches of `train.batch_size // process_count`. The batch layout is the one
in docs/DESIGN.md ("The batch"); training batches carry no masks.

Determinism: the example at global stream position g is fixed by
(`data.shuffle_seed`, g), and its augmentation by (`seed`, epoch, example
index), never by the thread, the process or the process count. Process p of
P reads rows `[p·B/P, (p+1)·B/P)` of every global batch of size B, so P
processes together see exactly the batches one process would, in the same
order, and a restored iterator continues the same stream.

Sources (`data.source`): "folders" decodes the files under `data.root`;
"tfds" reads the records of the TFDS dataset built by `python -m
ssr_jax.data.build` (`data/tfds_source.py`) through the very same
pipeline: the same split indices, shuffle, augmentation draws and
process sharding (each process reads only its rows' records, random
access), and the whole-image superpixels stored at build time instead of
SLIC in the loop. With `sgc.slic_cache=True` (the default; the tfds source
requires it) both sources yield equal batches.

Evaluation: `eval_examples` (native size, one example at a time) and
`seed_batches` (fixed-size batches with masks for CAM-seed and pseudo-label
scoring). Per-example decode failures follow `data.strict`: an error naming
the path, or a logged, counted skip.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator

import grain
import numpy as np
from absl import logging

from ssr_jax import data_sources, logs
from ssr_jax.data import DataError, slic, transforms, voc
from ssr_jax.data_sources import dataset_info, validate_split

__all__ = [
    "DataError", "TrainIterator", "dataset_info", "eval_examples",
    "seed_batches", "train_iterator", "validate_split",
]

Batch = dict[str, np.ndarray]
_STATE_VERSION = 1
_MAX_FALLBACKS = 16


def _process_layout(process_index: int | None,
                    process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only for the defaults: the pipeline itself is numpy

        process_index = jax.process_index()
        process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in "
                         f"[0, process_count={process_count})")
    return process_index, process_count


def _local_batch(global_batch: int, process_count: int, what: str) -> int:
    if global_batch % process_count:
        raise DataError(f"{what}={global_batch} is not divisible by the "
                        f"{process_count} processes")
    return global_batch // process_count


def _global_position(i: int, local: int, global_: int, process: int) -> int:
    """Local stream position i → global stream position (module docstring)."""
    b, j = divmod(i, local)
    return b * global_ + process * local + j


class _Reader:
    """Decoding and superpixels shared by the pipelines' worker threads."""

    def __init__(self, config, split: voc.Split):
        d, p = config.data, data_sources.slic_params(config)
        self.split = split
        self.strict = bool(d.strict)
        self.num_classes = int(d.num_classes)
        self.slic_segments = p.segments
        self.compactness = p.compactness
        self.max_segments = p.max_segments
        self.cache = None
        # data.source="tfds": whole-image ids stored at build time (the
        # cache mode's ids), read with the example.
        self.stored = split.store is not None
        if p.cache and not self.stored:
            self.cache = slic.SlicCache(
                voc.cache_dir(config), p.segments, p.compactness,
                p.crop_size, p.max_segments)
        self._lock = threading.Lock()
        self.bad: set[int] = set()

    def _skip(self, idx: int, error: DataError) -> None:
        if self.strict:
            raise error
        with self._lock:
            new = idx not in self.bad
            self.bad.add(idx)
        if new:
            logs.warn(f"skipping (data.strict=False): {error}")

    def image(self, idx: int) -> np.ndarray | None:
        """uint8 [H, W, 3], or None for a skipped (non-strict) failure."""
        if idx in self.bad:
            return None
        try:
            return self.split.read_image(idx)
        except DataError as e:
            self._skip(idx, e)
            return None

    def mask(self, idx: int) -> np.ndarray | None:
        """uint8 [H, W] GT, None when the id has no mask or it is bad."""
        if self.split.mask_paths[idx] is None or idx in self.bad:
            return None
        try:
            return self.split.read_mask(idx, self.num_classes)
        except DataError as e:
            self._skip(idx, e)
            return None

    def superpixels(self, image: np.ndarray) -> np.ndarray:
        """Per-crop SLIC of a valid region: int32 [h, w]."""
        return slic.slic_ids(image, self.slic_segments, self.compactness,
                             self.max_segments)

    @property
    def whole_image(self) -> bool:
        """Superpixels of the whole image, transformed with it."""
        return self.cache is not None or self.stored

    def cached_superpixels(self, idx: int, image: np.ndarray) -> np.ndarray:
        """SLIC of the whole image at load resolution: stored (tfds) or
        from the SLIC cache."""
        if not self.stored:
            return self.cache.get(self.split.names[idx], image)
        ids = self.split.store.superpixels(idx)
        if ids.shape != image.shape[:2]:
            raise DataError(
                f"{self.split.store.describe(idx, 'superpixels')} is "
                f"{ids.shape} but its image is {image.shape[:2]}: rebuild "
                "the TFDS dataset")
        return ids


# --- training ----------------------------------------------------------------


class _TrainExample:
    """Global stream position → one augmented training example."""

    def __init__(self, config, reader: _Reader,
                 order: grain.MapDataset):
        d = config.data
        self.reader = reader
        self.order = order
        self.usable = reader.split.usable
        self.seed = int(config.seed)
        self.crop = int(d.crop_size)
        self.rescale = tuple(float(x) for x in d.rescale_range)
        self.hflip = bool(d.hflip)

    def __call__(self, g: int) -> dict:
        n = len(self.usable)
        epoch = g // n
        pos = int(self.order[g])
        for k in range(min(n, _MAX_FALLBACKS)):
            # A skipped example is replaced by the next usable one in the
            # list, so batches keep their size and the stream stays fixed.
            idx = int(self.usable[(pos + k) % n])
            image = self.reader.image(idx)
            if image is not None:
                return self._augment(idx, epoch, image)
        raise DataError(f"{_MAX_FALLBACKS} consecutive examples of split "
                        f"{self.reader.split.name!r} failed to decode; see "
                        "the warnings above")

    def _augment(self, idx: int, epoch: int, image: np.ndarray) -> dict:
        rng = np.random.default_rng([self.seed, epoch, idx])
        p = transforms.sample_augment(rng, image.shape[:2], self.crop,
                                      self.rescale, self.hflip)
        crop = transforms.augment_image(image, p)
        if self.reader.whole_image:
            ids = transforms.augment_ids(
                self.reader.cached_superpixels(idx, image), p)
        else:
            ids = np.full((self.crop, self.crop), -1, np.int32)
            box = transforms.crop_box(p)
            ids[box] = self.reader.superpixels(crop[box])
        return {
            "image": crop,
            "valid": transforms.valid_mask(p),
            "labels": self.reader.split.labels[idx],
            "superpixels": ids,
            "index": np.int32(idx),
        }


class TrainIterator:
    """Endless iterator of host-local training batches, checkpointable.

    Yields dicts: `image` uint8 [b, H, W, 3], `valid` bool [b, H, W],
    `labels` float32 [b, C-1], `superpixels` int32 [b, H, W] (ids in
    `[0, sgc.max_segments)`, −1 on padding), `index` int32 [b], where
    b = `train.batch_size // process_count` and H = W = `data.crop_size`.

    `get_state()` is a JSON-serialisable dict counting global batches; it
    does not depend on the process count, so a run may resume on another
    number of hosts. `set_state(state)` continues from there.
    """

    def __init__(self, config, split: voc.Split, process_index: int,
                 process_count: int):
        d = config.data
        self.split = split
        self.process_index = process_index
        self.process_count = process_count
        self.global_batch_size = int(config.train.batch_size)
        self.local_batch_size = _local_batch(
            self.global_batch_size, process_count, "train.batch_size")
        self.shuffle_seed = int(d.shuffle_seed)
        self.seed = int(config.seed)
        self._reader = _Reader(config, split)
        order = (grain.MapDataset.range(len(split.usable))
                 .shuffle(seed=self.shuffle_seed).repeat())
        self._example = _TrainExample(config, self._reader, order)
        self._read_options = grain.ReadOptions(
            num_threads=int(d.num_workers),
            prefetch_buffer_size=max(1, int(d.prefetch))
            * self.local_batch_size)
        self._batches = 0
        self._it = None
        self._start(0)

    @property
    def num_skipped(self) -> int:
        """Examples skipped while decoding (data.strict=False)."""
        return len(self._reader.bad)

    def _start(self, batches: int) -> None:
        if self._it is not None:
            self._it.close()
        local, glob = self.local_batch_size, self.global_batch_size
        proc = self.process_index

        def position(i):
            return _global_position(i, local, glob, proc)

        ds = (grain.MapDataset.range(batches * local, sys.maxsize)
              .map(position).map(self._example)
              .to_iter_dataset(self._read_options)
              .batch(local, drop_remainder=True))
        self._it = iter(ds)
        self._batches = batches

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        batch = next(self._it)
        self._batches += 1
        return batch

    def get_state(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "batches": self._batches,
            "global_batch_size": self.global_batch_size,
            "num_examples": int(len(self.split.usable)),
            "split": self.split.name,
            "shuffle_seed": self.shuffle_seed,
            "seed": self.seed,
        }

    def set_state(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"input-pipeline state {state!r} has version "
                            f"{state.get('version')}; expected "
                            f"{_STATE_VERSION}")
        mine = self.get_state()
        changed = [k for k in ("global_batch_size", "num_examples", "split",
                               "shuffle_seed", "seed")
                   if state.get(k) != mine[k]]
        if changed:
            logging.warning(
                "the restored input-pipeline state differs in %s (%s vs now "
                "%s): the data stream continues at batch %d but will not "
                "match the original run", ", ".join(changed),
                {k: state.get(k) for k in changed},
                {k: mine[k] for k in changed},
                state["batches"])
        self._start(int(state["batches"]))

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None


def train_iterator(config, *, split: str | None = None,
                   process_index: int | None = None,
                   process_count: int | None = None) -> TrainIterator:
    """The training iterator for `split` (default `data.train_split`).

    Validates the split first (`validate_split`; logs its summary).
    `process_index`/`process_count` default to JAX's.
    """
    process_index, process_count = _process_layout(process_index,
                                                    process_count)
    data = data_sources.load_split(config, split or config.data.train_split)
    logs.note(str(data.summary))
    return TrainIterator(config, data, process_index, process_count)


# --- evaluation --------------------------------------------------------------


def _report_skips(items, reader: _Reader) -> Iterator:
    """Yields `items`, then logs how many examples were skipped."""
    yield from items
    if reader.bad:
        logs.warn(f"split {reader.split.name!r}: {len(reader.bad)} examples "
                  "skipped (undecodable, data.strict=False)")


def _threads(config, ds: grain.MapDataset, buffer: int) -> grain.IterDataset:
    return ds.to_iter_dataset(grain.ReadOptions(
        num_threads=int(config.data.num_workers),
        prefetch_buffer_size=max(1, buffer)))


def eval_examples(config, split: str, max_images: int = 0, *,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict]:
    """Examples of `split` at native size, in list order.

    Yields `{"image": uint8 [H, W, 3], "mask": uint8 [H, W] or None,
    "name": str, "index": int}`. `max_images` > 0 keeps the first ones.
    Process p of P gets every P-th example from p (the defaults are JAX's
    process index and count): sum the per-process confusion matrices.
    Examples that fail to decode are skipped when `data.strict=False`.
    """
    process_index, process_count = _process_layout(process_index,
                                                    process_count)
    data = data_sources.load_split(config, split)
    reader = _Reader(config, data)
    usable = data.usable[:max_images] if max_images > 0 else data.usable
    usable = usable[process_index::process_count]

    def load(idx):
        idx = int(idx)
        image = reader.image(idx)
        mask = reader.mask(idx)
        if image is None or (mask is None and idx in reader.bad):
            return None
        return {"image": image, "mask": mask, "name": data.names[idx],
                "index": idx}

    ds = grain.MapDataset.source(usable).map(load)
    return _report_skips(
        _threads(config, ds, 2 * max(1, config.data.num_workers)), reader)


class _SeedExample:
    """Global position → one resized, padded example (dummy past the end)."""

    def __init__(self, reader: _Reader, examples: np.ndarray, size: int,
                 masks_optional: bool = False):
        self.reader = reader
        self.examples = examples
        self.size = size
        self.masks_optional = masks_optional

    def dummy(self) -> dict:
        s = self.size
        return {
            "image": np.zeros((s, s, 3), np.uint8),
            "valid": np.zeros((s, s), bool),
            "labels": np.zeros(self.reader.split.labels.shape[1], np.float32),
            "superpixels": np.full((s, s), -1, np.int32),
            "mask": np.full((s, s), voc.IGNORE, np.uint8),
            "index": np.int32(-1),
            "example_valid": np.bool_(False),
        }

    def __call__(self, g: int) -> dict:
        if g >= len(self.examples):
            return self.dummy()
        idx = int(self.examples[g])
        image = self.reader.image(idx)
        if image is None:
            return self.dummy()
        if self.masks_optional and self.reader.split.mask_paths[idx] is None:
            # No mask: labelled, never scored (all ignore).
            mask = np.full(image.shape[:2], voc.IGNORE, np.uint8)
        else:
            mask = self.reader.mask(idx)
        if mask is None:
            return self.dummy()
        s = self.size
        hw = transforms.long_side_hw(image.shape[:2], s)
        small = transforms.resize_bilinear(image, hw)
        if self.reader.whole_image:
            ids = transforms.resize_nearest(
                self.reader.cached_superpixels(idx, image), hw)
        else:
            ids = self.reader.superpixels(small)
        valid = np.zeros((s, s), bool)
        valid[:hw[0], :hw[1]] = True
        return {
            "image": transforms.pad_to(small, s, 0),
            "valid": valid,
            "labels": self.reader.split.labels[idx],
            "superpixels": slic.reindex(transforms.pad_to(ids, s, -1))[0],
            "mask": transforms.pad_to(transforms.resize_nearest(mask, hw), s,
                                      voc.IGNORE),
            "index": np.int32(idx),
            "example_valid": np.bool_(True),
        }


def seed_batches(config, split: str, batch_size: int, size: int, *,
                 max_images: int = 0, process_index: int | None = None,
                 process_count: int | None = None,
                 require_masks: bool = True) -> Iterator[Batch]:
    """Fixed-size batches with GT masks, for CAM-seed/pseudo-label scoring.

    Every example of `split` that has a mask, in list order (`max_images`
    > 0 keeps the first ones), resized with PIL bilinear so that its long
    side is `size`, zero padded at the bottom/right to size × size.
    `require_masks=False` (pseudo-label export) takes every example; one
    without a mask gets an all-255 mask, so it is labelled but not scored.

    Yields dicts with the training keys (`image`, `valid`, `labels`,
    `superpixels`, `index`) plus `mask` uint8 [b, size, size] (nearest-
    resized GT, 255 on padding) and `example_valid` bool [b]: the last
    global batch is completed with dummy examples (example_valid False,
    index −1, mask 255), as is an example that fails to decode when
    `data.strict=False`. b = `batch_size // process_count`; process p reads
    rows [p·b, (p+1)·b) of every global batch, so every process yields the
    same number of batches (process defaults: JAX's).
    """
    process_index, process_count = _process_layout(process_index,
                                                    process_count)
    data = data_sources.load_split(config, split)
    examples = np.array([i for i in data.usable
                         if not require_masks
                         or data.mask_paths[i] is not None], np.int64)
    if not require_masks:
        if not examples.size:
            raise DataError(f"split {split!r} has no usable examples under "
                            f"{data.root}")
    elif not examples.size:
        raise DataError(f"split {split!r} has no masks under {data.root}: "
                        "seed/pseudo-label scoring needs "
                        f"{voc.MASK_DIRS[0]}/ or {voc.MASK_DIRS[1]}/")
    if examples.size < data.usable.size:
        logs.warn(f"seed split {split!r}: "
                  f"{data.usable.size - examples.size} of {data.usable.size} "
                  "examples have no mask and are not scored")
    if max_images > 0:
        examples = examples[:max_images]
    local = _local_batch(batch_size, process_count, "batch_size")
    num_batches = math.ceil(examples.size / batch_size)
    reader = _Reader(config, data)
    make = _SeedExample(reader, examples, size,
                        masks_optional=not require_masks)

    def position(i):
        return _global_position(i, local, batch_size, process_index)

    ds = grain.MapDataset.range(num_batches * local).map(position).map(make)
    batches = _threads(config, ds, max(1, int(config.data.prefetch)) * local)
    return _report_skips(batches.batch(local, drop_remainder=True), reader)
