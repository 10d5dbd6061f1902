"""ssr_jax.losses against PyTorch, NumPy loops and WeCLIP's definitions."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from ssr_jax import losses

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _labels(rng, shape, num_classes, p_ignore=0.15, p_bg=0.4):
    lab = rng.integers(1, num_classes, size=shape)
    lab[rng.random(shape) < p_bg] = 0
    lab[rng.random(shape) < p_ignore] = 255
    return lab.astype(np.int32)


def _torch_seg_ce(logits, labels):
    """WeCLIP `get_seg_loss` with F.cross_entropy(ignore_index=255)."""
    pred = torch.tensor(logits).permute(0, 3, 1, 2)
    lab = torch.tensor(labels).long()
    bg = lab.clone()
    bg[lab != 0] = 255
    fg = lab.clone()
    fg[lab == 0] = 255
    return 0.5 * (F.cross_entropy(pred, bg, ignore_index=255)
                  + F.cross_entropy(pred, fg, ignore_index=255))


def _numpy_seg_ce(logits, labels):
    sums, counts = [0.0, 0.0], [0, 0]
    for idx in np.ndindex(labels.shape):
        y = labels[idx]
        if y == 255:
            continue
        z = logits[idx].astype(np.float64)
        nll = math.log(np.exp(z - z.max()).sum()) + z.max() - z[y]
        k = 0 if y == 0 else 1
        sums[k] += nll
        counts[k] += 1
    return 0.5 * sum(s / (c + 1e-6) for s, c in zip(sums, counts,
                                                     strict=True))


def test_balanced_ce_matches_torch_and_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(2, 6, 7, 5)).astype(np.float32)
    labels = _labels(rng, (2, 6, 7), 5)
    got = float(jax.jit(losses.balanced_seg_ce)(logits, labels))
    want_torch = float(_torch_seg_ce(logits, labels))
    np.testing.assert_allclose(got, want_torch, rtol=1e-5)
    np.testing.assert_allclose(got, _numpy_seg_ce(logits, labels),
                               rtol=1e-5)
    # Gradient against torch autograd too.
    grad = jax.grad(losses.balanced_seg_ce)(jnp.asarray(logits), labels)
    t = torch.tensor(logits, requires_grad=True)
    pred = t.permute(0, 3, 1, 2)
    lab = torch.tensor(labels).long()
    bg = torch.where(lab != 0, 255, lab)
    fg = torch.where(lab == 0, 255, lab)
    (0.5 * (F.cross_entropy(pred, bg, ignore_index=255)
            + F.cross_entropy(pred, fg, ignore_index=255))).backward()
    np.testing.assert_allclose(grad, t.grad.numpy(), atol=1e-6)


@pytest.mark.parametrize("case", ["no_foreground", "no_background",
                                  "all_ignored"])
def test_balanced_ce_safe_when_a_half_is_empty(case):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
    labels = {
        "no_foreground": np.where(rng.random((2, 4, 4)) < 0.3, 255, 0),
        "no_background": rng.integers(1, 3, (2, 4, 4)),
        "all_ignored": np.full((2, 4, 4), 255),
    }[case].astype(np.int32)
    loss, grad = jax.value_and_grad(losses.balanced_seg_ce)(logits, labels)
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(float(loss), _numpy_seg_ce(
        np.asarray(logits), labels), rtol=1e-5, atol=1e-7)
    if case == "all_ignored":
        assert float(loss) == 0.0 and not np.any(np.asarray(grad))
    else:
        # The kept half alone, at half weight (PyTorch gives NaN here).
        assert math.isnan(float(_torch_seg_ce(np.asarray(logits), labels)))


def test_balanced_ce_ignores_out_of_range_labels():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 3, 3, 4)).astype(np.float32)
    labels = _labels(rng, (1, 3, 3), 4, p_ignore=0.0)
    bad = labels.copy()
    bad[0, 0, 0] = 7
    ref = labels.copy()
    ref[0, 0, 0] = 255
    np.testing.assert_allclose(losses.balanced_seg_ce(logits, bad),
                               losses.balanced_seg_ce(logits, ref))


def _weclip_radius_mask(h, w, radius):
    """WeCLIP `get_mask_by_radius`, as a loop."""
    mask = np.zeros((h * w, h * w))
    for i in range(h * w):
        y, x = divmod(i, w)
        for yy in range(max(0, y - radius), min(h, y + radius + 1)):
            for xx in range(max(0, x - radius), min(w, x + radius + 1)):
                mask[i, yy * w + xx] = mask[yy * w + xx, i] = 1
    return mask


@pytest.mark.parametrize("h,w,r", [(4, 5, 2), (20, 20, 8), (3, 3, 0)])
def test_radius_mask_matches_weclip(h, w, r):
    np.testing.assert_array_equal(losses.radius_mask(h, w, r),
                                  _weclip_radius_mask(h, w, r) == 1)


def _loop_affinity_loss(aff, labels, grid, radius, stride):
    h, w = grid
    pos_sum = neg_sum = 0.0
    pos_n = neg_n = 0
    for b in range(labels.shape[0]):
        small = labels[b, ::stride, ::stride]
        for i in range(h * w):
            for j in range(h * w):
                yi, xi = divmod(i, w)
                yj, xj = divmod(j, w)
                li, lj = small[yi, xi], small[yj, xj]
                if max(abs(yi - yj), abs(xi - xj)) > radius:
                    continue
                if li == 255 or lj == 255:
                    continue
                if li == lj:
                    pos_sum += 1 - aff[b, i, j]
                    pos_n += 1
                else:
                    neg_sum += aff[b, i, j]
                    neg_n += 1
    return 0.5 * pos_sum / (pos_n + 1) + 0.5 * neg_sum / (neg_n + 1)


def test_affinity_loss_matches_pair_loop():
    rng = np.random.default_rng(3)
    grid, stride, radius = (4, 5), 4, 2
    labels = _labels(rng, (2, 16, 20), 4, p_ignore=0.1)
    aff = 1 / (1 + np.exp(-rng.normal(size=(2, 20, 20))))
    fn = jax.jit(functools.partial(losses.affinity_loss, grid=grid,
                                   radius=radius))
    got = float(fn(jnp.asarray(aff, jnp.float32), labels))
    want = _loop_affinity_loss(aff, labels, grid, radius, stride)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Gradient: -0.5/(P+1) on positive pairs, 0.5/(N+1) on negative ones.
    g = jax.grad(losses.affinity_loss)(jnp.asarray(aff, jnp.float32),
                                       labels, grid, radius)
    pos, neg = losses.affinity_labels(labels, grid, radius)
    pos, neg = np.asarray(pos), np.asarray(neg)
    want_g = (-0.5 * pos / (pos.sum() + 1) + 0.5 * neg / (neg.sum() + 1))
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-9)


def test_affinity_downsampling_is_torch_nearest():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 50, size=(2, 17, 23)).astype(np.int32)
    grid = (4, 5)
    pos, _ = losses.affinity_labels(labels, grid, radius=10,
                                    ignore_index=-1)
    small = F.interpolate(torch.tensor(labels)[:, None].float(), size=grid,
                          mode="nearest")[:, 0].long().numpy()
    small = small.reshape(2, -1)
    np.testing.assert_array_equal(
        pos, small[:, :, None] == small[:, None, :])


def test_affinity_loss_shape_error():
    with pytest.raises(ValueError, match=r"\[B, 20, 20\]"):
        losses.affinity_loss(jnp.zeros((1, 12, 12)),
                             jnp.zeros((1, 16, 20), jnp.int32), (4, 5))


def test_total_loss():
    parts = {"proto": jnp.float32(2.0), "seg": jnp.float32(3.0),
             "aff": jnp.float32(5.0)}
    w = losses.LossWeights(proto_weight=1.0, seg_weight=0.1, aff_weight=0.5)
    np.testing.assert_allclose(losses.total_loss(parts, w),
                               2.0 + 0.3 + 2.5, rtol=1e-6)
    weights = losses.LossWeights(proto_weight=0.0, seg_weight=1.0,
                                 aff_weight=0.1)
    np.testing.assert_allclose(
        losses.total_loss({"seg": 3.0, "aff": 5.0}, weights), 3.5,
        rtol=1e-6)
    # A zero-weighted NaN term is skipped, not multiplied.
    nan_proto = dict(parts, proto=jnp.float32(np.nan))
    assert np.isfinite(float(losses.total_loss(nan_proto, weights)))
    with pytest.raises(KeyError, match="'aff' is missing"):
        losses.total_loss({"seg": 1.0}, weights)
    with pytest.raises(KeyError, match="unknown loss parts"):
        losses.total_loss({"seg": 1.0, "aff": 1.0, "cls": 1.0}, weights)
    # A ConfigDict or a dict is refused with the way to build the weights.
    cfg = config_dict.ConfigDict(
        {"proto_weight": 1.0, "seg_weight": 0.1, "aff_weight": 0.5})
    for bad in (cfg, cfg.to_dict()):
        with pytest.raises(TypeError, match="method_params"):
            losses.total_loss(parts, bad)


def test_loss_weights_from_config():
    from ssr_jax import config_defaults, params

    c = config_defaults.base_config()
    c.loss.aff_weight = 0.25
    assert params.method_params(c).loss == losses.LossWeights(
        proto_weight=c.loss.proto_weight, seg_weight=c.loss.seg_weight,
        aff_weight=0.25)
