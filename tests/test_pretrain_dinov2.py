"""The embedded default with a DINOv2 affinity encoder
(`configs/synthetic.py:<size>,dinov2`, `model.dino_kind="dinov2"`).

A real `tiny,dinov2` pretraining (with and without registers) writes a HF
snapshot that `transformers` reads as `Dinov2Model` /
`Dinov2WithRegistersModel` and the encoder seam reads back with equal
outputs; the cache keeps DINO and DINOv2 apart without changing DINO's
keys; `python -m ssr_jax.main` runs the variant end to end.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from test_pretrain import fake_trainer, synthetic_config

from ssr_jax import config_check, pretrain
from ssr_jax.data import synthetic
from ssr_jax.models import encoders, loading
from ssr_jax.models.dinov2 import Dinov2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pretrain_dinov2") / "world")
    w = synthetic_config("tiny,dinov2").synthetic
    synthetic.generate(root, seed=w.seed, num_train=w.num_train,
                       num_val=w.num_val, image_size=w.image_size)
    return root


# --- config -----------------------------------------------------------------


def test_dinov2_variants():
    for arg, size in (("dinov2", ""), ("smoke,dinov2", "smoke"),
                      ("tiny,dinov2", "tiny"), ("dinov2,tiny", "tiny")):
        c, plain = synthetic_config(arg), synthetic_config(size)
        assert config_check.validate(c, check_devices=False) == [], arg
        assert pretrain.validate(c) == [], arg
        assert (c.model.dino_kind, plain.model.dino_kind) == ("dinov2",
                                                              "dino")
        d = c.pretrain.dino
        assert (d.patch_size, d.registers) == (14, 0)
        image = c.synthetic.image_size
        # the largest 14-grid the world's images hold, so a DINOv2 grid
        # that differs from CLIP's 16-grid in cell size (and on the 160 px
        # world in count: 11x11 vs 10x10)
        assert d.global_size == image // 14 * 14
        assert d.local_size % 14 == 0 and d.local_size > 0
        assert "registers" not in plain.pretrain.dino
        # only the affinity encoder changes
        for name in ("patch_size", "registers", "global_size", "local_size"):
            plain.pretrain.dino[name] = d[name]
        plain.model.dino_kind = "dinov2"
        assert plain.to_json(sort_keys=True) == c.to_json(sort_keys=True)
    assert synthetic_config("dinov2").pretrain.dino.global_size == 154
    for bad in ("smoke,tiny", "tiny,nope", "dinov3"):
        with pytest.raises(ValueError, match="dinov2"):
            synthetic_config(bad)


def test_validate_by_kind():
    c = synthetic_config("tiny,dinov2")
    c.pretrain.dino.registers = 4
    c.pretrain.dino.global_size = 60  # not a multiple of 14
    problems = pretrain.validate(c)
    assert len(problems) == 1 and "global_size=60" in problems[0], problems
    c.pretrain.dino.global_size = 56
    c.pretrain.dino.registers = -1
    assert any("registers=-1" in p for p in pretrain.validate(c))

    dino = synthetic_config("tiny")
    dino.pretrain.dino.patch_size = 8  # a DINO ViT must match CLIP's 16
    dino.pretrain.dino.registers = 4
    problems = pretrain.validate(dino)
    assert len(problems) == 2, problems
    assert any("dino.patch_size=8" in p and "dinov2" in p
               for p in problems), problems
    assert any("registers=4" in p and "dino_kind='dinov2'" in p
               for p in problems), problems
    dino.model.dino_kind = "vit"
    assert any("model.dino_kind='vit'" in p for p in pretrain.validate(dino))


def test_cache_keys_keep_kinds_apart(world):
    plain, v2 = synthetic_config("tiny"), synthetic_config("tiny,dinov2")
    key = pretrain.cache_key(plain, "dino", world)
    # DINOv2-only fields do not enter the DINO key (old caches stay valid)
    plain.pretrain.dino.registers = 0
    assert pretrain.cache_key(plain, "dino", world) == key
    # the same section as a DINOv2 is another snapshot
    assert pretrain.cache_key(plain, "dinov2", world) != key
    k2 = pretrain.cache_key(v2, "dinov2", world)
    del v2.pretrain.dino["registers"]  # absent = the default 0
    assert pretrain.cache_key(v2, "dinov2", world) == k2
    v2.pretrain.dino.registers = 4
    assert pretrain.cache_key(v2, "dinov2", world) != k2
    # CLIP is unaffected by the affinity encoder's kind
    assert (pretrain.cache_key(v2, "clip", world)
            == pretrain.cache_key(synthetic_config("tiny"), "clip", world))


def test_ensure_encoders_caches_each_kind(monkeypatch, world, tmp_path):
    calls = {"clip": 0, "dino": 0}
    monkeypatch.setattr(pretrain.cache, "pretrain_clip",
                        fake_trainer("clip", calls))
    monkeypatch.setattr(pretrain.cache, "pretrain_dino",
                        fake_trainer("dino", calls))
    cache = str(tmp_path / "cache")
    plain = synthetic_config("tiny")
    clip_a, dino_path = pretrain.ensure_encoders(plain, world, cache)
    clip_b, v2_path = pretrain.ensure_encoders(
        synthetic_config("tiny,dinov2"), world, cache)
    assert clip_a == clip_b and calls == {"clip": 1, "dino": 2}
    assert os.path.basename(dino_path).startswith("dino-")
    assert os.path.basename(v2_path).startswith("dinov2-")
    info = json.load(open(os.path.join(v2_path, pretrain.INFO_FILE)))
    assert info["kind"] == "dinov2"
    # both stay cached
    assert pretrain.ensure_encoders(plain, world, cache)[1] == dino_path
    assert calls == {"clip": 1, "dino": 2}


# --- a real tiny DINOv2 pretraining -----------------------------------------


@pytest.mark.slow  # 18-23 s wall each on the loaded 2-core machine
@pytest.mark.parametrize("registers", [0, 4])
def test_tiny_dinov2_snapshot(registers, world, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = synthetic_config("tiny,dinov2")
    config.pretrain.dino.registers = registers
    model, info = pretrain.train_dino(config, world, False)
    assert isinstance(model, Dinov2) and np.isfinite(info["final_loss"])
    assert model.config.num_register_tokens == registers
    out = str(tmp_path / "snapshot")
    pretrain.save_backbone(model, out)

    # the encoder seam reads it back with equal outputs
    again, layout = encoders.load_affinity_encoder("dinov2", out)
    assert isinstance(again, Dinov2)
    assert (layout.num_prefix_tokens, layout.patch_size) == (
        1 + registers, 14)
    with pytest.raises(loading.WeightsError, match="dino_kind='dinov2'"):
        encoders.load_affinity_encoder("dino", out)
    rng = np.random.default_rng(0)
    size = config.synthetic.image_size  # 64 px: what SSR feeds it
    pixels = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    t1, o1 = model(jnp.asarray(pixels))
    t2, o2 = again(jnp.asarray(pixels))
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(o1["attn"][-1], o2["attn"][-1])

    # transformers reads it as the HF class of its kind, same outputs at
    # the pretraining size and at SSR's (where HF floors the 64 px image
    # to the 4x4 grid of 14, as the Flax model does)
    cls = (transformers.Dinov2WithRegistersModel if registers
           else transformers.Dinov2Model)
    hf = transformers.AutoModel.from_pretrained(
        out, attn_implementation="eager").eval()
    assert type(hf) is cls
    for s in (config.pretrain.dino.global_size, size):
        x = rng.normal(size=(2, s, s, 3)).astype(np.float32)
        with torch.no_grad():
            ref = hf(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2),
                     output_attentions=True)
        tokens, o = model(jnp.asarray(x))
        np.testing.assert_allclose(ref.last_hidden_state.numpy(), tokens,
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ref.attentions[-1].mean(1).numpy(),
                                   o["attn"][-1], rtol=1e-4, atol=1e-5)


# --- end to end -------------------------------------------------------------


@pytest.mark.slow(seconds=60)  # 104 s wall on the loaded 2-core machine
def test_main_runs_the_dinov2_variant(tmp_path):
    """`python -m ssr_jax.main --config configs/synthetic.py:tiny,dinov2`:
    world, both pretrainings, SSR training with the DINOv2 affinity
    resampled onto CLIP's grid, evaluation."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count"))
    workdir = str(tmp_path / "run")
    r = subprocess.run(
        [sys.executable, "-m", "ssr_jax.main", "--config",
         os.path.join(ROOT, "configs", "synthetic.py") + ":tiny,dinov2",
         "--workdir", workdir],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.load(open(os.path.join(workdir, "results.json")))
    dino_path = results["encoders"]["dino"]
    assert os.path.basename(dino_path).startswith("dinov2-")
    cfg = json.load(open(os.path.join(dino_path, loading.CONFIG)))
    assert cfg["model_type"] == "dinov2" and cfg["patch_size"] == 14
    text = json.dumps(results)
    assert "miou" in text.lower(), sorted(results)
