"""The embedded default through the real `main`, shrunk (`:tiny`): the
world is generated, tiny encoders pretrained and cached, SSR trained and
scored; results.json and the PNGs exist with sane values; a second run
reuses the caches; eval mode re-scores the checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, cache, *args):
    # As a user runs it: one CPU device (conftest's 8 fake devices would
    # refuse the tiny batch), XLA flags otherwise kept.
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if "xla_force_host_platform_device_count" not in f)
    env = dict(os.environ, PYTHONPATH=ROOT, XDG_CACHE_HOME=str(cache),
               JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    return subprocess.run(
        [sys.executable, "-m", "ssr_jax.main", "--config",
         os.path.join(ROOT, "configs", "synthetic.py") + ":tiny",
         "--workdir", str(workdir), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _unit(x):
    return x is None or (isinstance(x, float) and 0.0 <= x <= 1.0)


@pytest.mark.slow
def test_embedded_default_tiny_end_to_end(tmp_path):
    r = _run(tmp_path / "run", tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-4000:]
    with open(tmp_path / "run" / "results.json") as f:
        res = json.load(f)
    assert 0.0 <= res["val"]["miou"] <= 1.0
    for key in ("initial_cam", "clip_attn", "clip_dino", "sgc",
                "pseudo_labels"):
        assert 0.0 <= res["seeds"][key] <= 1.0, key
    for key in ("initial_cam_without", "initial_cam_with"):
        assert 0.0 <= res["cmpa"][key] <= 1.0, key
    assert res["per_class_iou"] and all(
        _unit(v) for v in res["per_class_iou"].values())
    assert set(res["orderings"]) == {
        "sgc > clip_dino", "clip_dino > clip_attn",
        "clip_attn > initial_cam", "initial_cam_with > initial_cam_without"}
    for stage in ("world", "pretrain", "train", "eval", "seeds", "total"):
        assert math.isfinite(res["time_s"][stage]) and res["time_s"][stage] >= 0
    assert "mIoU %" in r.stdout and "segmentation (val" in r.stdout
    for png in ("cam_overlays.png", "predictions.png", "loss_curves.png"):
        with Image.open(tmp_path / "run" / png) as im:
            a = np.asarray(im)
        assert a.ndim == 3 and a.shape[0] > 8 and a.std() > 0, png
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert metrics and "loss" in json.loads(metrics[-1]).get("scalars", {})
    # backend, versions and the XLA self-check (ssr_jax/xla_guard.py)
    assert res["xla"]["self_check"]["ok"] and res["xla"]["jaxlib"]
    assert res["xla"]["backend"] == "cpu"
    xla = [json.loads(json.loads(m)["text"]["xla"]) for m in metrics
           if "xla" in json.loads(m).get("text", {})]
    assert xla and xla[0]["self_check"]["ok"]
    assert "XLA self-check on cpu" in r.stderr

    # A second run reuses the world and the pretrained encoders.
    r2 = _run(tmp_path / "run2", tmp_path / "cache")
    assert r2.returncode == 0, r2.stderr[-4000:]
    with open(tmp_path / "run2" / "results.json") as f:
        res2 = json.load(f)
    assert res2["time_s"]["pretrain"] < 5.0
    assert res2["encoders"] == res["encoders"]

    # `--config.mode=eval` on the synthetic config evaluates the trained
    # checkpoint with the cached world and encoders (no retraining).
    r = _run(tmp_path / "run", tmp_path / "cache", "--config.mode=eval")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "== train" not in r.stdout
    with open(tmp_path / "run" / "eval" / "val" / "metrics.json") as f:
        report = json.load(f)
    steps = sorted(int(p) for p in os.listdir(tmp_path / "run" /
                                              "checkpoints") if p.isdigit())
    assert report["checkpoint"]["step"] == steps[-1]
    assert 0.0 <= report["scores"]["miou"] <= 1.0
