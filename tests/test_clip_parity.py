"""CLIP (ssr_jax.models.clip) against transformers.CLIPModel, float32.

The reference is HF's eager-attention model loaded from the same snapshot.
HF resizes position embeddings bicubically; WeCLIP (and we) resize them
bilinearly (align_corners=False), so the reference's
`interpolate_pos_encoding` is replaced by the bilinear one
(`bilinear_reference`). Tolerance: atol 1e-5 on every compared array.

Compiling is what costs time here, so forward passes are jitted once per
input shape and shape-independent checks run on patch 16 only.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import hf_clip, make_tiny_clip

from ssr_jax.models.loading import load_clip

pytestmark = pytest.mark.parity
ATOL = 1e-5
# (patch, sizes): native, non-square, and sizes that are no multiple of the
# patch (the conv floors).
SIZES = {16: [(32, 32), (320, 256), (50, 37)],
         8: [(32, 32), (45, 30)]}


def bilinear_reference(model):
    """Makes HF's vision embeddings resize positions as WeCLIP does."""
    emb = model.vision_model.embeddings

    def interpolate(self, embeddings, height, width):
        pos = self.position_embedding.weight[None]
        side = int(round((pos.shape[1] - 1) ** 0.5))
        dim = pos.shape[-1]
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(
            grid, size=(height // self.patch_size, width // self.patch_size),
            mode="bilinear", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat([pos[:, :1], grid], dim=1)

    emb.interpolate_pos_encoding = types.MethodType(interpolate, emb)
    return model


def max_err(ours, ref) -> float:
    ours = np.asarray(ours, np.float32)
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max())


def assert_close(name, ours, ref, atol=ATOL, report=None):
    err = max_err(ours, ref)
    if report is not None:
        report[name] = max(err, report.get(name, 0.0))
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"


@pytest.fixture(scope="module", params=[16, 8], ids=["p16", "p8"])
def clip_pair(request, tmp_path_factory):
    patch = request.param
    path = make_tiny_clip(tmp_path_factory.mktemp(f"clip_p{patch}"),
                          vision_patch_size=patch)
    return patch, path, load_clip(path), bilinear_reference(hf_clip(path))


@pytest.fixture(scope="module")
def clip16(tmp_path_factory):
    """Patch-16 model for the shape-independent checks (jit caches are
    shared with `clip_pair`'s: same structure)."""
    path = make_tiny_clip(tmp_path_factory.mktemp("clip16"))
    return 16, path, load_clip(path), bilinear_reference(hf_clip(path))


@nnx.jit
def vision_forward(model, pixels):
    embeds, out = model.vision(pixels)
    return embeds, out, model.vision.embed(pixels)


@nnx.jit
def text_forward(model, ids):
    return model.text(ids)


def to_torch(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def hf_vision(ref, pixels: np.ndarray):
    with torch.no_grad():
        hf = ref.get_image_features(
            pixel_values=to_torch(pixels), interpolate_pos_encoding=True,
            output_hidden_states=True, output_attentions=True)
        tokens = ref.visual_projection(
            ref.vision_model.post_layernorm(hf.last_hidden_state))
    return hf, tokens


def test_vision_parity(clip_pair):
    patch, _, model, ref = clip_pair
    rng = np.random.default_rng(0)
    report = {}
    for h, w in SIZES[patch]:
        pixels = rng.normal(size=(2, h, w, 3)).astype(np.float32)
        embeds, out, embedded = vision_forward(model, jnp.asarray(pixels))
        hf, tokens = hf_vision(ref, pixels)
        assert tuple(int(g) for g in out["grid"]) == (h // patch, w // patch)
        n_layers = ref.config.vision_config.num_hidden_layers
        assert len(out["hidden"]) == len(out["attn"]) == n_layers
        assert_close("image_embeds", embeds, hf.pooler_output, report=report)
        assert_close("tokens", out["tokens"], tokens, report=report)
        assert_close("embed", embedded, hf.hidden_states[0], report=report)
        for i in range(n_layers):
            assert_close(f"hidden[{i}]", out["hidden"][i],
                         hf.hidden_states[i + 1], report=report)
            assert out["attn"][i].dtype == jnp.float32
            assert_close(f"attn[{i}]", out["attn"][i],
                         hf.attentions[i].mean(1), report=report)
    print(f"\nCLIP vision p{patch} max abs errors: {report}")


@pytest.mark.parametrize("legacy_eos", [False, True], ids=["eos", "eos2"])
def test_text_parity(legacy_eos, tmp_path):
    """Both HF pooling rules: first `eos_token_id` position, and argmax of
    the ids for legacy configs with eos_token_id == 2."""
    if legacy_eos:
        path = make_tiny_clip(tmp_path, text_eos_token_id=2,
                              text_bos_token_id=0)
        # argmax (pos 2, id 40) differs from the first 2 (pos 3).
        ids = [[0, 5, 40, 2, 2, 2, 2, 2], [0, 9, 12, 33, 2, 61, 1, 1]]
    else:
        path = make_tiny_clip(tmp_path)
        # First 63 (pos 3 / pos 2), not the last one nor the argmax.
        ids = [[62, 5, 7, 63, 63, 63, 63, 63], [62, 9, 63, 1, 50, 63, 1, 1]]
    ids = np.asarray(ids, np.int32)
    model, ref = load_clip(path), hf_clip(path)
    embeds, out = text_forward(model, jnp.asarray(ids))
    with torch.no_grad():
        hf = ref.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                   output_hidden_states=True,
                                   output_attentions=True)
    report = {}
    assert_close("text_embeds", embeds, hf.pooler_output, report=report)
    assert_close("last_hidden", out["last_hidden"], hf.last_hidden_state,
                 report=report)
    for i, (hid, att) in enumerate(zip(out["hidden"], out["attn"],
                                       strict=True)):
        assert_close(f"hidden[{i}]", hid, hf.hidden_states[i + 1],
                     report=report)
        assert_close(f"attn[{i}]", att, hf.attentions[i].mean(1),
                     report=report)
    print(f"\nCLIP text (legacy_eos={legacy_eos}) max abs errors: {report}")


def test_logits_parity(clip16):
    _, _, model, ref = clip16
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    ids = np.asarray([[62, 4, 63, 63], [62, 8, 9, 63]], np.int32)
    with torch.no_grad():
        hf = ref(input_ids=torch.from_numpy(ids).long(),
                 pixel_values=to_torch(pixels))
    logits = nnx.jit(lambda m, p, t: m(p, t))(model, jnp.asarray(pixels),
                                              jnp.asarray(ids))
    assert_close("logits_per_image", logits, hf.logits_per_image, atol=1e-4)


def test_from_ln1_matches_call(clip16):
    _, _, model, _ = clip16

    @nnx.jit
    def check(model, pixels):
        x = model.vision.embed(pixels)
        res = []
        for block in model.vision.blocks:
            h = block.ln_1(x)
            y, attn = block(x)
            y2, attn2 = block.from_ln1(x, h)
            y3, _ = block.from_ln1(x, 1.5 * h)
            grad = jax.grad(lambda h, b=block, x=x: b.from_ln1(x, h)[0].sum())(
                h)
            res.append((y, attn, y2, attn2, y3, grad))
            x = y
        return res

    pixels = np.random.default_rng(2).normal(size=(2, 48, 32, 3))
    for y, attn, y2, attn2, y3, grad in check(
            model, jnp.asarray(pixels, jnp.float32)):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))
        np.testing.assert_array_equal(np.asarray(attn), np.asarray(attn2))
        # h really replaces ln_1(x): another h gives another output, and the
        # gradient w.r.t. h exists.
        assert np.abs(np.asarray(y3 - y)).max() > 1e-3
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_run_blocks_split_matches_full(clip16):
    _, _, model, _ = clip16

    @nnx.jit
    def split_and_full(model, pixels):
        n = len(model.vision.blocks)
        x = model.vision.embed(pixels)
        head, out1 = model.vision.run_blocks(x, 0, n - 1)
        last, out2 = model.vision.run_blocks(head, n - 1)
        embeds, out = model.vision(pixels)
        return last, out1, out2, embeds, out, model.vision.project(last)

    pixels = np.random.default_rng(3).normal(size=(2, 48, 32, 3))
    last, out1, out2, embeds, out, projected = split_and_full(
        model, jnp.asarray(pixels, jnp.float32))
    n = len(model.vision.blocks)
    assert len(out1["hidden"]) == n - 1 and len(out2["attn"]) == 1
    np.testing.assert_allclose(last, out["hidden"][-1], atol=1e-6)
    for a, b in zip(out["hidden"] + out["attn"],
                    out1["hidden"] + out2["hidden"] + out1["attn"]
                    + out2["attn"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(projected, out["tokens"], atol=1e-6)
    np.testing.assert_allclose(projected[:, 0], embeds, atol=1e-6)


def test_bf16_loading(clip16):
    """bfloat16 parameters and compute, float32 attention maps; outputs
    within 5% (of the largest magnitude) of the float32 reference."""
    _, path, _, ref = clip16
    m16 = load_clip(path, dtype="bfloat16")
    params = jax.tree.leaves(nnx.state(m16, nnx.Param))
    assert params and all(p.dtype == jnp.bfloat16 for p in params)
    pixels = np.random.default_rng(5).normal(size=(2, 32, 32, 3))
    pixels = pixels.astype(np.float32)
    embeds, out, _ = vision_forward(m16, jnp.asarray(pixels))
    assert embeds.dtype == jnp.bfloat16 and out["attn"][0].dtype == jnp.float32
    hf, _ = hf_vision(ref, pixels)
    scale = float(hf.pooler_output.abs().max())
    assert max_err(embeds, hf.pooler_output) <= 0.05 * scale
    assert max_err(out["attn"][-1], hf.attentions[-1].mean(1)) <= 0.02
    ids = np.asarray([[62, 4, 63, 63]], np.int32)
    text, _ = text_forward(m16, jnp.asarray(ids))
    with torch.no_grad():
        hf_text = ref.get_text_features(
            input_ids=torch.from_numpy(ids).long()).pooler_output
    assert max_err(text, hf_text) <= 0.05 * float(hf_text.abs().max())
