"""Attention received vs attention given by foreground / background patches
(issue 10, docs/diagnostics.md "the purity threshold and the affinity's
levers").

For the tiny CLIP's affinity (mean attention of the last k blocks, CLS
dropped, `sgc.clip_affinity`) and each tiny-DINO block's (on CLIP's grid,
`encoders.patch_affinity`; the last one is SSR's A_DINO) on the first
train images of the synthetic world, prints the mean column sum
(attention a patch *receives* as a key) and row sum (attention it gives
as a query) over foreground and background patches (ground-truth majority
label per patch), the share of a row on the patch itself ("self") and, of
the rest, the share on patches of its own label ("pure_off_self": the
purity that propagation uses; `attention_purity` counts self too).
Sinkhorn's column normalisation makes every column sum equal; without it
a patch's refined CAM grows with the attention it receives
(docs/diagnostics.md, session 20: the tiny DINO has no such saliency).

    XDG_CACHE_HOME=<cache> python tools/attention_mass.py --max_images 100
    XDG_CACHE_HOME=<cache> python tools/attention_mass.py \\
        --config.pretrain.dino.steps=600   # another (cached) encoder

`--config` is the project's config file flag (default
configs/synthetic.py; e.g. configs/synthetic.py:smoke) with the usual
`--config.FIELD=VALUE` overrides.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ssr_jax import cli, input_pipeline, pretrain, pretrain_report, ssr
from ssr_jax import sgc as sgc_lib
from ssr_jax.models import encoders, loading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "synthetic.py"), "config file")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 100,
                                   "first train images read")


def main(argv: Sequence[str]) -> None:
    del argv
    config = _CONFIG.value
    root = pretrain.ensure_world(config)
    config.data.root = root
    clip_path, dino_path = pretrain.ensure_encoders(config, root)
    clip = loading.load_clip(clip_path)
    dino_kind = config.model.get("dino_kind", "dino")
    dino, _ = encoders.load_affinity_encoder(dino_kind, dino_path)
    vision = clip.vision
    num_blocks = len(vision.blocks)
    acc: dict[tuple, list[float]] = {}
    for batch in input_pipeline.seed_batches(
            config, config.data.seed_split, 20, config.data.crop_size,
            max_images=_MAX_IMAGES.value, process_index=0,
            process_count=1):
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
        affs = {f"CLIP last {k} of {num_blocks} blocks":
                np.asarray(sgc_lib.clip_affinity(list(out["attn"]), k))
                for k in range(1, num_blocks + 1)}
        # Each DINO block on CLIP's grid; the last is SSR's A_DINO.
        ph = vision.config.patch_size
        grid = (batch["image"].shape[1] // ph, batch["image"].shape[2] // ph)
        dino_affs = ssr.affinity_encoder_affinity(
            dino, jnp.asarray(batch["image"]), grid, ph, dino_kind,
            all_blocks=True)
        for i, a in enumerate(dino_affs):
            last = " (SSR's A_DINO)" if i == len(dino_affs) - 1 else ""
            affs[f"DINO block {i + 1}{last}"] = np.asarray(a)
        for name, aff in affs.items():
            # a row's own share (self-attention) and, of the rest, the share
            # on its own label: purity counts self, propagation does not use
            # it (a diagonal affinity is pure and propagates nothing)
            rows = np.maximum(aff.sum(2), 1e-12)
            diag = np.diagonal(aff, axis1=1, axis2=2)
            same = (labels[:, :, None] == labels[:, None, :]) & (
                labels[:, None, :] >= 0)
            n = aff.shape[1]
            off = np.where(np.eye(n, dtype=bool)[None], 0.0, aff)
            off_same = (off * same).sum(2) / np.maximum(
                (off * (labels[:, None, :] >= 0)).sum(2), 1e-12)
            for kind, v in (("received", aff.sum(1)), ("given", aff.sum(2)),
                            ("self", diag / rows),
                            ("pure_off_self", off_same)):
                for part, sel in (("fg", labels > 0), ("bg", labels == 0)):
                    s = acc.setdefault((name, kind, part), [0.0, 0.0])
                    s[0] += float(v[sel].sum())
                    s[1] += float(sel.sum())
    for name in dict.fromkeys(k[0] for k in acc):
        means = {(kind, part): acc[(name, kind, part)][0]
                 / max(acc[(name, kind, part)][1], 1.0)
                 for kind in ("received", "given", "self", "pure_off_self")
                 for part in ("fg", "bg")}
        cells = ", ".join(f"{kind} {part} {v:.3f}"
                          for (kind, part), v in means.items())
        print(f"{name}: {cells}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("attention_mass"))
