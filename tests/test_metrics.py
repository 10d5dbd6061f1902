"""Tests for ssr_jax.metrics against per-pixel loops and hand computations.

Counts are integers: every comparison of counts is exact. Ratios are compared
with a relative tolerance of 1e-12 (float64 on both sides).
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssr_jax import metrics


def _loop_confusion(pred, gt, c, ignore=255):
    conf = np.zeros((c, c), np.int64)
    for p, g in zip(np.ravel(pred).tolist(), np.ravel(gt).tolist(),
                    strict=True):
        if g == ignore or p == ignore:
            continue
        conf[g, p] += 1
    return conf


def _random_labels(rng, shape, c, ignore_frac=0.1):
    pred = rng.integers(0, c, shape)
    gt = rng.integers(0, c, shape)
    gt[rng.random(shape) < ignore_frac] = 255
    return pred, gt


def test_confusion_matrix_matches_pixel_loop():
    rng = np.random.default_rng(0)
    pred, gt = _random_labels(rng, (3, 7, 5), 6)
    pred[0, 0, :2] = 255  # uncertain pseudo labels are dropped too
    want = _loop_confusion(pred, gt, 6)
    got = metrics.confusion_matrix(pred, gt, 6)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    assert got.sum() == np.sum((gt != 255) & (pred != 255))


def test_confusion_matrix_jnp_matches_numpy_and_jits():
    rng = np.random.default_rng(1)
    pred, gt = _random_labels(rng, (2, 9, 4), 5)
    want = metrics.confusion_matrix(pred, gt, 5)
    fn = jax.jit(metrics.confusion_matrix_jnp, static_argnums=(2, 3))
    got = fn(jnp.asarray(pred, jnp.uint8), jnp.asarray(gt, jnp.uint8), 5,
             255)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_confusion_matrix_jnp_on_sharded_batch():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(2)
    pred, gt = _random_labels(rng, (8, 6, 6), 4)
    sh = NamedSharding(mesh, P("data"))
    fn = jax.jit(lambda p, g: metrics.confusion_matrix_jnp(p, g, 4),
                 out_shardings=NamedSharding(mesh, P()))
    got = fn(jax.device_put(pred, sh), jax.device_put(gt, sh))
    np.testing.assert_array_equal(np.asarray(got),
                                  _loop_confusion(pred, gt, 4))


def test_out_of_range_labels():
    with pytest.raises(ValueError, match="outside"):
        metrics.confusion_matrix(np.array([0, 7]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        metrics.confusion_matrix(np.zeros(3), np.zeros(4), 3)
    # The jittable version cannot raise: it drops such pixels.
    got = metrics.confusion_matrix_jnp(jnp.array([0, 7, 1]),
                                       jnp.array([0, 1, 1]), 3)
    np.testing.assert_array_equal(
        np.asarray(got), [[1, 0, 0], [0, 1, 0], [0, 0, 0]])


def test_scores_hand_computed():
    # 3 classes; class 2 never in GT but predicted once.
    conf = np.array([[5, 1, 0],
                     [2, 3, 1],
                     [0, 0, 0]])
    s = metrics.scores(conf, ["bg", "cat", "dog"])
    iou0 = 5 / (6 + 7 - 5)
    iou1 = 3 / (6 + 4 - 3)
    r = s["per_class"]
    assert r[0]["iou"] == pytest.approx(iou0, rel=1e-12)
    assert r[1]["iou"] == pytest.approx(iou1, rel=1e-12)
    assert r[2]["iou"] == 0.0  # predicted, absent from GT
    assert s["miou"] == pytest.approx((iou0 + iou1) / 2, rel=1e-12)
    assert s["classes_in_gt"] == 2
    assert r[0]["precision"] == pytest.approx(5 / 7, rel=1e-12)
    assert r[1]["recall"] == pytest.approx(3 / 6, rel=1e-12)
    assert r[2]["recall"] is None and r[2]["confusion"] is None
    assert r[0]["confusion"] == pytest.approx(2 / 5, rel=1e-12)
    assert r[1]["confusion"] == pytest.approx(1 / 3, rel=1e-12)
    assert s["mean_confusion"] == pytest.approx((2 / 5 + 1 / 3) / 2,
                                                rel=1e-12)
    assert s["mean_precision"] == pytest.approx((5 / 7 + 3 / 4) / 2,
                                                rel=1e-12)
    assert s["pixel_accuracy"] == pytest.approx(8 / 12, rel=1e-12)
    assert s["num_pixels"] == 12
    assert r[1]["name"] == "cat" and r[1]["tp"] == 3
    assert r[1]["gt_pixels"] == 6 and r[1]["pred_pixels"] == 4


def test_scores_match_weclip_nan_handling():
    """The WeCLIP evaluate.scores formulas, written out here with NumPy."""
    rng = np.random.default_rng(3)
    pred, gt = _random_labels(rng, (4, 16, 16), 7)
    gt[gt == 3] = 255  # class 3 absent from GT
    pred[pred == 5] = 0  # class 5 never predicted
    gt[(gt == 6) & (rng.random(gt.shape) < 0.9)] = 255
    hist = _loop_confusion(pred, gt, 7).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
        acc_cls = np.nanmean(np.diag(hist) / hist.sum(1))
    valid = hist.sum(axis=1) > 0
    s = metrics.scores(hist.astype(np.int64))
    assert s["miou"] == pytest.approx(np.nanmean(iu[valid]), rel=1e-12)
    assert s["mean_recall"] == pytest.approx(acc_cls, rel=1e-12)
    assert s["pixel_accuracy"] == pytest.approx(
        np.diag(hist).sum() / hist.sum(), rel=1e-12)


def test_classes_absent_everywhere_and_empty():
    conf = np.zeros((4, 4), np.int64)
    conf[0, 0] = 3
    conf[1, 1] = 1
    s = metrics.scores(conf)
    assert s["miou"] == 1.0
    assert s["per_class"][3]["iou"] is None
    assert s["per_class"][3]["precision"] is None
    empty = metrics.scores(np.zeros((3, 3), np.int64))
    assert empty["miou"] is None and empty["pixel_accuracy"] is None
    json.dumps(empty, allow_nan=False)


def test_gt_class_never_hit():
    # Class 1 in GT but always wrong: IoU 0 counts in the mIoU; its
    # precision/confusion are undefined and skipped in those means.
    conf = np.array([[4, 0], [2, 0]])
    s = metrics.scores(conf)
    assert s["per_class"][1]["iou"] == 0.0
    assert s["miou"] == pytest.approx((4 / 6 + 0.0) / 2, rel=1e-12)
    assert s["per_class"][1]["confusion"] is None
    assert s["mean_confusion"] == pytest.approx(2 / 4, rel=1e-12)


def test_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(4)
    batches = [_random_labels(rng, (2, 5, 3), 5) for _ in range(4)]
    acc = metrics.ConfusionAccumulator(5)
    for i, (p, g) in enumerate(batches):
        if i % 2:
            acc.add(jnp.asarray(p), jnp.asarray(g))
        else:
            acc.add_counts(metrics.confusion_matrix_jnp(
                jnp.asarray(p), jnp.asarray(g), 5), already_global=True)
    big_p = np.concatenate([b[0] for b in batches])
    big_g = np.concatenate([b[1] for b in batches])
    total = acc.result()
    assert total.dtype == np.int64
    np.testing.assert_array_equal(total, _loop_confusion(big_p, big_g, 5))
    assert metrics.scores(total) == metrics.scores(
        metrics.confusion_matrix(big_p, big_g, 5))
    acc.reset()
    assert acc.result().sum() == 0
    with pytest.raises(ValueError, match="shape"):
        acc.add_counts(np.zeros((4, 4)))


def test_scores_json_and_markdown():
    conf = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 0]])
    s = metrics.scores(conf, ["background", "cat", "dog"])
    assert json.loads(json.dumps(s, allow_nan=False)) == s
    table = metrics.markdown_table(s)
    lines = table.splitlines()
    assert lines[0].startswith("| id | class | IoU")
    assert "| 1 | cat | 42.86 | 75.00 | 50.00 | 0.333 | 6 |" in lines
    assert "| 2 | dog | 0.00 | 0.00 | — | — | 0 |" in lines
    assert f"**{100 * s['miou']:.2f}**" in table
    renamed = metrics.markdown_table(s, ["a", "b", "c"])
    assert "| 1 | b |" in renamed
    assert not math.isnan(s["miou"])
