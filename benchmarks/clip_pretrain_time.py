"""Wall and CPU seconds of a short tiny-CLIP pretraining, on any checkout.

Trains the embedded default's tiny CLIP (`configs/synthetic.py`,
`pretrain.clip`) for `--steps` steps on the cached synthetic world and
prints the seconds `train_clip` reports (set-up and compilation included).
It runs on old checkouts too (before and after `ssr_jax/pretrain.py` became
a package), so two commits can be compared side by side with farm-bench,
each from its own worktree (docs/known_issues.md, "The embedded default's
wall time"):

    cd OLD   # a worktree of the older commit
    farm-bench -n 3 --warmup 0 --timeout 900 \\
      --vs "sh -c 'PYTHONPATH=OLD exec python \\
            NEW/benchmarks/clip_pretrain_time.py >>/tmp/old.log 2>&1'" \\
      -- sh -c 'cd NEW && exec python benchmarks/clip_pretrain_time.py \\
            >>/tmp/new.log 2>&1'

Run from a checkout's root: its `configs/synthetic.py` is the one read
(and, with PYTHONPATH at it, its `ssr_jax`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

import ssr_jax  # noqa: F401  (applies the XLA guard where the checkout has it)
from ssr_jax import pretrain

try:  # ssr_jax/pretrain/ as a package (2026-12-05 on)
    from ssr_jax.pretrain.clip import train_clip
    from ssr_jax.pretrain.world import build_tokenizer
except ImportError:  # ssr_jax/pretrain.py (before)
    train_clip = pretrain.train_clip
    build_tokenizer = pretrain.build_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location(
        "synthetic_config", os.path.join("configs", "synthetic.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("")
    config.pretrain.clip.steps = args.steps
    root = pretrain.ensure_world(config)
    tok = tempfile.mkdtemp()
    build_tokenizer(root, tok, config.pretrain.clip.context_length)
    _, info = train_clip(config, root, tok, progress=False)
    print(f"{os.path.dirname(ssr_jax.__file__)}: {args.steps} CLIP steps, "
          f"{info['seconds']:.1f} s wall, {info['cpu_seconds']:.1f} s CPU "
          f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})", file=sys.stderr)


if __name__ == "__main__":
    main()
