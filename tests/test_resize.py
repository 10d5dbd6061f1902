"""models/resize against torch.nn.functional.interpolate."""

import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax.models.resize import resize

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
