"""Reading the TFDS datasets that `python -m ssr_jax.data.build` writes.

`data.source="tfds"` reads every split from an array_record TFDS dataset
instead of the files under `data.root`. Nothing here needs TensorFlow:
the dataset is opened with `tfds.builder_from_directory(...)
.as_data_source(split)` (random access over array_record files), and the
images, masks and superpixel maps are left undecoded by TFDS
(`tfds.decode.SkipDecoding`) and decoded here with PIL, exactly as the
folder reader decodes the files, so both sources give the same pixels.

Layout (one directory per dataset and SLIC setting, TFDS's own layout):

    <data.tfds_dir>/<builder>/<slic tag>/<version>/
        dataset_info.json, features.json, metadata.json,
        <builder>-<split>.array_record-0000i-of-0000n

`<builder>` is the dataset spec's `tfds_builder` (`voc_aug`, `coco_seg`,
`synthetic_world`; `data.specs`),
`<slic tag>` names the SLIC settings the superpixels were computed with
(`slic_tag` of a `slic.SlicParams`, as the folder path's SLIC cache).
`metadata.json` holds the `ssr_jax` block: SLIC settings, classes, and
per split the listed ids, their sizes, labels and mask flags, the record of
each stored id, and the start-up summary of the build. A split is rebuilt
into a `voc.Split` from it without reading any record, so start-up costs
one small JSON read.

Record features (see `tfds_builder.py`): `image` (the JPEG/PNG bytes of
`JPEGImages/`, byte for byte), `mask` (greyscale PNG of class indices, 255
kept; all 255 when the id has no mask, `has_mask` False), `superpixels`
(16-bit PNG of SLIC ids of the whole image), `labels` (bool multi-hot over
the C-1 foreground classes; class c <-> label id c + 1), `id` and `index`
(the id's line in the split list). Records follow list order.

The stored superpixels are those of the folder path's SLIC cache
(`sgc.slic_cache=True`, `slic.SlicCache`): SLIC once per whole image with
`slic.cached_n_segments` segments. The pipeline transforms them with the
image (nearest rescale, flip, crop), so `source="tfds"` and
`source="folders"` with `sgc.slic_cache=True` yield equal batches.

This module imports `tensorflow_datasets` only when a dataset is opened;
`encode_example` (the build's per-image work) needs it not at all.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import threading

import numpy as np
from absl import logging
from PIL import Image

from ssr_jax.data import DataError, slic, specs, voc

# The TFDS builder name of a dataset is its spec's `tfds_builder`
# (`voc_aug`, `coco_seg`, `synthetic_world`: TFDS's catalog has `voc` and
# `coco` builders without segmentation masks; these names keep clear).
VERSION = "1.0.0"
FORMAT_VERSION = 1
METADATA_KEY = "ssr_jax"
INSTALL_HINT = ("pip install -r requirements-tfds.txt (or "
                "pip install -e .[tfds]): tensorflow-datasets, array_record "
                "and importlib_resources; TensorFlow is not needed")
_IMAGE_FEATURES = ("image", "mask", "superpixels")


def require_tfds():
    """Imports `tensorflow_datasets`, or raises `DataError` with the fix."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"data.source='tfds' and the dataset build need "
                        f"tensorflow-datasets, which is not installed ({e}): "
                        f"{INSTALL_HINT}") from e
    return tfds


# --- settings and paths ------------------------------------------------------


def slic_settings(params: slic.SlicParams) -> dict:
    """The SLIC settings stored superpixels depend on (metadata record)."""
    return params.settings()


def slic_tag(settings: dict) -> str:
    """Directory name of a SLIC setting (the SLIC cache's tag)."""
    return (f"slic_n{settings['slic_segments']}_"
            f"c{settings['slic_compactness']:g}_crop{settings['crop_size']}"
            f"_max{settings['max_segments']}")


def builder_name(config) -> str:
    """The TFDS builder name of `config.data.name` (its spec's)."""
    spec = specs.get(config.data.name)
    if spec.tfds_builder is None:
        have = [n for n in specs.names() if specs.get(n).tfds_builder]
        raise DataError(f"data.name={spec.name!r} has no TFDS builder; one "
                        f"of {', '.join(have)}")
    return spec.tfds_builder


def _join(base: str, *parts: str) -> str:
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def dataset_dir(config, params: slic.SlicParams) -> str:
    """`<tfds_dir>/<builder>/<slic tag>/<version>` for `config`."""
    return _join(config.data.tfds_dir, builder_name(config),
                 slic_tag(params.settings()), VERSION)


def build_command(config) -> str:
    cfg = specs.get(config.data.name).config_hint
    root = config.data.root or "<dataset root>"
    return (f"python -m ssr_jax.data.build --config {cfg} "
            f"--config.data.root={root} "
            f"--config.data.tfds_dir={config.data.tfds_dir or '<dir>'}")


def _is_remote(path: str) -> bool:
    return "://" in path


def _read_metadata_file(directory: str) -> dict | None:
    import json

    path = os.path.join(directory, "metadata.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get(METADATA_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def problems(config, params: slic.SlicParams) -> list[str]:
    """Config problems of `data.source="tfds"` (for `config_check`)."""
    d = config.data
    out = []
    if d.name not in specs.names():
        return out  # reported by the data.name check
    if not d.tfds_dir:
        return ["data.source='tfds' needs data.tfds_dir: the directory (or "
                "gs:// bucket) the dataset was built into with `"
                + build_command(config) + "`"]
    if specs.get(d.name).tfds_builder is None:
        return [f"data.source='tfds': data.name={d.name!r} has no TFDS "
                "builder (its spec's tfds_builder); use data.source="
                "'folders'"]
    if not params.cache:
        out.append("data.source='tfds' reads the superpixels stored at build "
                   "time, which are whole-image SLIC maps (the "
                   "sgc.slic_cache=True mode); set sgc.slic_cache=True, or "
                   "use data.source='folders' for per-crop SLIC")
    try:
        require_tfds()
    except DataError as e:
        out.append(str(e))
        return out
    if _is_remote(d.tfds_dir):
        return out  # checked when opened (needs the bucket's credentials)
    try:
        meta = _open_metadata(config, params)
    except DataError as e:
        out.append(str(e))
        return out
    if meta["num_classes"] != int(d.num_classes):
        out.append(f"the TFDS dataset at {dataset_dir(config, params)} has "
                   f"{meta['num_classes']} classes but data.num_classes="
                   f"{d.num_classes}")
    return out


def _built_settings(config) -> list[tuple[str, dict]]:
    """(directory, SLIC settings) of every built variant of the dataset."""
    base = _join(config.data.tfds_dir, builder_name(config))
    found = []
    if _is_remote(base) or not os.path.isdir(base):
        return found
    for tag in sorted(os.listdir(base)):
        directory = os.path.join(base, tag, VERSION)
        meta = _read_metadata_file(directory)
        if meta is not None:
            found.append((directory, meta.get("slic", {})))
    return found


def _open_metadata(config, params: slic.SlicParams) -> dict:
    """The `ssr_jax` metadata of the dataset `config` reads; checked."""
    directory = dataset_dir(config, params)
    want = params.settings()
    if _is_remote(directory):
        meta = _builder(directory).info.metadata
        meta = None if meta is None else meta.get(METADATA_KEY)
    else:
        if not os.path.isdir(config.data.tfds_dir):
            raise DataError(f"data.tfds_dir={config.data.tfds_dir!r} does "
                            "not exist. Build the dataset once with:\n  "
                            + build_command(config))
        if not os.path.isfile(os.path.join(directory, "dataset_info.json")):
            built = _built_settings(config)
            if built:
                listed = "\n  ".join(f"{p}: {s}" for p, s in built)
                raise DataError(
                    f"no TFDS dataset built with this config's SLIC "
                    f"settings {want} (expected {directory}). Built:\n  "
                    f"{listed}\nSet sgc.slic_segments / slic_compactness / "
                    "max_segments and data.crop_size to a built variant, or "
                    "build this one with:\n  " + build_command(config))
            raise DataError(f"the TFDS dataset {directory} is not built. "
                            "Build it once with:\n  " + build_command(config))
        meta = _read_metadata_file(directory)
    if meta is None:
        raise DataError(f"{directory} holds no ssr_jax metadata: it was not "
                        "written by `python -m ssr_jax.data.build`; rebuild "
                        "it with:\n  " + build_command(config))
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{directory} has format version "
                        f"{meta.get('format_version')}; this ssr_jax reads "
                        f"{FORMAT_VERSION}: rebuild it with:\n  "
                        + build_command(config))
    if meta.get("slic") != want:
        raise DataError(f"the superpixels in {directory} were computed with "
                        f"{meta.get('slic')} but the config asks for {want}; "
                        "rebuild with:\n  " + build_command(config))
    return meta


@functools.lru_cache(maxsize=8)
def _builder(directory: str):
    tfds = require_tfds()
    try:
        return tfds.builder_from_directory(directory)
    except Exception as e:  # noqa: BLE001 - any TFDS failure: one message
        raise DataError(f"cannot open the TFDS dataset {directory}: {e}") \
            from e


@functools.lru_cache(maxsize=8)
def _metadata_cached(directory: str, mtime: float) -> dict:
    meta = _read_metadata_file(directory)
    if meta is None:
        raise DataError(f"{directory}/metadata.json is unreadable")
    return meta


def metadata(config, params: slic.SlicParams) -> dict:
    """The checked `ssr_jax` metadata block of the dataset (cached)."""
    directory = dataset_dir(config, params)
    if _is_remote(directory):
        return _open_metadata(config, params)
    path = os.path.join(directory, "metadata.json")
    if not os.path.isfile(path):
        _open_metadata(config, params)  # raises the right message
    meta = _metadata_cached(directory, os.stat(path).st_mtime)
    if meta.get("slic") != params.settings():
        _open_metadata(config, params)  # raises the mismatch message
    return meta


def class_names(config, params: slic.SlicParams) -> tuple[str, ...]:
    names = tuple(metadata(config, params)["class_names"])
    if len(names) != config.data.num_classes:
        raise DataError(f"data.num_classes={config.data.num_classes} but the "
                        f"TFDS dataset {dataset_dir(config, params)} has "
                        f"{len(names)} classes")
    return names


# --- reading -----------------------------------------------------------------


def _decode_image(data: bytes, what: str) -> np.ndarray:
    """As `voc.read_image`, from bytes."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt image {what}: {e}") from e


def _decode_png(data: bytes, what: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt {what}: {e}") from e


class RecordStore:
    """Decoded images, masks and superpixels of one TFDS split.

    Indexed by list line (`voc.Split` indices). The data source opens
    lazily and is shared by the pipeline's threads; each thread keeps the
    last record it read, so image, mask and superpixels of one example
    cost one read.
    """

    def __init__(self, directory: str, split: str, records: dict[int, int]):
        self.directory = directory
        self.split = split
        self.records = records  # list line -> record position
        self._source = None
        self._lock = threading.Lock()
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self.records)

    def source(self):
        if self._source is None:
            with self._lock:
                if self._source is None:
                    tfds = require_tfds()
                    skip = {k: tfds.decode.SkipDecoding()
                            for k in _IMAGE_FEATURES}
                    self._source = _builder(self.directory).as_data_source(
                        self.split, decoders=skip)
        return self._source

    def describe(self, idx: int, feature: str) -> str:
        return (f"{self.directory} split {self.split!r} record "
                f"{self.records.get(idx)} ({feature})")

    def record(self, idx: int) -> dict:
        last = getattr(self._local, "last", None)
        if last is not None and last[0] == idx:
            return last[1]
        if idx not in self.records:
            raise DataError(f"list line {idx} of split {self.split!r} is not "
                            f"stored in {self.directory}")
        rec = self.source()[self.records[idx]]
        if int(rec["index"]) != idx:
            raise DataError(f"{self.describe(idx, 'index')} holds list line "
                            f"{int(rec['index'])}, not {idx}: the dataset "
                            "is inconsistent; rebuild it")
        self._local.last = (idx, rec)
        return rec

    def image(self, idx: int) -> np.ndarray:
        return _decode_image(self.record(idx)["image"],
                             self.describe(idx, "image"))

    def mask(self, idx: int) -> np.ndarray:
        return _decode_png(self.record(idx)["mask"],
                           "mask " + self.describe(idx, "mask"))

    def superpixels(self, idx: int) -> np.ndarray:
        ids = _decode_png(self.record(idx)["superpixels"],
                          "superpixels " + self.describe(idx, "superpixels"))
        return ids.astype(np.int32)

    def raw(self, idx: int) -> dict:
        """The undecoded record of list line `idx` (for tests and tools)."""
        return self.record(idx)


def split_from_metadata(config, directory: str, split: str,
                        meta: dict) -> voc.Split:
    """A `voc.Split` from the build's metadata; `store` reads the records."""
    splits = meta["splits"]
    if split not in splits:
        raise DataError(f"split {split!r} is not in the TFDS dataset "
                        f"{directory} (built splits: "
                        f"{', '.join(sorted(splits))}). Delete that "
                        "directory and build again with --splits="
                        f"{','.join([*splits, split])} added to:\n  "
                        + build_command(config))
    s = splits[split]
    names = tuple(s["names"])
    stored = [int(i) for i in s["stored"]]
    n, c = len(names), len(meta["class_names"])
    labels = np.zeros((n, c - 1), np.float32)
    for i, ids in enumerate(s["labels"]):
        if ids:
            labels[i, np.asarray(ids) - 1] = 1.0
    store = RecordStore(directory, split,
                        {line: k for k, line in enumerate(stored)})
    tag = f"tfds:{directory}[{split}]"
    stored_set = set(stored)
    image_paths = tuple(f"{tag}/{names[i]}/image" if i in stored_set
                        else None for i in range(n))
    mask_paths = tuple(f"{tag}/{names[i]}/mask"
                       if i in stored_set and s["has_mask"][i] else None
                       for i in range(n))
    summary = voc.SplitSummary(**{**s["summary"],
                                  "problems": tuple(s["summary"]["problems"]),
                                  "notes": tuple(s["summary"]["notes"]),
                                  "from_cache": True})
    return voc.Split(
        name=split, root=directory, names=names, image_paths=image_paths,
        mask_paths=mask_paths,
        sizes=np.array(s["sizes"], np.int32).reshape(-1, 2), labels=labels,
        usable=np.array(stored, np.int64), summary=summary, store=store)


def load_split(config, split: str, params: slic.SlicParams) -> voc.Split:
    """`data_sources.load_split` for `data.source="tfds"`."""
    meta = metadata(config, params)
    directory = dataset_dir(config, params)
    if meta["num_classes"] != int(config.data.num_classes):
        raise DataError(f"the TFDS dataset {directory} has "
                        f"{meta['num_classes']} classes but data.num_classes="
                        f"{config.data.num_classes}")
    data = split_from_metadata(config, directory, split, meta)
    logging.info("split %r: %d records of the TFDS dataset %s", split,
                 data.usable.size, directory)
    if not data.usable.size:
        raise DataError(f"split {split!r} of {directory} stores "
                        "no example")
    return data


# --- the build's per-image work (no TFDS needed) ------------------------------


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 ('L') or uint16 ('I;16') 2-D array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def encode_example(job: tuple) -> dict:
    """One listed id → the record's bytes, or `{"problem": ...}`.

    `job` = (line, name, image path, mask path or None, num_classes, SLIC
    settings, SLIC work directory). The superpixels come from a
    content-addressed SLIC cache (`slic.SlicCache` keyed by the SHA-256 of
    the image bytes) under the work directory, so an interrupted build
    recomputes nothing on the next run.
    """
    line, name, image_path, mask_path, num_classes, settings, work = job
    out = {"line": line, "name": name}
    try:
        with open(image_path, "rb") as f:
            data = f.read()
        image = _decode_image(data, image_path)  # = voc.read_image
        if mask_path is not None:
            mask = voc.read_mask(mask_path, num_classes)
            if mask.shape != image.shape[:2]:
                raise DataError(f"mask {mask_path} is {mask.shape} but its "
                                f"image {image_path} is {image.shape[:2]}")
        else:
            mask = np.full(image.shape[:2], voc.IGNORE, np.uint8)
        cache = slic.SlicCache(work, settings["slic_segments"],
                               settings["slic_compactness"],
                               settings["crop_size"],
                               settings["max_segments"])
        key = hashlib.sha256(data).hexdigest()
        key = f"{key[:2]}/{key}"
        out["slic_reused"] = os.path.exists(cache.path(key))
        ids = cache.get(key, image)
    except DataError as e:
        out["problem"] = str(e)
        return out
    out.update(image=data, mask=png_bytes(mask), has_mask=mask_path is not None,
               superpixels=png_bytes(ids.astype(np.uint16)))
    return out
