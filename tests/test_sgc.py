"""sgc.py and sgc_mask.py against slow, obvious references (NumPy/Python
loops, scipy, skimage, torch interpolation) on tiny inputs: 2 images, 3
class slots (one padded), a 4x4 patch grid, 64x64 pixels, ~10 Voronoi
superpixels.

Tolerances: float results 1e-5 relative/absolute (float32 vs float64
references) unless stated; masks and labels exactly.
"""

import functools
import math

import jax
import jax.numpy as jnp
import jaxpr_utils
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.color import rgb2lab

from ssr_jax import sgc, sgc_mask

B, K, GH, GW, H, W = 2, 3, 4, 4, 64, 64
S = 12  # static superpixel slots; 10 used, 2 always empty
IMPLS = ("segment", "onehot")


def _scene(seed=0):
    """Image, superpixels, valid (crop padding on image 1), slot_valid."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    sp = np.zeros((B, H, W), np.int32)
    img = np.zeros((B, H, W, 3), np.uint8)
    palette = np.array([[200, 30, 30], [30, 180, 40], [40, 40, 210],
                        [230, 230, 60], [20, 20, 20]])
    for b in range(B):
        seeds = rng.uniform(0, H, size=(10, 2))
        d = ((yy[..., None] - seeds[:, 0]) ** 2
             + (xx[..., None] - seeds[:, 1]) ** 2)
        sp[b] = d.argmin(-1)
        base = palette[rng.integers(0, len(palette), 10)][sp[b]]
        noise = rng.integers(-12, 13, size=(H, W, 3))
        img[b] = np.clip(base + noise, 0, 255)
    valid = np.ones((B, H, W), bool)
    valid[1, :, 40:] = False  # crop padding: patch column 2 half valid
    sp[1][~valid[1]] = -1
    img[1][~valid[1]] = 0
    slot_valid = np.array([[True, True, False], [True, False, False]])
    return img, sp, valid, slot_valid


def _cams(seed=0, smooth=True):
    rng = np.random.default_rng(seed)
    c = rng.random((B, K, GH, GW))
    if smooth:
        c = ndimage.gaussian_filter(c, (0, 0, 0.7, 0.7))
    c = c - c.min((2, 3), keepdims=True)
    c = c / c.max((2, 3), keepdims=True)
    slot_valid = _scene()[3]
    return np.where(slot_valid[:, :, None, None], c, 0).astype(np.float32)


def _upsample(cams, size):
    """torch bilinear, align_corners=False (cv2.resize semantics)."""
    t = torch.from_numpy(np.asarray(cams, np.float32))
    return F.interpolate(t, size=size, mode="bilinear",
                         align_corners=False).numpy()


# --- colours -----------------------------------------------------------------


def test_rgb_to_lab_matches_skimage():
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 256, size=(4096, 3))
    edges = np.array([[0, 0, 0], [255, 255, 255], [10, 11, 12], [1, 2, 3],
                      [255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 10, 11]])
    rgb = np.concatenate([rand, edges]).astype(np.uint8)[:, None, :]
    got = np.asarray(sgc_mask.rgb_to_lab(jnp.asarray(rgb)))
    np.testing.assert_allclose(got, rgb2lab(rgb), atol=1e-3, rtol=0)


@pytest.mark.parametrize("impl,space", [("segment", "lab"), ("onehot", "rgb")])
def test_superpixel_colours_vs_loop(impl, space):
    img, sp, valid, _ = _scene()
    valid = valid.copy()
    valid[0, :3] = False  # valid also drops pixels whose id is not -1
    fn = jax.jit(sgc_mask.superpixel_colours, static_argnums=(2, 3, 4))
    mean, count = fn(jnp.asarray(img), jnp.asarray(sp), S, space, impl,
                     jnp.asarray(valid))
    colours = rgb2lab(img) if space == "lab" else img.astype(np.float64)
    for b in range(B):
        for s in range(S):
            sel = (sp[b] == s) & valid[b]
            assert count[b, s] == sel.sum()
            want = colours[b][sel].mean(0) if sel.any() else np.zeros(3)
            np.testing.assert_allclose(mean[b, s], want, atol=2e-3,
                                       rtol=1e-5)
    assert (np.asarray(count)[:, 10:] == 0).all()


def _kmeans_ref(colours, seg_valid, k, iters):
    """Plain NumPy Lloyd with the agreed deterministic init."""
    colours = np.asarray(colours, np.float32)
    out = np.full(seg_valid.shape, -1, np.int64)
    for b in range(colours.shape[0]):
        pts = [s for s in range(colours.shape[1]) if seg_valid[b, s]]
        n = len(pts)
        if n == 0:
            continue
        order = sorted(pts, key=lambda s, b=b: (colours[b, s, 0], s))
        cent = np.stack([colours[b, order[math.floor((i + 0.5) * n / k)]]
                         for i in range(k)])

        def assign(cent, b=b, pts=pts):
            lab = {}
            for s in pts:
                d = ((colours[b, s] - cent) ** 2).sum(1)
                lab[s] = int(np.argmin(d))  # first minimum
            return lab

        for _ in range(iters):
            lab = assign(cent)
            for c in range(k):
                members = [s for s in pts if lab[s] == c]
                if members:
                    cent[c] = colours[b, members].mean(0)
        for s, c in assign(cent).items():
            out[b, s] = c
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_colour_kmeans_vs_numpy(impl):
    rng = np.random.default_rng(1)
    colours = rng.normal(size=(3, 20, 3)).astype(np.float32) * 20
    seg_valid = rng.random((3, 20)) > 0.2
    seg_valid[2] = False
    seg_valid[2, [3, 7]] = True  # n = 2 < k: coinciding centres
    colours[1, 5, 0] = colours[1, 9, 0]  # an L tie for the stable sort
    configs = [(4, 0), (4, 5), (3, 10)] if impl == "segment" else [(4, 5)]
    for k, iters in configs:
        got = jax.jit(sgc_mask.colour_kmeans, static_argnums=(2, 3, 4))(
            jnp.asarray(colours), jnp.asarray(seg_valid), k, iters, impl)
        np.testing.assert_array_equal(
            np.asarray(got), _kmeans_ref(colours, seg_valid, k, iters))


def test_colour_kmeans_recovers_blobs():
    rng = np.random.default_rng(2)
    centres = np.array([[20, 0, 0], [50, 40, -30], [80, -40, 40]], np.float32)
    truth = rng.permutation(np.repeat(np.arange(3), 10))
    colours = centres[truth] + rng.normal(size=(30, 3)).astype(np.float32)
    got = np.asarray(jax.jit(sgc_mask.colour_kmeans, static_argnums=(2, 3))(
        jnp.asarray(colours[None]), jnp.ones((1, 30), bool), 3, 10))[0]
    # Same partition as the truth (cluster ids may be permuted).
    assert len(set(zip(truth.tolist(), got.tolist(), strict=True))) == 3
    assert len(set(got.tolist())) == 3


# --- ratios and the SGC mask --------------------------------------------------


@pytest.mark.parametrize("impl,denominator", [("segment", "cluster"),
                                              ("onehot", "cluster"),
                                              ("segment", "image")])
def test_target_ratio_vs_pixel_loop(impl, denominator):
    rng = np.random.default_rng(3)
    cams = rng.random((2, 2, 8, 8)).astype(np.float32)
    cams[1, 1] = 0.0  # zero denominators
    cams[0, :, :3] = 0.5  # exactly theta: not high confidence (strict >)
    cluster = rng.integers(-1, 3, size=(2, 8, 8)).astype(np.int32)  # 3 unused
    k, theta = 4, 0.5
    fn = jax.jit(sgc_mask.target_ratio, static_argnums=(2, 3, 4, 5))
    got = np.asarray(fn(jnp.asarray(cams), jnp.asarray(cluster), k, theta,
                        impl, denominator))
    want = np.zeros((2, 2, k))
    for b in range(2):
        for c in range(2):
            num, den = np.zeros(k), np.zeros(k)
            for y in range(8):
                for x in range(8):
                    q = cluster[b, y, x]
                    if q < 0:
                        continue
                    v = float(cams[b, c, y, x])
                    den[q] += v
                    num[q] += v if v > theta else 0.0
            if denominator == "image":  # every pixel with a cluster
                den = np.full(k, den.sum())
            for q in range(k):
                want[b, c, q] = num[q] / den[q] if den[q] > 0 else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ratio_denominator"):
        sgc_mask.target_ratio(jnp.asarray(cams), jnp.asarray(cluster), k,
                              theta, impl, "whole")


def _mask_ref(cams, img, sp, valid, slot_valid, *, k, iters, theta_h,
              theta_r, frac, denominator="cluster", unit="cluster",
              box=None):
    """SGC mask by loops over images, classes, clusters and patches.

    The readings (`sgc_mask.cluster_target_mask`): `denominator` "image"
    divides by the class's activation over every pixel with a unit;
    `unit` "superpixel" tests each superpixel instead of each cluster,
    "cluster_seeded" keeps of a passing cluster only the superpixels with
    a pixel above theta_h; `box` (a threshold) ANDs the patch mask with
    `_box_ref` before the fallback."""
    sh, sw = H // GH, W // GW
    out = np.zeros(cams.shape)
    cams_pix = _upsample(cams, (H, W))
    for b in range(B):
        lab = rgb2lab(img[b])
        ids = np.where(valid[b], sp[b], -1)
        colours = np.zeros((S, 3), np.float32)
        nonempty = np.zeros(S, bool)
        for s in range(S):
            sel = ids == s
            if sel.any():
                colours[s] = lab[sel].mean(0)
                nonempty[s] = True
        seg_cluster = _kmeans_ref(colours[None], nonempty[None], k, iters)[0]
        pc = np.where(ids >= 0, seg_cluster[np.maximum(ids, 0)], -1)
        for c in range(K):
            if not slot_valid[b, c]:
                continue
            cam = cams_pix[b, c]
            units, n = (ids, S) if unit == "superpixel" else (pc, k)
            total = cam[units >= 0].sum()
            targets = []
            for q in range(n):
                v = cam[units == q]
                den = total if denominator == "image" else v.sum()
                r = v[v > theta_h].sum() / den if den > 0 else 0.0
                if r > theta_r:
                    targets.append(q)
            pix = np.isin(units, targets)
            if unit == "cluster_seeded":
                for q in range(S):
                    if not (cam[ids == q] > theta_h).any():
                        pix[ids == q] = False
            for i in range(GH):
                for j in range(GW):
                    blk = (slice(i * sh, (i + 1) * sh),
                           slice(j * sw, (j + 1) * sw))
                    nv = valid[b][blk].sum()
                    out[b, c, i, j] = nv > 0 and pix[blk].sum() >= frac * nv
            if box is not None:
                out[b, c] *= _box_ref(cams[b, c], box)
            if not out[b, c].any():
                out[b, c] = 1.0
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_superpixel_target_mask_vs_loops(impl):
    img, sp, valid, slot_valid = _scene()
    cams = np.zeros((B, K, GH, GW), np.float32)
    cams[0, 0, :2, :2] = 1.0  # a clear target zone
    cams[0, 0, 2:, 2:] = 0.3
    cams[0, 1] = 0.3  # below theta_h everywhere: r = 0 -> fallback ones
    cams[0, 1, 0, 0] = 0.35
    cams[1, 0] = _cams(5)[1, 0]
    cams[:, 2] = 0.0
    kw = dict(colour_k=4, colour_iters=5, colour_space="lab", theta_h=0.4,
              theta_r=0.5, patch_fraction=0.5, num_segments=S, impl=impl)
    fn = jax.jit(lambda *a: sgc_mask.superpixel_target_mask(*a, **kw))
    got = np.asarray(fn(*map(jnp.asarray, (cams, img, sp, valid,
                                            slot_valid))))
    want = _mask_ref(cams, img, sp, valid, slot_valid, k=4, iters=5,
                     theta_h=0.4, theta_r=0.5, frac=0.5)
    np.testing.assert_array_equal(got, want)
    assert got[0, 0].sum() not in (0, GH * GW)  # a real, partial mask
    assert (got[0, 1] == 1).all()  # fallback
    assert (got[:, 2] == 0).all() and (got[1, 1] == 0).all()  # padded slots
    # Patches of image 1 that are pure crop padding are never target
    # (unless the fallback fired for that class).
    if not (got[1, 0] == 1).all():
        assert (got[1, 0][:, 3] == 0).all()


# (ratio_denominator, zone_unit, intersect_box, theta_r, impl)
READINGS = [("image", "cluster", False, 0.1, "segment"),
            ("cluster", "superpixel", False, 0.5, "onehot"),
            ("cluster", "cluster_seeded", False, 0.5, "segment"),
            ("cluster", "cluster", True, 0.5, "segment"),
            ("image", "cluster_seeded", True, 0.05, "onehot")]


@pytest.mark.parametrize("denominator,unit,ibox,theta_r,impl", READINGS)
def test_target_mask_readings_vs_loops(denominator, unit, ibox, theta_r,
                                       impl):
    """Each [choice] reading of Eq. 7 against the loop reference, on random
    smooth CAMs; the reading must give another mask than the default
    reading at the same thresholds (so the option is not ignored)."""
    img, sp, valid, slot_valid = _scene(1)
    cams = _cams(6)
    kw = dict(colour_k=4, colour_iters=5, theta_h=0.4, theta_r=theta_r,
              patch_fraction=0.5, num_segments=S, impl=impl)
    fn = jax.jit(lambda *a: sgc_mask.superpixel_target_mask(
        *a, ratio_denominator=denominator, zone_unit=unit,
        intersect_box=ibox, box_threshold=0.4, **kw))
    got = np.asarray(fn(*map(jnp.asarray, (cams, img, sp, valid,
                                            slot_valid))))
    ref = functools.partial(_mask_ref, cams, img, sp, valid, slot_valid,
                            k=4, iters=5, theta_h=0.4, theta_r=theta_r,
                            frac=0.5)
    want = ref(denominator=denominator, unit=unit,
               box=0.4 if ibox else None)
    np.testing.assert_array_equal(got, want)
    assert (got != ref()).any()  # differs from the default reading
    assert (got[:, 2] == 0).all() and (got[1, 1] == 0).all()  # padded slots


def test_target_mask_readings_on_a_large_background_cluster():
    """Grey image with a red object (patch rows 2-5, columns 0-1) and one
    high-confidence CAM patch on the grey at (0, 7); θ_h 0.4, θ_r 0.3.
    The default reading takes the grey cluster whole (its ratio is 0.38:
    the spot's high CAM against the object's upsampled low rim), so the
    far corner (7, 7) becomes a target. "cluster_seeded" keeps only the
    grey superpixels that hold a pixel above θ_h, "superpixel" tests each
    superpixel, the "image"
    denominator weighs the grey cluster's share against the whole CAM
    (the object's), and the box intersection keeps only the two boxes:
    none of them takes the far corner; all keep the object."""
    h = w = 8
    big = 32
    image = np.full((1, big, big, 3), 128, np.uint8)
    image[0, 8:24, 0:8] = (200, 30, 30)
    ys, xs = np.mgrid[0:big, 0:big]
    sp = ((ys // 4) * 8 + xs // 4)[None].astype(np.int32)
    cams = np.zeros((1, 1, h, w), np.float32)
    cams[0, 0, 2:6, 0:2] = 1.0
    cams[0, 0, 0, 7] = 1.0
    valid = np.ones((1, big, big), bool)
    slot = np.ones((1, 1), bool)

    def mask(**kw):
        return np.asarray(sgc_mask.superpixel_target_mask(
            jnp.asarray(cams), jnp.asarray(image), jnp.asarray(sp),
            jnp.asarray(valid), jnp.asarray(slot), colour_k=2,
            num_segments=64, theta_h=0.4, theta_r=0.3, **kw))[0, 0]

    default = mask()
    assert default[7, 7] == 1 and default[2:6, 0:2].all()
    for kw in (dict(zone_unit="cluster_seeded"),
               dict(zone_unit="superpixel"),
               dict(ratio_denominator="image"),
               dict(intersect_box=True)):
        m = mask(**kw)
        assert m[2:6, 0:2].all(), kw  # the object kept
        assert m[7, 7] == 0 and m.sum() < default.sum(), kw
    with pytest.raises(ValueError, match="zone_unit"):
        mask(zone_unit="region")


def test_superpixel_target_mask_hand_built():
    """Red | blue image, stripe superpixels, padding from column 40.

    The blue cluster (valid columns 36-39) is the only target (theta_r 0.9),
    so patch column 2 (columns 32-47) has 64 target pixels out of 128 valid
    ones (>= 0.5: target) and nothing else is. Ids under the padding are left
    as real stripes: `valid` alone must exclude them.
    """
    img = np.zeros((1, H, W, 3), np.uint8)
    img[0, :, :36] = (220, 20, 20)
    img[0, :, 36:] = (20, 20, 220)
    sp = np.broadcast_to(np.arange(W) // 4, (1, H, W)).astype(np.int32)
    valid = np.zeros((1, H, W), bool)
    valid[0, :, :40] = True
    cams = np.zeros((1, 1, GH, GW), np.float32)
    cams[0, 0, :, 2] = 1.0
    cams[0, 0, :, 3] = 0.3  # low CAM under the padding must not count
    fn = jax.jit(functools.partial(
        sgc_mask.superpixel_target_mask, colour_k=2, colour_iters=5,
        theta_h=0.4, theta_r=0.9, patch_fraction=0.5, num_segments=16))
    got = np.asarray(fn(*map(jnp.asarray, (cams, img, sp, valid,
                                            np.ones((1, 1), bool)))))
    want = np.zeros((GH, GW))
    want[:, 2] = 1.0
    np.testing.assert_array_equal(got[0, 0], want)


# --- box mask (CLIP-ES scoremap2bbox) -----------------------------------------


def _box_ref(cam, threshold):
    """scipy 8-connected components + CLIP-ES box clipping, one map."""
    h, w = cam.shape
    u = (cam.astype(np.float32) * np.float32(255)).astype(np.uint8)
    fg = u > int(threshold * np.max(u))
    lab, n = ndimage.label(fg, structure=np.ones((3, 3)))
    m = np.zeros((h, w), np.float32)
    for c in range(1, n + 1):
        ys, xs = np.nonzero(lab == c)
        m[ys.min():min(ys.max() + 1, h - 1),
          xs.min():min(xs.max() + 1, w - 1)] = 1
    return m


def _box_cases():
    rng = np.random.default_rng(4)
    cases = [rng.random((6, 7)) for _ in range(6)]
    cases += [ndimage.gaussian_filter(rng.random((6, 7)), 1.0)
              for _ in range(6)]
    two = np.zeros((6, 7))
    two[1:3, 1:3] = 1.0
    two[4, 4:6] = 0.9  # second component
    border = np.zeros((6, 7))
    border[3:, 4:] = 1.0  # touches bottom and right: loses that row/col
    corner = np.zeros((6, 7))
    corner[5, 6] = 1.0  # bottom-right pixel only: an empty box
    snake = np.zeros((6, 7))
    snake[0, :] = snake[2, :] = snake[4, :] = 1.0
    snake[1, 6] = snake[3, 0] = 1.0  # one long 8-connected path
    diag = np.eye(6, 7)  # 8-connected along the diagonal only
    cases += [two, border, corner, snake, diag, np.zeros((6, 7))]
    c = np.stack(cases).astype(np.float32)
    c = c - c.min((1, 2), keepdims=True)
    return c / np.maximum(c.max((1, 2), keepdims=True), 1e-12)


@pytest.mark.parametrize("impl,threshold", [("segment", 0.4),
                                            ("onehot", 0.7)])
def test_box_mask_vs_scipy(impl, threshold):
    cams = _box_cases()
    got = np.asarray(jax.jit(lambda c: sgc_mask.box_mask(c, threshold, impl))(
        jnp.asarray(cams.reshape(2, -1, 6, 7))).reshape(cams.shape))
    for i, cam in enumerate(cams):
        np.testing.assert_array_equal(got[i], _box_ref(cam, threshold),
                                      err_msg=f"case {i}")
    assert got[-1].sum() == 0  # all-zero CAM: no component, empty mask
    assert got[-4].sum() == 0  # single pixel in the corner: empty box
    border = got[-5]
    assert border[3:5, 4:6].all() and border[5].sum() == 0
    assert border[:, 6].sum() == 0


def test_box_mask_matches_opencv():
    cv2 = pytest.importorskip("cv2")  # dev dependency only (CLIP-ES uses it)
    cams = _box_cases()
    got = np.asarray(jax.jit(sgc_mask.box_mask, static_argnums=1)(
        jnp.asarray(cams[None]), 0.4))[0]
    for i, cam in enumerate(cams):
        u = np.expand_dims((cam * 255).astype(np.uint8), 2)
        _, t = cv2.threshold(u, int(0.4 * np.max(u)), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(t, cv2.RETR_TREE,
                                    cv2.CHAIN_APPROX_SIMPLE)[-2]
        want = np.zeros(cam.shape, np.float32)
        for cnt in contours:
            x, y, w, h = cv2.boundingRect(cnt)
            want[y:min(y + h, cam.shape[0] - 1),
                 x:min(x + w, cam.shape[1] - 1)] = 1
        np.testing.assert_array_equal(got[i], want, err_msg=f"case {i}")


def test_connected_components_partition_matches_scipy():
    rng = np.random.default_rng(6)
    fg = rng.random((5, 9, 11)) > 0.45
    labels = np.asarray(sgc_mask._connected_components(jnp.asarray(fg)))
    for i in range(fg.shape[0]):
        ref, _ = ndimage.label(fg[i], structure=np.ones((3, 3)))
        assert (labels[i][~fg[i]] == 99).all()
        pairs = set(zip(ref[fg[i]].tolist(), labels[i][fg[i]].tolist(),
                        strict=True))
        assert len(pairs) == ref.max() == len({p[1] for p in pairs})
        for comp, lab in pairs:  # label = smallest flat index in component
            assert lab == np.flatnonzero(ref.ravel() == comp)[0]


# --- affinity, transition, propagation ----------------------------------------


def _attn(seed, layers=12, n=GH * GW):
    rng = np.random.default_rng(seed)
    a = np.exp(rng.normal(size=(layers, B, n + 1, n + 1)))
    return (a / a.sum(-1, keepdims=True)).astype(np.float32)


def _trans_ref(a, iters, power=2):
    t = np.array(a, np.float64)
    n = t.shape[0]
    for _ in range(iters):
        for j in range(n):
            t[:, j] = t[:, j] / t[:, j].sum()
        for i in range(n):
            t[i, :] = t[i, :] / t[i, :].sum()
    t = (t + t.T) / 2
    if power == 1:
        return t
    out = np.zeros_like(t)
    for i in range(n):
        for j in range(n):
            out[i, j] = sum(t[i, m] * t[m, j] for m in range(n))
    return out


def test_clip_affinity_and_drop_cls():
    attn = _attn(7)
    want = attn[-8:].mean(0)[:, 1:, 1:]
    np.testing.assert_allclose(sgc.clip_affinity(jnp.asarray(attn), 8),
                               want, rtol=1e-6)
    as_list = [jnp.asarray(a) for a in attn]
    np.testing.assert_allclose(sgc.clip_affinity(as_list, 8), want,
                               rtol=1e-6)
    np.testing.assert_array_equal(sgc.drop_cls(jnp.asarray(attn[0])),
                                  attn[0][:, 1:, 1:])
    with pytest.raises(ValueError, match="last_n"):
        sgc.clip_affinity(jnp.asarray(attn), 13)


def test_fuse_affinity_weights():
    a, d = _attn(8, 1)[0], _attn(9, 1)[0]
    np.testing.assert_allclose(sgc.fuse_affinity(a, d, 0.4, 0.6),
                               0.4 * a + 0.6 * d, rtol=1e-6)
    np.testing.assert_allclose(sgc.fuse_affinity(a, None, 0.4, 0.6), 0.4 * a,
                               rtol=1e-6)
    np.testing.assert_allclose(sgc.fuse_affinity(None, d, 0.4, 0.6), 0.6 * d,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="CLIP or a DINO"):
        sgc.fuse_affinity(None, None)


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_transition_matrix_vs_loops(iters):
    a = _attn(10, 1)[0][:, 1:, 1:]
    got = np.asarray(sgc.transition_matrix(jnp.asarray(a), iters))
    for b in range(B):
        np.testing.assert_allclose(got[b], _trans_ref(a[b], iters),
                                   rtol=1e-5, atol=1e-7)
    assert np.isfinite(np.asarray(
        sgc.transition_matrix(jnp.zeros((1, 4, 4)), 3))).all()


@pytest.mark.parametrize("iters", [0, 3])
def test_transition_power_vs_explicit_formula(iters):
    """power 1 = S, the symmetrised Sinkhorn matrix (Eq. 11 read
    literally); power 2 = S·S (WeCLIP) — the default. The two differ (a
    broken power that ignored the argument would fail one of these)."""
    a = _attn(12, 1)[0][:, 1:, 1:]
    one = np.asarray(sgc.transition_matrix(jnp.asarray(a), iters, power=1))
    two = np.asarray(sgc.transition_matrix(jnp.asarray(a), iters, power=2))
    default = np.asarray(sgc.transition_matrix(jnp.asarray(a), iters))
    for b in range(B):
        np.testing.assert_allclose(one[b], _trans_ref(a[b], iters, 1),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(two[b], one[b] @ one[b], rtol=1e-5,
                                   atol=1e-7)
    np.testing.assert_array_equal(default, two)
    assert np.abs(one - two).max() > 1e-3
    with pytest.raises(ValueError, match="transition power 3"):
        sgc.transition_matrix(jnp.asarray(a), iters, power=3)
    # Through refine_cams: the no-mask refinement is S·CAM at power 1.
    cams = np.random.default_rng(5).random((B, K, GH, GW), np.float32)
    slot = jnp.ones((B, K), bool)
    attn = _attn(13, 2)
    got = np.asarray(sgc.refine_cams(
        jnp.asarray(cams), slot, clip_attn=jnp.asarray(attn),
        use_dino_attn=False, mask_kind="none", clip_layers=2,
        clip_weight=1.0, sinkhorn_iters=iters, transition_power=1))
    aff = attn.mean(0)[:, 1:, 1:]
    for b in range(B):
        want = _trans_ref(aff[b], iters, 1) @ cams[b].reshape(K, -1).T
        np.testing.assert_allclose(got[b].reshape(K, -1), want.T,
                                   rtol=1e-4, atol=1e-6)


def test_propagate_vs_loops():
    rng = np.random.default_rng(11)
    n = GH * GW
    t = rng.random((B, n, n)).astype(np.float32)
    cams = rng.random((B, K, n)).astype(np.float32)
    mask = (rng.random((B, K, n)) > 0.5).astype(np.float32)
    got = np.asarray(sgc.propagate(jnp.asarray(t), jnp.asarray(cams),
                                   jnp.asarray(mask)))
    got_none = np.asarray(sgc.propagate(jnp.asarray(t), jnp.asarray(cams)))
    for b in range(B):
        for c in range(K):
            for i in range(n):
                want = sum(float(t[b, i, j]) * mask[b, c, j] * cams[b, c, j]
                           for j in range(n))
                plain = sum(float(t[b, i, j]) * cams[b, c, j]
                            for j in range(n))
                assert abs(got[b, c, i] - want) < 1e-5
                assert abs(got_none[b, c, i] - plain) < 1e-5


# --- refine_cams (Table 3) ----------------------------------------------------


def _refine_inputs():
    img, sp, valid, slot_valid = _scene()
    return dict(cams=_cams(0), slot_valid=slot_valid, clip=_attn(12),
                dino=_attn(13, 1)[0], img=img, sp=sp, valid=valid)


def _run_refine(x, **kw):
    fn = jax.jit(functools.partial(sgc.refine_cams, num_segments=S,
                                   colour_k=4, colour_iters=5, **kw))
    return np.asarray(fn(
        jnp.asarray(x["cams"]), jnp.asarray(x["slot_valid"]),
        clip_attn=jnp.asarray(x["clip"]), dino_attn=jnp.asarray(x["dino"]),
        image=jnp.asarray(x["img"]), superpixels=jnp.asarray(x["sp"]),
        valid=jnp.asarray(x["valid"])))


def _expected(trans, cams, mask, slot_valid):
    out = np.zeros_like(cams)
    n = GH * GW
    for b in range(B):
        for c in range(K):
            if slot_valid[b, c]:
                src = (cams[b, c] * mask[b, c]).reshape(n)
                out[b, c] = (trans[b] @ src).reshape(GH, GW)
    return out


def test_refine_cams_table3_steps():
    x = _refine_inputs()
    cams, sv = x["cams"], x["slot_valid"]
    # Row 1: no attention -> the input CAMs.
    np.testing.assert_array_equal(
        _run_refine(x, use_clip_attn=False, use_dino_attn=False,
                    mask_kind="superpixel"), cams)
    clip_aff = x["clip"][-8:].mean(0)[:, 1:, 1:]
    dino_aff = x["dino"][:, 1:, 1:]
    t_clip = np.stack([_trans_ref(clip_aff[b], 3) for b in range(B)])
    t_both = np.stack([_trans_ref(0.4 * clip_aff[b] + 0.6 * dino_aff[b], 3)
                       for b in range(B)])
    ones = np.ones_like(cams)
    # Row 2: CLIP only, no mask = T_clip · cam.
    np.testing.assert_allclose(
        _run_refine(x, use_clip_attn=True, use_dino_attn=False,
                    mask_kind="none"),
        _expected(t_clip, cams, ones, sv), rtol=1e-5, atol=1e-7)
    # Row 3: CLIP + DINO (0.4 : 0.6), no mask.
    np.testing.assert_allclose(
        _run_refine(x, use_clip_attn=True, use_dino_attn=True,
                    mask_kind="none"),
        _expected(t_both, cams, ones, sv), rtol=1e-5, atol=1e-7)
    # Baseline: CLIP with the CLIP-ES box mask.
    boxes = np.stack([[_box_ref(cams[b, c], 0.3) for c in range(K)]
                      for b in range(B)])
    np.testing.assert_allclose(
        _run_refine(x, use_clip_attn=True, use_dino_attn=False,
                    mask_kind="box", box_threshold=0.3),
        _expected(t_clip, cams, boxes, sv), rtol=1e-5, atol=1e-7)
    # Row 4: CLIP + DINO + SGC mask.
    sp_mask = _mask_ref(cams, x["img"], x["sp"], x["valid"], sv, k=4,
                        iters=5, theta_h=0.4, theta_r=0.5, frac=0.5)
    got = _run_refine(x, use_clip_attn=True, use_dino_attn=True,
                      mask_kind="superpixel")
    np.testing.assert_allclose(got, _expected(t_both, cams, sp_mask, sv),
                               rtol=1e-5, atol=1e-7)
    assert (got[:, 2] == 0).all() and (got[1, 1] == 0).all()


def test_refine_cams_errors():
    x = _refine_inputs()
    with pytest.raises(ValueError, match="mask_kind"):
        _run_refine(x, mask_kind="boxes")
    with pytest.raises(ValueError, match="clip_attn"):
        sgc.refine_cams(jnp.asarray(x["cams"]), jnp.asarray(x["slot_valid"]),
                        mask_kind="none", use_dino_attn=False)
    with pytest.raises(ValueError, match="CAM grid"):
        sgc.refine_cams(jnp.asarray(x["cams"][..., :3]),
                        jnp.asarray(x["slot_valid"]),
                        clip_attn=jnp.asarray(x["clip"]), mask_kind="none",
                        use_dino_attn=False)


def test_refine_cams_with_method_params_uses_config_fields():
    from ssr_jax import config_defaults, params

    cfg = config_defaults.base_config()
    cfg.sgc.max_segments = S
    cfg.sgc.mask = "box"
    sp = params.method_params(cfg).sgc
    assert (sp.num_segments, sp.mask_kind) == (S, "box")
    x = _refine_inputs()
    fn = jax.jit(lambda c, v, a, d: sgc.refine_cams_with(
        c, v, sp, clip_attn=a, dino_attn=d))
    got = fn(*map(jnp.asarray, (x["cams"], x["slot_valid"], x["clip"],
                                x["dino"])))
    want = _run_refine(x, mask_kind="box")
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_refine_cams_with_passes_the_zone_readings():
    """`sgc.ratio_denominator`, `zone_unit` and `intersect_box` reach the
    superpixel mask through `method_params` and `refine_cams_with`: the
    refined CAM is T · (mask · CAM) with the mask of
    `superpixel_target_mask` at those readings; on this scene each of the
    three changes the mask (so none can be dropped on the way)."""
    from ssr_jax import config_defaults, params

    cfg = config_defaults.base_config()
    cfg.sgc.max_segments = S
    cfg.sgc.colour_k, cfg.sgc.colour_iters = 4, 5
    cfg.sgc.zone_unit = "superpixel"
    cfg.sgc.ratio_denominator = "image"
    cfg.sgc.theta_r = 0.1
    cfg.sgc.intersect_box = True
    sp = params.method_params(cfg).sgc
    assert (sp.zone_unit, sp.ratio_denominator, sp.intersect_box) == (
        "superpixel", "image", True)
    x = _refine_inputs()
    arrays = dict(clip_attn=jnp.asarray(x["clip"]),
                  dino_attn=jnp.asarray(x["dino"]),
                  image=jnp.asarray(x["img"]),
                  superpixels=jnp.asarray(x["sp"]),
                  valid=jnp.asarray(x["valid"]))
    got = np.asarray(jax.jit(lambda c, v: sgc.refine_cams_with(
        c, v, sp, **arrays))(jnp.asarray(x["cams"]),
                             jnp.asarray(x["slot_valid"])))

    def masked(**kw):
        m = np.asarray(sgc_mask.superpixel_target_mask(
            jnp.asarray(x["cams"]), arrays["image"], arrays["superpixels"],
            arrays["valid"], jnp.asarray(x["slot_valid"]), colour_k=4,
            colour_iters=5, theta_r=0.1, num_segments=S, **kw))
        return _run_refine(x, theta_r=0.1, mask_kind="none",
                           cams_mask=m) if False else m

    readings = dict(zone_unit="superpixel", ratio_denominator="image",
                    intersect_box=True)
    m_new = masked(**readings)
    for name, default in (("zone_unit", "cluster"),
                          ("ratio_denominator", "cluster"),
                          ("intersect_box", False)):
        assert (m_new != masked(**{**readings, name: default})).any(), name
    clip_aff = x["clip"][-8:].mean(0)[:, 1:, 1:]
    dino_aff = x["dino"][:, 1:, 1:]
    t_both = np.stack([_trans_ref(0.4 * clip_aff[b] + 0.6 * dino_aff[b], 3)
                       for b in range(B)])
    np.testing.assert_allclose(
        got, _expected(t_both, x["cams"], m_new, x["slot_valid"]),
        rtol=1e-5, atol=1e-7)


# --- static structure and robustness ------------------------------------------




@pytest.mark.parametrize("mask_kind", ["superpixel", "box"])
def test_refine_cams_jaxpr_does_not_grow_with_classes(mask_kind):
    img, sp, valid, _ = _scene()

    def count(k):
        def f(cams, slot_valid, clip_attn, dino_attn):
            return sgc.refine_cams(
                cams, slot_valid, clip_attn=clip_attn, dino_attn=dino_attn,
                image=jnp.asarray(img), superpixels=jnp.asarray(sp),
                valid=jnp.asarray(valid), mask_kind=mask_kind,
                num_segments=S, colour_k=4)

        return jaxpr_utils.traced_eqns(
            f, jnp.zeros((B, k, GH, GW)), jnp.ones((B, k), bool),
            jnp.zeros((12, B, 17, 17)), jnp.zeros((B, 17, 17)))

    assert count(6) == count(12)


@pytest.mark.parametrize("impl", IMPLS)
def test_finite_with_zero_cams_and_empty_superpixels(impl):
    img, sp, valid, slot_valid = _scene()
    sp = np.full_like(sp, -1)  # no superpixel at all
    cams = np.zeros((B, K, GH, GW), np.float32)
    x = dict(cams=cams, slot_valid=slot_valid, clip=_attn(14),
             dino=_attn(15, 1)[0], img=img, sp=sp, valid=valid)
    kinds = sgc.MASK_KINDS if impl == "segment" else ()
    for kind in kinds:
        out = _run_refine(x, mask_kind=kind, impl=impl)
        assert np.isfinite(out).all() and (out == 0).all()
    fn = jax.jit(functools.partial(sgc_mask.superpixel_target_mask,
                                   num_segments=S, colour_k=4, impl=impl))
    mask = np.asarray(fn(*map(jnp.asarray,
                              (cams, img, sp, valid, slot_valid))))
    np.testing.assert_array_equal(
        mask, np.broadcast_to(slot_valid[:, :, None, None], mask.shape))


def test_rfm_affinity_matches_weclip_loop():
    """WeCLIP's RFM (reference §1.4) by explicit loops over layers."""
    rng = np.random.default_rng(7)
    layers, b, n, e = 5, 2, 6, 4
    attn = rng.random((layers, b, n + 1, n + 1)).astype(np.float32)
    feat = rng.normal(size=(b, n, e)).astype(np.float32)
    got = np.asarray(sgc.rfm_affinity(jnp.asarray(attn), jnp.asarray(feat),
                                      last_n=4))
    for i in range(b):
        s = 1 / (1 + np.exp(-(feat[i] @ feat[i].T)))
        maps = [attn[j, i, 1:, 1:] for j in range(layers - 4, layers)]
        d = [float((s - a).sum()) for a in maps]
        keep = [a for a, dl in zip(maps, d, strict=True) if dl <= np.mean(d)]
        want = sum(keep) / (len(keep) + 1e-5) * s
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_rfm_similarity_and_gate_split():
    """S = sigmoid(F Fᵀ) alone, and the gating fed a given S (not from a
    feature): each against NumPy loops; rfm_affinity is their composition."""
    rng = np.random.default_rng(9)
    layers, b, n, e = 5, 2, 6, 4
    attn = rng.random((layers, b, n + 1, n + 1)).astype(np.float32)
    feat = rng.normal(size=(b, n, e)).astype(np.float32)
    sim = np.asarray(sgc.rfm_similarity(jnp.asarray(feat)))
    for i in range(b):
        np.testing.assert_allclose(
            sim[i], 1 / (1 + np.exp(-(feat[i] @ feat[i].T))), rtol=1e-6)
    given = rng.random((b, n, n)).astype(np.float32)  # any S in (0, 1)
    got = np.asarray(sgc.rfm_gate(list(jnp.asarray(attn)),
                                  jnp.asarray(given), last_n=3))
    for i in range(b):
        maps = [attn[j, i, 1:, 1:] for j in range(layers - 3, layers)]
        d = [float((given[i] - a).sum()) for a in maps]
        keep = [a for a, dl in zip(maps, d, strict=True) if dl <= np.mean(d)]
        want = sum(keep) / (len(keep) + 1e-5) * given[i]
        # float32 sums of 36 terms in [0, 1]: ~36·eps relative at worst
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(sgc.rfm_affinity(jnp.asarray(attn), jnp.asarray(feat),
                                    last_n=4)),
        np.asarray(sgc.rfm_gate(jnp.asarray(attn), jnp.asarray(sim),
                                last_n=4)))
    with pytest.raises(ValueError, match="sim has shape"):
        sgc.rfm_gate(jnp.asarray(attn), jnp.asarray(given[:, :4, :4]), 4)


def test_refine_cams_uses_a_given_clip_affinity():
    rng = np.random.default_rng(8)
    cams = jnp.asarray(rng.random((1, 2, 2, 3)).astype(np.float32))
    valid = jnp.ones((1, 2), bool)
    aff = jnp.asarray(rng.random((1, 6, 6)).astype(np.float32))
    got = sgc.refine_cams(cams, valid, clip_aff=aff, use_dino_attn=False,
                          mask_kind="none", clip_weight=1.0)
    trans = sgc.transition_matrix(aff, 3)
    want = sgc.propagate(trans, cams.reshape(1, 2, 6)).reshape(1, 2, 2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_refine_cams_uses_a_given_dino_affinity():
    """`dino_aff` (an encoder's affinity already on the CAM grid,
    `encoders.patch_affinity`) replaces `drop_cls(dino_attn)`; with the
    same values the result is identical."""
    rng = np.random.default_rng(9)
    cams = jnp.asarray(rng.random((1, 2, 2, 3)).astype(np.float32))
    valid = jnp.ones((1, 2), bool)
    clip_aff = jnp.asarray(rng.random((1, 6, 6)).astype(np.float32))
    attn = jnp.asarray(rng.random((1, 7, 7)).astype(np.float32))
    kw = dict(clip_aff=clip_aff, mask_kind="none")
    from_attn = sgc.refine_cams(cams, valid, dino_attn=attn, **kw)
    given = sgc.refine_cams(cams, valid, dino_aff=sgc.drop_cls(attn), **kw)
    np.testing.assert_array_equal(from_attn, given)
    other = sgc.refine_cams(cams, valid, dino_aff=jnp.flip(attn[:, 1:, 1:],
                                                           -1), **kw)
    assert not np.allclose(other, given)
    with pytest.raises(ValueError, match="dino_attn or dino_aff"):
        sgc.refine_cams(cams, valid, **kw)


def test_kmeanspp_init_is_per_image_and_picks_valid_points():
    """`sgc.kmeans_init="kmeans++"`: centres are valid points of their own
    image, identical whether the image is alone or in a batch (one PRNG
    stream per image), deterministic per seed; n < k valid points and an
    image with none stay finite."""
    rng = np.random.default_rng(5)
    colours = rng.normal(size=(3, 20, 3)).astype(np.float32) * 20
    valid = rng.random((3, 20)) > 0.3
    valid[1] = False
    valid[1, [2, 4]] = True  # n = 2 < k
    valid[2] = False  # no valid point at all
    init = jax.jit(sgc_mask._kmeanspp_init, static_argnums=(2, 3))
    both = np.asarray(init(jnp.asarray(colours), jnp.asarray(valid), 4, 7))
    alone = np.asarray(init(jnp.asarray(colours[:1]), jnp.asarray(valid[:1]),
                            4, 7))
    np.testing.assert_array_equal(both[:1], alone)
    np.testing.assert_array_equal(
        both, np.asarray(init(jnp.asarray(colours), jnp.asarray(valid), 4, 7)))
    assert np.isfinite(both).all()
    for b in range(2):
        pts = colours[b][valid[b]]
        for c in both[b]:
            assert np.abs(pts - c).sum(-1).min() == 0  # a valid point
    labels = np.asarray(jax.jit(
        sgc_mask.colour_kmeans, static_argnames=("k", "iters", "init"))(
        jnp.asarray(colours), jnp.asarray(valid), k=4, iters=3,
        init="kmeans++"))
    assert (labels[~valid] == -1).all() and (labels[valid] >= 0).all()
    with pytest.raises(ValueError, match="kmeans_init"):
        sgc_mask.colour_kmeans(jnp.asarray(colours), jnp.asarray(valid), 4, 3,
                          init="random")


def test_superpixel_positions_vs_loop():
    from ssr_jax import sgc_mask
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 5, size=(2, 6, 7)).astype(np.int32)
    got = np.asarray(sgc_mask.superpixel_positions(jnp.asarray(ids), 6))
    for b in range(2):
        for s in range(6):
            ys, xs = np.nonzero(ids[b] == s)
            want = ([(ys + 0.5).mean() / 6, (xs + 0.5).mean() / 7]
                    if len(ys) else [0.0, 0.0])
            np.testing.assert_allclose(got[b, s], want, atol=1e-6)


def test_position_weight_splits_one_colour_far_apart():
    """Two red blocks of the same colour at opposite ends of a grey image;
    the CAM is high on the left one only. Colour-only clusters (the
    default) put both blocks in one cluster, so the right block becomes a
    target; with the position term the right block is its own cluster and
    is left out, the left block stays a target."""
    from ssr_jax import sgc_mask
    h = w = 8
    big = 32
    image = np.full((1, big, big, 3), 128, np.uint8)
    image[0, 8:24, 0:8] = (200, 30, 30)
    image[0, 8:24, 24:32] = (200, 30, 30)
    ys, xs = np.mgrid[0:big, 0:big]
    sp = ((ys // 4) * 8 + xs // 4)[None].astype(np.int32)
    cams = np.zeros((1, 1, h, w), np.float32)
    cams[0, 0, 2:6, 0:2] = 1.0
    valid = np.ones((1, big, big), bool)
    slot = np.ones((1, 1), bool)

    def mask(pw):
        return np.asarray(sgc_mask.superpixel_target_mask(
            jnp.asarray(cams), jnp.asarray(image), jnp.asarray(sp),
            jnp.asarray(valid), jnp.asarray(slot), colour_k=5,
            num_segments=64, kmeans_init="kmeans++",
            position_weight=pw))[0, 0]

    m0, m1 = mask(0.0), mask(0.5)
    assert m0[2:6, 0:2].all() and m1[2:6, 0:2].all()  # the object kept
    assert m0[2:6, 6:8].all()  # colour only: the far block is a target
    assert not m1[2:6, 6:8].any()  # with position: it is not
    with pytest.raises(ValueError, match="position_weight"):
        mask(-1.0)
