"""The dataset seam (issue 12, item 5): a third dataset is one spec.

A toy dataset "shapes" (4 foreground classes, its own names, palette,
prompts, class limit, presets and split names) is registered in
`ssr_jax.data.specs` here, a fixture tree in the VOC layout is written
with tests/data_fixtures.py, and the real train loop, segmentation eval
run on it with tiny random encoders, nothing
outside `ssr_jax/data/` knowing its name. Also: an unknown `data.name`
fails with the registered names listed, and nothing in `ssr_jax/data/`
reads the method's `config.sgc`.
"""

from __future__ import annotations

import ast
import json
import os

import data_fixtures
import numpy as np
import pytest
import ssr_fixtures
from PIL import Image

from ssr_jax import config_check, config_defaults, data_sources, text
from ssr_jax.data import DataError, specs, voc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLASSES = ("background", "square", "disc", "bar", "ring")
# Its own colours: black background, then red, green, blue, yellow; white
# void (255); the rest black.
PALETTE = tuple([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0]
                + [0] * (3 * 250) + [255, 255, 255])


def toy_spec() -> specs.DatasetSpec:
    return specs.DatasetSpec(
        name="shapes",
        num_classes=len(CLASSES),
        classes=CLASSES,
        fg_prompts=("red square", "green disc", "blue bar", "yellow ring"),
        bg_prompts=("floor", "wall", "sky"),
        palette=PALETTE,
        max_classes_per_image=3,
        train_split="train",
        val_split="val",
        seed_split="val",
        crop_size=64,
        batch_size={"paper": 24, "weclip": 6},
        num_steps=1234,
        overrides=(("sgc.theta_h", 0.55),),
        split_notes={"train": "shapes: train is the only training list"},
    )


@pytest.fixture
def shapes():
    spec = specs.register(toy_spec(), replace=True)
    yield spec
    specs.unregister(spec.name)


def test_spec_presets_reach_the_config(shapes):
    paper = config_defaults.dataset_config("shapes", "paper")
    assert paper.data.name == "shapes"
    assert paper.data.num_classes == 5
    assert paper.data.max_classes_per_image == 3
    assert (paper.data.train_split, paper.data.val_split,
            paper.data.seed_split) == ("train", "val", "val")
    assert paper.data.crop_size == 64
    # Its own batch and schedule, not VOC's (128 / 30,000).
    assert (paper.train.batch_size, paper.train.num_steps) == (24, 1234)
    assert paper.sgc.theta_h == 0.55
    weclip = config_defaults.dataset_config("shapes", "weclip")
    assert weclip.train.batch_size == 6
    # VOC keeps its own presets.
    voc_cfg = config_defaults.dataset_config("voc", "paper")
    assert (voc_cfg.train.batch_size, voc_cfg.train.num_steps) == (128,
                                                                   30000)
    assert voc_cfg.sgc.theta_h == 0.4
    assert text.dataset_prompts("shapes") == (
        shapes.fg_prompts, shapes.bg_prompts, CLASSES)


# 41 s on the shared 2 cores at load average 5 (76 s at load 10), most of
# it the train step's compile (train_and_evaluate 43 s, evaluate 4 s, at
# load 10).
@pytest.mark.slow(seconds=45)
def test_toy_dataset_trains_and_evaluates(shapes, tmp_path):
    """Train 2 steps, then evaluate val: the real loops (main's calls)."""
    from ssr_jax import evaluate, train  # noqa: PLC0415 - JAX

    tree = data_fixtures.write_dataset_tree(str(tmp_path / "shapes"),
                                            "shapes", CLASSES)
    clip, dino = ssr_fixtures.make_tiny_encoders(
        str(tmp_path / "enc"), shapes.fg_prompts + shapes.bg_prompts)
    c = config_defaults.dataset_config("shapes", "weclip,tiny")
    c.data.root = tree.root
    c.model.clip_path, c.model.dino_path = clip, dino
    c.data.num_workers = 2
    c.train.batch_size = 8  # conftest's 8 CPU devices
    c.eval.scales, c.eval.flip = (1.0,), False  # fewer eval compiles
    assert config_check.validate(c, check_devices=False) == []

    assert data_sources.class_names(c) == CLASSES
    summary = data_sources.validate_split(c, "train")
    assert summary.num_usable == len(tree.splits["train"])
    assert "shapes: train is the only training list" in summary.notes
    assert data_sources.dataset_info(c)["splits"] == {"train": 6, "val": 2}

    workdir = str(tmp_path / "run")
    train.train_and_evaluate(c, workdir,
                             make_eval_hook=evaluate.make_eval_hook)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))

    c.mode = "eval"
    report = evaluate.evaluate(c, workdir)
    with open(os.path.join(workdir, "eval", "val", "metrics.json")) as f:
        assert json.load(f)["checkpoint"]["step"] == 2
    text_report = json.dumps(report)
    for name in CLASSES[1:]:
        assert name in text_report
    preds = os.path.join(workdir, "eval", "val", "predictions")
    pngs = sorted(os.listdir(preds))
    assert pngs == sorted(n + ".png" for n in tree.splits["val"])
    with Image.open(os.path.join(preds, pngs[0])) as im:
        assert im.mode == "P"
        assert tuple(im.getpalette()[:15]) == PALETTE[:15]  # its palette
        pred = np.array(im)
    assert pred.max() < len(CLASSES)



def test_unknown_dataset_names_the_registered_ones():
    with pytest.raises(specs.UnknownDatasetError) as err:
        specs.get("cityscapes")
    msg = str(err.value)
    assert "data.name='cityscapes'" in msg
    for name in ("voc", "coco", "synthetic"):
        assert name in msg
    assert "Adding a dataset" in msg
    # Every entry point gives that message, not a KeyError or VOC defaults.
    with pytest.raises(ValueError, match="registered datasets: voc, coco"):
        config_defaults.dataset_config("cityscapes", "paper")
    with pytest.raises(ValueError, match="unknown dataset"):
        text.dataset_prompts("cityscapes")
    c = config_defaults.dataset_config("voc", "paper,tiny")
    c.data.name = "cityscapes"
    errors = config_check.validate(c, check_devices=False)
    assert any("registered datasets: voc, coco, synthetic" in e
               for e in errors), errors
    with pytest.raises(DataError, match="registered datasets"):
        data_sources.load_split(c, "train")


def test_spec_rejects_inconsistent_fields():
    base = dict(name="bad", num_classes=3, max_classes_per_image=2,
                batch_size={"paper": 8, "weclip": 2}, num_steps=10)
    specs.DatasetSpec(**base)  # a valid minimum: names from classes.json
    with pytest.raises(ValueError, match="2 class names for num_classes=3"):
        specs.DatasetSpec(**base, classes=("background", "a"))
    with pytest.raises(ValueError, match="fg_prompts"):
        specs.DatasetSpec(**base, classes=("background", "a", "b"),
                          fg_prompts=("a",), bg_prompts=("x",))
    with pytest.raises(ValueError, match="presets 'paper' and 'weclip'"):
        specs.DatasetSpec(**{**base, "batch_size": {"paper": 8}})
    with pytest.raises(ValueError, match="reader"):
        specs.DatasetSpec(**base, reader="parquet")
    with pytest.raises(ValueError, match="already registered"):
        specs.register(specs.DatasetSpec(**{**base, "name": "voc"}))
    assert specs.get("voc").palette == voc.palette()
    # Every reader a spec may name has a loader.
    assert set(data_sources.READERS) == set(specs.READERS)


def _reads_sgc(path: str) -> list[int]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and n.attr == "sgc"]


def test_data_layer_reads_no_method_config():
    folder = os.path.join(ROOT, "ssr_jax", "data")
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(folder)
                   for f in names if f.endswith(".py"))
    assert len(files) > 10  # the package and its synthetic/ subpackage
    hits = {os.path.relpath(f, folder): lines for f in files
            if (lines := _reads_sgc(f))}
    assert not hits, (
        "ssr_jax/data/ reads config.sgc (pass slic.SlicParams from "
        f"ssr_jax.data_sources.slic_params instead): {hits}")
