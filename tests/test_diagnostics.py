"""diagnostics.py against slow Python loops on small random inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax import diagnostics, diagnostics_cmpa
from ssr_jax.data import synthetic


def test_attention_purity_vs_loops():
    rng = np.random.default_rng(0)
    b, n = 2, 12
    aff = rng.random((b, n, n)).astype(np.float32)
    labels = rng.integers(-1, 3, (b, n))
    aff[1, 3] = 0  # a row with no mass: purity 0
    sums, counts = map(np.asarray, diagnostics.attention_purity(
        jnp.asarray(aff), jnp.asarray(labels)))
    want_s, want_c = np.zeros(2), np.zeros(2)
    for i in range(b):
        for q in range(n):
            if labels[i, q] < 0:
                continue
            tot = sum(aff[i, q, k] for k in range(n) if labels[i, k] >= 0)
            own = sum(aff[i, q, k] for k in range(n)
                      if labels[i, k] == labels[i, q])
            j = int(labels[i, q] > 0)
            want_s[j] += own / tot if tot > 0 else 0.0
            want_c[j] += 1
    np.testing.assert_allclose(sums, want_s, rtol=1e-5)
    np.testing.assert_array_equal(counts, want_c)


def _oracle_mix_loop(aff, labels, alpha):
    b, n, _ = aff.shape
    out = np.zeros((b, n, n))
    for i in range(b):
        for q in range(n):
            own = [k for k in range(n) if k == q or (
                labels[i, q] >= 0 and labels[i, k] == labels[i, q])]
            row = sum(float(aff[i, q, k]) for k in range(n))
            for k in range(n):
                o = row / len(own) if k in own else 0.0
                out[i, q, k] = (1 - alpha) * aff[i, q, k] + alpha * o
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_oracle_mix_vs_loop_and_linear_purity(alpha):
    """The mix against a loop; with every key labelled, each query's
    purity is (1 − α)·p + α. The oracle without the rescaling to A's row
    sums (a broken variant) breaks that line."""
    rng = np.random.default_rng(3)
    b, n = 2, 10
    aff = (rng.random((b, n, n)) * rng.random((b, n, 1)) * 3).astype(
        np.float32)
    labels = rng.integers(-1, 3, (b, n))
    oracle = diagnostics.oracle_affinity(jnp.asarray(labels))
    got = np.asarray(diagnostics.oracle_mix(jnp.asarray(aff), oracle, alpha))
    np.testing.assert_allclose(got, _oracle_mix_loop(aff, labels, alpha),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), aff.sum(-1), rtol=1e-5)

    full = np.abs(labels)  # every key labelled
    oracle = diagnostics.oracle_affinity(jnp.asarray(full))
    base, _ = map(np.asarray, diagnostics.attention_purity(
        jnp.asarray(aff), jnp.asarray(full)))
    sums, counts = map(np.asarray, diagnostics.attention_purity(
        diagnostics.oracle_mix(jnp.asarray(aff), oracle, alpha),
        jnp.asarray(full)))
    np.testing.assert_allclose(sums, (1 - alpha) * base + alpha * counts,
                               rtol=1e-5)
    if 0 < alpha < 1:
        raw = (1 - alpha) * aff + alpha * np.asarray(oracle)  # unscaled
        bad, _ = map(np.asarray, diagnostics.attention_purity(
            jnp.asarray(raw), jnp.asarray(full)))
        assert np.abs(bad - ((1 - alpha) * base + alpha * counts)).max() > 0.1


def test_oracle_affinity_is_pure():
    labels = jnp.asarray([[0, 1, 1, -1, 2, 0]])
    aff = diagnostics.oracle_affinity(labels)
    sums, counts = diagnostics.attention_purity(aff, labels)
    np.testing.assert_allclose(np.asarray(sums), np.asarray(counts))
    a = np.asarray(aff)[0]
    assert a[3].sum() == 1 and a[3, 3] == 1  # unlabelled: itself only
    assert a[1, 2] == 1 and a[1, 0] == 0


def test_cam_error_counts_vs_loops():
    rng = np.random.default_rng(1)
    c = 4
    pred = rng.integers(0, c, (2, 9, 7))
    gt = rng.integers(0, c, (2, 9, 7))
    gt[rng.random(gt.shape) < 0.1] = 255
    kind = rng.integers(-1, 3, gt.shape)
    home = np.array([-1, 0, 2, -1])
    got = {k: np.asarray(v) for k, v in diagnostics.cam_error_counts(
        jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(kind),
        jnp.asarray(home), c).items()}
    want = {k: np.zeros(c, int) for k in diagnostics.ERROR_KEYS}
    for p, g, kd in zip(pred.ravel(), gt.ravel(), kind.ravel(),
                        strict=True):
        if g == 255:
            continue
        if p > 0 and p == g:
            want["tp"][p] += 1
        if p > 0 and p != g:
            want["fp"][p] += 1
            if g == 0 and kd >= 0 and kd == home[p]:
                want["fp_home_bg"][p] += 1
            elif g == 0:
                want["fp_other_bg"][p] += 1
            else:
                want["fp_object"][p] += 1
        if g > 0 and p != g:
            want["fn"][g] += 1
    for k in diagnostics.ERROR_KEYS:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    s = diagnostics.cam_error_summary(got)
    prec = [want["tp"][i] / (want["tp"][i] + want["fp"][i])
            for i in range(1, c)]
    assert s["precision"] == pytest.approx(np.mean(prec))
    shares = s["fp_share"]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["home_bg"] == pytest.approx(
        want["fp_home_bg"][1:].sum() / want["fp"][1:].sum())


def test_cam_error_summary_empty_class_is_none():
    z = {k: np.zeros(3, int) for k in diagnostics.ERROR_KEYS}
    s = diagnostics.cam_error_summary(z)
    assert s["precision"] is None and s["fp_share"]["home_bg"] is None
    assert s["per_class"][1]["recall"] is None


def test_background_kind_map_and_homes():
    cfg = synthetic.WorldConfig()
    kinds = cfg.background_names
    m = diagnostics.background_kind_map(
        {"background": "water", "horizon": 3}, kinds, 8, 5)
    assert (m[:3] == kinds.index("sky")).all()
    assert (m[3:] == kinds.index("water")).all()
    m = diagnostics.background_kind_map(
        {"background": "road", "horizon": None}, kinds, 4, 4)
    assert (m == kinds.index("road")).all()
    with pytest.raises(ValueError, match="not one of"):
        diagnostics.background_kind_map({"background": "moon"}, kinds, 2, 2)
    homes = diagnostics.home_kinds(cfg)
    assert homes[0] == -1 and len(homes) == 1 + len(cfg.classes)
    for i, cl in enumerate(cfg.classes):
        assert homes[i + 1] == (kinds.index(cl.home) if cl.home else -1)


def _boundary_ref(lab):
    h, w = lab.shape
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and lab[yy, xx] != lab[y, x]:
                    out[y, x] = True
    return out


@pytest.mark.parametrize("tol", [0, 1, 2])
def test_boundary_recall_vs_loops(tol):
    rng = np.random.default_rng(2)
    h, w = 14, 11
    gt = np.zeros((h, w), int)
    gt[3:9, 2:7] = 1
    gt[2:4, 7:10] = 2
    gt[9, 2:7] = 255  # a void band
    sp = (np.arange(h)[:, None] // 4) * 10 + np.arange(w)[None, :] // 3
    sp[rng.random((h, w)) < 0.05] = 99
    np.testing.assert_array_equal(diagnostics.label_boundaries(gt),
                                  _boundary_ref(gt))
    gb = _boundary_ref(gt) & (gt != 255)
    sb = _boundary_ref(sp)
    hits = 0
    for y, x in zip(*np.nonzero(gb), strict=True):
        ys = slice(max(0, y - tol), y + tol + 1)
        xs = slice(max(0, x - tol), x + tol + 1)
        hits += bool(sb[ys, xs].any())
    assert diagnostics.boundary_recall(sp, gt, tol) == (hits, int(gb.sum()))


def test_boundary_recall_perfect_and_errors():
    gt = np.zeros((6, 6), int)
    gt[:, 3:] = 1
    assert diagnostics.boundary_recall(gt + 5, gt, 0) == (12, 12)
    assert diagnostics.boundary_recall(np.zeros((6, 6), int), gt, 2) == (
        0, 12)
    with pytest.raises(ValueError, match="differ"):
        diagnostics.boundary_recall(np.zeros((5, 6), int), gt)


def test_pretrain_report_homes_and_background_kinds(tmp_path):
    """The seed report's host helpers on a written 8-image world (64 px): class
    homes from world.json equal `home_kinds` of the config; the kind map
    of a seed batch follows each image's meta."""
    import json  # noqa: PLC0415

    from ssr_jax import pretrain_report, text  # noqa: PLC0415

    synthetic.generate(tmp_path, seed=0, num_train=6, num_val=2,
                       image_size=64)
    _, bg, names = text.dataset_prompts("synthetic", str(tmp_path))
    home = pretrain_report._home_from_classes(str(tmp_path), names, bg)
    np.testing.assert_array_equal(
        home, diagnostics.home_kinds(synthetic.WorldConfig(), bg))
    assert (home[1:] >= 0).any()
    meta = json.load(open(tmp_path / "meta.json"))
    ids = synthetic.read_split(tmp_path, "train")
    batch = {"index": np.array([0, 3, -1]),
             "valid": np.ones((3, 64, 64), bool)}
    kinds = pretrain_report._bg_kinds(batch, meta, ids, bg, 64)
    for i, j in enumerate((0, 3)):
        want = diagnostics.background_kind_map(meta[ids[j]], bg, 64, 64)
        np.testing.assert_array_equal(kinds[i], want)
    assert (kinds[2] == -1).all()


def test_config_check_names_the_new_fields():
    from ssr_jax import config_check, config_defaults  # noqa: PLC0415

    c = config_defaults.base_config()
    assert not [e for e in config_check.validate(c)
                if "kmeans_init" in e or "diagnostics" in e]
    c.sgc.kmeans_init = "random"
    c.eval.diagnostics = True  # base config is VOC, not the synthetic world
    errors = config_check.validate(c)
    assert any("sgc.kmeans_init" in e for e in errors), errors
    assert any("eval.diagnostics" in e for e in errors), errors
    c = config_defaults.base_config()
    assert not [e for e in config_check.validate(c) if "position_weight" in e]
    c.sgc.position_weight = -0.5
    assert any("sgc.position_weight" in e for e in config_check.validate(c))
    c = config_defaults.base_config()
    assert not [e for e in config_check.validate(c)
                if "ratio_denominator" in e or "zone_unit" in e
                or "intersect_box" in e or "transition_power" in e]
    c.sgc.ratio_denominator = "whole"
    c.sgc.zone_unit = "region"
    del c.sgc["intersect_box"]  # ConfigDict would refuse a str for a bool
    c.sgc.intersect_box = "yes"
    errors = config_check.validate(c)
    for name in ("sgc.ratio_denominator", "sgc.zone_unit",
                 "sgc.intersect_box"):
        assert any(name in e for e in errors), (name, errors)
    for bad in (3, 0, True, "2"):
        c = config_defaults.base_config()
        c.sgc.unlock()
        del c.sgc["transition_power"]
        c.sgc.transition_power = bad
        assert any("sgc.transition_power" in e
                   for e in config_check.validate(c)), bad
    c = config_defaults.base_config()
    c.cmpa.background_pool = True
    assert not [e for e in config_check.validate(c) if "background_pool" in e]
    c.cmpa.variant = "intra"
    c.cmpa.background_pool_weight = -1.0
    errors = [e for e in config_check.validate(c) if "background_pool" in e]
    assert len(errors) == 2, errors


def test_oracle_cams_vs_loops():
    rng = np.random.default_rng(0)
    b, k, (h, w), ph = 2, 3, (3, 4), 4
    mask = rng.integers(0, 4, (b, h * ph, w * ph))
    mask[0, :ph] = 255  # void: not the class
    cls_ids = np.array([[0, 2, -1], [1, -1, -1]])
    got = np.asarray(diagnostics.oracle_cams(
        jnp.asarray(mask), jnp.asarray(cls_ids), (h, w)))
    want = np.zeros((b, k, h, w))
    for i in range(b):
        for s in range(k):
            if cls_ids[i, s] < 0:
                continue
            for y in range(h):
                for x in range(w):
                    cell = mask[i, y * ph:(y + 1) * ph, x * ph:(x + 1) * ph]
                    want[i, s, y, x] = np.mean(cell == cls_ids[i, s] + 1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert 0 < want.max() and want[0, 0, 0].max() == 0  # void row
    # Broken input: 1-based class ids (the label itself) pick another class.
    off = np.asarray(diagnostics.oracle_cams(
        jnp.asarray(mask), jnp.asarray(np.where(cls_ids >= 0, cls_ids + 1,
                                                -1)), (h, w)))
    assert np.abs(off - want).max() > 0.2
    with pytest.raises(ValueError, match="whole number"):
        diagnostics.oracle_cams(jnp.asarray(mask[:, :-1]),
                                jnp.asarray(cls_ids), (h, w))


def test_oracle_cams_scored_as_seeds_recover_the_mask():
    from ssr_jax import par as par_lib

    mask = np.zeros((1, 16, 16), np.int32)
    mask[0, 4:12, 8:16] = 3  # class 2 (0-based), patch-aligned
    cls_ids = jnp.asarray([[2, -1]])
    cams = diagnostics.oracle_cams(jnp.asarray(mask), cls_ids, (4, 4))
    _, labels = par_lib.cams_to_labels(cams, cls_ids, (16, 16))
    pred, gt = np.asarray(labels) == 3, mask == 3
    # bilinear upsampling of the patch grid softens the rim only
    assert (pred & gt).sum() / (pred | gt).sum() > 0.7
    assert pred[0, 6:10, 10:14].all() and not pred[0, :2].any()


def test_train_heads_on_pools_matches_probe_training_and_needs_clean_pools():
    # The reference: the probe's `train_cmpa_heads(pool="gt")`, the same
    # training written on the constructed problem's own arrays.
    p = diagnostics_cmpa.cmpa_problem(num_images=64, confound=0.5,
                                      noise=0.1, text_overlap=0.7, seed=0)
    kw = dict(steps=40, batch=16, lr=1e-3, hidden_dim=64, dim=32,
              tau_init=0.05, seed=0)
    ref, ref_log = diagnostics_cmpa.train_cmpa_heads(
        p, "gt", positive="class", **kw)
    tokens = p.tokens[:, 1:]
    pools = p.obj[:, None].astype(np.float32)
    cls_ids = p.cls[:, None]
    heads, log = diagnostics_cmpa.train_heads_on_pools(
        tokens, pools, cls_ids, p.text_fg, p.text_bg, **kw)
    np.testing.assert_allclose(log["loss"], ref_log["loss"], rtol=1e-4,
                               atol=1e-5)
    plain = diagnostics_cmpa.projected_cam_miou(p, None)
    clean = diagnostics_cmpa.projected_cam_miou(p, heads)
    # masked vs unmasked BatchNorm statistics differ in rounding only
    assert abs(clean - diagnostics_cmpa.projected_cam_miou(p, ref)) < 0.01
    assert clean > plain + 0.05, (plain, clean)
    # Broken input: pooled under the inverted mask (background as class).
    bad, _ = diagnostics_cmpa.train_heads_on_pools(
        tokens, 1 - pools, cls_ids, p.text_fg, p.text_bg, **kw)
    assert diagnostics_cmpa.projected_cam_miou(p, bad) < clean - 0.05
    untrained, log0 = diagnostics_cmpa.train_heads_on_pools(
        tokens, pools, cls_ids, p.text_fg, p.text_bg, **{**kw, "steps": 0})
    assert log0["loss"] == [] and diagnostics_cmpa.projected_cam_miou(
        p, untrained) < clean
    with pytest.raises(ValueError, match="do not match"):
        diagnostics_cmpa.train_heads_on_pools(
            tokens, pools[:, :, :-1], cls_ids, p.text_fg, p.text_bg, **kw)


def test_format_table3_rows():
    from ssr_jax import report_format as rf

    keys = (rf.STEPS + rf.ORACLE_STEPS + rf.ORACLE_CAM_STEPS
            + rf.CMPA_STEPS)
    miou = {k: 0.01 * i for i, k in enumerate(keys)}
    table = rf.format_table3(miou)
    assert "oracle initial CAM" in table and "oracle CMPA" in table
    line = next(x for x in table.splitlines() if "oracle initial" in x)
    assert line.split()[-4:] == [f"{100 * miou[k]:.1f}"
                                 for k in rf.ORACLE_CAM_STEPS]
    assert f"background pool {100 * miou['cmpa_oracle_bgpool']:.1f}" in table
    assert rf.format_table3({"initial": 0.3}) == ""


def _coverage_loop(mask, gt, cls_ids, ignore, weights=None):
    out = np.zeros(4)
    b, k, h, w = mask.shape
    hh, ww = gt.shape[1:]
    for i in range(b):
        for s in range(k):
            c = cls_ids[i, s]
            if c < 0:
                continue
            for y in range(hh):
                for x in range(ww):
                    lab = gt[i, y, x]
                    if lab == ignore:
                        continue
                    py, px = y * h // hh, x * w // ww
                    kept = mask[i, s, py, px] > 0.5
                    wt = 1.0 if weights is None else weights[i, s, py, px]
                    if lab == c + 1:
                        out[0] += wt * kept
                        out[1] += wt
                    else:
                        out[2] += wt * (not kept)
                        out[3] += wt
    return out


def test_target_mask_coverage_vs_loops():
    rng = np.random.default_rng(0)
    mask = (rng.random((2, 3, 4, 4)) > 0.5).astype(np.float32)
    gt = rng.integers(0, 5, (2, 8, 8)).astype(np.int32)
    gt[0, :2, :3] = 255
    cls_ids = np.array([[0, 2, -1], [3, 1, 0]], np.int32)
    got = np.asarray(diagnostics.target_mask_coverage(
        jnp.asarray(mask), jnp.asarray(gt), jnp.asarray(cls_ids)))
    want = _coverage_loop(mask, gt, cls_ids, 255)
    np.testing.assert_allclose(got, want)
    assert want[1] > 0 and want[3] > 0
    wts = rng.random(mask.shape).astype(np.float32)
    got_w = np.asarray(diagnostics.target_mask_coverage(
        jnp.asarray(mask), jnp.asarray(gt), jnp.asarray(cls_ids),
        weights=jnp.asarray(wts)))
    want_w = _coverage_loop(mask, gt, cls_ids, 255, wts)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5)
    assert not np.allclose(got_w, want)
    # Broken inputs give other counts: 1-based class ids, an inverted mask.
    bad = np.asarray(diagnostics.target_mask_coverage(
        jnp.asarray(mask), jnp.asarray(gt),
        jnp.asarray(np.where(cls_ids >= 0, cls_ids + 1, -1))))
    assert not np.allclose(bad, want)
    inv = np.asarray(diagnostics.target_mask_coverage(
        jnp.asarray(1 - mask), jnp.asarray(gt), jnp.asarray(cls_ids)))
    np.testing.assert_allclose(inv[[0, 2]], want[[1, 3]] - want[[0, 2]])
    rates = diagnostics.coverage_rates(want)
    assert rates["object_recall"] == pytest.approx(want[0] / want[1])
    assert rates["background_rejection"] == pytest.approx(want[2] / want[3])
    assert diagnostics.coverage_rates(np.zeros(4)) == {
        "object_recall": None, "background_rejection": None}
    # A mask equal to the object keeps it all and rejects all the rest.
    gt1 = np.zeros((1, 8, 8), np.int32)
    gt1[0, 2:6, 4:8] = 3
    m1 = np.zeros((1, 1, 4, 4), np.float32)
    m1[0, 0, 1:3, 2:4] = 1
    r1 = diagnostics.coverage_rates(diagnostics.target_mask_coverage(
        jnp.asarray(m1), jnp.asarray(gt1), jnp.asarray([[2]])))
    assert r1 == {"object_recall": 1.0, "background_rejection": 1.0}
    with pytest.raises(ValueError, match="whole number"):
        diagnostics.target_mask_coverage(jnp.asarray(mask),
                                         jnp.asarray(gt[:, :7]),
                                         jnp.asarray(cls_ids))


def test_train_heads_on_pools_background_pool_adds_the_term():
    """`bg_pool=True` (`cmpa.background_pool`): the first step's loss is
    the plain loss plus w·L_bg of the tokens pooled under 1 − max pool,
    computed here from a fresh copy of the same heads."""
    from flax import nnx  # noqa: PLC0415

    from ssr_jax import cmpa  # noqa: PLC0415

    p = diagnostics_cmpa.cmpa_problem(num_images=16, confound=0.5,
                                      noise=0.1, text_overlap=0.7, seed=0)
    tokens = p.tokens[:, 1:]
    pools = p.obj[:, None].astype(np.float32)
    cls_ids = p.cls[:, None]
    kw = dict(steps=1, batch=8, lr=1e-3, hidden_dim=32, dim=16, seed=0)
    _, plain = diagnostics_cmpa.train_heads_on_pools(
        tokens, pools, cls_ids, p.text_fg, p.text_bg, **kw)
    _, with_bg = diagnostics_cmpa.train_heads_on_pools(
        tokens, pools, cls_ids, p.text_fg, p.text_bg, bg_pool=True,
        bg_pool_weight=0.5, **kw)
    heads = cmpa.CMPAHeads(tokens.shape[-1], p.text_fg.shape[1],
                           hidden_dim=32, dim=16, rngs=nnx.Rngs(0))
    idx = np.random.default_rng(0).choice(len(tokens), 8, replace=False)
    v = heads.isa(jnp.asarray(tokens[idx]), mask=jnp.ones((8, tokens.shape[1]),
                                                           bool))
    f_all = heads.tsa(jnp.concatenate([jnp.asarray(p.text_fg),
                                       jnp.asarray(p.text_bg)]))
    c = p.text_fg.shape[0]
    f_img = cmpa.masked_average_pool(v, jnp.asarray(pools[idx]),
                                     jnp.asarray(cls_ids[idx] >= 0))
    l_proto, _ = cmpa.cmpa_loss("cross", f_img, f_all[:c],
                                jnp.asarray(cls_ids[idx] >= 0),
                                jnp.asarray(cls_ids[idx]),
                                cmpa.init_protos(c, 16, c), heads.tau(),
                                "class")
    f_bg, ok = cmpa.background_pool(v, jnp.asarray(pools[idx]),
                                    jnp.asarray(cls_ids[idx] >= 0))
    l_bg, _ = cmpa.background_pool_loss(f_bg, ok, f_all[:c], f_all[c:],
                                        heads.tau())
    assert bool(ok.all()) and float(l_bg) > 0
    np.testing.assert_allclose(with_bg["loss"][0],
                               float(l_proto) + 0.5 * float(l_bg), rtol=1e-4)
    assert abs(with_bg["loss"][0] - plain["loss"][0]) > 1e-3
    np.testing.assert_allclose(with_bg["bg_loss"][0], float(l_bg), rtol=1e-4)
    assert plain["bg_loss"] == [0.0]
