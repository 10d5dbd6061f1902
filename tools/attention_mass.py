"""Attention received vs attention given by foreground / background patches
(issue 10, docs/diagnostics.md "the purity threshold and the affinity's
levers").

For the tiny CLIP's affinity (mean attention of the last k blocks, CLS
dropped, `sgc.clip_affinity`) on the first train images of the synthetic
world, prints the mean column sum (attention a patch *receives* as a key)
and row sum (attention it gives as a query) over foreground and background
patches (ground-truth majority label per patch). Sinkhorn's column
normalisation makes every column sum equal; without it a patch's refined
CAM grows with the attention it receives.

    XDG_CACHE_HOME=<cache> python tools/attention_mass.py --max_images 100
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import jax.numpy as jnp
import numpy as np

from ssr_jax import input_pipeline, pretrain, pretrain_report
from ssr_jax import sgc as sgc_lib
from ssr_jax.models import loading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="")
    ap.add_argument("--max_images", type=int, default=100)
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location(
        "synthetic_config", os.path.join(ROOT, "configs", "synthetic.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(args.config)
    root = pretrain.ensure_world(config)
    config.data.root = root
    clip_path, _ = pretrain.ensure_encoders(config, root)
    clip = loading.load_clip(clip_path)
    vision = clip.vision
    num_blocks = len(vision.blocks)
    acc: dict[tuple, list[float]] = {}
    for batch in input_pipeline.seed_batches(
            config, config.data.seed_split, 20, config.data.crop_size,
            max_images=args.max_images, process_index=0, process_count=1):
        pixels = pretrain.normalise(
            jnp.asarray(batch["image"]).astype(jnp.float32),
            config.pretrain.clip.normalization)
        _, out = vision.run_blocks(vision.embed(pixels), 0, num_blocks)
        gt = np.where(np.asarray(batch["example_valid"])[:, None, None],
                      np.asarray(batch["mask"]).astype(np.int32),
                      config.data.ignore_index)
        labels = np.asarray(pretrain_report.patch_labels(
            jnp.asarray(gt), vision.config.patch_size,
            config.data.num_classes, config.data.ignore_index))
        for k in range(1, num_blocks + 1):
            aff = np.asarray(sgc_lib.clip_affinity(list(out["attn"]), k))
            for kind, v in (("received", aff.sum(1)), ("given", aff.sum(2))):
                for part, sel in (("fg", labels > 0), ("bg", labels == 0)):
                    s = acc.setdefault((k, kind, part), [0.0, 0.0])
                    s[0] += float(v[sel].sum())
                    s[1] += float(sel.sum())
    for k in range(1, num_blocks + 1):
        means = {(kind, part): acc[(k, kind, part)][0]
                 / max(acc[(k, kind, part)][1], 1.0)
                 for kind in ("received", "given") for part in ("fg", "bg")}
        cells = ", ".join(f"{kind} {part} {v:.3f}"
                          for (kind, part), v in means.items())
        print(f"last {k} of {num_blocks} blocks: {cells}")


if __name__ == "__main__":
    main()
