"""data/voc.py: layout, labels and their cache, validation of bad data."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ssr_jax import data_sources
from ssr_jax.data import DataError, voc
from tests.data_fixtures import fixture_config, write_coco_tree, write_voc_tree


def _mask_labels(path):
    """Reference: foreground ids of a mask by a per-pixel Python loop."""
    with Image.open(path) as im:
        m = np.array(im)
    found = set()
    for v in m.reshape(-1).tolist():
        if 0 < v < 255:
            found.add(v)
    return sorted(found)


def test_labels_from_masks_and_xml(tmp_path):
    tree = write_voc_tree(tmp_path / "voc")
    split = data_sources.load_split(fixture_config(tree), "train_aug")
    assert split.names == tuple(tree.splits["train_aug"])
    for i, name in enumerate(split.names):
        got = (np.nonzero(split.labels[i])[0] + 1).tolist()
        assert got == tree.labels[name], name
        if tree.has_mask[name]:
            assert got == _mask_labels(tree.mask(name))
        assert tuple(split.sizes[i]) == tree.sizes[name]
    s = split.summary
    assert s.num_listed == s.num_usable == 6
    assert s.num_with_masks == 5
    assert s.label_sources == {"mask": 5, "xml": 1}
    assert s.max_classes_per_image == 3
    hist = {}
    for labels in tree.labels.values():
        for c in labels:
            hist[voc.VOC_CLASSES[c]] = hist.get(voc.VOC_CLASSES[c], 0) + 1
    assert {k: v for k, v in s.class_histogram.items() if v} == hist
    assert "6 listed, 6 usable, 5 with masks" in str(s)


def test_label_source_xml_matches_masks(tmp_path):
    tree = write_voc_tree(tmp_path / "voc")
    by_mask = data_sources.load_split(fixture_config(tree), "train_aug")
    by_xml = data_sources.load_split(
        fixture_config(tree, **{"data.label_source": "xml"}), "train_aug")
    np.testing.assert_array_equal(by_mask.labels, by_xml.labels)
    assert by_xml.summary.label_sources == {"xml": 6}


def test_label_source_mask_requires_masks(tmp_path):
    tree = write_voc_tree(tmp_path / "voc")
    config = fixture_config(tree, **{"data.label_source": "mask"})
    with pytest.raises(DataError, match="img005") as e:
        data_sources.load_split(config, "train_aug")
    assert os.path.join("SegmentationClassAug", "img005.png") in str(e.value)


def test_segmentation_class_fallback(tmp_path):
    tree = write_voc_tree(tmp_path / "voc", mask_dir="SegmentationClass")
    split = data_sources.load_split(fixture_config(tree), "train")
    assert split.summary.num_with_masks == 5
    assert all(p and "SegmentationClass" + os.sep in p
               for p in split.mask_paths)


def test_label_cache_hit_and_invalidation(tmp_path):
    tree = write_voc_tree(tmp_path / "voc")
    config = fixture_config(tree)
    first = data_sources.load_split(config, "train_aug")
    assert not first.summary.from_cache
    cache = voc.cache_dir(config)
    assert not cache.startswith(tree.root)  # never in the dataset
    files = [f for f in os.listdir(cache) if f.startswith("labels_train_aug")]
    assert len(files) == 1
    with open(os.path.join(cache, files[0])) as f:
        assert "records" in json.load(f)  # JSON, no pickle
    # another split keeps its own cache
    data_sources.load_split(config, "train")
    second = data_sources.load_split(config, "train_aug")
    assert second.summary.from_cache
    np.testing.assert_array_equal(first.labels, second.labels)
    # A changed list rebuilds the cache (and replaces the stale file).
    with open(os.path.join(tree.root, "ImageSets", "Segmentation",
                           "train_aug.txt"), "w") as f:
        f.write("img001\nimg000\n")
    third = data_sources.load_split(config, "train_aug")
    assert not third.summary.from_cache
    assert third.names == ("img001", "img000")
    files = [f for f in os.listdir(cache) if f.startswith("labels_train_aug")]
    assert len(files) == 1
    # A removed mask (directory changed) rebuilds it too.
    os.remove(tree.mask("img001"))
    fourth = data_sources.load_split(config, "train_aug")
    assert not fourth.summary.from_cache
    assert fourth.summary.label_sources == {"mask": 1, "xml": 1}


def test_cache_is_outside_a_read_only_root(tmp_path, monkeypatch):
    tree = write_voc_tree(tmp_path / "voc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "usercache"))
    real_makedirs = os.makedirs

    def deny(path, *a, **k):
        if str(path).startswith(tree.root):
            raise PermissionError(13, "read-only", path)
        return real_makedirs(path, *a, **k)

    monkeypatch.setattr(os, "makedirs", deny)
    path = voc.cache_dir(fixture_config(tree))
    assert path.startswith(str(tmp_path / "usercache" / "ssr_jax"))
    assert os.path.isdir(path)


def test_missing_root_prints_layout(tmp_path):
    tree = write_voc_tree(tmp_path / "nowhere", broken=["missing_root"])
    with pytest.raises(DataError) as e:
        data_sources.validate_split(fixture_config(tree), "train_aug")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg
    for part in ("JPEGImages/", "SegmentationClassAug/",
                 "ImageSets/Segmentation/"):
        assert part in msg


def test_vocdevkit_root_hint(tmp_path):
    write_voc_tree(tmp_path / "VOCdevkit" / "VOC2012")
    tree = write_voc_tree(tmp_path / "x", broken=["missing_root"])
    tree.root = str(tmp_path / "VOCdevkit")
    with pytest.raises(DataError, match="VOC2012"):
        data_sources.validate_split(fixture_config(tree), "train_aug")


def test_missing_and_empty_lists(tmp_path):
    tree = write_voc_tree(tmp_path / "voc", broken=["empty_list"])
    config = fixture_config(tree)
    with pytest.raises(DataError, match="train_aug.txt is empty"):
        data_sources.validate_split(config, "train_aug")
    os.remove(os.path.join(tree.root, "ImageSets", "Segmentation",
                           "train_aug.txt"))
    with pytest.raises(DataError) as e:
        data_sources.validate_split(config, "train_aug")
    msg = str(e.value)
    assert "train_aug.txt does not exist" in msg
    assert "train, val" in msg  # the lists that exist
    assert "--config.data.train_split=train" in msg


@pytest.mark.parametrize("kind,needle", [
    ("missing_image", "missing image for 'img000'"),
    ("missing_mask", "no image labels for 'img001'"),
    ("bad_mask_value", "has value 42 outside 0..20"),
    ("truncated_jpeg", "truncated JPEG"),
    ("rgb_mask", "is RGB"),
    ("size_mismatch", "is 38x56 but its image"),
])
def test_bad_data_messages_name_the_path(tmp_path, kind, needle):
    tree = write_voc_tree(tmp_path / "voc", broken=[kind])
    victim = tree.broken[kind]
    with pytest.raises(DataError) as e:
        data_sources.validate_split(fixture_config(tree), "train_aug")
    msg = str(e.value)
    assert needle in msg
    assert "1 of 6 examples" in msg
    assert "data.strict=False" in msg
    path = {"missing_image": tree.image(victim),
            "truncated_jpeg": tree.image(victim),
            "missing_mask": os.path.join("SegmentationClassAug",
                                         victim + ".png")}.get(
        kind, tree.mask(victim))
    assert path in msg


def test_non_strict_skips_and_counts(tmp_path):
    kinds = ["missing_image", "bad_mask_value", "truncated_jpeg"]
    tree = write_voc_tree(tmp_path / "voc", broken=kinds)
    config = fixture_config(tree, **{"data.strict": False})
    split = data_sources.load_split(config, "train_aug")
    s = split.summary
    assert s.num_skipped == 3 and s.num_usable == 3
    bad = {tree.broken[k] for k in kinds}
    assert {split.names[i] for i in split.usable} == (
        set(tree.splits["train_aug"]) - bad)
    assert "skipped 3 bad examples" in str(s)
    assert any("42" in p for p in s.problems)
    # The problems are cached too: strict mode raises again from the cache.
    with pytest.raises(DataError, match="3 of 6"):
        data_sources.load_split(fixture_config(tree), "train_aug")


def test_all_bad_is_an_error_even_non_strict(tmp_path):
    tree = write_voc_tree(tmp_path / "voc", num_images=2,
                          broken=["missing_image"])
    os.remove(tree.image("img001"))
    config = fixture_config(tree, **{"data.strict": False})
    with pytest.raises(DataError, match="no usable example"):
        data_sources.load_split(config, "val")


def test_num_classes_mismatch_and_classes_json(tmp_path):
    tree = write_voc_tree(tmp_path / "voc")
    with pytest.raises(DataError, match="data.num_classes=5"):
        data_sources.class_names(
            fixture_config(tree, **{"data.num_classes": 5}))
    config = fixture_config(tree, **{"data.name": "synthetic"})
    with pytest.raises(DataError, match="classes.json is missing"):
        data_sources.class_names(config)
    names = ["background"] + [f"shape{i}" for i in range(20)]
    with open(os.path.join(tree.root, "classes.json"), "w") as f:
        json.dump({"classes": names, "prompts": [], "background_prompts": []},
                  f)
    assert data_sources.class_names(config) == tuple(names)


def test_max_classes_note(tmp_path):
    tree = write_voc_tree(tmp_path / "voc")
    config = fixture_config(tree, **{"data.max_classes_per_image": 2})
    s = data_sources.validate_split(config, "train_aug")
    assert s.num_over_max == 2
    assert "more than data.max_classes_per_image=2" in str(s)


def test_coco_tree(tmp_path):
    tree = write_coco_tree(tmp_path / "coco")
    config = fixture_config(tree)
    split = data_sources.load_split(config, "train")
    assert split.names == tuple(tree.splits["train"])
    for i, name in enumerate(split.names):
        assert (np.nonzero(split.labels[i])[0] + 1).tolist() == (
            tree.labels[name])
    assert split.labels.shape == (3, 80)
    names = data_sources.class_names(config)
    assert len(names) == 81 and names[57] == "chair"
    assert names[80] == "toothbrush"


def test_coco_bad_value(tmp_path):
    tree = write_coco_tree(tmp_path / "coco", broken=["bad_mask_value"])
    with pytest.raises(DataError, match="value 200 outside 0..80") as e:
        data_sources.validate_split(fixture_config(tree), "train")
    assert tree.mask(tree.broken["bad_mask_value"]) in str(e.value)


def test_palette_matches_voc_colours():
    pal = np.array(voc.palette()).reshape(256, 3)
    # VOC: background black, aeroplane (128, 0, 0), person (192, 128, 128),
    # void (224, 224, 192).
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]
    assert pal[15].tolist() == [192, 128, 128]
    assert pal[255].tolist() == [224, 224, 192]
