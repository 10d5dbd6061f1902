"""benchmarks/run.py: the shared batch, the JPEG tree, goals and the table,
and (slow) one real run of the CLI in its subprocess-per-cell mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import run
from ssr_jax import config_defaults, input_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_batch_layout():
    b = run.make_batch(3, 64, 20, 16, 64, seed=2)
    assert b["image"].shape == (3, 64, 64, 3) and b["image"].dtype == np.uint8
    assert b["valid"].dtype == bool and not b["valid"][0, :, -1].any()
    assert b["valid"][1:].all()
    sp = b["superpixels"]
    assert sp.dtype == np.int32 and sp.max() < 64
    assert ((sp == -1) == ~b["valid"]).all()  # padding has no superpixel
    assert (b["image"][~b["valid"]] == 0).all()
    assert b["labels"].sum(1).tolist() == [1.0, 2.0, 3.0]
    again = run.make_batch(3, 64, 20, 16, 64, seed=2)
    assert all((again[k] == b[k]).all() for k in b)  # both sides: same data


def test_voc_tree_feeds_the_training_iterator(tmp_path):
    root = run.write_voc_tree(str(tmp_path / "voc"), 4, hw=(75, 100))
    c = config_defaults.dataset_config("voc", "weclip,tiny")
    c.data.root, c.data.train_split = root, "train"
    c.data.cache_dir = str(tmp_path / "cache")
    it = input_pipeline.train_iterator(c, process_index=0, process_count=1)
    batch = next(it)
    it.close()
    assert batch["image"].shape == (2, 64, 64, 3)
    assert (batch["labels"].sum(1) >= 1).all()  # masks give image labels


def _row(name, ratio, **extra):
    row = {"name": name, "settings": {"batch": 2, "crop": 160},
           "ssr_jax": {"median_s": 1.0, "peak_rss_mb": 100.0},
           "peer": {"median_s": ratio, "peak_rss_mb": 200.0},
           "ratio": ratio, **extra}
    row["cells"] = [{"dtype": "float32", "ssr_jax": row["ssr_jax"],
                     "peer": row["peer"], "ratio": ratio}]
    return run._goal(row)


def test_goals():
    assert _row("pseudo_labels", 3.5)["met"] is True
    assert _row("pseudo_labels", 1.9)["met"] is False
    assert _row("train_step", 2.0)["met"] is True
    heavy = _row("train_step", 2.0)
    heavy["ssr_jax"]["run_rss_mb"], heavy["peer"]["run_rss_mb"] = 300., 250.
    assert run._goal(heavy)["met"] is False  # faster but more memory
    dev = {"name": "devices_1_vs_8", "overhead": 0.2}
    assert run._goal(dev)["met"] is False
    dev["overhead"] = 0.1
    assert run._goal(dev)["met"] is True
    assert "met" not in run._goal({"name": "eval"})


def test_table_lists_every_row():
    rows = [_row("pseudo_labels", 4.0), _row("train_step", 1.2),
            {"name": "eval", "skipped": "evaluate not available"}]
    text = run.table(rows)
    assert "| pseudo_labels | batch 2, crop 160, float32 |" in text
    assert "4.00x" in text and "ratio >= 2 (CPU): met" in text
    assert "MISSED" in text  # the 1.2x train step
    assert "evaluate not available" in text


def test_ratio_needs_equal_cores():
    """A ratio is reported only when both sides ran on the same CPU set
    and kept (within 10%) the same number of cores busy."""
    mine = {"median_s": 1.0, "cores_used": 1.0, "affinity": [1]}
    peer = {"median_s": 2.0, "cores_used": 0.95, "affinity": [1]}
    assert run._ratio(peer, mine) == 2.0
    cell = run._mark_cores({"ssr_jax": mine, "peer": peer, "ratio": 2.0})
    assert "invalid" not in cell
    busy = dict(mine, cores_used=1.9)  # XLA's threads on a second core
    assert run._ratio(peer, busy) is None
    cell = run._mark_cores({"ssr_jax": busy, "peer": peer,
                            "ratio": run._ratio(peer, busy)})
    assert "unequal cores used: ssr_jax 1.90, peer 0.95" in cell["invalid"]
    other = dict(mine, affinity=[0])
    assert run._ratio(peer, other) is None
    # Two ssr_jax implementations on one CPU set: only the set must match.
    assert run._ratio(peer, busy, cores=False) == 2.0
    assert run._ratio(peer, other, cores=False) is None
    text = run.table([{"name": "pseudo_labels",
                       "settings": {"batch": 2, "crop": 160},
                       "cells": [dict(cell, dtype="float32")]}])
    assert "INVALID (unequal cores used" in text
    assert "1.90 cores" in text


def test_timed_records_cores_used():
    """`cores_used` is CPU time per wall time: ~0 for a sleeping call, at
    most 1 for one busy thread (less when other processes share its core,
    as on a loaded CI machine: bounds that hold under load)."""
    def busy():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.05:
            pass
    busy_cores = run._timed(busy, 2)["cores_used"]
    idle_cores = run._timed(lambda: time.sleep(0.05), 2)["cores_used"]
    assert idle_cores < 0.1
    assert 0.15 < busy_cores <= 1.1


def test_worker_pins_itself(tmp_path):
    """The worker sets its CPU affinity before loading jax or torch and
    reports it (the 'data' side of a missing row errors harmlessly)."""
    cpu = max(os.sched_getaffinity(0))
    spec = json.dumps({"row": "nothing", "side": "jax", "cpus": [cpu]})
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"),
         "--worker", spec], capture_output=True, text=True, timeout=120,
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    line = [x for x in r.stdout.splitlines()
            if x.startswith(run.RESULT_TAG)][-1]
    result = json.loads(line[len(run.RESULT_TAG):])
    assert result["affinity"] == [cpu]
    assert "error" in result  # no such row: reported, not raised


def test_partial_results_of_a_killed_worker():
    out = (run.CELL_TAG + json.dumps({"batch": 4, "median_s": 0.5}) + "\n"
           + "Traceback ...\n")
    res = run.Runner._partial(out, "timed out after 60 s")
    assert res["cells"] == [{"batch": 4, "median_s": 0.5}]
    assert res["error"] == "timed out after 60 s"
    side = run._side_summary(res, run._first(res, batch=4))
    assert side["median_s"] == 0.5
    assert "error" in run._side_summary(res, run._first(res, batch=8))


@pytest.mark.slow
def test_cli_quick_segment_ops(tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"),
         "--quick", "--rows", "segment_ops", "--repeats", "1", "--json",
         str(out), "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["name"] == "segment_ops" and row["ratio"] > 1
    assert data["meta"]["mode"] == "quick"
    assert "| segment_ops: segment_reduce |" in r.stdout


@pytest.mark.slow
def test_scaling_smoke_runs_both_sides(tmp_path):
    """benchmarks/scaling.py --smoke: both sides time every sweep point and
    the plots and table are written (the numbers themselves are not
    asserted: timing on shared machines is noise)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "scaling.py"),
         "--smoke", "--out", str(tmp_path / "plots"), "--workdir",
         str(tmp_path / "w")],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads((tmp_path / "plots" / "scaling.json").read_text())
    for side in ("jax", "torch"):
        assert set(data[side]["classes"]) == {"1", "2"}
        assert set(data[side]["batch"]) == {"1", "2"}
        assert set(data[side]["superpixels"]) == {"25"}
        assert all(v > 0 for sweep in data[side].values()
                   for v in sweep.values())
    for name in ("scaling_classes.png", "scaling_batch.png",
                 "scaling_superpixels.png", "scaling.md"):
        assert (tmp_path / "plots" / name).stat().st_size > 0
