"""Metric logging: JSON lines, TensorBoard event files (no TensorFlow), PNGs.

API:
  warn(message), note(message)
      A warning / a start-up note for the user: logged, and printed on
      stderr by process 0 (`ssr_jax: warning: ...`), since absl sends
      log records only to the log file once it has one.
  setup_logging(workdir, process_index=None) -> str
      absl/Python logging also goes to `<workdir>/logs/ssr_jax.<p>.log`
      (console output unchanged); idempotent; returns the file path.
  MetricWriter(workdir, process_index=None, tensorboard=True)
      .write_scalars(step, {name: number})       jsonl + TB `simple_value`
      .write_text(step, {name: str})              jsonl + TB text plugin
      .write_images(step, {name: uint8 [H, W, 3]})   PNG files + TB images
      .flush(), .close(); also a context manager.
      Only process 0 writes (`process_index` defaults to
      `jax.process_index()`); elsewhere every method is a no-op.
  read_metrics(workdir) -> list[dict]             parses metrics.jsonl
  read_event_file(path) -> list[bytes]            TFRecord payloads, CRCs
                                                  checked (for tests/tools)
  crc32c(data) -> int, masked_crc32c(data) -> int

Files under `workdir` (a local or mounted directory, e.g. gcsfuse; the TPU
launch script syncs it to GCS):
  metrics.jsonl      one JSON object per line:
                     {"step": int, "wall_time": float, "scalars": {...}}
                     {"step": ..., "wall_time": ..., "text": {...}}
                     {"step": ..., "wall_time": ..., "images": {name: path}}
                     (non-finite scalars are written as NaN/Infinity, which
                     Python's json and pandas read)
  tensorboard/events.out.tfevents.<time>.<host>.<pid>.0.v2
  images/<name>_<step>.png    (name with "/" replaced by "_")

TensorBoard format: TFRecord framing (uint64 length, masked CRC-32C of the
length, payload, masked CRC-32C of the payload; all little-endian) around
`Event` protobuf messages, hand-encoded here. Field numbers from
tensorflow/core/util/event.proto and framework/summary.proto:
  Event{wall_time=1 double, step=2 int64, file_version=3 string,
        summary=5 Summary}
  Summary{value=1 repeated Value}
  Value{tag=1 string, simple_value=2 float, image=4 Image,
        tensor=8 TensorProto, metadata=9 SummaryMetadata}
  Image{height=1, width=2, colorspace=3 int32, encoded_image_string=4 bytes}
  SummaryMetadata{plugin_data=1 PluginData{plugin_name=1, content=2}}
  TensorProto{dtype=1 enum (DT_STRING=7), tensor_shape=2, string_val=8}
"""

from __future__ import annotations

import io
import json
import logging as py_logging
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from ssr_jax import io_utils


def _terminal_process() -> bool:
    jax = sys.modules.get("jax")  # never import JAX just for this
    try:
        return jax is None or jax.process_index() == 0
    except Exception:  # noqa: BLE001 - before the backend is up
        return True


def warn(message: str) -> None:
    """Logs a warning and prints it on stderr (process 0)."""
    logging.warning("%s", message)
    if _terminal_process():
        print(f"ssr_jax: warning: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """Logs an info record and prints it on stderr (process 0)."""
    logging.info("%s", message)
    if _terminal_process():
        print(message, file=sys.stderr, flush=True)


# --- CRC-32C (Castagnoli), table driven -------------------------------------

_CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _make_crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_CRC32C_POLY if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _make_crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of `data` (as TFRecord uses), a uint32 as int."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15, add a constant."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) \
        & 0xFFFFFFFF


def _frame(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return b"".join([
        length, struct.pack("<I", masked_crc32c(length)),
        payload, struct.pack("<I", masked_crc32c(payload)),
    ])


def read_event_file(path: str) -> list[bytes]:
    """Payloads of a TFRecord file; raises ValueError on a bad CRC/length."""
    with open(path, "rb") as f:
        data = f.read()
    out, pos = [], 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at {pos}")
        header = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if hcrc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        payload = data[pos + 12:pos + 12 + n]
        if len(payload) != n or pos + 16 + n > len(data):
            raise ValueError(f"{path}: truncated record at byte {pos}")
        (pcrc,) = struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])
        if pcrc != masked_crc32c(payload):
            raise ValueError(f"{path}: bad payload CRC at byte {pos}")
        out.append(payload)
        pos += 16 + n
    return out


# --- a tiny protobuf encoder -------------------------------------------------

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 as ten-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _f_varint(field: int, n: int) -> bytes:
    return _key(field, _VARINT) + _varint(n)


def _f_double(field: int, x: float) -> bytes:
    return _key(field, _I64) + struct.pack("<d", x)


def _f_float(field: int, x: float) -> bytes:
    return _key(field, _I32) + struct.pack("<f", x)


def _f_bytes(field: int, data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return _key(field, _LEN) + _varint(len(data)) + data


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           values: list[bytes] | None = None) -> bytes:
    msg = _f_double(1, wall_time) + _f_varint(2, step)
    if file_version is not None:
        msg += _f_bytes(3, file_version)
    if values is not None:
        msg += _f_bytes(5, b"".join(_f_bytes(1, v) for v in values))
    return msg


def _scalar_value(tag: str, x: float) -> bytes:
    return _f_bytes(1, tag) + _f_float(2, x)


_DT_STRING = 7


def _text_value(tag: str, text: str) -> bytes:
    plugin = _f_bytes(1, "text")
    metadata = _f_bytes(1, plugin)
    # A scalar string tensor: an empty TensorShapeProto means rank 0.
    tensor = (_f_varint(1, _DT_STRING) + _f_bytes(2, b"")
              + _f_bytes(8, text))
    return _f_bytes(1, tag) + _f_bytes(9, metadata) + _f_bytes(8, tensor)


def _image_value(tag: str, png: bytes, h: int, w: int, c: int) -> bytes:
    image = (_f_varint(1, h) + _f_varint(2, w) + _f_varint(3, c)
             + _f_bytes(4, png))
    return _f_bytes(1, tag) + _f_bytes(4, image)


# --- writers ----------------------------------------------------------------


def _default_process_index() -> int:
    import jax

    return jax.process_index()


def _to_float(name: str, v: Any) -> float:
    try:
        return float(np.asarray(v))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"scalar {name!r} is not a number (got {type(v).__name__} "
            f"{np.shape(v)}); pass one value per name") from e


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "image"


class MetricWriter:
    """Writes metrics.jsonl, a TensorBoard event file and PNG images."""

    def __init__(self, workdir: str, process_index: int | None = None,
                 tensorboard: bool = True):
        if process_index is None:
            process_index = _default_process_index()
        self.workdir = workdir
        self.active = process_index == 0
        self._jsonl = None
        self._events = None
        self.event_path: str | None = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a",
                           encoding="utf-8")
        if tensorboard:
            tb_dir = os.path.join(workdir, "tensorboard")
            os.makedirs(tb_dir, exist_ok=True)
            now = time.time()
            name = (f"events.out.tfevents.{int(now):010d}."
                    f"{socket.gethostname()}.{os.getpid()}.0.v2")
            self.event_path = os.path.join(tb_dir, name)
            self._events = open(self.event_path, "ab")
            self._events.write(_frame(_event(now, 0,
                                             file_version="brain.Event:2")))

    def _line(self, step: int, key: str, payload: dict[str, Any]) -> None:
        record = {"step": int(step), "wall_time": time.time(), key: payload}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def _tb(self, step: int, values: list[bytes]) -> None:
        if self._events is not None and values:
            self._events.write(_frame(_event(time.time(), int(step),
                                             values=values)))
            self._events.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs numbers (Python, NumPy or 0-d JAX values) at `step`."""
        if not self.active:
            return
        values = {k: _to_float(k, v) for k, v in scalars.items()}
        self._line(step, "scalars", values)
        self._tb(step, [_scalar_value(k, v) for k, v in values.items()])

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        """Logs strings (Markdown renders in TensorBoard's text tab)."""
        if not self.active:
            return
        texts = {k: str(v) for k, v in texts.items()}
        self._line(step, "text", texts)
        self._tb(step, [_text_value(k, v) for k, v in texts.items()])

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Saves uint8 images `[H, W, 3]` (or `[H, W]`, `[H, W, 1|4]`)."""
        if not self.active:
            return
        from PIL import Image

        img_dir = os.path.join(self.workdir, "images")
        os.makedirs(img_dir, exist_ok=True)
        paths, values = {}, []
        for name, img in images.items():
            img = np.asarray(img)
            if img.dtype != np.uint8 or img.ndim not in (2, 3) or (
                    img.ndim == 3 and img.shape[-1] not in (1, 3, 4)):
                raise ValueError(
                    f"image {name!r} must be uint8 [H, W, 3] (or [H, W], "
                    f"[H, W, 1|4]); got {img.dtype} {img.shape}")
            if img.ndim == 3 and img.shape[-1] == 1:
                img = img[..., 0]
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            png = buf.getvalue()
            rel = os.path.join("images", f"{_safe_name(name)}_{int(step)}.png")
            with open(os.path.join(self.workdir, rel), "wb") as f:
                f.write(png)
            paths[name] = rel
            channels = 1 if img.ndim == 2 else img.shape[-1]
            values.append(_image_value(name, png, img.shape[0],
                                       img.shape[1], channels))
        self._line(step, "images", paths)
        self._tb(step, values)

    def flush(self) -> None:
        for f in (self._jsonl, self._events):
            if f is not None:
                f.flush()

    def close(self) -> None:
        for f in (self._jsonl, self._events):
            if f is not None:
                f.close()
        self._jsonl = self._events = None
        self.active = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of `<workdir>/metrics.jsonl`, in order."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, step: int) -> int:
    """Drops the records of `<workdir>/metrics.jsonl` after `step` (the
    step a run resumes from; 0 for a fresh start), so a resumed or
    repeated run does not log steps twice. Unparsable lines (a write cut
    by a crash) go too. Rewrites the file atomically; returns how many
    lines were dropped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if int(rec.get("step", 0)) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines):
        return 0
    with io_utils.atomic_write(path, "w", encoding="utf-8") as f:
        f.writelines(kept)
    return len(lines) - len(kept)


_FILE_HANDLERS: dict[str, py_logging.Handler] = {}


def setup_logging(workdir: str, process_index: int | None = None) -> str:
    """Also sends absl (and Python) logging to a file in `workdir/logs`.

    Console output is left as absl configures it. Every process writes its
    own file, `ssr_jax.<process_index>.log`, so multi-host logs do not mix.

    Returns:
      The log file path.
    """
    if process_index is None:
        process_index = _default_process_index()
    log_dir = os.path.join(workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(log_dir,
                                        f"ssr_jax.{process_index}.log"))
    if path not in _FILE_HANDLERS:
        handler = py_logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.PythonFormatter())
        handler.setLevel(py_logging.INFO)
        py_logging.getLogger().addHandler(handler)
        _FILE_HANDLERS[path] = handler
    return path
