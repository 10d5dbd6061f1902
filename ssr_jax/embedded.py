"""The embedded default: SSR end to end on the synthetic world (SPEC §5).

`python -m ssr_jax.main --config configs/synthetic.py --workdir DIR`:

1. generates the world if missing (`data/synthetic/`, VOC layout);
2. pretrains a tiny CLIP and a tiny DINO ViT on it, or reuses the cached
   snapshots (`pretrain/`), loaded through the real checkpoint loaders;
3. trains SSR on the image-level labels (`train.py`, the real pipeline);
4. scores the decoder on the held-out val masks, and the CAM seeds on the
   train split after each Table 3 step and with/without CMPA (Table 4);
5. writes `results.json`, `metrics.jsonl`, PNGs (CAM overlays, pseudo
   labels, predictions, loss curves) and prints a table.

`--config.seeds=0,1,2` runs all of it once per training seed in
`<workdir>/seed<N>/` and writes `sweep.json` (mean ± sd per row, each
ordering's margin judged against its spread: `sweep`).

Every number in results.json is measured in this run; val scores use only
val masks, seed scores the train masks (the paper's CAM-seed protocol);
training sees image-level labels only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from ssr_jax import (
    checkpointing,
    config_check,
    data_sources,
    evaluate,
    logs,
    pretrain,
    ssr,
    train,
    visualize,
    xla_guard,
)

NUM_PICTURES = 6


@contextlib.contextmanager
def _stage(timings: dict[str, float], name: str):
    t0 = time.time()
    print(f"== {name} ...", flush=True)
    yield
    timings[name] = round(time.time() - t0, 1)
    print(f"== {name}: {timings[name]:.1f} s", flush=True)


@contextlib.contextmanager
def _stop_on_signal():
    """After training: SIGTERM / Ctrl-C stop at once (the checkpoint is
    complete; nothing else needs saving) with the preemption exit path,
    instead of spending the grace period on evaluation."""
    def handle(signum, frame):
        del frame
        raise checkpointing.PreemptedError(
            f"stopped by {signal.Signals(signum).name} after training "
            "(the checkpoint is complete). Re-run the same command to "
            "evaluate it. Exit code 75.")

    previous = {sig: signal.signal(sig, handle)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _miou(scores: dict[str, Any]) -> float | None:
    v = scores.get("miou")
    return None if v is None else float(v)


def _per_class(scores: dict[str, Any]) -> dict[str, float | None]:
    return {c["name"]: c["iou"] for c in scores.get("per_class", [])}


# The orderings the paper reports (Tables 3 and 4): name -> (higher, lower),
# each a (section, key) of results.json.
ORDERINGS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "sgc > clip_dino": (("seeds", "sgc"), ("seeds", "clip_dino")),
    "clip_dino > clip_attn": (("seeds", "clip_dino"), ("seeds", "clip_attn")),
    "clip_attn > initial_cam": (("seeds", "clip_attn"),
                                ("seeds", "initial_cam")),
    "initial_cam_with > initial_cam_without":
        (("cmpa", "initial_cam_with"), ("cmpa", "initial_cam_without")),
}

# The rows of the printed table: (label, (section, key) of results.json).
ROWS: tuple[tuple[str, tuple[str, str]], ...] = (
    ("CAM seeds (train): initial CAM, plain CLIP",
     ("cmpa", "initial_cam_without")),
    ("CAM seeds (train): initial CAM, with CMPA", ("cmpa", "initial_cam_with")),
    ("CAM seeds (train): + CLIP attention", ("seeds", "clip_attn")),
    ("CAM seeds (train): + DINO attention", ("seeds", "clip_dino")),
    ("CAM seeds (train): + superpixel mask (SGC)", ("seeds", "sgc")),
    ("pseudo labels (train, + PAR)", ("seeds", "pseudo_labels")),
    ("segmentation (val, decoder, msc+flip)", ("val", "miou")),
)


def _get(results: dict[str, Any], where: tuple[str, str]) -> float:
    section, key = where
    return results[section][key]


def orderings(results: dict[str, Any]) -> dict[str, bool]:
    """The orderings the paper reports (Tables 3 and 4), as measured."""
    return {name: _get(results, hi) > _get(results, lo)
            for name, (hi, lo) in ORDERINGS.items()}


def _table(results: dict[str, Any]) -> str:
    rows = [(name, _get(results, where)) for name, where in ROWS]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  mIoU %", "-" * (width + 9)]
    lines += [f"{name:{width}}  {100 * v:6.1f}" for name, v in rows]
    lines.append("")
    lines += [f"{'holds' if ok else 'FAILS'}: {k}"
              for k, ok in results["orderings"].items()]
    if "diagnostics" in results:
        from ssr_jax import report_format  # noqa: PLC0415

        lines += ["", "diagnostics (plain CLIP, pretrain_report):",
                  report_format.format_seed_diagnostics(
                      results["diagnostics"])]
    times = ", ".join(f"{k} {v:.0f} s" for k, v in results["time_s"].items())
    lines.append(f"wall time: {times}")
    counts = []
    for label, images in (("val", results["val"].get("images")),
                          ("seeds", results["seed_split"].get("images"))):
        if images:
            counts.append(f"{label} {images['scored']} of {images['listed']}")
    if counts:
        lines.append("images scored: " + ", ".join(counts)
                     + "; mIoU over the classes present in the ground truth"
                     " (val over all classes: "
                     + (f"{100 * results['val']['miou_all_classes']:.1f})"
                        if results["val"].get("miou_all_classes") is not None
                        else "—)"))
    return "\n".join(lines)


def _cam_pictures(setup: train.Setup, model, config, workdir: str) -> None:
    """CAM overlays for a few train images: initial CAM, each Table 3 step,
    pseudo labels (PAR) and the ground truth (never used in training)."""
    from ssr_jax import input_pipeline  # noqa: PLC0415

    batch = next(iter(input_pipeline.seed_batches(
        config, config.data.seed_split, NUM_PICTURES,
        config.data.crop_size, max_images=NUM_PICTURES,
        process_index=0, process_count=1)))
    arrays = {k: batch[k] for k in ("image", "valid", "labels",
                                    "superpixels")}

    @jax.jit
    def run(arrays):
        path = ssr.pseudo_label_path(setup.clip, setup.dino, model.heads,
                                     arrays, setup.bank["fg"],
                                     setup.bank["bg"], config,
                                     all_steps=True)
        return path["steps"], path["labels"], path["cls_ids"]

    steps, labels, cls_ids = jax.device_get(run(arrays))
    rows, label_maps = [], []
    for i in range(len(batch["image"])):
        if not batch["example_valid"][i] or cls_ids[i, 0] < 0:
            continue
        img = np.asarray(batch["image"][i])
        row = [img]
        for name in ("initial_cam", "clip_attn", "clip_dino", "sgc"):
            cam = steps[name][i, 0]
            cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
            row.append(visualize.cam_overlay(img, cam))
        row.append(visualize.label_overlay(img, labels[i]))
        row.append(visualize.label_overlay(img, batch["mask"][i]))
        rows.append(row)
        label_maps += [labels[i], batch["mask"][i]]
    if rows:
        headers = ("image", "initial CAM", "+ CLIP attn", "+ DINO attn",
                   "+ superpixels", "pseudo label", "ground truth")
        legend = visualize.class_legend(label_maps,
                                        data_sources.class_names(config))
        visualize.save_png(
            os.path.join(workdir, "cam_overlays.png"),
            visualize.annotate(visualize.grid(rows), headers,
                               rows[0][0].shape[1], legend=legend))


def _prediction_pictures(config, workdir: str, pred_dir: str) -> None:
    """Val images | prediction | ground truth, from the evaluator's PNGs."""
    split = data_sources.load_split(config, config.data.val_split)
    rows, label_maps = [], []
    for i, name in enumerate(split.names):
        pred_path = os.path.join(pred_dir, "predictions", f"{name}.png")
        if not os.path.exists(pred_path):
            continue
        img = split.read_image(i)
        pred = np.asarray(_read_indices(pred_path))
        gt = split.read_mask(i, config.data.num_classes)
        rows.append([img, visualize.label_overlay(img, pred),
                     visualize.label_overlay(img, gt)])
        label_maps += [pred, gt]
        if len(rows) == NUM_PICTURES:
            break
    if rows:
        legend = visualize.class_legend(label_maps,
                                        data_sources.class_names(config))
        visualize.save_png(
            os.path.join(workdir, "predictions.png"),
            visualize.annotate(visualize.grid(rows),
                               ("val image", "prediction", "ground truth"),
                               rows[0][0].shape[1], legend=legend))


def _read_indices(path: str) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as im:
        return np.asarray(im)


def _loss_pictures(workdir: str) -> None:
    series: dict[str, list[tuple[float, float]]] = {}
    for rec in logs.read_metrics(workdir):
        for key in ("loss", "loss_seg", "loss_proto"):
            v = rec.get("scalars", {}).get(key)
            if v is not None:
                series.setdefault(key, []).append((rec["step"], v))
    if series:
        visualize.save_png(os.path.join(workdir, "loss_curves.png"),
                           visualize.curves(series, title="training loss"))


def prepare(config, timings: dict[str, float] | None = None
            ) -> tuple[str, str, str]:
    """The world and the tiny encoders (generated / pretrained, or the
    cached ones), written into `config.data.root` and `config.model.*_path`;
    the config is then validated. Every mode of the synthetic config needs
    this first. Returns (root, clip_path, dino_path)."""
    timings = {} if timings is None else timings
    with _stage(timings, "world"):
        root = pretrain.ensure_world(config)
        config.data.root = root
    with _stage(timings, "pretrain"):
        clip_path, dino_path = pretrain.ensure_encoders(config, root)
        config.model.clip_path, config.model.dino_path = clip_path, dino_path
    errors = config_check.validate(config)
    if errors:
        raise config_check.ConfigError("the embedded config is invalid:\n  - "
                                       + "\n  - ".join(errors))
    return root, clip_path, dino_path


def run(config, workdir: str) -> dict[str, Any]:
    """The whole embedded default; returns (and writes) results.json."""
    timings: dict[str, float] = {}
    t_start = time.time()
    root, clip_path, dino_path = prepare(config, timings)
    config_hash = checkpointing.config_hash(config)
    with _stage(timings, "train"):
        setup = train.train_and_evaluate(
            config, workdir, make_eval_hook=evaluate.make_eval_hook)
    with _stop_on_signal():
        results = _evaluate_all(config, workdir, setup, timings, t_start,
                                root, clip_path, dino_path, config_hash)
    return results


def _evaluate_all(config, workdir, setup, timings, t_start, root,
                  clip_path, dino_path, config_hash) -> dict[str, Any]:
    model = setup.trained_model()
    val_dir = os.path.join(workdir, "eval", config.data.val_split)
    with _stage(timings, "eval"):
        seg = evaluate.evaluate_segmentation(
            config, setup.clip, model, config.data.val_split, val_dir,
            max_images=0, save_predictions=True,
            max_predictions=NUM_PICTURES)
    with _stage(timings, "seeds"):
        seeds = evaluate.score_seeds(config, setup.clip, setup.dino, model,
                                     config.data.seed_split, bank=setup.bank,
                                     max_images=0, progress=True)
    with _stage(timings, "pictures"):
        _cam_pictures(setup, model, config, workdir)
        _prediction_pictures(config, workdir, val_dir)
        _loss_pictures(workdir)
    diag = None
    if config.eval.get("diagnostics", False):
        from ssr_jax import pretrain_report  # noqa: PLC0415

        with _stage(timings, "diagnostics"):
            diag = pretrain_report.seed_report(
                config, clip_path, dino_path, root,
                max_images=config.eval.diagnostics_images,
                logit_scale="model" if not config.cam.logit_scale
                else "config",
                mask_grid=pretrain_report.MASK_GRID
                if config.eval.get("diagnostics_mask_grid", False) else None)
    timings["total"] = round(time.time() - t_start, 1)

    e = seeds["entries"]
    results = {
        "val": {"miou": _miou(seg),
                "miou_all_classes": seg.get("miou_all_classes"),
                "images": seg.get("images"),
                "precision": seg.get("mean_precision"),
                "recall": seg.get("mean_recall"),
                "confusion": seg.get("mean_confusion"),
                "num_images": seg.get("num_images")},
        "seeds": {k: _miou(e[k]) for k in
                  ("initial_cam", "clip_attn", "clip_dino", "sgc",
                   "pseudo_labels")},
        "seeds_precision_recall": {
            k: {"precision": e[k].get("mean_precision"),
                "recall": e[k].get("mean_recall")} for k in e},
        "cmpa": {"initial_cam_without": _miou(e["cam_plain"]),
                 "initial_cam_with": _miou(e["cam_cmpa"])},
        "per_class_iou": _per_class(seg),
        "seed_split": {"name": config.data.seed_split,
                       "num_images": seeds["num_images"],
                       "images": seeds.get("images")},
        "time_s": timings,
        "world": root,
        "encoders": {"clip": clip_path, "dino": dino_path},
        "steps": config.train.num_steps,
        "seed": int(config.seed),
        "config_hash": config_hash,  # of the config after `prepare`
        "xla": xla_guard.report(),
    }
    results["orderings"] = orderings(results)
    if diag is not None:
        results["diagnostics"] = {k: diag[k] for k in (
            "miou", "purity", "initial_cam_errors", "boundary_recall",
            "logit_scale", "num_images", "seconds", "oracle_cmpa")
            if k in diag}
    if jax.process_index() == 0:
        # Written last and atomically: its presence marks a finished run
        # (a seed sweep reuses it).
        tmp = os.path.join(workdir, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, os.path.join(workdir, "results.json"))
        table = _table(results)
        with open(os.path.join(workdir, "results.md"), "w") as f:
            f.write("```\n" + table + "\n```\n")
        print("\n" + table, flush=True)
    logging.info("embedded default done: %s", results["time_s"])
    return results


# --- seed sweep (`--config.seeds=0,1,2`) ---------------------------------
# [choice] An ordering "holds" over a sweep only when its mean margin (mean
# over seeds of row_a - row_b, each seed's two rows from the same run) is
# above SPREAD_K times the sample sd (ddof=1) of those per-seed
# differences; it "fails" below -SPREAD_K sd, else it is "undecided". The
# sd of the paired differences, not of each row, is the spread of the
# margin itself: the two rows of one seed share that seed's training, so
# their noise is correlated (the plain-CLIP row does not move with the
# seed at all) and the rows' own sds would misstate it. It is the sd of
# one seed's margin, not the standard error of the mean: the issue's
# bar ("a margin above 2 sd") asks that one run rarely shows the opposite.
SPREAD_K = 2.0


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample sd (ddof=1) of `values`; sd is None for one value
    (undefined)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_sd needs at least one value")
    sd = float(x.std(ddof=1)) if x.size > 1 else None
    return float(x.mean()), sd


def verdict(margin: float, sd: float | None, k: float = SPREAD_K) -> str:
    """'holds' if margin > k·sd, 'fails' if margin < -k·sd, otherwise (and
    with one seed, sd None) 'undecided'."""
    if sd is None:
        return "undecided"
    if margin > k * sd:
        return "holds"
    if margin < -k * sd:
        return "fails"
    return "undecided"


def summarize(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """sweep.json's numbers from the results.json of each training seed:
    every table row's per-seed values with mean ± sd, and every paper
    ordering's per-seed differences, mean margin, their sd and verdict."""
    seeds = sorted(per_seed)
    rows = {}
    for label, where in ROWS:
        values = [_get(per_seed[s], where) for s in seeds]
        mean, sd = mean_sd(values)
        rows[label] = {"key": ".".join(where), "values": values,
                       "mean": mean, "sd": sd}
    out = {}
    for name, (hi, lo) in ORDERINGS.items():
        diffs = [_get(per_seed[s], hi) - _get(per_seed[s], lo)
                 for s in seeds]
        margin, sd = mean_sd(diffs)
        out[name] = {"differences": diffs, "margin": margin, "sd": sd,
                     "holds_per_seed": [d > 0 for d in diffs],
                     "verdict": verdict(margin, sd)}
    return {"training_seeds": seeds, "rows": rows, "orderings": out,
            "rule": f"holds if margin > {SPREAD_K:g} sd of the per-seed "
                    f"differences (ddof=1), fails if < -{SPREAD_K:g} sd, "
                    "else undecided"}


def _pm(mean: float, sd: float | None) -> str:
    return (f"{100 * mean:5.1f} ± {100 * sd:4.1f}" if sd is not None
            else f"{100 * mean:5.1f} ±  —  ")


def sweep_table(summary: dict[str, Any]) -> str:
    """The printed table of a sweep: per-seed values and mean ± sd per
    row, then each ordering's margin against its spread."""
    seeds = summary["training_seeds"]
    width = max(len(label) for label in summary["rows"])
    col = max(7, *(len(f"seed {s}") + 1 for s in seeds))
    head = "".join(f"{f'seed {s}':>{col}}" for s in seeds)
    lines = [f"{'mIoU %':{width}}{head}     mean ± sd",
             "-" * (width + col * len(seeds) + 17)]
    for label, r in summary["rows"].items():
        vals = "".join(f"{100 * v:{col}.1f}" for v in r["values"])
        lines.append(f"{label:{width}}{vals}   {_pm(r['mean'], r['sd'])}")
    lines.append("")
    for name, o in summary["orderings"].items():
        diffs = " / ".join(f"{100 * d:+.1f}" for d in o["differences"])
        sd = "—" if o["sd"] is None else f"{100 * o['sd']:.1f}"
        lines.append(f"{o['verdict']:9s}: {name}  margin "
                     f"{100 * o['margin']:+.1f} (per seed {diffs}), "
                     f"sd {sd}")
    lines.append(summary["rule"] + ".")
    if summary.get("sweep_encoders"):
        lines.append("Each seed N also pretrained its own encoders "
                     "(pretrain.seed=N): the spread covers the encoders' "
                     "draw and SSR's training.")
    return "\n".join(lines)


def seed_config(config, seed: int):
    """The config of one seed of a sweep: the same as a single run with
    `--config.seed=<seed>` (and no sweep); with `sweep_encoders`, also
    `--config.pretrain.seed=<seed>`."""
    import copy  # noqa: PLC0415

    c = copy.deepcopy(config)
    c.seed = int(seed)
    c.seeds = ()
    if config.get("sweep_encoders", False):
        c.pretrain.seed = int(seed)
        c.sweep_encoders = False
    return c


def seed_workdir(workdir: str, seed: int) -> str:
    return os.path.join(workdir, f"seed{int(seed)}")


def sweep(config, workdir: str) -> dict[str, Any]:
    """`--config.seeds=0,1,2`: the embedded default once per training seed
    in `<workdir>/seed<N>/` (each exactly `run` with `--config.seed=N`;
    world and encoders are shared through their caches; with
    `sweep_encoders` seed N also uses the encoders of `pretrain.seed=N`,
    pretrained on the first use and cached), then
    `<workdir>/sweep.json` / `sweep.md` and the table. A seed whose
    results.json exists (from the same config: `config_hash`) is reused,
    so re-running the command after a preemption (exit 75) resumes the
    interrupted seed from its checkpoint and loses nothing."""
    seeds = [int(s) for s in config.seeds]
    vary = bool(config.get("sweep_encoders", False))
    if not vary:  # paths of the world / encoders, for the config hash
        prepare(config)
    per_seed, reused = {}, []
    for s in seeds:
        cfg, wd = seed_config(config, s), seed_workdir(workdir, s)
        if vary:  # this seed's own encoders (pretrained here if not cached)
            prepare(cfg)
        path = os.path.join(wd, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                res = json.load(f)
            want = checkpointing.config_hash(cfg)
            if res.get("config_hash") != want:
                raise config_check.ConfigError(
                    f"{path} exists from another config (config_hash "
                    f"{res.get('config_hash')}, this sweep's seed {s}: "
                    f"{want}). Use another --workdir, or move {wd} away "
                    "to train that seed again.")
            print(f"== seed {s}: reusing {path}", flush=True)
            reused.append(s)
        else:
            print(f"== seed {s}: training in {wd}", flush=True)
            os.makedirs(wd, exist_ok=True)
            res = run(cfg, wd)
        per_seed[s] = res
    summary = summarize(per_seed)
    summary["sweep_encoders"] = vary
    summary["encoders"] = {str(s): per_seed[s].get("encoders")
                           for s in seeds}
    summary["workdirs"] = {str(s): seed_workdir(workdir, s) for s in seeds}
    summary["reused"] = reused
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "sweep.json"), "w") as f:
            json.dump(summary, f, indent=2)
        table = sweep_table(summary)
        with open(os.path.join(workdir, "sweep.md"), "w") as f:
            f.write("```\n" + table + "\n```\n")
        print("\n" + table, flush=True)
    return summary
