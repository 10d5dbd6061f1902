"""Statistics of a world (the evidence that the difficulties are there):
rates measured on the scene records, oracle mIoUs, and a contact sheet."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ssr_jax.data.synthetic.layout import (
    IGNORE_INDEX,
    read_split,
    voc_palette,
)
from ssr_jax.data.synthetic.spec import PATCH_SIZE, WorldConfig

# ---------------------------------------------------------------------------
# Statistics (the evidence that the difficulties are there)
# ---------------------------------------------------------------------------


def meta_statistics(cfg: WorldConfig,
                    metas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rates measured on the written scenes (all splits together).

    Returns: images; class_freq (share of images with the class);
    home_rate {class: P(home background | class)}; home_share {class:
    P(class | its home background)}; pair_rate {"a+b": P(b | a) and P(a | b)
    together, i.e. P(both | either)}; touch_rate {"a+b": P(touching | both)};
    objects_per_image and classes_per_image histograms; occluded and
    truncated (share of objects with > 5% of their area covered by later
    objects / outside the image).
    """
    n = len(metas)
    names = cfg.class_names
    has = {c: [m for m in metas.values() if c in m["classes"]]
           for c in names}
    by_bg = {b: [m for m in metas.values() if m["background"] == b]
             for b in cfg.background_names}
    home_rate, home_share = {}, {}
    for c in cfg.classes:
        if c.home and has[c.name]:
            home_rate[c.name] = round(sum(
                m["background"] == c.home for m in has[c.name])
                / len(has[c.name]), 4)
        if c.home and by_bg[c.home]:
            home_share[c.name] = round(sum(
                c.name in m["classes"] for m in by_bg[c.home])
                / len(by_bg[c.home]), 4)
    pair_rate, touch_rate = {}, {}
    for p in cfg.pairs:
        either = [m for m in metas.values()
                  if p.first in m["classes"] or p.second in m["classes"]]
        both = [m for m in either
                if p.first in m["classes"] and p.second in m["classes"]]
        key = f"{p.first}+{p.second}"
        pair_rate[key] = round(len(both) / max(len(either), 1), 4)
        touch_rate[key] = round(sum(
            [p.first, p.second] in m["touching"] for m in both)
            / max(len(both), 1), 4)
    objs = [o for m in metas.values() for o in m["objects"]]
    hist_o: dict[str, int] = {}
    hist_c: dict[str, int] = {}
    for m in metas.values():
        k = str(len(m["objects"]))
        hist_o[k] = hist_o.get(k, 0) + 1
        k = str(len(m["classes"]))
        hist_c[k] = hist_c.get(k, 0) + 1
    return {
        "images": n,
        "class_freq": {c: round(len(has[c]) / max(n, 1), 4) for c in names},
        "background_freq": {b: round(len(v) / max(n, 1), 4)
                            for b, v in by_bg.items()},
        "home_rate": home_rate,
        "home_share": home_share,
        "pair_rate": pair_rate,
        "touch_rate": touch_rate,
        "objects_per_image": dict(sorted(hist_o.items())),
        "classes_per_image": dict(sorted(hist_c.items())),
        "occluded": round(sum(o["occluded_px"] > 0.05 * o["area_px"]
                              for o in objs) / max(len(objs), 1), 4),
        "truncated": round(sum(o["inside_px"] < 0.95 * o["area_px"]
                               for o in objs) / max(len(objs), 1), 4),
        "horizon": round(sum(m["horizon"] is not None
                             for m in metas.values()) / max(n, 1), 4),
    }


def _miou(conf: np.ndarray) -> float:
    tp = np.diag(conf).astype(float)
    denom = conf.sum(0) + conf.sum(1) - tp
    present = conf.sum(1) > 0
    return float(np.mean(tp[present] / denom[present]))


def _confusion(gt: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    keep = gt != IGNORE_INDEX
    return np.bincount(k * gt[keep].astype(int) + pred[keep],
                       minlength=k * k).reshape(k, k)


def oracle_statistics(root: str | os.PathLike, split: str = "val", *,
                      fit_split: str = "train", slic_segments: int = 100,
                      slic_compactness: float = 10.0,
                      max_images: int = 0) -> dict[str, float]:
    """mIoU of three oracles on `split` (evaluation aids, not the method).

    - colour: the majority label of each quantised RGB colour (16 levels
      per channel), fitted on `fit_split`'s masks. High would mean colour
      alone segments the world (a shortcut); the world aims for moderate.
    - superpixel: SLIC (skimage, Lab) with each superpixel given its
      majority ground-truth label: the ceiling of superpixel-aligned
      masks. High means object outlines are colour edges.
    - patch: each 16x16 patch given its majority label: the ceiling of a
      patch-level CAM without any boundary refinement.
    """
    from skimage.segmentation import slic  # heavy: only for this aid

    root = Path(root)
    k = len(json.loads((root / "classes.json").read_text())["classes"])

    def load(sid: str) -> tuple[np.ndarray, np.ndarray]:
        img = np.asarray(Image.open(root / "JPEGImages" / f"{sid}.jpg"))
        mask = np.asarray(Image.open(root / "SegmentationClass"
                                     / f"{sid}.png"))
        return img, mask

    def limit(ids: list[str]) -> list[str]:
        return ids[:max_images] if max_images else ids

    votes = np.zeros((16 ** 3, k), np.int64)
    for sid in limit(read_split(root, fit_split)):
        img, mask = load(sid)
        q = (img // 16).astype(int)
        code = (q[..., 0] * 16 + q[..., 1]) * 16 + q[..., 2]
        keep = mask != IGNORE_INDEX
        np.add.at(votes, (code[keep], mask[keep].astype(int)), 1)
    colour_label = votes.argmax(1)
    confs = {n: np.zeros((k, k), np.int64)
             for n in ("colour", "superpixel", "patch")}
    for sid in limit(read_split(root, split)):
        img, mask = load(sid)
        q = (img // 16).astype(int)
        code = (q[..., 0] * 16 + q[..., 1]) * 16 + q[..., 2]
        confs["colour"] += _confusion(mask, colour_label[code], k)
        seg = slic(img, n_segments=slic_segments,
                   compactness=slic_compactness, start_label=0)
        confs["superpixel"] += _confusion(mask, _majority(seg, mask, k), k)
        h, w = mask.shape
        grid = (np.arange(h)[:, None] // PATCH_SIZE * (w // PATCH_SIZE)
                + np.arange(w)[None, :] // PATCH_SIZE)
        confs["patch"] += _confusion(mask, _majority(grid, mask, k), k)
    return {n: round(_miou(c), 4) for n, c in confs.items()}


def _majority(seg: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Each region of `seg` labelled with its majority non-void label."""
    keep = mask != IGNORE_INDEX
    n = int(seg.max()) + 1
    votes = np.zeros((n, k), np.int64)
    np.add.at(votes, (seg[keep], mask[keep].astype(int)), 1)
    return votes.argmax(1)[seg]


# ---------------------------------------------------------------------------
# Contact sheet
# ---------------------------------------------------------------------------


def contact_sheet(root: str | os.PathLike, path: str | os.PathLike, *,
                  split: str = "train", num: int = 16, cols: int = 4,
                  tile: int = 128, alpha: float = 0.45) -> None:
    """A grid of image | mask-overlay pairs, palette-quantised PNG."""
    root = Path(root)
    ids = read_split(root, split)[:num]
    pal = np.array(voc_palette(), np.uint8).reshape(256, 3)
    rows = math.ceil(len(ids) / cols)
    sheet = Image.new("RGB", (cols * 2 * tile + (cols - 1) * 4,
                              rows * tile + (rows - 1) * 4), (255, 255, 255))
    for n, sid in enumerate(ids):
        img = Image.open(root / "JPEGImages" / f"{sid}.jpg").convert("RGB")
        mask = np.asarray(Image.open(root / "SegmentationClass"
                                     / f"{sid}.png"))
        arr = np.asarray(img).astype(float)
        over = pal[mask].astype(float)
        blend = np.where((mask > 0)[..., None],
                         (1 - alpha) * arr + alpha * over, arr * 0.6)
        blend[mask == IGNORE_INDEX] = 255.0
        pair = [img, Image.fromarray(blend.astype(np.uint8))]
        r, c = divmod(n, cols)
        for j, im in enumerate(pair):
            im = im.resize((tile, tile), Image.BILINEAR)
            sheet.paste(im, (c * (2 * tile + 4) + j * tile, r * (tile + 4)))
    sheet = sheet.quantize(colors=128, method=Image.Quantize.MEDIANCUT,
                           dither=Image.Dither.NONE)
    sheet.save(path, optimize=True)
