"""The synthetic world the tiny encoders pretrain on: where it and the
encoder cache live, generating it, and reading its images, captions and
tokenizer words.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from ml_collections import config_dict
from PIL import Image

from ssr_jax import config_check
from ssr_jax import text as text_lib
from ssr_jax.data import synthetic

# --- paths ------------------------------------------------------------------


def _cache_base() -> str:
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")


def world_root(config: config_dict.ConfigDict) -> str:
    """`synthetic.root`, or by default a directory named by the world's
    parameters under `$XDG_CACHE_HOME/ssr_jax/synthetic` (~/.cache), so
    that worlds of different sizes (full, smoke) never replace each other."""
    w = config.synthetic
    if w.root:
        return os.path.abspath(os.path.expanduser(w.root))
    tag = (f"seed{w.seed}-train{w.num_train}-val{w.num_val}-"
           f"px{w.image_size}")
    p, scope = caption_background_prob(config), caption_background_scope(
        config)
    if p != 1.0:
        tag += f"-capbg{p:g}" + ("" if scope == "all" else f"-{scope}")
    return os.path.join(_cache_base(), "ssr_jax", "synthetic", tag)


def caption_background_prob(config: config_dict.ConfigDict) -> float:
    """`synthetic.caption_background_prob` (1 where a config predates it)."""
    return float(config.synthetic.get("caption_background_prob", 1.0))


def caption_background_scope(config: config_dict.ConfigDict) -> str:
    """`synthetic.caption_background_scope` ("all" where a config predates
    it)."""
    return str(config.synthetic.get("caption_background_scope", "all"))


def world_config(config: config_dict.ConfigDict) -> synthetic.WorldConfig:
    """The `WorldConfig` of `config.synthetic` (the default world's, with
    the fields the config exposes)."""
    return synthetic.WorldConfig(
        caption_background_prob=caption_background_prob(config),
        caption_background_scope=caption_background_scope(config))


def encoder_cache_dir(config: config_dict.ConfigDict) -> str:
    """`pretrain.cache_dir`, default `$XDG_CACHE_HOME/ssr_jax/encoders`."""
    if config.pretrain.cache_dir:
        return os.path.abspath(os.path.expanduser(config.pretrain.cache_dir))
    return os.path.join(_cache_base(), "ssr_jax", "encoders")


def ensure_world(config: config_dict.ConfigDict) -> str:
    """Generates the synthetic world of `config.synthetic` if needed
    (idempotent, atomic: `data.synthetic.generate`); returns its root."""
    w = config.synthetic
    world = world_config(config)
    try:  # a user's override: reported as a config problem, not a bug
        world.validate(w.image_size)
    except ValueError as e:
        raise config_check.ConfigError(
            f"bad synthetic world (--config.synthetic.*): {e}") from None
    root = world_root(config)
    info = synthetic.generate(root, seed=w.seed, num_train=w.num_train,
                              num_val=w.num_val, image_size=w.image_size,
                              config=world,
                              progress=bool(config.pretrain.progress))
    if info["generated"]:
        logging.info("synthetic world written to %s in %.1f s", root,
                     info["seconds"])
    return root


# --- world data -------------------------------------------------------------


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def world_identity(root: str) -> dict[str, Any]:
    """The world's `world.json` version, parameters and file digest."""
    path = os.path.join(root, "world.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {root!r} is not a complete synthetic world; "
            "generate it with ssr_jax.data.synthetic.generate (or "
            "pretrain.ensure_world)")
    w = read_json(path)
    return {"version": w["version"], "params": w["params"],
            "digest": w["digest"]}


def read_images(root: str, names: Sequence[str]) -> np.ndarray:
    """uint8 [N, H, W, 3] of `JPEGImages/<name>.jpg` (all the same size)."""
    images = []
    for n in names:
        with Image.open(os.path.join(root, "JPEGImages", f"{n}.jpg")) as im:
            images.append(np.asarray(im.convert("RGB")))
    return np.stack(images)


def tokenizer_words(root: str) -> list[str]:
    """Words for `text.build_word_tokenizer`: the world's vocabulary, the
    prompt template's words and every class and background prompt."""
    c = read_json(os.path.join(root, text_lib.SYNTHETIC_CLASSES_FILE))
    template = c.get("template", text_lib.TEMPLATE).replace("{}", " ")
    return (list(c["vocabulary"]) + [template] + list(c["prompts"])
            + list(c["background_prompts"]))


def build_tokenizer(root: str, out_dir: str, context_length: int) -> str:
    """Writes the world's word tokenizer into `out_dir` (a CLIP snapshot);
    `model_max_length` is the tiny CLIP's context length, so that
    `transformers.CLIPTokenizer` pads to what the model accepts."""
    text_lib.build_word_tokenizer(tokenizer_words(root), out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    cfg = read_json(path)
    cfg["model_max_length"] = int(context_length)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    return out_dir
