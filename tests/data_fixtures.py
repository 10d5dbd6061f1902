"""Tiny dataset trees on disk for tests (VOC layout, COCO layout, raw COCO).

Reusable by any test that needs real files:

    from tests.data_fixtures import write_voc_tree, fixture_config
    tree = write_voc_tree(tmp_path / "voc")
    config = fixture_config(tree)            # tiny config pointing at it
    tree.labels["img000"]                    # expected label ids, e.g. [3, 9]

`write_voc_tree` / `write_coco_tree` take `broken=` kinds (see `BROKEN`) to
damage chosen ids; `tree.broken[kind]` says which id (or file) was damaged.
`write_coco_raw` writes the raw COCO 2014 layout (images + instances JSON)
that `tools/coco_masks.py` converts. Images hold coloured shapes on a
textured background so that SLIC has edges to follow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np
from PIL import Image

from ssr_jax import config_defaults
from ssr_jax.data import voc

BROKEN = {
    "missing_image": "the image file of one id is deleted",
    "missing_mask": "the mask (and XML) of one id is deleted",
    "bad_mask_value": "one mask holds a value >= num_classes (VOC: 42)",
    "rgb_mask": "one mask is saved as an RGB PNG",
    "size_mismatch": "one mask has another size than its image",
    "truncated_jpeg": "one JPEG is cut in half",
    "empty_list": "the first split's list file is empty",
    "missing_root": "nothing is written at all",
}
# (H, W) of the fixture images, alternating.
SIZES = ((40, 56), (64, 48))


@dataclasses.dataclass
class Tree:
    """What a fixture wrote: paths, splits and the expected labels."""

    root: str
    name: str  # voc | coco (the config's data.name)
    num_classes: int
    splits: dict[str, list[str]]
    labels: dict[str, list[int]]  # id -> sorted foreground label ids
    has_mask: dict[str, bool]
    broken: dict[str, str]  # kind -> damaged id
    sizes: dict[str, tuple[int, int]]

    def image(self, name: str) -> str:
        for ext in (".jpg", ".png"):
            p = os.path.join(self.root, "JPEGImages", name + ext)
            if os.path.exists(p):
                return p
        return os.path.join(self.root, "JPEGImages", name + ".jpg")

    def mask(self, name: str, folder: str = "") -> str:
        folder = folder or ("SegmentationClassAug" if self.name == "voc"
                            else "SegmentationClass")
        return os.path.join(self.root, folder, name + ".png")


def _picture(rng: np.random.Generator, hw: tuple[int, int],
             classes: list[int]):
    """An image and its mask: one rectangle per class, void border 255.

    Each class gets its own vertical band, so no object hides another and
    the mask holds every class of the image.
    """
    h, w = hw
    yy, xx = np.mgrid[:h, :w]
    bg = np.stack([60 + 40 * np.sin(xx / 5.0), 90 + 30 * np.cos(yy / 7.0),
                   100 + 0 * xx], -1)
    image = bg + rng.normal(0, 6, (h, w, 3))
    mask = np.zeros((h, w), np.uint8)
    band = w // len(classes)
    for k, c in enumerate(classes):
        y0 = int(rng.integers(0, h // 3))
        y1 = int(rng.integers(y0 + h // 3, h + 1))
        x0 = k * band + int(rng.integers(0, band // 4 + 1))
        x1 = (k + 1) * band - int(rng.integers(0, band // 4 + 1))
        colour = np.array([(37 * c) % 256, (91 * c + 50) % 256,
                           (151 * c + 100) % 256], float)
        mask[y0:y1, x0:x1] = 255
        mask[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = c
        image[y0:y1, x0:x1] = colour + rng.normal(0, 4, (y1 - y0, x1 - x0, 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _write_mask(path: str, mask: np.ndarray, mode: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "P":
        im = Image.fromarray(mask, mode="P")
        im.putpalette(voc.palette())
    elif mode == "RGB":
        im = Image.fromarray(np.stack([mask] * 3, -1))
    else:
        im = Image.fromarray(mask)
    im.save(path)


def _xml(path: str, name: str, hw: tuple[int, int], objects: list[str]):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    objs = "".join(
        f"<object><name>{o}</name><difficult>0</difficult><bndbox><xmin>1"
        f"</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox>"
        "</object>" for o in objects)
    with open(path, "w") as f:
        f.write(f"<annotation><filename>{name}.jpg</filename><size><width>"
                f"{hw[1]}</width><height>{hw[0]}</height><depth>3</depth>"
                f"</size>{objs}</annotation>")


def _write_tree(root, name: str, ids: list[str], splits: dict[str, list[str]],
                num_classes: int, class_names: tuple[str, ...],
                mask_dir: str, mask_mode: str, without_mask: tuple[str, ...],
                xml: bool, broken, seed: int, bad_value: int) -> Tree:
    root = str(root)
    broken = tuple(broken)
    for kind in broken:
        if kind not in BROKEN:
            raise ValueError(f"unknown broken kind {kind!r}; one of "
                             f"{sorted(BROKEN)}")
    tree = Tree(root=root, name=name, num_classes=num_classes, splits=splits,
                labels={}, has_mask={}, broken={}, sizes={})
    if "missing_root" in broken:
        tree.broken["missing_root"] = root
        return tree
    rng = np.random.default_rng(seed)
    for i, n in enumerate(ids):
        hw = SIZES[i % 2]
        k = 1 + i % 3
        classes = sorted({1 + (3 * i + 5 * j) % (num_classes - 1)
                          for j in range(k)})
        image, mask = _picture(rng, hw, classes)
        tree.sizes[n] = hw
        tree.labels[n] = classes
        path = os.path.join(root, "JPEGImages", n + ".jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image).save(path, quality=95)
        tree.has_mask[n] = n not in without_mask
        if tree.has_mask[n]:
            _write_mask(os.path.join(root, mask_dir, n + ".png"), mask,
                        mask_mode)
        if xml:
            _xml(os.path.join(root, "Annotations", n + ".xml"), n, hw,
                 [class_names[c] for c in classes])
    folder = os.path.join(root, "ImageSets", "Segmentation")
    os.makedirs(folder, exist_ok=True)
    for split, names in splits.items():
        with open(os.path.join(folder, split + ".txt"), "w") as f:
            f.write("".join(n + "\n" for n in names))

    # Damage: kind i hits the i-th id with a mask (cyclically).
    masked = [n for n in ids if tree.has_mask[n]]
    kinds = ["missing_image", "missing_mask", "bad_mask_value",
             "truncated_jpeg", "rgb_mask", "size_mismatch"]
    victims = {k: masked[i % len(masked)] for i, k in enumerate(kinds)}
    for kind in broken:
        if kind == "empty_list":
            split = next(iter(splits))
            open(os.path.join(folder, split + ".txt"), "w").close()
            tree.broken[kind] = split
            continue
        n = victims[kind]
        tree.broken[kind] = n
        mpath = os.path.join(root, mask_dir, n + ".png")
        if kind == "missing_image":
            os.remove(os.path.join(root, "JPEGImages", n + ".jpg"))
        elif kind == "missing_mask":
            os.remove(mpath)
            xpath = os.path.join(root, "Annotations", n + ".xml")
            if os.path.exists(xpath):
                os.remove(xpath)
            tree.has_mask[n] = False
        elif kind == "bad_mask_value":
            with Image.open(mpath) as im:
                m = np.array(im)
            m[0, 0] = bad_value
            _write_mask(mpath, m, mask_mode)
        elif kind == "truncated_jpeg":
            ipath = os.path.join(root, "JPEGImages", n + ".jpg")
            data = pathlib.Path(ipath).read_bytes()
            pathlib.Path(ipath).write_bytes(data[:len(data) // 2])
        elif kind == "rgb_mask":
            with Image.open(mpath) as im:
                m = np.array(im)
            _write_mask(mpath, m, "RGB")
        elif kind == "size_mismatch":
            with Image.open(mpath) as im:
                m = np.array(im)
            _write_mask(mpath, m[:-2], mask_mode)
    return tree


def write_voc_tree(root, *, num_images: int = 6, broken=(), seed: int = 0,
                   mask_dir: str = "SegmentationClassAug",
                   xml: bool = True) -> Tree:
    """A tiny VOC 2012 tree: ids img000.., sizes 40x56 / 64x48.

    Palette masks in `mask_dir`; the last id has no mask (labels from its
    XML). Lists: train_aug (all), train (all but the last), val (the first
    two). XML for every id when `xml`.
    """
    ids = [f"img{i:03d}" for i in range(num_images)]
    splits = {"train_aug": ids, "train": ids[:-1], "val": ids[:2]}
    return _write_tree(root, "voc", ids, splits, 21, voc.VOC_CLASSES, mask_dir,
                       "P", (ids[-1],), xml, broken, seed, 42)


def write_coco_tree(root, *, num_images: int = 6, broken=(),
                    seed: int = 1) -> Tree:
    """A tiny COCO tree as `tools/coco_masks.py` writes it (81 classes).

    Ids keep COCO's names under a sub-folder (`train2014/COCO_train2014_…`);
    greyscale masks in SegmentationClass/; lists train and val; classes.json.
    """
    half = max(1, num_images // 2)
    train = [f"train2014/COCO_train2014_{i:012d}" for i in range(1, half + 1)]
    val = [f"val2014/COCO_val2014_{i:012d}"
           for i in range(1, num_images - half + 1)]
    tree = _write_tree(root, "coco", train + val,
                       {"train": train, "val": val}, 81, voc.COCO_CLASSES,
                       "SegmentationClass", "L", (), False, broken, seed, 200)
    if "missing_root" not in broken:
        with open(os.path.join(str(root), "classes.json"), "w") as f:
            json.dump({"classes": list(voc.COCO_CLASSES)}, f)
    return tree


def write_dataset_tree(root, name: str, class_names, *, num_images: int = 6,
                       seed: int = 2) -> Tree:
    """A tiny tree in the VOC layout for any dataset (e.g. a toy one a test
    registers in `ssr_jax.data.specs`): ids `<name>000..`, palette masks
    in SegmentationClass/, XML annotations naming `class_names`
    (background first); lists train (all) and val (the first two)."""
    ids = [f"{name}{i:03d}" for i in range(num_images)]
    return _write_tree(root, name, ids, {"train": ids, "val": ids[:2]},
                       len(class_names), tuple(class_names),
                       "SegmentationClass", "P", (), True, (), seed,
                       len(class_names))


def write_coco_raw(root) -> dict:
    """Raw COCO 2014 files for `tools/coco_masks.py`, with known answers.

    train2014: two images, 12x10 (H x W). Image 1 holds a polygon rectangle
    (category 18 'dog'), an overlapping smaller uncompressed-RLE square
    (category 1 'person', drawn on top because it is smaller) and a crowd
    RLE (category 90 'toothbrush'). Image 2 has no annotation and must be
    left out of the list. val2014: one image with one RLE of category 1.
    Categories: ids 1, 18, 90 (non-consecutive on purpose) → labels 1, 2, 3.

    Returns `{"expected": {id: uint8 [12, 10] mask with crowd as its
    class}, "crowd": {id: bool [12, 10]}, "polygon": {id: bool [12, 10]}}`.
    """
    root = str(root)
    h, w = 12, 10
    cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"},
            {"id": 90, "name": "toothbrush"}]

    def rle(m):  # uncompressed COCO RLE: column-major run lengths from 0
        flat = m.T.reshape(-1).astype(np.uint8)
        counts, cur, run = [], 0, 0
        for v in flat:
            if v == cur:
                run += 1
            else:
                counts.append(run)
                cur, run = v, 1
        counts.append(run)
        return {"counts": counts, "size": [h, w]}

    person = np.zeros((h, w), bool)
    person[3:6, 3:6] = True
    crowd = np.zeros((h, w), bool)
    crowd[9:11, 0:4] = True
    # Polygon vertices on pixel corners: x 2..8, y 1..7.
    poly = [2.0, 1.0, 8.0, 1.0, 8.0, 7.0, 2.0, 7.0]
    val_person = np.zeros((h, w), bool)
    val_person[5:9, 2:9] = True
    for split in ("train2014", "val2014"):
        os.makedirs(os.path.join(root, split), exist_ok=True)
    images = {"train2014": [(1, "COCO_train2014_000000000001.jpg"),
                            (2, "COCO_train2014_000000000002.jpg")],
              "val2014": [(7, "COCO_val2014_000000000007.jpg")]}
    rng = np.random.default_rng(0)
    for split, items in images.items():
        for _, fname in items:
            img = rng.integers(0, 255, (h, w, 3), np.uint8)
            Image.fromarray(img).save(os.path.join(root, split, fname))
    anns = {
        "train2014": [
            {"id": 10, "image_id": 1, "category_id": 18, "iscrowd": 0,
             "segmentation": [poly], "area": 36.0,
             "bbox": [2, 1, 6, 6]},
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": rle(person), "area": 9.0,
             "bbox": [3, 3, 3, 3]},
            {"id": 12, "image_id": 1, "category_id": 90, "iscrowd": 1,
             "segmentation": rle(crowd), "area": 8.0,
             "bbox": [0, 9, 4, 2]},
        ],
        "val2014": [
            {"id": 20, "image_id": 7, "category_id": 1, "iscrowd": 0,
             "segmentation": rle(val_person), "area": 28.0,
             "bbox": [2, 5, 7, 4]},
        ],
    }
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, items in images.items():
        blob = {"images": [{"id": i, "file_name": f, "height": h, "width": w}
                           for i, f in items],
                "annotations": anns[split], "categories": cats}
        with open(os.path.join(root, "annotations",
                               f"instances_{split}.json"), "w") as f:
            json.dump(blob, f)
    # The polygon covers pixel centres with x in (2, 8), y in (1, 7).
    polygon = np.zeros((h, w), bool)
    polygon[1:7, 2:8] = True
    train_mask = np.zeros((h, w), np.uint8)
    train_mask[crowd] = 3
    train_mask[polygon] = 2
    train_mask[person] = 1
    val_mask = np.zeros((h, w), np.uint8)
    val_mask[val_person] = 1
    return {
        "expected": {"train2014/COCO_train2014_000000000001": train_mask,
                     "val2014/COCO_val2014_000000000007": val_mask},
        "crowd": {"train2014/COCO_train2014_000000000001": crowd},
        "polygon": {"train2014/COCO_train2014_000000000001": polygon},
    }


def fixture_config(tree: Tree, **overrides):
    """The tiny config for a fixture tree; `overrides` use dotted keys.

    Example: `fixture_config(tree, **{"data.strict": False})`.
    """
    c = config_defaults.base_config()
    config_defaults.shrink_for_tests(c)
    c.data.name = tree.name
    c.data.root = tree.root
    c.data.num_classes = tree.num_classes
    if tree.name == "coco":
        c.data.train_split = "train"
        c.data.max_classes_per_image = (
            config_defaults.COCO_MAX_CLASSES_PER_IMAGE)
    c.data.num_workers = 2
    c.train.batch_size = 4
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c
