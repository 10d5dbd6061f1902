r"""Renders MS COCO 2014 instance annotations into VOC-layout class masks.

    python tools/coco_masks.py --coco /data/coco --out /data/coco2014

reads `<coco>/annotations/instances_{train2014,val2014}.json` and the
images in `<coco>/{train2014,val2014}/`, and writes the layout that
`ssr_jax.data.voc` reads (the same as PASCAL VOC):

    <out>/JPEGImages/train2014 -> <coco>/train2014     (symlink, or copies)
    <out>/SegmentationClass/train2014/COCO_train2014_<12 digits>.png
    <out>/ImageSets/Segmentation/{train,val}.txt       (ids like
                                                        train2014/COCO_...)
    <out>/classes.json                                 (background + 80)

Then train with `--config.data.root=<out>`. Image ids keep COCO's file
names (no renaming, unlike WeCLIP's `[15:]` name slicing).

Masks: the 80 category ids, in increasing order, become labels 1..80; 0 is
background. Instances are drawn largest first, so a smaller object on top
of a larger one stays visible where they overlap (as coco2voc). Crowd
regions get their class (`--crowd class`, default, as coco2voc) or 255 =
ignore (`--crowd ignore`; drawn under the non-crowd instances). Only images
with at least one annotation are listed (82,081 train / 40,137 val, the
WSSS convention). Masks are palette PNGs with the VOC colours. Existing
masks are kept unless `--overwrite`, so an interrupted run can resume.

Needs pycocotools (`pip install pycocotools`), used only here.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image

# Runnable as `python tools/coco_masks.py` from a checkout without install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ssr_jax.data import voc  # noqa: E402
from ssr_jax.io_utils import atomic_write  # noqa: E402

SPLITS = {"train2014": "train", "val2014": "val"}
IGNORE = 255


def _mask_utils():
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:
        raise SystemExit(
            "tools/coco_masks.py needs pycocotools to decode COCO polygons "
            "and RLE: pip install pycocotools") from e
    return mask_utils


voc_palette = voc.palette  # the VOC colour map (ssr_jax/data/voc.py)


def decode(segmentation, height: int, width: int) -> np.ndarray:
    """One annotation's segmentation (polygons or RLE) → bool [H, W]."""
    mu = _mask_utils()
    if isinstance(segmentation, list):  # polygons, possibly several parts
        rle = mu.merge(mu.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mu.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mu.decode(rle).astype(bool)


def render(annotations: list[dict], height: int, width: int,
           cat_to_label: dict[int, int], crowd: str = "class") -> np.ndarray:
    """Class mask uint8 [H, W] of one image (see the module docstring)."""
    mask = np.zeros((height, width), np.uint8)
    order = sorted(annotations, key=lambda a: -float(a.get("area", 0.0)))
    if crowd == "ignore":
        crowds = [a for a in order if a.get("iscrowd")]
        order = [a for a in order if not a.get("iscrowd")]
        for a in crowds:
            mask[decode(a["segmentation"], height, width)] = IGNORE
    for a in order:
        mask[decode(a["segmentation"], height, width)] = cat_to_label[
            a["category_id"]]
    return mask


def _save_mask(path: str, mask: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(mask, mode="P")
    im.putpalette(voc_palette())
    with atomic_write(path) as f:
        im.save(f, format="PNG")


def _link_images(src: str, dst: str, copy: bool) -> None:
    if os.path.islink(dst) or os.path.isdir(dst):
        if os.path.islink(dst) and os.path.realpath(dst) != os.path.realpath(
                src):
            raise SystemExit(f"{dst} links to {os.path.realpath(dst)}, not "
                             f"{src}; remove it and run again")
        if not copy:
            return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if copy:
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    try:
        os.symlink(os.path.abspath(src), dst, target_is_directory=True)
    except OSError as e:
        raise SystemExit(f"cannot symlink {dst} -> {src} ({e}); pass "
                         "--copy-images to copy the images instead") from e


def convert_split(coco: str, out: str, year_split: str, crowd: str,
                  overwrite: bool, copy_images: bool, workers: int,
                  limit: int = 0) -> tuple[list[str], list[str]]:
    """Converts one split; returns (its ids, class names incl. background)."""
    ann_path = os.path.join(coco, "annotations",
                            f"instances_{year_split}.json")
    img_dir = os.path.join(coco, year_split)
    for p in (ann_path, img_dir):
        if not os.path.exists(p):
            raise SystemExit(f"{p} is missing: --coco must hold "
                             "annotations/instances_<split>.json and the "
                             "image folders train2014/, val2014/")
    print(f"reading {ann_path} ...", flush=True)
    with open(ann_path, encoding="utf-8") as f:
        blob = json.load(f)
    cats = sorted(blob["categories"], key=lambda c: c["id"])
    cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
    names = ["background"] + [c["name"] for c in cats]
    if len(cats) != 80:
        print(f"note: {len(cats)} categories (COCO has 80); labels 1.."
              f"{len(cats)}", flush=True)
    per_image: dict[int, list[dict]] = {}
    for a in blob["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    images = sorted((im for im in blob["images"] if im["id"] in per_image),
                    key=lambda im: im["id"])
    if limit > 0:
        images = images[:limit]
    _link_images(img_dir, os.path.join(out, "JPEGImages", year_split),
                 copy_images)

    def one(im):
        stem = os.path.splitext(im["file_name"])[0]
        name = f"{year_split}/{stem}"
        path = os.path.join(out, "SegmentationClass", name + ".png")
        if overwrite or not os.path.exists(path):
            _save_mask(path, render(per_image[im["id"]], im["height"],
                                    im["width"], cat_to_label, crowd))
        return name

    ids = []
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for i, name in enumerate(pool.map(one, images)):
            ids.append(name)
            if (i + 1) % 5000 == 0:
                print(f"  {year_split}: {i + 1}/{len(images)}", flush=True)
    return ids, names


def convert(coco: str, out: str, splits=tuple(SPLITS), crowd: str = "class",
            overwrite: bool = False, copy_images: bool = False,
            workers: int = 0, limit: int = 0) -> dict[str, int]:
    """Converts `splits`; returns {list name: number of ids}."""
    workers = workers or os.cpu_count() or 1
    lists = os.path.join(out, "ImageSets", "Segmentation")
    os.makedirs(lists, exist_ok=True)
    class_names = None
    sizes = {}
    for year_split in splits:
        if year_split not in SPLITS:
            raise SystemExit(f"unknown split {year_split!r}; choose from "
                             f"{', '.join(SPLITS)}")
        ids, names = convert_split(coco, out, year_split, crowd, overwrite,
                                   copy_images, workers, limit)
        if class_names is not None and names != class_names:
            raise SystemExit(f"{year_split} has other categories than the "
                             "previous split")
        class_names = names
        list_name = SPLITS[year_split]
        with open(os.path.join(lists, list_name + ".txt"), "w") as f:
            f.write("".join(i + "\n" for i in ids))
        sizes[list_name] = len(ids)
        print(f"{list_name}: {len(ids)} images", flush=True)
    with open(os.path.join(out, "classes.json"), "w", encoding="utf-8") as f:
        json.dump({"classes": class_names}, f, indent=1)
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coco", required=True,
                   help="COCO root with annotations/, train2014/, val2014/")
    p.add_argument("--out", required=True, help="output dataset root")
    p.add_argument("--splits", nargs="+", default=list(SPLITS),
                   help="COCO folders to convert (default: both)")
    p.add_argument("--crowd", choices=("class", "ignore"), default="class",
                   help="crowd regions: their class, or 255 (ignore)")
    p.add_argument("--overwrite", action="store_true",
                   help="re-render masks that already exist")
    p.add_argument("--copy-images", action="store_true",
                   help="copy the images instead of symlinking the folders")
    p.add_argument("--workers", type=int, default=0,
                   help="rendering threads (0 = all cores)")
    p.add_argument("--limit", type=int, default=0,
                   help="convert only the first N images per split (tests)")
    a = p.parse_args(argv)
    _mask_utils()  # fail early with the install hint
    convert(a.coco, a.out, a.splits, a.crowd, a.overwrite, a.copy_images,
            a.workers, a.limit)
    print(f"done: train with --config.data.root={a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
