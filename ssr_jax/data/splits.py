"""A split of the VOC layout: scan, label cache, start-up summary.

Image-level labels come from the masks (or the VOC XML where a mask is
absent, `data.label_source`) and are computed once per split into a JSON
file in the cache directory (`voc.cache_dir`). Its name carries a hash of
the root, the list file's contents, `num_classes`, `label_source` and the
modification times of the data directories, so a changed list, root or
directory (files added, removed or renamed) rebuilds it. A file edited in
place is only caught when it is decoded. There is no label file to
download: WeCLIP's missing COCO `cls_labels_onehot.npy` has no equivalent
here.

`load_folder_split` scans the list once (headers, file tails, masks),
records every problem per id, and then either raises `DataError` naming
each path (`data.strict=True`) or skips those ids with a logged count.
`Split` is also what `tfds_source` rebuilds from a TFDS dataset's
metadata; `ssr_jax.data_sources.load_split` picks the source.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os

import numpy as np
from absl import logging

from ssr_jax import io_utils
from ssr_jax.data import DataError, specs, voc
from ssr_jax.data.voc import IMAGE_DIR, MASK_DIRS, XML_DIR

_CACHE_VERSION = 1


def _cache_key(config, split: str, names: list[str]) -> str:
    d = config.data
    root = os.path.abspath(d.root)
    with open(voc.list_path(d.root, split), "rb") as f:
        list_hash = hashlib.sha256(f.read()).hexdigest()
    subdirs = sorted({os.path.dirname(n) for n in names})
    mtimes = {}
    for base in (IMAGE_DIR, *MASK_DIRS, XML_DIR):
        for sub in subdirs:
            p = os.path.join(root, base, sub)
            mtimes[os.path.join(base, sub)] = (
                os.stat(p).st_mtime_ns if os.path.isdir(p) else None)
    blob = json.dumps({
        "version": _CACHE_VERSION, "root": root, "split": split,
        "list": list_hash, "num_classes": d.num_classes,
        "label_source": d.label_source, "mtimes": mtimes,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _scan_one(root: str, name: str, names: tuple[str, ...],
              label_source: str) -> dict:
    """Everything the pipeline needs to know about one id, and its problem."""
    rec = {"image": None, "mask": None, "hw": [0, 0], "labels": [],
           "source": None, "problem": None}
    img = voc.image_path(root, name)
    if img is None:
        rec["problem"] = (f"missing image for {name!r}: expected "
                          f"{os.path.join(root, IMAGE_DIR, name + '.jpg')}"
                          " (or .png)")
        return rec
    rec["image"] = os.path.relpath(img, root)
    msk = voc.mask_path(root, name)
    rec["mask"] = None if msk is None else os.path.relpath(msk, root)
    try:
        rec["hw"] = list(voc.image_size(img))
        xml = os.path.join(root, XML_DIR, name + ".xml")
        if msk is not None and label_source != "xml":
            mask = voc.read_mask(msk, len(names))
            if list(mask.shape) != rec["hw"]:
                raise DataError(
                    f"mask {msk} is {mask.shape[0]}x{mask.shape[1]} but its "
                    f"image {img} is {rec['hw'][0]}x{rec['hw'][1]}")
            vals = np.flatnonzero(np.bincount(mask.reshape(-1),
                                              minlength=256))
            rec["labels"] = [int(v) for v in vals if 0 < v < len(names)]
            rec["source"] = "mask"
        elif label_source != "mask" and os.path.isfile(xml):
            rec["labels"] = voc.xml_labels(xml, names)
            rec["source"] = "xml"
        else:
            wanted = {
                "mask": f"a mask {os.path.join(root, MASK_DIRS[0], name)}.png",
                "xml": f"an annotation {xml}",
                "auto": (f"a mask {os.path.join(root, MASK_DIRS[0], name)}"
                         f".png (or {MASK_DIRS[1]}/) or an annotation {xml}"),
            }[label_source]
            raise DataError(f"no image labels for {name!r}: expected {wanted}"
                            f" (data.label_source={label_source!r})")
    except DataError as e:
        rec["problem"] = str(e)
    return rec


def _scan(config, split: str, names: list[str],
          classes: tuple[str, ...]) -> list[dict]:
    d = config.data
    workers = max(1, int(d.num_workers))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(
            lambda n: _scan_one(d.root, n, classes, d.label_source), names))


def _write_json(path: str, obj) -> None:
    with io_utils.atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _records(config, split: str, names: list[str],
             classes: tuple[str, ...]) -> tuple[list[dict], bool]:
    """Scan results for `split`, from the label cache when it is current."""
    folder = voc.cache_dir(config)
    key = _cache_key(config, split, names)
    path = os.path.join(folder, f"labels_{split}_{key}.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                blob = json.load(f)
            if blob.get("key") == key and len(blob["records"]) == len(names):
                return blob["records"], True
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild it
    logging.info("Scanning split %r (%d ids) for labels and problems...",
                 split, len(names))
    records = _scan(config, split, names, classes)
    prefix = f"labels_{split}_"
    for f in os.listdir(folder):  # drop stale caches of this split only
        tail = f[len(prefix):-len(".json")]
        if (f.startswith(prefix) and f.endswith(".json")
                and len(tail) == len(key) and tail.isalnum()):
            os.remove(os.path.join(folder, f))
    _write_json(path, {"version": _CACHE_VERSION, "key": key,
                       "split": split, "records": records})
    return records, False


def _summarise(config, split: str, records: list[dict], usable: np.ndarray,
               classes: tuple[str, ...], from_cache: bool) -> voc.SplitSummary:
    d = config.data
    good = [records[i] for i in usable]
    counts = [len(r["labels"]) for r in good]
    hist = np.zeros(len(classes), np.int64)
    for r in good:
        hist[r["labels"]] += 1
    sources: dict[str, int] = {}
    for r in good:
        sources[r["source"]] = sources.get(r["source"], 0) + 1
    problems = tuple(r["problem"] for r in records if r["problem"])
    max_k = max(counts, default=0)
    notes = []
    if max_k > d.max_classes_per_image:
        notes.append(
            f"{sum(c > d.max_classes_per_image for c in counts)} images have"
            f" more than data.max_classes_per_image="
            f"{d.max_classes_per_image} classes (up to {max_k}); the CAM "
            "keeps the first ones. Raise the field to keep all.")
    note = specs.get(d.name).split_notes.get(split)
    if note and split == d.train_split:
        notes.append(note)
    return voc.SplitSummary(
        split=split, root=d.root, num_listed=len(records),
        num_usable=len(good),
        num_with_masks=sum(r["mask"] is not None for r in good),
        label_sources=sources,
        class_histogram={classes[c]: int(hist[c])
                         for c in range(1, len(classes))},
        num_without_foreground=sum(c == 0 for c in counts),
        max_classes_per_image=max_k,
        max_classes_allowed=d.max_classes_per_image,
        num_over_max=sum(c > d.max_classes_per_image for c in counts),
        num_skipped=len(problems), problems=problems, notes=tuple(notes),
        from_cache=from_cache)


def load_folder_split(config, split: str) -> voc.Split:
    """Validates `split` under `data.root` and returns its `voc.Split`.

    Raises `DataError` for a missing root (with the expected layout), a
    missing or empty list, and, when `data.strict`, for any example with a
    missing image, corrupt image, missing labels or a bad mask (value
    outside {0..C-1, 255}, wrong size, RGB); each message names the path.
    With `data.strict=False` such examples are skipped and counted.
    """
    d = config.data
    voc.check_root(d.root)
    classes = voc.folder_class_names(config)
    names = voc.read_list(d.root, split)
    records, from_cache = _records(config, split, names, classes)
    bad = [r["problem"] for r in records if r["problem"]]
    if bad and d.strict:
        listed = "\n  ".join(bad[:voc.MAX_LISTED_PROBLEMS])
        more = len(bad) - voc.MAX_LISTED_PROBLEMS
        raise DataError(
            f"{len(bad)} of {len(names)} examples of split {split!r} are "
            f"unusable:\n  {listed}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nFix the files, or pass --config.data.strict=False to skip "
            "them (counted and logged).")
    usable = np.array([i for i, r in enumerate(records) if not r["problem"]],
                      np.int64)
    summary = _summarise(config, split, records, usable, classes, from_cache)
    if bad:
        from ssr_jax import logs  # noqa: PLC0415 - no JAX import

        for p in bad[:voc.MAX_LISTED_PROBLEMS]:
            logging.warning("skipping: %s", p)
        more = (f" (+{len(bad) - 1} more in the log)" if len(bad) > 1
                else "")
        logs.warn(f"skipped {len(bad)} of {len(names)} examples of split "
                  f"{split!r} (data.strict=False): {bad[0]}{more}")
    if not usable.size:
        raise DataError(f"split {split!r} has no usable example; first "
                        f"problem: {bad[0]}")
    labels = np.zeros((len(names), len(classes) - 1), np.float32)
    for i, r in enumerate(records):
        if r["labels"]:
            labels[i, np.asarray(r["labels"]) - 1] = 1.0

    def full(p):
        return None if p is None else os.path.join(d.root, p)

    return voc.Split(
        name=split, root=d.root, names=tuple(names),
        image_paths=tuple(full(r["image"]) for r in records),
        mask_paths=tuple(full(r["mask"]) for r in records),
        sizes=np.array([r["hw"] for r in records], np.int32).reshape(-1, 2),
        labels=labels, usable=usable, summary=summary)
