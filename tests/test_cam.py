"""cam: vectorised GradCAM against a per-image, per-class jax.grad loop.

A toy pre-LN CLIP block (LayerNorm, 2-head attention, QuickGELU MLP, random
weights) in plain jnp stands in for block 12 with the interface of
docs/DESIGN.md. The reference below is the CLIP-ES recipe written the slow,
obvious way: for each image and each present class, the text matrix is
[that image's present fg texts; bg texts] (no padding, no masking), one
`jax.grad` of the class's softmax probability, and NumPy for the weights,
ReLU and the twice-applied `scale_cam_image`. Tolerances: atol 1e-10 in
float64 (the algorithm); atol 1e-4 in float32, where the min-max scaling
amplifies rounding in maps whose Σ w·a nearly cancels (1.2e-5 seen).
"""

import functools

import jax
import jax.numpy as jnp
import jaxpr_utils
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ssr_jax import cam, cmpa

D, HEADS, E = 16, 2, 8
GRID = (3, 4)
T = 1 + GRID[0] * GRID[1]
C, M = 5, 3
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _layer_norm(x, g, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * g + b


class ToyClip:
    """Block 12 + ln_post/projection with the DESIGN.md callables."""

    def __init__(self, seed=0, dtype=jnp.float32):
        r = np.random.default_rng(seed)

        def w(*s, scale=0.3):
            return jnp.asarray(r.normal(size=s, scale=scale), dtype)

        self.ln1 = (1 + w(D, scale=0.1), w(D, scale=0.1))
        self.ln2 = (1 + w(D, scale=0.1), w(D, scale=0.1))
        self.qkv, self.out = w(D, 3 * D), w(D, D)
        self.fc1, self.fc2 = w(D, 4 * D), w(4 * D, D, scale=0.15)
        self.lnp = (1 + w(D, scale=0.1), w(D, scale=0.1))
        self.proj = w(D, E)

    def ln1_fn(self, x):
        return _layer_norm(x, *self.ln1)

    def block_fn(self, x, h):
        b, t, _ = h.shape
        q, k, v = jnp.split(h @ self.qkv, 3, axis=-1)

        def heads(z):
            return z.reshape(b, t, HEADS, D // HEADS).transpose(0, 2, 1, 3)

        q, k, v = heads(q), heads(k), heads(v)
        logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // HEADS)
        attn = jax.nn.softmax(logits, -1)
        o = (attn @ v).transpose(0, 2, 1, 3).reshape(b, t, D)
        x = x + o @ self.out
        z = _layer_norm(x, *self.ln2) @ self.fc1
        x = x + (z * jax.nn.sigmoid(1.702 * z)) @ self.fc2
        return x, attn.mean(1)

    def project_fn(self, y):
        return _layer_norm(y, *self.lnp) @ self.proj


def _inputs(seed=0, b=2, k=4, dtype=jnp.float32):
    r = np.random.default_rng(seed + 100)
    x11 = jnp.asarray(r.normal(size=(b, T, D)), dtype)
    # near-parallel texts keep the scale-100 softmax away from saturation
    base = r.normal(size=(1, E))
    text_fg = jnp.asarray(base + 0.1 * r.normal(size=(C, E)), dtype)
    text_bg = jnp.asarray(base + 0.1 * r.normal(size=(M, E)), dtype)
    labels = np.zeros((b, C), np.float32)
    labels[0, [1, 3]] = 1
    labels[1, [0, 2, 3, 4]] = 1
    cls_ids = cam.present_classes(jnp.asarray(labels), k)
    return x11, text_fg, text_bg, labels, cls_ids


def _np_scale(x):
    x = x - x.min()
    return x / (1e-7 + x.max())


def _reference(model, x11, text_fg, text_bg, labels, target, k,
               heads=None):
    """Per image, per present class: jax.grad + NumPy GradCAM."""
    b = x11.shape[0]
    out = np.zeros((b, k) + GRID)
    for i in range(b):
        present = [c for c in range(C) if labels[i, c] > 0.5][:k]
        texts = jnp.concatenate([text_fg[np.array(present)], text_bg])
        if heads is not None:
            texts = heads[1](texts)
        texts = texts / jnp.linalg.norm(texts, axis=-1, keepdims=True)
        x = x11[i:i + 1]

        def prob(a, slot, x=x, texts=texts):
            if target == "ln1_output":
                y, _ = model.block_fn(x, a)
            else:
                y, _ = model.block_fn(a, model.ln1_fn(a))
            patches = model.project_fn(y)[:, 1:]
            if heads is not None:  # ISA per token, then the mean
                patches = heads[0](patches)
            v = patches.mean(1)
            v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
            logits = 100.0 * jnp.dot(v, texts.T,
                                     precision=jax.lax.Precision.HIGHEST)
            return jax.nn.softmax(logits, -1)[0, slot]

        grad = jax.jit(jax.grad(prob), compiler_options=FAST_COMPILE)
        a = model.ln1_fn(x) if target == "ln1_output" else x
        acts = np.asarray(a[0, 1:], np.float64)
        for slot in range(len(present)):
            g = np.asarray(grad(a, slot)[0, 1:], np.float64)
            w = g.mean(0)
            m = np.maximum((acts * w).sum(-1), 0).reshape(GRID)
            out[i, slot] = _np_scale(_np_scale(m))
    return out


def _run(model, x11, text_fg, text_bg, cls_ids, target, heads=None,
         slot_chunk=None):
    return cam.initial_cams(model.ln1_fn, model.block_fn, model.project_fn,
                            x11, text_fg, text_bg, cls_ids, GRID,
                            target=target, heads=heads, slot_chunk=slot_chunk)


# One compiled program per (model, target, shapes), shared by the tests:
# compiling dominates their run time (LLVM at -O0 halves it).
_jit_run = jax.jit(_run, static_argnames=("model", "target", "heads",
                                          "slot_chunk"),
                   compiler_options=FAST_COMPILE)


@functools.cache
def model32():
    return ToyClip()


@pytest.fixture(scope="module")
def float64_cams():
    """Vectorised and reference CAMs in float64, for both targets."""
    out = {}
    with jax.enable_x64(True):
        model = ToyClip(dtype=jnp.float64)
        x11, text_fg, text_bg, labels, cls_ids = _inputs(dtype=jnp.float64)
        y, attn = model.block_fn(x11, model.ln1_fn(x11))
        expected_aux = {"y12": y, "attn12": attn,
                        "tokens": model.project_fn(y)}
        for target in cam.TARGETS:
            got, aux = _jit_run(model, x11, text_fg, text_bg, cls_ids,
                                target)
            want = _reference(model, x11, text_fg, text_bg, labels, target,
                              4)
            out[target] = (np.asarray(got), want,
                           jax.tree.map(np.asarray, aux))
    return out, jax.tree.map(np.asarray, expected_aux), np.asarray(cls_ids)


def test_present_classes_matches_loop():
    r = np.random.default_rng(1)
    labels = (r.random((6, 9)) < 0.4).astype(np.float32)
    labels[0] = 0
    labels[1] = 1  # 9 present, more than kmax
    for kmax in (3, 12):
        got = np.asarray(jax.jit(cam.present_classes, static_argnums=1)(
            jnp.asarray(labels), kmax))
        assert got.dtype == np.int32 and got.shape == (6, kmax)
        for i in range(6):
            ids = list(np.flatnonzero(labels[i] > 0.5))[:kmax]
            assert list(got[i]) == ids + [-1] * (kmax - len(ids))
    with pytest.warns(UserWarning, match="more than 3 classes"):
        assert cam.check_max_classes(labels, 3) >= 1


def test_slot_buckets_and_choice():
    """Bucket normalisation and the host-side choice (issue 15)."""
    assert cam.slot_buckets((1, 2, 3, 6), 6) == (1, 2, 3, 6)
    assert cam.slot_buckets((6, 2, 2, 1, 3), 6) == (1, 2, 3, 6)
    assert cam.slot_buckets((1, 2, 3, 6), 18) == (1, 2, 3, 6, 18)  # COCO
    assert cam.slot_buckets((1, 2, 3, 6), 4) == (1, 2, 3, 4)
    assert cam.slot_buckets((), 6) == (6,)  # the always-kmax path
    with pytest.raises(ValueError, match="positive integer"):
        cam.slot_buckets((0, 2), 6)
    buckets = (1, 2, 3, 6)
    want = {0: 1, 1: 1, 2: 2, 3: 3, 4: 6, 5: 6, 6: 6, 9: 6}
    for count, slots in want.items():
        assert cam.choose_slots(count, buckets) == slots, count
    labels = np.zeros((4, 20), np.float32)
    assert cam.max_class_count(labels) == 0
    assert cam.batch_slots(labels, buckets) == 1
    labels[0, [3]] = 1
    labels[2, [1, 5, 7]] = 1
    assert cam.max_class_count(labels) == 3
    assert cam.batch_slots(labels, buckets) == 3
    labels[3, :4] = 1
    assert cam.batch_slots(labels, buckets) == 6
    assert cam.batch_slots(labels, (6,)) == 6


@pytest.mark.parametrize("target", cam.TARGETS)
def test_bucket_cams_equal_the_kmax_cams(target):
    """K slots >= every image's class count give the first K slots of the
    kmax-padded CAMs: the padded slots are −inf in the softmax (probability
    exactly 0) and their cotangents are separate vmap lanes, so the
    arithmetic is the same. Not bitwise: XLA blocks the vmapped backward's
    matmuls by the number of lanes, so sums run in another order (1.8e-15
    seen in float64); atol 1e-12 is rounding, a change of method is O(1)."""
    with jax.enable_x64(True):
        model = ToyClip(dtype=jnp.float64)
        x11, text_fg, text_bg, labels, _ = _inputs(dtype=jnp.float64)
        out = {}
        for k in (4, 6):  # image 1 has 4 classes
            cls_ids = cam.present_classes(jnp.asarray(labels), k)
            out[k] = np.asarray(_jit_run(model, x11, text_fg, text_bg,
                                         cls_ids, target)[0])
    assert np.abs(out[6][:, 4:]).max() == 0
    np.testing.assert_allclose(out[4], out[6][:, :4], rtol=0, atol=1e-12)


def test_slot_chunks_agree():
    """The backward one slot at a time (`lax.map`, the CPU default), in
    chunks of 3 (vmap inside, map over chunks, a ragged last chunk) and all
    4 at once (vmap, the accelerator default): the same CAMs in float64 up
    to rounding (XLA sums in another blocking), and the reference holds for
    each (test_vectorised_matches_per_class_loop checks the default)."""
    assert cam.default_slot_chunk(4) == 1  # tests run on CPU
    with jax.enable_x64(True):
        model = ToyClip(dtype=jnp.float64)
        x11, text_fg, text_bg, _, cls_ids = _inputs(dtype=jnp.float64)
        out = {c: np.asarray(_jit_run(model, x11, text_fg, text_bg, cls_ids,
                                      "ln1_output", slot_chunk=c)[0])
               for c in (1, 3, 4)}
    np.testing.assert_allclose(out[3], out[1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out[4], out[1], rtol=0, atol=1e-12)
    assert out[1].max() > 0.99


@pytest.mark.parametrize("target", cam.TARGETS)
def test_vectorised_matches_per_class_loop(float64_cams, target):
    results, expected_aux, cls_ids = float64_cams
    got, want, aux = results[target]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-10)
    # the maps are not trivial: each valid slot spans [0, 1]
    np.testing.assert_allclose(got.max((2, 3))[cls_ids >= 0], 1.0,
                               atol=1e-6)
    for name, value in expected_aux.items():
        np.testing.assert_allclose(aux[name], value, atol=1e-12)
    if target == "ln1_output":  # float32, as trained
        x11, text_fg, text_bg, _, cls32 = _inputs()
        got32, _ = _jit_run(model32(), x11, text_fg, text_bg, cls32, target)
        assert got32.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got32), want, atol=1e-4)


def test_targets_differ(float64_cams):
    results = float64_cams[0]
    a, b = results["ln1_output"][0], results["ln1_input"][0]
    assert np.abs(a - b).max() > 1e-2
    x11, text_fg, text_bg, _, cls_ids = _inputs()
    with pytest.raises(ValueError, match="cam.target"):
        _run(model32(), x11, text_fg, text_bg, cls_ids, "block_output")


def test_padding_and_absent_classes():
    x11, text_fg, text_bg, _, cls_ids = _inputs()
    cams, _ = _jit_run(model32(), x11, text_fg, text_bg, cls_ids,
                       "ln1_output")
    cams = np.asarray(cams)
    pad = np.asarray(cls_ids) < 0
    assert pad.any() and np.all(cams[pad] == 0)
    # class 1 is absent from image 1: its text must not matter there
    changed = text_fg.at[1].set(5.0 * text_fg[0] + 1.0)
    cams2 = np.asarray(
        _jit_run(model32(), x11, changed, text_bg, cls_ids, "ln1_output")[0])
    np.testing.assert_allclose(cams2[1:], cams[1:], atol=1e-6)
    # ... and it does matter for image 0, where class 1 is present
    assert np.abs(cams2[0] - cams[0]).max() > 1e-3
    # an image without any class: zeros, and the other image unchanged
    empty = cls_ids.at[1].set(-1)
    cams3 = np.asarray(
        _jit_run(model32(), x11, text_fg, text_bg, empty, "ln1_output")[0])
    assert np.all(cams3[1] == 0)
    np.testing.assert_array_equal(cams3[0], cams[0])




def test_no_unrolling_over_classes():
    counts = []
    for k in (6, 12):
        x11, text_fg, text_bg, _, cls_ids = _inputs(k=k)
        counts.append(jaxpr_utils.traced_eqns(
            lambda *a: _run(model32(), *a, "ln1_output"),
            x11, text_fg, text_bg, cls_ids))
    assert counts[0] == counts[1], counts


def test_weighted_cam_matches_numpy():
    r = np.random.default_rng(3)
    b, k, n, d = 2, 3, GRID[0] * GRID[1], 5
    w = r.normal(size=(b, k, d)).astype(np.float32)
    acts = r.normal(size=(b, n, d)).astype(np.float32)
    w[0, 1] = 0.0  # cam identically 0
    w[1, 2] = -np.abs(w[1, 2])
    acts[1] = np.abs(acts[1])  # all-negative before ReLU
    valid = np.array([[True, True, True], [True, False, True]])
    got = np.asarray(cam.weighted_cam(jnp.asarray(w), jnp.asarray(acts),
                                      jnp.asarray(valid), GRID))
    for i in range(b):
        for j in range(k):
            m = np.maximum(acts[i] @ w[i, j], 0).reshape(GRID)
            want = _np_scale(_np_scale(m)) if valid[i, j] else 0 * m
            np.testing.assert_allclose(got[i, j], want, atol=1e-6)
    assert np.all(got[0, 1] == 0) and np.all(got[1, 2] == 0)
    assert got[0, 0].max() > 0.99


def test_projected_path_through_heads():
    model = model32()
    x11, text_fg, text_bg, labels, cls_ids = _inputs()
    heads = cmpa.CMPAHeads(E, E, hidden_dim=12, dim=6, rngs=nnx.Rngs(0))
    # move the BatchNorm running statistics off their identity init
    heads.isa(jax.random.normal(jax.random.key(1), (8, E)))
    heads.tsa(jax.random.normal(jax.random.key(2), (8, E)))

    def isa_fn(v):
        return heads.isa(v, use_running_average=True)

    def tsa_fn(t):
        return heads.tsa(t, use_running_average=True)

    got = np.asarray(_jit_run(model, x11, text_fg, text_bg, cls_ids,
                              "ln1_output", heads=(isa_fn, tsa_fn))[0])
    want = _reference(model, x11, text_fg, text_bg, labels, "ln1_output", 4,
                      heads=(isa_fn, tsa_fn))
    np.testing.assert_allclose(got, want, atol=1e-4)  # float32
    # kmax 6 instead of the bucket 4: the same CAMs in the present slots
    six = cam.present_classes(jnp.asarray(labels), 6)
    got6 = np.asarray(_jit_run(model, x11, text_fg, text_bg, six,
                               "ln1_output", heads=(isa_fn, tsa_fn))[0])
    np.testing.assert_allclose(got6[:, :4], got, atol=1e-4)
    plain = np.asarray(_jit_run(model, x11, text_fg, text_bg, cls_ids,
                                "ln1_output")[0])
    assert np.abs(got - plain).max() > 1e-2


def test_bad_inputs():
    model = model32()
    x11, text_fg, text_bg, _, cls_ids = _inputs()
    with pytest.raises(ValueError, match="background"):
        _run(model, x11, text_fg, text_bg[:0], cls_ids, "ln1_output")
    with pytest.raises(ValueError, match="grid"):
        cam.initial_cams(model.ln1_fn, model.block_fn, model.project_fn,
                         x11, text_fg, text_bg, cls_ids, (4, 4))


def test_batch_sharded_over_8_devices_equals_one():
    r = np.random.default_rng(9)
    x11 = jnp.asarray(r.normal(size=(8, T, D)), jnp.float32)
    _, text_fg, text_bg, _, _ = _inputs()
    labels = (r.random((8, C)) < 0.5).astype(np.float32)
    cls_ids = cam.present_classes(jnp.asarray(labels), 3)
    one = _jit_run(model32(), x11, text_fg, text_bg, cls_ids, "ln1_output")
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = NamedSharding(mesh, PartitionSpec("data"))
    many = _jit_run(model32(), jax.device_put(x11, shard), text_fg, text_bg,
                    jax.device_put(cls_ids, shard), "ln1_output")
    assert len(many[0].sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(many), jax.tree.leaves(one),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
