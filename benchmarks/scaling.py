"""Scaling study: ssr_jax vs the PyTorch reference as the work grows.

    python benchmarks/scaling.py            # a few minutes on 2 CPU cores

Three sweeps on the `--quick` shapes of benchmarks/run.py (CLIP width 256,
6 blocks; DINO width 192, 6 blocks; 160x160 crops), each side in its own
subprocess with one thread (`--threads`, as in benchmarks/run.py), both
pinned to the same CPUs (the last `--threads` usable cores):

- classes per image, 1 to 6 (batch 2, every image with that many classes):
  the pseudo-label path. ssr_jax pads to 6 class slots and runs one
  vmapped GradCAM backward, so its time is flat; the reference runs block 12
  forward and backward once per class, so its time grows linearly;
- batch size 1, 2, 4, 8 (1-3 classes per image): the pseudo-label path;
- superpixels per image (SLIC n_segments 25 to 400, ids padded to twice
  that): SGC alone (colour K-means, r_k masks, propagation), batch 2.

Writes benchmarks/plots/scaling_{classes,batch,superpixels}.png (drawn with
PIL; matplotlib is not needed) and benchmarks/plots/scaling.md (the table),
and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import run  # noqa: E402 - after the path fix above

SWEEPS = {"classes": (1, 2, 3, 4, 5, 6), "batches": (1, 2, 4, 8),
          "segments": (25, 50, 100, 200, 400)}
# --smoke: tiny encoders, two points per sweep; checks the script runs.
SMOKE_SWEEPS = {"classes": (1, 2), "batches": (1, 2), "segments": (25,)}
TAG = "@@SCALING@@ "


def _labels(batch: int, classes: int, num_fg: int):
    import numpy as np

    labels = np.zeros((batch, num_fg), np.float32)
    for i in range(batch):
        labels[i, [(i * 7 + j * 3) % num_fg for j in range(classes)]] = 1.0
    return labels


def _path_sweeps(spec, s, time_path) -> dict[str, Any]:
    """`time_path(batch)` against classes per image and batch size (the
    same batches for both sides); "superpixels" is filled by the caller."""
    out: dict[str, Any] = {"classes": {}, "batch": {}, "superpixels": {}}
    base = run.shapes_batch(s)
    for k in spec["sweeps"]["classes"]:
        out["classes"][k] = time_path(
            dict(base, labels=_labels(s.batch, k, s.num_fg)))
    for b in spec["sweeps"]["batches"]:
        out["batch"][b] = time_path(run.shapes_batch(s, b))
    return out


def _random_attn(rng, patches: int, lead):
    """Peaked random attention rows over 1 + `patches` tokens, float32."""
    t = 1 + patches
    a = rng.uniform(0, 1, (*lead, t, t)) ** 8
    return (a / a.sum(-1, keepdims=True)).astype("float32")


# --- ssr_jax ------------------------------------------------------------------


def jax_sweeps(spec: dict) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ssr_jax import sgc, ssr
    from ssr_jax.models import encoders

    s = run.Shapes(**spec["shapes"])
    config = run._jax_config(spec, s.batch)
    clip, dino, model = run._jax_models(spec, "float32", config)
    fg, bg = (jnp.asarray(x) for x in run._random_bank(
        spec, clip.config.projection_dim))
    graphs, states = zip(*(nnx.split(m) for m in (clip, dino, model.heads)),
                         strict=True)

    def path(states, batch):
        c, d, h = (nnx.merge(g, st) for g, st in zip(graphs, states,
                                                      strict=True))
        out = ssr.pseudo_label_path(c, d, h, batch, fg, bg, config)
        return out["labels"], out["refined"]

    jitted = jax.jit(path)

    def time_path(batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        return run._timed(lambda: jax.block_until_ready(
            jitted(states, batch)), spec["repeats"])["median_s"]

    out = _path_sweeps(spec, s, time_path)
    h = w = s.crop // 16
    rng = np.random.default_rng(0)

    def attn(*lead):
        return jnp.asarray(_random_attn(rng, h * w, lead))

    cams = jnp.asarray(rng.uniform(0, 1, (s.batch, s.kmax, h, w)),
                       jnp.float32)
    slot = jnp.asarray(np.arange(s.kmax)[None] < 2)
    slot = jnp.broadcast_to(slot, (s.batch, s.kmax))
    clip_attn, dino_attn = attn(s.clip_layers_attn, s.batch), attn(s.batch)
    dino_aff = encoders.patch_affinity(dino_attn, dino.layout, (h, w),
                                       (h, w), target_patch=16)
    for n in spec["sweeps"]["segments"]:
        m = 2 * n
        batch = {k: jnp.asarray(v) for k, v in run.make_batch(
            s.batch, s.crop, s.num_fg, n, m).items()}
        fn = jax.jit(lambda cams, batch, m=m: sgc.refine_cams(
            cams, slot, clip_attn=clip_attn, dino_aff=dino_aff,
            image=batch["image"], superpixels=batch["superpixels"],
            valid=batch["valid"], clip_layers=s.clip_layers_attn,
            num_segments=m))
        out["superpixels"][n] = run._timed(
            lambda fn=fn, batch=batch: jax.block_until_ready(
                fn(cams, batch)), spec["repeats"])["median_s"]
    return out


# --- the PyTorch reference ---------------------------------------------------


def torch_sweeps(spec: dict) -> dict[str, Any]:
    import numpy as np
    import torch

    from benchmarks import reference_torch as rt

    s = run.Shapes(**spec["shapes"])
    device = run._torch_setup(spec)
    models = run._torch_models(spec, device)
    cfg = run._torch_cfg(spec)
    par = rt.PAR.from_config(cfg)

    def time_path(batch):
        return run._timed(lambda: rt.pseudo_labels(
            models, batch, cfg, seeds=False, par=par),
            spec["repeats"])["median_s"]

    out = _path_sweeps(spec, s, time_path)
    h = w = s.crop // 16
    rng = np.random.default_rng(0)

    def attn(*lead):
        return torch.from_numpy(_random_attn(rng, h * w, lead))

    cams = torch.from_numpy(rng.uniform(0, 1, (s.batch, 2, h, w))).float()
    clip_attn, dino_attn = attn(s.clip_layers_attn, s.batch), attn(s.batch)
    dino_attn = dino_attn[:, 1:, 1:]
    for n in spec["sweeps"]["segments"]:
        batch = run.make_batch(s.batch, s.crop, s.num_fg, n, 2 * n)
        valid = torch.as_tensor(batch["valid"])

        def sgc(batch=batch, valid=valid):
            for i in range(s.batch):
                clusters = torch.from_numpy(rt.colour_clusters(
                    batch["image"][i], batch["superpixels"][i],
                    batch["valid"][i], cfg))
                trans = rt.compute_trans_mat(rt.fuse_affinity(
                    list(clip_attn[:, i]), dino_attn[i], True, True, cfg),
                    cfg.sinkhorn_iters)
                for c in cams[i]:
                    rt.refine_cam(trans, c, rt.superpixel_mask(
                        c, clusters, valid[i], cfg))

        out["superpixels"][n] = run._timed(sgc, spec["repeats"])["median_s"]
    return out


# --- plots (PIL) --------------------------------------------------------------


def line_plot(path: str, title: str, xlabel: str, xs: Sequence[float],
              series: dict[str, Sequence[float]], log_y: bool = False,
              ) -> None:
    """A small line plot with PIL: axes, ticks, one line per series."""
    import math

    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 640, 400, 70, 20, 40, 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    ys = [v for vals in series.values() for v in vals if v]
    lo, hi = min(ys), max(ys)
    if log_y:
        lo, hi = math.log10(lo) - 0.1, math.log10(hi) + 0.1
    else:
        lo, hi = 0.0, hi * 1.1

    def px(i, v):
        x = left + (width - left - right) * i / max(len(xs) - 1, 1)
        v = math.log10(v) if log_y else v
        y = top + (height - top - bottom) * (1 - (v - lo) / (hi - lo))
        return x, y

    d.line([(left, top), (left, height - bottom),
            (width - right, height - bottom)], fill="black")
    for i, x in enumerate(xs):
        gx, _ = px(i, ys[0])
        d.line([(gx, height - bottom), (gx, height - bottom + 4)],
               fill="black")
        d.text((gx - 8, height - bottom + 8), str(x), fill="black")
    for j in range(5):
        v = lo + (hi - lo) * j / 4
        y = top + (height - top - bottom) * (1 - j / 4)
        label = 10 ** v if log_y else v
        d.line([(left - 4, y), (left, y)], fill="black")
        d.text((4, y - 6), f"{label * 1e3:.0f} ms" if label < 1
               else f"{label:.2f} s", fill="black")
    d.text((left, 10), title, fill="black")
    d.text((width // 2 - 40, height - 22), xlabel, fill="black")
    colours = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")
    for (name, vals), colour in zip(series.items(), colours, strict=False):
        pts = [px(i, v) for i, v in enumerate(vals) if v]
        d.line(pts, fill=colour, width=3)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 16 * list(series).index(name)
        d.line([(width - 200, ly + 6), (width - 180, ly + 6)], fill=colour,
               width=3)
        d.text((width - 175, ly), name, fill="black")
    img.save(path)


# --- the parent ---------------------------------------------------------------


def _worker(kind: str, spec: dict) -> None:
    run._pin(spec.get("cpus"))  # before jax/torch load: same cores both
    fn = jax_sweeps if kind == "jax" else torch_sweeps
    print(TAG + json.dumps(fn(spec)), flush=True)


def _spawn(runner: run.Runner, kind: str, spec: dict) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind,
           json.dumps(spec)]
    proc = subprocess.run(cmd, env=runner.env(kind), capture_output=True,
                          text=True, cwd=ROOT)
    runner._log("scaling", kind, proc.stdout, proc.stderr)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(TAG)]
    if not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{kind} sweeps failed: {tail}")
    return json.loads(lines[-1][len(TAG):])


def markdown(res: dict[str, dict], meta: dict) -> str:
    lines = [f"Scaling study ({meta['date']}, {meta['cpu']}, "
             f"{meta['cores']} cores, {meta['threads']} thread(s) per side; "
             f"`{meta['command']}`). Shapes: {meta['shapes']}. Median of "
             f"{meta['repeats']} calls after a warm-up.", ""]
    titles = {"classes": ("classes per image (batch 2)",
                          "pseudo-label path"),
              "batch": ("batch size (1-3 classes per image)",
                        "pseudo-label path"),
              "superpixels": ("SLIC n_segments (batch 2)", "SGC only")}
    for key, (what, stage) in titles.items():
        lines += [f"| {what} | ssr_jax ({stage}) | reference | ratio |",
                  "|---|---|---|---|"]
        for x, jt in res["jax"][key].items():
            tt = res["torch"][key][x]
            lines.append(f"| {x} | {jt * 1e3:.1f} ms | {tt * 1e3:.1f} ms | "
                         f"{tt / jt:.1f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks",
                                                 "plots"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="threads per side, as benchmarks/run.py --threads")
    p.add_argument("--workdir", default="")
    p.add_argument("--from-json", default="",
                   help="redraw the plots and table of a scaling.json")
    p.add_argument("--smoke", action="store_true",
                   help="tiny encoders, two points per sweep, one timed "
                        "call: checks that the script runs (seconds)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], json.loads(args.worker[1]))
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        meta = saved.pop("meta")
        for side in saved.values():
            for key in side:
                side[key] = {int(k): v for k, v in side[key].items()}
        write_outputs(args.out, saved, meta)
        return 0
    started = time.perf_counter()
    threads = args.threads
    workdir = args.workdir or tempfile.mkdtemp(prefix="ssr_scaling_")
    os.makedirs(workdir, exist_ok=True)
    usable = sorted(os.sched_getaffinity(0))
    if threads > len(usable):
        p.error(f"--threads {threads}: only {len(usable)} usable cores")
    ns = argparse.Namespace(device="cpu", repeats=args.repeats,
                            threads=threads, budget_s=0,
                            cell_timeout_s=3600, dtypes=["float32"],
                            cpus=usable[-threads:])
    if args.smoke:
        ns.repeats = 1
    runner = run.Runner(ns, run.SMOKE if args.smoke else run.QUICK,
                        workdir)
    prep = runner.prepare()
    if "error" in prep:
        print(f"preparing the random weights failed: {prep['error']}")
        return 1
    spec = dict(runner.base, row="scaling",
                sweeps=SMOKE_SWEEPS if args.smoke else SWEEPS)
    res = {kind: _spawn(runner, kind, spec) for kind in ("jax", "torch")}
    for side in res.values():  # JSON turned the int keys into strings
        for key in side:
            side[key] = {int(k): v for k, v in side[key].items()}
    meta = {"date": datetime.date.today().isoformat(),
            "cpu": run._cpu_name(), "cores": len(os.sched_getaffinity(0)),
            "threads": threads, "repeats": args.repeats,
            "cpus": ns.cpus,
            "command": "python benchmarks/scaling.py",
            "shapes": ("smoke (tiny encoders)" if args.smoke else
                       "CLIP width 256 x 6 blocks, DINO 192 x 6, crop 160, "
                       "PAR 20 iterations"),
            "total_s": round(time.perf_counter() - started)}
    write_outputs(args.out, res, meta)
    return 0


def write_outputs(out: str, res: dict[str, dict], meta: dict) -> None:
    """The three PNG plots, scaling.md and scaling.json under `out`."""
    os.makedirs(out, exist_ok=True)
    labels = {"classes": "classes per image", "batch": "batch size",
              "superpixels": "SLIC n_segments"}
    for key, xlabel in labels.items():
        xs = list(res["jax"][key])
        line_plot(os.path.join(out, f"scaling_{key}.png"),
                  f"time vs {xlabel} (CPU, {meta['threads']} thread per "
                  "side)", xlabel,
                  xs, {"ssr_jax": [res["jax"][key][x] for x in xs],
                       "PyTorch reference": [res["torch"][key][x]
                                             for x in xs]},
                  log_y=key != "classes")
    text = markdown(res, meta)
    with open(os.path.join(out, "scaling.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "scaling.json"), "w") as f:
        json.dump({"meta": meta, **res}, f, indent=1)
    print(text)
    print(f"wrote {out}/scaling_*.png, scaling.md, scaling.json "
          f"({meta['total_s']} s)")


if __name__ == "__main__":
    sys.exit(main())
