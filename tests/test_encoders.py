"""ssr_jax.models.encoders: the affinity-encoder seam (layouts, loading by
kind, `patch_affinity` resampling onto CLIP's grid)."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import make_tiny_dino, make_tiny_dinov2

from ssr_jax import config_check, config_defaults, sgc
from ssr_jax.models import encoders
from ssr_jax.models.encoders import (
    TokenLayout,
    load_affinity_encoder,
    patch_affinity,
)
from ssr_jax.models.loading import WeightsError


def random_attn(rng, b, t, concentration=1.0):
    """Row-stochastic [B, T, T], like a softmax attention."""
    a = rng.gamma(concentration, size=(b, t, t))
    return (a / a.sum(-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return {"dino": make_tiny_dino(root / "dino"),
            "dinov2": make_tiny_dinov2(root / "dinov2"),
            "dinov2_reg": make_tiny_dinov2(root / "reg",
                                           num_register_tokens=4)}


def test_kinds_match_config_check():
    assert encoders.KINDS == config_check.DINO_KINDS
    c = config_defaults.base_config()
    assert c.model.dino_kind == "dino"
    c.model.dino_kind = "dinov3"
    errors = config_check.validate(c, check_devices=False)
    assert any("model.dino_kind='dinov3': choose one of dino, dinov2" in e
               for e in errors), errors


def test_token_layout():
    lay = TokenLayout(5, 14, 4)
    assert lay.patch_start == 5 and lay.num_tokens((3, 4)) == 17
    with pytest.raises(ValueError, match="CLS token is a prefix"):
        TokenLayout(4, 14, 4)
    with pytest.raises(ValueError, match="patch_size"):
        TokenLayout(1, 0)


def test_load_affinity_encoder_by_kind(snapshots):
    model, layout = load_affinity_encoder("dino", snapshots["dino"])
    assert layout == TokenLayout(1, 16, 0) == model.layout
    model, layout = load_affinity_encoder("dinov2", snapshots["dinov2"])
    assert layout == TokenLayout(1, 14, 0)
    model, layout = load_affinity_encoder("dinov2", snapshots["dinov2_reg"],
                                          jnp.bfloat16)
    assert layout == TokenLayout(5, 14, 4)
    assert model.cls_token.dtype == jnp.bfloat16
    _, out = model(jnp.zeros((1, 56, 42, 3)))
    assert out["attn"][-1].shape == (1, 5 + 12, 5 + 12)


def test_load_affinity_encoder_errors(snapshots, tmp_path):
    with pytest.raises(ValueError, match="kind='dinov3'.*dino, dinov2"):
        load_affinity_encoder("dinov3", snapshots["dino"])
    with pytest.raises(WeightsError, match="holds a DINOv2.*"
                       "set model.dino_kind='dinov2'"):
        load_affinity_encoder("dino", snapshots["dinov2_reg"])
    with pytest.raises(WeightsError, match="holds a DINO ViT.*"
                       "set model.dino_kind='dino'"):
        load_affinity_encoder("dinov2", snapshots["dino"])
    # A CLIP or broken config reaches the loader's own message.
    bad = tmp_path / "clip"
    shutil.copytree(snapshots["dino"], bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(WeightsError, match="model_type='clip'"):
        load_affinity_encoder("dinov2", bad)
    with pytest.raises(WeightsError, match="not a directory"):
        load_affinity_encoder("dino", tmp_path / "nope")


# ------------------------------------------------------- patch_affinity --


def reference_affinity(attn, layout, src, dst, p2, p):
    """Pixel-level brute force of the density view: each pixel x has a
    source cell j(x) (or none past the source grid's extent) and a target
    cell i(x). A'[i, k] = mean over covered x in i of Σ over covered y in k
    of A[j(x), j(y)] / (covered pixels of j(y))."""
    (h2, w2), (h, w) = src, dst
    a = attn[:, layout.patch_start:, layout.patch_start:].astype(np.float64)
    height, width = max(h2 * p2, h * p), max(w2 * p2, w * p)
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    inside_t = (ys < h * p) & (xs < w * p)
    inside_s = (ys < h2 * p2) & (xs < w2 * p2) & inside_t
    j = np.where(inside_s, (ys // p2) * w2 + xs // p2, -1).ravel()
    i = np.where(inside_t, (ys // p) * w + xs // p, -1).ravel()
    count_j = np.bincount(j[j >= 0], minlength=h2 * w2)
    out = np.zeros((a.shape[0], h * w, h * w))
    for q in range(h * w):
        xq = j[(i == q) & (j >= 0)]  # covered pixels of target cell q
        for k in range(h * w):
            yk = j[(i == k) & (j >= 0)]
            if len(xq) == 0 or len(yk) == 0:
                continue
            dens = a[:, xq][:, :, yk] / count_j[yk]
            out[:, q, k] = dens.sum(-1).mean(-1)
    return out


@pytest.mark.parametrize("src,dst,p2,p", [
    ((4, 3), (3, 2), 3, 4),    # finer source; extents 12x9 vs 12x8
    ((2, 3), (3, 4), 5, 3),    # coarser source; 10x15 vs 9x12
    ((5, 4), (4, 4), 14, 16),  # DINOv2/14 vs CLIP/16 at 70x64 px
])
def test_patch_affinity_matches_pixel_density_reference(src, dst, p2, p):
    rng = np.random.default_rng(0)
    layout = TokenLayout(3, p2, 2)
    attn = random_attn(rng, 2, layout.num_tokens(src))
    got = np.asarray(patch_affinity(jnp.asarray(attn), layout, src, dst,
                                    target_patch=p))
    want = reference_affinity(attn, layout, src, dst, p2, p)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("regs", [0, 4])
def test_patch_affinity_identity_on_equal_grids(regs):
    rng = np.random.default_rng(1)
    layout = TokenLayout(1 + regs, 16, regs)
    attn = jnp.asarray(random_attn(rng, 2, layout.num_tokens((5, 6))))
    for patch in (None, 16):
        got = patch_affinity(attn, layout, (5, 6), (5, 6),
                             target_patch=patch)
        want = attn[:, 1 + regs:, 1 + regs:]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    if regs == 0:  # exactly what SGC uses for DINO ViT/16 today
        np.testing.assert_array_equal(np.asarray(got),
                                      np.asarray(sgc.drop_cls(attn)))


@pytest.mark.parametrize("target_patch", [None, 16])
def test_patch_affinity_conserves_row_mass(target_patch):
    rng = np.random.default_rng(2)
    layout = TokenLayout(5, 14, 4)
    src, dst = (22, 22), (20, 20)  # a 320-px crop: DINOv2/14 vs CLIP/16
    attn = random_attn(rng, 1, layout.num_tokens(src))
    a = attn[:, 5:, 5:]
    got = np.asarray(patch_affinity(jnp.asarray(attn), layout, src, dst,
                                    target_patch=target_patch))
    assert got.shape == (1, 400, 400) and got.dtype == np.float32
    assert (got >= 0).all()
    qh, qw, _, _ = encoders.resampling_matrices(layout, src, dst,
                                                target_patch)
    np.testing.assert_allclose(got.sum(-1)[0],
                               np.kron(qh, qw) @ a.sum(-1)[0], rtol=1e-5)
    # Rows that summed to 1 (prefix renormalised away) still do.
    renorm = attn.copy()
    renorm[:, :, :5] = 0
    renorm /= renorm.sum(-1, keepdims=True)
    got = np.asarray(patch_affinity(jnp.asarray(renorm), layout, src, dst,
                                    target_patch=target_patch))
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_patch_affinity_uniform_stays_uniform():
    layout = TokenLayout(1, 14)
    src, dst = (7, 9), (5, 4)
    attn = np.zeros((1, 64, 64), np.float32)
    attn[:, :, 1:] = 1 / 63
    got = np.asarray(patch_affinity(jnp.asarray(attn), layout, src, dst))
    np.testing.assert_allclose(got, 1 / 20, rtol=1e-5)


def test_patch_affinity_block_structure_survives():
    """Two regions split at image row 140 of 280 px. DINOv2/14: 20 rows,
    the split falls between rows 9 and 10. CLIP/16: 17 rows over 272 px,
    row 8 = [128, 144) straddles it. A block affinity (each patch attends
    uniformly to its own region) must stay block-structured: queries in
    clean rows put all their mass in their region, clean rows of the other
    region get exactly 0, and only the straddling row mixes."""
    layout = TokenLayout(1, 14)
    src, dst = (20, 20), (17, 17)
    region_src = np.repeat(np.arange(20) >= 10, 20)  # row-major, per patch
    same = region_src[:, None] == region_src[None, :]
    a = same / same.sum(-1, keepdims=True)
    attn = np.zeros((1, 401, 401), np.float32)
    attn[0, 1:, 1:] = a
    got = np.asarray(patch_affinity(jnp.asarray(attn), layout, src, dst,
                                    target_patch=16))[0]
    row = np.repeat(np.arange(17), 17)
    top, bottom, straddle = row < 8, row > 8, row == 8
    for q_mask, own, other in ((top, top, bottom), (bottom, bottom, top)):
        q = got[q_mask]
        np.testing.assert_allclose(q[:, own | straddle].sum(-1), 1.0,
                                   atol=1e-5)
        assert q[:, other].max() == 0.0
    # The straddling row averages DINO rows 9 (12 of its 16 px, top) and 10
    # (4 px, bottom). Top queries put nothing below pixel 140; bottom ones
    # put all but DINO row 10's [140, 144) share (1/10 · 4/14) on the clean
    # bottom rows. So its mass there is exactly 4/16 · (1 − 0.1 · 4/14).
    s = got[straddle]
    np.testing.assert_allclose(s.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(s[:, bottom].sum(-1),
                               4 / 16 * (1 - 0.1 * 4 / 14), rtol=1e-5)


def test_patch_affinity_bad_shape():
    layout = TokenLayout(5, 14, 4)
    with pytest.raises(ValueError, match=r"5 prefix tokens \+ a 3x3 patch "
                       r"grid = 14 tokens\): expected \[B, 14, 14\]"):
        patch_affinity(jnp.zeros((1, 10, 10)), layout, (3, 3), (2, 2))


def test_dinov2_affinity_feeds_sgc_fusion(snapshots):
    """End to end on the seam: a tiny DINOv2 with registers on a 64x64
    image (4x4 grid of 14 over 56 px), resampled to CLIP/16's 4x4 grid over
    64 px, fused with a CLIP affinity and propagated."""
    model, layout = load_affinity_encoder("dinov2", snapshots["dinov2_reg"])
    pixels = jnp.asarray(np.random.default_rng(3).normal(size=(2, 70, 64, 3)),
                         jnp.float32)
    _, out = model(pixels)
    src = tuple(int(g) for g in out["grid"])
    assert src == (5, 4)
    dst = (70 // 16, 64 // 16)
    aff = patch_affinity(out["attn"][-1], layout, src, dst, target_patch=16)
    n = dst[0] * dst[1]
    assert aff.shape == (2, n, n)
    clip_aff = jnp.asarray(random_attn(np.random.default_rng(4), 2, n))
    fused = sgc.fuse_affinity(clip_aff, aff, 0.4, 0.6)
    trans = sgc.transition_matrix(fused)
    cams = jnp.asarray(np.random.default_rng(5).random((2, 3, n)),
                       jnp.float32)
    refined = sgc.propagate(trans, cams)
    assert refined.shape == (2, 3, n) and bool(jnp.isfinite(refined).all())


def test_patch_affinity_under_jit(snapshots):
    """Grids are static Python ints inside jit (from out["grid"])."""
    from flax import nnx

    model, layout = load_affinity_encoder("dinov2", snapshots["dinov2"])

    @nnx.jit
    def affinity(m, pixels):
        _, out = m(pixels)
        return patch_affinity(out["attn"][-1], m.layout, out["grid"],
                              (pixels.shape[1] // 16, pixels.shape[2] // 16),
                              target_patch=16)

    pixels = jnp.asarray(np.random.default_rng(6).normal(size=(1, 64, 48, 3)),
                         jnp.float32)
    _, out = model(pixels)
    eager = patch_affinity(out["attn"][-1], layout, out["grid"], (4, 3),
                           target_patch=16)
    np.testing.assert_allclose(np.asarray(affinity(model, pixels)),
                               np.asarray(eager), atol=1e-6)


def test_dino_layers_averages_the_last_blocks(snapshots):
    """sgc.dino_layers: A_DINO = the mean of the last n blocks' affinities
    (1 = the last block's, the paper's reading); more than the encoder has
    is a clear error."""
    from ssr_jax import ssr

    model, _ = load_affinity_encoder("dino", snapshots["dino"])
    image = jnp.asarray(np.random.default_rng(6).integers(
        0, 256, (2, 64, 64, 3)), jnp.uint8)
    every = ssr.affinity_encoder_affinity(model, image, (4, 4), 16,
                                          all_blocks=True)
    depth = len(every)
    assert depth >= 2
    last = ssr.affinity_encoder_affinity(model, image, (4, 4), 16)
    np.testing.assert_array_equal(last, every[-1])
    two = ssr.affinity_encoder_affinity(model, image, (4, 4), 16, layers=2)
    np.testing.assert_allclose(two, (every[-1] + every[-2]) / 2, rtol=1e-6)
    assert not np.allclose(two, last)
    with pytest.raises(ValueError, match="sgc.dino_layers"):
        ssr.affinity_encoder_affinity(model, image, (4, 4), 16,
                                      layers=depth + 1)
    c = config_defaults.base_config()
    c.sgc.dino_layers = 0
    assert any("sgc.dino_layers" in e for e in
               config_check.validate(c, check_devices=False))
