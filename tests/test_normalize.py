"""ssr_jax/models/normalize.py: pixel statistics and L2 normalisation."""

import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax.models import normalize


def test_normalise_statistics_and_bad_kind():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(1, 2, 3, 3) * 13
    for kind, mean, std in (("imagenet", (0.485, 0.456, 0.406),
                             (0.229, 0.224, 0.225)),
                            ("clip", (0.48145466, 0.4578275, 0.40821073),
                             (0.26862954, 0.26130258, 0.27577711))):
        want = (img / 255.0 - np.array(mean)) / np.array(std)
        got = normalize.normalise(jnp.asarray(img), kind)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="choose one of"):
        normalize.normalise(jnp.asarray(img), "openai")


def test_l2_normalize_unit_rows_and_zero_vector():
    x = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(normalize.l2_normalize(x)),
                               [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(normalize.l2_normalize(x, axis=0)),
        [[1.0, 1.0], [0.0, 0.0]], atol=1e-7)
