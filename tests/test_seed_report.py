"""`pretrain_report.seed_report` on a written 6-image world (64 px) and tiny
random encoders: the GradCAM scale it reports and uses.

The synthetic config sets `cam.logit_scale = 0`, which the method reads as
"the checkpoint's own learned exp(logit_scale)" (`ssr.gradcam_scale`).
`logit_scale="config"` must mean the same scale, not a literal 0 (a
softmax at scale 0 has zero gradient: every initial CAM would be 0 and
every seed pixel background).
"""

from __future__ import annotations

import math

import config_fixtures
import jax.numpy as jnp
import numpy as np
import pytest
import ssr_fixtures

from ssr_jax import pretrain_report, report_format, ssr, text
from ssr_jax.data import synthetic
from ssr_jax.models import loading


def _synthetic_config(arg: str):
    return config_fixtures.load_config(f"configs/synthetic.py:{arg}")


def _world_and_encoders(tmp_path, num_train: int, num_val: int):
    """A written 64 px world and tiny random encoders (2 CLIP blocks)."""
    root = tmp_path / "world"
    synthetic.generate(root, seed=0, num_train=num_train, num_val=num_val,
                       image_size=64)
    fg, bg, _ = text.dataset_prompts("synthetic", str(root))
    clip_path, dino_path = ssr_fixtures.make_tiny_encoders(
        str(tmp_path / "enc"), list(fg) + list(bg), layers=2)
    return root, clip_path, dino_path


@pytest.mark.slow  # ~25 s of CPU (jit of the whole seed report), 62 s loaded
def test_seed_report_config_scale_is_the_methods(tmp_path):
    root, clip_path, dino_path = _world_and_encoders(tmp_path, 4, 2)
    c = _synthetic_config("tiny")
    c.data.crop_size = 64
    c.sgc.clip_layers = 1
    assert c.cam.logit_scale == 0.0  # the case this test is about
    learned = math.exp(float(loading.load_clip(clip_path).logit_scale[...]))

    got = pretrain_report.seed_report(c, clip_path, dino_path, str(root),
                                      max_images=2, batch_size=2,
                                      logit_scale="config",
                                      mask_grid={"theta_h": (0.4,),
                                                 "theta_r": (0.5,),
                                                 "kmeans_init": ()},
                                      affinity_mix=(0.0, 1.0),
                                      affinity_levers=True,
                                      cam_mix=(0.0, 0.5, 1.0),
                                      cmpa_pools=("cam", "refined"))
    assert got["num_images"] == 2
    for source in ("cam", "refined"):  # heads on fixed learned pools
        for row in pretrain_report.pretrain_report_cmpa.pool_source_rows(
                source):
            assert 0 <= got["miou"][row] <= 1, row
        assert got["oracle_cmpa"][f"pools_{source}"]["last_loss"] > 0
    # The mask grid at the config's own settings reproduces the Table 3
    # rows that use the same mask (the method's refine_cams path).
    grid = {(g["mask"], g.get("kmeans_init"),
             g.get("theta_h", g.get("threshold"))): g
            for g in got["mask_grid"]}
    assert len(grid) == 2
    sgc_g = grid[("superpixel", c.sgc.kmeans_init, c.sgc.theta_h)]["miou"]
    box_g = grid[("box", None, c.sgc.box_threshold)]["miou"]
    m = got["miou"]
    for row, sgc_key, box_key in (
            ("learned", "sgc", "clip_dino"),
            ("oracle_attn", "oracle_attn_sgc", "oracle_attn"),
            ("oracle_cam", "oracle_cam_sgc", "oracle_cam_clip_dino")):
        assert math.isclose(sgc_g[row], m[sgc_key], abs_tol=1e-9), row
        assert math.isclose(box_g[row], m[box_key], abs_tol=1e-9), row
    # The purity threshold at α = 0 reproduces the box-mask rows (the
    # method's refine_cams path); at α = 1 the mixed affinity is pure.
    mix = got["affinity_mix"]
    for base, key in (("clip", "clip_attn"), ("fused", "clip_dino"),
                      ("dino", "clip_dino")):
        p0, p1 = mix[base]["points"]
        assert math.isclose(p0["miou"]["learned"], m[key], abs_tol=1e-9)
        assert math.isclose(p0["miou"]["oracle_cam"], m["oracle_cam_" + key],
                            abs_tol=1e-9)
        assert p1["purity"][1] == pytest.approx(1.0, abs=1e-5)
    assert mix["clip"]["points"][0]["purity"] == pytest.approx(
        got["purity"]["clip"], abs=1e-6)
    assert mix["dino"]["points"][0]["purity"] == pytest.approx(
        got["purity"]["dino"], abs=1e-6)
    # The CAM mix's ends are the learned and the oracle-CAM Table 3 rows.
    cmix = got["cam_mix"]
    assert cmix["alphas"] == [0.0, 0.5, 1.0]
    for (row, key), (_, okey) in zip(
            zip(ssr.TABLE3_STEPS, ("initial", "clip_attn", "clip_dino",
                                   "sgc"), strict=True),
            zip(ssr.TABLE3_STEPS, ("oracle_cam", "oracle_cam_clip_attn",
                                   "oracle_cam_clip_dino", "oracle_cam_sgc"),
                strict=True), strict=True):
        assert math.isclose(cmix["points"][0]["miou"][row], m[key],
                            abs_tol=1e-9), row
        assert math.isclose(cmix["points"][-1]["miou"][row], m[okey],
                            abs_tol=1e-9), row
    assert set(cmix["first_holds"]) == {
        f"{r} > {q}" for r, q in pretrain_report.CAM_MIX_ORDERINGS}
    # The DINO mix is judged against "+CLIP attention" (its ordering).
    assert mix["dino"]["threshold"]["learned"]["initial"] == m["clip_attn"]
    assert {f"clip_block{i}" for i in (1, 2)} <= set(got["purity"])
    # SSR's A_DINO is the last DINO block's (ssr.affinity_encoder_affinity).
    last = max(k for k in got["purity"] if k.startswith("dino_block"))
    assert got["purity"][last] == pytest.approx(got["purity"]["dino"],
                                                abs=1e-6)
    # The lever at the config's own setting reproduces the same rows.
    levers = got["affinity_levers"]
    assert len(levers) == 2 * 2 + 3 * 2  # 2 blocks x 2 powers + Sinkhorn
    own = [g for g in levers if (g["clip_layers"], g["sinkhorn_iters"],
                                 g["transition_power"]) == (
        c.sgc.clip_layers, c.sgc.sinkhorn_iters, c.sgc.transition_power)]
    assert len(own) == 1
    for row in ("clip_attn", "clip_dino", "oracle_cam_clip_attn"):
        assert math.isclose(own[0]["miou"][row], m[row], abs_tol=1e-9), row
    for g in levers:  # the A_DINO stand-ins are scored in every setting
        assert all(0 <= g["miou"][r] <= 1
                   for r in pretrain_report.LEVER_ROWS), g
    assert own[0]["purity"]["fused_transition"] == pytest.approx(
        got["purity"]["transition"], abs=1e-6)
    for g in got["mask_grid"]:
        for cam in ("learned_cam", "oracle_cam"):
            assert all(v is None or 0 <= v <= 1 for v in g[cam].values())
    assert math.isclose(got["logit_scale"], learned, rel_tol=1e-6), (
        got["logit_scale"], learned)
    # The initial CAMs are not all zero: some pixel is given a class.
    fg_pred = sum(r["pred_pixels"] for r in
                  got["scores"]["initial"]["per_class"][1:])
    assert fg_pred > 0
    # The printed report (report_format) reads every row it scored.
    printed = report_format.format_seed_diagnostics(got)
    assert "Table 3 rows" in printed and "oracle CMPA heads" in printed
    assert "target-zone masks" in printed
    assert "affinity mixed toward the oracle" in printed
    assert "CLIP affinity levers" in printed
    assert "initial CAM moved toward the oracle" in printed
    assert "heads on pools under the +SGC CAM (fixed)" in printed
    assert all(k in printed for k in got["miou"])


@pytest.mark.slow  # two jits of a small seed report, ~20 s
def test_cam_mix_affinity_path_is_the_learned_one_at_zero(tmp_path):
    """--cam_mix_affinity: a vanishing β gives the β = 0 rows (the mixed
    path reads the same A_CLIP and A_DINO as the method); A_DINO's own β
    moves the DINO rows and leaves the CLIP one."""
    root, clip_path, dino_path = _world_and_encoders(tmp_path, 4, 2)
    c = _synthetic_config("tiny")
    c.data.crop_size = 64
    c.sgc.clip_layers = 1

    def rows(beta, beta_dino=None):
        got = pretrain_report.seed_report(
            c, clip_path, dino_path, str(root), max_images=2, batch_size=2,
            oracle_cmpa=False, cam_mix=(0.0, 1.0), cam_mix_affinity=beta,
            cam_mix_affinity_dino=beta_dino)
        assert got["cam_mix"]["affinity_alpha"] == beta
        assert got["cam_mix"]["affinity_alpha_dino"] == (
            beta if beta_dino is None else beta_dino)
        return [p["miou"] for p in got["cam_mix"]["points"]]

    plain, tiny = rows(0.0), rows(1e-6)
    dino_only = rows(0.0, 1.0)  # A_CLIP as learned, A_DINO := oracle
    for p, d in zip(plain, dino_only, strict=True):
        assert math.isclose(p["clip_attn"], d["clip_attn"], abs_tol=1e-3)
        assert d["initial_cam"] == p["initial_cam"]
    assert any(dino_only[i][k] != plain[i][k] for i in range(2)
               for k in ("clip_dino", "sgc")), (plain, dino_only)
    for p, t in zip(plain, tiny, strict=True):
        for k in ssr.TABLE3_STEPS:
            assert math.isclose(p[k], t[k], abs_tol=1e-3), (k, p, t)
    with pytest.raises(ValueError, match="cam_mix_affinity"):
        pretrain_report.seed_report(c, clip_path, dino_path, str(root),
                                    max_images=2, cam_mix=(0.0,),
                                    cam_mix_affinity=1.5)
    with pytest.raises(ValueError, match="cam_mix_affinity_dino"):
        pretrain_report.seed_report(c, clip_path, dino_path, str(root),
                                    max_images=2, cam_mix=(0.0,),
                                    cam_mix_affinity_dino=-0.1)


def test_purity_threshold_interpolates_the_first_crossing():
    a, p = [0.0, 0.5, 1.0], [0.4, 0.7, 1.0]
    got = pretrain_report.purity_threshold(a, p, [0.25, 0.46, 0.57], 0.358)
    f = (0.358 - 0.25) / (0.46 - 0.25)
    assert got["alpha_star"] == 0.5 and got["purity_star"] == 0.7
    assert math.isclose(got["alpha_cross"], 0.5 * f)
    assert math.isclose(got["purity_cross"], 0.4 + 0.3 * f)
    # Already above at the first point; never above; equal is not above.
    got = pretrain_report.purity_threshold(a, p, [0.4, 0.2, 0.5], 0.3)
    assert got["alpha_star"] == 0.0 and got["alpha_cross"] == 0.0
    got = pretrain_report.purity_threshold(a, p, [0.1, 0.2, 0.3], 0.3)
    assert got == {"alpha_star": None, "purity_star": None,
                   "alpha_cross": None, "purity_cross": None}
    with pytest.raises(ValueError, match="increasing weights in"):
        pretrain_report.affinity_mix_weights(["0.5", "0.2"])
    with pytest.raises(ValueError, match="increasing weights in"):
        pretrain_report.affinity_mix_weights(["0", "x"])
    assert pretrain_report.affinity_mix_weights(["0", "1"]) == [0.0, 1.0]


def test_affinity_mix_vs_loops():
    """`_affinity_mix` (purity of the mixed affinity and its transition,
    box-mask mIoU rows) against loops and the method's own refine_cams
    with the mixed affinity given as clip_aff, on tiny random inputs."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from ssr_jax import diagnostics, metrics, par, sgc  # noqa: PLC0415

    rng = np.random.default_rng(0)
    b, k, gh, gw, c, px = 2, 2, 4, 4, 4, 8
    n = gh * gw
    cams = rng.random((b, k, gh, gw)).astype(np.float32)
    ocams = (rng.random((b, k, gh, gw)) > 0.6).astype(np.float32)
    slot = np.array([[True, True], [True, False]])
    cls_ids = np.where(slot, rng.integers(0, c - 1, (b, k)), -1)
    gt = rng.integers(0, c, (b, gh * px, gw * px))
    gt[0, :3] = 255
    plab = np.asarray(pretrain_report.patch_labels(
        jnp.asarray(gt), px, c))
    oracle = diagnostics.oracle_affinity(jnp.asarray(plab))
    bases = {name: jnp.asarray(rng.random((b, n, n)).astype(np.float32)
                               * (1 + i))
             for i, name in enumerate(pretrain_report.AFFINITY_MIX_BASES)}
    # "dino" mixes A_DINO only and fuses it with A_CLIP (Eq. 9).
    clip_aff = jnp.asarray(rng.random((b, n, n)).astype(np.float32))
    bases["dino"] = (clip_aff, bases["dino"])
    s = sgc.SGCParams(box_threshold=0.4, sinkhorn_iters=3)
    alphas = (0.0, 0.4, 1.0)
    pur, conf = map(np.asarray, jax.jit(
        lambda *a: pretrain_report._affinity_mix(*a, s, c, 255))(
        jnp.asarray(alphas), bases, oracle, jnp.asarray(plab),
        jnp.asarray(cams), jnp.asarray(ocams), jnp.asarray(slot),
        jnp.asarray(cls_ids), jnp.asarray(gt)))
    nb = len(pretrain_report.AFFINITY_MIX_BASES)
    assert pur.shape == (3, nb, 2, 2, 2) and conf.shape == (3, nb, 2, c, c)

    trans_fn = jax.jit(lambda a: sgc.transition_matrix(a, 3))

    @jax.jit
    def ref_fn(cm, mixed):  # the method's path, the mix as clip_aff
        out = sgc.refine_cams(cm, jnp.asarray(slot), clip_aff=mixed,
                              use_dino_attn=False, mask_kind="box",
                              clip_weight=1.0, box_threshold=0.4)
        _, lab = par.cams_to_labels(out, jnp.asarray(cls_ids), gt.shape[1:])
        return metrics.confusion_matrix_jnp(lab, jnp.asarray(gt), c, 255)

    def purity_loop(aff):
        sums, counts = np.zeros(2), np.zeros(2)
        for i in range(b):
            for q in range(n):
                if plab[i, q] < 0:
                    continue
                keys = [j for j in range(n) if plab[i, j] >= 0]
                tot = sum(aff[i, q, j] for j in keys)
                own = sum(aff[i, q, j] for j in keys
                          if plab[i, j] == plab[i, q])
                f = int(plab[i, q] > 0)
                sums[f] += own / tot if tot > 0 else 0.0
                counts[f] += 1
        return sums, counts

    for ai, alpha in enumerate(alphas):
        for bi, name in enumerate(pretrain_report.AFFINITY_MIX_BASES):
            fused_with = None
            base = bases[name]
            if isinstance(base, tuple):
                fused_with, base = np.asarray(base[0], np.float64), base[1]
            base = np.asarray(base, np.float64)
            mixed = np.zeros_like(base)
            for i in range(b):
                for q in range(n):
                    own = [j for j in range(n) if j == q or (
                        plab[i, q] >= 0 and plab[i, j] == plab[i, q])]
                    for j in range(n):
                        o = base[i, q].sum() / len(own) if j in own else 0
                        mixed[i, q, j] = (1 - alpha) * base[i, q, j] + (
                            alpha * o)
            used = mixed if fused_with is None else (
                0.4 * fused_with + 0.6 * mixed)
            trans = np.asarray(trans_fn(jnp.asarray(used, jnp.float32)))
            for t, arr in enumerate((mixed, trans)):
                sums, counts = purity_loop(arr)
                np.testing.assert_allclose(pur[ai, bi, t, 0], sums,
                                           rtol=1e-4)
                np.testing.assert_array_equal(pur[ai, bi, t, 1], counts)
            for r, cm in enumerate((cams, ocams)):
                want = np.asarray(ref_fn(jnp.asarray(cm),
                                         jnp.asarray(used, jnp.float32)))
                np.testing.assert_array_equal(conf[ai, bi, r], want)
    # The rows differ across α (the mix is not ignored).
    assert (conf[0] != conf[-1]).any()


def test_seed_report_rejects_clip_layers_beyond_the_encoder(tmp_path):
    """sgc.clip_layers above the CLIP's depth is a ConfigError naming the
    field, raised before any jitted step (it used to end in a traceback
    from inside the seed function)."""
    from ssr_jax import config_check

    root, clip_path, dino_path = _world_and_encoders(tmp_path, 2, 1)
    c = _synthetic_config("tiny")
    c.data.crop_size = 64
    c.sgc.clip_layers = 3
    with pytest.raises(config_check.ConfigError,
                       match=r"sgc.clip_layers=3: CLIP has 2 blocks"):
        pretrain_report.seed_report(c, clip_path, dino_path, str(root),
                                    max_images=1, batch_size=1,
                                    oracle_cmpa=False)


def test_salient_reweights_columns_and_keeps_rows_and_purity():
    rng = np.random.default_rng(0)
    b, n = 2, 6
    aff = rng.random((b, n, n)).astype(np.float32)
    aff[0, :3, 3:] = 0.0  # patches 0-2 attend only inside their region
    aff[0, 3:, :3] = 0.0
    r = rng.random((b, n)).astype(np.float32) + 0.1
    got = np.asarray(pretrain_report.salient(jnp.asarray(aff),
                                             jnp.asarray(r)))
    want = np.zeros_like(aff)
    for i in range(b):
        for q in range(n):
            w = [aff[i, q, k] * r[i, k] for k in range(n)]
            want[i, q] = [x / sum(w) * aff[i, q].sum() for x in w]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1), aff.sum(-1), rtol=1e-5)
    assert np.all(got[0, :3, 3:] == 0) and np.all(got[0, 3:, :3] == 0)
    # Flat saliency is the identity.
    np.testing.assert_allclose(
        np.asarray(pretrain_report.salient(jnp.asarray(aff),
                                           jnp.ones((b, n)))), aff,
        rtol=1e-5)


def test_off_self_drops_the_diagonal_and_keeps_row_sums():
    rng = np.random.default_rng(1)
    b, n = 2, 5
    aff = rng.random((b, n, n)).astype(np.float32)
    aff[1, 2] = 0.0
    aff[1, 2, 2] = 0.7  # a row with nothing off the diagonal keeps itself
    got = np.asarray(pretrain_report.off_self(jnp.asarray(aff)))
    want = aff.copy()
    for i in range(b):
        for q in range(n):
            rest = aff[i, q].sum() - aff[i, q, q]
            if rest > 0:
                want[i, q] = aff[i, q] / rest * aff[i, q].sum()
                want[i, q, q] = 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1), aff.sum(-1), rtol=1e-5)


def test_pooled_cmpa_heads_train_on_the_named_pools(monkeypatch):
    """`pooled_cmpa_heads` trains as the oracle CMPA does (the same
    settings: shapes, budget, the heads' lr, seed), on the pools it is
    told instead of the ground truth, plain and with the background-pool
    term. The trainer is replaced by a recorder: its own tests are in
    tests/test_diagnostics.py."""
    from ssr_jax import diagnostics_cmpa
    from ssr_jax import pretrain_report_cmpa as prc

    calls = []

    def record(tokens, pools, cls_ids, text_fg, text_bg, **kw):
        calls.append((pools, kw))
        return len(calls), {"loss": [2.0, 1.0], "acc": [0.5, 0.7],
                            "bg_loss": [0.4, 0.1], "tau": 0.05}

    monkeypatch.setattr(diagnostics_cmpa, "train_heads_on_pools", record)
    c = _synthetic_config("tiny")
    c.optim.heads_lr_mult = 0.1
    gt, cam, refined = (np.full((1, 1, 4), v, np.float32)
                        for v in (1.0, 0.5, 0.25))
    pool = {"tokens": np.zeros((1, 4, 3), np.float32), "pools": gt,
            "pools_cam": cam, "pools_refined": refined,
            "cls_ids": np.zeros((1, 1), np.int32),
            "token_valid": np.ones((1, 4), bool)}
    prc.oracle_cmpa_heads(c, pool, None, None)
    oracle_kw = calls[0][1]
    assert calls[0][0] is gt and oracle_kw["lr"] == pytest.approx(
        c.optim.lr * 0.1)
    for source, want in (("cam", cam), ("refined", refined)):
        del calls[:]
        heads, info = prc.pooled_cmpa_heads(c, pool, None, None, source)
        assert list(heads) == list(prc.pool_source_rows(source))
        assert [p is want for p, _ in calls] == [True, True]
        assert calls[0][1] == oracle_kw
        assert calls[1][1] == {**oracle_kw, "bg_pool": True}
        assert info["last_loss"] == 1.0
