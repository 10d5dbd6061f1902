"""TFDS datasets: builders, stored records, data.source="tfds", errors.

Every builder runs on the fixture trees (and a tiny synthetic world)
without TensorFlow; the records must hold the files' bytes and pixels and
superpixels equal to a fresh SLIC; the tfds source must give the very
batches of the folder source (with the SLIC cache, whose whole-image ids
the build stores), also after an iterator-state restore.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import config_fixtures
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from ssr_jax import config_check, data_sources  # noqa: E402
from ssr_jax import input_pipeline as ip  # noqa: E402
from ssr_jax.data import (  # noqa: E402
    DataError,
    build,
    slic,
    splits,
    tfds_source,
    voc,
)
from tests.data_fixtures import (  # noqa: E402
    fixture_config,
    write_coco_tree,
    write_voc_tree,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build(config, **kw):
    return build.build(config, workers=kw.pop("workers", 1), log=lambda m: 0,
                       **kw)


@pytest.fixture(scope="module")
def voc_built(tmp_path_factory):
    base = tmp_path_factory.mktemp("tfds")
    tree = write_voc_tree(base / "voc")
    config = fixture_config(tree, **{"data.tfds_dir": str(base / "tfds")})
    out = _build(config)
    return tree, config, out


def _tfds(config):
    t = copy.deepcopy(config)
    t.data.source = "tfds"
    return t


def _fresh_slic(image, config):
    s = config.sgc
    n = slic.cached_n_segments(image.shape[0], image.shape[1],
                               s.slic_segments, config.data.crop_size,
                               s.max_segments)
    return slic.slic_ids(image, n, s.slic_compactness, s.max_segments)


def _check_records(tree, config, splits):
    """Every record equals its files; superpixels equal a fresh SLIC."""
    t = _tfds(config)
    for split in splits:
        data = data_sources.load_split(t, split)
        names = tree.splits[split]
        assert list(data.names) == names
        assert data.usable.tolist() == list(range(len(names)))
        assert len(data.store) == len(names)
        for line, name in enumerate(names):
            rec = data.store.raw(line)
            assert rec["index"] == line  # records follow the list order
            assert rec["id"] == name.encode()
            with open(tree.image(name), "rb") as f:
                assert rec["image"] == f.read()  # byte for byte
            image = voc.read_image(tree.image(name))
            np.testing.assert_array_equal(data.read_image(line), image)
            if tree.has_mask[name]:
                want = voc.read_mask(tree.mask(name), tree.num_classes)
                assert bool(rec["has_mask"])
                np.testing.assert_array_equal(data.store.mask(line), want)
                np.testing.assert_array_equal(
                    data.read_mask(line, tree.num_classes), want)
            else:
                assert not rec["has_mask"]
                assert data.read_mask(line, tree.num_classes) is None
                assert (data.store.mask(line) == 255).all()
            labels = np.zeros(tree.num_classes - 1, bool)
            labels[np.array(tree.labels[name]) - 1] = True
            np.testing.assert_array_equal(rec["labels"], labels)
            np.testing.assert_array_equal(data.labels[line], labels)
            assert tuple(data.sizes[line]) == tree.sizes[name]
            np.testing.assert_array_equal(data.store.superpixels(line),
                                          _fresh_slic(image, config))


def test_voc_builder_records(voc_built):
    tree, config, out = voc_built
    assert importlib.util.find_spec("tensorflow") is None
    assert "tensorflow" not in sys.modules
    assert out["built"]
    assert out["directory"] == tfds_source.dataset_dir(
        config, data_sources.slic_params(config))
    assert out["directory"].endswith(os.path.join(
        "voc_aug", "slic_n16_c10_crop64_max64", "1.0.0"))
    meta = out["metadata"]
    assert meta["slic"] == data_sources.slic_params(config).settings()
    assert meta["class_names"] == list(voc.VOC_CLASSES)
    assert sorted(meta["splits"]) == ["train", "train_aug", "val"]
    assert out["report"]["train_aug"]["stored"] == 6
    _check_records(tree, config, ("train_aug", "val", "train"))
    text = build.summary_text(meta, out["report"], out["directory"], 1.0)
    assert "split 'train_aug': 6 listed, 6 stored, 0 skipped" in text
    # A finished dataset is left as it is.
    again = _build(config)
    assert not again["built"]


def test_coco_builder_records(tmp_path):
    tree = write_coco_tree(tmp_path / "coco")
    config = fixture_config(tree, **{"data.tfds_dir": str(tmp_path / "t")})
    out = _build(config, workers=2)  # the process pool
    assert out["directory"].endswith(os.path.join("coco_seg",
                                                  "slic_n16_c10_crop64_max64",
                                                  "1.0.0"))
    _check_records(tree, config, ("train", "val"))


def test_synthetic_builder_records(tmp_path):
    from ssr_jax.data import synthetic

    root = tmp_path / "world"
    synthetic.generate(root, num_train=3, num_val=2, image_size=64)
    config = config_fixtures.load_config("configs/synthetic.py:tiny")
    config.data.root = str(root)
    config.data.tfds_dir = str(tmp_path / "t")
    out = _build(config)
    assert os.path.basename(os.path.dirname(os.path.dirname(
        out["directory"]))) == "synthetic_world"
    t = _tfds(config)
    for split, n in (("train", 3), ("val", 2)):
        data = data_sources.load_split(t, split)
        ref = splits.load_folder_split(config, split)
        assert data.names == ref.names and len(data.store) == n
        np.testing.assert_array_equal(data.labels, ref.labels)
        for i in range(n):
            with open(ref.image_paths[i], "rb") as f:
                assert data.store.raw(i)["image"] == f.read()
            np.testing.assert_array_equal(
                data.read_mask(i, 11), ref.read_mask(i, 11))
            np.testing.assert_array_equal(
                data.store.superpixels(i),
                _fresh_slic(ref.read_image(i), config))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b, skip=()):
    assert sorted(a) == sorted(b)
    for k in a:
        if k not in skip:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_train_batches_equal_folders_and_resume(voc_built):
    _, config, _ = voc_built
    assert config.sgc.slic_cache
    folders = ip.train_iterator(config, process_index=0, process_count=1)
    want = _take(folders, 5)  # 20 examples: crosses epoch boundaries
    folders.close()
    tf = ip.train_iterator(_tfds(config), process_index=0, process_count=1)
    for a, b in zip(want[:2], _take(tf, 2), strict=True):
        _same(a, b)
    state = json.loads(json.dumps(tf.get_state()))
    tf.close()
    resumed = ip.train_iterator(_tfds(config), process_index=0,
                                process_count=1)
    resumed.set_state(state)
    for a, b in zip(want[2:], _take(resumed, 3), strict=True):
        _same(a, b)
    resumed.close()
    # Two processes reading their own rows' records = one folder process.
    parts = [ip.train_iterator(_tfds(config), process_index=p,
                               process_count=2) for p in range(2)]
    for a in want[:2]:
        _same(a, _concat([next(p) for p in parts]))
    for p in parts:
        p.close()


def test_per_crop_slic_differs_only_in_superpixels(voc_built):
    """With sgc.slic_cache=False the folder path runs SLIC per crop, which
    no stored map can equal; everything else is still the same stream."""
    _, config, _ = voc_built
    per_crop = copy.deepcopy(config)
    per_crop.sgc.slic_cache = False
    folders = ip.train_iterator(per_crop, process_index=0, process_count=1)
    tf = ip.train_iterator(_tfds(config), process_index=0, process_count=1)
    for a, b in zip(_take(folders, 2), _take(tf, 2), strict=True):
        _same(a, b, skip=("superpixels",))
        np.testing.assert_array_equal(a["superpixels"] < 0,
                                      b["superpixels"] < 0)
    folders.close()
    tf.close()


def test_eval_and_seed_batches_equal_folders(voc_built):
    _, config, _ = voc_built
    t = _tfds(config)
    for a, b in zip(ip.eval_examples(config, "train_aug"),
                    ip.eval_examples(t, "train_aug"), strict=True):
        assert a["name"] == b["name"] and a["index"] == b["index"]
        np.testing.assert_array_equal(a["image"], b["image"])
        if a["mask"] is None:
            assert b["mask"] is None
        else:
            np.testing.assert_array_equal(a["mask"], b["mask"])
    for req in (True, False):
        for a, b in zip(ip.seed_batches(config, "train_aug", 4, 32,
                                        require_masks=req),
                        ip.seed_batches(t, "train_aug", 4, 32,
                                        require_masks=req), strict=True):
            _same(a, b)
    info = ip.dataset_info(t)
    assert info["splits"] == {"train_aug": 6, "val": 2, "train": 5}
    assert info["class_names"] == list(voc.VOC_CLASSES)


def test_config_errors(voc_built, tmp_path):
    _, config, _ = voc_built
    t = _tfds(config)
    t.data.root = ""  # not needed by the tfds source
    assert all(p.startswith("model.")  # only the (unset) encoder paths
               for p in config_check.validate(t, check_devices=False))
    empty = copy.deepcopy(t)
    empty.data.tfds_dir = ""
    (msg,) = [p for p in config_check.validate(empty, check_devices=False)
              if "tfds" in p]
    assert "needs data.tfds_dir" in msg and "ssr_jax.data.build" in msg
    unbuilt = copy.deepcopy(t)
    unbuilt.data.tfds_dir = str(tmp_path)
    with pytest.raises(DataError, match="(?s)not built.*ssr_jax.data.build"):
        data_sources.load_split(unbuilt, "train_aug")
    other = copy.deepcopy(t)
    other.sgc.slic_segments = 20
    problems = tfds_source.problems(
        other, data_sources.slic_params(other))
    assert len(problems) == 1
    assert "'slic_segments': 20" in problems[0]
    assert "slic_n16_c10_crop64_max64" in problems[0]  # what is built
    with pytest.raises(DataError, match="this config's SLIC settings"):
        ip.train_iterator(other, process_index=0, process_count=1)
    per_crop = copy.deepcopy(t)
    per_crop.sgc.slic_cache = False
    per_crop_problems = tfds_source.problems(
        per_crop, data_sources.slic_params(per_crop))
    assert any("sgc.slic_cache=True" in p for p in per_crop_problems)
    with pytest.raises(DataError, match="split 'nope' is not in"):
        data_sources.load_split(t, "nope")
    wrong = copy.deepcopy(t)
    wrong.data.num_classes = 5
    assert any("has 21 classes" in p for p in tfds_source.problems(
        wrong, data_sources.slic_params(wrong)))
    bad = copy.deepcopy(t)
    bad.data.source = "parquet"
    assert any(p.startswith("data.source='parquet'")
               for p in config_check.validate(bad, check_devices=False))


def test_missing_tfds_package(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name.startswith("tensorflow_datasets"):
            raise ImportError("No module named 'tensorflow_datasets'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(DataError, match="requirements-tfds.txt"):
        tfds_source.require_tfds()


def test_strict_and_skipping_builds(tmp_path):
    tree = write_voc_tree(tmp_path / "voc", broken=("bad_mask_value",))
    config = fixture_config(tree, **{"data.tfds_dir": str(tmp_path / "t")})
    with pytest.raises(DataError, match="value 42"):
        _build(config, splits=["train_aug"])
    assert not os.path.exists(tfds_source.dataset_dir(
        config, data_sources.slic_params(config)))
    config.data.strict = False
    out = _build(config, splits=["train_aug"])
    victim = tree.broken["bad_mask_value"]
    split = out["metadata"]["splits"]["train_aug"]
    assert len(split["stored"]) == 5
    assert tree.splits["train_aug"].index(victim) not in split["stored"]
    text = build.summary_text(out["metadata"], out["report"],
                              out["directory"], None)
    assert "5 stored, 1 skipped" in text
    assert "skipped: mask" in text and "value 42" in text
    # The skipped id is left out exactly as the folder path leaves it out.
    t = _tfds(config)
    a = ip.train_iterator(config, process_index=0, process_count=1)
    b = ip.train_iterator(t, process_index=0, process_count=1)
    for x, y in zip(_take(a, 2), _take(b, 2), strict=True):
        _same(x, y)
    a.close()
    b.close()


def test_interrupted_build_resumes(tmp_path, monkeypatch):
    tree = write_voc_tree(tmp_path / "voc")
    config = fixture_config(tree, **{"data.tfds_dir": str(tmp_path / "t")})
    real = tfds_source.encode_example
    calls = []

    def dying(job):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(job[1])
        return real(job)

    monkeypatch.setattr(tfds_source, "encode_example", dying)
    with pytest.raises(KeyboardInterrupt):
        _build(config)
    directory = tfds_source.dataset_dir(
        config, data_sources.slic_params(config))
    assert not os.path.exists(directory)  # no half dataset
    parent = os.path.dirname(directory)
    os.makedirs(os.path.join(parent, "incomplete.DEAD_1.0.0"))  # a killed run
    monkeypatch.setattr(tfds_source, "encode_example", real)
    out = _build(config)
    assert out["removed"] == [os.path.join(parent, "incomplete.DEAD_1.0.0")]
    assert os.listdir(parent) == ["1.0.0"]
    assert out["report"]["train_aug"]["slic_reused"] == 4  # not recomputed
    _check_records(tree, config, ("train_aug",))


def test_build_command_line(tmp_path):
    tree = write_voc_tree(tmp_path / "voc", num_images=3)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "ssr_jax.data.build",
           "--config", os.path.join(ROOT, "configs", "voc.py:tiny"),
           f"--config.data.root={tree.root}", "--splits=train_aug,val",
           "--workers=1"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 1
    assert "data.tfds_dir is empty" in run.stderr
    cmd.append(f"--config.data.tfds_dir={tmp_path / 't'}")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "split 'train_aug': 3 listed, 3 stored, 0 skipped" in run.stdout
    assert "--config.data.source=tfds" in run.stdout
    assert os.path.isdir(os.path.join(str(tmp_path / "t"), "voc_aug"))


def test_evaluation_loader_reads_tfds(voc_built):
    """evaluate.py's loader and the pseudo-label export read the same
    images, masks, names and sizes from either source."""
    from ssr_jax.evaluators import segmentation

    _, config, _ = voc_built
    a = data_sources.load_split(config, "train_aug")
    b = data_sources.load_split(_tfds(config), "train_aug")
    np.testing.assert_array_equal(a.sizes, b.sizes)
    assert a.names == b.names
    assert [p is None for p in a.mask_paths] == [
        p is None for p in b.mask_paths]
    la = segmentation._Loader(config, a, 1)
    lb = segmentation._Loader(_tfds(config), b, 1)
    try:
        for idx in a.usable.tolist():
            x, y = la._one(idx, (32, 32)), lb._one(idx, (32, 32))
            assert x["name"] == y["name"]
            for k in ("image", "resized"):
                np.testing.assert_array_equal(x[k], y[k])
            if x["mask"] is None:
                assert y["mask"] is None
            else:
                np.testing.assert_array_equal(x["mask"], y["mask"])
    finally:
        la.close()
        lb.close()


def test_benchmark_cells_and_table(tmp_path):
    """benchmarks/input_pipeline.py's cells (also run.py's row) on tiny
    JPEGs: every source runs, TFDS is built once, the table renders."""
    from benchmarks import input_pipeline as bench
    from benchmarks import run

    root = run.write_voc_tree(str(tmp_path / "voc"), 8, hw=(75, 100))
    cells = bench.rates(root, str(tmp_path), n_train=4, crop=64, batch=2,
                        workers=1, n_segments=16, max_segments=64, epochs=1)
    assert [c["mode"] for c in cells] == ["per_crop", "cache", "tfds"]
    assert all(c["images_per_s"] > 0 and c["cores"] >= 1 for c in cells)
    assert cells[2]["built"] and cells[2]["build_s"] > 0
    row = {"name": "input_pipeline", "settings": {"crop": 64},
           "cells": cells + [{"mode": "tfds", "workers": 1,
                              "skipped": "not installed"}],
           "step_images_per_s": 1.0}
    for c in cells:
        c["ratio_to_step"] = c["images_per_s"]
    text = run.table([run._goal(row)])
    assert "| input_pipeline (tfds) |" in text and "built once in" in text
    assert "skipped: not installed" in text


def test_missing_split_in_a_built_dataset(voc_built):
    _, config, out = voc_built
    with pytest.raises(DataError, match="built without split.*extra"):
        _build(config, splits=["train_aug", "extra"])
    with pytest.raises(DataError, match="(?s)--splits=.*extra"):
        data_sources.load_split(_tfds(config), "extra")
