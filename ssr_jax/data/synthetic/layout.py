"""The world's files in the PASCAL VOC layout: splits, ids, the palette
and the split lists (see the package docstring for the tree)."""

from __future__ import annotations

import os
from pathlib import Path

from ssr_jax.data import voc

IGNORE_INDEX = 255
SPLITS = ("train", "val")

voc_palette = voc.palette  # the VOC colour map (one copy, in voc.py)


def image_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def read_split(root: str | os.PathLike, split: str) -> list[str]:
    path = Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
    return [s for s in path.read_text().split() if s]
