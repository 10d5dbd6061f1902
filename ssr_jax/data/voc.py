"""The VOC directory layout: lists, images, masks, image labels, validation.

One reader serves PASCAL VOC 2012 + SBD, MS COCO 2014 after
`tools/coco_masks.py`, and the synthetic world, which all use this layout
under `data.root`:

    JPEGImages/<id>.jpg                 (or <id>.png)
    SegmentationClassAug/<id>.png       (preferred) or SegmentationClass/
                                        palette/grey PNG: 0..C-1, 255 ignore
    Annotations/<id>.xml                (optional; labels without a mask)
    ImageSets/Segmentation/<split>.txt  (one id per line; first token used)
    classes.json                        (optional; required for synthetic)

Ids may contain a sub-directory (COCO: `train2014/COCO_train2014_…`).

Image-level labels come from the masks (or the VOC XML where a mask is
absent, `data.label_source`) and are computed once per split into a JSON
file in the cache directory. Its name carries a hash of the root, the list
file's contents, `num_classes`, `label_source` and the modification times
of the data directories, so a changed list, root or directory (files added,
removed or renamed) rebuilds it. A file edited in place is only caught when
it is decoded. There is no label file to download: WeCLIP's missing COCO
`cls_labels_onehot.npy` has no equivalent here.

`load_split` scans the list once (headers, file tails, masks), records every
problem per id, and then either raises `DataError` naming each path
(`data.strict=True`) or skips those ids with a logged count.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import xml.etree.ElementTree as ET

import numpy as np
from absl import logging
from PIL import Image

from ssr_jax.data import DataError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus",
    "car", "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike",
    "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# The 80 COCO categories in increasing category-id order; label id = rank.
COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus",
    "train", "truck", "boat", "traffic light", "fire hydrant", "stop sign",
    "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

IMAGE_DIR = "JPEGImages"
IMAGE_EXTS = (".jpg", ".png")
MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")
XML_DIR = "Annotations"
LIST_DIR = os.path.join("ImageSets", "Segmentation")
CLASSES_FILE = "classes.json"
IGNORE = 255
_CACHE_VERSION = 1
_MAX_LISTED_PROBLEMS = 20

LAYOUT = """\
  <root>/
    JPEGImages/<id>.jpg                  (or <id>.png)
    SegmentationClassAug/<id>.png        (or SegmentationClass/; palette or
                                          grey PNGs: 0..C-1, 255 = ignore)
    Annotations/<id>.xml                 (optional: labels without a mask)
    ImageSets/Segmentation/<split>.txt   (train_aug.txt, train.txt, val.txt)
See docs/data.md; for COCO run `python tools/coco_masks.py` first."""


# --- layout ------------------------------------------------------------------


def check_root(root: str) -> None:
    """Raises `DataError` with the expected layout when `root` is unusable."""
    if not root:
        raise DataError("data.root is empty. Point it at the dataset root:\n"
                        + LAYOUT)
    if not os.path.isdir(root):
        raise DataError(f"data.root={root!r} does not exist. Expected "
                        f"layout:\n{LAYOUT}")
    if not os.path.isdir(os.path.join(root, IMAGE_DIR)):
        hint = ""
        if os.path.isdir(os.path.join(root, "VOC2012", IMAGE_DIR)):
            hint = (f"\nIt looks like VOCdevkit: use "
                    f"--config.data.root={os.path.join(root, 'VOC2012')}")
        raise DataError(f"data.root={root!r} has no {IMAGE_DIR}/ folder. "
                        f"Expected layout:\n{LAYOUT}{hint}")


def list_path(root: str, split: str) -> str:
    return os.path.join(root, LIST_DIR, split + ".txt")


def available_splits(root: str) -> list[str]:
    folder = os.path.join(root, LIST_DIR)
    if not os.path.isdir(folder):
        return []
    return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".txt"))


def read_list(root: str, split: str) -> list[str]:
    """Ids of `split`, in file order (first token of every non-empty line)."""
    path = list_path(root, split)
    if not os.path.isfile(path):
        have = available_splits(root)
        msg = (f"split list {path} does not exist. Available lists: "
               f"{', '.join(have) if have else 'none'}.")
        if split == "train_aug":
            msg += (" train_aug (10,582 images) is VOC train + SBD: it needs "
                    "SegmentationClassAug/ and train_aug.txt (see "
                    "docs/data.md). To train on the 1,464-image VOC 'train' "
                    "list instead, pass --config.data.train_split=train.")
        raise DataError(msg)
    with open(path, encoding="utf-8") as f:
        names = [line.split()[0] for line in f if line.strip()]
    if not names:
        raise DataError(f"split list {path} is empty: it should hold one "
                        "image id per line")
    return names


def split_size(root: str, split: str) -> int | None:
    """Number of ids in a list file, or None when it is absent."""
    try:
        return len(read_list(root, split))
    except DataError:
        return None


def image_path(root: str, name: str) -> str | None:
    for ext in IMAGE_EXTS:
        p = os.path.join(root, IMAGE_DIR, name + ext)
        if os.path.isfile(p):
            return p
    return None


def mask_path(root: str, name: str) -> str | None:
    for d in MASK_DIRS:
        p = os.path.join(root, d, name + ".png")
        if os.path.isfile(p):
            return p
    return None


def class_names(config) -> tuple[str, ...]:
    """Class names (background first) for `config.data`; checks their count.

    `<root>/classes.json` (`{"classes": ["background", ...], ...}`) wins
    when present; otherwise the built-in VOC or COCO names. The synthetic
    world must provide the file. `data.source="tfds"`: the names stored
    with the TFDS dataset.
    """
    if source(config) == "tfds":
        from ssr_jax.data import tfds_source

        return tfds_source.class_names(config)
    return folder_class_names(config)


def folder_class_names(config) -> tuple[str, ...]:
    """`class_names` from `data.root` (or the built-in lists)."""
    d = config.data
    path = os.path.join(d.root, CLASSES_FILE) if d.root else ""
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                names = json.load(f)["classes"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path} is unreadable ({e}); expected "
                            '{"classes": ["background", ...]}') from e
        if not isinstance(names, list) or not all(
                isinstance(n, str) for n in names):
            raise DataError(f'{path}: "classes" must be a list of strings')
        names = tuple(names)
        source = path
    elif d.name == "voc":
        names, source = VOC_CLASSES, "the VOC class list"
    elif d.name == "coco":
        names, source = COCO_CLASSES, "the COCO class list"
    else:
        raise DataError(f"{path or '<data.root>/classes.json'} is missing: "
                        f"data.name={d.name!r} needs it to name the classes")
    if len(names) != d.num_classes:
        raise DataError(f"data.num_classes={d.num_classes} but {source} has "
                        f"{len(names)} classes (background included); fix "
                        "one of them")
    return names


@functools.lru_cache(maxsize=1)
def palette() -> tuple[int, ...]:
    """The PASCAL VOC colour map (256 RGB triples, flattened; index 255 is
    (224, 224, 192)), for writing palette PNGs (`Image.putpalette`) that
    VOC tools display as VOC does. The one copy: the synthetic world and
    `tools/coco_masks.py` use it too."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= (c & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return tuple(pal)


# --- decoding ----------------------------------------------------------------


def read_image(path: str) -> np.ndarray:
    """Decodes an image to uint8 [H, W, 3] RGB; `DataError` if corrupt."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt image {path}: {e}") from e


def read_mask(path: str, num_classes: int) -> np.ndarray:
    """Decodes a class mask to uint8 [H, W]; `DataError` on bad content.

    Palette PNGs read as their indices. Values must lie in {0..C-1, 255}.
    """
    try:
        with Image.open(path) as im:
            mode = im.mode
            mask = np.array(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt mask {path}: {e}") from e
    if mask.ndim != 2:
        raise DataError(
            f"mask {path} is {mode} with shape {mask.shape}; expected a "
            "palette or greyscale PNG of class indices (do not convert VOC "
            "masks to RGB)")
    if mask.dtype == np.uint8:  # bincount: ~10x faster than np.unique
        values = np.flatnonzero(np.bincount(mask.reshape(-1), minlength=256))
    else:
        values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE)]
    if bad.size:
        raise DataError(
            f"mask {path} has value {int(bad[0])} outside 0..{num_classes - 1}"
            f" and {IGNORE} (values found: {values.tolist()}; "
            f"data.num_classes={num_classes})")
    return mask.astype(np.uint8)


def _check_tail(path: str, fmt: str) -> None:
    """Detects truncated JPEG/PNG files without decoding them."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1024))
        tail = f.read()
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise DataError(f"corrupt image {path}: truncated JPEG (no end "
                        "marker)")
    if fmt == "PNG" and b"IEND" not in tail[-12:]:
        raise DataError(f"corrupt image {path}: truncated PNG (no IEND)")


def image_size(path: str) -> tuple[int, int]:
    """(H, W) from the header, after checking the file's tail."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            fmt = im.format
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt image {path}: {e}") from e
    _check_tail(path, fmt)
    return h, w


def xml_labels(path: str, names: tuple[str, ...]) -> list[int]:
    """Label ids of the objects in a VOC XML annotation."""
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError) as e:
        raise DataError(f"corrupt annotation {path}: {e}") from e
    index = {n: i for i, n in enumerate(names)}
    out = set()
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index or index[name] == 0:
            raise DataError(f"annotation {path} names unknown class {name!r}"
                            f" (known: {', '.join(names[1:])})")
        out.add(index[name])
    return sorted(out)


# --- scan, cache, summary ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitSummary:
    """What `validate_split` found; `str()` gives the readable report."""

    split: str
    root: str
    num_listed: int
    num_usable: int
    num_with_masks: int
    label_sources: dict[str, int]
    class_histogram: dict[str, int]  # images containing each class
    num_without_foreground: int
    max_classes_per_image: int
    max_classes_allowed: int
    num_over_max: int
    num_skipped: int
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    from_cache: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [
            f"split {self.split!r} at {self.root}: {self.num_listed} listed, "
            f"{self.num_usable} usable, {self.num_with_masks} with masks "
            f"(labels from {self.label_sources}; "
            f"{'cached' if self.from_cache else 'scanned'})",
            f"  max classes per image {self.max_classes_per_image} "
            f"(data.max_classes_per_image={self.max_classes_allowed}; "
            f"{self.num_over_max} images over it)",
            f"  images without foreground: {self.num_without_foreground}",
            "  images per class: " + ", ".join(
                f"{k} {v}" for k, v in self.class_histogram.items()),
        ]
        if self.num_skipped:
            lines.append(f"  skipped {self.num_skipped} bad examples "
                         "(data.strict=False):")
            lines += [f"    {p}" for p in
                      self.problems[:_MAX_LISTED_PROBLEMS]]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Split:
    """A validated split.

    `names`, `image_paths`, `mask_paths`, `sizes` and `labels` cover every
    listed id (index = line in the list file); `usable` holds the indices
    of the ids without problems, which are the only ones ever read.
    """

    name: str
    root: str
    names: tuple[str, ...]
    image_paths: tuple[str | None, ...]
    mask_paths: tuple[str | None, ...]
    sizes: np.ndarray  # int32 [N, 2] (H, W); 0 where unreadable
    labels: np.ndarray  # float32 [N, C-1]; class c <-> label id c + 1
    usable: np.ndarray  # int64 [U]
    summary: SplitSummary
    # Where the bytes come from: None = the files above; else a record
    # store (`tfds_source.RecordStore`, data.source="tfds") whose
    # `image(i)`, `mask(i)`, `superpixels(i)` decode list line i, and the
    # paths above are descriptions for messages (mask None = no mask).
    store: object | None = None

    def __len__(self) -> int:
        return len(self.names)

    def read_image(self, idx: int) -> np.ndarray:
        """uint8 [H, W, 3] RGB of list line `idx`; `DataError` if corrupt."""
        if self.store is not None:
            return self.store.image(idx)
        return read_image(self.image_paths[idx])

    def read_mask(self, idx: int, num_classes: int) -> np.ndarray | None:
        """uint8 [H, W] class mask of line `idx`, None when it has none."""
        if self.mask_paths[idx] is None:
            return None
        if self.store is not None:
            return self.store.mask(idx)
        return read_mask(self.mask_paths[idx], num_classes)


def cache_dir(config) -> str:
    """The label/SLIC cache directory, created if needed.

    `data.cache_dir` when set; else the user cache directory,
    `$XDG_CACHE_HOME/ssr_jax/data/<root name>-<hash of the root path>`
    (default `~/.cache`): never inside the dataset, which may be read-only
    or shared, and stays clean.
    """
    d = config.data
    if d.cache_dir:
        try:
            os.makedirs(d.cache_dir, exist_ok=True)
        except OSError as e:
            raise DataError(f"data.cache_dir={d.cache_dir!r} cannot be "
                            f"created: {e}") from e
        return d.cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    root = os.path.abspath(d.root)
    tag = hashlib.sha1(root.encode()).hexdigest()[:16]
    name = os.path.basename(root.rstrip(os.sep)) or "root"
    path = os.path.join(base, "ssr_jax", "data", f"{name}-{tag}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise DataError(f"the data cache {path} cannot be created ({e}); "
                        "set --config.data.cache_dir to a writable "
                        "directory") from e
    return path


def _cache_key(config, split: str, names: list[str]) -> str:
    d = config.data
    root = os.path.abspath(d.root)
    with open(list_path(d.root, split), "rb") as f:
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
    img = image_path(root, name)
    if img is None:
        rec["problem"] = (f"missing image for {name!r}: expected "
                          f"{os.path.join(root, IMAGE_DIR, name + '.jpg')}"
                          " (or .png)")
        return rec
    rec["image"] = os.path.relpath(img, root)
    msk = mask_path(root, name)
    rec["mask"] = None if msk is None else os.path.relpath(msk, root)
    try:
        rec["hw"] = list(image_size(img))
        xml = os.path.join(root, XML_DIR, name + ".xml")
        if msk is not None and label_source != "xml":
            mask = read_mask(msk, len(names))
            if list(mask.shape) != rec["hw"]:
                raise DataError(
                    f"mask {msk} is {mask.shape[0]}x{mask.shape[1]} but its "
                    f"image {img} is {rec['hw'][0]}x{rec['hw'][1]}")
            vals = np.flatnonzero(np.bincount(mask.reshape(-1),
                                              minlength=256))
            rec["labels"] = [int(v) for v in vals if 0 < v < len(names)]
            rec["source"] = "mask"
        elif label_source != "mask" and os.path.isfile(xml):
            rec["labels"] = xml_labels(xml, names)
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
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _records(config, split: str, names: list[str],
             classes: tuple[str, ...]) -> tuple[list[dict], bool]:
    """Scan results for `split`, from the label cache when it is current."""
    folder = cache_dir(config)
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
               classes: tuple[str, ...], from_cache: bool) -> SplitSummary:
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
    if d.name == "voc" and split == "train" and split == d.train_split:
        notes.append("training on VOC 'train' (1,464 images); the papers "
                     "use 'train_aug' (10,582: VOC + SBD), "
                     "--config.data.train_split=train_aug")
    return SplitSummary(
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


def source(config) -> str:
    """`data.source`: "folders" (this module's files) or "tfds"."""
    return str(config.data.get("source", "folders"))


def load_split(config, split: str) -> Split:
    """Validates `split` (see `validate_split`) and returns its `Split`.

    With `data.source="tfds"` the split comes from the built TFDS dataset
    (`tfds_source.load_split`): the same fields, read from its metadata.
    """
    if source(config) == "tfds":
        from ssr_jax.data import tfds_source

        return tfds_source.load_split(config, split)
    return load_folder_split(config, split)


def load_folder_split(config, split: str) -> Split:
    """`load_split` on the files under `data.root`."""
    d = config.data
    check_root(d.root)
    classes = folder_class_names(config)
    names = read_list(d.root, split)
    records, from_cache = _records(config, split, names, classes)
    bad = [r["problem"] for r in records if r["problem"]]
    if bad and d.strict:
        listed = "\n  ".join(bad[:_MAX_LISTED_PROBLEMS])
        more = len(bad) - _MAX_LISTED_PROBLEMS
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

        for p in bad[:_MAX_LISTED_PROBLEMS]:
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

    return Split(
        name=split, root=d.root, names=tuple(names),
        image_paths=tuple(full(r["image"]) for r in records),
        mask_paths=tuple(full(r["mask"]) for r in records),
        sizes=np.array([r["hw"] for r in records], np.int32).reshape(-1, 2),
        labels=labels, usable=usable, summary=summary)


def validate_split(config, split: str) -> SplitSummary:
    """Start-up pass over a split: returns (and logs) its summary.

    Raises `DataError` for a missing root (with the expected layout), a
    missing or empty list, and, when `data.strict`, for any example with a
    missing image, corrupt image, missing labels or a bad mask (value
    outside {0..C-1, 255}, wrong size, RGB); each message names the path.
    With `data.strict=False` such examples are skipped and counted.
    """
    summary = load_split(config, split).summary
    logging.info("%s", summary)
    return summary
