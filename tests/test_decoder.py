"""models/decoder: WeCLIP's SegFormerHead + DecoderTransformer in NNX."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssr_jax.models.decoder import Decoder, ResidualAttentionBlock

SMALL = dict(in_dim=32, num_layers_in=3, embed_dim=16, depth=2, heads=4,
             num_classes=5)


def _params(model):
    return nnx.state(model, nnx.Param)


def _count(model):
    return sum(x.size for x in jax.tree.leaves(_params(model)))


@nnx.jit(static_argnums=(2, 3))
def _run(model, x, grid, deterministic, seed=0):
    key = None if deterministic else jax.random.key(seed)
    return model(x, grid, deterministic, dropout_key=key)


@pytest.fixture(scope="module")
def small():
    """One small decoder shared by the tests (initialisation compiles)."""
    return Decoder(**SMALL, dropout=0.3, rngs=nnx.Rngs(params=0, dropout=1))


def _hidden(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                       jnp.float32)


def test_param_count_matches_weclip():
    # From WeCLIP segformer_head.py / Decoder/TransDecoder.py, D=768, E=256:
    #   per-block MLP: (768*256 + 256) + (256*256 + 256) = 262,656
    #   11 MLPs: 2,889,216; linear_fuse 1x1 conv: 2816*256 + 256 = 721,152
    #   -> SegFormerHead 3,610,368
    #   transformer block: in_proj 256*768 + 768 = 197,376; out_proj
    #   256*256 + 256 = 65,792; ln_1 + ln_2 2*512 = 1,024; c_fc
    #   256*1024 + 1024 = 263,168; c_proj 1024*256 + 256 = 262,400
    #   -> 789,760 per block, 2,369,280 for 3
    #   linear_pred: 256*21 + 21 = 5,397
    #   total 3,610,368 + 2,369,280 + 5,397 = 5,985,045 (VOC, 21 classes)
    # Shapes only (nnx.eval_shape): no weights are drawn.
    voc = nnx.eval_shape(lambda: Decoder(rngs=nnx.Rngs(0)))
    print("decoder parameters (VOC):", _count(voc))
    assert _count(voc) == 5_985_045
    coco = nnx.eval_shape(lambda: Decoder(num_classes=81, rngs=nnx.Rngs(0)))
    assert _count(coco) == 5_985_045 + 60 * 257


def test_shapes_full_size():
    model = nnx.eval_shape(lambda: Decoder(rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((11, 2, 400, 768), jnp.float32)
    logits, feat = nnx.eval_shape(lambda m, x: m(x, (20, 20), True), model, x)
    assert logits.shape == (2, 20, 20, 21) and logits.dtype == jnp.float32
    assert feat.shape == (2, 400, 256)
    # Non-square grid; bf16 input (encoder in bfloat16) gives f32 outputs.
    x = jax.ShapeDtypeStruct((11, 1, 12, 768), jnp.bfloat16)
    logits, _ = nnx.eval_shape(lambda m, x: m(x, (3, 4), True), model, x)
    assert logits.shape == (1, 3, 4, 21) and logits.dtype == jnp.float32


def test_bad_shapes_raise(small):
    x = jax.ShapeDtypeStruct((3, 1, 12, 32), jnp.float32)
    with pytest.raises(ValueError, match="expected"):
        nnx.eval_shape(lambda m, x: m(x, (3, 5), True), small, x)
    x = jax.ShapeDtypeStruct((2, 1, 12, 32), jnp.float32)
    with pytest.raises(ValueError, match="expected"):
        nnx.eval_shape(lambda m, x: m(x, (3, 4), True), small, x)


def test_init_follows_pytorch(small):
    model = small
    attn = model.blocks[0].attn
    assert np.all(np.asarray(attn.in_proj.bias[...]) == 0)
    assert np.all(np.asarray(attn.out_proj.bias[...]) == 0)
    e = SMALL["embed_dim"]
    xavier = math.sqrt(6 / (e + 3 * e))
    assert np.abs(np.asarray(attn.in_proj.kernel[...])).max() <= xavier
    fuse = np.asarray(model.fuse.kernel[...])
    bound = 1 / math.sqrt(fuse.shape[0])
    assert np.abs(fuse).max() <= bound and np.abs(fuse).max() > 0.9 * bound
    assert np.abs(np.asarray(model.mlps.w1[...])).max() <= 1 / math.sqrt(32)


def test_deterministic_and_channel_dropout(small):
    x = _hidden((3, 4, 12, 32))
    l1, f1 = _run(small, x, (3, 4), True)
    l2, f2 = _run(small, x, (3, 4), True)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(f1, f2)
    d1, g1 = _run(small, x, (3, 4), False, seed=0)
    d2, g2 = _run(small, x, (3, 4), False, seed=1)
    _, g3 = _run(small, x, (3, 4), False, seed=0)
    assert not np.allclose(g1, g2)  # a fresh mask per key
    np.testing.assert_array_equal(g1, g3)  # the key alone decides the mask
    assert not np.allclose(d1, l1)
    f1, g1 = np.asarray(f1), np.asarray(g1)
    # Dropout2d: each (sample, channel) is zero on every token or scaled by
    # 1 / (1 - p) on every token.
    dropped = np.all(g1 == 0, axis=1)  # [B, E]
    kept = np.all(np.isclose(g1, f1 / 0.7, rtol=1e-5, atol=1e-6), axis=1)
    assert np.all(dropped ^ kept)
    assert 0 < dropped.mean() < 0.7  # 64 channels at p = 0.3


def _np_layernorm(x, scale, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def test_block_matches_numpy_reference():
    width, heads = 16, 4
    block = ResidualAttentionBlock(width, heads, rngs=nnx.Rngs(3))
    # Non-trivial LayerNorm and bias values so every term is exercised.
    rng = np.random.default_rng(5)
    for ln in (block.ln_1, block.ln_2):
        ln.scale[...] = jnp.asarray(rng.normal(1, 0.2, width), jnp.float32)
        ln.bias[...] = jnp.asarray(rng.normal(0, 0.2, width), jnp.float32)
    block.attn.in_proj.bias[...] = jnp.asarray(
        rng.normal(0, 0.2, 3 * width), jnp.float32)
    x = rng.normal(size=(2, 6, width)).astype(np.float32)
    got, attn = nnx.jit(lambda m, x: m(x))(block, jnp.asarray(x))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), _params(block))
    x = x.astype(np.float64)
    want = np.zeros_like(x)
    want_attn = np.zeros((2, 6, 6))
    dh = width // heads
    for b in range(2):
        h = _np_layernorm(x[b], p["ln_1"]["scale"], p["ln_1"]["bias"])
        qkv = h @ p["attn"]["in_proj"]["kernel"] + p["attn"]["in_proj"]["bias"]
        out = np.zeros((6, width))
        for hd in range(heads):
            sl = slice(hd * dh, (hd + 1) * dh)
            q = qkv[:, :width][:, sl]
            k = qkv[:, width:2 * width][:, sl]
            v = qkv[:, 2 * width:][:, sl]
            s = q @ k.T / math.sqrt(dh)
            a = np.exp(s - s.max(1, keepdims=True))
            a /= a.sum(1, keepdims=True)
            want_attn[b] += a / heads
            out[:, sl] = a @ v
        y = x[b] + out @ p["attn"]["out_proj"]["kernel"] + \
            p["attn"]["out_proj"]["bias"]
        h = _np_layernorm(y, p["ln_2"]["scale"], p["ln_2"]["bias"])
        u = h @ p["c_fc"]["kernel"] + p["c_fc"]["bias"]
        u = u / (1 + np.exp(-1.702 * u))
        want[b] = y + u @ p["c_proj"]["kernel"] + p["c_proj"]["bias"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(attn, want_attn, atol=1e-6)


@pytest.mark.parity
def test_decoder_matches_torch_weclip_structure(small):
    """The whole decoder against WeCLIP's structure rebuilt from torch.nn."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    cfg = SMALL
    L, D, E, C = (cfg["num_layers_in"], cfg["in_dim"], cfg["embed_dim"],
                  cfg["num_classes"])
    model = small
    p = jax.tree.map(np.asarray, _params(model))

    def t(a):
        return torch.tensor(np.asarray(a))

    mlps = [nn.Sequential(nn.Linear(D, E), nn.ReLU(), nn.Linear(E, E))
            for _ in range(L)]
    fuse = nn.Conv2d(L * E, E, 1)
    blocks = []
    with torch.no_grad():
        for i, m in enumerate(mlps):
            m[0].weight.copy_(t(p["mlps"]["w1"][i].T))
            m[0].bias.copy_(t(p["mlps"]["b1"][i]))
            m[2].weight.copy_(t(p["mlps"]["w2"][i].T))
            m[2].bias.copy_(t(p["mlps"]["b2"][i]))
        fuse.weight.copy_(t(p["fuse"]["kernel"].T[:, :, None, None]))
        fuse.bias.copy_(t(p["fuse"]["bias"]))
        for i in range(cfg["depth"]):
            q = p["blocks"][i]
            mods = dict(ln_1=nn.LayerNorm(E), ln_2=nn.LayerNorm(E),
                        attn=nn.MultiheadAttention(E, cfg["heads"]),
                        c_fc=nn.Linear(E, 4 * E), c_proj=nn.Linear(4 * E, E))
            for ln in ("ln_1", "ln_2"):
                mods[ln].weight.copy_(t(q[ln]["scale"]))
                mods[ln].bias.copy_(t(q[ln]["bias"]))
            mods["attn"].in_proj_weight.copy_(t(q["attn"]["in_proj"]["kernel"].T))
            mods["attn"].in_proj_bias.copy_(t(q["attn"]["in_proj"]["bias"]))
            mods["attn"].out_proj.weight.copy_(
                t(q["attn"]["out_proj"]["kernel"].T))
            mods["attn"].out_proj.bias.copy_(t(q["attn"]["out_proj"]["bias"]))
            for lin in ("c_fc", "c_proj"):
                mods[lin].weight.copy_(t(q[lin]["kernel"].T))
                mods[lin].bias.copy_(t(q[lin]["bias"]))
            blocks.append(mods)
        pred = nn.Conv2d(E, C, 1)
        pred.weight.copy_(t(p["pred"]["kernel"].T[:, :, None, None]))
        pred.bias.copy_(t(p["pred"]["bias"]))

        h, w, B = 3, 4, 4  # the shapes other tests compiled already
        x = np.random.default_rng(1).normal(size=(L, B, h * w, D))
        x = x.astype(np.float32)
        # WeCLIP: tokens as (L, B, D, h, w); MLP per layer over flattened
        # tokens, back to (B, E, h, w), concatenated on channels.
        xt = t(x).permute(0, 1, 3, 2).reshape(L, B, D, h, w)
        outs = []
        for i in range(L):
            y = mlps[i](xt[i].flatten(2).transpose(1, 2))
            outs.append(y.permute(0, 2, 1).reshape(B, E, h, w))
        f = fuse(torch.cat(outs, dim=1))  # Dropout2d off (eval)
        z = f.reshape(B, E, h * w).permute(2, 0, 1)  # LND
        for m in blocks:
            a = m["ln_1"](z)
            z = z + m["attn"](a, a, a, need_weights=False)[0]
            u = m["c_fc"](m["ln_2"](z))
            z = z + m["c_proj"](u * torch.sigmoid(1.702 * u))
        seg = pred(z.permute(1, 2, 0).reshape(B, E, h, w))

    logits, feat = _run(model, jnp.asarray(x), (h, w), True)
    np.testing.assert_allclose(
        feat, f.reshape(B, E, h * w).permute(0, 2, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(
        logits, seg.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_gradients_reach_every_parameter(small):
    x = _hidden((3, 4, 12, 32))

    def loss(m):
        logits, feat = m(x, (3, 4), False, dropout_key=jax.random.key(0))
        return jnp.mean(logits ** 2) + jnp.mean(feat ** 2)

    grads = nnx.jit(nnx.grad(loss))(small)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).max() > 0, path
