"""Tests for ssr_jax.logs: CRC-32C, TFRecord framing, the hand-written
protobuf encoding (decoded here by the real protobuf runtime from a schema
with TensorBoard's field numbers), jsonl round trip, PNGs, process gating."""

import glob
import json
import os
import struct

import numpy as np
import pytest
from absl import logging
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from PIL import Image

from ssr_jax import logs


def test_crc32c_known_vectors():
    # RFC 3720 (iSCSI) test vectors for CRC-32C.
    assert logs.crc32c(b"123456789") == 0xE3069283
    assert logs.crc32c(bytes(32)) == 0x8A9136AA
    assert logs.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43
    assert logs.crc32c(bytes(range(32))) == 0x46DD794E
    assert logs.crc32c(b"") == 0


def test_masked_crc_formula():
    crc = logs.crc32c(b"abc")
    rot = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    assert logs.masked_crc32c(b"abc") == (rot + 0xA282EAD8) % 2**32


def _event_class():
    """Event/Summary schema with the field numbers of TensorBoard's protos."""
    f = descriptor_pb2.FileDescriptorProto(name="ev_test.proto",
                                           package="t", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto

    def msg(name, fields):
        m = f.message_type.add(name=name)
        for fname, num, ftype, label, type_name in fields:
            fd = m.field.add(name=fname, number=num, type=ftype, label=label)
            if type_name:
                fd.type_name = type_name
        return m

    opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED
    msg("PluginData", [("plugin_name", 1, T.TYPE_STRING, opt, None),
                       ("content", 2, T.TYPE_BYTES, opt, None)])
    msg("SummaryMetadata", [("plugin_data", 1, T.TYPE_MESSAGE, opt,
                             ".t.PluginData")])
    msg("Shape", [])
    msg("Tensor", [("dtype", 1, T.TYPE_INT32, opt, None),
                   ("tensor_shape", 2, T.TYPE_MESSAGE, opt, ".t.Shape"),
                   ("string_val", 8, T.TYPE_BYTES, rep, None)])
    msg("Image", [("height", 1, T.TYPE_INT32, opt, None),
                  ("width", 2, T.TYPE_INT32, opt, None),
                  ("colorspace", 3, T.TYPE_INT32, opt, None),
                  ("encoded_image_string", 4, T.TYPE_BYTES, opt, None)])
    msg("Value", [("tag", 1, T.TYPE_STRING, opt, None),
                  ("simple_value", 2, T.TYPE_FLOAT, opt, None),
                  ("image", 4, T.TYPE_MESSAGE, opt, ".t.Image"),
                  ("tensor", 8, T.TYPE_MESSAGE, opt, ".t.Tensor"),
                  ("metadata", 9, T.TYPE_MESSAGE, opt,
                   ".t.SummaryMetadata")])
    msg("Summary", [("value", 1, T.TYPE_MESSAGE, rep, ".t.Value")])
    msg("Event", [("wall_time", 1, T.TYPE_DOUBLE, opt, None),
                  ("step", 2, T.TYPE_INT64, opt, None),
                  ("file_version", 3, T.TYPE_STRING, opt, None),
                  ("summary", 5, T.TYPE_MESSAGE, opt, ".t.Summary")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(
        "t.Event"))


def _write_some(workdir):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    with logs.MetricWriter(str(workdir), process_index=0) as w:
        w.write_scalars(1, {"loss": np.float32(0.5), "lr": 1e-5})
        w.write_scalars(2, {"loss": float("nan"), "train/acc": 3})
        w.write_text(2, {"config": "a: *1*"})
        w.write_images(3, {"val/pred": img, "gray": img[..., 0]})
        path = w.event_path
    return path, img


def test_event_file_decodes(tmp_path):
    path, img = _write_some(tmp_path)
    Event = _event_class()
    events = [Event.FromString(p) for p in logs.read_event_file(path)]
    assert events[0].file_version == "brain.Event:2"
    e1 = events[1]
    assert e1.step == 1 and e1.wall_time > 1.6e9
    tags = {v.tag: v.simple_value for v in e1.summary.value}
    assert tags == {"loss": 0.5, "lr": pytest.approx(1e-5, rel=1e-6)}
    e2 = {v.tag: v.simple_value for v in events[2].summary.value}
    assert np.isnan(e2["loss"]) and e2["train/acc"] == 3.0
    text = events[3].summary.value[0]
    assert events[3].step == 2 and text.tag == "config"
    assert text.metadata.plugin_data.plugin_name == "text"
    assert text.tensor.dtype == 7 and text.tensor.string_val == [b"a: *1*"]
    ims = {v.tag: v.image for v in events[4].summary.value}
    assert ims["val/pred"].height == 5 and ims["val/pred"].width == 7
    assert ims["val/pred"].colorspace == 3 and ims["gray"].colorspace == 1
    decoded = np.asarray(Image.open(
        __import__("io").BytesIO(ims["val/pred"].encoded_image_string)))
    np.testing.assert_array_equal(decoded, img)
    assert len(events) == 5


def test_negative_step_varint():
    Event = _event_class()
    e = Event.FromString(logs._event(1.0, -3))
    assert e.step == -3


def test_framing_detects_corruption(tmp_path):
    path, _ = _write_some(tmp_path)
    good = open(path, "rb").read()
    data = bytearray(good)
    (n,) = struct.unpack("<Q", data[:8])
    data[12 + n // 2] ^= 0x01  # flip a payload bit of the first record
    bad = tmp_path / "bad.tfevents"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="payload CRC"):
        logs.read_event_file(str(bad))
    bad.write_bytes(good[:-3])
    with pytest.raises(ValueError, match="truncated"):
        logs.read_event_file(str(bad))


def test_tensorboard_loader_if_available(tmp_path):
    """TensorBoard's own reader and protos, where tensorboard is installed
    (a dev dependency, requirements-dev.txt; not a runtime one)."""
    loader = pytest.importorskip(
        "tensorboard.backend.event_processing.event_file_loader")
    path, img = _write_some(tmp_path)
    # The raw records (LegacyEventFileLoader) carry simple_value, as
    # tf.summary writes them; EventFileLoader (TensorBoard >= 2.x) migrates
    # them to scalar tensors, which must read the same.
    raw = list(loader.LegacyEventFileLoader(path).Load())
    assert {v.tag: v.simple_value for v in raw[1].summary.value} == {
        "loss": 0.5, "lr": pytest.approx(1e-5, rel=1e-6)}
    events = list(loader.EventFileLoader(path).Load())
    assert events[0].file_version == "brain.Event:2"
    assert len(events) == 5

    def scalar(v):
        if v.HasField("tensor"):
            assert v.metadata.plugin_data.plugin_name == "scalars"
            return v.tensor.float_val[0]
        return v.simple_value

    scalars = {v.tag: scalar(v) for v in events[1].summary.value}
    assert events[1].step == 1
    assert scalars == {"loss": 0.5, "lr": pytest.approx(1e-5, rel=1e-6)}
    text = events[3].summary.value[0]
    assert text.metadata.plugin_data.plugin_name == "text"
    assert list(text.tensor.string_val) == [b"a: *1*"]
    assert text.tensor.dtype == 7  # types_pb2.DT_STRING
    image = {v.tag: v.image for v in raw[4].summary.value}["val/pred"]
    assert (image.height, image.width, image.colorspace) == (5, 7, 3)
    decoded = np.asarray(Image.open(
        __import__("io").BytesIO(image.encoded_image_string)))
    np.testing.assert_array_equal(decoded, img)
    migrated = {v.tag: v for v in events[4].summary.value}["val/pred"]
    if migrated.HasField("tensor"):  # [width, height, PNG] strings
        w, h, png = migrated.tensor.string_val
        assert (int(w), int(h)) == (7, 5)
        np.testing.assert_array_equal(np.asarray(Image.open(
            __import__("io").BytesIO(png))), img)
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(os.path.dirname(path))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")][0] == 0.5
    assert acc.Images("val/pred")[0].width == 7


def test_jsonl_round_trip_and_pngs(tmp_path):
    _, img = _write_some(tmp_path)
    recs = logs.read_metrics(str(tmp_path))
    assert [r["step"] for r in recs] == [1, 2, 2, 3]
    assert recs[0]["scalars"] == {"loss": 0.5, "lr": 1e-5}
    assert np.isnan(recs[1]["scalars"]["loss"])
    assert recs[2]["text"] == {"config": "a: *1*"}
    assert recs[3]["images"]["val/pred"] == os.path.join(
        "images", "val_pred_3.png")
    png = np.asarray(Image.open(tmp_path / recs[3]["images"]["val/pred"]))
    np.testing.assert_array_equal(png, img)
    gray = np.asarray(Image.open(tmp_path / recs[3]["images"]["gray"]))
    np.testing.assert_array_equal(gray, img[..., 0])
    # Reopening appends (a resumed run keeps its history).
    with logs.MetricWriter(str(tmp_path), process_index=0,
                           tensorboard=False) as w:
        w.write_scalars(4, {"loss": 0.25})
    assert [r["step"] for r in logs.read_metrics(str(tmp_path))][-1] == 4
    json.dumps(recs[0])


def test_bad_inputs(tmp_path):
    with logs.MetricWriter(str(tmp_path), process_index=0) as w:
        with pytest.raises(ValueError, match="uint8"):
            w.write_images(0, {"x": np.zeros((4, 4, 3), np.float32)})
        with pytest.raises(ValueError, match="not a number"):
            w.write_scalars(0, {"v": np.zeros(3)})


def test_only_process_zero_writes(tmp_path):
    with logs.MetricWriter(str(tmp_path / "p1"), process_index=1) as w:
        w.write_scalars(1, {"loss": 1.0})
        w.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
    assert not (tmp_path / "p1").exists()


def test_setup_logging_writes_file(tmp_path):
    old = logging.get_verbosity()
    logging.set_verbosity(logging.INFO)
    try:
        path = logs.setup_logging(str(tmp_path), process_index=0)
        assert logs.setup_logging(str(tmp_path), process_index=0) == path
        logging.info("hello from the test %d", 7)
    finally:
        logging.set_verbosity(old)
    text = open(path).read()
    assert "hello from the test 7" in text
    assert text.count("hello from the test 7") == 1  # one handler only
    assert glob.glob(str(tmp_path / "logs" / "ssr_jax.0.log"))
