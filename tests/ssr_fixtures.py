"""Tiny CLIP + DINO snapshots with a matching tokenizer, for end-to-end tests.

`make_tiny_encoders(dir, prompts)` writes a CLIP-format word tokenizer that
covers `prompts` (plus the WeCLIP template words), a tiny random HF CLIP
whose vocabulary and EOS id match it, and a tiny random HF DINO ViT, all in
the Hugging Face snapshot layout the real loaders read.
"""

from __future__ import annotations

import json
import os
import sys

import hf_fixtures

from ssr_jax import text


def _words(prompts) -> list[str]:
    words = set("a clean origami .".split())
    for p in prompts:
        words.update(p.replace(",", " ").split())
    return sorted(words)


def make_tiny_encoders(directory, prompts, *, seed: int = 0,
                       patch_size: int = 16, width: int = 32,
                       layers: int = 3) -> tuple[str, str]:
    """Returns (clip_path, dino_path) of tiny random snapshots."""
    clip_dir = os.path.join(directory, "clip")
    dino_dir = os.path.join(directory, "dino")
    os.makedirs(clip_dir, exist_ok=True)
    text.build_word_tokenizer(_words(prompts), clip_dir)
    with open(os.path.join(clip_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    hf_fixtures.make_tiny_clip(
        clip_dir, seed=seed, text_vocab_size=len(vocab),
        text_eos_token_id=eos, text_bos_token_id=bos, text_pad_token_id=eos,
        text_max_position_embeddings=24, vision_patch_size=patch_size,
        vision_hidden_size=width, vision_num_hidden_layers=layers,
        vision_intermediate_size=2 * width)
    hf_fixtures.make_tiny_dino(dino_dir, seed=seed + 1,
                               patch_size=patch_size)
    return clip_dir, dino_dir


def read_checkpoint(workdir: str, step: int, item: str = "params"):
    """`state[item]` of a saved step as host NumPy arrays (any topology)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", None) or meta
    tree = getattr(tree, "tree", tree)
    args = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, restore_args=args)[item]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def voc_tiny_argv(data_root: str, clip: str, dino: str,
                  *overrides: str) -> list[str]:
    """`python -m ssr_jax.main --config configs/voc.py:tiny` on a fixture
    tree and tiny encoders, plus `--workdir`/`--config.*` overrides."""
    return [sys.executable, "-m", "ssr_jax.main",
            "--config", os.path.join(ROOT, "configs", "voc.py") + ":tiny",
            f"--config.data.root={data_root}",
            f"--config.model.clip_path={clip}",
            f"--config.model.dino_path={dino}", *overrides]
