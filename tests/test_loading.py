"""ssr_jax.models.loading: HF snapshot errors, sharding, save round trips,
and the real ViT-B/16 CLIP and dino-vits16 tensor names and shapes."""

import json
import os
import shutil
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from hf_fixtures import (
    FULL_CLIP_TEXT,
    FULL_CLIP_VISION,
    FULL_DINO,
    TINY_CLIP_TEXT,
    TINY_CLIP_VISION,
    hf_clip,
    hf_dino,
    make_tiny_clip,
    make_tiny_dino,
)

from ssr_jax.models import loading
from ssr_jax.models.clip import CLIP, CLIPConfig
from ssr_jax.models.loading import (
    WeightsError,
    load_clip,
    load_dino,
    save_clip,
    save_dino,
)
from ssr_jax.models.vit import ViT, ViTConfig


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return make_tiny_dino(tmp_path_factory.mktemp("dino"))


def edited_copy(src, dst, edit):
    """Copies snapshot `src` to `dst`, applying `edit` to its tensor dict."""
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    edit(tensors)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    return str(dst)


def params_of(model):
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


# ------------------------------------------------------------- bad input --


def test_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match="not a directory.*"
                       "openai/clip-vit-base-patch16"):
        load_clip(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(WeightsError, match="facebook/dino-vits16"):
        load_dino(tmp_path / "file")


def test_missing_config_and_weights(tmp_path, clip_dir):
    with pytest.raises(WeightsError, match="no config.json.*"
                       "config.json \\+ model.safetensors"):
        load_clip(tmp_path)
    shutil.copy(os.path.join(clip_dir, "config.json"), tmp_path)
    with pytest.raises(WeightsError, match="neither model.safetensors nor "
                       "model.safetensors.index.json"):
        load_clip(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "ViT-B-16.pt",
                                  "dino.pth"])
def test_pickles_refused_with_conversion_command(tmp_path, clip_dir, name):
    shutil.copy(os.path.join(clip_dir, "config.json"), tmp_path)
    # Not a pickle at all: unpickling would fail differently.
    (tmp_path / name).write_bytes(b"\x80\x04 not a real pickle")
    with pytest.raises(WeightsError) as err:
        load_clip(tmp_path)
    msg = str(err.value)
    assert name in msg and "never loaded" in msg
    assert (f"python -c \"from transformers import CLIPModel as M; "
            f"M.from_pretrained('{tmp_path}').save_pretrained('{tmp_path}')\""
            in msg)


def test_pickle_refused_for_dino_names_vitmodel(tmp_path, dino_dir):
    shutil.copy(os.path.join(dino_dir, "config.json"), tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="import ViTModel as M"):
        load_dino(tmp_path)


def test_every_missing_and_misshaped_tensor_named(tmp_path, clip_dir):
    def edit(t):
        del t["vision_model.encoder.layers.1.mlp.fc2.bias"]
        del t["text_projection.weight"]
        t["vision_model.embeddings.position_embedding.weight"] = np.zeros(
            (7, 32), np.float32)
        t["text_model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros(
            (32, 16), np.float32)

    path = edited_copy(clip_dir, tmp_path / "bad", edit)
    with pytest.raises(WeightsError) as err:
        load_clip(path)
    msg = str(err.value)
    assert "2 missing tensors" in msg
    assert "2 tensors with the wrong shape" in msg
    assert "  vision_model.encoder.layers.1.mlp.fc2.bias" in msg
    assert "  text_projection.weight" in msg
    assert ("vision_model.embeddings.position_embedding.weight: expected "
            "[5, 32], found [7, 32]") in msg
    assert ("text_model.encoder.layers.0.self_attn.q_proj.weight: expected "
            "[32, 32], found [32, 16]") in msg


def test_unexpected_tensors_warn_ignorable_are_silent(tmp_path, clip_dir,
                                                      dino_dir):
    def edit(t):
        t["vision_model.extra.weight"] = np.ones(3, np.float32)
        t["text_model.embeddings.position_ids"] = np.arange(16)[None]
        t["vision_model.embeddings.position_ids"] = np.arange(5)[None]

    path = edited_copy(clip_dir, tmp_path / "extra", edit)
    with pytest.warns(UserWarning, match="1 unexpected tensors ignored: "
                      "vision_model.extra.weight$"):
        model = load_clip(path)
    assert_same_params(model, load_clip(clip_dir))
    # The tiny DINO snapshot carries pooler.dense.*, as dino-vits16 does.
    assert "pooler.dense.weight" in safetensors.numpy.load_file(
        os.path.join(dino_dir, "model.safetensors"))
    no_warnings(load_dino, dino_dir)
    path = edited_copy(clip_dir, tmp_path / "pos", lambda t: t.update(
        {"text_model.embeddings.position_ids": np.arange(16)[None]}))
    no_warnings(load_clip, path)


def test_wrong_model_type_and_corrupt_file(tmp_path, clip_dir, dino_dir):
    with pytest.raises(WeightsError, match="model_type='vit'.*CLIP"):
        load_clip(dino_dir)
    with pytest.raises(WeightsError, match="model_type='clip'.*DINO"):
        load_dino(clip_dir)
    shutil.copytree(clip_dir, tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_clip(tmp_path / "corrupt")


@pytest.mark.parametrize("dtype", ["fp32", "float16", jnp.int32, "bf16",
                                   None])
def test_wrong_dtype_rejected(clip_dir, dtype):
    with pytest.raises(ValueError, match="use one of .*float32.*bfloat16"):
        load_clip(clip_dir, dtype=dtype)


def test_dtype_spellings_accepted():
    assert loading.canonical_dtype("float32") == jnp.float32
    assert loading.canonical_dtype(np.float32) == jnp.float32
    assert loading.canonical_dtype(jnp.bfloat16) == jnp.bfloat16
    assert loading.canonical_dtype("bfloat16") == jnp.bfloat16


# -------------------------------------------------------------- sharding --


def test_sharded_snapshot(tmp_path, clip_dir):
    hf_clip(clip_dir).save_pretrained(tmp_path / "sh", max_shard_size="20KB")
    names = os.listdir(tmp_path / "sh")
    assert "model.safetensors.index.json" in names
    assert "model.safetensors" not in names
    assert_same_params(load_clip(tmp_path / "sh"), load_clip(clip_dir))
    shard = sorted(n for n in names if n.startswith("model-"))[0]
    os.remove(tmp_path / "sh" / shard)
    with pytest.raises(WeightsError, match=f"missing .*{shard}"):
        load_clip(tmp_path / "sh")


# ----------------------------------------------------------- round trips --


def test_mapping_covers_every_parameter():
    """Each Flax parameter has exactly one HF name and vice versa."""
    for model, entries in (
            (nnx.eval_shape(lambda: CLIP(CLIPConfig.from_hf({
                "text_config": TINY_CLIP_TEXT,
                "vision_config": TINY_CLIP_VISION}), rngs=nnx.Rngs(0))),
             loading.clip_entries),
            (nnx.eval_shape(lambda: ViT(ViTConfig(qkv_bias=False,
                                                  num_hidden_layers=2),
                                        rngs=nnx.Rngs(0))),
             loading.vit_entries)):
        table = entries(model.config)
        paths = {".".join(map(str, k)) for k, _ in
                 nnx.to_flat_state(nnx.state(model, nnx.Param))}
        assert len({e.flax for e in table}) == len(table) == len(paths)
        assert {e.flax for e in table} == paths
        assert len({e.hf for e in table}) == len(table)


def test_clip_save_roundtrip_through_transformers(tmp_path, clip_dir):
    model = load_clip(clip_dir)
    save_clip(model, tmp_path / "out")
    ref, back = hf_clip(clip_dir), hf_clip(tmp_path / "out")
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    assert ref_sd.keys() == back_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(back_sd[k], ref_sd[k], rtol=0, atol=0,
                                   msg=k)
    assert_same_params(no_warnings(load_clip, tmp_path / "out"), model)


def test_dino_save_roundtrip_through_transformers(tmp_path, dino_dir):
    model = load_dino(dino_dir)
    save_dino(model, tmp_path / "out")
    ref = hf_dino(dino_dir)
    back = transformers.ViTModel.from_pretrained(
        tmp_path / "out", add_pooling_layer=False, attn_implementation="eager")
    back_sd = back.state_dict()
    ref_sd = {k: v for k, v in ref.state_dict().items()
              if not k.startswith("pooler.")}
    assert ref_sd.keys() == back_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(back_sd[k], ref_sd[k], rtol=0, atol=0,
                                   msg=k)
    assert_same_params(no_warnings(load_dino, tmp_path / "out"), model)


def random_model(make, seed=0):
    """`make()`'s module with NumPy-random parameters: jax.random
    initialisers compile slowly on CPU, and the values do not matter."""
    model = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(0.2 * rng.normal(size=var.shape),
                                  var.dtype))
    return model


@pytest.mark.parity
def test_own_model_saved_for_transformers(tmp_path):
    """A CLIP made in Flax (as the project makes its own tiny encoders)
    saved with save_clip gives the same embeddings in transformers."""
    text = {**TINY_CLIP_TEXT, "num_hidden_layers": 1}
    vision = {**TINY_CLIP_VISION, "num_hidden_layers": 1, "patch_size": 8}
    config = CLIPConfig.from_hf({"text_config": text,
                                 "vision_config": vision,
                                 "projection_dim": 16})
    model = random_model(lambda: CLIP(config, rngs=nnx.Rngs(0)))
    save_clip(model, tmp_path)
    ref = hf_clip(tmp_path)
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3))
    pixels = pixels.astype(np.float32)
    ids = np.asarray([[62, 3, 63, 1]], np.int32)
    with torch.no_grad():
        img = ref.get_image_features(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
        txt = ref.get_text_features(input_ids=torch.from_numpy(ids).long())
    ours_img, ours_txt = nnx.jit(
        lambda m, p, t: (m.encode_image(p), m.encode_text(t)))(
            model, jnp.asarray(pixels), jnp.asarray(ids))
    np.testing.assert_allclose(ours_img, img.pooler_output.numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(ours_txt, txt.pooler_output.numpy(),
                               atol=1e-5)


def test_bf16_save_keeps_dtype(tmp_path, clip_dir):
    m16 = load_clip(clip_dir, dtype=jnp.bfloat16)
    save_clip(m16, tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    back = load_clip(tmp_path, dtype=jnp.float32)
    for k, v in params_of(back).items():
        np.testing.assert_array_equal(
            v, params_of(m16)[k].astype(np.float32), err_msg=k)


# ------------------------------------------------ real configs (large) --


def bilinear_positions(model):
    """HF CLIP with WeCLIP's bilinear position resize (see
    test_clip_parity.bilinear_reference)."""
    emb = model.vision_model.embeddings

    def interpolate(self, embeddings, height, width):
        pos = self.position_embedding.weight[None]
        side = int(round((pos.shape[1] - 1) ** 0.5))
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(
            grid, size=(height // self.patch_size, width // self.patch_size),
            mode="bilinear", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
        return torch.cat([pos[:, :1], grid], dim=1)

    emb.interpolate_pos_encoding = types.MethodType(interpolate, emb)


@pytest.mark.slow
@pytest.mark.parity
def test_full_clip_vit_b16_config(tmp_path):
    """A random model with openai/clip-vit-base-patch16's config, saved as a
    real snapshot is (with the legacy position_ids buffers), loads without
    warnings and matches transformers at a small input (atol 1e-5)."""
    config = transformers.CLIPConfig(text_config=FULL_CLIP_TEXT,
                                     vision_config=FULL_CLIP_VISION,
                                     projection_dim=512)
    torch.manual_seed(0)
    ref = transformers.CLIPModel(config).eval()
    state = ref.state_dict()
    state["vision_model.embeddings.position_ids"] = torch.arange(197)[None]
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ref.save_pretrained(tmp_path, state_dict=state)
    del state
    model = no_warnings(load_clip, tmp_path)
    assert model.vision.position_embedding.shape == (197, 768)
    assert model.vision.patch_embedding.kernel.shape == (16, 16, 3, 768)
    assert model.text.token_embedding.embedding.shape == (49408, 512)
    assert model.text.config.eos_token_id == 49407
    bilinear_positions(ref)
    pixels = np.random.default_rng(0).normal(size=(1, 48, 32, 3))
    pixels = pixels.astype(np.float32)
    ids = np.asarray([[49406, 320, 1125, 539, 49407, 49407]], np.int32)
    img = nnx.jit(lambda m, p: m.encode_image(p))(model, jnp.asarray(pixels))
    txt = nnx.jit(lambda m, t: m.encode_text(t))(model, jnp.asarray(ids))
    with torch.no_grad():
        hf_img = ref.get_image_features(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            interpolate_pos_encoding=True).pooler_output.numpy()
        hf_txt = ref.get_text_features(
            input_ids=torch.from_numpy(ids).long()).pooler_output.numpy()
    print(f"\nfull CLIP: image {np.abs(img - hf_img).max():.3g}, "
          f"text {np.abs(txt - hf_txt).max():.3g}")
    np.testing.assert_allclose(img, hf_img, atol=1e-5)
    np.testing.assert_allclose(txt, hf_txt, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parity
def test_full_dino_vits16_config(tmp_path):
    config = transformers.ViTConfig(**FULL_DINO)
    torch.manual_seed(0)
    ref = transformers.ViTModel(config, add_pooling_layer=True).eval()
    ref.save_pretrained(tmp_path)
    model = no_warnings(load_dino, tmp_path)
    assert model.position_embeddings.shape == (1, 197, 384)
    pixels = np.random.default_rng(0).normal(size=(1, 48, 32, 3))
    pixels = pixels.astype(np.float32)
    tokens, out = jax.jit(lambda p: model(p))(jnp.asarray(pixels))
    with torch.no_grad():
        hf = ref(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                 interpolate_pos_encoding=True).last_hidden_state.numpy()
    print(f"\nfull DINO: tokens {np.abs(tokens - hf).max():.3g}")
    np.testing.assert_allclose(tokens, hf, atol=1e-5)
    assert len(out["attn"]) == 12 and out["attn"][-1].shape == (1, 7, 7)
