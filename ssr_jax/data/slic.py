"""SLIC superpixels with a guaranteed id bound, and the SLIC cache.

SGC (SPEC §1.6) needs superpixel ids in `[0, sgc.max_segments)` with −1 on
padding, as a static-shape int32 map. `skimage.segmentation.slic` returns
roughly, not exactly, `n_segments` segments (connectivity enforcement merges
or splits them), so every id map goes through `bound_segments`: ids are made
consecutive, and while there are more than `max_segments` the smallest
segment is merged into the neighbour it shares the longest border with.

`SlicCache` (`sgc.slic_cache=True`) runs SLIC once per image at its load
resolution and stores the ids as a 16-bit PNG; the input pipeline then
transforms the id map with the image (see `transforms.py`). The cached map
uses superpixels of the same size, in pixels, as per-crop SLIC on a
`crop_size`² crop: `n = slic_segments · H·W / crop_size²` (clipped to
`[1, max_segments]`), so that a crop at rescale ratio 1 sees about as many
superpixels as per-crop mode gives.

SLIC runs in the input pipeline's worker threads; its Cython core releases
the GIL.
"""

from __future__ import annotations

import dataclasses
import heapq
import os

import numpy as np
from PIL import Image

from ssr_jax import io_utils

# A 16-bit PNG stores the cached ids.
MAX_CACHEABLE_SEGMENTS = 65535


@dataclasses.dataclass(frozen=True)
class SlicParams:
    """The SLIC settings the data layer needs, as plain values.

    Built once from the run config (`sgc.slic_segments`,
    `sgc.slic_compactness`, `sgc.max_segments`, `sgc.slic_cache`,
    `data.crop_size`) by `ssr_jax.data_sources.slic_params`; nothing in
    `ssr_jax/data/` reads the method's `config.sgc`.
    """

    segments: int
    compactness: float
    max_segments: int
    crop_size: int
    cache: bool = True  # whole-image SLIC, ids transformed with the image

    def settings(self) -> dict:
        """The record stored superpixels depend on (TFDS metadata, tags)."""
        return {"slic_segments": int(self.segments),
                "slic_compactness": float(self.compactness),
                "max_segments": int(self.max_segments),
                "crop_size": int(self.crop_size),
                "mode": "whole_image"}


def reindex(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Consecutive ids.

    Args:
      ids: int [H, W]; negative values mark padding.

    Returns:
      (new_ids int32 [H, W] with the valid ids mapped to 0..n-1 in
      increasing order of the old id and −1 on padding, n).
    """
    out = np.full(ids.shape, -1, np.int32)
    valid = ids >= 0
    if not valid.any():
        return out, 0
    vals = ids[valid]
    top = int(vals.max())
    if top <= 4 * vals.size:
        # A lookup table: linear time, ~10x faster than np.unique's sort.
        present = np.bincount(vals, minlength=top + 1) > 0
        lut = np.cumsum(present, dtype=np.int64) - 1
        out[valid] = lut[vals].astype(np.int32)
        return out, int(present.sum())
    uniq, inverse = np.unique(vals, return_inverse=True)
    out[valid] = inverse.astype(np.int32)
    return out, int(uniq.size)


def _adjacency(ids: np.ndarray) -> dict[int, dict[int, int]]:
    """Border length (4-neighbour pixel pairs) between touching segments."""
    pairs = []
    for a, b in ((ids[:, :-1], ids[:, 1:]), (ids[:-1, :], ids[1:, :])):
        keep = (a != b) & (a >= 0) & (b >= 0)
        pairs.append(np.stack([a[keep], b[keep]], axis=1))
    p = np.concatenate(pairs).astype(np.int64)
    p = np.concatenate([p, p[:, ::-1]])
    uniq, counts = np.unique(p, axis=0, return_counts=True)
    adj: dict[int, dict[int, int]] = {}
    for (a, b), c in zip(uniq.tolist(), counts.tolist(), strict=True):
        adj.setdefault(a, {})[b] = c
    return adj


def bound_segments(ids: np.ndarray, max_segments: int) -> np.ndarray:
    """Consecutive ids in `[0, max_segments)`, merging the smallest segments.

    While more than `max_segments` segments remain, the smallest one (ties:
    lowest id) is merged into the neighbour with which it shares the
    longest border (ties: lowest id); a segment with no neighbour joins the
    largest segment. Merging small segments first changes the fewest
    pixels' grouping.

    Args:
      ids: int [H, W], any non-negative ids, negative on padding.
      max_segments: the bound, >= 1.

    Returns:
      int32 [H, W]: ids in `[0, max_segments)`, consecutive, −1 on padding.
    """
    if max_segments < 1:
        raise ValueError(f"max_segments={max_segments} must be >= 1")
    ids, n = reindex(ids)
    if n <= max_segments:
        return ids
    size = np.bincount(ids[ids >= 0], minlength=n).astype(np.int64)
    adj = _adjacency(ids)
    root = np.arange(n)
    active = np.ones(n, bool)
    heap = [(int(s), i) for i, s in enumerate(size)]
    heapq.heapify(heap)
    remaining = n
    while remaining > max_segments:
        s_size, s = heapq.heappop(heap)
        if not active[s] or s_size != size[s]:
            continue  # stale heap entry
        nbrs = adj.pop(s, {})
        if nbrs:
            t = min(nbrs, key=lambda u: (-nbrs[u], u))
        else:
            cand = np.where(active)[0]
            cand = cand[cand != s]
            t = int(cand[np.argmax(size[cand])])
        for u, border in nbrs.items():
            adj[u].pop(s, None)
            if u != t:
                adj.setdefault(t, {})[u] = adj.get(t, {}).get(u, 0) + border
                adj[u][t] = adj[u].get(t, 0) + border
        root[s] = t
        size[t] += size[s]
        active[s] = False
        remaining -= 1
        heapq.heappush(heap, (int(size[t]), t))
    # Follow merge chains to their surviving segment.
    for i in range(n):
        r = i
        while root[r] != r:
            r = root[r]
        root[i] = r
    merged = np.where(ids >= 0, root[np.maximum(ids, 0)], -1)
    return reindex(merged)[0]


def slic_ids(image: np.ndarray, n_segments: int, compactness: float,
             max_segments: int) -> np.ndarray:
    """SLIC superpixels of an RGB image (Lab colour space), id-bounded.

    Args:
      image: uint8 [H, W, 3].
      n_segments, compactness: `skimage.segmentation.slic` arguments.
      max_segments: bound on the number of ids.

    Returns:
      int32 [H, W]: consecutive ids in `[0, max_segments)`.
    """
    from skimage.segmentation import slic

    if image.shape[0] == 0 or image.shape[1] == 0:
        return np.zeros(image.shape[:2], np.int32)
    seg = slic(image, n_segments=max(1, int(n_segments)),
               compactness=float(compactness), start_label=0)
    return bound_segments(seg, max_segments)


def cached_n_segments(height: int, width: int, n_segments: int,
                      crop_size: int, max_segments: int) -> int:
    """SLIC `n_segments` for a whole image in cache mode (module docstring)."""
    n = round(n_segments * height * width / float(crop_size * crop_size))
    return int(min(max(n, 1), max_segments))


class SlicCache:
    """SLIC id maps computed once per image and stored as 16-bit PNGs.

    Files live in `<directory>/slic_n{n}_c{c}_crop{crop}_max{max}/<name>.png`
    (the SLIC parameters are part of the path, so changing one starts a new
    cache). A file whose shape no longer matches its image, or that cannot
    be read, is recomputed. Writes are atomic (temporary file + rename), so
    concurrent workers and processes can share one cache.
    """

    def __init__(self, directory: str, n_segments: int, compactness: float,
                 crop_size: int, max_segments: int):
        if max_segments > MAX_CACHEABLE_SEGMENTS:
            raise ValueError(
                f"sgc.max_segments={max_segments} is too large for the SLIC "
                f"cache (16-bit PNG, at most {MAX_CACHEABLE_SEGMENTS}); set "
                "sgc.slic_cache=False or lower sgc.max_segments")
        self.n_segments = n_segments
        self.compactness = compactness
        self.crop_size = crop_size
        self.max_segments = max_segments
        tag = (f"slic_n{n_segments}_c{compactness:g}_crop{crop_size}"
               f"_max{max_segments}")
        self.directory = os.path.join(directory, tag)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name + ".png")

    def _read(self, path: str, shape: tuple[int, int]) -> np.ndarray | None:
        try:
            with Image.open(path) as f:
                ids = np.array(f).astype(np.int32)
        except (OSError, ValueError):
            return None
        if ids.shape != shape or ids.max(initial=0) >= self.max_segments:
            return None
        return ids

    def get(self, name: str, image: np.ndarray) -> np.ndarray:
        """Ids for `image` (uint8 [H, W, 3]) named `name`: int32 [H, W]."""
        path = self.path(name)
        shape = image.shape[:2]
        if os.path.exists(path):
            ids = self._read(path, shape)
            if ids is not None:
                return ids
        n = cached_n_segments(shape[0], shape[1], self.n_segments,
                              self.crop_size, self.max_segments)
        ids = slic_ids(image, n, self.compactness, self.max_segments)
        self._write(path, ids)
        return ids

    def _write(self, path: str, ids: np.ndarray) -> None:
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        with io_utils.atomic_write(path, suffix=".tmp.png") as f:
            Image.fromarray(ids.astype(np.uint16)).save(f, format="PNG")
