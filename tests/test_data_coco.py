"""tools/coco_masks.py on a tiny hand-written instances JSON."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ssr_jax import data_sources
from ssr_jax import input_pipeline as ip
from ssr_jax.data import voc
from tests.data_fixtures import Tree, fixture_config, write_coco_raw

pytest.importorskip("pycocotools")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "coco_masks.py")


def _tool():
    spec = importlib.util.spec_from_file_location("coco_masks", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_polygon_rasterisation_matches_skimage():
    """pycocotools fills the pixels whose centre lies inside the polygon."""
    from scipy.ndimage import binary_dilation, binary_erosion
    from skimage.draw import polygon

    h, w = 23, 19
    xs = np.array([2.0, 15.5, 11.0, 3.2])
    ys = np.array([1.0, 4.0, 20.0, 14.7])
    got = _tool().decode([np.stack([xs, ys], 1).reshape(-1).tolist()], h, w)
    want = np.zeros((h, w), bool)
    # Pixel (r, c) has its centre at (c + 0.5, r + 0.5) in COCO coordinates.
    rr, cc = polygon(ys - 0.5, xs - 0.5, (h, w))
    want[rr, cc] = True
    # Pixels on the outline may go either way; everywhere else must agree.
    outline = binary_dilation(want) & ~binary_erosion(want)
    np.testing.assert_array_equal(got[~outline], want[~outline])
    assert (got != want).sum() <= 0.05 * want.sum()  # 0 with 2.0.11


def test_convert_tiny_coco(tmp_path):
    raw = write_coco_raw(tmp_path / "coco")
    out = tmp_path / "out"
    sizes = _tool().convert(str(tmp_path / "coco"), str(out), workers=2)
    assert sizes == {"train": 1, "val": 1}  # image 2 has no annotation
    for name, want in raw["expected"].items():
        with Image.open(out / "SegmentationClass" / (name + ".png")) as im:
            assert im.mode == "P"
            np.testing.assert_array_equal(np.array(im), want)
    with open(out / "classes.json") as f:
        assert json.load(f)["classes"] == ["background", "person", "dog",
                                           "toothbrush"]
    link = out / "JPEGImages" / "train2014"
    assert os.path.islink(link)
    assert os.path.realpath(link) == os.path.realpath(
        tmp_path / "coco" / "train2014")
    lists = out / "ImageSets" / "Segmentation"
    assert (lists / "train.txt").read_text() == (
        "train2014/COCO_train2014_000000000001\n")
    # The reader takes the result as it is: labels from the masks.
    tree = Tree(root=str(out), name="coco", num_classes=4, splits={},
                labels={}, has_mask={}, broken={}, sizes={})
    config = fixture_config(tree)
    split = data_sources.load_split(config, "train")
    assert split.labels.tolist() == [[1.0, 1.0, 1.0]]
    it = ip.train_iterator(config, process_index=0, process_count=1)
    assert next(it)["labels"].shape == (4, 3)
    it.close()


def test_crowd_ignore_and_resume(tmp_path):
    raw = write_coco_raw(tmp_path / "coco")
    tool = _tool()
    out = tmp_path / "out"
    tool.convert(str(tmp_path / "coco"), str(out), splits=("train2014",),
                 crowd="ignore", workers=1)
    name = "train2014/COCO_train2014_000000000001"
    path = out / "SegmentationClass" / (name + ".png")
    with Image.open(path) as im:
        got = np.array(im)
    want = raw["expected"][name].copy()
    want[raw["crowd"][name]] = 255
    np.testing.assert_array_equal(got, want)
    # Existing masks are kept unless --overwrite.
    mtime = os.stat(path).st_mtime_ns
    tool.convert(str(tmp_path / "coco"), str(out), splits=("train2014",),
                 workers=1)
    assert os.stat(path).st_mtime_ns == mtime


def test_cli(tmp_path):
    write_coco_raw(tmp_path / "coco")
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, TOOL, "--coco", str(tmp_path / "coco"), "--out",
         str(out), "--copy-images", "--workers", "1"],
        capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "--config.data.root=" in run.stdout
    assert (out / "JPEGImages" / "val2014" /
            "COCO_val2014_000000000007.jpg").is_file()
    bad = subprocess.run(
        [sys.executable, TOOL, "--coco", str(tmp_path / "nope"), "--out",
         str(out)], capture_output=True, text=True, check=False)
    assert bad.returncode != 0
    assert "instances_train2014.json is missing" in bad.stderr


def test_tool_palette_is_voc():
    assert _tool().voc_palette() == voc.palette()
