"""DINOv2 (ssr_jax.models.dinov2) against transformers.Dinov2Model and
Dinov2WithRegistersModel, float32; plus its snapshot loading and saving.

The reference is HF's eager-attention model (transformers 5.24), random
weights saved by transformers with every parameter perturbed. Tolerance:
atol 1e-5 on every compared array (final tokens, every block's hidden
state, every block's head-averaged attention, the embeddings). Sizes: the
native 56x56 (4x4 grid, no resize), a non-square 14·9 x 14·13 (upsampled
positions) and 45x31 (3x2 grid: downsampled positions, floored patches).
Run `pytest -s` to print the measured max abs errors.
"""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from hf_fixtures import (
    FULL_DINOV2_B,
    FULL_DINOV2_S,
    hf_dinov2,
    make_tiny_dinov2,
)

from ssr_jax.models import dinov2 as dinov2_lib
from ssr_jax.models.loading import WeightsError, load_dinov2, save_dinov2

pytestmark = pytest.mark.parity
ATOL = 1e-5
SIZES = [(56, 56), (14 * 9, 14 * 13), (45, 31)]
VARIANTS = {
    "plain": {},
    "registers": {"num_register_tokens": 2},
    "swiglu": {"use_swiglu_ffn": True},
    "registers_swiglu_noqkvbias": {"num_register_tokens": 3,
                                   "use_swiglu_ffn": True,
                                   "qkv_bias": False},
}


@pytest.fixture(scope="module")
def make_pair(tmp_path_factory):
    """name → (name, snapshot path, our model, HF model), built once."""
    cache = {}

    def get(name):
        if name not in cache:
            path = make_tiny_dinov2(tmp_path_factory.mktemp(name),
                                    **VARIANTS[name])
            cache[name] = name, path, load_dinov2(path), hf_dinov2(path)
        return cache[name]

    return get


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def pair(request, make_pair):
    return make_pair(request.param)


@nnx.jit
def forward(model, pixels):
    return model(pixels)


def hf_forward(ref, pixels: np.ndarray):
    with torch.no_grad():
        return ref(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                   output_hidden_states=True, output_attentions=True)


def max_err(ours, ref: torch.Tensor) -> float:
    ours = np.asarray(ours, np.float32)
    assert ours.shape == tuple(ref.shape), (ours.shape, ref.shape)
    return float(np.abs(ours - ref.numpy()).max())


def compare(model, ref, pixels, report, jit=True, hidden_scaled=False):
    """Every output against HF; records the max error per kind.

    `hidden_scaled`: the hidden-state tolerance is 1e-5 · max(1, max|ref|)
    (a relative 1e-5) instead of 1e-5 absolute. The full-size ViT-B/14
    residual stream reaches |h| ≈ 12 after 12 blocks, where float32
    summation-order differences over 768-wide matmuls are ~1.3e-6 relative
    (~10 ulp; measured 1.5e-5 absolute), so an absolute 1e-5 there tests
    the rounding, not the model.
    """
    tokens, out = (forward if jit else type(model).__call__)(
        model, jnp.asarray(pixels))
    hf = hf_forward(ref, pixels)
    p = model.config.patch_size
    h, w = pixels.shape[1] // p, pixels.shape[2] // p
    assert tuple(int(g) for g in out["grid"]) == (h, w)
    assert tokens.shape[1] == model.layout.num_tokens((h, w))
    n_layers = ref.config.num_hidden_layers
    assert len(out["hidden"]) == len(out["attn"]) == n_layers

    def check(name, ours, theirs, scaled=False):
        err = max_err(ours, theirs)
        report[name] = max(err, report.get(name, 0.0))
        scale = float(theirs.abs().max())
        if scaled:
            report[name + "_rel"] = max(err / scale,
                                        report.get(name + "_rel", 0.0))
        tol = ATOL * (max(1.0, scale) if scaled else 1.0)
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"

    check("embeddings", model.embed(jnp.asarray(pixels)), hf.hidden_states[0])
    check("tokens", tokens, hf.last_hidden_state)
    for i in range(n_layers):
        check("hidden", out["hidden"][i], hf.hidden_states[i + 1],
              scaled=hidden_scaled)
        assert out["attn"][i].dtype == jnp.float32
        check("attn", out["attn"][i], hf.attentions[i].mean(1))


def test_dinov2_parity(pair):
    name, _, model, ref = pair
    rng = np.random.default_rng(0)
    for h, w in SIZES:
        report = {}
        pixels = rng.normal(size=(2, h, w, 3)).astype(np.float32)
        compare(model, ref, pixels, report)
        print(f"\nDINOv2 {name} {h}x{w} max abs errors: "
              + ", ".join(f"{k} {v:.2e}" for k, v in report.items()))


def test_dinov2_layout_and_config(pair):
    name, _, model, ref = pair
    regs = VARIANTS[name].get("num_register_tokens", 0)
    assert model.layout.num_prefix_tokens == 1 + regs
    assert model.layout.num_register_tokens == regs
    assert model.layout.patch_start == 1 + regs
    assert model.layout.patch_size == 14
    assert model.config.antialias == (regs > 0)
    assert model.config.layer_norm_eps == ref.config.layer_norm_eps
    if model.config.use_swiglu_ffn:
        block = ref.encoder.layer[0].mlp
        assert model.config.swiglu_dim == block.gate_proj.out_features


def test_position_interpolation_mode_matters(pair):
    """A negative control: HF's plain class resizes without antialias and
    the registers class with it; the other choice is measurably wrong, so the
    parity above pins the mode."""
    name, _, model, ref = pair
    grid = (9, 13)
    with torch.no_grad():
        want = ref.embeddings.interpolate_pos_encoding(
            torch.zeros(1, 1 + grid[0] * grid[1], model.config.hidden_size),
            14 * grid[0],
            14 * grid[1])[0].numpy()
    np.testing.assert_allclose(np.asarray(model.positions(grid)), want,
                               atol=ATOL)
    flipped = dinov2_lib.Dinov2Config(**{
        **{f: getattr(model.config, f) for f in (
            "hidden_size", "num_hidden_layers", "num_attention_heads",
            "mlp_ratio", "image_size", "patch_size", "use_swiglu_ffn",
            "qkv_bias")},
        "model_type": ("dinov2" if model.config.antialias
                       else "dinov2_with_registers"),
        "num_register_tokens": 0})
    other = nnx.eval_shape(lambda: dinov2_lib.Dinov2(flipped,
                                                     rngs=nnx.Rngs(0)))
    other.position_embeddings.set_value(model.position_embeddings[...])
    err = np.abs(np.asarray(other.positions(grid)) - want).max()
    assert err > 10 * ATOL, err


def test_dinov2_bf16_loading(make_pair):
    _, path, _, ref = make_pair("registers")
    m16 = load_dinov2(path, dtype=jnp.bfloat16)
    params = jax.tree.leaves(nnx.state(m16, nnx.Param))
    assert params and all(p.dtype == jnp.bfloat16 for p in params)
    pixels = np.random.default_rng(2).normal(size=(2, 56, 70, 3))
    pixels = pixels.astype(np.float32)
    tokens, out = forward(m16, jnp.asarray(pixels))
    hf = hf_forward(ref, pixels)
    assert tokens.dtype == jnp.bfloat16 and out["attn"][0].dtype == jnp.float32
    scale = float(hf.last_hidden_state.abs().max())
    assert max_err(tokens, hf.last_hidden_state) <= 0.05 * scale
    assert max_err(out["attn"][-1], hf.attentions[-1].mean(1)) <= 0.02


# ------------------------------------------------------ full-size configs --

FULL = {"vits14": (FULL_DINOV2_S, {}),
        "vits14_reg": (FULL_DINOV2_S, {"num_register_tokens": 4}),
        "vitb14": (FULL_DINOV2_B, {}),
        "vitb14_reg": (FULL_DINOV2_B, {"num_register_tokens": 4})}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FULL))
def test_full_size_dinov2_loads_and_agrees(tmp_path, name):
    """facebook/dinov2-{small,base}[-with-registers] shapes (37x37 position
    grid, 12 blocks): every tensor maps, and one forward at 14·5 x 14·3
    (positions downsampled 37 → 5x3) agrees at 1e-5 (hidden states at 1e-5
    relative to their magnitude, see `compare`). Eager (no jit): ~8-20 s
    each on 2 cores, hence slow."""
    base, extra = FULL[name]
    start = time.perf_counter()
    path = make_tiny_dinov2(tmp_path, base=base, perturb=0.02, **extra)
    model, ref = load_dinov2(path), hf_dinov2(path)
    n_ours = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_hf = sum(p.numel() for n, p in ref.named_parameters()
               if "mask_token" not in n)
    assert n_ours == n_hf
    pixels = np.random.default_rng(3).normal(size=(1, 70, 42, 3))
    report = {}
    compare(model, ref, pixels.astype(np.float32), report, jit=False,
            hidden_scaled=True)
    print(f"\nDINOv2 {name} ({n_ours / 1e6:.1f}M params) max abs errors: "
          + ", ".join(f"{k} {v:.2e}" for k, v in report.items())
          + f" [{time.perf_counter() - start:.1f} s]")


# ---------------------------------------------------- loading and saving --


def test_save_round_trip_and_hf_reads_it(tmp_path, pair):
    name, path, model, ref = pair
    out = tmp_path / "saved"
    save_dinov2(model, out)
    with open(out / "config.json") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == ref.config.model_type
    again = load_dinov2(out)
    for (k, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                              nnx.to_flat_state(nnx.state(again, nnx.Param)),
                              strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()),
                                      np.asarray(b.get_value()), err_msg=k)
    reread = transformers.AutoModel.from_pretrained(
        out, attn_implementation="eager")
    assert type(reread) is type(ref)
    theirs = dict(ref.state_dict())
    for key, value in reread.state_dict().items():
        if "mask_token" in key:
            assert not value.any()  # written as zeros
            continue
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=0,
                                   msg=key)


def test_missing_misshaped_and_unexpected_tensors(tmp_path, make_pair):
    _, path, _, _ = make_pair("registers")
    dst = tmp_path / "bad"
    shutil.copytree(path, dst)
    file = os.path.join(dst, "model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    del tensors["encoder.layer.1.layer_scale2.lambda1"]
    del tensors["embeddings.register_tokens"]
    tensors["encoder.layer.0.mlp.fc1.weight"] = np.zeros((8, 32), np.float32)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(WeightsError) as err:
        load_dinov2(dst)
    msg = str(err.value)
    assert "2 missing tensors" in msg and "1 tensors with the wrong shape" \
        in msg
    assert "  encoder.layer.1.layer_scale2.lambda1" in msg
    assert "  embeddings.register_tokens" in msg
    assert "encoder.layer.0.mlp.fc1.weight: expected [64, 32], found " \
        "[8, 32]" in msg

    ok = tmp_path / "extra"
    shutil.copytree(path, ok)
    file = os.path.join(ok, "model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    assert "embeddings.mask_token" in tensors  # ignored silently
    tensors["encoder.layer.0.extra"] = np.ones(3, np.float32)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="1 unexpected tensors ignored: "
                      "encoder.layer.0.extra$"):
        load_dinov2(ok)


def test_snapshot_errors(tmp_path, make_pair):
    _, path, _, _ = make_pair("plain")
    with pytest.raises(WeightsError, match="not a directory.*dinov2"):
        load_dinov2(tmp_path / "nope")
    # A DINO ViT config is refused with both accepted model types named.
    wrong = tmp_path / "vit"
    shutil.copytree(path, wrong)
    with open(wrong / "config.json") as f:
        cfg = json.load(f)
    cfg["model_type"] = "vit"
    with open(wrong / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(WeightsError, match="model_type='vit'.*'dinov2' or "
                       "'dinov2_with_registers'"):
        load_dinov2(wrong)
    # Pickles only: refused, never opened, with the conversion command.
    pk = tmp_path / "pickle"
    pk.mkdir()
    shutil.copy(os.path.join(path, "config.json"), pk)
    (pk / "pytorch_model.bin").write_bytes(b"junk")
    with pytest.raises(WeightsError,
                       match="(?s)never loaded.*import AutoModel"):
        load_dinov2(pk)
    # Registers declared on a plain DINOv2 config: a clear config error.
    with pytest.raises(ValueError, match="dinov2_with_registers"):
        dinov2_lib.Dinov2Config(num_register_tokens=4)


def test_config_from_hf_defaults():
    plain = dinov2_lib.Dinov2Config.from_hf(
        {"model_type": "dinov2", "num_register_tokens": 4})
    assert plain.num_register_tokens == 0  # HF Dinov2Model ignores it
    reg = dinov2_lib.Dinov2Config.from_hf(
        {"model_type": "dinov2_with_registers", "image_size": [518, 518]})
    assert reg.num_register_tokens == 4 and reg.image_size == 518
    assert reg.layout.num_prefix_tokens == 5
    with pytest.raises(ValueError, match="square"):
        dinov2_lib.Dinov2Config.from_hf({"patch_size": [14, 16]})
