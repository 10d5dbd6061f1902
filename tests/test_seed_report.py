"""`pretrain_report.seed_report` on a written 6-image world (64 px) and tiny
random encoders: the GradCAM scale it reports and uses.

The synthetic config sets `cam.logit_scale = 0`, which the method reads as
"the checkpoint's own learned exp(logit_scale)" (`ssr.gradcam_scale`).
`logit_scale="config"` must mean the same scale, not a literal 0 (a
softmax at scale 0 has zero gradient: every initial CAM would be 0 and
every seed pixel background).
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import ssr_fixtures

from ssr_jax import pretrain_report, report_format, text
from ssr_jax.data import synthetic
from ssr_jax.models import loading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _synthetic_config(arg: str):
    spec = importlib.util.spec_from_file_location(
        "synthetic_config", os.path.join(ROOT, "configs", "synthetic.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.slow  # ~25 s of CPU (jit of the whole seed report)
def test_seed_report_config_scale_is_the_methods(tmp_path):
    root = tmp_path / "world"
    synthetic.generate(root, seed=0, num_train=4, num_val=2, image_size=64)
    fg, bg, names = text.dataset_prompts("synthetic", str(root))
    clip_path, dino_path = ssr_fixtures.make_tiny_encoders(
        str(tmp_path / "enc"), list(fg) + list(bg), layers=2)
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
                                                 "kmeans_init": ()})
    assert got["num_images"] == 2
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
    assert all(k in printed for k in got["miou"])
