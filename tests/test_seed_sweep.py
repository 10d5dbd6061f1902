"""The embedded default's seed sweep (`--config.seeds`, ssr_jax/embedded.py):
mean ± sd, margins and verdicts against hand-computed values, the config
check, and the table. The sweep end to end (the README command, 2 tiny
seeds, reuse on re-run, seed 0's results equal to the single default run's,
another config refused) is in
tests/test_readme_commands.py::test_readme_embedded_commands."""

from __future__ import annotations

import math

import config_fixtures
import pytest

from ssr_jax import config_check, embedded


def _results(initial, with_cmpa, attn, dino, sgc, pseudo=0.2, val=0.1):
    """A results.json as far as the sweep reads it."""
    return {"seeds": {"initial_cam": with_cmpa, "clip_attn": attn,
                      "clip_dino": dino, "sgc": sgc,
                      "pseudo_labels": pseudo},
            "cmpa": {"initial_cam_without": initial,
                     "initial_cam_with": with_cmpa},
            "val": {"miou": val}}


def test_mean_sd_is_the_sample_sd():
    mean, sd = embedded.mean_sd([0.30, 0.32, 0.34])
    assert mean == pytest.approx(0.32)
    # ddof=1: sqrt((0.02² + 0 + 0.02²) / 2) = 0.02 (ddof=0 gives 0.0163)
    assert sd == pytest.approx(0.02)
    assert embedded.mean_sd([0.5]) == (0.5, None)
    with pytest.raises(ValueError):
        embedded.mean_sd([])


@pytest.mark.parametrize("margin,sd,want", [
    (0.05, 0.01, "holds"),        # 0.05 > 2 * 0.01
    (0.019, 0.01, "undecided"),   # inside ±0.02
    (0.021, 0.01, "holds"),
    (-0.021, 0.01, "fails"),
    (-0.019, 0.01, "undecided"),
    (0.02, 0.01, "undecided"),    # on the bar: not above it
    (0.01, 0.0, "holds"),         # no spread: the sign decides
    (0.0, 0.0, "undecided"),
    (0.5, None, "undecided"),     # one seed: no spread measured
])
def test_verdict(margin, sd, want):
    assert embedded.verdict(margin, sd) == want


def test_summarize_rows_and_margins_by_hand():
    per_seed = {
        2: _results(0.30, 0.35, 0.26, 0.28, 0.27, val=0.30),
        0: _results(0.30, 0.33, 0.20, 0.26, 0.30, val=0.20),
        1: _results(0.30, 0.34, 0.22, 0.25, 0.31, val=0.25),
    }
    s = embedded.summarize(per_seed)
    assert s["training_seeds"] == [0, 1, 2]  # sorted, values in that order
    r = s["rows"]["CAM seeds (train): initial CAM, with CMPA"]
    assert r["key"] == "cmpa.initial_cam_with"
    assert r["values"] == [0.33, 0.34, 0.35]
    assert r["mean"] == pytest.approx(0.34)
    assert r["sd"] == pytest.approx(0.01)
    plain = s["rows"]["CAM seeds (train): initial CAM, plain CLIP"]
    assert plain["sd"] == pytest.approx(0.0)
    val = s["rows"]["segmentation (val, decoder, msc+flip)"]
    assert val["values"] == [0.20, 0.25, 0.30]
    assert val["sd"] == pytest.approx(0.05)

    o = s["orderings"]
    # CMPA: 0.03 / 0.04 / 0.05 -> margin 0.04, sd 0.01: holds
    c = o["initial_cam_with > initial_cam_without"]
    assert c["differences"] == pytest.approx([0.03, 0.04, 0.05])
    assert c["margin"] == pytest.approx(0.04)
    assert c["sd"] == pytest.approx(0.01)
    assert c["verdict"] == "holds"
    # CLIP attention vs initial CAM (with CMPA): -0.13 / -0.12 / -0.09
    # -> margin -0.34/3, sd sqrt(((0.0167)² + (0.0067)² + (0.0233)²)/2)
    a = o["clip_attn > initial_cam"]
    assert a["margin"] == pytest.approx(-0.34 / 3)
    assert a["sd"] == pytest.approx(math.sqrt(
        ((-0.13 + 0.34 / 3) ** 2 + (-0.12 + 0.34 / 3) ** 2
         + (-0.09 + 0.34 / 3) ** 2) / 2))
    assert a["verdict"] == "fails"
    assert a["holds_per_seed"] == [False, False, False]
    # SGC vs DINO: +0.04 / +0.06 / -0.01 -> margin 0.03, sd 0.036: undecided
    g = o["sgc > clip_dino"]
    assert g["differences"] == pytest.approx([0.04, 0.06, -0.01])
    assert g["margin"] == pytest.approx(0.03)
    assert g["sd"] == pytest.approx(math.sqrt((0.01 ** 2 + 0.03 ** 2
                                               + 0.04 ** 2) / 2))
    assert g["verdict"] == "undecided"
    assert g["holds_per_seed"] == [True, True, False]


def test_margins_use_the_spread_of_the_paired_differences():
    """Rows that move together over seeds: each row's own sd (0.1) would
    swamp a 0.01 margin, the per-seed differences (sd 0.001) do not."""
    per_seed = {i: _results(0.3, 0.3, a, a - d, 0.1)
                for i, (a, d) in enumerate([(0.30, 0.010), (0.40, 0.011),
                                            (0.50, 0.009)])}
    s = embedded.summarize(per_seed)
    o = s["orderings"]["clip_dino > clip_attn"]
    assert o["margin"] == pytest.approx(-0.01)
    assert o["sd"] == pytest.approx(0.001)
    assert o["verdict"] == "fails"
    assert s["rows"]["CAM seeds (train): + CLIP attention"]["sd"] == (
        pytest.approx(0.1))


def test_orderings_of_one_run_are_the_sweeps_signs():
    res = _results(0.30, 0.33, 0.20, 0.26, 0.30)
    assert embedded.orderings(res) == {
        "sgc > clip_dino": True, "clip_dino > clip_attn": True,
        "clip_attn > initial_cam": False,
        "initial_cam_with > initial_cam_without": True}
    s = embedded.summarize({0: res, 1: res})
    assert {k: v["holds_per_seed"][0] for k, v in s["orderings"].items()} \
        == embedded.orderings(res)


def test_sweep_table_shows_values_mean_sd_and_verdicts():
    per_seed = {0: _results(0.30, 0.33, 0.20, 0.26, 0.30),
                1: _results(0.30, 0.34, 0.22, 0.25, 0.31)}
    table = embedded.sweep_table(embedded.summarize(per_seed))
    lines = table.splitlines()
    assert "seed 0" in lines[0] and "seed 1" in lines[0]
    row = next(ln for ln in lines if ln.startswith(
        "CAM seeds (train): initial CAM, with CMPA"))
    assert row.split()[-5:] == ["33.0", "34.0", "33.5", "±", "0.7"]
    assert any(ln.startswith("holds") and "initial_cam_with" in ln
               for ln in lines)
    assert "2 sd of the per-seed differences" in table


def _config(**kw):
    from ssr_jax import config_defaults  # noqa: PLC0415
    from ssr_jax.data import specs  # noqa: PLC0415

    c = config_defaults.base_config()
    c.data.name = specs.SYNTHETIC.name
    for k, v in kw.items():
        c[k] = v
    return c


def _seed_errors(c):
    return [e for e in config_check.validate(c, check_devices=False)
            if e.startswith("seeds=")]


@pytest.mark.parametrize("seeds,needle", [
    ((0, 1, 2), None),
    ((), None),
    (("a,b",), "need non-negative integers"),
    ((0, 1.5), "need non-negative integers"),
    ((-1,), "need non-negative integers"),
    ((True,), "need non-negative integers"),
    ((1, 1), "listed twice"),
])
def test_config_check_seeds(seeds, needle):
    errors = _seed_errors(_config(seeds=seeds))
    if needle is None:
        assert errors == []
    else:
        assert len(errors) == 1 and needle in errors[0], errors


def test_config_check_seeds_only_for_embedded_training():
    c = _config(seeds=(0, 1), mode="eval")
    assert any("a sweep trains" in e for e in _seed_errors(c))
    c = _config(seeds=(0, 1))
    c.data.name = "voc"
    assert any("embedded default" in e for e in _seed_errors(c))


def test_seed_config_is_a_single_run_with_that_seed():
    c = _config(seeds=(3, 4), seed=0)
    one = embedded.seed_config(c, 4)
    assert one.seed == 4 and tuple(one.seeds) == ()
    assert c.seed == 0 and tuple(c.seeds) == (3, 4)  # the sweep's untouched
    single = _config(seed=4)
    from ssr_jax import checkpointing  # noqa: PLC0415

    assert checkpointing.config_hash(one) == checkpointing.config_hash(
        single)


def test_preempted_sweep_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Control flow of `sweep` with `run` replaced (the real run is tested
    in test_readme_commands): a preemption in seed 1 propagates (exit 75
    in main); the re-run reuses seed 0 and trains seeds 1 and 2 only."""
    import json  # noqa: PLC0415

    from ssr_jax import checkpointing  # noqa: PLC0415

    calls = []
    preempt = {1}

    def fake_run(cfg, wd):
        calls.append(int(cfg.seed))
        assert tuple(cfg.seeds) == () and wd.endswith(f"seed{cfg.seed}")
        if cfg.seed in preempt:
            preempt.discard(cfg.seed)
            raise checkpointing.PreemptedError("stopped by SIGTERM")
        v = 0.3 + 0.01 * cfg.seed
        res = dict(_results(0.3, v, v - 0.1, v - 0.05, v - 0.06),
                   seed=int(cfg.seed),
                   config_hash=checkpointing.config_hash(cfg))
        with open(f"{wd}/results.json", "w") as f:
            json.dump(res, f)
        return res

    monkeypatch.setattr(embedded, "run", fake_run)
    monkeypatch.setattr(embedded, "prepare", lambda config: None)
    c = _config(seeds=(0, 1, 2))
    with pytest.raises(checkpointing.PreemptedError):
        embedded.sweep(c, str(tmp_path))
    assert calls == [0, 1]
    assert not (tmp_path / "sweep.json").exists()
    summary = embedded.sweep(c, str(tmp_path))
    assert calls == [0, 1, 1, 2]
    assert summary["reused"] == [0]
    assert summary["rows"]["CAM seeds (train): initial CAM, with CMPA"][
        "values"] == pytest.approx([0.30, 0.31, 0.32])
    assert json.loads((tmp_path / "sweep.json").read_text())["reused"] == [0]
    # Results of another config are refused, not reused.
    c2 = _config(seeds=(0, 1, 2))
    c2.train.num_steps = 7
    with pytest.raises(config_check.ConfigError, match="another config"):
        embedded.sweep(c2, str(tmp_path))
    assert calls == [0, 1, 1, 2]


def _synthetic(**kw):
    c = config_fixtures.load_config("configs/synthetic.py:tiny")
    for k, v in kw.items():
        c[k] = v
    return c


def test_config_check_sweep_encoders_needs_a_sweep():
    errors = config_check.validate(_synthetic(sweep_encoders=True),
                                   check_devices=False)
    assert [e for e in errors if e.startswith("sweep_encoders")], errors
    errors = config_check.validate(
        _synthetic(sweep_encoders=True, seeds=(0, 1)), check_devices=False)
    assert not [e for e in errors if e.startswith(("sweep_encoders",
                                                   "seeds="))], errors


def test_seed_config_with_sweep_encoders_sets_the_pretrain_seed():
    """Seed N of an encoder sweep is the single run with --config.seed=N
    --config.pretrain.seed=N (same config hash, so its results are
    reused); without the flag the encoders stay at pretrain.seed."""
    from ssr_jax import checkpointing  # noqa: PLC0415

    c = _synthetic(seeds=(0, 2), sweep_encoders=True)
    one = embedded.seed_config(c, 2)
    assert one.seed == 2 and one.pretrain.seed == 2
    assert one.sweep_encoders is False and tuple(one.seeds) == ()
    assert c.pretrain.seed == 0 and c.sweep_encoders is True
    single = _synthetic(seed=2)
    single.pretrain.seed = 2
    assert checkpointing.config_hash(one) == checkpointing.config_hash(
        single)
    fixed = embedded.seed_config(_synthetic(seeds=(0, 2)), 2)
    assert fixed.seed == 2 and fixed.pretrain.seed == 0


def test_encoder_sweep_prepares_each_seeds_encoders(tmp_path, monkeypatch):
    """Control flow with `run` / `prepare` replaced: each seed's config is
    prepared with its own pretrain.seed (never the sweep's own), the
    summary says the encoders varied and names them, the table says so."""
    import json  # noqa: PLC0415

    from ssr_jax import checkpointing  # noqa: PLC0415

    prepared = []

    def fake_prepare(config):
        prepared.append((int(config.seed), int(config.pretrain.seed)))
        config.model.clip_path = f"/enc/clip{config.pretrain.seed}"

    def fake_run(cfg, wd):
        fake_prepare(cfg)
        v = 0.3 + 0.01 * cfg.seed
        res = dict(_results(v, v, v - 0.1, v - 0.05, v - 0.06),
                   seed=int(cfg.seed),
                   encoders={"clip": cfg.model.clip_path},
                   config_hash=checkpointing.config_hash(cfg))
        with open(f"{wd}/results.json", "w") as f:
            json.dump(res, f)
        return res

    monkeypatch.setattr(embedded, "run", fake_run)
    monkeypatch.setattr(embedded, "prepare", fake_prepare)
    c = _synthetic(seeds=(1, 3), sweep_encoders=True)
    summary = embedded.sweep(c, str(tmp_path))
    assert prepared == [(1, 1), (1, 1), (3, 3), (3, 3)]  # sweep, then run
    assert summary["sweep_encoders"] is True
    assert summary["encoders"] == {"1": {"clip": "/enc/clip1"},
                                   "3": {"clip": "/enc/clip3"}}
    assert "pretrained its own encoders" in (tmp_path / "sweep.md"
                                             ).read_text()
    # Re-run: the hash of each seed's prepared config matches, reused.
    prepared.clear()
    again = embedded.sweep(c, str(tmp_path))
    assert again["reused"] == [1, 3] and prepared == [(1, 1), (3, 3)]
