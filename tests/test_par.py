"""par.py against a NumPy loop over neighbours, a PyTorch port of WeCLIP's
PAR (dilated one-hot conv kernels, as WeCLIP_model/PAR.py computes it) and
WeCLIP's per-image pseudo-label recipe, plus hand-built label maps.

Tolerances: PAR outputs 1e-4 relative (float32 vs float64, 20 iterations);
labels exactly, except pixels whose top-2 refined scores are within 1e-4
(float-rounding ties) in the PyTorch comparison.
"""

import functools

import jax
import jax.numpy as jnp
import jaxpr_utils
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ssr_jax import par as par_lib

DIL = (1, 2, 4, 8, 12, 24)


def _np_par(img, masks, dilations, iters, pos_weight=0.01, temp=0.3):
    """NumPy PAR: explicit loop over neighbours; replicate = clipped index.

    img [B, H, W, 3] already at the mask size; masks [B, C, H, W].
    """
    _, _, h, w = masks.shape
    yy, xx = np.mgrid[:h, :w]
    offsets = []
    for d in dilations:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    dist = d * np.sqrt(2) if dy and dx else d
                    offsets.append((dy * d, dx * d, dist))

    def shift(x, oy, ox):
        return x[..., np.clip(yy + oy, 0, h - 1), np.clip(xx + ox, 0, w - 1)]

    im = np.asarray(img, np.float64).transpose(0, 3, 1, 2)
    nbs = np.stack([shift(im, oy, ox) for oy, ox, _ in offsets], axis=2)
    std = nbs.std(axis=2, ddof=1, keepdims=True)
    logit = -((np.abs(nbs - im[:, :, None]) / (std + 1e-8) / temp) ** 2)
    logit = logit.mean(axis=1)
    e = np.exp(logit - logit.max(axis=1, keepdims=True))
    aff = e / e.sum(axis=1, keepdims=True)
    dist = np.array([o[2] for o in offsets])
    p = np.exp(-(dist / (dist.std(ddof=1) + 1e-8) / temp) ** 2)
    aff = aff + pos_weight * (p / p.sum())[None, :, None, None]
    m = np.asarray(masks, np.float64)
    for _ in range(iters):
        m = sum(aff[:, None, n] * shift(m, oy, ox)
                for n, (oy, ox, _) in enumerate(offsets))
    return m


def _torch_par(img_nchw, masks, dilations=DIL, iters=20):
    """WeCLIP PAR semantics in PyTorch: image resized (align_corners=True)
    to the mask size; neighbours by a dilated 8-tap one-hot conv kernel on a
    replicate-padded input; torch.std (unbiased); softmax over dim 2."""
    kernel = torch.zeros(8, 1, 3, 3)
    taps = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    for i, (ky, kx) in enumerate(taps):
        kernel[i, 0, ky, kx] = 1.0

    def neighbours(x):
        b, c, h, w = x.shape
        outs = []
        for d in dilations:
            p = F.pad(x, [d] * 4, mode="replicate")
            p = p.reshape(b * c, 1, p.shape[-2], p.shape[-1])
            outs.append(F.conv2d(p, kernel, dilation=d).view(b, c, -1, h, w))
        return torch.cat(outs, dim=2)

    ring = torch.ones(8)
    ring[[0, 2, 5, 7]] = float(np.sqrt(2))
    pos = torch.cat([ring * d for d in dilations]).view(1, 1, -1, 1, 1)

    imgs = F.interpolate(img_nchw, size=masks.shape[-2:], mode="bilinear",
                         align_corners=True)
    b, _, h, w = imgs.shape
    nb = neighbours(imgs)
    diff = (nb - imgs.unsqueeze(2)).abs()
    std = nb.std(dim=2, keepdim=True)
    aff = (-(diff / (std + 1e-8) / 0.3) ** 2).mean(dim=1, keepdim=True)
    pos_rep = pos.repeat(b, 1, 1, h, w)
    pos_std = pos_rep.std(dim=2, keepdim=True)
    pos_aff = -(pos_rep / (pos_std + 1e-8) / 0.3) ** 2
    aff = F.softmax(aff, dim=2) + 0.01 * F.softmax(pos_aff, dim=2)
    for _ in range(iters):
        masks = (neighbours(masks) * aff).sum(dim=2)
    return masks


def _image(seed, b, h, w):
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.normal(size=(b, h, w, 3)),
                                  (0, 1.5, 1.5, 0)) * 3
    img[:, h // 2:, : w // 2] += 2.0  # an edge PAR must respect
    return img.astype(np.float32)


def _maps(seed, b, c, h, w):
    rng = np.random.default_rng(seed)
    return rng.random((b, c, h, w)).astype(np.float32)


_par = jax.jit(par_lib.par, static_argnames=("iters", "dilations"))


def test_par_vs_numpy_loop_small():
    img, masks = _image(0, 2, 24, 24), _maps(1, 2, 3, 24, 24)
    got = _par(jnp.asarray(img), jnp.asarray(masks), iters=3,
               dilations=(1, 2))
    want = _np_par(img, masks, (1, 2), 3)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)


def test_par_vs_numpy_loop_and_torch_port_with_image_resize():
    """WeCLIP settings; the image is larger than the masks (resized with
    align_corners=True, in the NumPy reference by torch)."""
    img, masks = _image(2, 2, 40, 36), _maps(3, 2, 4, 20, 18)
    got = np.asarray(_par(jnp.asarray(img), jnp.asarray(masks), iters=20,
                          dilations=DIL))
    img_t = torch.from_numpy(img).permute(0, 3, 1, 2)
    want = _torch_par(img_t, torch.from_numpy(masks)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    small = F.interpolate(img_t, size=(20, 18), mode="bilinear",
                          align_corners=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, _np_par(small, masks, DIL, 20),
                               rtol=1e-4, atol=1e-6)


def test_par_affinity_rows_sum_to_one_plus_pos_weight():
    fn = jax.jit(par_lib.par_affinity, static_argnums=(1, 2))
    aff = fn(jnp.asarray(_image(4, 1, 16, 16)), (1, 3), 0.05)
    assert aff.shape == (1, 16, 16, 16)
    np.testing.assert_allclose(np.asarray(aff).sum(1), 1.05, rtol=1e-5)


# --- labels -------------------------------------------------------------------


def _hand_cams():
    """Image 0: slot 0 (class 4) top-left, slot 1 (class 0) top-right, slot 2
    padded but with large CAMs; image 1: one class (7) with a flat CAM."""
    cams = np.zeros((2, 3, 4, 4), np.float32)
    cams[0, 0, :2, :2] = 1.0
    cams[0, 1, :2, 2:] = 1.0
    cams[0, 2] = 5.0 + np.arange(16).reshape(4, 4)  # padded: must never win
    cams[1, 0] = 0.2  # flat: min-max gives 0 -> background everywhere
    cls_ids = np.array([[4, 0, -1], [7, -1, -1]], np.int32)
    return cams, cls_ids


def test_cams_to_labels_hand_built():
    cams, cls_ids = _hand_cams()
    scores, labels = jax.jit(par_lib.cams_to_labels, static_argnums=2)(
        jnp.asarray(cams), jnp.asarray(cls_ids), (64, 64))
    labels, scores = np.asarray(labels), np.asarray(scores)
    assert scores.shape == (2, 4, 64, 64) and labels.dtype == np.int32
    assert labels[0, 4, 4] == 5 and labels[0, 4, 60] == 1  # class id + 1
    assert labels[0, 60, 4] == 0 and labels[0, 60, 60] == 0  # background
    assert set(np.unique(labels[0])) <= {0, 1, 5}
    assert (labels[1] == 0).all()
    assert (scores[:, 3] == 0).all() and (scores[1, 2] == 0).all()


def test_cams_to_labels_vs_numpy():
    rng = np.random.default_rng(5)
    cams = rng.random((2, 3, 4, 4)).astype(np.float32) * 3
    cls_ids = np.array([[2, 9, -1], [5, -1, -1]], np.int32)
    scores, labels = par_lib.cams_to_labels(jnp.asarray(cams),
                                            jnp.asarray(cls_ids), (32, 32),
                                            bg_power=2.0)
    x = cams - cams.min((2, 3), keepdims=True)
    x = x / (1e-7 + x.max((2, 3), keepdims=True))
    x = F.interpolate(torch.from_numpy(x), size=(32, 32), mode="bilinear",
                      align_corners=False).numpy()
    x[cls_ids < 0] = 0
    bg = (1 - x.max(1, keepdims=True)) ** 2.0
    want = np.concatenate([bg, x], 1)
    np.testing.assert_allclose(np.asarray(scores), want, atol=1e-6)
    ids = np.concatenate([np.zeros((2, 1)), np.where(cls_ids >= 0,
                                                     cls_ids + 1, 0)], 1)
    masked = np.where(np.concatenate([np.ones((2, 1), bool), cls_ids >= 0],
                                     1)[:, :, None, None], want, -np.inf)
    want_labels = np.take_along_axis(ids[:, :, None, None],
                                     masked.argmax(1)[:, None], 1)[:, 0]
    np.testing.assert_array_equal(np.asarray(labels), want_labels)


_pseudo = jax.jit(par_lib.pseudo_labels,
                  static_argnames=("iters", "dilations", "ignore_index"))


def test_pseudo_labels_hand_built():
    cams, cls_ids = _hand_cams()
    img = np.zeros((2, 64, 64, 3), np.float32)  # flat image: PAR only blurs
    valid = np.ones((2, 64, 64), bool)
    valid[0, :, 56:] = False
    valid[1, 60:] = False
    labels = np.asarray(_pseudo(jnp.asarray(cams), jnp.asarray(cls_ids),
                                jnp.asarray(img), jnp.asarray(valid),
                                iters=3, dilations=(1, 2)))
    assert labels.dtype == np.int32
    assert labels[0, 4, 4] == 5 and labels[0, 4, 44] == 1
    assert labels[0, 60, 4] == 0
    assert (labels[0, :, 56:] == 255).all() and (labels[1, 60:] == 255).all()
    assert set(np.unique(labels[0])) <= {0, 1, 5, 255}
    assert (labels[1, :60] == 0).all()


def _weclip_labels(cams, keys, img_nchw):
    """WeCLIP's forward for one image with only its present classes."""
    x = cams - cams.min(axis=(1, 2), keepdims=True)
    x = x / (1e-7 + x.max(axis=(1, 2), keepdims=True))
    h, w = img_nchw.shape[-2:]
    up = F.interpolate(torch.from_numpy(x)[None], size=(h, w),
                       mode="bilinear", align_corners=False)[0]
    bg = (1 - up.max(dim=0, keepdim=True)[0]) ** 1
    refined = _torch_par(img_nchw[None], torch.cat([bg, up])[None])[0]
    valid_key = np.array([0] + [k + 1 for k in keys])
    top2 = torch.topk(refined, 2, dim=0).values
    return valid_key[refined.argmax(0).numpy()], (top2[0] - top2[1]).numpy()


def test_pseudo_labels_match_weclip_recipe():
    rng = np.random.default_rng(6)
    cams = ndimage.gaussian_filter(rng.random((2, 3, 4, 4)),
                                   (0, 0, 0.8, 0.8)).astype(np.float32)
    cls_ids = np.array([[3, 11, -1], [19, -1, -1]], np.int32)
    img = _image(7, 2, 64, 64)
    valid = np.ones((2, 64, 64), bool)
    valid[1, :, 50:] = False
    got = np.asarray(_pseudo(jnp.asarray(cams), jnp.asarray(cls_ids),
                             jnp.asarray(img), jnp.asarray(valid),
                             iters=20, dilations=DIL))
    for b in range(2):
        n = int((cls_ids[b] >= 0).sum())
        want, margin = _weclip_labels(
            cams[b, :n], cls_ids[b, :n].tolist(),
            torch.from_numpy(img[b]).permute(2, 0, 1))
        want = np.where(valid[b], want, 255)
        sure = margin > 1e-4
        np.testing.assert_array_equal(got[b][sure], want[sure])
        assert sure.mean() > 0.99
    assert len(np.unique(got[0])) >= 3  # a non-trivial map


def test_pseudo_labels_takes_par_params_from_config():
    from ssr_jax import config_defaults, params

    cfg = config_defaults.base_config()
    cfg.par.iters = 2
    cfg.par.dilations = [1, 2]
    cfg.par.bg_power = 2.0
    knobs = params.method_params(cfg).par.knobs()
    assert knobs == {"iters": 2, "dilations": (1, 2), "pos_weight": 0.01,
                     "temperature": 0.3, "bg_power": 2.0}
    cams, cls_ids = _hand_cams()
    img = jnp.zeros((2, 64, 64, 3))
    valid = jnp.ones((2, 64, 64), bool)
    fn = jax.jit(functools.partial(par_lib.pseudo_labels, **knobs))
    labels = fn(jnp.asarray(cams), jnp.asarray(cls_ids), img, valid)
    assert labels.shape == (2, 64, 64)




def test_pseudo_labels_jaxpr_does_not_grow_with_classes():
    def count(k):
        return jaxpr_utils.traced_eqns(
            functools.partial(par_lib.pseudo_labels, iters=20),
            jnp.zeros((2, k, 4, 4)), jnp.zeros((2, k), jnp.int32),
            jnp.zeros((2, 64, 64, 3)), jnp.ones((2, 64, 64), bool))

    assert count(6) == count(12)


def test_finite_and_background_with_zero_cams():
    cams = jnp.zeros((2, 3, 4, 4))
    cls_ids = jnp.array([[1, 2, -1], [-1, -1, -1]], jnp.int32)
    img = jnp.asarray(_image(8, 2, 64, 64))
    valid = jnp.ones((2, 64, 64), bool)
    scores, labels = par_lib.cams_to_labels(cams, cls_ids, (64, 64))
    assert np.isfinite(np.asarray(scores)).all()
    assert (np.asarray(labels) == 0).all()
    refined = _par(img, scores, iters=3, dilations=(1, 2))
    assert np.isfinite(np.asarray(refined)).all()
    out = _pseudo(cams, cls_ids, img, valid, iters=20, dilations=DIL)
    assert (np.asarray(out) == 0).all()
