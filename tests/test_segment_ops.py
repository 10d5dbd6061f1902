"""segment_ops: both implementations against a NumPy loop, and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax import segment_ops


def _reference(values, ids, num_segments, op):
    b = values.shape[0]
    out = np.zeros((b, num_segments) + values.shape[2:], np.float64)
    for i in range(b):
        for s in range(num_segments):
            sel = values[i][ids[i] == s]
            if op == "count":
                out[i, s] = len(sel)
            elif len(sel) == 0:
                out[i, s] = 0
            elif op == "sum":
                out[i, s] = sel.sum(0)
            elif op == "mean":
                out[i, s] = sel.mean(0)
            else:
                out[i, s] = sel.max(0)
    return out


@pytest.mark.parametrize("op", segment_ops.OPS)
@pytest.mark.parametrize("impl", segment_ops.IMPLS)
@pytest.mark.parametrize("feature_shape", [(), (3,)])
def test_matches_numpy_loop(op, impl, feature_shape):
    rng = np.random.default_rng(0)
    s = 7
    values = rng.normal(size=(3, 50) + feature_shape).astype(np.float32)
    # ids include padding (-1), an out-of-range id (s + 2) and empty segments
    ids = rng.integers(-1, s - 2, size=(3, 50)).astype(np.int32)
    ids[0, :5] = s + 2
    got = segment_ops.segment_reduce(jnp.asarray(values), jnp.asarray(ids),
                                     s, op, impl)
    if op == "count":
        assert got.shape == (3, s)
    want = _reference(values, ids, s, op)
    if op == "count":
        want = want.reshape(3, s, -1)[..., 0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_impls_agree_under_jit_and_grad(op):
    rng = np.random.default_rng(1)
    values = jnp.asarray(rng.normal(size=(2, 64, 4)).astype(np.float32))
    ids = jnp.asarray(rng.integers(-1, 10, size=(2, 64)).astype(np.int32))

    def f(impl):
        fn = jax.jit(lambda v: segment_ops.segment_reduce(v, ids, 12, op,
                                                          impl).sum())
        return fn(values), jax.grad(fn)(values)

    (a, ga), (b, gb) = f("segment"), f("onehot")
    np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(ga)).all()


def test_gather_segments_roundtrip_and_padding():
    ids = jnp.array([[0, 0, 1, -1, 3, 3]], jnp.int32)
    v = jnp.array([[1.0, 3.0, 5.0, 100.0, 2.0, 4.0]])
    mean = segment_ops.segment_reduce(v, ids, 4, "mean")
    back = segment_ops.gather_segments(mean, ids)
    np.testing.assert_allclose(back, [[2.0, 2.0, 5.0, 0.0, 3.0, 3.0]])


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="op="):
        segment_ops.segment_reduce(jnp.zeros((1, 2)), jnp.zeros((1, 2), int),
                                   2, "median")
    with pytest.raises(ValueError, match="impl="):
        segment_ops.segment_reduce(jnp.zeros((1, 2)), jnp.zeros((1, 2), int),
                                   2, "sum", "scatter")
