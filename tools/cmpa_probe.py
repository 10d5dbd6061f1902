"""CMPA readings on the constructed feature-space problem (issue 10).

Prints the projected-GradCAM mIoU (background + classes, `par.cams_to_labels`
seeds on the token grid) of ssr_jax's CMPA heads trained by ssr_jax's own
pooling / bank / K-means / InfoNCE code under each reading, per confound,
mean ± sd over seeds, and the largest first-step CMPA loss over the runs
of each reading (last column). See docs/diagnostics.md.

    python tools/cmpa_probe.py --seeds 0 1 2 --confounds 0 0.5 1 --steps 80
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ssr_jax import diagnostics_cmpa as d

READINGS = {
    # name: (pool, train_cmpa_heads kwargs); None = no training
    "plain CLIP (no heads)": None,
    "heads at step 0 (tied init)": ("gt", {"steps": 0}),
    "BN statistics only (GT pools, lr 0)": ("gt", {"lr": 0.0}),
    "GT pools (oracle)": ("gt", {}),
    "plain-CAM pools (fixed)": ("plain_cam", {}),
    "plain-seed pools (binary, pseudo-label stand-in)": ("plain_label", {}),
    "self CAM pools (as ssr_jax runs)": ("self_cam", {}),
    "EMA-heads CAM pools (0.99)": ("ema_cam", {}),
    "self CAM + background negatives": ("self_cam", {"bg_negatives": True}),
    "GT pools + background negatives": ("gt", {"bg_negatives": True}),
    "identity start, self CAM pools": ("self_cam", {"identity_init": True}),
    "identity start, GT pools": ("gt", {"identity_init": True}),
    "GT pools, tau 0.5": ("gt", {"tau_init": 0.5}),
    "plain-CAM pools, tau 0.5": ("plain_cam", {"tau_init": 0.5}),
    "self CAM pools, tau 0.5": ("self_cam", {"tau_init": 0.5}),
    "BN statistics only, tau 0.5 (lr 0)": ("gt", {"tau_init": 0.5,
                                                   "lr": 0.0}),
}


def _sd(v):
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--confounds", type=float, nargs="+",
                    default=[0.0, 0.5, 1.0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--text_overlap", type=float, default=0.7)
    ap.add_argument("--out", default="")
    ap.add_argument("--only", default="",
                    help="run only the readings whose name contains this")
    args = ap.parse_args()
    t0 = time.time()
    res: dict[str, dict[str, list[float]]] = {}
    first: dict[str, list[float]] = {}
    for name, spec in READINGS.items():
        if args.only and args.only not in name:
            continue
        res[name] = {}
        for conf in args.confounds:
            vals = []
            for seed in args.seeds:
                p = d.cmpa_problem(num_images=args.images, confound=conf,
                                   text_overlap=args.text_overlap, seed=seed)
                if spec is None:
                    vals.append(d.projected_cam_miou(p, None))
                    continue
                pool, kw = spec
                kw = {"steps": args.steps, "seed": seed, **kw}
                heads, info = d.train_cmpa_heads(p, pool, **kw)
                vals.append(d.projected_cam_miou(p, heads))
                if info["loss"]:
                    first.setdefault(name, []).append(info["loss"][0])
            res[name][str(conf)] = vals
        cells = [f"{np.mean(v):.3f} ± {_sd(v):.3f}"
                 for v in res[name].values()]
        loss0 = (f"{max(first[name]):.3f}" if name in first else "-")
        print(f"| {name} | " + " | ".join(cells) + f" | {loss0} |",
              flush=True)
    print(f"({time.time() - t0:.0f} s; confounds {args.confounds}, seeds "
          f"{args.seeds}, {args.steps} steps, {args.images} images)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "miou": res,
                       "first_step_loss": first}, f, indent=1)


if __name__ == "__main__":
    main()
