"""The terminal tells the truth: skip counts, image accounting, both mIoU
conventions, metrics.jsonl without duplicate steps (issue 14, item 5)."""

from __future__ import annotations

import json

import numpy as np

from ssr_jax import data_sources, logs, metrics
from ssr_jax.data import voc
from ssr_jax.evaluators import common
from tests import data_fixtures


def test_strict_false_prints_the_skip_count(tmp_path, capsys):
    tree = data_fixtures.write_voc_tree(
        str(tmp_path / "voc"), broken=("missing_image", "truncated_jpeg"))
    c = data_fixtures.fixture_config(tree, **{"data.strict": False})
    data = data_sources.load_split(c, "train_aug")
    err = capsys.readouterr().err
    assert "ssr_jax: warning: skipped 2 of 6 examples of split 'train_aug' " \
           "(data.strict=False)" in err
    # ... and eval's accounting records them, with the reason.
    images = common.image_accounting(
        data, 3, max_images=3, beyond_max=1, without_mask=0, unreadable=0)
    assert images["listed"] == 6 and images["scored"] == 3
    assert images["not_scored"]["unusable (data.strict=False)"] == 2
    assert images["not_scored"]["beyond eval.max_images=3"] == 1
    assert len(images["unusable_examples"]) == 2
    err = capsys.readouterr().err
    assert "scored 3 of 6 listed images; not scored: 2 unusable" in err
    assert "1 beyond eval.max_images=3" in err


def test_miou_over_present_and_all_classes():
    # 3 classes; the GT holds classes 0 and 1 only, both predicted right.
    conf = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    s = metrics.scores(conf, ["bg", "a", "b"])
    assert s["miou"] == 1.0  # WeCLIP: classes present in the GT
    assert abs(s["miou_all_classes"] - 2 / 3) < 1e-9
    table = metrics.markdown_table(s)
    assert "mean over the 2 classes in the ground truth" in table
    assert "over all 3 classes 66.67" in table


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    with logs.MetricWriter(str(tmp_path), process_index=0,
                           tensorboard=False) as w:
        for step in (1, 2, 3, 4):
            w.write_scalars(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "scal')  # a line cut by a crash
    assert logs.truncate_metrics(str(tmp_path), 2) == 3
    steps = [r["step"] for r in logs.read_metrics(str(tmp_path))]
    assert steps == [1, 2]
    assert logs.truncate_metrics(str(tmp_path), 2) == 0
    assert logs.truncate_metrics(str(tmp_path / "none"), 0) == 0
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def test_warn_goes_to_stderr(capsys):
    logs.warn("checkpoint step 4 is broken")
    assert capsys.readouterr().err == (
        "ssr_jax: warning: checkpoint step 4 is broken\n")


def test_pictures_have_headers_and_a_class_legend():
    from ssr_jax import visualize

    tile = np.zeros((32, 40, 3), np.uint8)
    pic = visualize.grid([[tile, tile], [tile, tile]])
    labels = [np.array([[0, 1], [15, 255]]), np.array([[0, 0], [0, 1]])]
    legend = visualize.class_legend(labels, voc.VOC_CLASSES)
    assert [name for name, _ in legend] == ["background", "aeroplane",
                                            "person"]
    assert legend[1][1] == tuple(voc.palette()[3:6])
    out = visualize.annotate(pic, ("image", "prediction"), 40,
                             legend=legend)
    assert out.shape[1] == pic.shape[1] and out.shape[0] > pic.shape[0] + 20
    head = out[:pic.shape[0] and 14]
    assert (head < 128).any()  # header text drawn
    np.testing.assert_array_equal(out[16:16 + pic.shape[0]], pic)
