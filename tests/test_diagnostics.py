"""diagnostics.py against slow Python loops on small random inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax import diagnostics
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
