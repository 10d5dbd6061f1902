"""Mechanism tests for SSR's own components (issue 10), constructed inputs.

Each test checks that a mechanism does what the paper relies on AND that
the same check fails on a broken input (asserted in the test itself, so
the check is seen to be able to fail):

(a) propagation (Eq. 10-11: `sgc.transition_matrix`, `sgc.propagate`)
    with an object-pure affinity raises CAM IoU; a uniform affinity and an
    affinity built from a wrong (shifted) mask do not.
(b) the superpixel target mask (Eq. 7-8) drops a wrongly activated
    co-occurring region of another colour and keeps the object; broken
    input: a scene where the lightness-rank colour K-means merges the two
    colours (the region is then kept).
(c) CMPA heads trained on ground-truth-masked pooled features raise the
    projected GradCAM above plain CLIP (the paper's premise); broken
    input: the same training on the inverted mask (background pooled).

Plus the colour K-means start (`sgc.kmeans_init`) on eight colours.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax import diagnostics, diagnostics_cmpa, par, sgc, sgc_mask

# --- helpers ------------------------------------------------------------------


def _iou_from_cam(cam: np.ndarray, gt: np.ndarray) -> float:
    """Foreground IoU of the `par.cams_to_labels` seed of one CAM."""
    cams = jnp.asarray(cam, jnp.float32)[None, None]
    _, labels = par.cams_to_labels(cams, jnp.zeros((1, 1), jnp.int32),
                                   cam.shape)
    pred = np.asarray(labels[0]) == 1
    inter, union = (pred & gt).sum(), (pred | gt).sum()
    return float(inter / union) if union else 0.0


def _refine(aff: np.ndarray, cam: np.ndarray,
            mask: np.ndarray | None = None) -> np.ndarray:
    n = cam.size
    trans = sgc.transition_matrix(jnp.asarray(aff, jnp.float32)[None])
    m = None if mask is None else jnp.asarray(mask, jnp.float32).reshape(
        1, 1, n)
    out = sgc.propagate(trans, jnp.asarray(cam, jnp.float32).reshape(1, 1, n),
                        m)
    return np.asarray(out).reshape(cam.shape)


# --- (a) propagation ---------------------------------------------------------


def _propagation_scene():
    """8x8 grid, object rows 2-5 x cols 2-6; the CAM peaks inside the
    object and misses its rim (under-coverage) and has a weaker spurious
    blob in the background."""
    h = w = 8
    gt = np.zeros((h, w), bool)
    gt[2:6, 2:7] = True
    yy, xx = np.mgrid[:h, :w]
    cam = np.exp(-((yy - 3.5) ** 2 + (xx - 4.0) ** 2) / 2.0)
    cam += 0.45 * np.exp(-((yy - 7) ** 2 + (xx - 0) ** 2) / 1.0)
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    return gt, cam


def test_propagation_with_object_pure_affinity_raises_iou():
    gt, cam = _propagation_scene()
    before = _iou_from_cam(cam, gt)
    labels = jnp.asarray(gt.reshape(1, -1).astype(np.int32))
    oracle = np.asarray(diagnostics.oracle_affinity(labels))[0]
    after = _iou_from_cam(_refine(oracle, cam), gt)
    assert before < 0.6  # the constructed CAM misses the object's rim
    assert after > before + 0.3, (before, after)
    assert after == pytest.approx(1.0)

    # Broken inputs: a uniform affinity makes the CAM constant (no seed);
    # an affinity from a mask shifted by 3 columns spreads the CAM onto the
    # wrong patches. Neither raises the IoU.
    uniform = np.ones((gt.size, gt.size))
    assert _iou_from_cam(_refine(uniform, cam), gt) <= before
    wrong = np.roll(gt, 3, axis=1)
    shifted = np.asarray(diagnostics.oracle_affinity(
        jnp.asarray(wrong.reshape(1, -1).astype(np.int32))))[0]
    assert _iou_from_cam(_refine(shifted, cam), gt) <= before


# --- the eight-colour scene (colour K-means start, SGC mask) ------------------

COLOURS = {"sky": (120, 170, 230), "wall": (150, 150, 150),
           "sand": (225, 200, 140), "white": (245, 245, 245),
           "red": (200, 30, 30), "brown": (140, 80, 40),
           "green": (80, 160, 40), "yellow": (230, 220, 40)}
NAMES = list(COLOURS)
BLOCK = 8  # superpixels are 8x8 blocks = the patch size here


def _eight_colour_scene(big_objects: bool = False):
    """128x128 image of 16x16 block superpixels: four large regions (sky,
    wall, sand, white) and four small ones (red, brown, green, yellow).
    With `big_objects` the red object and the brown region are 3x3 blocks
    and do not touch. Returns (image, superpixels, truth [16, 16] index
    into NAMES)."""
    g = 16
    lab = np.zeros((g, g), int)
    lab[:6, :] = 0
    lab[6:11, :] = 1
    lab[11:, :] = 2
    lab[0:3, 12:] = 3
    if big_objects:
        lab[6:9, 1:4] = 4
        lab[11:14, 10:13] = 5
    else:
        lab[7:9, 2:4] = 4
        lab[12:14, 11:13] = 5
    lab[8:10, 10:12] = 6
    lab[13:15, 3:5] = 7
    rng = np.random.default_rng(0)
    img = np.array([COLOURS[n] for n in NAMES], np.uint8)[lab]
    img = np.repeat(np.repeat(img, BLOCK, 0), BLOCK, 1)
    img = np.clip(img.astype(int) + rng.integers(-6, 7, img.shape), 0,
                  255).astype(np.uint8)
    sp = ((np.arange(g * BLOCK)[:, None] // BLOCK) * g
          + np.arange(g * BLOCK)[None, :] // BLOCK).astype(np.int32)
    return img, sp, lab


def _merged_pairs(init: str, seed: int = 0, big_objects: bool = False):
    img, sp, lab = _eight_colour_scene(big_objects)
    mean, count = sgc_mask.superpixel_colours(jnp.asarray(img[None]),
                                         jnp.asarray(sp[None]), 256)
    got = np.asarray(jax.jit(
        sgc_mask.colour_kmeans, static_argnames=("k", "iters", "init", "seed"))(
        mean, count > 0, k=8, iters=10, init=init, seed=seed))[0]
    truth = lab.ravel()
    groups = [set(got[truth == t].tolist()) for t in range(8)]
    return {(NAMES[i], NAMES[j]) for i in range(8) for j in range(i + 1, 8)
            if groups[i] & groups[j]}


def test_colour_kmeans_start_on_eight_colours():
    """Lightness ranks give the big regions several centres and merge red
    with brown and green with yellow (similar lightness); k-means++ keeps
    all eight colours apart, for every seed tried."""
    old = _merged_pairs("lightness_ranks")
    assert ("red", "brown") in old and ("green", "yellow") in old, old
    for seed in range(3):
        assert _merged_pairs("kmeans++", seed) == set(), seed


# --- (b) the superpixel target mask ------------------------------------------


def _sgc_case(init: str):
    """Red object (CAM 1) and a non-touching brown co-occurring region
    wrongly activated at 0.6 (a false positive of the initial seed, below
    θ_h = 0.7). Returns (initial IoU, IoU after masked propagation, mask,
    red patches, brown patches, IoU after unmasked propagation)."""
    img, sp, lab = _eight_colour_scene(big_objects=True)
    red, brown = lab == 4, lab == 5
    cam = np.where(red, 1.0, np.where(brown, 0.6, 0.0)).astype(np.float32)
    mask = np.asarray(sgc_mask.superpixel_target_mask(
        jnp.asarray(cam)[None, None], jnp.asarray(img[None]),
        jnp.asarray(sp[None]), jnp.ones((1,) + sp.shape, bool),
        jnp.ones((1, 1), bool), colour_k=8, colour_iters=10, theta_h=0.7,
        theta_r=0.5, num_segments=256, kmeans_init=init))[0, 0]
    # A local affinity (Gaussian in patch distance): propagation then only
    # mixes neighbours, as attention does in a real image.
    yy, xx = np.mgrid[:16, :16]
    pos = np.stack([yy.ravel(), xx.ravel()], -1).astype(float)
    d2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    aff = np.exp(-d2 / 2.0)
    return (_iou_from_cam(cam, red), _iou_from_cam(_refine(aff, cam, mask),
                                                   red),
            mask, red, brown, _iou_from_cam(_refine(aff, cam), red))


def test_superpixel_mask_removes_cooccurring_region_of_another_colour():
    before, after, mask, red, brown, unmasked = _sgc_case("kmeans++")
    assert mask[red].all() and not mask[brown].any()
    assert before == pytest.approx(0.5)  # red + brown both seeded
    # Brown is no longer seeded; the object's rim blurs a little with the
    # local affinity (IoU 0.75 measured), so only "much better" is asked.
    assert after > before + 0.2, after
    # Without the mask the brown region is only diluted by its neighbours
    # (IoU 0.64 measured): the mask is what removes it.
    assert after > unmasked + 0.05, (after, unmasked)

    # Broken input: with the lightness-rank start red and brown share a
    # colour cluster, whose high-confidence ratio (9 / (9 + 5.4)) passes
    # θ_r, so the brown region stays a target and stays seeded.
    _, after_old, mask, red, brown, unmasked = _sgc_case("lightness_ranks")
    assert mask[brown].all()
    assert after_old == pytest.approx(unmasked)  # the mask does nothing


# --- (c) CMPA on a constructed problem ----------------------------------------


def test_cmpa_heads_on_clean_pools_raise_projected_cam():
    """The paper's premise on the issue's "first lead" problem (confound
    0.5, similar class texts): heads trained by ssr_jax's CMPA code on
    ground-truth-masked pools raise the projected GradCAM above plain
    CLIP. Broken input: the same training with the inverted mask
    (co-occurring background pooled as the class) ends lower.
    Measured (docs/diagnostics.md, seeds 0/1/2, 80 steps): plain .583 /
    .563 / .507, GT pools .743 / .624 / .697, inverted .478 / .535 / .590.
    """
    p = diagnostics_cmpa.cmpa_problem(num_images=64, confound=0.5,
                                      noise=0.1, text_overlap=0.7, seed=0)
    plain = diagnostics_cmpa.projected_cam_miou(p, None)
    heads, info = diagnostics_cmpa.train_cmpa_heads(p, "gt", steps=80)
    clean = diagnostics_cmpa.projected_cam_miou(p, heads)
    inv = dataclasses.replace(p, obj=~p.obj)
    heads_inv, _ = diagnostics_cmpa.train_cmpa_heads(inv, "gt", steps=80)
    broken = diagnostics_cmpa.projected_cam_miou(p, heads_inv)
    assert np.isfinite(info["loss"]).all()
    assert clean > plain + 0.05, (plain, clean)
    assert broken < clean - 0.1, (clean, broken)
