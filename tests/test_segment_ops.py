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
    # The value is a sum of 2·12·4 = 96 per-segment results, each a
    # reduction of up to `longest` values: recursive float32 summation errs
    # by at most (terms + longest)·eps·Σ|terms| (Higham, ch. 4), for each
    # impl, so the two differ by at most twice that. Relative to the value
    # it is useless here: for "mean" the total is -0.04 while Σ|terms| is
    # 24 (condition ~600), so rtol 1e-5 failed on one CPU (rel 1.8e-5,
    # 7e-7 absolute; the bound is 3e-4 per impl, and a wrong segment
    # moves the value by ~0.1). Both are also checked against float64.
    v64 = np.asarray(values, np.float64)
    ids_np = np.asarray(ids)
    terms = []
    for i in range(ids_np.shape[0]):
        for seg in range(12):
            rows = v64[i][ids_np[i] == seg]
            if len(rows):
                terms.append({"sum": rows.sum(0), "mean": rows.mean(0),
                              "max": rows.max(0)}[op])
    terms = np.concatenate(terms)
    longest = int(np.bincount(ids_np[ids_np >= 0]).max())
    eps = np.finfo(np.float32).eps
    bound = (terms.size + longest) * eps * np.abs(terms).sum()
    for got in (a, b):
        assert abs(float(got) - terms.sum()) <= bound, (got, terms.sum())
    assert abs(float(a) - float(b)) <= 2 * bound
    # Gradients: d/dv of Σ means is 1/count (sum: 1; max: 0 or 1) per
    # element, one rounding each: exact to a few eps.
    np.testing.assert_allclose(ga, gb, rtol=1e-6, atol=1e-7)
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
