"""Evaluation: segmentation (val), CAM seeds and pseudo labels (SPEC §2).

Entry points:

- `evaluate(config, workdir)` (`--config.mode=eval`): restores only the
  trained parameters and BatchNorm statistics (`eval.checkpoint`), runs the
  multi-scale + flip protocol on `eval.split`, writes
  `<workdir>/eval/<split>[_crf]/metrics.json`, `metrics.md` and prediction
  PNGs (VOC palette) under `predictions/`, prints the Markdown table.
- `export_pseudo_labels(config, workdir)` (`--config.mode=pseudo_labels`):
  the online pseudo labels of `data.seed_split` as PNGs at each image's
  original size (for multi-stage users), and the CAM-seed scores of the
  paper's Tables 3 and 4 against the masks.
- `evaluate_segmentation`, `score_seeds` (from `ssr_jax.evaluators`):
  the reusable pieces.
- `make_eval_hook`: what the trainer calls every `train.eval_every` steps.

The evaluators themselves are `ssr_jax/evaluators/` (segmentation: the
protocol and its batching; seeds: Tables 3-4).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from etils import epath
from flax import nnx

from ssr_jax import (
    build,
    checkpointing,
    config_check,
    crf,
    data_sources,
    logs,
    metrics,
    ssr,
    xla_guard,
)
from ssr_jax.data.transforms import long_side_hw, resize_nearest
from ssr_jax.evaluators import common
from ssr_jax.evaluators.seeds import (
    SEED_DESCRIPTIONS,
    SEED_ENTRIES,
    score_seeds,
    seed_table,
)
from ssr_jax.evaluators.segmentation import (
    evaluate_segmentation,
    save_label_png,
)

PyTree = Any
__all__ = ["SEED_DESCRIPTIONS", "SEED_ENTRIES", "checkpoint_location",
           "evaluate", "evaluate_segmentation", "export_pseudo_labels",
           "make_eval_hook", "refuse_overwrite", "restore_model",
           "score_seeds", "seed_table"]


# --- checkpoints --------------------------------------------------------------
def checkpoint_location(config, workdir: str) -> tuple[str, int | None]:
    """(checkpoint directory, step or None = latest) from `eval.checkpoint`.

    "" → the latest step of `train.checkpoint_dir` (default
    `<workdir>/checkpoints`); "2000" → that step there; a path → a step
    directory (`.../checkpoints/2000`) or a directory of steps (latest).
    """
    default = config.train.checkpoint_dir or os.path.join(workdir,
                                                          "checkpoints")
    spec = str(config.eval.checkpoint).strip()
    if not spec:
        return default, None
    if spec.isdigit():
        return default, int(spec)
    path = epath.Path(spec)
    if path.name.isdigit() and (path / "state").exists():
        return str(path.parent), int(path.name)
    return spec, None


def restore_model(config, workdir: str, model: ssr.SSRModel
                  ) -> tuple[ssr.SSRModel, int, str]:
    """Restores the trained parameters and BatchNorm statistics only.

    The optimiser, feature bank and prototypes stay on disk
    (`Checkpointer.restore_subset`). Problems (no checkpoint, another
    model shape, e.g. another `data.num_classes`) raise
    `config_check.ConfigError` with the checkpoint's own explanation.

    Returns:
      (model with the restored state, step, checkpoint directory).
    """
    directory, step = checkpoint_location(config, workdir)
    # The saved "rest" also holds the dropout RNG state, which eval does
    # not need: restore only its BatchNorm statistics.
    graphdef, params, stats, other = nnx.split(model, nnx.Param,
                                               nnx.BatchStat, ...)
    target = common.replicated({"params": params, "rest": stats},
                               build.make_mesh())
    try:
        ckpt = checkpointing.Checkpointer(directory, save_every=0,
                                          read_only=True)
        step, sub = ckpt.restore_subset(target, step=step, required=True)
    except checkpointing.CheckpointError as e:
        raise config_check.ConfigError(
            f"cannot restore the model for {config.mode}: {e}") from None
    logging.info("restored params of step %d from %s", step, directory)
    model = nnx.merge(graphdef, sub["params"], sub["rest"], other)
    return model, step, directory


def _check_crf(config) -> None:
    if config.eval.crf:
        try:
            crf.require_densecrf()
        except crf.CRFUnavailableError as e:
            raise config_check.ConfigError(str(e)) from None


def refuse_overwrite(config, out_dir: str, report: str) -> None:
    """ConfigError (before any model loads) when `out_dir/report` is left
    from an earlier run and `eval.overwrite` is off."""
    path = os.path.join(out_dir, report)
    if os.path.exists(path) and not config.eval.overwrite:
        raise config_check.ConfigError(
            f"{path} exists from an earlier run. Pass "
            "--config.eval.overwrite=True to replace it (and its PNGs), or "
            "move it away first.")


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# --- modes --------------------------------------------------------------------
def evaluate(config, workdir: str) -> dict[str, Any]:
    """`--config.mode=eval`: restore, evaluate `eval.split`, write reports.

    Writes `<workdir>/eval/<split>[_crf]/metrics.json` (the report
    returned here), `metrics.md` and `predictions/<id>.png` (VOC palette,
    `eval.save_predictions`); prints the Markdown table.
    """
    logs.setup_logging(workdir)
    _check_crf(config)
    out_dir = os.path.join(workdir, "eval", config.eval.split
                           + ("_crf" if config.eval.crf else ""))
    refuse_overwrite(config, out_dir, "metrics.json")
    # The decoder reads CLIP only: DINO is not loaded for eval.
    clip, dino, model = build.build_models(config, with_dino=False)
    build.check_models(config, clip, dino, pseudo_labels=False)
    model, step, directory = restore_model(config, workdir, model)
    ev = config.eval
    split = ev.split
    out_dir = os.path.join(workdir, "eval", split + ("_crf" if ev.crf
                                                      else ""))
    scores = evaluate_segmentation(config, clip, model, split, out_dir)
    report = {
        "split": split, "checkpoint": {"directory": directory,
                                       "step": step},
        "protocol": {"long_side": int(ev.long_side),
                     "scales": [float(s) for s in ev.scales],
                     "flip": bool(ev.flip), "crf": bool(ev.crf)},
        "scores": scores,
        "xla": xla_guard.report(),
    }
    if jax.process_index() == 0:
        _write_json(os.path.join(out_dir, "metrics.json"), report)
        if scores.get("per_class"):
            table = metrics.markdown_table(scores)
        else:
            table = (f"{scores['num_images']} images of {split!r} have no "
                     "masks: predictions only.\n")
        images = scores.get("images", {})
        header = (f"# {split}, step {step}{' + CRF' if ev.crf else ''}\n\n"
                  f"Scales {list(ev.scales)}, flip {bool(ev.flip)}, long "
                  f"side {ev.long_side}. Images scored: "
                  f"{images.get('scored')} of {images.get('listed')} "
                  "listed (not scored: see metrics.json \"images\").\n\n")
        _write_text(os.path.join(out_dir, "metrics.md"), header + table)
        print(header + table, flush=True)
    return report


def export_pseudo_labels(config, workdir: str) -> dict[str, Any]:
    """`--config.mode=pseudo_labels`: pseudo-label PNGs + seed scores.

    Split: `data.seed_split` (set it to e.g. train_aug for a multi-stage
    run). The online pseudo labels (CAM → SGC → PAR, as in training) are
    computed at long side `eval.seed_size`, cropped to the image and
    resized back to its original size (nearest), and written as VOC-palette
    PNGs to `<workdir>/pseudo_labels/<split>/labels/<id>.png`. The seed
    scores of every `SEED_ENTRIES` row go to `seeds.json` / `seeds.md`
    there. Every image of the split is labelled; the scores are over the
    images that have a mask (`num_masked` of `num_images`; none: no
    scores).
    """
    logs.setup_logging(workdir)
    refuse_overwrite(config, os.path.join(workdir, "pseudo_labels",
                                          config.data.seed_split),
                     "seeds.json")
    clip, dino, model = build.build_models(config)
    if dino is None and config.model.dino_path:
        dino = build.load_affinity_encoder(
            config, dtype=clip.vision.class_embedding.dtype)
    build.check_models(config, clip, dino)
    model, step, directory = restore_model(config, workdir, model)
    bank = build.build_text_bank(config, clip, workdir)
    split = config.data.seed_split
    out_dir = os.path.join(workdir, "pseudo_labels", split)
    data = data_sources.load_split(config, split)
    palette = data_sources.spec(config).palette
    size = int(config.eval.seed_size)

    def write(local, kept):
        for j, idx in enumerate(local["index"]):
            if not local["example_valid"][j]:
                continue
            h0, w0 = (int(v) for v in data.sizes[idx])
            h, w = long_side_hw((h0, w0), size)
            labels = resize_nearest(kept["pseudo_labels"][j, :h, :w],
                                    (h0, w0))
            save_label_png(os.path.join(out_dir, "labels",
                                        data.names[idx] + ".png"), labels,
                           palette)

    result = score_seeds(config, clip, dino, model, split, bank=bank,
                         label_entries=("pseudo_labels",), on_batch=write,
                         require_masks=False, progress=True)
    done = data.usable[:config.eval.max_images or None]
    result["num_masked"] = sum(data.mask_paths[i] is not None for i in done)
    result["checkpoint"] = {"directory": directory, "step": step}
    result["xla"] = xla_guard.report()
    if jax.process_index() == 0:
        _write_json(os.path.join(out_dir, "seeds.json"), result)
        table = seed_table(result)
        _write_text(os.path.join(out_dir, "seeds.md"), table)
        print(table, flush=True)
    return result


# --- in-training hook ---------------------------------------------------------
def make_eval_hook(config, workdir: str, *, clip, dino, model_graphdef,
                   bank: dict[str, Any],
                   writer: logs.MetricWriter | None = None
                   ) -> Callable[[int, PyTree], dict[str, float | None]]:
    """What the trainer calls every `train.eval_every` steps.

    hook(step, state) merges `state["params"]`/`state["rest"]` into the
    model, scores the decoder on `data.val_split` and (with
    `eval.hook_seeds`) the seeds on `data.seed_split`, both on the first
    `eval.max_images` images, single process-collective pass each; no CRF
    and no files. Results are logged with `writer` under "eval/..." and
    returned. Pass `clip`/`dino` built on the replicated frozen states
    (`nnx.merge(clip_graphdef, frozen["clip"])`) so nothing is copied;
    compiled functions are cached across calls.
    """
    del workdir  # the writer owns the output location

    def hook(step: int, state: PyTree) -> dict[str, float | None]:
        model = nnx.merge(model_graphdef, state["params"], state["rest"])
        split = config.data.val_split
        seg = evaluate_segmentation(config, clip, model, split, None,
                                    save_predictions=False, use_crf=False)
        out = {f"eval/{split}_miou": seg.get("miou"),
               f"eval/{split}_precision": seg.get("mean_precision"),
               f"eval/{split}_recall": seg.get("mean_recall")}
        if config.eval.hook_seeds:
            seeds = score_seeds(config, clip, dino, model,
                                config.data.seed_split, bank=bank)
            out.update({f"eval/seeds_{k}_miou": s["miou"]
                        for k, s in seeds["entries"].items()})
        if writer is not None:
            writer.write_scalars(step, {k: v for k, v in out.items()
                                        if v is not None})
        return out

    return hook
