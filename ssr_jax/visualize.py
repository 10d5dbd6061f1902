"""Pictures for humans: CAM overlays, palette label maps, loss curves.

NumPy + PIL only (no matplotlib), so the embedded default draws its PNGs on
any machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ssr_jax.data import voc


def colourise(labels: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """[H, W] label ids → uint8 [H, W, 3] with the VOC palette (ignore →
    white)."""
    pal = np.asarray(voc.palette(), np.uint8).reshape(-1, 3)
    out = pal[np.clip(labels, 0, len(pal) - 1)]
    out[labels == ignore_index] = 255
    return out


def _jet(x: np.ndarray) -> np.ndarray:
    """[...] in [0, 1] → uint8 [..., 3], a jet-like colour map."""
    x = np.clip(x, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def cam_overlay(image: np.ndarray, cam: np.ndarray,
                alpha: float = 0.5) -> np.ndarray:
    """uint8 [H, W, 3] image + [h, w] CAM in [0, 1] → uint8 [H, W, 3]."""
    h, w = image.shape[:2]
    heat = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8))
    heat = np.asarray(heat.resize((w, h), Image.BILINEAR)) / 255.0
    mixed = (1 - alpha) * image + alpha * _jet(heat)
    return mixed.astype(np.uint8)


def label_overlay(image: np.ndarray, labels: np.ndarray,
                  alpha: float = 0.6) -> np.ndarray:
    """uint8 image + [H, W] labels → palette colours blended on the image."""
    colours = colourise(labels).astype(np.float32)
    fg = (labels > 0)[..., None]
    mixed = np.where(fg, (1 - alpha) * image + alpha * colours, image)
    return mixed.astype(np.uint8)


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tiles equally sized uint8 [H, W, 3] images into one picture."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad,
                   ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = img[:h, :w]
    return out


def _text_width(text: str) -> int:
    return len(text) * 6  # PIL's default bitmap font: 6 px per character


def annotate(picture: np.ndarray, headers: Sequence[str] = (),
             column_width: int = 0, pad: int = 2,
             legend: Sequence[tuple[str, tuple[int, int, int]]] = (),
             ) -> np.ndarray:
    """Adds a header row (one title per column of a `grid` with columns
    `column_width` wide) above `picture` and a colour legend below it.

    Args:
      picture: uint8 [H, W, 3] (a `grid`).
      headers: column titles, drawn centred over each column (cut to fit).
      column_width: the tiles' width in pixels (grid's `w`).
      legend: (name, RGB) swatches, wrapped to the picture's width.
    """
    h, w = picture.shape[:2]
    line = 12
    head = line + 4 if headers else 0
    items = []
    x = y = 0
    for name, colour in legend:
        cell = 14 + _text_width(name) + 10
        if x and x + cell > w:
            x, y = 0, y + line + 2
        items.append((x, y, name, colour))
        x += cell
    foot = (y + line + 6) if legend else 0
    img = Image.new("RGB", (max(w, 1), head + h + foot), "white")
    img.paste(Image.fromarray(picture), (0, head))
    d = ImageDraw.Draw(img)
    for j, title in enumerate(headers):
        step = column_width + pad
        room = max(1, column_width // 6)
        text = title if len(title) <= room else title[:room - 1] + "."
        x0 = pad + j * step + max(0, (column_width - _text_width(text)) // 2)
        d.text((x0, 2), text, fill="black")
    for x, y, name, colour in items:
        top = head + h + 3 + y
        d.rectangle([x + 2, top + 1, x + 12, top + 11], fill=tuple(colour),
                    outline="black")
        d.text((x + 16, top), name, fill="black")
    return np.asarray(img)


def class_legend(labels: Sequence[np.ndarray], names: Sequence[str]
                 ) -> list[tuple[str, tuple[int, int, int]]]:
    """(class name, VOC palette colour) of every class id that occurs in
    `labels` (255 = ignore, drawn white, is left out)."""
    pal = np.asarray(voc.palette(), np.uint8).reshape(-1, 3)
    ids = sorted({int(i) for lab in labels for i in np.unique(lab)
                  if int(i) != 255 and int(i) < len(names)})
    return [(names[i], tuple(int(v) for v in pal[i])) for i in ids]


def curves(series: Mapping[str, Sequence[tuple[float, float]]],
           size: tuple[int, int] = (640, 360), title: str = "",
           ) -> np.ndarray:
    """Line plot of named (x, y) series → uint8 [H, W, 3] (PIL drawing)."""
    w, h = size
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 150, 24, 36
    pts = [p for s in series.values() for p in s
           if np.isfinite(p[0]) and np.isfinite(p[1])]
    if not pts:
        return np.asarray(img)
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    x0, x1 = float(xs.min()), float(xs.max()) or 1.0
    y0, y1 = float(ys.min()), float(ys.max())
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1

    def to_px(x, y):
        px = left + (x - x0) / (x1 - x0) * (w - left - right)
        py = h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
        return px, py

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        _, py = to_px(x0, yv)
        d.line([left - 4, py, left, py], fill="black")
        d.text((4, py - 6), f"{yv:.3g}", fill="black")
    for k in range(5):
        xv = x0 + (x1 - x0) * k / 4
        px, _ = to_px(xv, y0)
        d.line([px, h - bottom, px, h - bottom + 4], fill="black")
        d.text((px - 10, h - bottom + 8), f"{xv:.0f}", fill="black")
    d.text((left, 4), title, fill="black")
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44),
               (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    for i, (name, s) in enumerate(series.items()):
        colour = palette[i % len(palette)]
        line = [to_px(x, y) for x, y in s
                if np.isfinite(x) and np.isfinite(y)]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        d.rectangle([w - right + 10, top + 16 * i + 4,
                     w - right + 22, top + 16 * i + 14], fill=colour)
        d.text((w - right + 26, top + 16 * i + 2), name, fill="black")
    return np.asarray(img)


def save_png(path: str, image: np.ndarray) -> None:
    Image.fromarray(image).save(path)
