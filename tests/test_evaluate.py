"""Tests for ssr_jax.evaluate and ssr_jax.crf on tiny encoders and a tiny
VOC tree (8 fake CPU devices from conftest, so every jitted evaluation runs
data-parallel with dummy padding).

References: sizes by hand; image resizing against PyTorch F.interpolate
(atol 1e-3 on 0..255 values); the multi-scale/flip average against a NumPy
loop over scales and flips that calls the same per-shape forward (atol
1e-4); confusion matrices against NumPy per-image recomputations (exact
integer counts); DenseCRF on a hand-made noisy map along a colour edge.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import data_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import ssr_fixtures
from flax import nnx
from PIL import Image

from ssr_jax import (
    build,
    checkpointing,
    cmpa,
    config_check,
    crf,
    data_sources,
    evaluate,
    logs,
    metrics,
    text,
    train,
)
from ssr_jax.data import voc
from ssr_jax.data.transforms import long_side_hw, resize_nearest
from ssr_jax.evaluators import segmentation
from ssr_jax.models.resize import resize_matrix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CRF = True
try:
    crf.require_densecrf()
except crf.CRFUnavailableError:
    HAS_CRF = False


def _small(c):
    """Shrinks the trainable parts so that compiles stay short."""
    c.sgc.clip_layers = 2
    c.model.decoder.num_layers_in = 2
    c.model.decoder.embed_dim = 32
    c.model.decoder.depth = 1
    c.model.decoder.heads = 2
    c.cmpa.hidden_dim = 32
    c.cmpa.dim = 16
    c.cmpa.bank_size = 16
    c.eval.max_images = 0
    c.eval.batch_size = 2
    c.data.train_split = "train"
    c.text.cache = False
    return c


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Fixture tree, tiny encoders, config, models and a saved state."""
    d = tmp_path_factory.mktemp("eval")
    tree = data_fixtures.write_voc_tree(d / "voc", num_images=6)
    clip_path, dino_path = ssr_fixtures.make_tiny_encoders(
        str(d / "enc"), text.VOC_FG_PROMPTS + text.VOC_BG_PROMPTS)
    c = _small(data_fixtures.fixture_config(tree))
    c.model.clip_path, c.model.dino_path = clip_path, dino_path
    clip, dino, model = build.build_models(c)
    # A "trained" model: random decoder weights moved off their init so a
    # restore that silently kept the init would be seen.
    graphdef, params, rest = build.split_model(model)
    params = jax.tree.map(lambda x: x + 0.01 * jnp.cos(
        jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)
    model = nnx.merge(graphdef, params, rest)
    tx = train.create_optimizer(c, params)
    state = {"params": params, "rest": rest, "opt": tx.init(params),
             "bank": cmpa.init_bank(c.cmpa.bank_size, c.cmpa.dim),
             "protos": cmpa.init_protos(20, c.cmpa.dim, 20),
             "step": jnp.asarray(7, jnp.int32)}
    workdir = str(d / "work")
    with checkpointing.Checkpointer(f"{workdir}/checkpoints",
                                    save_every=1) as ckpt:
        ckpt.save(7, state, {"batches": 7}, {"step": 7}, force=True)
    bank = build.build_text_bank(c, clip, workdir)
    return {"tree": tree, "config": c, "clip": clip, "dino": dino,
            "model": model, "params": params, "workdir": workdir,
            "bank": bank}


# --- shapes and resizing ------------------------------------------------------
def test_eval_hw_rounds_to_patch_multiples():
    # VOC's common sizes agree with WeCLIP's truncation exactly.
    assert segmentation.eval_hw((375, 500), 512, 16) == (384, 512)
    assert segmentation.eval_hw((500, 375), 512, 16) == (512, 384)
    assert segmentation.scale_hw((512, 384), 0.75, 16) == (384, 288)
    # 333 * 512 / 500 = 340.99 → 21.3 patches → 336; never below a patch.
    assert segmentation.eval_hw((333, 500), 512, 16) == (336, 512)
    assert segmentation.eval_hw((10, 500), 512, 16) == (16, 512)
    assert segmentation.scale_hw((64, 48), 0.75, 16) == (48, 32)  # 36 → 32


def test_resize_image_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), np.uint8)
    for hw in ((64, 80), (16, 32)):
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=hw,
            mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(segmentation.resize_image(image, hw), ref,
                                   atol=1e-3)


def test_plan_batches_groups_shapes_and_pads():
    sizes = np.array([[40, 56], [64, 48], [40, 56], [64, 48], [40, 56]])
    plan = segmentation.plan_batches(sizes, np.arange(5), 64, 16, 2)
    assert [b.hw1 for b in plan] == [(48, 64), (48, 64), (64, 48)]
    assert [b.indices.tolist() for b in plan] == [[0, 2], [4, -1], [1, 3]]


# --- multi-scale + flip -------------------------------------------------------
def _fwd(world, **kw):
    c = world["config"]
    return jax.jit(lambda x: segmentation.msc_logits(
        world["clip"], world["model"], x,
        num_layers_in=c.model.decoder.num_layers_in,
        normalization=c.data.normalization, **kw))


def test_msc_logits_matches_numpy_loop(world):
    c = world["config"]
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (1, 64, 48, 3)).astype(np.float32)
    scales = (1.0, 0.75, 0.5)
    got = np.asarray(_fwd(world, scales=scales, flip=True)(image))
    single = jax.jit(lambda x: segmentation.single_scale_logits(
        world["clip"], world["model"], x,
        num_layers_in=c.model.decoder.num_layers_in,
        normalization=c.data.normalization))
    grid1 = (4, 3)
    total = np.zeros(grid1 + (c.data.num_classes,), np.float64)
    for s in scales:
        hw = segmentation.scale_hw((64, 48), s, 16)
        x = np.einsum("Hh,hwc->Hwc", resize_matrix(64, hw[0]), image[0])
        x = np.einsum("Ww,hwc->hWc", resize_matrix(48, hw[1]), x)
        for flip in (False, True):
            inp = x[:, ::-1] if flip else x
            lg = np.asarray(single(jnp.asarray(inp[None].copy())))[0]
            lg = np.einsum("Hh,hwc->Hwc", resize_matrix(lg.shape[0], 4), lg)
            lg = np.einsum("Ww,hwc->hWc", resize_matrix(lg.shape[1], 3), lg)
            total += lg[:, ::-1] if flip else lg
    ref = total / (2 * len(scales))
    assert got.shape == (1, 4, 3, c.data.num_classes)
    np.testing.assert_allclose(got[0], ref, atol=1e-4)


def test_flip_average_is_symmetric(world):
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 255, (2, 48, 64, 3)).astype(np.float32)
    fwd = _fwd(world, scales=(1.0, 0.75), flip=True)
    a = np.asarray(fwd(image))
    b = np.asarray(fwd(image[:, :, ::-1].copy()))
    np.testing.assert_allclose(b, a[:, :, ::-1], atol=1e-5)
    # Without the flip average the model itself is not symmetric.
    nf = _fwd(world, scales=(1.0,), flip=False)
    assert not np.allclose(np.asarray(nf(image[:, :, ::-1].copy())),
                           np.asarray(nf(image))[:, :, ::-1], atol=1e-3)
    # The host upsampling to an odd original size keeps the symmetry.
    mh, mw = resize_matrix(3, 45), resize_matrix(4, 61)
    pa = crf.upsample_logits(a[0], mh, mw)
    pb = crf.upsample_logits(b[0], mh, mw)
    np.testing.assert_allclose(pb, pa[:, ::-1], atol=1e-5)


# --- segmentation evaluation --------------------------------------------------
def _numpy_eval(world, split):
    """Per-image reference: the same forward, one image at a time."""
    c = world["config"]
    data = data_sources.load_split(c, split)
    fwd = _fwd(world, scales=tuple(c.eval.scales), flip=c.eval.flip)
    conf = np.zeros((21, 21), np.int64)
    preds = {}
    for i in data.usable:
        image = voc.read_image(data.image_paths[i])
        hw1 = segmentation.eval_hw(image.shape[:2], c.eval.long_side, 16)
        lg = np.asarray(fwd(segmentation.resize_image(image, hw1)[None]))[0]
        h0, w0 = image.shape[:2]
        up = crf.upsample_logits(lg, resize_matrix(lg.shape[0], h0),
                                 resize_matrix(lg.shape[1], w0))
        pred = up.argmax(-1)
        preds[data.names[i]] = pred
        if data.mask_paths[i] is not None:
            conf += metrics.confusion_matrix(
                pred, voc.read_mask(data.mask_paths[i], 21), 21)
    return conf, preds


def test_evaluate_segmentation_matches_per_image_reference(world, tmp_path):
    c = world["config"]
    got = evaluate.evaluate_segmentation(c, world["clip"], world["model"],
                                         "train_aug", str(tmp_path))
    conf, preds = _numpy_eval(world, "train_aug")
    ref = metrics.scores(conf, voc.VOC_CLASSES)
    # 6 images (the last has no mask: predicted, not scored), 2 shapes,
    # batches of 2 rounded up to the 8 devices.
    assert got["num_images"] == 6 and got["num_scored"] == 5
    assert got["num_shapes"] == 2
    assert got["num_pixels"] == ref["num_pixels"] > 0
    assert [r["tp"] for r in got["per_class"]] == [
        r["tp"] for r in ref["per_class"]]
    assert [r["pred_pixels"] for r in got["per_class"]] == [
        r["pred_pixels"] for r in ref["per_class"]]
    assert 0.0 <= got["miou"] <= 1.0
    for name, pred in preds.items():
        with Image.open(tmp_path / "predictions" / f"{name}.png") as im:
            assert im.mode == "P"
            assert im.getpalette()[:9] == list(voc.palette()[:9])
            np.testing.assert_array_equal(np.asarray(im), pred)


def test_max_predictions_caps_pngs(world, tmp_path):
    evaluate.evaluate_segmentation(world["config"], world["clip"],
                                   world["model"], "train", str(tmp_path),
                                   max_images=3, max_predictions=1)
    assert len(os.listdir(tmp_path / "predictions")) == 1


def test_split_without_masks_gives_predictions_only(world, tmp_path):
    tree = world["tree"]
    name = tree.splits["train_aug"][-1]  # the id without a mask
    with open(os.path.join(tree.root, "ImageSets", "Segmentation",
                           "test.txt"), "w") as f:
        f.write(name + "\n")
    got = evaluate.evaluate_segmentation(world["config"], world["clip"],
                                         world["model"], "test",
                                         str(tmp_path))
    assert got["miou"] is None and got["num_scored"] == 0
    assert got["num_images"] == 1
    with Image.open(tmp_path / "predictions" / f"{name}.png") as im:
        assert im.size[::-1] == tree.sizes[name]


# --- CAM seeds ----------------------------------------------------------------
def test_score_seeds_matches_per_image_numpy(world):
    c = world["config"]
    seen = []

    def collect(local, labels):
        seen.append((local["mask"].copy(), local["example_valid"].copy(),
                     {k: v.copy() for k, v in labels.items()}))

    res = evaluate.score_seeds(
        c, world["clip"], world["dino"], world["model"], "train",
        bank=world["bank"], label_entries=evaluate.SEED_ENTRIES,
        on_batch=collect)
    assert res["num_images"] == 5
    assert list(res["entries"]) == list(evaluate.SEED_ENTRIES)
    # One global batch of 8 (5 real rows, 3 dummies) on 8 devices.
    assert len(seen) == 1 and seen[0][1].tolist() == [True] * 5 + [False] * 3
    for name, got in res["entries"].items():
        conf = np.zeros((21, 21), np.int64)
        for mask, valid, labels in seen:
            for j in np.flatnonzero(valid):
                conf += metrics.confusion_matrix(labels[name][j], mask[j], 21)
        ref = metrics.scores(conf, voc.VOC_CLASSES)
        assert got["num_pixels"] == ref["num_pixels"] > 0, name
        assert [r["tp"] for r in got["per_class"]] == [
            r["tp"] for r in ref["per_class"]], name
        assert [r["pred_pixels"] for r in got["per_class"]] == [
            r["pred_pixels"] for r in ref["per_class"]], name
    e = res["entries"]
    # cam.projected=True: the configured initial CAM is the CMPA one.
    assert e["initial_cam"]["per_class"] == e["cam_cmpa"]["per_class"]
    assert e["cam_plain"]["per_class"] != e["cam_cmpa"]["per_class"]
    assert "| sgc |" in evaluate.seed_table(res)


# --- modes, checkpoints, errors -----------------------------------------------
def test_restore_model_reads_params_without_optimizer(world):
    c = world["config"]
    _, _, fresh = build.build_models(c)
    model, step, directory = evaluate.restore_model(c, world["workdir"],
                                                    fresh)
    assert step == 7 and directory.endswith("checkpoints")
    _, params, _ = build.split_model(model)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(world["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A step directory and a step number name the same checkpoint.
    c2 = c.copy_and_resolve_references()
    c2.eval.checkpoint = f"{world['workdir']}/checkpoints/7"
    assert evaluate.checkpoint_location(c2, "x") == (
        f"{world['workdir']}/checkpoints", 7)
    c2.eval.checkpoint = "7"
    assert evaluate.checkpoint_location(c2, "w") == ("w/checkpoints", 7)


def test_eval_mode_writes_reports(world, capsys):
    c = world["config"]
    report = evaluate.evaluate(c, world["workdir"])
    out = os.path.join(world["workdir"], "eval", "val")
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["checkpoint"]["step"] == 7
    assert saved["xla"]["self_check"]["ok"], saved["xla"]
    assert saved["scores"]["miou"] == report["scores"]["miou"]
    assert 0.0 <= saved["scores"]["miou"] <= 1.0
    assert saved["protocol"] == {"long_side": 64, "scales": [1.0, 0.75],
                                 "flip": True, "crf": False}
    md = open(os.path.join(out, "metrics.md")).read()
    assert "| 0 | background |" in md and md.split("\n\n", 2)[2] in (
        capsys.readouterr().out)
    assert sorted(os.listdir(os.path.join(out, "predictions"))) == [
        "img000.png", "img001.png"]


def test_eval_mode_does_not_load_dino(world, monkeypatch):
    """Eval needs only CLIP and the decoder: it runs with the DINO snapshot
    gone and gives the same scores."""
    from ssr_jax.models import loading

    def refuse(*a, **k):
        raise AssertionError("eval loaded DINO")

    monkeypatch.setattr(loading, "load_dino", refuse)
    c = world["config"].copy_and_resolve_references()
    assert c.sgc.use_dino_attn
    c.model.dino_path = ""  # not needed, not checked
    c.sgc.clip_layers = 99  # read by the pseudo-label path only
    out = os.path.join(world["workdir"], "eval", "val")
    if not os.path.exists(os.path.join(out, "metrics.json")):
        evaluate._write_json(os.path.join(out, "metrics.json"), {})
    # A later eval does not replace an earlier run's report silently.
    with pytest.raises(config_check.ConfigError,
                       match=r"metrics.json exists from an earlier run"
                             r".*--config.eval.overwrite=True"):
        evaluate.evaluate(c, world["workdir"])
    c.eval.overwrite = True
    report = evaluate.evaluate(c, world["workdir"])
    assert 0.0 <= report["scores"]["miou"] <= 1.0


def test_pseudo_label_export_writes_original_sizes(world):
    c = world["config"]
    res = evaluate.export_pseudo_labels(c, world["workdir"])
    out = os.path.join(world["workdir"], "pseudo_labels", "train")
    tree = world["tree"]
    names = tree.splits["train"]
    assert sorted(os.listdir(os.path.join(out, "labels"))) == [
        n + ".png" for n in sorted(names)]
    got_labels = {}
    for n in names:
        with Image.open(os.path.join(out, "labels", n + ".png")) as im:
            assert im.mode == "P"
            got_labels[n] = np.asarray(im)
            assert got_labels[n].shape == tree.sizes[n]
    assert set(np.unique(np.concatenate(
        [v.ravel() for v in got_labels.values()]))) <= set(range(21))
    with open(os.path.join(out, "seeds.json")) as f:
        assert json.load(f)["entries"].keys() == res["entries"].keys()
    # The PNG is the canvas label map cropped and resized back (nearest).
    rows = {}
    evaluate.score_seeds(
        c, world["clip"], world["dino"], world["model"], "train",
        bank=world["bank"], label_entries=("pseudo_labels",),
        on_batch=lambda local, lab: rows.update(
            {int(i): lab["pseudo_labels"][j]
             for j, i in enumerate(local["index"]) if i >= 0}))
    data = data_sources.load_split(c, "train")
    for idx, canvas in rows.items():
        hw0 = tuple(int(v) for v in data.sizes[idx])
        h, w = long_side_hw(hw0, c.eval.seed_size)
        np.testing.assert_array_equal(
            got_labels[data.names[idx]],
            resize_nearest(canvas[:h, :w], hw0))


def test_pseudo_label_export_labels_images_without_masks(world, tmp_path):
    """Export labels every image of the split; one whose mask is gone is
    labelled as before and left out of the scores."""
    c = world["config"].copy_and_resolve_references()
    tree = world["tree"]
    root = tmp_path / "voc"
    shutil.copytree(tree.root, root)
    c.data.root = str(root)
    c.eval.checkpoint = f"{world['workdir']}/checkpoints/7"
    names = tree.splits["train"]
    gone = next(n for n in names if tree.has_mask[n])
    os.remove(root / "SegmentationClassAug" / f"{gone}.png")
    res = evaluate.export_pseudo_labels(c, str(tmp_path / "w"))
    out = tmp_path / "w" / "pseudo_labels" / "train" / "labels"
    assert sorted(os.listdir(out)) == [n + ".png" for n in sorted(names)]
    with_masks = sum(tree.has_mask[n] for n in names) - 1
    assert res["num_images"] == len(names)
    assert res["num_masked"] == with_masks
    c_full = world["config"].copy_and_resolve_references()
    c_full.eval.checkpoint = c.eval.checkpoint
    full = evaluate.export_pseudo_labels(c_full, str(tmp_path / "x"))
    with Image.open(out / f"{gone}.png") as a, Image.open(
            tmp_path / "x" / "pseudo_labels" / "train" / "labels"
            / f"{gone}.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert full["num_masked"] == with_masks + 1
    assert "scored on the" in (tmp_path / "w" / "pseudo_labels" / "train"
                               / "seeds.md").read_text()


def test_missing_and_incompatible_checkpoints_are_clear(world, tmp_path):
    c = world["config"]
    _, _, fresh = build.build_models(c)
    with pytest.raises(config_check.ConfigError, match="does not exist"):
        evaluate.restore_model(c, str(tmp_path), fresh)
    c2 = c.copy_and_resolve_references()
    c2.eval.checkpoint = "3"
    with pytest.raises(config_check.ConfigError,
                       match=r"no checkpoint for step 3.*\[7\]"):
        evaluate.restore_model(c2, world["workdir"], fresh)
    c3 = c.copy_and_resolve_references()
    c3.data.num_classes = 5
    _, _, other = build.build_models(c3)
    with pytest.raises(config_check.ConfigError,
                       match=r"decoder/pred/kernel.*\(32, 21\).*\(32, 5\)"):
        evaluate.restore_model(c3, world["workdir"], other)


def _main(world, *args):
    c = world["config"]
    cmd = ssr_fixtures.voc_tiny_argv(
           c.data.root, c.model.clip_path, c.model.dino_path,
           "--config.sgc.clip_layers=2",
           "--config.model.decoder.num_layers_in=2",
           "--config.model.decoder.embed_dim=32",
           "--config.model.decoder.depth=1",
           "--config.model.decoder.heads=2",
           "--config.cmpa.hidden_dim=32", "--config.cmpa.dim=16", *args)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_main_eval_missing_checkpoint_is_a_short_error(world, tmp_path):
    r = _main(world, "--config.mode=eval", f"--workdir={tmp_path}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "ssr_jax: cannot restore the model for eval" in r.stderr
    assert "does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    # A bad multi-process setting is a short message too (main catches
    # distributed.ConfigError around maybe_initialize).
    r = _main(world, "--config.mode=eval", f"--workdir={tmp_path}",
              "--config.distributed.coordinator_address=localhost:1")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "multi-process settings are incomplete" in r.stderr
    assert "Traceback" not in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_main_eval_and_pseudo_labels_on_a_checkpoint(world, tmp_path):
    """Both modes through the CLI on the fixture's saved step 7.

    The trainer's own checkpoints through these CLI modes are the README
    commands' (tests/test_readme_commands.py: VOC train -> eval -> pseudo
    labels, and the embedded default's) and, in process, the toy dataset's
    (test_dataset_seam.py); this test no longer trains (2 steps at 8
    devices cost a whole train-step compile here) but checks the CLI's
    outputs in detail."""
    workdir = str(tmp_path / "run")
    # The checkpoints only: the in-process tests above write their own
    # reports into the fixture's workdir.
    shutil.copytree(os.path.join(world["workdir"], "checkpoints"),
                    os.path.join(workdir, "checkpoints"))
    for mode, out in (("eval", "eval/val"),
                      ("pseudo_labels", "pseudo_labels/train")):
        r = _main(world, f"--config.mode={mode}", f"--workdir={workdir}",
                  "--config.eval.max_images=0")
        assert r.returncode == 0, r.stderr[-3000:]
        assert os.path.isdir(os.path.join(workdir, out))
    with open(os.path.join(workdir, "eval/val/metrics.json")) as f:
        report = json.load(f)
    assert report["checkpoint"]["step"] == 7
    assert 0.0 <= report["scores"]["miou"] <= 1.0
    assert "mIoU" in open(os.path.join(workdir, "eval/val/metrics.md")).read()
    for name in ("img000", "img001"):
        with Image.open(os.path.join(workdir, "eval/val/predictions",
                                     name + ".png")) as im:
            assert im.mode == "P"
            assert im.size[::-1] == world["tree"].sizes[name]
            assert np.asarray(im).max() < 21
    labels = os.listdir(os.path.join(workdir, "pseudo_labels/train/labels"))
    assert len(labels) == 5


_MULTI_CODE = """
import json
from ml_collections import config_dict
from ssr_jax import build, evaluate
c = config_dict.ConfigDict(json.loads({config!r}))
clip, dino, model = build.build_models(c)
model, step, _ = evaluate.restore_model(c, {workdir!r}, model)
seg = evaluate.evaluate_segmentation(c, clip, model, "train_aug", None)
bank = build.build_text_bank(c, clip, {workdir!r})
seeds = evaluate.score_seeds(c, clip, dino, model, "train", bank=bank)
emit({{"step": step, "seg": [r["tp"] for r in seg["per_class"]],
      "scored": seg["num_scored"], "pixels": seg["num_pixels"],
      "seeds": {{k: [r["tp"] for r in v["per_class"]]
                for k, v in seeds["entries"].items()}},
      "seed_images": seeds["num_images"]}})
"""


@pytest.mark.slow
def test_two_processes_match_one(world):
    """2 processes × 2 devices: the same counts as 1 process × 8.

    One class-slot bucket (3, the fixture's largest count) on both sides:
    with 4 devices the 5 images come in two batches, with 8 in one, so
    per-batch buckets would differ between the sides, and this fixture's
    untrained CMPA CAMs are flat enough that the min-max scaling turns the
    rounding of another slot count into flipped pixels (70 in cam_cmpa
    with buckets (1, 2, 3, 6); test_cam checks bucket = kmax on CAMs).
    The 2 processes still agree on the bucket through `cam.batch_slots`.
    """
    import multiprocess_utils

    c = world["config"].copy_and_resolve_references()
    c.data.class_slot_buckets = (3,)
    code = _MULTI_CODE.format(config=c.to_json(),
                              workdir=world["workdir"])
    outs = multiprocess_utils.run_processes(code, num_processes=2,
                                            devices_per_process=2,
                                            timeout=600)
    seg = evaluate.evaluate_segmentation(c, world["clip"], world["model"],
                                         "train_aug", None)
    seeds = evaluate.score_seeds(c, world["clip"], world["dino"],
                                 world["model"], "train", bank=world["bank"])
    assert outs[0] == outs[1]  # the merged result is global
    out = outs[0]
    assert out["step"] == 7 and out["scored"] == 5 and out["seed_images"] == 5
    assert out["pixels"] == seg["num_pixels"]

    def close(a, b):  # float reductions may differ with the batch layout
        return np.abs(np.subtract(a, b)).sum() <= 2

    assert close(out["seg"], [r["tp"] for r in seg["per_class"]])
    for k, v in seeds["entries"].items():
        assert close(out["seeds"][k], [r["tp"] for r in v["per_class"]]), k


# --- the in-training hook -----------------------------------------------------
def test_eval_hook_logs_and_reuses_compiles(world, tmp_path):
    c = world["config"].copy_and_resolve_references()
    c.eval.max_images = 2
    clip, dino, model = world["clip"], world["dino"], world["model"]
    graphdef, params, rest = build.split_model(model)
    writer = logs.MetricWriter(str(tmp_path), tensorboard=False)
    hook = evaluate.make_eval_hook(c, str(tmp_path), clip=clip, dino=dino,
                                   model_graphdef=graphdef,
                                   bank=world["bank"], writer=writer)
    state = {"params": params, "rest": rest}
    first = hook(5, state)
    before = segmentation._seg_step.cache_info()
    second = hook(10, state)
    after = segmentation._seg_step.cache_info()
    writer.close()
    assert after.misses == before.misses and after.hits > before.hits
    assert first == second
    assert 0.0 <= first["eval/val_miou"] <= 1.0
    assert "eval/seeds_sgc_miou" in first
    records = logs.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [5, 10]
    assert records[0]["scalars"]["eval/val_miou"] == first["eval/val_miou"]


# --- DenseCRF -----------------------------------------------------------------
def _edge_case():
    """Red left half, blue right half; class maps 70/30 with 20% of the
    pixels flipped at random (a noisy map along a colour edge)."""
    h, w = 24, 32
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :w // 2] = (220, 30, 30)
    image[:, w // 2:] = (30, 30, 220)
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2:] = 1
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random((h, w)) < 0.2, 1 - truth, truth)
    probs = np.where(np.arange(2)[:, None, None] == noisy[None], 0.7, 0.3)
    return image, probs.astype(np.float32), truth, noisy


@pytest.mark.skipif(not HAS_CRF, reason="pydensecrf2 not installed")
def test_dense_crf_cleans_noise_along_a_colour_edge():
    image, probs, truth, noisy = _edge_case()
    assert (noisy != truth).mean() > 0.15
    out = crf.dense_crf(image, probs, crf.CRFParams())
    assert out.shape == probs.shape
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(out.argmax(0), truth)
    # predict(): softmax of log-probabilities gives the same input back.
    logits = np.log(np.moveaxis(probs, 0, -1))
    eye_h, eye_w = np.eye(24, dtype=np.float32), np.eye(32, dtype=np.float32)
    np.testing.assert_array_equal(
        crf.predict(logits, eye_h, eye_w, image, crf.CRFParams()), truth)
    np.testing.assert_array_equal(crf.predict(logits, eye_h, eye_w), noisy)


@pytest.mark.skipif(not HAS_CRF, reason="pydensecrf2 not installed")
def test_crf_evaluation_through_process_pool(world, tmp_path):
    c = world["config"].copy_and_resolve_references()
    c.eval.crf_workers = 1
    got = evaluate.evaluate_segmentation(c, world["clip"], world["model"],
                                         "val", str(tmp_path), use_crf=True)
    assert got["num_scored"] == 2 and 0.0 <= got["miou"] <= 1.0
    assert len(os.listdir(tmp_path / "predictions")) == 2


def test_crf_import_is_gated_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(crf.CRFUnavailableError, match=r"pip install -e \.\["
                                                      r"crf\]"):
        crf.require_densecrf()
    c = data_fixtures.fixture_config(data_fixtures.Tree(
        "", "synthetic", 21, {}, {}, {}, {}, {}))
    c.eval.crf = True
    monkeypatch.setattr(config_check.importlib.util, "find_spec",
                        lambda name: None)
    errors = config_check.validate(c, check_devices=False)
    assert any("pip install -e .[crf]" in e for e in errors), errors
