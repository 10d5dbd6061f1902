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


def resize_nearest(arr: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label/id map [H, W].

    Output pixel i samples input pixel floor((i + 0.5)·H_in / H_out), the
    pixel whose area contains the output pixel's centre.
    """
    h, w = arr.shape[:2]
    oh, ow = out_hw
    rows = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    return arr[rows[:, None], cols[None, :]]


def _crop_pad(arr: np.ndarray, p: AugParams, fill) -> np.ndarray:
    out = np.full((p.crop_size, p.crop_size) + arr.shape[2:], fill, arr.dtype)
    out[p.dst_y:p.dst_y + p.len_y, p.dst_x:p.dst_x + p.len_x] = arr[
        p.src_y:p.src_y + p.len_y, p.src_x:p.src_x + p.len_x]
    return out


def augment_image(image: np.ndarray, p: AugParams) -> np.ndarray:
    """uint8 [H, W, 3] → uint8 [crop, crop, 3], zero padded."""
    x = resize_bilinear(image, p.scaled_hw)
    if p.flip:
        x = x[:, ::-1]
    return _crop_pad(x, p, 0)


def augment_ids(ids: np.ndarray, p: AugParams) -> np.ndarray:
    """Superpixel ids int [H, W] → int32 [crop, crop], −1 padded.

    Nearest rescale, flip, crop; the surviving ids are then renumbered
    0..n-1, so the bound of the input map still holds.
    """
    x = resize_nearest(ids, p.scaled_hw)
    if p.flip:
        x = x[:, ::-1]
    return reindex(_crop_pad(x.astype(np.int32), p, -1))[0]


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
