"""Tests of the tiny-encoder pretraining (ssr_jax/pretrain/).

One 20-image world (64 px) and one real `tiny` pretraining of each encoder
are shared by the module; the cache tests replace the trainers by fakes
that write a valid snapshot, so that they check the cache logic alone.
"""

import json
import os
import time

import config_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from ssr_jax import config_check, pretrain
from ssr_jax import text as text_lib
from ssr_jax.data import synthetic
from ssr_jax.models import loading
from ssr_jax.models.clip import CLIP
from ssr_jax.models.vit import ViT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_config(arg: str = "tiny"):
    return config_fixtures.load_config(f"configs/synthetic.py:{arg}")


@pytest.fixture(scope="module")
def config():
    return synthetic_config("tiny")


@pytest.fixture(scope="module")
def world(tmp_path_factory, config):
    root = str(tmp_path_factory.mktemp("pretrain") / "world")
    w = config.synthetic
    synthetic.generate(root, seed=w.seed, num_train=w.num_train,
                       num_val=w.num_val, image_size=w.image_size)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, config, world):
    """Real tiny pretraining of both encoders, kept in memory and saved."""
    out = tmp_path_factory.mktemp("snapshots")
    clip_dir, dino_dir = str(out / "clip"), str(out / "dino")
    pretrain.build_tokenizer(world, clip_dir,
                             config.pretrain.clip.context_length)
    clip, clip_info = pretrain.train_clip(config, world, clip_dir, False)
    loading.save_clip(clip, clip_dir)
    dino, dino_info = pretrain.train_dino(config, world, False)
    loading.save_dino(dino, dino_dir)
    return {"clip": clip, "dino": dino, "clip_dir": clip_dir,
            "dino_dir": dino_dir, "clip_info": clip_info,
            "dino_info": dino_info}


# --- config -----------------------------------------------------------------


def test_config_variants_validate():
    for arg in ("", "smoke", "tiny"):
        c = synthetic_config(arg)
        assert c.data.name == "synthetic"
        assert config_check.validate(c, check_devices=False) == []
        assert c.sgc.clip_layers <= c.pretrain.clip.vision_layers
        assert (c.model.decoder.num_layers_in
                == max(1, c.pretrain.clip.vision_layers - 1))
    full = synthetic_config("")
    assert (full.data.crop_size, full.data.num_classes,
            full.data.max_classes_per_image) == (160, 11, 4)
    with pytest.raises(ValueError, match="smoke"):
        synthetic_config("nope")


def test_validate_names_each_bad_field(world, tmp_path):
    c = synthetic_config("tiny")
    assert pretrain.validate(c) == []
    c.pretrain.dino.patch_size = 8
    c.pretrain.clip.image_size = 50
    c.pretrain.clip.vision_heads = 3
    c.pretrain.dino.local_scale = (0.5, 0.2)
    c.synthetic.caption_background_prob = 2.0
    c.synthetic.caption_background_scope = "house"
    problems = pretrain.validate(c)
    assert len(problems) == 6, problems
    for field in ("dino.patch_size", "clip.image_size", "vision_width",
                  "local_scale", "caption_background_prob",
                  "caption_background_scope"):
        assert any(field in p for p in problems), (field, problems)
    with pytest.raises(ValueError, match="clip.image_size=50"):
        pretrain.ensure_encoders(c, world, str(tmp_path))


def test_bad_world_and_pretraining_overrides_are_user_errors(world,
                                                            tmp_path):
    """A bad `--config.synthetic.*` or `--config.pretrain.*` override is a
    config problem (main: exit 2, one line), found before anything is
    written; it was reported as an internal error ("a bug")."""
    from ssr_jax import main  # noqa: PLC0415

    for field, value, needle in (
            ("caption_background_scope", "house", "'all' or 'home'"),
            ("caption_background_prob", 1.5, r"must be in \[0, 1\]"),
            ("image_size", 100, "multiple of 16")):
        c = synthetic_config("tiny")
        c.synthetic.root = str(tmp_path / "w")
        c.synthetic[field] = value
        with pytest.raises(config_check.ConfigError, match=needle) as e:
            pretrain.ensure_world(c)
        assert main.describe_error(e.value)[0] == 2
        assert not (tmp_path / "w").exists()
    c = synthetic_config("tiny")
    c.pretrain.clip.image_size = 50
    with pytest.raises(config_check.ConfigError, match="image_size=50") as e:
        pretrain.ensure_encoders(c, world, str(tmp_path / "enc"))
    assert main.describe_error(e.value) == (2, str(e.value))
    assert not (tmp_path / "enc").exists()


def test_world_root_default_is_named_by_parameters(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    full, smoke = synthetic_config(""), synthetic_config("smoke")
    a, b = pretrain.world_root(full), pretrain.world_root(smoke)
    assert a != b and a.startswith(str(tmp_path))
    # Another caption world is another world: its own root (and, through
    # the world's identity, its own encoder cache entries).
    full.synthetic.caption_background_prob = 0.2
    assert pretrain.world_root(full) == a + "-capbg0.2"
    assert pretrain.world_config(full).caption_background_prob == 0.2
    full.synthetic.caption_background_scope = "home"
    assert pretrain.world_root(full) == a + "-capbg0.2-home"
    full.synthetic.root = "/data/w"
    assert pretrain.world_root(full) == "/data/w"


# --- losses against loop references -----------------------------------------


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_contrastive_loss_matches_loop():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(5, 4)).astype(np.float32)
    txt = rng.normal(size=(5, 4)).astype(np.float32)
    same = np.eye(5, dtype=bool)
    same[0, 3] = same[3, 0] = True  # images 0 and 3 share a caption
    logits = pretrain.global_logits(jnp.asarray(img), jnp.asarray(txt),
                                    jnp.asarray(7.0))
    got = float(pretrain.contrastive_loss(logits, jnp.asarray(same)))

    ref = 7.0 * _unit(img).astype(np.float64) @ _unit(txt).T
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    total = 0.0
    for lg in (ref, ref.T):
        for i in range(5):
            logp = lg[i] - np.log(np.exp(lg[i]).sum())
            pos = np.flatnonzero(same[i])
            total += -sum(logp[j] for j in pos) / len(pos) / 5
    np.testing.assert_allclose(got, total / 2, rtol=1e-5)


def test_patch_logits_match_loop():
    rng = np.random.default_rng(2)
    patches = rng.normal(size=(3, 6, 4)).astype(np.float32)
    txt = rng.normal(size=(3, 4)).astype(np.float32)
    got = np.asarray(pretrain.patch_logits(
        jnp.asarray(patches), jnp.asarray(txt), jnp.asarray(5.0), 0.2))
    ref = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            t = _unit(txt[j].astype(np.float64))
            sims = np.array([_unit(p) @ t for p in patches[i]]) / 0.2
            w = np.exp(sims - sims.max())
            w /= w.sum()
            pooled = (w[:, None] * patches[i]).sum(0)
            ref[i, j] = 5.0 * _unit(pooled) @ t
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_keep_tokens_keeps_cls_and_order():
    x = jnp.arange(2 * 7 * 1, dtype=jnp.float32).reshape(2, 7, 1)
    out = np.asarray(pretrain.keep_tokens(x, jax.random.key(0), 3))[..., 0]
    assert out.shape == (2, 4)
    np.testing.assert_array_equal(out[:, 0], [0, 7])  # CLS first
    for row, base in zip(out, (0, 7), strict=True):
        rest = row[1:] - base
        assert len(set(rest)) == 3 and np.all(np.diff(rest) > 0)
        assert rest.min() >= 1 and rest.max() <= 6


def test_dino_loss_matches_loop():
    rng = np.random.default_rng(1)
    k, b, v = 6, 3, 4
    student = [rng.normal(size=(b, k)).astype(np.float32) for _ in range(v)]
    teacher = [rng.normal(size=(b, k)).astype(np.float32) for _ in range(2)]
    center = rng.normal(size=k).astype(np.float32)
    got = float(pretrain.dino_loss([jnp.asarray(x) for x in student],
                                   [jnp.asarray(x) for x in teacher],
                                   jnp.asarray(center), 0.1,
                                   jnp.asarray(0.04)))

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    terms = []
    for i in range(2):
        for j in range(v):
            if i == j:
                continue
            for n in range(b):
                p = softmax((teacher[i][n] - center) / 0.04)
                q = softmax(student[j][n].astype(np.float64) / 0.1)
                terms.append(-(p * np.log(q)).sum())
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


# --- augmentation -----------------------------------------------------------


def test_crops_are_deterministic_and_sized(config):
    images = np.random.default_rng(0).integers(
        0, 256, (3, 64, 64, 3), np.uint8)
    d = config.pretrain.dino
    g1, l1 = pretrain.multi_crops(images, np.random.default_rng(5), d)
    g2, l2 = pretrain.multi_crops(images, np.random.default_rng(5), d)
    assert g1.shape == (2, 3, d.global_size, d.global_size, 3)
    assert l1.shape == (d.num_local, 3, d.local_size, d.local_size, 3)
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(l1, l2)
    # Scale 1 and no flip: SSR's crop is the image itself.
    same = pretrain.clip_crops(images, np.random.default_rng(0), 64,
                               (1.0, 1.0), False)
    np.testing.assert_array_equal(same, images)
    small = pretrain.clip_crops(images, np.random.default_rng(0), 64,
                                (0.5, 0.5), False)
    assert (small.reshape(3, -1, 3).max(-1) == 0).mean() >= 0.7  # padding


def test_resized_crop_of_the_whole_image_is_a_resize():
    image = np.random.default_rng(3).integers(0, 256, (40, 40, 3), np.uint8)
    want = np.asarray(Image.fromarray(image).resize((20, 20),
                                                    Image.BILINEAR))
    got = [pretrain.resized_crop(image, np.random.default_rng(s), 20,
                                 (1.0, 1.0), (1.0, 1.0)) for s in range(8)]
    for g in got:
        assert np.array_equal(g, want) or np.array_equal(g, want[:, ::-1])
    assert any(np.array_equal(g, want[:, ::-1]) for g in got)  # flips


def test_colour_jitter_switches():
    image = jnp.asarray(np.random.default_rng(4).uniform(
        0, 255, (8, 8, 3)), jnp.float32)
    key = jax.random.key(0)
    same = pretrain.colour_jitter(image, key, 0.4, 0.0, 0.0)
    np.testing.assert_array_equal(same, image)
    gray = np.asarray(pretrain.colour_jitter(image, key, 0.4, 0.0, 1.0))
    np.testing.assert_allclose(gray[..., 0], gray[..., 2], rtol=1e-6)
    np.testing.assert_allclose(
        gray[..., 1], np.asarray(image) @ np.array([0.299, 0.587, 0.114]),
        rtol=1e-5)
    jittered = np.asarray(pretrain.colour_jitter(image, key, 0.4, 1.0, 0.0))
    assert not np.allclose(jittered, image)
    assert jittered.min() >= 0 and jittered.max() <= 255


# --- a few steps reduce the loss on a fixed batch ---------------------------


def test_clip_steps_reduce_loss_on_fixed_batch(config, world):
    cfg = config.pretrain.clip
    tok_dir = pretrain.build_tokenizer(world, os.path.join(world, "..",
                                                           "tok"),
                                       cfg.context_length)
    tok = text_lib.load_tokenizer(tok_dir)
    data = pretrain.load_clip_data(world, tok, cfg.context_length)
    vocab = tok.backend.get_vocab()
    mcfg = pretrain.clip_model_config(
        cfg, len(vocab), vocab[text_lib.BOS], vocab[text_lib.EOS],
        tok.pad_id)
    graphdef, params = pretrain.build(lambda: CLIP(mcfg, rngs=nnx.Rngs(0)))
    tx, step = pretrain.make_clip_step(graphdef, cfg)
    state = {"params": params, "opt": tx.init(params)}
    # The shapes of the real pretraining, so that its compilation is shared.
    crops = pretrain.clip_crops(data.images[:cfg.batch_size],
                                np.random.default_rng(0), cfg.image_size,
                                (1.0, 1.0), False)
    ids = data.ids[:cfg.batch_size, 0]
    losses = []
    for _ in range(cfg.steps + 3):
        state, m = step(state, crops, ids, jax.random.key(0))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses


def test_dino_steps_reduce_loss_on_fixed_batch(config, world):
    cfg = config.pretrain.dino
    images = pretrain.read_images(world, synthetic.read_split(world,
                                                              "train"))
    vcfg = pretrain.dino_model_config(cfg, cfg.global_size)
    graphdef, params = pretrain.build(
        lambda: pretrain.DINO(vcfg, cfg, rngs=nnx.Rngs(0)))
    tx, step = pretrain.make_dino_step(graphdef, cfg,
                                       len(images) / cfg.batch_size)
    state = {"student": params, "teacher": jax.tree.map(jnp.copy, params),
             "opt": tx.init(params),
             "center": jnp.zeros((cfg.num_prototypes,)),
             "step": jnp.zeros((), jnp.int32)}
    glob, loc = pretrain.multi_crops(images[:cfg.batch_size],
                                     np.random.default_rng(0), cfg)
    key = jax.random.key(0)
    losses = []
    for _ in range(6):
        state, m = step(state, glob, loc, key)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.01, losses


# --- snapshots --------------------------------------------------------------


def test_snapshots_reload_with_same_outputs(trained, config, world):
    clip, dino = trained["clip"], trained["dino"]
    assert np.isfinite(trained["clip_info"]["final_loss"])
    assert np.isfinite(trained["dino_info"]["final_loss"])
    size = config.synthetic.image_size
    pixels = jnp.asarray(np.random.default_rng(0).normal(
        size=(2, size, size, 3)), jnp.float32)
    tok = text_lib.load_tokenizer(trained["clip_dir"])
    ctx = config.pretrain.clip.context_length
    ids = jnp.asarray(text_lib.tokenize(
        tok, ["a clean origami boat.", "a photo of a red boat."], ctx))
    assert ids.shape == (2, ctx)

    clip2 = loading.load_clip(trained["clip_dir"])
    np.testing.assert_array_equal(clip2(pixels, ids), clip(pixels, ids))
    np.testing.assert_array_equal(clip2.vision(pixels)[1]["attn"][-1],
                                  clip.vision(pixels)[1]["attn"][-1])
    dino2 = loading.load_dino(trained["dino_dir"])
    t1, o1 = dino(pixels)
    t2, o2 = dino2(pixels)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(o1["attn"][-1], o2["attn"][-1])
    assert isinstance(dino2, ViT)

    # The saved tokenizer gives the ids the model was trained on.
    data = pretrain.load_clip_data(world, tok, ctx)
    caps = json.load(open(os.path.join(world, "captions.json")))
    first = synthetic.read_split(world, "train")[0]
    np.testing.assert_array_equal(
        text_lib.tokenize(tok, caps[first], ctx), data.ids[0])
    ids = text_lib.tokenize(tok, ["origami"], ctx)[0]
    assert [tok.backend.id_to_token(int(i)) for i in ids[:3]] == [
        text_lib.BOS, "origami</w>", text_lib.EOS]  # one token per word


def test_pretraining_is_deterministic(trained, config, world):
    dino, _ = pretrain.train_dino(config, world, False)
    for a, b in zip(jax.tree.leaves(nnx.state(dino)),
                    jax.tree.leaves(nnx.state(trained["dino"])),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    clip, _ = pretrain.train_clip(config, world, trained["clip_dir"], False)
    for a, b in zip(jax.tree.leaves(nnx.state(clip)),
                    jax.tree.leaves(nnx.state(trained["clip"])),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_transformers_reads_the_snapshots(trained, config):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def nchw(x):
        return torch.from_numpy(x.transpose(0, 3, 1, 2))

    rng = np.random.default_rng(1)
    tok = transformers.CLIPTokenizer.from_pretrained(trained["clip_dir"])
    ctx = config.pretrain.clip.context_length
    texts = ["a clean origami car.", "a photo of a blue train."]
    ids = tok(texts, padding="max_length", max_length=ctx,
              return_tensors="np")["input_ids"]
    ours = text_lib.tokenize(text_lib.load_tokenizer(trained["clip_dir"]),
                             texts, ctx)
    np.testing.assert_array_equal(ids, ours)

    # At the pretraining size, where HF does not resize the positions.
    size = config.pretrain.clip.image_size
    pixels = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    hf = transformers.CLIPModel.from_pretrained(trained["clip_dir"]).eval()
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids.astype(np.int64)),
                 pixel_values=nchw(pixels))
    ref = trained["clip"](jnp.asarray(pixels), jnp.asarray(ids))
    np.testing.assert_allclose(out.logits_per_image.numpy(), ref,
                               rtol=1e-4, atol=1e-4)

    size = config.pretrain.dino.global_size
    pixels = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    vit = transformers.ViTModel.from_pretrained(
        trained["dino_dir"], add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = vit(nchw(pixels)).last_hidden_state.numpy()
    tokens, _ = trained["dino"](jnp.asarray(pixels))
    np.testing.assert_allclose(hidden, tokens, rtol=1e-4, atol=1e-4)


# --- cache ------------------------------------------------------------------


def fake_trainer(kind, calls):
    """A stand-in for `pretrain_<kind>` that counts its calls and writes a
    snapshot-shaped directory."""
    def train(config, root, out_dir, progress=True):
        calls[kind] += 1
        os.makedirs(out_dir, exist_ok=True)
        for name in (loading.CONFIG, loading.WEIGHTS):
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(kind)
        return {"final_loss": 0.0}
    return train


@pytest.fixture
def fake_trainers(monkeypatch):
    calls = {"clip": 0, "dino": 0}
    # ensure_encoders calls the trainers from its own module, pretrain.cache
    monkeypatch.setattr(pretrain.cache, "pretrain_clip",
                        fake_trainer("clip", calls))
    monkeypatch.setattr(pretrain.cache, "pretrain_dino",
                        fake_trainer("dino", calls))
    return calls


def test_cache_hit_and_invalidation(fake_trainers, config, world, tmp_path):
    config = synthetic_config("tiny")
    cache = str(tmp_path / "cache")
    clip_path, dino_path = pretrain.ensure_encoders(config, world, cache)
    assert fake_trainers == {"clip": 1, "dino": 1}
    assert pretrain.is_complete(clip_path, pretrain.cache_key(
        config, "clip", world))
    mtime = os.stat(os.path.join(clip_path, loading.WEIGHTS)).st_mtime_ns

    start = time.perf_counter()
    again = pretrain.ensure_encoders(config, world, cache)
    assert time.perf_counter() - start < 1.0
    assert again == (clip_path, dino_path)
    assert fake_trainers == {"clip": 1, "dino": 1}
    assert os.stat(os.path.join(clip_path,
                                loading.WEIGHTS)).st_mtime_ns == mtime

    config.pretrain.clip.steps += 1  # CLIP only: DINO stays cached
    new_clip, same_dino = pretrain.ensure_encoders(config, world, cache)
    assert new_clip != clip_path and same_dino == dino_path
    assert fake_trainers == {"clip": 2, "dino": 1}
    config.pretrain.seed += 1  # both
    pretrain.ensure_encoders(config, world, cache)
    assert fake_trainers == {"clip": 3, "dino": 2}
    assert not [d for d in os.listdir(cache) if d.startswith(".")]


def test_cache_key_follows_the_world(config, world, tmp_path):
    other = str(tmp_path / "other")
    synthetic.generate(other, seed=1, num_train=config.synthetic.num_train,
                       num_val=config.synthetic.num_val,
                       image_size=config.synthetic.image_size)
    assert (pretrain.cache_key(config, "clip", world)
            != pretrain.cache_key(config, "clip", other))
    with pytest.raises(FileNotFoundError, match="world.json"):
        pretrain.cache_key(config, "clip", str(tmp_path))
    with pytest.raises(ValueError, match="kind"):
        pretrain.cache_key(config, "vit", world)


def test_interrupted_write_is_not_a_cache_hit(fake_trainers, config, world,
                                              tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")

    def crash(config, root, out_dir, progress=True):
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, loading.CONFIG), "w") as f:
            f.write("{}")
        raise KeyboardInterrupt  # killed half way through the snapshot

    monkeypatch.setattr(pretrain.cache, "pretrain_clip", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain.ensure_encoders(config, world, cache)
    key = pretrain.cache_key(config, "clip", world)
    final = os.path.join(cache, f"clip-{key}")
    assert not os.path.exists(final)
    assert os.listdir(cache) == []  # the temporary directory is gone

    # A directory at the final path without pretrain.json (say, copied by
    # hand) is not taken for a complete entry, and is replaced.
    os.makedirs(final)
    for name in (loading.CONFIG, loading.WEIGHTS):
        open(os.path.join(final, name), "w").close()
    assert not pretrain.is_complete(final, key)
    monkeypatch.setattr(pretrain.cache, "pretrain_clip",
                        fake_trainer("clip", fake_trainers))
    clip_path, _ = pretrain.ensure_encoders(config, world, cache)
    assert clip_path == final and pretrain.is_complete(final, key)
    info = json.load(open(os.path.join(final, pretrain.INFO_FILE)))
    assert info["key"] == key and info["kind"] == "clip"


# --- iBOT masked-patch loss (pretrain.dino.ibot_weight) ---------------------


def test_block_masks_cover_the_drawn_share():
    rng = np.random.default_rng(0)
    grid = (10, 10)
    none = pretrain.block_masks(rng, 50, grid, 0.0, (0.1, 0.5), 4)
    assert none.shape == (50, 100) and not none.any()
    masks = pretrain.block_masks(rng, 200, grid, 1.0, (0.1, 0.5), 4)
    counts = masks.sum(1)
    # every crop masked, never above the largest drawn share (50 patches),
    # mostly at its target (rectangles are added until it is reached)
    assert counts.min() >= 4 and counts.max() <= 50, counts
    assert 20 <= counts.mean() <= 32, counts.mean()
    half = pretrain.block_masks(rng, 400, grid, 0.5, (0.3, 0.3), 4)
    share = (half.sum(1) > 0).mean()
    assert 0.4 < share < 0.6, share
    # blocks, not scattered patches: most masked patches have a masked
    # 4-neighbour
    m = masks.reshape(-1, 10, 10)
    nb = np.zeros_like(m)
    nb[:, 1:] |= m[:, :-1]
    nb[:, :-1] |= m[:, 1:]
    nb[:, :, 1:] |= m[:, :, :-1]
    nb[:, :, :-1] |= m[:, :, 1:]
    assert (nb & m).sum() / m.sum() > 0.9


def test_ibot_patch_loss_matches_loop():
    rng = np.random.default_rng(2)
    g, b, n, k = 2, 3, 5, 7
    s = rng.normal(size=(g, b, n, k)).astype(np.float32)
    t = rng.normal(size=(g, b, n, k)).astype(np.float32)
    c = rng.normal(size=k).astype(np.float32)
    masks = rng.random((g, b, n)) < 0.4
    masks[0, 0] = False  # a crop without masked patches counts 0
    got = float(pretrain.ibot_patch_loss(
        jnp.asarray(s), jnp.asarray(t), jnp.asarray(masks), jnp.asarray(c),
        0.1, jnp.asarray(0.04)))

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    per_crop = []
    for i in range(g):
        for j in range(b):
            terms = [-(softmax((t[i, j, p] - c) / 0.04)
                       * np.log(softmax(s[i, j, p].astype(np.float64)
                                        / 0.1))).sum()
                     for p in range(n) if masks[i, j, p]]
            per_crop.append(np.mean(terms) if terms else 0.0)
    np.testing.assert_allclose(got, np.mean(per_crop), rtol=1e-5)


def test_masked_patches_take_the_mask_token(config):
    cfg = config.pretrain.dino
    vit = ViT(pretrain.dino_model_config(cfg, cfg.global_size),
              rngs=nnx.Rngs(0))
    pixels = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    token = jnp.arange(cfg.width, dtype=jnp.float32)
    mask = jnp.zeros((2, 16), bool).at[0, 3].set(True).at[1, 0].set(True)
    plain, masked = vit.embed(pixels), vit.embed(pixels, mask, token)
    diff = np.abs(np.asarray(masked - plain)).max(-1)
    rows, cols = np.nonzero(diff)
    assert set(zip(rows, cols, strict=True)) == {(0, 4), (1, 1)}  # CLS 0
    pos = vit.embed(jnp.zeros_like(pixels))  # bias + positions
    bias = vit.patch_embedding.bias[...]
    np.testing.assert_allclose(masked[0, 4], token + pos[0, 4] - bias,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mask_token"):
        vit.embed(pixels, mask)


def test_ibot_fields_leave_the_dino_key_unless_on(config, world):
    c = synthetic_config("tiny")
    off = pretrain.cache_key(c, "dino", world)
    for name in pretrain.IBOT_FIELDS:
        del c.pretrain.dino[name]
    assert pretrain.cache_key(c, "dino", world) == off  # absent = off
    c = synthetic_config("tiny")
    c.pretrain.dino.mask_prob = 0.9  # irrelevant while the loss is off
    assert pretrain.cache_key(c, "dino", world) == off
    c.pretrain.dino.ibot_weight = 1.0
    on = pretrain.cache_key(c, "dino", world)
    assert on != off
    c.pretrain.dino.mask_prob = 0.5
    assert pretrain.cache_key(c, "dino", world) not in (on, off)


def test_ibot_steps_train_both_losses(world):
    c = synthetic_config("tiny")
    cfg = c.pretrain.dino
    cfg.ibot_weight, cfg.mask_prob = 1.0, 1.0
    # a fixed target: the teacher and the centres do not move
    cfg.teacher_momentum, cfg.center_momentum = 1.0, 1.0
    images = pretrain.read_images(world, synthetic.read_split(world,
                                                              "train"))
    vcfg = pretrain.dino_model_config(cfg, cfg.global_size)
    graphdef, params = pretrain.build(
        lambda: pretrain.DINO(vcfg, cfg, rngs=nnx.Rngs(0)))
    assert "mask_token" in params
    tx, step = pretrain.make_dino_step(graphdef, cfg,
                                       len(images) / cfg.batch_size)
    state = {"student": params, "teacher": jax.tree.map(jnp.copy, params),
             "opt": tx.init(params),
             "center": jnp.zeros((cfg.num_prototypes,)),
             "center_patch": jnp.zeros((cfg.num_prototypes,)),
             "step": jnp.zeros((), jnp.int32)}
    rng = np.random.default_rng(0)
    glob, loc = pretrain.multi_crops(images[:cfg.batch_size], rng, cfg)
    masks = pretrain.block_masks(rng, 2 * cfg.batch_size, (4, 4), 1.0,
                                 (0.3, 0.5), 2).reshape(2, cfg.batch_size,
                                                        -1)
    key = jax.random.key(0)
    hist = []
    for _ in range(8):
        state, m = step(state, glob, loc, key, jnp.asarray(masks))
        hist.append({k: float(v) for k, v in m.items()})
    assert hist[0]["patch_loss"] > 0
    np.testing.assert_allclose(
        hist[0]["loss"], hist[0]["cls_loss"] + hist[0]["patch_loss"],
        rtol=1e-5)
    assert hist[-1]["patch_loss"] < hist[0]["patch_loss"] - 0.01, hist
    assert not np.allclose(state["student"]["mask_token"], 0)
    np.testing.assert_array_equal(state["teacher"]["mask_token"], 0)


def test_train_dino_with_ibot_runs_and_reports(world):
    c = synthetic_config("tiny")
    c.pretrain.dino.ibot_weight = 1.0
    backbone, info = pretrain.train_dino(c, world, False)
    assert info["final_patch_loss"] > 0 and np.isfinite(info["final_loss"])
    assert isinstance(backbone, ViT)  # the saved backbone has no mask token
    assert "mask_token" not in nnx.to_pure_dict(nnx.state(backbone))


def test_dino_sweep_variants_and_table():
    """tools/dino_sweep.py: the variant syntax and the summary table."""
    import sys

    sys.path.insert(0, ROOT)
    from tools import dino_sweep  # noqa: PLC0415

    assert dino_sweep.parse_variant("base:") == ("base", [])
    assert dino_sweep.parse_variant(
        "ibot:pretrain.dino.ibot_weight=1,sgc.dino_layers=2") == (
        "ibot", ["--config.pretrain.dino.ibot_weight=1",
                 "--config.sgc.dino_layers=2"])
    for bad in ("noname", ":x=1", "a b:x=1", "v:x"):
        with pytest.raises(ValueError, match="--variant"):
            dino_sweep.parse_variant(bad)
    report = {
        "encoders": {"dino": {"key": "k", "steps": 150, "seconds": 1.0,
                              "first_loss": 4.2, "final_loss": 4.0,
                              "teacher_entropy": 3.5,
                              "teacher_mean_entropy": 4.6}},
        "seeds_scale_21": {
            "miou": {"initial": 0.354, "clip_attn": 0.394,
                     "clip_dino": 0.353, "sgc": 0.349, "oracle_cam": 0.7},
            "purity": {"dino": [0.92, 0.53], "dino_block1": [0.94, 0.67],
                       "clip": [0.7, 0.46], "uniform": [0.8, 0.15]}}}
    row = dino_sweep.summarise({"name": "base", "rc": 0, "seconds": 9.0,
                                "report": report})
    assert row["purity_fg"] == {"dino": 0.53, "dino_block1": 0.67,
                                "clip": 0.46}
    table = dino_sweep.format_table(
        [row, dino_sweep.summarise({"name": "bad", "rc": 1,
                                    "seconds": 1.0})])
    assert "0.530 (0.67" in table and "-4.1" in table
    assert "bad              FAILED (rc 1)" in table
