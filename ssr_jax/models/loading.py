"""Load and save CLIP, DINO ViT and DINOv2 as Hugging Face safetensors
snapshots.

A snapshot is a directory with `config.json` and `model.safetensors` (or a
sharded `model.safetensors.index.json` + shards), as `save_pretrained`
writes and the Hub serves for openai/clip-vit-base-patch16,
facebook/dino-vits16 and facebook/dinov2-{small,base}[-with-registers].
Tensors are read with `safetensors` into NumPy; PyTorch pickles are refused,
never opened.

One table per model (`clip_entries`, `vit_entries`, `dinov2_entries`) maps
each HF tensor name
to a Flax parameter path and a layout, and serves both directions:

- "linear": torch `Linear.weight` [out, in] ↔ Flax `kernel` [in, out];
- "conv": torch `Conv2d.weight` OIHW ↔ Flax `kernel` HWIO;
- "copy": same array (LayerNorm weight → `scale`, biases, embeddings).

transformers ≥ 5 renames ViT and DINOv2 modules in memory
(`layers.N.attention.q_proj`, DINOv2's SwiGLU `gate_proj`/`up_proj`) but
reads and writes the legacy names used here
(`encoder.layer.N.attention.attention.query`, the fused
`mlp.weights_in`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from ssr_jax.models.clip import CLIP, CLIPConfig
from ssr_jax.models.dinov2 import MODEL_TYPES as DINOV2_TYPES
from ssr_jax.models.dinov2 import Dinov2, Dinov2Config
from ssr_jax.models.vit import ViT, ViTConfig

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = ("float32", "bfloat16")

# Buffers and heads that HF snapshots carry and our models do not use.
IGNORABLE = re.compile(r"(^|\.)position_ids$|^pooler\.")
# DINOv2 also carries the pre-training mask token.
DINOV2_IGNORABLE = re.compile(
    r"(^|\.)position_ids$|^pooler\.|^embeddings\.mask_token$")

LAYOUTS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    # name: (hf → flax, flax → hf)
    "copy": (lambda a: a, lambda a: a),
    "linear": (lambda a: a.T, lambda a: a.T),
    "conv": (lambda a: a.transpose(2, 3, 1, 0),
             lambda a: a.transpose(3, 2, 0, 1)),
}


class WeightsError(ValueError):
    """A snapshot that cannot be loaded; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: HF name, dotted Flax path, layout (a `LAYOUTS` key)."""

    hf: str
    flax: str
    layout: str


def _layer_norm(hf: str, fx: str) -> list[Entry]:
    return [Entry(f"{hf}.weight", f"{fx}.scale", "copy"),
            Entry(f"{hf}.bias", f"{fx}.bias", "copy")]


def _dense(hf: str, fx: str, bias: bool = True) -> list[Entry]:
    out = [Entry(f"{hf}.weight", f"{fx}.kernel", "linear")]
    if bias:
        out.append(Entry(f"{hf}.bias", f"{fx}.bias", "copy"))
    return out


def _clip_block(hf: str, fx: str) -> list[Entry]:
    out = _layer_norm(f"{hf}.layer_norm1", f"{fx}.layer_norm1")
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out += _dense(f"{hf}.self_attn.{name}", f"{fx}.self_attn.{name}")
    out += _layer_norm(f"{hf}.layer_norm2", f"{fx}.layer_norm2")
    out += _dense(f"{hf}.mlp.fc1", f"{fx}.mlp.fc1")
    out += _dense(f"{hf}.mlp.fc2", f"{fx}.mlp.fc2")
    return out


def clip_entries(config: CLIPConfig) -> list[Entry]:
    """Every tensor of a HF `CLIPModel` and where it goes in `CLIP`."""
    v, t = "vision_model", "text_model"
    out = [
        Entry("logit_scale", "logit_scale", "copy"),
        Entry(f"{v}.embeddings.class_embedding", "vision.class_embedding",
              "copy"),
        Entry(f"{v}.embeddings.patch_embedding.weight",
              "vision.patch_embedding.kernel", "conv"),
        Entry(f"{v}.embeddings.position_embedding.weight",
              "vision.position_embedding", "copy"),
        *_layer_norm(f"{v}.pre_layrnorm", "vision.pre_layrnorm"),
        *_layer_norm(f"{v}.post_layernorm", "vision.post_layernorm"),
        *_dense("visual_projection", "vision.visual_projection", bias=False),
        Entry(f"{t}.embeddings.token_embedding.weight",
              "text.token_embedding.embedding", "copy"),
        Entry(f"{t}.embeddings.position_embedding.weight",
              "text.position_embedding", "copy"),
        *_layer_norm(f"{t}.final_layer_norm", "text.final_layer_norm"),
        *_dense("text_projection", "text.text_projection", bias=False),
    ]
    for i in range(config.vision.num_hidden_layers):
        out += _clip_block(f"{v}.encoder.layers.{i}", f"vision.blocks.{i}")
    for i in range(config.text.num_hidden_layers):
        out += _clip_block(f"{t}.encoder.layers.{i}", f"text.blocks.{i}")
    return out


def _vit_stem_entries() -> list[Entry]:
    """CLS, positions, patch conv and final LayerNorm: the same names in
    HF's `ViTModel` and `Dinov2Model`, and in our `ViT` and `Dinov2`."""
    e = "embeddings"
    return [
        Entry(f"{e}.cls_token", "cls_token", "copy"),
        Entry(f"{e}.position_embeddings", "position_embeddings", "copy"),
        Entry(f"{e}.patch_embeddings.projection.weight",
              "patch_embedding.kernel", "conv"),
        Entry(f"{e}.patch_embeddings.projection.bias",
              "patch_embedding.bias", "copy"),
        *_layer_norm("layernorm", "layernorm"),
    ]


def vit_entries(config: ViTConfig) -> list[Entry]:
    """Every tensor of a HF `ViTModel` (legacy names, pooler excluded) and
    where it goes in `ViT`."""
    out = _vit_stem_entries()
    for i in range(config.num_hidden_layers):
        hf, fx = f"encoder.layer.{i}", f"blocks.{i}"
        out += _layer_norm(f"{hf}.layernorm_before", f"{fx}.layer_norm1")
        for src, dst in (("query", "q_proj"), ("key", "k_proj"),
                         ("value", "v_proj")):
            out += _dense(f"{hf}.attention.attention.{src}",
                          f"{fx}.self_attn.{dst}", bias=config.qkv_bias)
        out += _dense(f"{hf}.attention.output.dense",
                      f"{fx}.self_attn.out_proj")
        out += _layer_norm(f"{hf}.layernorm_after", f"{fx}.layer_norm2")
        out += _dense(f"{hf}.intermediate.dense", f"{fx}.mlp.fc1")
        out += _dense(f"{hf}.output.dense", f"{fx}.mlp.fc2")
    return out


def dinov2_entries(config: Dinov2Config) -> list[Entry]:
    """Every tensor of a HF `Dinov2Model` / `Dinov2WithRegistersModel`
    (legacy names; mask token excluded) and where it goes in `Dinov2`."""
    out = _vit_stem_entries()
    if config.num_register_tokens:
        out.append(Entry("embeddings.register_tokens", "register_tokens",
                         "copy"))
    for i in range(config.num_hidden_layers):
        hf, fx = f"encoder.layer.{i}", f"blocks.{i}"
        out += _layer_norm(f"{hf}.norm1", f"{fx}.norm1")
        for src, dst in (("query", "q_proj"), ("key", "k_proj"),
                         ("value", "v_proj")):
            out += _dense(f"{hf}.attention.attention.{src}",
                          f"{fx}.self_attn.{dst}", bias=config.qkv_bias)
        out += _dense(f"{hf}.attention.output.dense",
                      f"{fx}.self_attn.out_proj")
        out.append(Entry(f"{hf}.layer_scale1.lambda1", f"{fx}.layer_scale1",
                         "copy"))
        out += _layer_norm(f"{hf}.norm2", f"{fx}.norm2")
        names = (("weights_in", "weights_out") if config.use_swiglu_ffn
                 else ("fc1", "fc2"))
        for name in names:
            out += _dense(f"{hf}.mlp.{name}", f"{fx}.mlp.{name}")
        out.append(Entry(f"{hf}.layer_scale2.lambda1", f"{fx}.layer_scale2",
                         "copy"))
    return out


def _dinov2_extra(config: Dinov2Config, dtype: np.dtype,
                  ) -> dict[str, np.ndarray]:
    """The mask token HF expects (pre-training only; written as zeros, its
    HF initial value, so `from_pretrained` loads without warnings)."""
    return {"embeddings.mask_token": np.zeros((1, config.hidden_size),
                                              dtype)}


@dataclasses.dataclass(frozen=True)
class _Spec:
    what: str  # for messages
    repo: str  # the Hub snapshot we expect
    hf_class: str
    model_type: str | tuple[str, ...]  # config.json model_type(s) accepted
    config_cls: Any
    model_cls: Any
    entries: Callable[[Any], list[Entry]]
    ignorable: re.Pattern = IGNORABLE
    # Tensors HF expects that the Flax model does not hold, written on save.
    extra: Callable[[Any, np.dtype], dict[str, np.ndarray]] | None = None

    @property
    def model_types(self) -> tuple[str, ...]:
        return ((self.model_type,) if isinstance(self.model_type, str)
                else self.model_type)


CLIP_SPEC = _Spec("CLIP", "openai/clip-vit-base-patch16", "CLIPModel",
                  "clip", CLIPConfig, CLIP, clip_entries)
DINO_SPEC = _Spec("DINO ViT", "facebook/dino-vits16", "ViTModel", "vit",
                  ViTConfig, ViT, vit_entries)
DINOV2_SPEC = _Spec("DINOv2", "facebook/dinov2-small", "AutoModel",
                    tuple(DINOV2_TYPES), Dinov2Config, Dinov2,
                    dinov2_entries, DINOV2_IGNORABLE, _dinov2_extra)


def canonical_dtype(dtype: Any) -> jnp.dtype:
    """float32 or bfloat16 (a jnp/np dtype or its name); else ValueError."""
    try:
        name = jnp.dtype(dtype).name
    except (TypeError, ValueError):
        name = None
    if name not in DTYPES:
        raise ValueError(
            f"dtype={dtype!r} is not supported: use one of {DTYPES} "
            "(jnp.float32, jnp.bfloat16 or their names)")
    return jnp.dtype(name)


def _variable(model: nnx.Module, path: str) -> nnx.Variable:
    obj: Any = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    if not isinstance(obj, nnx.Variable):
        raise TypeError(f"{path} is not a Flax variable")
    return obj


def _hf_shape(layout: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    dummy = np.broadcast_to(np.zeros((), np.int8), flax_shape)
    return tuple(LAYOUTS[layout][1](dummy).shape)


def _snapshot(path: str, spec: _Spec) -> tuple[dict[str, Any], list[str]]:
    """Checks the directory; returns (config dict, safetensors files)."""
    hint = (f"a Hugging Face snapshot of {spec.repo} ({CONFIG} + {WEIGHTS}),"
            f" e.g. `huggingface-cli download {spec.repo} --local-dir DIR`")
    if not os.path.isdir(path):
        raise WeightsError(f"{path!r} is not a directory: pass {hint}")
    cfg_file = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_file):
        raise WeightsError(f"{path!r} has no {CONFIG}: it must hold {hint}")
    try:
        with open(cfg_file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{cfg_file}: not valid JSON ({e})") from e
    found = config.get("model_type")
    if found is not None and found not in spec.model_types:
        expected = " or ".join(repr(t) for t in spec.model_types)
        raise WeightsError(
            f"{cfg_file} says model_type={found!r}, but a {spec.what} "
            f"({expected}) is expected: pass {hint}")
    single = os.path.join(path, WEIGHTS)
    index = os.path.join(path, INDEX)
    if os.path.isfile(single):
        return config, [single]
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise WeightsError(f"{index}: not a safetensors index with a "
                               f"weight_map ({e!r})") from e
        files = [os.path.join(path, s) for s in shards]
        missing = [s for s, f in zip(shards, files, strict=True)
                   if not os.path.isfile(f)]
        if missing:
            raise WeightsError(f"{index} lists shards missing from {path!r}:"
                               f" {', '.join(missing)}")
        return config, files
    pickles = sorted(
        os.path.basename(p) for pattern in ("*.bin", "*.pt", "*.pth")
        for p in glob.glob(os.path.join(path, pattern)))
    if pickles:
        raise WeightsError(
            f"{path!r} has {', '.join(pickles)} but no {WEIGHTS}: PyTorch "
            "pickles are never loaded (unpickling can run arbitrary code). "
            "Convert the snapshot once with transformers, which writes "
            "safetensors:\n  python -c \"from transformers import "
            f"{spec.hf_class} as M; M.from_pretrained('{path}')"
            f".save_pretrained('{path}')\"")
    raise WeightsError(f"{path!r} has neither {WEIGHTS} nor {INDEX}: it "
                       f"must hold {hint}")


def _headers(files: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name → (file, shape), read from the safetensors headers only."""
    out = {}
    for file in files:
        try:
            with safetensors.safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    out[name] = (file, tuple(f.get_slice(name).get_shape()))
        except (safetensors.SafetensorError, OSError) as e:
            raise WeightsError(f"{file}: not a readable safetensors file "
                               f"({e})") from e
    return out


def _load(path: str, spec: _Spec, dtype: Any) -> Any:
    dtype = canonical_dtype(dtype)
    path = os.fspath(path)
    raw_config, files = _snapshot(path, spec)
    try:
        config = spec.config_cls.from_hf(raw_config)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{os.path.join(path, CONFIG)}: {e}") from e
    model = nnx.eval_shape(
        lambda: spec.model_cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
    entries = spec.entries(config)
    headers = _headers(files)

    missing, mismatched = [], []
    for e in entries:
        want = _hf_shape(e.layout, _variable(model, e.flax).shape)
        if e.hf not in headers:
            missing.append(e.hf)
        elif headers[e.hf][1] != want:
            mismatched.append(f"{e.hf}: expected {list(want)}, found "
                              f"{list(headers[e.hf][1])}")
    if missing or mismatched:
        lines = [f"{path!r} does not match its {CONFIG} for a {spec.what} "
                 f"(expected a snapshot of {spec.repo} or a model saved "
                 "with save_*):"]
        if missing:
            lines.append(f"{len(missing)} missing tensors:")
            lines += [f"  {name}" for name in missing]
        if mismatched:
            lines.append(f"{len(mismatched)} tensors with the wrong shape:")
            lines += [f"  {m}" for m in mismatched]
        raise WeightsError("\n".join(lines))
    known = {e.hf for e in entries}
    unexpected = sorted(n for n in headers
                        if n not in known and not spec.ignorable.search(n))
    if unexpected:
        warnings.warn(
            f"{path!r}: {len(unexpected)} unexpected tensors ignored: "
            f"{', '.join(unexpected)}", stacklevel=3)

    with contextlib.ExitStack() as stack:
        opened = {f: stack.enter_context(
            safetensors.safe_open(f, framework="numpy")) for f in files}
        for e in entries:
            array = opened[headers[e.hf][0]].get_tensor(e.hf)
            _variable(model, e.flax).set_value(jnp.asarray(
                LAYOUTS[e.layout][0](array), dtype))
    leftover = [p for p, v in nnx.to_flat_state(nnx.state(model))
                if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if leftover:
        raise RuntimeError(f"no HF tensor maps to {leftover}: the {spec.what}"
                           " entry table is incomplete")
    return model


def load_clip(path: str | os.PathLike, dtype: Any = jnp.float32) -> CLIP:
    """CLIP from a HF snapshot directory (e.g. openai/clip-vit-base-patch16).

    Args:
      path: directory with config.json + model.safetensors (or a sharded
        model.safetensors.index.json).
      dtype: parameter and compute dtype, float32 or bfloat16.

    Raises:
      WeightsError: bad directory, pickles only, or tensors missing or of the
        wrong shape (all listed). Unexpected tensors only warn.
    """
    return _load(path, CLIP_SPEC, dtype)


def load_dino(path: str | os.PathLike, dtype: Any = jnp.float32) -> ViT:
    """DINO ViT from a HF `ViTModel` snapshot (e.g. facebook/dino-vits16);
    see `load_clip`."""
    return _load(path, DINO_SPEC, dtype)


def _save(model: Any, path: str | os.PathLike, spec: _Spec) -> None:
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for e in spec.entries(model.config):
        array = np.asarray(_variable(model, e.flax)[...])
        # np.array, not ascontiguousarray, which makes 0-d arrays 1-d.
        tensors[e.hf] = np.array(LAYOUTS[e.layout][1](array), order="C")
    dtype = next(iter(tensors.values())).dtype
    if spec.extra is not None:
        tensors.update(spec.extra(model.config, dtype))
    config = model.config.to_hf()
    config["dtype"] = dtype.name
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    safetensors.numpy.save_file(tensors, os.path.join(path, WEIGHTS),
                                metadata={"format": "pt"})


def save_clip(model: CLIP, path: str | os.PathLike) -> None:
    """Writes config.json + model.safetensors (parameter dtype kept) that
    `transformers.CLIPModel.from_pretrained(path)` and `load_clip` read."""
    _save(model, path, CLIP_SPEC)


def save_dino(model: ViT, path: str | os.PathLike) -> None:
    """Writes a HF `ViTModel` snapshot (no pooler) that
    `transformers.ViTModel.from_pretrained(path)` and `load_dino` read."""
    _save(model, path, DINO_SPEC)


def load_dinov2(path: str | os.PathLike, dtype: Any = jnp.float32) -> Dinov2:
    """DINOv2 from a HF `Dinov2Model` or `Dinov2WithRegistersModel` snapshot
    (e.g. facebook/dinov2-small, facebook/dinov2-with-registers-base); see
    `load_clip`. The config's `model_type` picks registers and the position
    interpolation."""
    return _load(path, DINOV2_SPEC, dtype)


def save_dinov2(model: Dinov2, path: str | os.PathLike) -> None:
    """Writes a HF snapshot (model_type from the config; zero mask token, no
    pooler) that `transformers.AutoModel.from_pretrained(path)` and
    `load_dinov2` read."""
    _save(model, path, DINOV2_SPEC)
