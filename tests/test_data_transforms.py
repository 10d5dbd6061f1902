"""data/transforms.py and data/slic.py against slow, obvious references."""

import dataclasses
import os

import numpy as np
import pytest
from PIL import Image

from ssr_jax.data import slic, transforms


def _with_flip(p, flip):
    return dataclasses.replace(p, flip=flip)


def _reference_crop(arr, p, fill):
    """Per-pixel loop: crop pixel (y, x) ← (flipped) scaled pixel or fill."""
    sh, sw = arr.shape[:2]
    out = np.full((p.crop_size, p.crop_size) + arr.shape[2:], fill, arr.dtype)
    for y in range(p.crop_size):
        for x in range(p.crop_size):
            sy = y - p.dst_y + p.src_y
            sx = x - p.dst_x + p.src_x
            if (p.dst_y <= y < p.dst_y + p.len_y
                    and p.dst_x <= x < p.dst_x + p.len_x):
                assert 0 <= sy < sh and 0 <= sx < sw
                out[y, x] = arr[sy, sw - 1 - sx if p.flip else sx]
    return out


@pytest.mark.parametrize("hw,ratio", [((40, 56), 0.5), ((40, 56), 1.7),
                                      ((64, 48), 1.0), ((64, 48), 2.0),
                                      ((13, 90), 1.3)])
@pytest.mark.parametrize("flip", [False, True])
def test_augment_image_matches_reference(hw, ratio, flip):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, hw + (3,), np.uint8)
    p = _with_flip(transforms.sample_augment(rng, hw, 64, (ratio, ratio),
                                             False), flip)
    assert p.scaled_hw == (int(ratio * hw[0]), int(ratio * hw[1]))
    scaled = np.asarray(Image.fromarray(image).resize(
        p.scaled_hw[::-1], Image.BILINEAR))
    got = transforms.augment_image(image, p)
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    # Windowed resampling vs rescale-everything-then-crop: PIL rounding.
    diff = np.abs(got.astype(int) - _reference_crop(scaled, p, 0))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.1
    ids = rng.integers(0, 1000, hw)
    raw = _reference_crop(
        transforms.resize_nearest(ids, p.scaled_hw).astype(np.int32), p, -1)
    np.testing.assert_array_equal(transforms.augment_ids(ids, p),
                                  slic.reindex(raw)[0])
    valid = transforms.valid_mask(p)
    np.testing.assert_array_equal(
        valid, _reference_crop(np.ones(p.scaled_hw, bool), p, False))
    # Padding is zero, and present exactly where the image is smaller.
    assert not got[~valid].any()
    assert valid.all() == (min(p.scaled_hw) >= 64)


def test_sample_augment_ranges_and_padding_offsets():
    rng = np.random.default_rng(0)
    flips, ratios = [], []
    for _ in range(400):
        p = transforms.sample_augment(rng, (40, 56), 32, (0.5, 2.0), True)
        ratios.append(p.ratio)
        flips.append(p.flip)
        for n, src, dst, ln in ((p.scaled_hw[0], p.src_y, p.dst_y, p.len_y),
                                (p.scaled_hw[1], p.src_x, p.dst_x, p.len_x)):
            assert ln == min(n, 32)
            assert 0 <= src <= max(0, n - 32)
            assert 0 <= dst <= max(0, 32 - n)
            assert src == 0 or dst == 0
    assert 0.5 <= min(ratios) and max(ratios) <= 2.0
    assert 0.4 < np.mean(flips) < 0.6
    never = transforms.sample_augment(rng, (40, 56), 32, (1, 1), False)
    assert not never.flip


def test_resize_nearest_matches_pil():
    rng = np.random.default_rng(0)
    for h, w, oh, ow in [(7, 9, 13, 5), (40, 56, 20, 28), (5, 3, 2, 7)]:
        a = rng.integers(0, 1000, (h, w)).astype(np.int32)
        want = np.array(Image.fromarray(a, mode="I").resize((ow, oh),
                                                            Image.NEAREST))
        np.testing.assert_array_equal(transforms.resize_nearest(a, (oh, ow)),
                                      want)


def test_ids_follow_the_image():
    """Ids and image get the same geometry: colour-coded blocks stay aligned.

    The image paints each id's block in its own colour; after augmentation
    a pixel's colour must be the colour of its id (except on bilinear
    borders between blocks).
    """
    rng = np.random.default_rng(3)
    hw = (48, 60)
    ids = (np.arange(hw[0])[:, None] // 12) * 5 + np.arange(hw[1]) // 12
    colours = rng.integers(0, 256, (ids.max() + 1, 3), np.uint8)
    image = colours[ids]
    for seed in range(6):
        p = transforms.sample_augment(np.random.default_rng(seed), hw, 40,
                                      (0.6, 1.8), True)
        crop = transforms.augment_image(image, p)
        valid = transforms.valid_mask(p)
        # Un-renumbered ids: same transform without the final reindex.
        raw = transforms.resize_nearest(ids, p.scaled_hw)
        raw = _reference_crop(raw.astype(np.int32), p, -1)
        np.testing.assert_array_equal(raw >= 0, valid)
        match = (crop == colours[np.maximum(raw, 0)]).all(-1)
        assert match[valid].mean() > 0.75, (seed, p)  # misaligned: < 0.4
        new = transforms.augment_ids(ids, p)
        # Renumbering is a bijection of the ids present, order preserving.
        np.testing.assert_array_equal(new < 0, ~valid)
        old_present = np.unique(raw[valid])
        np.testing.assert_array_equal(
            new[valid], np.searchsorted(old_present, raw[valid]))


def test_flip_consistency_whole_image_in_crop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), np.uint8)
    ids = rng.integers(0, 7, (20, 30))
    p = transforms.sample_augment(rng, (20, 30), 64, (1.0, 1.0), False)
    q = _with_flip(p, True)
    rows, cols = transforms.crop_box(p)
    a, b = transforms.augment_image(image, p), transforms.augment_image(
        image, q)
    np.testing.assert_array_equal(a[rows, cols][:, ::-1], b[rows, cols])
    np.testing.assert_array_equal(transforms.valid_mask(p),
                                  transforms.valid_mask(q))
    ia, ib = transforms.augment_ids(ids, p), transforms.augment_ids(ids, q)
    np.testing.assert_array_equal(ia[rows, cols][:, ::-1], ib[rows, cols])


def test_long_side_and_pad():
    assert transforms.long_side_hw((40, 56), 32) == (23, 32)
    assert transforms.long_side_hw((64, 48), 32) == (32, 24)
    assert transforms.long_side_hw((1, 500), 32) == (1, 32)
    x = np.ones((3, 2), np.int32)
    out = transforms.pad_to(x, 4, -1)
    assert out.shape == (4, 4) and out[:3, :2].all() and (out[3] == -1).all()


# --- SLIC and the id bound ---------------------------------------------------


def _reference_bound(ids, max_segments):
    """Slow merge: smallest segment into its longest-border neighbour."""
    ids = ids.copy()
    while True:
        present = sorted(set(ids[ids >= 0].tolist()))
        if len(present) <= max_segments:
            break
        sizes = {i: int((ids == i).sum()) for i in present}
        s = min(present, key=lambda i: (sizes[i], i))
        border = {}
        h, w = ids.shape
        for y in range(h):
            for x in range(w):
                for dy, dx in ((0, 1), (1, 0)):
                    yy, xx = y + dy, x + dx
                    if yy >= h or xx >= w:
                        continue
                    a, b = ids[y, x], ids[yy, xx]
                    if a == s and b >= 0 and b != s:
                        border[b] = border.get(b, 0) + 1
                    elif b == s and a >= 0 and a != s:
                        border[a] = border.get(a, 0) + 1
        if border:
            t = min(border, key=lambda u: (-border[u], u))
        else:
            t = max((i for i in present if i != s),
                    key=lambda i: (sizes[i], -i))
        ids[ids == s] = t
    uniq = sorted(set(ids[ids >= 0].tolist()))
    lut = {u: k for k, u in enumerate(uniq)}
    return np.vectorize(lambda v: lut.get(v, -1))(ids).astype(np.int32)


@pytest.mark.parametrize("max_segments", [1, 3, 7, 30])
def test_bound_segments_matches_reference(max_segments):
    rng = np.random.default_rng(max_segments)
    # Blocky random ids with repeats, gaps and padding.
    ids = np.kron(rng.integers(0, 40, (5, 6)) * 3, np.ones((3, 2), int))
    ids[:2, :3] = -1
    got = slic.bound_segments(ids, max_segments)
    np.testing.assert_array_equal(got, _reference_bound(ids, max_segments))
    n = got.max() + 1
    assert n <= max_segments
    np.testing.assert_array_equal(np.unique(got[got >= 0]), np.arange(n))
    np.testing.assert_array_equal(got < 0, ids < 0)


def test_bound_segments_isolated_segment_joins_largest():
    ids = np.array([[0, 0, -1, 1], [0, 0, -1, -1], [2, 2, -1, -1]])
    got = slic.bound_segments(ids, 2)
    # Segment 1 (size 1) touches nothing: it joins the largest, segment 0.
    np.testing.assert_array_equal(got, [[0, 0, -1, 0], [0, 0, -1, -1],
                                        [1, 1, -1, -1]])


def _textured(rng, hw):
    h, w = hw
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([128 + 100 * np.sin(xx / 4.0), 128 + 100 * np.cos(yy / 3.0),
                    (xx * yy) % 256], -1) + rng.normal(0, 10, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("n,max_segments", [(16, 64), (40, 8), (200, 50)])
def test_slic_ids_bounded_and_consecutive(n, max_segments):
    image = _textured(np.random.default_rng(0), (48, 64))
    ids = slic.slic_ids(image, n, 10.0, max_segments)
    assert ids.dtype == np.int32 and ids.shape == (48, 64)
    k = ids.max() + 1
    assert ids.min() == 0 and k <= max_segments
    np.testing.assert_array_equal(np.unique(ids), np.arange(k))


def test_slic_ids_tiny_images():
    image = _textured(np.random.default_rng(0), (1, 1))
    assert slic.slic_ids(image, 16, 10.0, 4).tolist() == [[0]]
    assert slic.slic_ids(np.zeros((0, 5, 3), np.uint8), 16, 10.0, 4).shape \
        == (0, 5)


def test_cached_n_segments():
    # Superpixels as large as per-crop SLIC's: 100 per 320^2 crop.
    assert slic.cached_n_segments(375, 500, 100, 320, 256) == 183
    assert slic.cached_n_segments(480, 640, 100, 320, 256) == 256  # clipped
    assert slic.cached_n_segments(4, 4, 100, 320, 256) == 1


def test_slic_cache_roundtrip_and_repair(tmp_path):
    image = _textured(np.random.default_rng(1), (40, 56))
    cache = slic.SlicCache(str(tmp_path), 16, 10.0, 64, 64)
    a = cache.get("sub/x", image)
    path = cache.path("sub/x")
    assert os.path.isfile(path)
    assert "slic_n16_c10_crop64_max64" in path
    with Image.open(path) as im:
        assert im.mode == "I;16"
    mtime = os.stat(path).st_mtime_ns
    np.testing.assert_array_equal(cache.get("sub/x", image), a)
    assert os.stat(path).st_mtime_ns == mtime  # read, not recomputed
    want_n = slic.cached_n_segments(40, 56, 16, 64, 64)
    np.testing.assert_array_equal(a, slic.slic_ids(image, want_n, 10.0, 64))
    # A corrupt file, or one for another image size, is recomputed.
    with open(path, "wb") as f:
        f.write(b"not a png")
    np.testing.assert_array_equal(cache.get("sub/x", image), a)
    bigger = _textured(np.random.default_rng(1), (44, 56))
    assert cache.get("sub/x", bigger).shape == (44, 56)
    assert [f for f in os.listdir(os.path.dirname(path))
            if f.endswith(".tmp.png")] == []
    with pytest.raises(ValueError, match="too large"):
        slic.SlicCache(str(tmp_path), 16, 10.0, 64, 70000)


@pytest.mark.parametrize("high", [50, 10**9])  # lookup table / sort paths
def test_reindex_matches_unique(high):
    rng = np.random.default_rng(high % 97)
    ids = rng.integers(-2, high, (30, 40))
    got, n = slic.reindex(ids)
    valid = ids >= 0
    uniq, inverse = np.unique(ids[valid], return_inverse=True)
    assert n == uniq.size and got.dtype == np.int32
    np.testing.assert_array_equal(got[valid], inverse)
    assert (got[~valid] == -1).all()
    assert slic.reindex(np.full((2, 3), -1))[1] == 0
