"""The synthetic world: determinism, VOC layout, masks vs labels, the
designed difficulties, idempotent and atomic writing."""

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ssr_jax.data import synthetic as syn
from ssr_jax.data.synthetic import render, shapes, writer

SIZE = 160
N_TRAIN, N_VAL = 16, 8


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "syn"
    info = syn.generate(root, seed=3, num_train=N_TRAIN, num_val=N_VAL,
                        image_size=SIZE)
    return root, info


@pytest.fixture(scope="module")
def sample():
    """300 rendered scenes (no files): the difficulty statistics."""
    cfg = syn.WorldConfig()
    return cfg, [syn.render_scene(11, "train", i, SIZE, cfg)
                 for i in range(300)]


# --- determinism -----------------------------------------------------------


def test_same_seed_identical_bytes_different_seed_differs(world, tmp_path):
    root, info = world
    again = syn.generate(tmp_path / "again", seed=3, num_train=N_TRAIN,
                         num_val=N_VAL, image_size=SIZE)
    assert _files(root) == _files(tmp_path / "again")
    assert again["digest"] == info["digest"]
    other = syn.generate(tmp_path / "other", seed=4, num_train=N_TRAIN,
                         num_val=N_VAL, image_size=SIZE)
    assert other["digest"] != info["digest"]
    a, b = _files(root), _files(tmp_path / "other")
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert sum(a[k] != b[k] for k in jpgs) == len(jpgs)


def test_scene_is_a_function_of_its_index_only():
    cfg = syn.WorldConfig()
    first = syn.render_scene(0, "val", 5, SIZE, cfg)
    for i in (3, 9):  # other renders in between change nothing
        syn.render_scene(0, "val", i, SIZE, cfg)
    again = syn.render_scene(0, "val", 5, SIZE, cfg)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.mask, again.mask)
    train = syn.render_scene(0, "train", 5, SIZE, cfg)
    assert not np.array_equal(first.image, train.image)


# --- layout ---------------------------------------------------------------


def test_voc_layout(world):
    root, _ = world
    sets = root / "ImageSets" / "Segmentation"
    train = (sets / "train.txt").read_text().split()
    val = (sets / "val.txt").read_text().split()
    assert (sets / "train_aug.txt").read_text() == (
        sets / "train.txt").read_text()
    assert len(train) == N_TRAIN and len(val) == N_VAL
    assert not set(train) & set(val)
    classes = json.loads((root / "classes.json").read_text())
    c = len(classes["classes"]) - 1
    pal = list(syn.voc_palette())
    assert pal[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    assert pal[255 * 3:] == [224, 224, 192]
    for sid in train + val:
        img = Image.open(root / "JPEGImages" / f"{sid}.jpg")
        assert img.format == "JPEG" and img.mode == "RGB"
        assert img.size == (SIZE, SIZE)
        mask = Image.open(root / "SegmentationClass" / f"{sid}.png")
        assert mask.mode == "P" and mask.size == (SIZE, SIZE)
        assert mask.getpalette() == pal
        values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= set(range(c + 1)) | {255}
    assert len(list((root / "JPEGImages").iterdir())) == N_TRAIN + N_VAL
    aug = root / "SegmentationClassAug"
    assert aug.is_symlink() and os.readlink(aug) == "SegmentationClass"
    assert (aug / f"{val[0]}.png").read_bytes() == (
        root / "SegmentationClass" / f"{val[0]}.png").read_bytes()


def test_classes_json_schema(world):
    root, _ = world
    rec = json.loads((root / "classes.json").read_text())
    cfg = syn.WorldConfig()
    assert rec["classes"] == ["background"] + cfg.class_names
    assert 8 <= len(rec["prompts"]) <= 12
    assert len(rec["prompts"]) == len(rec["classes"]) - 1
    assert rec["background_prompts"] == cfg.background_names
    assert rec["num_classes"] == len(rec["classes"])
    assert rec["ignore_index"] == 255
    assert rec["template"] == "a clean origami {}."
    vocab = set(rec["vocabulary"])
    for word in rec["prompts"] + rec["background_prompts"]:
        assert " " not in word and word in vocab
    assert {"clean", "origami"} <= vocab


def test_captions_only_for_train_and_name_the_scene(world):
    root, _ = world
    caps = json.loads((root / "captions.json").read_text())
    meta = json.loads((root / "meta.json").read_text())
    vocab = set(json.loads((root / "classes.json").read_text())["vocabulary"])
    train = syn.read_split(root, "train")
    assert sorted(caps) == sorted(train)
    for sid, lst in caps.items():
        assert len(lst) == syn.WorldConfig().captions_per_image
        words = [set(c.rstrip(".").replace(",", "").split()) for c in lst]
        for w in words:
            assert w <= vocab, w - vocab
        m = meta[sid]
        assert m["background"] in words[0]  # the full caption names it all
        for name in m["classes"]:
            plural = "people" if name == "person" else name + "s"
            assert name in words[0] or plural in words[0]


def test_caption_background_prob_drops_the_background_phrase(sample):
    """`caption_background_prob`: 1 is the default world (no draw, field
    left out of the world's parameters); 0 never names the background
    while naming every object as before; 0.5 keeps some; out of range is
    refused with the fix."""
    cfg, scenes = sample
    assert "caption_background_prob" not in cfg.to_dict()
    never = dataclasses.replace(cfg, caption_background_prob=0.0)
    half = dataclasses.replace(cfg, caption_background_prob=0.5)
    assert never.to_dict()["caption_background_prob"] == 0.0
    bg_words = {w for b in cfg.backgrounds for w in [b.name, *b.phrase.split()]
                } - {"a", "the", "on", "in", "by"} | {"under"}
    kept = total = 0
    for i, scene in enumerate(scenes[:80]):
        if not scene.meta["objects"]:
            continue
        def rng(i=i):
            return np.random.default_rng([11, 2, i])

        base = syn.captions(cfg, scene.meta, rng())
        assert syn.captions(dataclasses.replace(
            cfg, caption_background_prob=1.0), scene.meta, rng()) == base
        bare = syn.captions(never, scene.meta, rng())
        for b, c in zip(base, bare, strict=True):
            words = set(c.rstrip(".").replace(",", "").split())
            assert not words & bg_words, c
            # the objects are named as in the full caption
            assert set(c.rstrip(".").replace(",", "").split()) <= set(
                b.rstrip(".").replace(",", "").split()), (b, c)
        for c in syn.captions(half, scene.meta, rng()):
            total += 1
            kept += bool(set(c.rstrip(".").split()) & bg_words)
    assert 0.3 < kept / total < 0.7, (kept, total)
    with pytest.raises(ValueError, match="caption_background_prob"):
        dataclasses.replace(cfg, caption_background_prob=1.5).validate()
    # scope "home": only captions of an image on a present class's home
    # lose the phrase; the rest keep it; the default scope is left out.
    home = dataclasses.replace(never, caption_background_scope="home")
    assert "caption_background_scope" not in never.to_dict()
    assert home.to_dict()["caption_background_scope"] == "home"
    seen = set()
    for i, scene in enumerate(scenes[:80]):
        if not scene.meta["objects"]:
            continue
        homes = {cfg.classes[cfg.class_names.index(o["class"])].home
                 for o in scene.meta["objects"]}
        at_home = scene.meta["background"] in homes
        seen.add(at_home)
        caps = syn.captions(home, scene.meta, np.random.default_rng(i))
        named = [bool(set(c.rstrip(".").split()) & bg_words) for c in caps]
        assert named == [not at_home] * len(caps), (scene.meta, caps)
    assert seen == {True, False}
    with pytest.raises(ValueError, match="caption_background_scope"):
        dataclasses.replace(cfg, caption_background_scope="some").validate()


# --- masks agree with labels; occlusion -------------------------------------


def test_masks_agree_with_image_labels(world):
    root, _ = world
    meta = json.loads((root / "meta.json").read_text())
    cfg = syn.WorldConfig()
    need = cfg.min_visible_area * SIZE * SIZE
    for sid, m in meta.items():
        mask = np.asarray(Image.open(root / "SegmentationClass"
                                     / f"{sid}.png"))
        present = set(np.unique(mask).tolist()) - {0, 255}
        assert present == set(m["labels"]), sid
        assert m["classes"] == [cfg.class_names[i - 1] for i in m["labels"]]
        for label in m["labels"]:
            assert (mask == label).sum() >= need
        for name in set(m["classes"]):
            visible = sum(o["visible_px"] for o in m["objects"]
                          if o["class"] == name)
            assert visible == (mask == cfg.class_names.index(name) + 1).sum()


def _brute_instance_map(objs, h, w):
    inst = np.zeros((h, w), int)
    for y in range(h):
        for x in range(w):
            for i, o in enumerate(objs):  # later objects win
                y0, y1, x0, x1 = o.box
                if y0 <= y < y1 and x0 <= x < x1 and o.sdf[y - y0,
                                                          x - x0] < 0:
                    inst[y, x] = i + 1
    return inst


def _brute_void(inst, r):
    h, w = inst.shape
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            win = inst[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1]
            out[y, x] = (win != inst[y, x]).any()
    return out


def test_occlusion_and_void_against_pixel_loops():
    h = w = 48
    cfg = syn.WorldConfig()
    objs = []
    for i, (cls, cx) in enumerate(((9, 20.0), (9, 28.0), (0, 24.0))):
        o = render._Object(cls, cx, 24.0, 10.0, 0.3 * i, i == 1, "solid",
                        "single", i)
        render._raster(o, cfg.classes[cls].shape, h, w)
        objs.append(o)
    inst = render._instance_map(objs, h, w)
    np.testing.assert_array_equal(inst, _brute_instance_map(objs, h, w))
    assert 0 < (inst == 1).sum() < (objs[0].sdf < 0).sum()  # occluded
    for r in (1, 2):
        np.testing.assert_array_equal(render._void(inst, r),
                                      _brute_void(inst, r))


def test_occluded_pixels_show_the_occluder(world, sample):
    _, scenes = sample
    n_occ = sum(o["occluded_px"] > 0.05 * o["area_px"]
                for s in scenes for o in s.meta["objects"])
    n_obj = sum(len(s.meta["objects"]) for s in scenes)
    assert n_occ / n_obj > 0.1  # partial occlusion is common
    for s in scenes:
        for o in s.meta["objects"]:
            assert o["visible_px"] <= o["inside_px"] - o["occluded_px"]
            assert o["inside_px"] <= o["area_px"]


# --- the designed difficulties (300 images) --------------------------------


def test_background_co_occurrence(sample):
    cfg, scenes = sample
    stats = syn.meta_statistics(cfg, {str(i): s.meta
                                      for i, s in enumerate(scenes)})
    # A class seen ~50 times: binomial std <= 0.07; tolerance 0.12.
    for c in cfg.classes:
        if c.home:
            assert stats["home_rate"][c.name] >= c.home_prob - 0.12, c.name
    by_hand = [s.meta["background"] == "water" for s in scenes
               if "boat" in s.meta["classes"]]
    assert stats["home_rate"]["boat"] == round(np.mean(by_hand), 4)
    # The home background also appears without the class (not a synonym).
    for c in cfg.classes:
        if c.home:
            assert 0.4 <= stats["home_share"][c.name] <= 0.9


def test_touching_pairs(sample):
    cfg, scenes = sample
    stats = syn.meta_statistics(cfg, {str(i): s.meta
                                      for i, s in enumerate(scenes)})
    reach = 2 * cfg.void_width + 1
    for p in cfg.pairs:
        key = f"{p.first}+{p.second}"
        assert stats["pair_rate"][key] >= p.prob - 0.12, key
        assert stats["touch_rate"][key] >= 0.85, key
        a = cfg.class_names.index(p.first) + 1
        b = cfg.class_names.index(p.second) + 1
        for s in scenes:  # meta["touching"] is what the masks say
            both = a in s.meta["labels"] and b in s.meta["labels"]
            touch = both and _brute_touch(s.mask, a, b, reach)
            assert ([p.first, p.second] in s.meta["touching"]) == touch


def _brute_touch(mask, a, b, reach):
    """Reference: SciPy's binary dilation by a (2 reach + 1)^2 square."""
    grown = ndimage.binary_dilation(mask == a,
                                    np.ones((2 * reach + 1,) * 2, bool))
    return bool((grown & (mask == b)).any())


def test_class_frequencies_and_counts(sample):
    cfg, scenes = sample
    stats = syn.meta_statistics(cfg, {str(i): s.meta
                                      for i, s in enumerate(scenes)})
    freq = np.array(list(stats["class_freq"].values()))
    assert freq.min() >= 0.5 * freq.mean() and freq.max() <= 2 * freq.mean()
    for s in scenes:
        assert 1 <= len(s.meta["objects"]) <= cfg.max_objects
    hist = stats["classes_per_image"]
    assert all(int(k) <= cfg.max_objects for k in hist)
    assert sum(v for k, v in hist.items() if int(k) >= 2) >= 0.3 * 300
    assert stats["background_freq"]["wall"] > 0.03  # every kind is seen


def test_colour_is_no_shortcut_and_superpixels_fit_edges(world):
    root, _ = world
    got = syn.oracle_statistics(root, "val")
    # A colour lookup fitted on train masks stays well short of perfect;
    # superpixel-aligned masks beat the 16-px patch grid clearly.
    assert got["colour"] < 0.75
    assert got["superpixel"] > got["patch"] + 0.05
    assert got["superpixel"] > 0.65


# --- idempotence and atomic writing ---------------------------------------


def test_idempotent(world):
    root, info = world
    stamp = (root / "JPEGImages" / "train_000000.jpg").stat().st_mtime_ns
    again = syn.generate(root, seed=3, num_train=N_TRAIN, num_val=N_VAL,
                         image_size=SIZE)
    assert again["generated"] is False and again["digest"] == info["digest"]
    assert (root / "JPEGImages" / "train_000000.jpg").stat(
    ).st_mtime_ns == stamp


def _small(root, **kw):
    args = {"seed": 0, "num_train": 3, "num_val": 2, "image_size": 64}
    args.update(kw)
    return syn.generate(root, **args)


def test_changed_params_or_missing_file_regenerates(tmp_path):
    root = tmp_path / "w"
    first = _small(root)
    assert first["generated"]
    world = json.loads((root / "world.json").read_text())
    world["params"]["seed"] = 99
    (root / "world.json").write_text(json.dumps(world))
    assert _small(root)["generated"]
    assert _small(root)["generated"] is False
    (root / "JPEGImages" / "val_000001.jpg").unlink()
    assert _small(root)["generated"]
    assert (root / "JPEGImages" / "val_000001.jpg").is_file()
    other = _small(root, num_val=3)
    assert other["generated"] and len(syn.read_split(root, "val")) == 3
    cfg = dataclasses.replace(syn.WorldConfig(), void_width=0)
    assert _small(root, num_val=3, config=cfg)["generated"]
    assert not [p for p in tmp_path.iterdir() if p.name != "w"]


def test_interrupted_run_leaves_no_world(tmp_path, monkeypatch):
    root = tmp_path / "w"
    calls = {"n": 0}
    real = syn.render_scene

    def dying(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    # generate renders through its own module, synthetic.writer
    monkeypatch.setattr(writer, "render_scene", dying)
    with pytest.raises(KeyboardInterrupt):
        _small(root)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(writer, "render_scene", real)
    # A killed run's temp dir (dead pid) looks incomplete and is removed.
    stale = tmp_path / f".w.tmp-{socket.gethostname()}-{2 ** 22 + 7}-dead"
    (stale / "JPEGImages").mkdir(parents=True)
    (stale / "world.json").write_text("{}")
    assert _small(root)["generated"]
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_refuses_foreign_directory_and_bad_config(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        _small(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="multiple of 16"):
        _small(tmp_path / "x", image_size=100)
    cfg = syn.WorldConfig()
    bad = dataclasses.replace(cfg, classes=cfg.classes[:6])
    with pytest.raises(ValueError, match="subset"):
        bad.validate()
    small = cfg.subset(8)
    small.validate(SIZE)
    assert len(small.classes) == 8 and [
        (p.first, p.second) for p in small.pairs] == [("chair", "table")]
    text = cfg.describe()
    for name in cfg.class_names + cfg.background_names:
        assert name in text


# --- shapes ---------------------------------------------------------------


def test_polygon_distance_matches_box_and_rasterised_inside():
    g = np.meshgrid(np.linspace(-2, 2, 41), np.linspace(-2, 2, 41))
    square = [(-1.0, -0.5), (1.0, -0.5), (1.0, 0.5), (-1.0, 0.5)]
    np.testing.assert_allclose(shapes._polygon(g, square),
                               shapes._box(g, 0.0, 0.0, 1.0, 0.5), atol=1e-12)
    tri = [(-1.5, 1.5), (1.5, 1.2), (0.1, -1.7)]
    inside = shapes._polygon(g, tri) < 0
    from skimage.draw import polygon2mask  # the independent reference

    pix = [((y + 2) * 10, (x + 2) * 10) for x, y in tri]
    ref = polygon2mask((41, 41), pix)
    # Pixel centres on an edge may go either way: compare off the edges.
    far = np.abs(shapes._polygon(g, tri)) > 0.15
    np.testing.assert_array_equal(inside[far], ref[far])


def test_every_shape_fits_its_declared_box():
    for name, (fn, (u0, v0, u1, v1)) in syn.SHAPES.items():
        g = np.meshgrid(np.linspace(-1.6, 1.6, 321),
                        np.linspace(-1.6, 1.6, 321))
        d = np.minimum.reduce([s for _, s in fn(g)])
        ys, xs = np.nonzero(d < 0)
        assert len(ys), name
        assert g[0][ys, xs].min() >= u0 - 0.02 and g[0][ys, xs].max() <= (
            u1 + 0.02), name
        assert g[1][ys, xs].min() >= v0 - 0.02 and g[1][ys, xs].max() <= (
            v1 + 0.02), name


def test_stale_temp_of_live_process_is_kept(tmp_path):
    live = tmp_path / f".w.tmp-{socket.gethostname()}-{os.getpid()}-live"
    live.mkdir()
    _small(tmp_path / "w")
    assert live.exists()
