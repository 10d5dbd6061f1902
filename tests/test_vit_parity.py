"""DINO ViT (ssr_jax.models.vit) against transformers.ViTModel, float32.

The reference is HF's eager-attention model with
`interpolate_pos_encoding=True` (bicubic, align_corners=False, to the
floored patch grid). Tolerance: atol 1e-5 on every compared array.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import hf_dino, make_tiny_dino

from ssr_jax.models.loading import load_dino

pytestmark = pytest.mark.parity
ATOL = 1e-5
# Native; square with another grid; non-square; no multiple of the patch.
SIZES = {16: [(32, 32), (64, 64), (320, 256), (50, 37)],
         8: [(32, 32), (45, 30)]}


@pytest.fixture(scope="module", params=[16, 8], ids=["p16", "p8"])
def dino_pair(request, tmp_path_factory):
    patch = request.param
    path = make_tiny_dino(tmp_path_factory.mktemp(f"dino_p{patch}"),
                          patch_size=patch)
    return patch, path, load_dino(path), hf_dino(path)


@pytest.fixture(scope="module")
def dino16(tmp_path_factory):
    path = make_tiny_dino(tmp_path_factory.mktemp("dino16"))
    return 16, path, load_dino(path), hf_dino(path)


@nnx.jit
def forward(model, pixels):
    return model(pixels)


def hf_forward(ref, pixels: np.ndarray):
    with torch.no_grad():
        return ref(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                   interpolate_pos_encoding=True, output_hidden_states=True,
                   output_attentions=True)


def max_err(ours, ref: torch.Tensor) -> float:
    ours = np.asarray(ours, np.float32)
    assert ours.shape == tuple(ref.shape), (ours.shape, ref.shape)
    return float(np.abs(ours - ref.numpy()).max())


def test_vit_parity(dino_pair):
    patch, _, model, ref = dino_pair
    rng = np.random.default_rng(0)
    report = {}

    def check(name, ours, theirs):
        err = max_err(ours, theirs)
        report[name] = max(err, report.get(name, 0.0))
        assert err <= ATOL, f"{name}: max abs error {err:.3g} > {ATOL}"

    for h, w in SIZES[patch]:
        pixels = rng.normal(size=(2, h, w, 3)).astype(np.float32)
        tokens, out = forward(model, jnp.asarray(pixels))
        hf = hf_forward(ref, pixels)
        assert tuple(int(g) for g in out["grid"]) == (h // patch, w // patch)
        n_layers = ref.config.num_hidden_layers
        assert len(out["hidden"]) == len(out["attn"]) == n_layers
        check("tokens", tokens, hf.last_hidden_state)
        for i in range(n_layers):
            check(f"hidden[{i}]", out["hidden"][i], hf.hidden_states[i + 1])
            assert out["attn"][i].dtype == jnp.float32
            check(f"attn[{i}]", out["attn"][i], hf.attentions[i].mean(1))
    print(f"\nDINO p{patch} max abs errors: {report}")


def test_vit_embed_parity(dino_pair):
    """Embeddings alone (patch conv + bias, CLS, bicubic positions)."""
    patch, _, model, ref = dino_pair
    pixels = np.random.default_rng(1).normal(size=(1, 80, 48, 3))
    pixels = pixels.astype(np.float32)
    with torch.no_grad():
        hf = ref.embeddings(torch.from_numpy(pixels).permute(0, 3, 1, 2),
                            interpolate_pos_encoding=True)
    ours = nnx.jit(lambda m, p: m.embed(p))(model, jnp.asarray(pixels))
    assert max_err(ours, hf) <= ATOL


def test_vit_bf16_loading(dino16):
    _, path, _, ref = dino16
    m16 = load_dino(path, dtype=jnp.bfloat16)
    params = jax.tree.leaves(nnx.state(m16, nnx.Param))
    assert params and all(p.dtype == jnp.bfloat16 for p in params)
    pixels = np.random.default_rng(2).normal(size=(2, 32, 32, 3))
    pixels = pixels.astype(np.float32)
    tokens, out = forward(m16, jnp.asarray(pixels))
    hf = hf_forward(ref, pixels)
    assert tokens.dtype == jnp.bfloat16 and out["attn"][0].dtype == jnp.float32
    scale = float(hf.last_hidden_state.abs().max())
    assert max_err(tokens, hf.last_hidden_state) <= 0.05 * scale
    assert max_err(out["attn"][-1], hf.attentions[-1].mean(1)) <= 0.02
