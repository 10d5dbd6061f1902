"""WeCLIP training augmentation and the matching id-map transforms.

Training (SPEC §1.11, WeCLIP `datasets/transforms.py`): rescale by a ratio
r ~ U(0.5, 2.0) to `(int(r·H), int(r·W))` with PIL bilinear, horizontal flip
with p = 0.5, then a `crop_size`² crop. Per axis, an image longer than the
crop is cropped at a uniform offset; a shorter one is placed at a uniform
offset inside a zero canvas (WeCLIP pads the image to the crop size at a
random offset). WeCLIP also picks the crop box by the GT mask when one is
passed; its classification branch passes none, and neither do we (training
never reads masks).

The random draws are separated from their application (`sample_augment`
→ `AugParams`), so that the image, its superpixel ids and its validity mask
get exactly the same geometry.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from ssr_jax.data.slic import reindex


@dataclasses.dataclass(frozen=True)
class AugParams:
    """One draw of the training augmentation for an image.

    `scaled_hw` is the image size after rescaling. Rows `src_y:src_y+len_y`
    of the (flipped) rescaled image land on crop rows `dst_y:dst_y+len_y`;
    likewise for columns.
    """

    ratio: float
    flip: bool
    scaled_hw: tuple[int, int]
    crop_size: int
    src_y: int
    src_x: int
    dst_y: int
    dst_x: int
    len_y: int
    len_x: int


def _axis(rng: np.random.Generator, n: int, crop: int):
    if n < crop:
        return 0, int(rng.integers(0, crop - n + 1)), n
    return int(rng.integers(0, n - crop + 1)), 0, crop


def sample_augment(rng: np.random.Generator, hw: tuple[int, int],
                   crop_size: int, rescale_range: tuple[float, float],
                   hflip: bool) -> AugParams:
    """Draws rescale ratio, flip and crop offsets for an image of size `hw`."""
    lo, hi = rescale_range
    ratio = float(rng.uniform(lo, hi))
    h = max(1, int(ratio * hw[0]))
    w = max(1, int(ratio * hw[1]))
    flip = bool(hflip) and bool(rng.random() < 0.5)
    src_y, dst_y, len_y = _axis(rng, h, crop_size)
    src_x, dst_x, len_x = _axis(rng, w, crop_size)
    return AugParams(ratio, flip, (h, w), crop_size, src_y, src_x, dst_y,
                     dst_x, len_y, len_x)


def resize_bilinear(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """PIL bilinear resize (as WeCLIP) of uint8 [H, W, 3] to `out_hw`."""
    if image.shape[:2] == tuple(out_hw):
        return image
    pil = Image.fromarray(image).resize((out_hw[1], out_hw[0]),
                                        resample=Image.BILINEAR)
    return np.asarray(pil)


def _nearest_index(n_in: int, n_out: int, start: int,
                   length: int) -> np.ndarray:
    """Input index of output pixels start..start+length-1 (nearest)."""
    i = np.arange(start, start + length)
    return np.minimum(((i + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def resize_nearest(arr: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label/id map [H, W] (as PIL NEAREST).

    Output pixel i samples input pixel floor((i + 0.5)·H_in / H_out), the
    pixel whose area contains the output pixel's centre.
    """
    rows = _nearest_index(arr.shape[0], out_hw[0], 0, out_hw[0])
    cols = _nearest_index(arr.shape[1], out_hw[1], 0, out_hw[1])
    return arr[rows[:, None], cols[None, :]]


def _window(p: AugParams) -> tuple[int, int]:
    """Top-left of the crop window in the rescaled, un-flipped image."""
    x0 = p.scaled_hw[1] - p.src_x - p.len_x if p.flip else p.src_x
    return p.src_y, x0


def _place(part: np.ndarray, p: AugParams, fill) -> np.ndarray:
    if p.flip:
        part = part[:, ::-1]
    out = np.full((p.crop_size, p.crop_size) + part.shape[2:], fill,
                  part.dtype)
    out[p.dst_y:p.dst_y + p.len_y, p.dst_x:p.dst_x + p.len_x] = part
    return out


def augment_image(image: np.ndarray, p: AugParams) -> np.ndarray:
    """uint8 [H, W, 3] → uint8 [crop, crop, 3], zero padded.

    Equal to a PIL bilinear rescale of the whole image, flip and crop, but
    only the crop window is resampled (PIL `box`): the same sampling
    positions and filter support, up to fixed-point rounding inside PIL
    (values may differ by 1-2 grey levels, on a few % of them), at a
    fraction of the cost when the image is scaled up.
    """
    h, w = image.shape[:2]
    y0, x0 = _window(p)
    fy, fx = h / p.scaled_hw[0], w / p.scaled_hw[1]
    box = (x0 * fx, y0 * fy, (x0 + p.len_x) * fx, (y0 + p.len_y) * fy)
    part = np.asarray(Image.fromarray(image).resize(
        (p.len_x, p.len_y), resample=Image.BILINEAR, box=box))
    return _place(part, p, 0)


def augment_ids(ids: np.ndarray, p: AugParams) -> np.ndarray:
    """Superpixel ids int [H, W] → int32 [crop, crop], −1 padded.

    Nearest rescale, flip, crop (exactly; only the window is sampled); the
    surviving ids are then renumbered 0..n-1, so the bound of the input
    map still holds.
    """
    y0, x0 = _window(p)
    rows = _nearest_index(ids.shape[0], p.scaled_hw[0], y0, p.len_y)
    cols = _nearest_index(ids.shape[1], p.scaled_hw[1], x0, p.len_x)
    part = ids[rows[:, None], cols[None, :]].astype(np.int32)
    return reindex(_place(part, p, -1))[0]


def valid_mask(p: AugParams) -> np.ndarray:
    """bool [crop, crop]: True where the crop holds image pixels."""
    out = np.zeros((p.crop_size, p.crop_size), bool)
    out[p.dst_y:p.dst_y + p.len_y, p.dst_x:p.dst_x + p.len_x] = True
    return out


def crop_box(p: AugParams) -> tuple[slice, slice]:
    """The (rows, cols) of the crop that hold image pixels."""
    return (slice(p.dst_y, p.dst_y + p.len_y),
            slice(p.dst_x, p.dst_x + p.len_x))


def long_side_hw(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """Size after resizing so that the long side equals `size`."""
    h, w = hw
    scale = size / float(max(h, w))
    return (min(size, max(1, round(h * scale))),
            min(size, max(1, round(w * scale))))


def pad_to(arr: np.ndarray, size: int, fill) -> np.ndarray:
    """Places `arr` [h, w, ...] at the top-left of a size² canvas of `fill`."""
    out = np.full((size, size) + arr.shape[2:], fill, arr.dtype)
    out[:arr.shape[0], :arr.shape[1]] = arr
    return out
