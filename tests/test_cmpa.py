"""cmpa: each piece of Eq. 1-6 against a NumPy / Python-loop reference.

Tolerances: float32 results vs float64 NumPy, atol 1e-5 unless stated.
"""

import collections
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ssr_jax import cmpa, params
from ssr_jax.config_defaults import base_config

IN, HID, DIM = 6, 10, 4
# Tests are dominated by XLA compile time; LLVM at -O0 halves it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}




def _fast(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


proto_loss = _fast(cmpa.proto_loss)
kmeans_pp_init = _fast(cmpa.kmeans_pp_init, static_argnums=2)
kmeans = _fast(cmpa.kmeans, static_argnums=(2, 3))
lloyd = _fast(cmpa.lloyd, static_argnums=3)
recluster = _fast(cmpa.recluster, static_argnames=("k", "iters",
                                                   "num_classes"))
positive_indices = _fast(cmpa.positive_indices, static_argnums=3)
cmpa_loss = _fast(cmpa.cmpa_loss, static_argnums=(0, 7))


@pytest.fixture(scope="module")
def heads():
    return cmpa.CMPAHeads(IN, IN, hidden_dim=HID, dim=DIM, rngs=nnx.Rngs(0))


def _np_infonce(f, valid, protos, pos, tau, pvalid=None):
    p = protos.shape[0]
    pvalid = np.ones(p, bool) if pvalid is None else pvalid
    losses = []
    for i in range(f.shape[0]):
        for j in range(f.shape[1]):
            if not valid[i, j] or pos[i, j] < 0 or not pvalid[pos[i, j]]:
                continue
            s = [float(f[i, j] @ protos[c]) / tau for c in range(p)
                 if pvalid[c]]
            s_pos = float(f[i, j] @ protos[pos[i, j]]) / tau
            losses.append(-math.log(math.exp(s_pos) /
                                    sum(math.exp(v) for v in s)))
    return float(np.mean(losses)) if losses else 0.0


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_proto_loss_matches_hand_infonce():
    r = np.random.default_rng(0)
    f = _unit(r.normal(size=(2, 3, DIM)))
    protos = _unit(r.normal(size=(5, DIM)))
    valid = np.array([[True, True, False], [True, False, True]])
    pos = np.array([[0, 4, -1], [2, 1, -1]])  # (1, 2) valid, positive −1
    pvalid = np.array([True, True, False, True, True])
    tau = 0.07
    args = [jnp.asarray(x, jnp.float32) for x in (f,)] + [
        jnp.asarray(valid), jnp.asarray(protos, jnp.float32),
        jnp.asarray(pos, jnp.int32), jnp.float32(tau)]
    got = float(proto_loss(*args))
    np.testing.assert_allclose(got, _np_infonce(f, valid, protos, pos, tau),
                               rtol=1e-5)
    # masked prototypes leave the softmax; slot (1, 0) (positive 2) drops
    got = float(proto_loss(*args, jnp.asarray(pvalid)))
    want = _np_infonce(f, valid, protos, pos, tau, pvalid)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # no valid slot: exactly 0 with finite gradients
    none = jnp.zeros_like(args[1])
    def fn(x):
        return cmpa.proto_loss(x, none, *args[2:])

    assert float(fn(args[0])) == 0.0
    assert np.all(np.isfinite(np.asarray(_fast(jax.grad(fn))(args[0]))))


def test_masked_average_pool_matches_loop():
    r = np.random.default_rng(1)
    b, k, n, d = 2, 3, 7, DIM
    feats = r.normal(size=(b, n, d)).astype(np.float32)
    cams = r.random((b, k, n)).astype(np.float32)
    cams[0, 2] = 0.0  # all-zero CAM
    valid = np.array([[True, True, True], [True, False, True]])
    got = cmpa.masked_average_pool(jnp.asarray(feats), jnp.asarray(cams),
                                   jnp.asarray(valid))
    got = np.asarray(got)
    for i in range(b):
        for j in range(k):
            if not valid[i, j] or cams[i, j].sum() == 0:
                assert np.all(got[i, j] == 0)
                continue
            pooled = sum(cams[i, j, t] * feats[i, t].astype(np.float64)
                         for t in range(n)) / cams[i, j].sum()
            np.testing.assert_allclose(got[i, j], _unit(pooled), atol=1e-6)
    # the CAM is a constant; gradients w.r.t. the features are finite
    g_cam = jax.grad(lambda c: cmpa.masked_average_pool(
        jnp.asarray(feats), c, jnp.asarray(valid)).sum())(jnp.asarray(cams))
    assert np.all(np.asarray(g_cam) == 0)
    g_f = jax.grad(lambda f: cmpa.masked_average_pool(
        f, jnp.asarray(cams), jnp.asarray(valid)).sum())(jnp.asarray(feats))
    assert np.all(np.isfinite(np.asarray(g_f)))
    assert np.abs(np.asarray(g_f)).max() > 0


def test_bank_matches_python_ring_buffer():
    size, d = 5, 2
    bank = cmpa.init_bank(size, d)
    update = jax.jit(cmpa.update_bank)
    rows = [None] * size  # Python model: list of (cls, feat)
    ptr = 0
    r = np.random.default_rng(2)
    for step, k in enumerate([2, 3, 3, 4]):
        feats = r.normal(size=(2, k, d)).astype(np.float32)
        cls = r.integers(0, 4, size=(2, k)).astype(np.int32)
        cls[r.random((2, k)) < 0.3] = -1  # padding is skipped
        if step == 3:
            cls[:] = np.arange(8).reshape(2, 4)  # 8 valid > size
        bank = update(bank, jnp.asarray(feats), jnp.asarray(cls))
        for f, c in zip(feats.reshape(-1, d), cls.reshape(-1), strict=True):
            if c >= 0:
                rows[ptr] = (c, f)
                ptr = (ptr + 1) % size
        want_cls = [-1 if x is None else x[0] for x in rows]
        np.testing.assert_array_equal(np.asarray(bank["cls"]), want_cls)
        for i, x in enumerate(rows):
            want = np.zeros(d) if x is None else x[1]
            np.testing.assert_array_equal(np.asarray(bank["feats"][i]), want)
        assert int(bank["ptr"]) == ptr


def _np_lloyd(x, valid, c, iters):
    c = c.astype(np.float64).copy()
    xs = x[valid].astype(np.float64)
    for _ in range(iters):
        a = np.argmin(((xs[:, None] - c[None]) ** 2).sum(-1), 1)
        for j in range(len(c)):
            if (a == j).any():
                c[j] = xs[a == j].mean(0)
    a = np.full(len(x), -1)
    a[valid] = np.argmin(((xs[:, None] - c[None]) ** 2).sum(-1), 1)
    return c, a


def _blobs(seed=3):
    r = np.random.default_rng(seed)
    centres = np.array([[10.0, 0], [0, 10], [-10, 0], [0, -10]])
    labels = np.repeat(np.arange(4), 6)
    x = centres[labels] + r.normal(size=(24, 2))
    valid = np.ones(30, bool)
    valid[24:] = False
    x = np.concatenate([x, np.full((6, 2), 1e3)])  # invalid outliers
    labels = np.concatenate([labels, np.full(6, 2)])
    return x.astype(np.float32), valid, labels, centres


def test_kmeans_recovers_blobs_and_matches_numpy_lloyd():
    x, valid, labels, centres = _blobs()
    key = jax.random.key(0)
    init = np.asarray(kmeans_pp_init(jnp.asarray(x), jnp.asarray(valid),
                                          4, key))
    # k-means++ picks valid rows only, one per blob here
    picked = [int(np.flatnonzero((x == row).all(1))[0]) for row in init]
    assert all(valid[i] for i in picked)
    assert sorted(labels[picked]) == [0, 1, 2, 3]
    got_c, got_a = kmeans(jnp.asarray(x), jnp.asarray(valid), 4, 5, key)
    want_c, want_a = _np_lloyd(x, valid, init, 5)
    np.testing.assert_allclose(np.asarray(got_c), want_c, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got_a), want_a)
    for j in range(4):  # the blobs are recovered
        members = labels[np.asarray(got_a) == j]
        assert len(set(members)) == 1 and len(members) == 6
        true = centres[members[0]]
        assert np.linalg.norm(np.asarray(got_c)[j] - true) < 1.0


def test_lloyd_empty_cluster_keeps_centre():
    x, valid, _, _ = _blobs()
    init = np.array([[10.0, 0], [0, 10], [-10, 0], [500.0, 500.0]])
    c, a = lloyd(jnp.asarray(x), jnp.asarray(valid),
                      jnp.asarray(init, jnp.float32), 3)
    np.testing.assert_array_equal(np.asarray(c)[3], [500.0, 500.0])
    want_c, want_a = _np_lloyd(x, valid, init, 3)
    np.testing.assert_allclose(np.asarray(c), want_c, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a), want_a)


def test_match_clusters_majority_vote():
    r = np.random.default_rng(4)
    k, num_classes = 5, 4
    assign = r.integers(0, k - 1, size=40)  # cluster 4 stays empty
    cls = r.integers(0, num_classes, size=40)
    valid = r.random(40) < 0.8
    got = np.asarray(cmpa.match_clusters(
        jnp.asarray(assign), jnp.asarray(cls), jnp.asarray(valid), k,
        num_classes))
    for j in range(k):
        votes = collections.Counter(
            int(c) for a, c, v in zip(assign, cls, valid, strict=True)
            if v and a == j)
        if not votes:
            assert got[j] == -1
        else:
            top = max(votes.values())
            assert got[j] == min(c for c, n in votes.items() if n == top)
    assert got[4] == -1


def test_recluster_and_positives():
    x, valid, labels, _ = _blobs()
    size = len(x)
    cls = np.where(valid, labels, -1).astype(np.int32)
    cls[0] = 1  # one mislabelled member of blob 0: the vote still says 0
    bank = {"feats": jnp.asarray(x), "cls": jnp.asarray(cls),
            "ptr": jnp.zeros((), jnp.int32)}
    protos = recluster(bank, k=4, iters=5, key=jax.random.key(0),
                            num_classes=5)
    assert bool(protos["ready"])
    cc = np.asarray(protos["cluster_class"])
    assert sorted(cc) == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.asarray(protos["class_valid"]),
                                  [True, True, True, True, False])
    centroids = np.asarray(protos["centroids"])
    for j in range(4):  # class centroid = unit centroid of its cluster
        np.testing.assert_allclose(
            np.asarray(protos["class_centroids"])[cc[j]],
            _unit(centroids[j]), atol=1e-5)
    assert np.all(np.asarray(protos["class_centroids"])[4] == 0)
    # positives: nearest centroid's class; the mislabelled point goes to 0
    f = jnp.asarray(x[None, :3])
    ids = jnp.asarray([[1, 0, -1]], jnp.int32)
    got = np.asarray(positive_indices(f, ids, protos, "kmeans"))
    np.testing.assert_array_equal(got, [[0, 0, -1]])
    got = np.asarray(positive_indices(f, ids, protos, "class"))
    np.testing.assert_array_equal(got, [[1, 0, -1]])
    # an unmatched cluster or a bank not ready: the own class
    unmatched = dict(protos, cluster_class=jnp.full((4,), -1, jnp.int32))
    got = positive_indices(f, ids, unmatched, "kmeans")
    np.testing.assert_array_equal(np.asarray(got), [[1, 0, -1]])
    got = positive_indices(f, ids, cmpa.init_protos(4, 2, 5), "kmeans")
    np.testing.assert_array_equal(np.asarray(got), [[1, 0, -1]])
    # not ready with fewer than k features; same pytree as init_protos
    sparse = dict(bank, cls=jnp.asarray(np.where(np.arange(size) < 3, cls,
                                                 -1), jnp.int32))
    early = recluster(sparse, k=4, iters=2, key=jax.random.key(0),
                           num_classes=5)
    assert not bool(early["ready"])
    assert (jax.tree.structure(early)
            == jax.tree.structure(cmpa.init_protos(4, 2, 5)))
    with pytest.raises(ValueError, match="cmpa.positive"):
        positive_indices(f, ids, protos, "nearest")


def _variant_setup(heads, seed=5):
    r = np.random.default_rng(seed)
    b, n, k, num_classes = 3, 8, 2, 4
    tokens = jnp.asarray(r.normal(size=(b, n, IN)), jnp.float32)
    cams = jnp.asarray(r.random((b, k, n)), jnp.float32)
    cls_ids = jnp.asarray([[0, 2], [1, -1], [2, 3]], jnp.int32)
    text = jnp.asarray(r.normal(size=(num_classes, IN)), jnp.float32)
    return tokens, cams, cls_ids, text


@functools.partial(jax.jit, static_argnums=(0, 1),
                   compiler_options=FAST_COMPILE)
def _variant_grads(variant, graphdef, state, protos, tokens, cams, cls_ids,
                   text):
    """(loss, aux), d loss / d params of one variant, BN in training mode."""
    def loss_fn(h):
        f_img = cmpa.masked_average_pool(h.isa(tokens), cams, cls_ids >= 0)
        return cmpa.cmpa_loss(variant, f_img, h.tsa(text), cls_ids >= 0,
                              cls_ids, protos, h.tau(), "kmeans")

    heads = nnx.merge(graphdef, state)
    return nnx.value_and_grad(loss_fn, has_aux=True)(heads)


@pytest.mark.parametrize("variant", cmpa.VARIANTS)
def test_variants_finite_with_gradients(heads, variant):
    tokens, cams, cls_ids, text = _variant_setup(heads)
    r = np.random.default_rng(6)
    ready = cmpa.init_protos(4, DIM, 4)
    ready.update(centroids=jnp.asarray(_unit(r.normal(size=(4, DIM))),
                                       jnp.float32),
                 cluster_class=jnp.asarray([0, 1, 2, -1], jnp.int32),
                 class_centroids=jnp.asarray(_unit(r.normal(size=(4, DIM))),
                                             jnp.float32),
                 class_valid=jnp.asarray([True, True, True, False]),
                 ready=jnp.ones((), bool))
    graphdef, state = nnx.split(heads)
    for protos in (cmpa.init_protos(4, DIM, 4), ready):
        (loss, aux), grads = _variant_grads(variant, graphdef, state, protos,
                                            tokens, cams, cls_ids, text)
        assert np.isfinite(float(loss))
        np.testing.assert_allclose(float(aux["tau"]), 0.05, rtol=1e-6)
        norms = {name: float(jnp.abs(grads[name]["fc1"]["kernel"][...]).max())
                 for name in ("isa", "tsa")}
        norms["tau"] = abs(float(grads["log_tau"][...]))
        if variant == "none":
            assert float(loss) == 0 and max(norms.values()) == 0
            continue
        # intra with the ready bank: a slot whose positive has no image
        # prototype (class 3) is skipped
        assert int(aux["num_valid"]) == 5 or (
            variant == "intra" and bool(protos["ready"]))
        assert float(loss) > 0 and norms["isa"] > 0 and norms["tau"] > 0
        # intra has no text in its loss: TSA gets no gradient (by design)
        assert (norms["tsa"] > 0) == (variant != "intra")


def test_variant_definitions_match_numpy(heads):
    tokens, cams, cls_ids, text = _variant_setup(heads)
    f_img = cmpa.masked_average_pool(heads.isa(tokens, use_running_average=
                                               True), cams, cls_ids >= 0)
    f_text = heads.tsa(text, use_running_average=True)
    valid = np.asarray(cls_ids) >= 0
    ids = np.asarray(cls_ids)
    f, t = np.asarray(f_img, np.float64), np.asarray(f_text, np.float64)
    protos = cmpa.init_protos(4, DIM, 4)
    tau = 0.05

    def run(variant):
        return float(cmpa_loss(variant, f_img, f_text, cls_ids >= 0,
                                    cls_ids, protos, jnp.float32(tau),
                                    "kmeans")[0])

    # cross: all C text prototypes, positive = own class (bank not ready)
    np.testing.assert_allclose(run("cross"),
                               _np_infonce(f, valid, t, ids, tau), rtol=1e-5)
    # feature: only the batch's classes {0, 1, 2} compete
    ids2 = np.array([[0, 2], [1, -1], [2, 2]])
    got = float(cmpa_loss("feature", f_img, f_text, cls_ids >= 0,
                          jnp.asarray(ids2, jnp.int32), protos,
                          jnp.float32(tau), "kmeans")[0])
    want = _np_infonce(f, ids2 >= 0, t, ids2, tau,
                       np.array([True, True, True, False]))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # intra before the first recluster: in-batch class means of f_image
    means = np.zeros((4, DIM))
    for i, j in zip(*np.nonzero(valid), strict=True):
        means[ids[i, j]] += f[i, j]
    np.testing.assert_allclose(
        run("intra"), _np_infonce(f, valid, _unit(means + 1e-30), ids, tau),
        rtol=1e-5)
    with pytest.raises(ValueError, match="cmpa.variant"):
        run("symmetric")


def _np_head_train(head, x):
    """NumPy forward of a ProjectionHead with batch statistics."""
    w1, b1 = np.asarray(head.fc1.kernel[...]), np.asarray(head.fc1.bias[...])
    w2, b2 = np.asarray(head.fc2.kernel[...]), np.asarray(head.fc2.bias[...])
    z = x.reshape(-1, x.shape[-1]) @ w1 + b1
    mean, var = z.mean(0), z.var(0)
    zn = (z - mean) / np.sqrt(var + 1e-5)
    zn = zn * np.asarray(head.bn.scale[...]) + np.asarray(head.bn.bias[...])
    out = np.maximum(zn, 0) @ w2 + b2
    out = _unit(out).reshape(x.shape[:-1] + (-1,))
    return out, mean, var


def test_batchnorm_train_vs_eval(heads):
    head = nnx.clone(heads.isa)
    x = np.random.default_rng(7).normal(size=(3, 5, IN)).astype(np.float32)
    want, mean, var = _np_head_train(head, x)
    got = np.asarray(head(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)
    # running averages moved by PyTorch's momentum 0.1
    np.testing.assert_allclose(np.asarray(head.bn.mean[...]), 0.1 * mean,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(head.bn.var[...]),
                               0.9 + 0.1 * var, atol=1e-5)
    # eval: running statistics, no update, every sample independent
    before = np.asarray(head.bn.mean[...])
    full = np.asarray(head(jnp.asarray(x), use_running_average=True))
    one = np.asarray(head(jnp.asarray(x[:1, :2]), use_running_average=True))
    np.testing.assert_allclose(one, full[:1, :2], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(head.bn.mean[...]), before)
    assert np.abs(full - got).max() > 1e-3
    # a mask keeps rows out of the batch statistics
    head2 = nnx.clone(heads.isa)
    mask = np.ones((3, 5), bool)
    mask[:, 3:] = False
    masked = np.asarray(head2(jnp.asarray(x), mask=jnp.asarray(mask)))
    np.testing.assert_allclose(
        masked[:, :3], _np_head_train(heads.isa, x[:, :3])[0], atol=1e-5)


def test_head_sharded_over_8_devices_equals_one(heads):
    devices = jax.devices()
    assert len(devices) == 8
    graphdef, state = nnx.split(heads.isa)
    x = np.random.default_rng(8).normal(size=(16, 3, IN)).astype(np.float32)

    @jax.jit
    def forward(state, x):
        head = nnx.merge(graphdef, state)
        y = head(x)
        return y, nnx.state(head)

    one = forward(state, jnp.asarray(x))
    mesh = Mesh(np.array(devices), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    rep = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    many = forward(rep, xs)
    assert len(many[0].sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(many[0]), np.asarray(one[0]),
                               atol=1e-5)
    for a, b in zip(jax.tree.leaves(many[1]), jax.tree.leaves(one[1]),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # and the statistics are those of the global batch (NumPy)
    _, mean, _ = _np_head_train(heads.isa, x)
    np.testing.assert_allclose(np.asarray(many[1]["bn"]["mean"][...]),
                               0.1 * mean, atol=1e-5)


def test_heads_tau_and_config():
    c = base_config().cmpa
    h = cmpa.CMPAHeads.from_params(
        params.method_params(base_config()).cmpa, 8, 8, rngs=nnx.Rngs(1))
    assert h.isa.fc2.kernel.shape == (c.hidden_dim, c.dim)
    assert h.tsa.fc1.kernel.shape == (8, c.hidden_dim)
    np.testing.assert_allclose(float(h.tau()), c.tau_init, rtol=1e-6)
    h.log_tau[...] = jnp.float32(math.log(1e-4))
    np.testing.assert_allclose(float(h.tau()), c.tau_min, rtol=1e-6)
    assert cmpa.prototype_count(c.num_prototypes, 20) == 20
    assert cmpa.prototype_count(32, 20) == 32
    with pytest.raises(ValueError, match="tau_min"):
        cmpa.CMPAHeads(8, 8, tau_init=0.005, tau_min=0.01, rngs=nnx.Rngs(0))


def test_identity_init_starts_at_plain_clip():
    """`cmpa.identity_init`: both heads are x -> x/|x| (zero-padded to
    dim) at step 0, so the projected GradCAM is plain CLIP's up to the
    per-token normalisation (max difference 0.025 measured on unit tokens);
    the default tied random start is a different CAM (max difference ~1)."""
    from ssr_jax import diagnostics_cmpa  # noqa: PLC0415

    e = 16
    heads = cmpa.CMPAHeads(e, e, hidden_dim=40, dim=24, identity_init=True,
                           rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (5, e)) * 3
    want = np.pad(np.asarray(x / jnp.linalg.norm(x, axis=-1, keepdims=True)),
                  ((0, 0), (0, 24 - e)))
    for head in (heads.isa, heads.tsa):
        np.testing.assert_allclose(
            np.asarray(head(x, use_running_average=True)), want, atol=1e-6)
    p = diagnostics_cmpa.cmpa_problem(num_images=16, confound=0.5,
                                      text_overlap=0.7, seed=0)
    plain = np.asarray(diagnostics_cmpa.projected_cams(p, None))
    ident = np.asarray(diagnostics_cmpa.projected_cams(p, heads))
    tied = np.asarray(diagnostics_cmpa.projected_cams(
        p, cmpa.CMPAHeads(e, e, hidden_dim=40, dim=24, rngs=nnx.Rngs(0))))
    assert np.abs(ident - plain).max() < 0.05
    assert np.abs(tied - plain).max() > 0.3
    with pytest.raises(ValueError, match="identity_init"):
        cmpa.CMPAHeads(e, e, hidden_dim=20, dim=24, identity_init=True,
                       rngs=nnx.Rngs(0))


@pytest.mark.parametrize("valid_only", [True, False])
def test_valid_tokens_only_ignores_padding(valid_only):
    """`cmpa.valid_tokens_only`: with it, what crop-padding tokens hold
    changes neither f_image nor ISA's BatchNorm running statistics; without
    it (the default) both change."""
    from ssr_jax import ssr  # noqa: PLC0415

    c = base_config()
    c.cmpa.valid_tokens_only = valid_only
    rng = np.random.default_rng(0)
    b, n, e, k = 2, 6, 8, 2
    tokens = rng.normal(size=(b, n, e)).astype(np.float32)
    valid = np.ones((b, n), bool)
    valid[1, 4:] = False
    path = {"cls_ids": jnp.asarray([[0, 1], [2, -1]], jnp.int32),
            "slot_valid": jnp.asarray([[True, True], [True, False]]),
            "cams": jnp.asarray(rng.random((b, k, 2, 3)), jnp.float32),
            "token_valid": jnp.asarray(valid)}
    outs = []
    for fill in (0.0, 50.0):
        t = tokens.copy()
        t[~valid] = fill
        heads = cmpa.CMPAHeads(e, e, hidden_dim=12, dim=6, rngs=nnx.Rngs(0))
        f = ssr.cmpa_image_features(heads, {**path, "tokens": jnp.asarray(t)},
                                    c)
        outs.append((np.asarray(f), np.asarray(heads.isa.bn.mean[...])))
    same = all(np.allclose(a, b_, atol=1e-6) for a, b_ in zip(*outs,
                                                              strict=True))
    assert same == valid_only
    np.testing.assert_array_equal(
        np.asarray(ssr.token_valid(jnp.asarray(
            np.pad(np.ones((1, 2, 4), bool), ((0, 0), (0, 2), (0, 0)))),
            (2, 2))), [[True, True, False, False]])


def test_extra_negatives_vs_loop():
    """`cmpa_loss(..., extra_negatives=)` (`cmpa.background_negatives`):
    the extra rows join the softmax denominator only."""
    rng = np.random.default_rng(3)
    b, k, d, c, m = 3, 2, 5, 4, 3

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    f_img = unit(rng.normal(size=(b, k, d))).astype(np.float32)
    f_text = unit(rng.normal(size=(c, d))).astype(np.float32)
    f_bg = unit(rng.normal(size=(m, d))).astype(np.float32)
    cls_ids = np.array([[0, 2], [1, -1], [3, 0]], np.int32)
    tau = 0.2
    protos = cmpa.init_protos(c, d, c)
    for variant in ("cross", "feature"):
        got, _ = cmpa.cmpa_loss(variant, jnp.asarray(f_img),
                                jnp.asarray(f_text), jnp.asarray(cls_ids >= 0),
                                jnp.asarray(cls_ids), protos, tau, "class",
                                extra_negatives=jnp.asarray(f_bg))
        present = set(cls_ids[cls_ids >= 0].tolist())
        terms = []
        for i in range(b):
            for j in range(k):
                if cls_ids[i, j] < 0:
                    continue
                rows = [f_text[q] for q in range(c)
                        if variant == "cross" or q in present]
                logits = [f_img[i, j] @ r / tau for r in rows + list(f_bg)]
                pos = f_img[i, j] @ f_text[cls_ids[i, j]] / tau
                terms.append(math.log(sum(math.exp(x) for x in logits)) - pos)
        np.testing.assert_allclose(float(got), np.mean(terms), rtol=1e-5)
        plain, _ = cmpa.cmpa_loss(variant, jnp.asarray(f_img),
                                  jnp.asarray(f_text),
                                  jnp.asarray(cls_ids >= 0),
                                  jnp.asarray(cls_ids), protos, tau, "class")
        assert float(got) > float(plain)
    with pytest.raises(ValueError, match="background_negatives"):
        cmpa.cmpa_loss("intra", jnp.asarray(f_img), jnp.asarray(f_text),
                       jnp.asarray(cls_ids >= 0), jnp.asarray(cls_ids),
                       protos, tau, "class", extra_negatives=jnp.asarray(f_bg))


def test_background_pool_and_loss_vs_loop():
    """`cmpa.background_pool`: tokens pooled under 1 − max CAM of the
    valid slots (`background_pool`) and the multi-positive InfoNCE against
    [TSA(background); TSA(classes)] (`background_pool_loss`)."""
    rng = np.random.default_rng(5)
    b, k, n, d, c, m = 3, 2, 6, 4, 3, 2

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    feats = rng.normal(size=(b, n, d)).astype(np.float32)
    cams = rng.random((b, k, n)).astype(np.float32)
    cams[2] = 1.0  # all foreground: no background pool
    cams[0, 1] = 5.0  # padded slot: must not count
    slot_valid = np.array([[True, False], [True, True], [True, True]])
    tmask = np.ones((b, n), bool)
    tmask[1, -2:] = False
    f_bg, valid = cmpa.background_pool(jnp.asarray(feats), jnp.asarray(cams),
                                       jnp.asarray(slot_valid),
                                       jnp.asarray(tmask))
    want = np.zeros((b, d))
    want_valid = np.zeros(b, bool)
    for i in range(b):
        num, den = np.zeros(d), 0.0
        for t in range(n):
            fg = max(cams[i, s, t] for s in range(k) if slot_valid[i, s])
            wt = min(max(1 - fg, 0), 1) * tmask[i, t]
            num += wt * feats[i, t]
            den += wt
        if den > 0:
            want[i] = unit(num / den)
            want_valid[i] = True
    np.testing.assert_allclose(np.asarray(f_bg), want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(valid), want_valid)
    assert want_valid.tolist() == [True, True, False]

    f_text = unit(rng.normal(size=(c, d))).astype(np.float32)
    f_text_bg = unit(rng.normal(size=(m, d))).astype(np.float32)
    tau = 0.3
    loss, aux = cmpa.background_pool_loss(f_bg, valid, jnp.asarray(f_text),
                                          jnp.asarray(f_text_bg), tau)
    terms, hits = [], []
    for i in range(b):
        if not want_valid[i]:
            continue
        lg = [want[i] @ p / tau for p in list(f_text_bg) + list(f_text)]
        terms.append(math.log(sum(math.exp(x) for x in lg))
                     - math.log(sum(math.exp(x) for x in lg[:m])))
        hits.append(int(np.argmax(lg)) < m)
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)
    assert float(aux["bg_acc"]) == pytest.approx(np.mean(hits))
    # Broken input, the banks swapped (background as a class): another loss.
    swapped, _ = cmpa.background_pool_loss(f_bg, valid,
                                           jnp.asarray(f_text_bg[:1]),
                                           jnp.asarray(f_text), tau)
    assert abs(float(swapped) - float(loss)) > 1e-3
    # A background feature on a background prompt scores lower than one on
    # a class text; no valid pool gives 0.
    on_bg, _ = cmpa.background_pool_loss(
        jnp.asarray(f_text_bg[:1]), jnp.ones(1, bool), jnp.asarray(f_text),
        jnp.asarray(f_text_bg), tau)
    on_cls, _ = cmpa.background_pool_loss(
        jnp.asarray(f_text[:1]), jnp.ones(1, bool), jnp.asarray(f_text),
        jnp.asarray(f_text_bg), tau)
    assert float(on_bg) < float(on_cls)
    none, _ = cmpa.background_pool_loss(f_bg, jnp.zeros(b, bool),
                                        jnp.asarray(f_text),
                                        jnp.asarray(f_text_bg), tau)
    assert float(none) == 0.0


def test_ema_update_vs_formula():
    """`ema_update` ([choice] `cmpa.pool_source="ema"`): decay·ema +
    (1 − decay)·live on float leaves, the live value on integer leaves;
    decay 1 keeps the start exactly, 0 follows the live tree."""
    rng = np.random.default_rng(0)
    ema = {"w": rng.normal(size=(3, 4)).astype(np.float32),
           "bn": {"mean": rng.normal(size=(4,)).astype(np.float32)},
           "count": np.int32(3)}
    live = {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "bn": {"mean": rng.normal(size=(4,)).astype(np.float32)},
            "count": np.int32(7)}
    for decay in (0.9, 0.25):
        got = cmpa.ema_update(ema, live, decay)
        for k in ("w",):
            np.testing.assert_allclose(
                np.asarray(got[k]), decay * ema[k] + (1 - decay) * live[k],
                rtol=1e-6)
        np.testing.assert_allclose(
            np.asarray(got["bn"]["mean"]),
            decay * ema["bn"]["mean"] + (1 - decay) * live["bn"]["mean"],
            rtol=1e-6)
        assert int(got["count"]) == 7
    same = cmpa.ema_update(ema, live, 1.0)
    np.testing.assert_array_equal(np.asarray(same["w"]), ema["w"])
    follow = cmpa.ema_update(ema, live, 0.0)
    np.testing.assert_array_equal(np.asarray(follow["w"]), live["w"])
    with pytest.raises(ValueError, match="pool_ema_decay"):
        cmpa.ema_update(ema, live, 1.5)


def test_config_check_names_pool_source_and_decay():
    from ssr_jax import config_check  # noqa: PLC0415

    c = base_config()
    assert not [e for e in config_check.validate(c) if "pool_" in e]
    assert params.method_params(c).cmpa.pool_source == "live"
    c.cmpa.pool_source = "slow"
    c.cmpa.pool_ema_decay = 1.5
    errors = [e for e in config_check.validate(c) if "pool_" in e]
    assert any("cmpa.pool_source" in e for e in errors), errors
    assert any("cmpa.pool_ema_decay" in e for e in errors), errors
