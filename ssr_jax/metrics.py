"""Segmentation metrics from a confusion matrix (scenic / WeCLIP style).

The confusion matrix `conf[g, p]` counts pixels of ground-truth class `g`
predicted as class `p` (rows = ground truth, columns = prediction, as WeCLIP
`utils/evaluate.py`). A pixel is counted only when its ground truth is in
`[0, num_classes)`; ground truth `ignore_index` (255) and predictions equal to
`ignore_index` (an "uncertain" pseudo label, as WeCLIP `pseudo_scores`) are
dropped. Other out-of-range values are a bug upstream: the NumPy version
raises, the jittable version (which cannot raise) drops them.

API:
  confusion_matrix(pred, gt, num_classes, ignore_index=255) -> int64 [C, C]
      NumPy, on host (`np.bincount`).
  confusion_matrix_jnp(pred, gt, num_classes, ignore_index=255) -> int32 [C, C]
      Jittable; over a sharded global batch XLA sums across devices. int32
      holds one batch (< 2**31 pixels); accumulate batches on host in int64
      (`ConfusionAccumulator.add_counts`), never on device.
  ConfusionAccumulator(num_classes, ignore_index=255)
      .add(pred, gt)        process-local label maps (numpy / addressable jax)
      .add_counts(counts, already_global=False)   a [C, C] count matrix
      .result() -> int64 [C, C]   collective when process_count() > 1: every
                                  process must call it; local parts are summed
                                  over processes, global parts are not.
      .reset()
  scores(conf, class_names=None) -> dict   (layout below)
  markdown_table(scores, class_names=None) -> str

`scores` layout (fractions in [0, 1]; `None` where undefined, so the dict is
strict JSON):
  {"miou", "miou_all_classes", "pixel_accuracy", "mean_precision",
   "mean_recall", "mean_confusion": float | None,
   "num_classes": int, "num_pixels": int, "classes_in_gt": int,
   "per_class": [{"id", "name", "iou", "precision", "recall", "confusion",
                  "tp", "gt_pixels", "pred_pixels"}, ...]}   # one per class

Per class c, with TP = conf[c, c], GT = row sum, PRED = column sum:
  iou = TP / (GT + PRED - TP), precision = TP / PRED, recall = TP / GT,
  confusion = FP / TP = (PRED - TP) / TP (SPEC §2; the paper's Table 5 does
  not define its "confusion ratio": [choice] SeCo/ReCAM-style FP/TP per
  class, see reference/ssr_paper.md §9.15). Each is undefined (None) when its
  denominator is 0.
Means are taken over the classes present in the ground truth (GT > 0) and
skip undefined entries (NaN-mean), exactly as WeCLIP's `mean_iu =
nanmean(iu[valid])` with `valid = hist.sum(axis=1) > 0`: a class predicted
but absent from the ground truth does not lower the mIoU. `mean_recall` is
WeCLIP's `mAcc`. A GT class with TP = 0 has precision and confusion undefined
and is skipped in those two means (its IoU 0 still counts in the mIoU).
`miou_all_classes` divides by all C classes instead (a class absent from the
ground truth counts 0): the "21-class mIoU" papers report on full VOC val,
where every class is present and the two agree; on a subset of images they
differ, and both are reported, labelled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Any  # numpy array or jax.Array


def _check_labels(x: np.ndarray, name: str, num_classes: int,
                  ignore_index: int) -> None:
    bad = (x != ignore_index) & ((x < 0) | (x >= num_classes))
    if bad.any():
        values = np.unique(x[bad])[:8].tolist()
        raise ValueError(
            f"{name} has values {values} outside [0, {num_classes}) that are "
            f"not the ignore index {ignore_index}; check num_classes and the "
            "label encoding (VOC masks are palette PNGs: read them with PIL "
            "without converting to RGB)."
        )


def confusion_matrix(pred: ArrayLike, gt: ArrayLike, num_classes: int,
                     ignore_index: int = 255) -> np.ndarray:
    """Host confusion matrix of one batch.

    Args:
      pred: integer predictions, any shape, e.g. `[B, H, W]`.
      gt: integer ground truth, same shape as `pred`.
      num_classes: C, including background.
      ignore_index: label dropped in `gt` and in `pred`.

    Returns:
      int64 `[C, C]`, rows = ground truth, columns = prediction.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(
            f"pred shape {pred.shape} != gt shape {gt.shape}; resize the "
            "prediction to the label size before scoring"
        )
    pred = pred.astype(np.int64).ravel()
    gt = gt.astype(np.int64).ravel()
    _check_labels(gt, "gt", num_classes, ignore_index)
    _check_labels(pred, "pred", num_classes, ignore_index)
    keep = (gt != ignore_index) & (pred != ignore_index)
    counts = np.bincount(gt[keep] * num_classes + pred[keep],
                         minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def confusion_matrix_jnp(pred: jax.Array, gt: jax.Array, num_classes: int,
                         ignore_index: int = 255) -> jax.Array:
    """Jittable confusion matrix of one batch (`num_classes` static).

    Args:
      pred: integer predictions, any shape, e.g. `[B, H, W]`.
      gt: integer ground truth, same shape.
      num_classes: C.
      ignore_index: label dropped in `gt` and in `pred`.

    Returns:
      int32 `[C, C]`. Pixels with a label outside `[0, C)` are dropped.
    """
    pred = pred.astype(jnp.int32).ravel()
    gt = gt.astype(jnp.int32).ravel()
    keep = ((gt >= 0) & (gt < num_classes) & (pred >= 0)
            & (pred < num_classes) & (gt != ignore_index)
            & (pred != ignore_index))
    n = num_classes * num_classes
    # Dropped pixels go to an extra bin that is sliced off: static shapes.
    idx = jnp.where(keep, gt * num_classes + pred, n)
    counts = jnp.bincount(idx, length=n + 1)[:n]
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def _to_host(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        raise ValueError(
            f"{name} is a global array spread over several processes; pass "
            "this process's part (numpy) to add(), or compute "
            "confusion_matrix_jnp on device and pass its replicated result "
            "to add_counts(..., already_global=True)"
        )
    return np.asarray(x)


class ConfusionAccumulator:
    """Sums confusion matrices over batches, devices and processes.

    Counts are kept on host in int64. Two buffers: the process-local part
    (what this process saw; summed over processes in `result`) and the global
    part (matrices computed over the global batch, identical on every
    process; not summed again).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        shape = (self.num_classes, self.num_classes)
        self._local = np.zeros(shape, np.int64)
        self._global = np.zeros(shape, np.int64)

    def add(self, pred: ArrayLike, gt: ArrayLike) -> None:
        """Adds process-local label maps (any equal shapes)."""
        self._local += confusion_matrix(
            _to_host(pred, "pred"), _to_host(gt, "gt"), self.num_classes,
            self.ignore_index)

    def add_counts(self, counts: ArrayLike,
                   already_global: bool = False) -> None:
        """Adds a `[C, C]` count matrix.

        Args:
          counts: e.g. the output of `confusion_matrix_jnp`.
          already_global: True when `counts` covers the global batch (a
            jitted reduction over a sharded global array, same value on every
            process); False when it covers only this process's data.
        """
        counts = _to_host(counts, "counts")
        shape = (self.num_classes, self.num_classes)
        if counts.shape != shape:
            raise ValueError(
                f"counts has shape {counts.shape}, expected {shape}")
        if already_global:
            self._global += counts.astype(np.int64)
        else:
            self._local += counts.astype(np.int64)

    def result(self) -> np.ndarray:
        """The total int64 `[C, C]` (collective over processes)."""
        local = self._local
        if jax.process_count() > 1:
            local = _allgather_sum_int64(local)
        return local + self._global


def _allgather_sum_int64(x: np.ndarray) -> np.ndarray:
    """Sums a non-negative int64 array over processes without overflow.

    JAX without x64 would narrow int64 to int32, which a whole COCO val
    (about 1e10 pixels) overflows: gather the high and low 32-bit halves.
    """
    from jax.experimental import multihost_utils

    halves = np.stack([x >> 32, x & 0xFFFFFFFF]).astype(np.uint32)
    gathered = np.asarray(
        multihost_utils.process_allgather(halves, tiled=False),
        dtype=np.int64)
    return (gathered[:, 0] << 32).sum(axis=0) + gathered[:, 1].sum(axis=0)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def scores(conf: ArrayLike,
           class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU and friends from a `[C, C]` confusion matrix (layout: module doc).

    Args:
      conf: counts, rows = ground truth, columns = prediction.
      class_names: C names; default "0", "1", ...

    Returns:
      The JSON-able dict described in the module docstring.
    """
    conf = np.asarray(conf).astype(np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"conf must be square [C, C], got {conf.shape}")
    c = conf.shape[0]
    names = [str(i) for i in range(c)] if class_names is None else list(
        class_names)
    if len(names) != c:
        raise ValueError(
            f"{len(names)} class names for a {c}-class confusion matrix")
    tp = np.diag(conf)
    gt = conf.sum(axis=1)
    pr = conf.sum(axis=0)
    iou = _ratio(tp, gt + pr - tp)
    precision = _ratio(tp, pr)
    recall = _ratio(tp, gt)
    confusion = _ratio(pr - tp, tp)
    valid = gt > 0
    total = int(conf.sum())
    per_class = [
        {
            "id": i,
            "name": names[i],
            "iou": _json_float(iou[i]),
            "precision": _json_float(precision[i]),
            "recall": _json_float(recall[i]),
            "confusion": _json_float(confusion[i]),
            "tp": int(tp[i]),
            "gt_pixels": int(gt[i]),
            "pred_pixels": int(pr[i]),
        }
        for i in range(c)
    ]
    return {
        "miou": _json_float(_nanmean(iou[valid])),
        "miou_all_classes": _json_float(
            float(np.sum(np.where(valid, np.nan_to_num(iou), 0.0))) / c),
        "pixel_accuracy": _json_float(
            float(tp.sum()) / total if total else math.nan),
        "mean_precision": _json_float(_nanmean(precision[valid])),
        "mean_recall": _json_float(_nanmean(recall[valid])),
        "mean_confusion": _json_float(_nanmean(confusion[valid])),
        "num_classes": c,
        "num_pixels": total,
        "classes_in_gt": int(valid.sum()),
        "per_class": per_class,
    }


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100.0 * x:.2f}"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def markdown_table(result: dict[str, Any],
                   class_names: Sequence[str] | None = None) -> str:
    """A Markdown per-class table (percent; confusion as a ratio).

    Args:
      result: the output of `scores`.
      class_names: overrides the names stored in `result`.

    Returns:
      The table followed by a summary line, newline-terminated.
    """
    rows = result["per_class"]
    if class_names is not None and len(class_names) != len(rows):
        raise ValueError(
            f"{len(class_names)} class names for {len(rows)} classes")
    lines = [
        "| id | class | IoU | precision | recall | confusion (FP/TP) "
        "| GT pixels |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows):
        name = class_names[i] if class_names is not None else r["name"]
        lines.append(
            f"| {r['id']} | {name} | {_pct(r['iou'])} | "
            f"{_pct(r['precision'])} | {_pct(r['recall'])} | "
            f"{_num(r['confusion'])} | {r['gt_pixels']} |")
    lines.append(
        f"| | **mean** ({result['classes_in_gt']} classes in GT) | "
        f"**{_pct(result['miou'])}** | {_pct(result['mean_precision'])} | "
        f"{_pct(result['mean_recall'])} | {_num(result['mean_confusion'])} "
        f"| {result['num_pixels']} |")
    lines.append("")
    all_c = result.get("miou_all_classes")
    lines.append(
        f"mIoU {_pct(result['miou'])} (mean over the "
        f"{result['classes_in_gt']} classes in the ground truth, WeCLIP's "
        f"convention); over all {result['num_classes']} classes "
        f"{_pct(all_c)}; pixel accuracy {_pct(result['pixel_accuracy'])}.")
    return "\n".join(lines) + "\n"
