"""The VOC directory layout: lists, paths, class names, decoding.

One reader serves PASCAL VOC 2012 + SBD, MS COCO 2014 after
`tools/coco_masks.py`, the synthetic world, and any dataset registered
with `reader="voc_tree"` (`data.specs`), which all use this layout under
`data.root`:

    JPEGImages/<id>.jpg                 (or <id>.png)
    SegmentationClassAug/<id>.png       (preferred) or SegmentationClass/
                                        palette/grey PNG: 0..C-1, 255 ignore
    Annotations/<id>.xml                (optional; labels without a mask)
    ImageSets/Segmentation/<split>.txt  (one id per line; first token used)
    classes.json                        (optional; required when the spec
                                        has no class names, e.g. synthetic)

Ids may contain a sub-directory (COCO: `train2014/COCO_train2014_…`).

This module reads single files; `data.splits` scans a whole split (labels,
problems, the label cache) into a `Split`, and `ssr_jax.data_sources`
chooses between these files and a built TFDS dataset (`data.source`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image

from ssr_jax.data import DataError, specs, vocabularies

VOC_CLASSES = vocabularies.VOC_CLASSES  # re-exported (tests, tools)
COCO_CLASSES = vocabularies.COCO_CLASSES

IMAGE_DIR = "JPEGImages"
IMAGE_EXTS = (".jpg", ".png")
MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")
XML_DIR = "Annotations"
LIST_DIR = os.path.join("ImageSets", "Segmentation")
CLASSES_FILE = "classes.json"
IGNORE = 255
MAX_LISTED_PROBLEMS = 20  # problems listed in messages and summaries

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


def folder_class_names(config) -> tuple[str, ...]:
    """Class names (background first) for `config.data`; checks their count.

    `<root>/classes.json` (`{"classes": ["background", ...], ...}`) wins
    when present; otherwise the names of the dataset's spec
    (`data.specs`). A spec without names (the synthetic world) needs the
    file. (`data_sources.class_names` also serves `data.source="tfds"`.)
    """
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
    elif specs.get(d.name).classes is not None:
        names = specs.get(d.name).classes
        source = f"the {d.name.upper()} class list"
    else:
        raise DataError(f"{path or '<data.root>/classes.json'} is missing: "
                        f"data.name={d.name!r} needs it to name the classes")
    if len(names) != d.num_classes:
        raise DataError(f"data.num_classes={d.num_classes} but {source} has "
                        f"{len(names)} classes (background included); fix "
                        "one of them")
    return names


# The PASCAL VOC colour map (256 RGB triples, flattened), for palette PNGs;
# the one copy is `specs.voc_palette` (a spec's default palette).
palette = specs.voc_palette


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


# --- a split -----------------------------------------------------------------


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
                      self.problems[:MAX_LISTED_PROBLEMS]]
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


# --- caches ------------------------------------------------------------------


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
