"""input_pipeline: batch contract, determinism, state, sharding, eval."""

import json
import os

import numpy as np
import pytest

from ssr_jax import data_sources
from ssr_jax import input_pipeline as ip
from ssr_jax.data import DataError, transforms, voc
from tests.data_fixtures import fixture_config, write_coco_tree, write_voc_tree

KEYS = ("image", "valid", "labels", "superpixels", "index")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_voc_tree(tmp_path_factory.mktemp("pipe") / "voc")


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("cache", [False, True])
def test_train_batch_contract(tree, cache):
    config = fixture_config(tree, **{"sgc.slic_cache": cache})
    it = ip.train_iterator(config, process_index=0, process_count=1)
    split = it.split
    for batch in _take(it, 3):
        assert sorted(batch) == sorted(KEYS)  # no masks in training batches
        b, s = 4, config.data.crop_size
        assert batch["image"].shape == (b, s, s, 3)
        assert batch["image"].dtype == np.uint8
        assert batch["valid"].shape == (b, s, s)
        assert batch["valid"].dtype == bool
        assert batch["labels"].shape == (b, 20)
        assert batch["labels"].dtype == np.float32
        assert batch["superpixels"].dtype == np.int32
        assert batch["index"].dtype == np.int32
        sp, valid = batch["superpixels"], batch["valid"]
        np.testing.assert_array_equal(sp < 0, ~valid)  # −1 exactly on padding
        assert sp.max() < config.sgc.max_segments
        assert not batch["image"][~valid].any()  # zero padding
        for j in range(b):
            ids = np.unique(sp[j][valid[j]])
            np.testing.assert_array_equal(ids, np.arange(ids.size))
        np.testing.assert_array_equal(batch["labels"],
                                      split.labels[batch["index"]])
    it.close()
    if cache:
        folder = voc.cache_dir(config)
        assert not folder.startswith(tree.root)  # never in the dataset
        assert any(f.startswith("slic_") for f in os.listdir(folder))


def test_some_crops_are_padded(tree):
    config = fixture_config(tree)
    it = ip.train_iterator(config, process_index=0, process_count=1)
    valid = np.concatenate([b["valid"] for b in _take(it, 3)])
    it.close()
    # 40x56 / 64x48 images rescaled by 0.5-2 into a 64 crop: both cases.
    assert (~valid).any(axis=(1, 2)).any()
    assert valid.all(axis=(1, 2)).any()


def test_epochs_are_permutations(tree):
    config = fixture_config(tree, **{"train.batch_size": 3})
    it = ip.train_iterator(config, process_index=0, process_count=1)
    seen = np.concatenate([b["index"] for b in _take(it, 6)])
    it.close()
    epochs = seen.reshape(3, 6)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(6))
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch


def test_determinism_and_state_restore(tree, caplog):
    config = fixture_config(tree, **{"sgc.slic_cache": False})
    a = ip.train_iterator(config, process_index=0, process_count=1)
    first = _take(a, 5)
    b = ip.train_iterator(config, process_index=0, process_count=1)
    for x, y in zip(first, _take(b, 2), strict=False):
        _assert_same(x, y)
    state = json.loads(json.dumps(b.get_state()))  # JSON-serialisable
    assert state["batches"] == 2
    b.close()
    c = ip.train_iterator(config, process_index=0, process_count=1)
    c.set_state(state)
    for x, y in zip(first[2:], _take(c, 3), strict=True):
        _assert_same(x, y)
    c.set_state({**state, "batches": 0})  # rewinding works as well
    _assert_same(first[0], next(c))
    with caplog.at_level("WARNING"):
        c.set_state({**state, "num_examples": 99})
    assert "differs in num_examples" in caplog.text
    c.close()
    a.close()
    with pytest.raises(DataError, match="version"):
        c.set_state({"batches": 1})


def test_seeds_change_order_and_augmentation(tree):
    base = fixture_config(tree)
    it = ip.train_iterator(base, process_index=0, process_count=1)
    ref = _take(it, 2)
    it.close()
    other = fixture_config(tree, **{"seed": 5})
    it = ip.train_iterator(other, process_index=0, process_count=1)
    aug = _take(it, 2)
    it.close()
    for x, y in zip(ref, aug, strict=True):
        np.testing.assert_array_equal(x["index"], y["index"])
    assert any((x["image"] != y["image"]).any()
               for x, y in zip(ref, aug, strict=True))
    shuffled = fixture_config(tree, **{"data.shuffle_seed": 7})
    it = ip.train_iterator(shuffled, process_index=0, process_count=1)
    order = _take(it, 3)
    it.close()
    assert not all((x["index"] == y["index"]).all()
                   for x, y in zip(ref + [ref[0]], order, strict=True))


@pytest.mark.parametrize("cache", [False, True])
def test_two_processes_equal_one(tree, cache):
    config = fixture_config(tree, **{"sgc.slic_cache": cache})
    one = ip.train_iterator(config, process_index=0, process_count=1)
    p0 = ip.train_iterator(config, process_index=0, process_count=2)
    p1 = ip.train_iterator(config, process_index=1, process_count=2)
    assert p0.local_batch_size == 2
    for _ in range(3):  # 12 examples: crosses the epoch boundary
        _assert_same(next(one), _concat([next(p0), next(p1)]))
    # A state saved by the 2-process run restores the 1-process run.
    state = p0.get_state()
    assert state == p1.get_state()
    want = _concat([next(p0), next(p1)])
    fresh = ip.train_iterator(config, process_index=0, process_count=1)
    fresh.set_state(state)
    _assert_same(want, next(fresh))
    for it in (one, p0, p1, fresh):
        it.close()


def test_batch_not_divisible(tree):
    config = fixture_config(tree, **{"train.batch_size": 3})
    with pytest.raises(DataError, match="not divisible"):
        ip.train_iterator(config, process_index=0, process_count=2)


def _corrupt_after_scan(tree, config, name):
    for split in ("train_aug", "train"):  # label caches built
        data_sources.validate_split(config, split)
    path = tree.image(name)
    with open(path, "r+b") as f:  # in place: the directory is unchanged
        f.seek(200)
        f.write(b"\x00" * 200)
        f.truncate(600)
    return path


def test_runtime_decode_failure_strict(tmp_path):
    tree = write_voc_tree(tmp_path / "voc")
    config = fixture_config(tree)
    path = _corrupt_after_scan(tree, config, "img002")
    it = ip.train_iterator(config, process_index=0, process_count=1)
    with pytest.raises(DataError, match="corrupt image") as e:
        _take(it, 3)
    assert path in str(e.value)
    it.close()


def test_runtime_decode_failure_non_strict(tmp_path):
    tree = write_voc_tree(tmp_path / "voc")
    config = fixture_config(tree, **{"data.strict": False})
    _corrupt_after_scan(tree, config, "img002")
    it = ip.train_iterator(config, process_index=0, process_count=1)
    batches = _take(it, 3)
    seen = np.concatenate([b["index"] for b in batches])
    assert 2 not in seen.tolist()
    assert it.num_skipped == 1
    assert all(b["image"].shape == (4, 64, 64, 3) for b in batches)
    it.close()
    names = [e["name"] for e in ip.eval_examples(config, "train")]
    assert names == ["img000", "img001", "img003", "img004"]
    batch = next(ip.seed_batches(config, "train", 8, 32))
    assert batch["example_valid"].tolist() == [1, 1, 0, 1, 1, 0, 0, 0]


def test_eval_examples(tree):
    config = fixture_config(tree)
    out = list(ip.eval_examples(config, "train_aug"))
    assert [e["name"] for e in out] == tree.splits["train_aug"]
    for e in out:
        np.testing.assert_array_equal(e["image"],
                                      voc.read_image(tree.image(e["name"])))
        if tree.has_mask[e["name"]]:
            np.testing.assert_array_equal(
                e["mask"], voc.read_mask(tree.mask(e["name"]), 21))
        else:
            assert e["mask"] is None
    assert [e["name"] for e in ip.eval_examples(config, "train_aug", 3)] == (
        tree.splits["train_aug"][:3])
    shards = [[e["name"] for e in ip.eval_examples(
        config, "train_aug", process_index=p, process_count=2)]
        for p in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(tree.splits["train_aug"])
    assert not set(shards[0]) & set(shards[1])


@pytest.mark.parametrize("cache", [False, True])
def test_seed_batches(tree, cache):
    config = fixture_config(tree, **{"sgc.slic_cache": cache})
    batches = list(ip.seed_batches(config, "train", 4, 32))
    assert len(batches) == 2  # 5 masked examples
    b = batches[1]
    assert b["example_valid"].tolist() == [True, False, False, False]
    assert b["index"].tolist() == [4, -1, -1, -1]
    assert (b["mask"][1:] == 255).all() and not b["valid"][1:].any()
    for batch in batches:
        assert batch["image"].shape == (4, 32, 32, 3)
        np.testing.assert_array_equal(batch["superpixels"] < 0,
                                      ~batch["valid"])
        for j, idx in enumerate(batch["index"].tolist()):
            if idx < 0:
                continue
            name = tree.splits["train"][idx]
            gt = voc.read_mask(tree.mask(name), 21)
            hw = transforms.long_side_hw(gt.shape, 32)
            want = transforms.pad_to(transforms.resize_nearest(gt, hw), 32,
                                     255)
            np.testing.assert_array_equal(batch["mask"][j], want)
            assert batch["valid"][j].sum() == hw[0] * hw[1]
            assert batch["labels"][j][np.array(tree.labels[name]) - 1].all()
            assert batch["labels"][j].sum() == len(tree.labels[name])
    halves = [list(ip.seed_batches(config, "train", 4, 32, process_index=p,
                                   process_count=2)) for p in range(2)]
    for whole, a, c in zip(batches, *halves, strict=True):
        _assert_same(whole, _concat([a, c]))


def test_seed_batches_need_masks(tmp_path):
    tree = write_voc_tree(tmp_path / "voc", num_images=2)
    os.remove(tree.mask("img000"))
    config = fixture_config(tree)
    with pytest.raises(DataError, match="has no masks"):
        ip.seed_batches(config, "train", 2, 32)


def test_dataset_info(tree):
    info = ip.dataset_info(fixture_config(tree))
    assert info["num_classes"] == 21
    assert info["class_names"][15] == "person"
    assert info["splits"] == {"train_aug": 6, "val": 2, "train": 5}


def test_coco_tree_trains(tmp_path):
    tree = write_coco_tree(tmp_path / "coco")
    config = fixture_config(tree)
    it = ip.train_iterator(config, process_index=0, process_count=1)
    batch = next(it)
    it.close()
    assert batch["labels"].shape == (4, 80)
    assert ip.dataset_info(config)["splits"] == {"train": 3, "val": 3}
