"""models/resize against torch.nn.functional.interpolate."""

import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax.models.resize import overlap_matrix, resize

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("out_hw", [(20, 16), (7, 9), (14, 14), (32, 3)])
@pytest.mark.parametrize("method,align", [("bilinear", False),
                                          ("bilinear", True),
                                          ("bicubic", False),
                                          ("nearest", False)])
def test_resize_parity_with_torch(out_hw, method, align):
    x = np.random.default_rng(0).random((2, 14, 14, 5)).astype(np.float32)
    kw = {} if method == "nearest" else {"align_corners": align}
    want = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=out_hw,
                         mode=method, **kw).permute(0, 2, 3, 1).numpy()
    got = np.asarray(resize(jnp.asarray(x), out_hw, method, align))
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_resize_channel_first_axes():
    x = np.random.default_rng(1).random((2, 3, 10, 8)).astype(np.float32)
    want = F.interpolate(torch.tensor(x), size=(20, 16), mode="bilinear",
                         align_corners=False).numpy()
    got = resize(jnp.asarray(x), (20, 16), axes=(-2, -1))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


@pytest.mark.parametrize("out_hw", [(20, 16), (7, 9), (14, 14), (32, 3),
                                    (37, 5)])
@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_resize_antialias_parity_with_torch(out_hw, method):
    """PyTorch's separable anti-aliased kernels, up- and downsampling (HF
    DINOv2-with-registers resizes its positions with bicubic + antialias)."""
    x = np.random.default_rng(2).normal(size=(2, 14, 11, 5))
    x = x.astype(np.float32)
    want = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=out_hw,
                         mode=method, align_corners=False,
                         antialias=True).permute(0, 2, 3, 1).numpy()
    got = np.asarray(resize(jnp.asarray(x), out_hw, method, antialias=True))
    # PyTorch's AA kernel is itself ~3e-6 off a float64 evaluation of the
    # same weights on these N(0, 1) inputs (ours: < 4e-7).
    np.testing.assert_allclose(got, want, atol=5e-6)


def test_resize_antialias_rejects_unsupported():
    x = jnp.zeros((1, 4, 4, 1))
    for kw in ({"method": "nearest"}, {"align_corners": True}):
        with pytest.raises(ValueError, match="antialias=True needs"):
            resize(x, (3, 3), antialias=True, **kw)


def test_overlap_matrix():
    # Equal tilings: identity. Rows sum to 1 (average of the input).
    np.testing.assert_array_equal(overlap_matrix(5, 14, 5, 14), np.eye(5))
    m = overlap_matrix(22, 14.0, 20, 16.0)  # 308 px of DINOv2/14 vs CLIP/16
    assert m.shape == (20, 22)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
    # CLIP cell 0 = [0, 16): 14/16 of DINO cell 0, 2/16 of cell 1.
    np.testing.assert_allclose(m[0, :3], [14 / 16, 2 / 16, 0], atol=1e-7)
    # The last CLIP cell [304, 320) is covered only on [304, 308).
    np.testing.assert_allclose(m[-1, -1], 1.0)
    # Mass transfer (the other direction): shares of each input cell.
    t = overlap_matrix(20, 16.0, 22, 14.0)
    np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
    # An output cell outside every input cell gets a zero row.
    assert overlap_matrix(2, 1.0, 3, 1.0)[2].sum() == 0.0
    with pytest.raises(ValueError, match="positive"):
        overlap_matrix(0, 1.0, 3, 1.0)
