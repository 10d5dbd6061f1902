"""Benchmarks: ssr_jax against the PyTorch eager reference, side by side.

    python benchmarks/run.py --quick --json out.json    # <= 5 min, 2 cores
    python benchmarks/run.py --json full.json           # ViT-B/16 + ViT-S/16
    python benchmarks/run.py --device gpu --json gpu.json   # benchmarks/gpu.sh

Rows (`--rows` picks some; each side of each row runs in its own
subprocess, so peak RSS is per row and a crash costs one cell):

- `pseudo_labels`: CAM + SGC + PAR for a batch: the jitted
  `ssr.pseudo_label_path` vs the reference's `pseudo_labels`.
- `train_step`: one full iteration: `train.Setup.update` vs the reference's
  `TrainStep` (AdamW included).
- `segment_ops`: `segment_reduce` "segment" vs "onehot" at SGC sizes
  (B x H x W pixels -> 256 superpixels, mean colour).
- `devices_1_vs_8`: the same global batch through `Setup.update` on 1 and on
  8 fake CPU devices.
- `input_pipeline`: images/s of `input_pipeline.train_iterator` (folders
  with per-crop SLIC, SLIC cache cold and warm; the TFDS source with
  superpixels stored at build time) on generated 375x500 JPEGs, against
  the train step's consumption rate (`benchmarks/input_pipeline.py`).
- `eval`: images/s of `ssr_jax.evaluate.evaluate_segmentation` (multi-scale
  + flip), DenseCRF off and on; skipped while ssr_jax.evaluate is absent.
- `stages` (not in the default list): time of each stage of the pseudo-
  label path and the train step on both sides, to see where time goes.

Random weights in the Hugging Face snapshot layout are written once per run
(weights do not change speed) and both sides load the same files. Both
sides see the same uint8 batch (blobby images, SLIC superpixels, 1-3
classes per image, one image with crop padding). Times are medians over
`--repeats` calls after one warm-up call; JAX compile time is measured
separately (`jit(...).lower(...).compile()`).

Equal cores on both sides: every worker pins itself (`sched_setaffinity`,
before jax or torch is imported, so every thread they start inherits it)
to the same CPU set (`--cpus`; default the last `--threads` usable cores),
and every timed sample records the process's CPU seconds per wall second
(`cores_used`, all threads, spinning included). A ratio whose two sides
ran on different CPU sets or used more than 10% different cores is not
reported: the cell says INVALID and why. Thread flags alone do not bound
XLA: with `--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`
the ssr_jax process still kept 1.9 cores busy on this 2-core machine while
torch with one thread used 1.0. Threads (`--threads`, recorded in the
JSON): 1 by default, i.e. `torch.set_num_threads(1)` and single-threaded
XLA flags on one pinned core; N > 1 gives torch N threads and XLA its
default, both on the same N pinned cores. On a shared machine torch's
OpenMP threads stall whenever another process holds a core (the
reference's train step: 0.8 s with 1 thread, 10-18 s with 2, measured
side by side under load). On CPU the two sides of `pseudo_labels` and
`train_step` are timed in turns (`--paired`): both warm in two processes,
one call each, alternating, so that both see the same load.

`--device gpu` runs the same rows on the GPU (CUDA jax and torch): ssr_jax
in float32 and bfloat16 (`config.model.dtype`), the train step at batch 4,
8 and 16, peak GPU memory (torch.cuda.max_memory_allocated, JAX
peak_bytes_in_use) and the projected time of 30k iterations at batch 4.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RESULT_TAG = "@@RESULT@@ "
CELL_TAG = "@@CELL@@ "  # one finished cell, so a killed worker loses none
READY_TAG = "@@READY@@"  # paired mode: compiled and warm, waiting for "run"
TIME_TAG = "@@TIME@@ "  # paired mode: one timed sample
# Paired mode (`--paired`, CPU): the two sides of a row wait, warm, in two
# processes and the parent has them take turns, one call each, so that both
# see the same load from other processes on a shared machine.
_PAIRED = {"on": False}
ROWS = ("pseudo_labels", "train_step", "segment_ops", "devices_1_vs_8",
        "input_pipeline", "eval")
ALL_ROWS = ROWS + ("stages",)
GOALS = {  # name: (what, threshold) -- ratio = peer time / ssr_jax time
    # Issue 15's goals on equal cores: with the encoders half the path at
    # equal FLOPs on both sides, 3x is out of reach by construction.
    "pseudo_labels": ("ratio >= 2 (CPU)", 2.0),
    "train_step": ("ratio >= 1.5 and peak RSS no higher", 1.5),
    "segment_ops": ("ratio >= 100 (CPU)", 100.0),
    "devices_1_vs_8": ("overhead <= 15%", 0.15),
    "input_pipeline": ("pipeline images/s >= step images/s", 1.0),
}
GPU_BATCHES = (4, 8, 16)
ITERATIONS = 30000  # VOC schedule (SPEC 1.10), for the projected GPU time


# --- shapes -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Model and batch shapes of one benchmark mode."""

    name: str
    clip_width: int
    clip_layers: int
    clip_heads: int
    dino_width: int
    dino_layers: int
    dino_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    text_vocab: int
    text_context: int
    projection_dim: int
    batch: int
    crop: int
    dataset_images: int
    kmax: int = 6  # VOC data.max_classes_per_image
    n_segments: int = 100  # sgc.slic_segments
    max_segments: int = 256  # sgc.max_segments
    par_iters: int = 20
    num_fg: int = 20
    num_bg: int = 25

    @property
    def clip_layers_attn(self) -> int:
        return min(8, self.clip_layers)  # sgc.clip_layers

    def describe(self) -> dict[str, Any]:
        return {
            "clip": f"ViT width {self.clip_width}, {self.clip_layers} "
                    f"blocks, {self.clip_heads} heads, patch 16",
            "dino": f"ViT width {self.dino_width}, {self.dino_layers} "
                    f"blocks, {self.dino_heads} heads, patch 16",
            "batch": self.batch, "crop": self.crop,
            "classes_per_image": "1, 2, 3, 1, ... (JAX: padded to the "
                                 "class-slot bucket, 3 with the default "
                                 f"buckets, at most {self.kmax})",
            "superpixels": f"SLIC n_segments {self.n_segments}, padded to "
                           f"{self.max_segments}",
            "par_iters": self.par_iters,
            "decoder": "WeCLIP: 256 wide, 3 layers, 8 heads",
        }


QUICK = Shapes("quick", 256, 6, 4, 192, 6, 3, 256, 2, 4, 49408, 77, 256,
               batch=2, crop=160, dataset_images=16)
FULL = Shapes("full", 768, 12, 12, 384, 12, 6, 512, 12, 8, 49408, 77, 512,
              batch=4, crop=320, dataset_images=32)
# `--smoke`: the whole train step on tiny encoders, to check an install.
SMOKE = Shapes("smoke", 32, 3, 2, 24, 2, 2, 32, 2, 2, 512, 24, 16, batch=2,
               crop=64, dataset_images=4, n_segments=16, max_segments=64,
               par_iters=2)


# --- the shared batch ---------------------------------------------------------


def make_batch(batch: int, crop: int, num_fg: int, n_segments: int,
               max_segments: int, seed: int = 0) -> dict:
    """Blobby uint8 images, SLIC ids, 1-3 classes, a padded crop edge.

    The same arrays for both sides (the reference's `random_batch`, without
    importing torch). Returns the docs/DESIGN.md batch as NumPy arrays.
    """
    import numpy as np
    import scipy.ndimage

    from ssr_jax.data import slic

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (batch, crop // 32 + 1, crop // 32 + 1,
                                   3)).astype(np.float32)
    zoom = crop / coarse.shape[1]
    images = np.stack([
        np.clip(scipy.ndimage.zoom(c, (zoom, zoom, 1), order=1)[:crop, :crop]
                + rng.normal(0, 8, (crop, crop, 3)), 0, 255)
        for c in coarse]).astype(np.uint8)
    valid = np.ones((batch, crop, crop), bool)
    valid[0, :, crop - crop // 5:] = False
    images[~valid] = 0
    superpixels = np.full((batch, crop, crop), -1, np.int32)
    for i in range(batch):
        w = int(valid[i, 0].sum())
        superpixels[i, :, :w] = slic.slic_ids(images[i, :, :w], n_segments,
                                              10.0, max_segments)
    labels = np.zeros((batch, num_fg), np.float32)
    for i in range(batch):
        labels[i, rng.choice(num_fg, size=1 + i % 3, replace=False)] = 1.0
    return {"image": images, "valid": valid, "labels": labels,
            "superpixels": superpixels}


def shapes_batch(s: Shapes, batch: int | None = None) -> dict:
    """`make_batch` at the row's shapes (`batch` images, default
    `s.batch`)."""
    return make_batch(s.batch if batch is None else batch, s.crop, s.num_fg,
                      s.n_segments, s.max_segments)


# --- helpers shared by the workers ------------------------------------------


def _rss_mb() -> float:
    """Peak RSS of this process since it started (compiles included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak_rss() -> bool:
    """Restarts the kernel's peak-RSS mark (VmHWM); False if not allowed.

    Freed heap (the compiler's, the loaders') is first handed back to the
    kernel (`malloc_trim`), so the new mark counts what the timed calls use.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_since_reset_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _timed(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """One warm-up call, then `repeats` timed samples (fn must block).

    A sample is one call, or the mean of several when a call takes under
    20 ms (timer and scheduler noise). `run_rss_mb` is the peak RSS during
    the timed calls (after compiling and warming up), where the kernel
    lets the mark be reset.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    inner = 1 if first >= 0.02 else min(1000, int(0.05 / max(first, 1e-5)))
    reset = _reset_peak_rss()
    times = []

    cpu_per_wall = []

    def sample():
        c0 = time.process_time()  # every thread of this process
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        wall = time.perf_counter() - t0
        times.append(wall / inner)
        cpu_per_wall.append((time.process_time() - c0) / max(wall, 1e-9))

    if _PAIRED["on"]:
        print(READY_TAG, flush=True)
        while sys.stdin.readline().strip() == "run":
            sample()
            print(f"{TIME_TAG}{times[-1]}", flush=True)
    else:
        for _ in range(repeats):
            sample()
    out = {"median_s": statistics.median(times), "min_s": min(times),
           "runs_s": [round(t, 6) for t in times], "calls_per_run": inner,
           # Cores this process kept busy while timed: CPU seconds (all
           # its threads, spinning included) per wall second.
           "cores_used": round(statistics.median(cpu_per_wall), 3)}
    if reset:
        out["run_rss_mb"] = _peak_rss_since_reset_mb()
    return out


def _emit(cell: dict[str, Any]) -> dict[str, Any]:
    print(CELL_TAG + json.dumps(cell), flush=True)
    return cell


def _out_of_time(spec: dict, need_s: float) -> bool:
    """True when the run's time budget cannot fit `need_s` more seconds."""
    deadline = spec.get("deadline")
    return deadline is not None and time.time() + need_s > deadline


def _is_gpu(spec: dict) -> bool:
    return spec["device"] == "gpu"


def _random_bank(spec: dict, dim: int):
    import numpy as np

    rng = np.random.default_rng(7)
    s = spec["shapes"]
    bank = rng.normal(size=(s["num_fg"] + s["num_bg"], dim))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    return (bank[:s["num_fg"]].astype(np.float32),
            bank[s["num_fg"]:].astype(np.float32))


def _shapes(spec: dict) -> Shapes:
    return Shapes(**spec["shapes"])


# --- JAX side -----------------------------------------------------------------


def _jax_device_info() -> dict[str, Any]:
    import jax

    d = jax.devices()[0]
    return {"jax": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_devices": len(jax.devices()),
            "jax_device": getattr(d, "device_kind", str(d))}


def _jax_peak_mb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def _jax_config(spec: dict, batch: int, dtype: str = "float32"):
    from ssr_jax import config_defaults

    s = _shapes(spec)
    c = config_defaults.dataset_config("voc", "weclip")
    c.model.clip_path = spec["clip_path"]
    c.model.dino_path = spec["dino_path"]
    c.model.dtype = dtype
    c.model.decoder.num_layers_in = s.clip_layers - 1
    c.data.crop_size = s.crop
    c.data.max_classes_per_image = s.kmax
    if spec.get("buckets") is not None:  # --buckets; else the default
        c.data.class_slot_buckets = tuple(spec["buckets"])
    c.train.batch_size = batch
    c.train.progress = False
    c.sgc.clip_layers = s.clip_layers_attn
    c.sgc.slic_segments = s.n_segments
    c.sgc.max_segments = s.max_segments
    c.par.iters = s.par_iters
    return c


def jax_prepare(spec: dict) -> dict[str, Any]:
    """Writes the random CLIP (+ word tokenizer) and DINO snapshots and the
    JPEG dataset tree that the other workers read."""
    import jax.numpy as jnp
    from flax import nnx

    from ssr_jax import text
    from ssr_jax.models import clip as clip_lib
    from ssr_jax.models import loading, vit

    s = _shapes(spec)
    t0 = time.perf_counter()
    words = {"a", "clean", "origami", "."}
    for p in text.VOC_FG_PROMPTS + text.VOC_BG_PROMPTS:
        words.update(p.replace(",", " ").split())
    clip_dir, dino_dir = spec["clip_path"], spec["dino_path"]
    text.build_word_tokenizer(sorted(words), clip_dir)
    with open(os.path.join(clip_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    eos, bos = vocab[text.EOS], vocab[text.BOS]
    cfg = clip_lib.CLIPConfig(
        vision=clip_lib.CLIPVisionConfig(
            hidden_size=s.clip_width, intermediate_size=4 * s.clip_width,
            num_hidden_layers=s.clip_layers,
            num_attention_heads=s.clip_heads, image_size=224, patch_size=16),
        text=clip_lib.CLIPTextConfig(
            vocab_size=max(s.text_vocab, len(vocab)),
            hidden_size=s.text_width, intermediate_size=4 * s.text_width,
            num_hidden_layers=s.text_layers,
            num_attention_heads=s.text_heads,
            max_position_embeddings=s.text_context, pad_token_id=eos,
            bos_token_id=bos, eos_token_id=eos),
        projection_dim=s.projection_dim)
    loading.save_clip(clip_lib.CLIP(cfg, dtype=jnp.float32,
                                    rngs=nnx.Rngs(0)), clip_dir)
    dcfg = vit.ViTConfig(hidden_size=s.dino_width,
                         num_hidden_layers=s.dino_layers,
                         num_attention_heads=s.dino_heads,
                         intermediate_size=4 * s.dino_width,
                         layer_norm_eps=1e-6, image_size=224, patch_size=16)
    loading.save_dino(vit.ViT(dcfg, rngs=nnx.Rngs(1)), dino_dir)
    write_voc_tree(spec["data_root"], s.dataset_images)
    return {"prepare_s": time.perf_counter() - t0}


def _jax_models(spec: dict, dtype: str, config):
    import jax
    from flax import nnx

    from ssr_jax import build, ssr
    from ssr_jax.models import loading

    dt = jax.numpy.bfloat16 if dtype == "bfloat16" else jax.numpy.float32
    clip = loading.load_clip(spec["clip_path"], dtype=dt)
    dino = build.load_affinity_encoder(config, dt)  # model.dino_kind
    model = ssr.SSRModel(config, clip_width=clip.vision.config.hidden_size,
                         embed_dim=clip.config.projection_dim,
                         rngs=nnx.Rngs(0))
    return clip, dino, model


def jax_pseudo_labels(spec: dict) -> dict[str, Any]:
    return {"cells": [_emit(_jax_pseudo_labels_cell(spec, dtype))
                      for dtype in spec["dtypes"]]}


def _jax_pseudo_labels_cell(spec: dict, dtype: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ssr_jax import cam, ssr

    s = _shapes(spec)
    config = _jax_config(spec, s.batch, dtype)
    clip, dino, model = _jax_models(spec, dtype, config)
    fg, bg = (jnp.asarray(x) for x in _random_bank(
        spec, clip.config.projection_dim))
    graphs, states = zip(*(nnx.split(m) for m in (clip, dino, model.heads)),
                         strict=True)
    host = shapes_batch(s)
    batch = jax.device_put({k: jnp.asarray(v) for k, v in host.items()})
    # The class-slot bucket of this batch, as train.py picks it.
    slots = cam.batch_slots(host["labels"], cam.slot_buckets(
        config.data.class_slot_buckets, config.data.max_classes_per_image))

    def fn(states, batch, fg, bg):
        c, d, h = (nnx.merge(g, st) for g, st in zip(graphs, states,
                                                      strict=True))
        path = ssr.pseudo_label_path(c, d, h, batch, fg, bg, config,
                                     slots=slots)
        return {k: path[k] for k in ("labels", "cams", "refined", "hidden",
                                     "tokens")}

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(states, batch, fg, bg).compile()
    compile_s = time.perf_counter() - t0
    timing = _timed(lambda: jax.block_until_ready(
        compiled(states, batch, fg, bg)), spec["repeats"])
    return {"dtype": dtype, "batch": s.batch, "class_slots": slots,
            "compile_s": compile_s, **timing,
            "peak_device_mb": _jax_peak_mb()}


def _jax_train_cells(spec: dict, batches: Sequence[int],
                     devices=None) -> list[dict[str, Any]]:
    import jax

    from ssr_jax import train

    s = _shapes(spec)
    cells, last = [], 0.0
    for dtype in spec["dtypes"]:
        for b in batches:
            if cells and _out_of_time(spec, 2 * last):
                cells.append(_emit({"dtype": dtype, "batch": b,
                                    "skipped": "time budget"}))
                continue
            started = time.perf_counter()
            config = _jax_config(spec, b, dtype)
            work = tempfile.mkdtemp(dir=spec["workdir"])
            setup = train.setup(config, work, devices)
            host = shapes_batch(s, b)
            batch = setup.batch(host)
            slots = setup.slots_for(host["labels"])  # as train.py does
            t0 = time.perf_counter()
            compiled = setup.update_for(slots).lower(
                setup.state, setup.frozen, batch, setup.bank).compile()
            compile_s = time.perf_counter() - t0
            box = {"state": setup.state}

            def step(compiled=compiled, setup=setup, batch=batch, box=box):
                box["state"], meas = compiled(box["state"], setup.frozen,
                                              batch, setup.bank)
                jax.block_until_ready((meas["loss"], box["state"]))

            timing = _timed(step, spec["repeats"])
            cells.append(_emit({
                "dtype": dtype, "batch": b, "devices": setup.mesh.size,
                "class_slots": slots, "compile_s": compile_s, **timing,
                "images_per_s": b / timing["median_s"],
                "peak_device_mb": _jax_peak_mb()}))
            del setup, compiled, box
            last = time.perf_counter() - started
    return cells


def jax_train_step(spec: dict) -> dict[str, Any]:
    import jax

    batches = spec.get("batches") or [_shapes(spec).batch]
    return {"cells": _jax_train_cells(spec, batches, jax.devices()[:1])}


def jax_devices(spec: dict) -> dict[str, Any]:
    import jax

    n = spec["num_devices"]
    if len(jax.devices()) < n:
        raise RuntimeError(f"{n} devices needed, {len(jax.devices())} seen")
    return {"cells": _jax_train_cells(spec, [spec["global_batch"]],
                                      jax.devices()[:n])}


def jax_segment_ops(spec: dict) -> dict[str, Any]:
    """`segment_reduce` (mean colour of 256 superpixels over B x H x W
    pixels) and the whole SGC refinement (`sgc.refine_cams`, superpixel
    mask) with one `impl`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ssr_jax import segment_ops, sgc

    s = _shapes(spec)
    impl = spec["impl"]
    p = s.crop * s.crop
    rng = np.random.default_rng(0)
    host = shapes_batch(s)
    values = jnp.asarray(host["image"].reshape(s.batch, p, 3), jnp.float32)
    ids = jnp.asarray(host["superpixels"].reshape(s.batch, p))
    h = w = s.crop // 16
    t = 1 + h * w

    def attn(*lead):
        a = rng.uniform(0, 1, (*lead, t, t)) ** 8
        return jnp.asarray(a / a.sum(-1, keepdims=True), jnp.float32)

    cams = jnp.asarray(rng.uniform(0, 1, (s.batch, s.kmax, h, w)),
                       jnp.float32)
    slot = jnp.asarray(np.arange(s.kmax)[None] < 1 + np.arange(s.batch)[
        :, None] % 3)
    clip_attn, dino_attn = attn(s.clip_layers_attn, s.batch), attn(s.batch)
    batch = {k: jnp.asarray(v) for k, v in host.items()}

    def reduce(values, ids):
        return segment_ops.segment_reduce(values, ids, s.max_segments,
                                          "mean", impl)

    def refine(cams, slot, clip_attn, dino_attn, batch):
        return sgc.refine_cams(
            cams, slot, clip_attn=clip_attn, dino_attn=dino_attn,
            image=batch["image"], superpixels=batch["superpixels"],
            valid=batch["valid"], clip_layers=s.clip_layers_attn,
            num_segments=s.max_segments, impl=impl)

    cells = []
    for what, fn, args in (
            ("segment_reduce", reduce, (values, ids)),
            ("sgc_refine", refine, (cams, slot, clip_attn, dino_attn,
                                    batch))):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        timing = _timed(lambda c=compiled, a=args: jax.block_until_ready(
            c(*a)), spec["repeats"])
        cells.append({"what": what, "impl": impl, "compile_s": compile_s,
                      **timing, "peak_device_mb": _jax_peak_mb()})
    return {"cells": cells}


def jax_eval(spec: dict) -> dict[str, Any]:
    import inspect

    from ssr_jax import evaluate

    s = _shapes(spec)
    config = _jax_config(spec, 1)
    config.data.root = spec["data_root"]
    config.data.train_split = config.data.val_split = "val"
    config.eval.crf = bool(spec["crf"])
    clip, _, model = _jax_models(spec, "float32", config)
    fn = evaluate.evaluate_segmentation
    accepted = inspect.signature(fn).parameters
    n = min(spec["eval_images"], s.dataset_images // 2)

    def run(images: int, out_dir: str):
        kwargs = {"max_images": images} if "max_images" in accepted else {}
        config.eval.max_images = images
        return fn(config, clip, model, "val", out_dir, **kwargs)

    t0 = time.perf_counter()
    run(1, tempfile.mkdtemp(dir=spec["workdir"]))  # compiles
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(n, tempfile.mkdtemp(dir=spec["workdir"]))
    total = time.perf_counter() - t0
    return {"cells": [{"crf": bool(spec["crf"]), "images": n,
                       "first_call_s": first_s, "total_s": total,
                       "images_per_s": n / total,
                       "long_side": config.eval.long_side,
                       "scales": list(config.eval.scales),
                       "flip": bool(config.eval.flip)}]}


def jax_stages(spec: dict) -> dict[str, Any]:
    """Per-stage times of the pseudo-label path and the losses, each stage
    jitted on its own (weights passed as arguments, not constants)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ssr_jax import cam as cam_lib
    from ssr_jax import cmpa, params, ssr

    s = _shapes(spec)
    config = _jax_config(spec, s.batch)
    clip, dino, model = _jax_models(spec, "float32", config)
    fg, bg = (jnp.asarray(x) for x in _random_bank(
        spec, clip.config.projection_dim))
    host = shapes_batch(s)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    sgc_params = params.method_params(config).sgc
    grid = (s.crop // 16, s.crop // 16)
    (cg, cs), (dg, ds), (mg, ms) = (nnx.split(m) for m in (clip, dino,
                                                           model))
    protos = cmpa.init_protos(s.num_fg, config.cmpa.dim, s.num_fg)

    def encoders(cs, ds, batch):
        vision = nnx.merge(cg, cs).vision
        pixels = ssr.normalise(batch["image"])
        n = len(vision.blocks)
        x11, out = vision.run_blocks(vision.embed(pixels), 0, n - 1)
        dino_aff = ssr.affinity_encoder_affinity(
            nnx.merge(dg, ds), batch["image"], grid, 16,
            config.model.dino_kind)
        return x11, out["attn"], dino_aff, out["hidden"]

    def gradcam(cs, ms, x11, batch):
        clip = nnx.merge(cg, cs)
        heads = nnx.merge(mg, ms).heads
        cls_ids = cam_lib.present_classes(batch["labels"], s.kmax)
        cams, aux = ssr.initial_cams(clip, x11, cls_ids, grid, fg, bg,
                                     config, heads)
        return cams, aux["attn12"], aux["tokens"], cls_ids

    def sgc(cams, cls_ids, attn, dino_aff, batch):
        refine = ssr.refine_fn(
            cams, cls_ids >= 0, sgc_params, clip_attn=attn,
            dino_aff=dino_aff, image=batch["image"],
            superpixels=batch["superpixels"], valid=batch["valid"])
        return refine(True, True, sgc_params.mask_kind)

    def par(refined, cls_ids, batch):
        return ssr.par_labels(refined, cls_ids, ssr.normalise(batch["image"]),
                              batch["valid"], config)

    def losses(ms, hidden, cams, tokens, cls_ids, labels):
        path = ssr.loss_inputs(jnp.stack([h[:, 1:] for h in hidden]), grid,
                               labels, cams, tokens[:, 1:], cls_ids)
        return nnx.value_and_grad(
            lambda m: ssr.loss_fn(m, path, fg, protos, config,
                                  jax.random.key(0)),
            has_aux=True)(nnx.merge(mg, ms))

    stages = {}

    def run(name, fn, *args):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        result = jax.block_until_ready(compiled(*args))
        mem = compiled.memory_analysis()
        stages[name] = {
            "compile_s": compile_s,
            "temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20,
            **_timed(lambda: jax.block_until_ready(compiled(*args)),
                     spec["repeats"])}
        return result

    x11, attn, dino_aff, hidden = run("encoders", encoders, cs, ds, batch)
    cams, attn12, tokens, cls_ids = run("gradcam", gradcam, cs, ms, x11,
                                        batch)
    refined = run("sgc", sgc, cams, cls_ids, tuple(attn) + (attn12,),
                  dino_aff, batch)
    labels = run("par", par, refined, cls_ids, batch)
    run("decoder+losses", losses, ms,
        tuple(hidden[:config.model.decoder.num_layers_in]), cams, tokens,
        cls_ids, labels)
    return {"cells": [{"stages": stages}]}


# --- PyTorch side -------------------------------------------------------------


def _torch_setup(spec: dict):
    import torch

    if not _is_gpu(spec):
        torch.set_num_threads(spec["threads"])
    return torch.device("cuda" if _is_gpu(spec) else "cpu")


def _torch_models(spec: dict, device):
    import torch
    import transformers

    from benchmarks import reference_torch as rt

    s = _shapes(spec)
    clip = transformers.CLIPModel.from_pretrained(
        spec["clip_path"], attn_implementation="eager",
        dtype=torch.float32).eval()
    rt.use_bilinear_position_embeddings(clip)
    dino = transformers.ViTModel.from_pretrained(
        spec["dino_path"], add_pooling_layer=False,
        attn_implementation="eager", dtype=torch.float32).eval()
    for p in list(clip.parameters()) + list(dino.parameters()):
        p.requires_grad_(False)
    heads = rt.CMPAHeads(s.projection_dim, 512, 256)
    decoder = rt.Decoder(num_inputs=s.clip_layers - 1,
                         input_dim=s.clip_width, num_classes=s.num_fg + 1)
    fg, bg = _random_bank(spec, s.projection_dim)
    models = rt.Models(clip=clip, dino=dino, heads=heads, decoder=decoder,
                       text_fg=torch.from_numpy(fg),
                       text_bg=torch.from_numpy(bg))
    return rt.to_device(models, device)


def _torch_cfg(spec: dict):
    from benchmarks import reference_torch as rt

    s = _shapes(spec)
    return rt.RefConfig(clip_layers=s.clip_layers_attn, par_iters=s.par_iters)


def _torch_sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _torch_peak_mb(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def _torch_reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def torch_pseudo_labels(spec: dict) -> dict[str, Any]:
    from benchmarks import reference_torch as rt

    s = _shapes(spec)
    device = _torch_setup(spec)
    models = _torch_models(spec, device)
    cfg = _torch_cfg(spec)
    batch = shapes_batch(s)
    par = rt.PAR.from_config(cfg).to(device)

    def fn():
        rt.pseudo_labels(models, batch, cfg, seeds=False, par=par)
        _torch_sync(device)

    _torch_reset_peak(device)
    timing = _timed(fn, spec["repeats"])
    return {"cells": [{"dtype": "float32", "batch": s.batch, **timing,
                       "peak_device_mb": _torch_peak_mb(device)}]}


def torch_train_step(spec: dict) -> dict[str, Any]:
    from benchmarks import reference_torch as rt

    s = _shapes(spec)
    device = _torch_setup(spec)
    cells, last = [], 0.0
    for b in spec.get("batches") or [s.batch]:
        if cells and _out_of_time(spec, 2 * last):
            cells.append(_emit({"dtype": "float32", "batch": b,
                                "skipped": "time budget"}))
            continue
        started = time.perf_counter()
        models = _torch_models(spec, device)
        step = rt.TrainStep(models, _torch_cfg(spec))
        batch = shapes_batch(s, b)
        _torch_reset_peak(device)
        timing = _timed(lambda step=step, batch=batch: step(batch),
                        spec["repeats"])
        cells.append(_emit({"dtype": "float32", "batch": b, **timing,
                            "images_per_s": b / timing["median_s"],
                            "peak_device_mb": _torch_peak_mb(device)}))
        del models, step
        last = time.perf_counter() - started
    return {"cells": cells}


def torch_stages(spec: dict) -> dict[str, Any]:
    """Per-stage times of the reference (the same stages as `jax_stages`)."""
    import torch

    from benchmarks import reference_torch as rt

    s = _shapes(spec)
    device = _torch_setup(spec)
    models = _torch_models(spec, device)
    cfg = _torch_cfg(spec)
    batch = shapes_batch(s)
    grid = (s.crop // 16, s.crop // 16)
    images = torch.as_tensor(batch["image"], device=device)
    valid = torch.as_tensor(batch["valid"], device=device)
    pixels = rt.normalize_images(images)
    cls_ids = rt.present_classes(torch.as_tensor(batch["labels"]))
    ids = [[c for c in row.tolist() if c >= 0] for row in cls_ids]
    par = rt.PAR.from_config(cfg).to(device)
    stages, keep = {}, {}

    def run(name, fn):
        def call():
            keep[name] = fn()
            _torch_sync(device)
        stages[name] = _timed(call, spec["repeats"])
        return keep[name]

    hidden, attns = run("encoders", lambda: (
        rt.clip_first_blocks(models.clip, pixels),
        rt.dino_attention(models.dino, pixels)))[0]
    d_attn = keep["encoders"][1]
    cams = run("gradcam", lambda: [
        rt.gradcam_image(models, hidden[-1][i:i + 1], ids[i], grid, cfg)
        for i in range(s.batch)])

    def sgc():
        out = []
        for i in range(s.batch):
            clusters = torch.from_numpy(rt.colour_clusters(
                batch["image"][i], batch["superpixels"][i],
                batch["valid"][i], cfg)).to(device)
            attn = [a[i] for a in attns] + [cams[i]["attn"]]
            trans = rt.compute_trans_mat(rt.fuse_affinity(
                attn, d_attn[i], True, True, cfg), cfg.sinkhorn_iters)
            out.append(torch.stack([
                rt.refine_cam(trans, c, rt.superpixel_mask(
                    c, clusters, valid[i], cfg)) for c in cams[i]["cams"]]))
        return out

    refined = run("sgc", sgc)
    labels = run("par", lambda: torch.stack([
        rt.cams_to_labels(refined[i], torch.tensor(ids[i], device=device),
                          valid[i], cfg, par, pixels[i])
        for i in range(s.batch)]))
    k = max(len(x) for x in ids)
    cam_t = torch.zeros((s.batch, k, *grid), device=device)
    for i in range(s.batch):
        cam_t[i, :len(ids[i])] = cams[i]["cams"]
    tokens = torch.stack([cams[i]["tokens"] for i in range(s.batch)])
    hid = torch.stack([x[:, 1:] for x in hidden])

    def losses():
        models.decoder.zero_grad(set_to_none=True)
        models.heads.zero_grad(set_to_none=True)
        logits = models.decoder(hid, grid)
        loss = 0.1 * rt.balanced_seg_ce(logits, labels) + rt.proto_loss(
            models.heads, tokens, cam_t, rt.present_classes(
                torch.as_tensor(batch["labels"]), k), models.text_fg)
        loss.backward()
        return loss

    run("decoder+losses", losses)
    return {"cells": [{"stages": stages}]}


# --- data: a VOC-layout tree of realistic JPEGs and the input pipeline -------


def write_voc_tree(root: str, num_images: int, hw=(375, 500),
                   seed: int = 0) -> str:
    """`num_images` 375x500 JPEGs (quality 90) with masks, VOC layout.

    Smooth random backgrounds with 1-3 filled ellipses of VOC classes (so
    SLIC and JPEG decoding see natural-ish content); half train, half val.
    """
    import numpy as np
    import scipy.ndimage
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = hw
    for sub in ("JPEGImages", "SegmentationClassAug",
                os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    names = []
    yy, xx = np.mgrid[:h, :w]
    for i in range(num_images):
        name = f"bench_{i:05d}"
        coarse = rng.uniform(0, 255, (h // 25 + 2, w // 25 + 2, 3))
        img = scipy.ndimage.zoom(coarse, (25, 25, 1), order=1)[:h, :w]
        mask = np.zeros((h, w), np.uint8)
        for _ in range(1 + i % 3):
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            cls = int(rng.integers(1, 21))
            img[inside] = rng.uniform(0, 255, 3)
            mask[inside] = cls
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(
            os.path.join(root, "JPEGImages", name + ".jpg"), quality=90)
        Image.fromarray(mask).save(
            os.path.join(root, "SegmentationClassAug", name + ".png"))
        names.append(name)
    half = max(1, num_images // 2)
    lists = {"train": names[:half], "val": names[half:] or names[:1]}
    for split, ids in lists.items():
        with open(os.path.join(root, "ImageSets", "Segmentation",
                               split + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return root


def pipeline_rates(spec: dict) -> dict[str, Any]:
    """Images/s of the training iterator: folders with per-crop SLIC and
    with the SLIC cache, and the TFDS source (`benchmarks/input_pipeline.py`
    runs the same cells on its own, pinned to chosen cores)."""
    from benchmarks import input_pipeline as bench_pipeline

    s = _shapes(spec)
    cells = bench_pipeline.rates(
        spec["data_root"], spec["workdir"], n_train=s.dataset_images // 2,
        crop=s.crop, batch=s.batch, workers=spec["workers"],
        n_segments=s.n_segments, max_segments=s.max_segments,
        build_workers=spec["workers"])
    return {"cells": cells}


WORKERS = {
    ("prepare", "jax"): jax_prepare,
    ("pseudo_labels", "jax"): jax_pseudo_labels,
    ("pseudo_labels", "torch"): torch_pseudo_labels,
    ("train_step", "jax"): jax_train_step,
    ("train_step", "torch"): torch_train_step,
    ("segment_ops", "jax"): jax_segment_ops,
    ("devices_1_vs_8", "jax"): jax_devices,
    ("input_pipeline", "data"): pipeline_rates,
    ("eval", "jax"): jax_eval,
    ("stages", "jax"): jax_stages,
    ("stages", "torch"): torch_stages,
}


def _pin(cpus: Sequence[int] | None) -> list[int]:
    """Pins this process (and every thread it starts later) to `cpus`.

    Called before jax or torch is imported, so XLA's and OpenMP's thread
    pools inherit the CPU set: both sides of a ratio then run on the same
    cores whatever their thread flags do (XLA:CPU keeps ~20 threads busy
    with `--xla_cpu_multi_thread_eigen=false`; affinity, not flags, is
    what bounds it).
    """
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    return sorted(os.sched_getaffinity(0))


def worker_main(spec: dict) -> None:
    """Runs one cell in this (child) process; prints the result line."""
    result: dict[str, Any] = {}
    affinity = _pin(spec.get("cpus"))
    load = os.getloadavg()[0]
    _PAIRED["on"] = bool(spec.get("paired"))
    try:
        fn = WORKERS[(spec["row"], spec["side"])]
        result = fn(spec)
        # Other processes on the machine skew the times: keep the 1-minute
        # load average before and after the cell.
        result["loadavg_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        if spec["side"] == "jax":
            result.update(_jax_device_info())
        elif spec["side"] == "torch":
            import torch

            result.update(torch=torch.__version__,
                          torch_threads=torch.get_num_threads())
            if _is_gpu(spec):
                result["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # reported in the row, the run goes on
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"[:2000]}
    result["peak_rss_mb"] = _rss_mb()
    result["affinity"] = affinity
    print(RESULT_TAG + json.dumps(result), flush=True)


def smoke(workdir: str) -> int:
    """Tiny encoders -> `train.setup` -> one compiled train step, here."""
    import jax

    enc = os.path.join(workdir, "enc")
    spec = {"shapes": dataclasses.asdict(SMOKE), "device": "cpu",
            "repeats": 1, "threads": 1, "workdir": workdir,
            "clip_path": os.path.join(enc, "clip"),
            "dino_path": os.path.join(enc, "dino"),
            "data_root": os.path.join(workdir, "voc"),
            "dtypes": ["float32"]}
    t0 = time.perf_counter()
    try:
        jax_prepare(spec)
        cell = _jax_train_cells(spec, [SMOKE.batch], jax.devices()[:1])[0]
    except Exception:
        traceback.print_exc()
        print("smoke test FAILED: ssr_jax does not train with these "
              "packages")
        return 1
    print(f"smoke test passed in {time.perf_counter() - t0:.0f} s "
          f"(train step compiled in {cell['compile_s']:.1f} s, "
          f"{cell['median_s'] * 1e3:.0f} ms per step)")
    return 0


# --- the parent: one subprocess per cell ------------------------------------


class Runner:
    """Starts the worker subprocesses and keeps the time budget."""

    def __init__(self, args, shapes: Shapes, workdir: str):
        self.args = args
        self.shapes = shapes
        self.workdir = workdir
        self.deadline = (time.monotonic() + args.budget_s if args.budget_s
                         else None)
        self.log = open(os.path.join(workdir, "workers.log"), "a")
        enc = os.path.join(workdir, "enc")
        self.base = {
            "shapes": dataclasses.asdict(shapes), "device": args.device,
            "repeats": args.repeats, "threads": args.threads,
            "workdir": workdir, "clip_path": os.path.join(enc, "clip"),
            "dino_path": os.path.join(enc, "dino"),
            "data_root": os.path.join(workdir, "voc"),
            "dtypes": args.dtypes, "cpus": args.cpus,
            "buckets": getattr(args, "buckets", None),
        }

    def prepare(self) -> dict[str, Any]:
        """Random weights and the JPEG tree, reused when the scratch
        directory already holds them for these shapes."""
        stamp = os.path.join(self.workdir, "prepared.json")
        want = dataclasses.asdict(dataclasses.replace(self.shapes, kmax=6))
        if os.path.exists(stamp):
            with open(stamp) as f:
                if json.load(f) == want:
                    return {"prepare_s": 0.0, "reused": True}
        result = self.cell("prepare", "jax")
        if "error" not in result:
            with open(stamp, "w") as f:
                json.dump(want, f)
        return result

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()

    def env(self, side: str, num_devices: int = 1) -> dict[str, str]:
        env = dict(os.environ)
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       env.get("XLA_FLAGS", "")).strip()
        if num_devices > 1:
            flags += f" --xla_force_host_platform_device_count={num_devices}"
        if (side == "jax" and self.args.device == "cpu"
                and self.args.threads == 1):
            flags += (" --xla_cpu_multi_thread_eigen=false"
                      " intra_op_parallelism_threads=1")
        env["XLA_FLAGS"] = flags.strip()
        if not env["XLA_FLAGS"]:
            del env["XLA_FLAGS"]
        if self.args.device == "cpu" or side in ("data", "prepare"):
            env["JAX_PLATFORMS"] = "cpu"
        else:
            env.pop("JAX_PLATFORMS", None)
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        env["PYTHONPATH"] = os.pathsep.join(
            [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                      if p])
        return env

    def cell(self, row: str, side: str, num_devices: int = 1,
             **extra) -> dict[str, Any]:
        spec = dict(self.base, row=row, side=side, num_devices=num_devices,
                    **extra)
        left = self.remaining()
        if left is not None and left < 30:
            return {"skipped": "time budget used up"}
        if left is not None:
            spec["deadline"] = time.time() + left - 15
        timeout = self.args.cell_timeout_s
        if left is not None:
            timeout = min(timeout, left)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker",
               json.dumps(spec)]
        prep_side = "prepare" if row == "prepare" else side
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=self.env(prep_side, num_devices),
                                  capture_output=True, text=True,
                                  timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired as e:
            self._log(row, side, e.stdout, e.stderr)
            return self._partial(e.stdout,
                                 f"timed out after {timeout:.0f} s")
        self._log(row, side, proc.stdout, proc.stderr)
        lines = [x for x in proc.stdout.splitlines()
                 if x.startswith(RESULT_TAG)]
        if not lines:
            tail = (proc.stderr or "").strip().splitlines()[-5:]
            return self._partial(proc.stdout,
                                 f"worker exited {proc.returncode}: "
                                 + " | ".join(tail))
        result = json.loads(lines[-1][len(RESULT_TAG):])
        result["wall_s"] = time.perf_counter() - t0
        return result

    def paired(self, row: str, sides: Sequence[tuple[str, dict]]
               ) -> list[dict[str, Any]]:
        """Both sides of a row, warm in two processes, taking turns.

        Each process compiles and warms up alone (the other waits or is not
        started yet), then the parent asks them for one timed call each, in
        alternating order, `--repeats` rounds.
        """
        procs = []
        for side, extra in sides:
            spec = dict(self.base, row=row, side=side, paired=True, **extra)
            err = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker",
                 json.dumps(spec)], env=self.env(side), cwd=ROOT, text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
            out = self._read_until(proc, READY_TAG)
            procs.append((side, proc, err, out))
        ready = [p for p in procs if p[3][-1:] == [READY_TAG]]
        if len(ready) == len(procs):
            for r in range(self.args.repeats):
                order = procs if r % 2 == 0 else procs[::-1]
                for _, proc, _, out in order:
                    time.sleep(0.3)  # let the other side's threads idle
                    proc.stdin.write("run\n")
                    proc.stdin.flush()
                    out += self._read_until(proc, TIME_TAG)
        results = []
        for side, proc, err, out in procs:
            try:
                rest, _ = proc.communicate("stop\n", timeout=600)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                proc.kill()
                rest = ""
            err.seek(0)
            stderr = err.read()
            err.close()
            stdout = "\n".join(out) + "\n" + (rest or "")
            self._log(row, side + " (paired)", stdout, stderr)
            lines = [x for x in stdout.splitlines()
                     if x.startswith(RESULT_TAG)]
            if lines:
                results.append(json.loads(lines[-1][len(RESULT_TAG):]))
            else:
                tail = " | ".join(stderr.strip().splitlines()[-5:])
                results.append(self._partial(
                    stdout, f"worker exited {proc.returncode}: {tail}"))
        return results

    @staticmethod
    def _read_until(proc, tag: str) -> list[str]:
        """stdout lines up to the first one starting with `tag` (or EOF)."""
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(tag):
                break
        return lines

    @staticmethod
    def _partial(stdout, error: str) -> dict[str, Any]:
        """The cells a worker finished before it died, and why it died."""
        if isinstance(stdout, bytes):
            stdout = stdout.decode(errors="replace")
        cells = [json.loads(x[len(CELL_TAG):])
                 for x in (stdout or "").splitlines()
                 if x.startswith(CELL_TAG)]
        return {"cells": cells, "error": error} if cells else {
            "error": error}

    def _log(self, row, side, out, err) -> None:
        def text(x):
            return x.decode(errors="replace") if isinstance(x, bytes) else (
                x or "")
        self.log.write(f"===== {row} / {side}\n{text(out)}\n{text(err)}\n")
        self.log.flush()


def _first(result: dict, **match) -> dict | None:
    for c in result.get("cells", []):
        if all(c.get(k) == v for k, v in match.items()):
            return c
    return None


def _side_summary(result: dict, cell: dict | None) -> dict[str, Any]:
    """One cell of a worker's result plus the process-wide facts."""
    if cell is None and ("error" in result or "skipped" in result):
        return {k: result[k] for k in ("error", "skipped") if k in result}
    out = dict(cell or {})
    for key in ("peak_rss_mb", "gpu", "jax_device", "jax_backend",
                "torch_threads", "loadavg_1m", "affinity"):
        if result.get(key) is not None:
            out[key] = result[key]
    return out


def _jax_and_peer(r: Runner, row: str, **extra
                  ) -> tuple[dict[str, dict], dict]:
    """ssr_jax cells, one subprocess per dtype (its own peak memory and
    failure), and the peer's; the first dtype and the peer go first, so a
    time budget cuts the least important cells."""
    dtypes = r.base["dtypes"]
    if r.args.paired:
        jx0, peer = r.paired(row, [("jax", dict(extra, dtypes=dtypes[:1])),
                                   ("torch", extra)])
        jx = {dtypes[0]: jx0}
    else:
        jx = {dtypes[0]: r.cell(row, "jax", dtypes=dtypes[:1], **extra)}
        peer = r.cell(row, "torch", **extra)
    for dtype in dtypes[1:]:
        jx[dtype] = r.cell(row, "jax", dtypes=[dtype], **extra)
    return jx, peer


def row_pseudo_labels(r: Runner) -> dict[str, Any]:
    s = r.shapes
    jx, th = _jax_and_peer(r, "pseudo_labels")
    row = {"name": "pseudo_labels",
           "settings": {**s.describe(), "what": "CAM + SGC + PAR for a "
                        "batch: jit(ssr.pseudo_label_path) vs "
                        "reference_torch.pseudo_labels(seeds=False)"}}
    cells = []
    for dtype, res in jx.items():
        jc = _side_summary(res, _first(res, dtype=dtype))
        tc = _side_summary(th, _first(th))
        cells.append(_mark_cores({"dtype": dtype, "ssr_jax": jc,
                                  "peer": tc, "ratio": _ratio(tc, jc)}))
    row["cells"] = cells
    row.update(_headline(cells[0]))
    return _goal(row)


def row_train_step(r: Runner, batches: Sequence[int] | None = None
                   ) -> dict[str, Any]:
    s = r.shapes
    batches = list(batches or [s.batch])
    jx, th = _jax_and_peer(r, "train_step", batches=batches)
    cells = []
    for dtype, res in jx.items():
        for b in batches:
            jc = _side_summary(res, _first(res, dtype=dtype, batch=b))
            tc = _side_summary(th, _first(th, batch=b))
            cell = {"dtype": dtype, "batch": b, "ssr_jax": jc, "peer": tc,
                    "ratio": _ratio(tc, jc)}
            if r.args.device == "gpu" and b == 4:
                for side in ("ssr_jax", "peer"):
                    t = cell[side].get("median_s")
                    if t:
                        cell[side]["projected_30k_h"] = ITERATIONS * t / 3600
            cells.append(_mark_cores(cell))
    row = {"name": "train_step",
           "settings": {**s.describe(), "batches": batches,
                        "what": "one iteration (pseudo labels, decoder, "
                                "L_proto + 0.1 L_seg, backward, AdamW): "
                                "train.Setup.update vs "
                                "reference_torch.TrainStep"},
           "cells": cells}
    row.update(_headline(cells[0]))
    return _goal(row)


def row_segment_ops(r: Runner) -> dict[str, Any]:
    s = r.shapes
    seg = r.cell("segment_ops", "jax", impl="segment")
    one = r.cell("segment_ops", "jax", impl="onehot")
    cells = []
    for what in ("segment_reduce", "sgc_refine"):
        jc = _side_summary(seg, _first(seg, what=what))
        pc = _side_summary(one, _first(one, what=what))
        cells.append({"what": what, "ssr_jax": jc, "peer": pc,
                      "ratio": _ratio(pc, jc, cores=False)})
    row = {"name": "segment_ops",
           "settings": {"values": f"[{s.batch}, {s.crop}*{s.crop}, 3] "
                                  "pixel colours (SLIC ids)",
                        "segments": s.max_segments, "op": "mean",
                        "sgc_refine": "sgc.refine_cams, superpixel mask, "
                                      f"{s.kmax} class slots, CLIP + DINO",
                        "what": 'impl "segment" (ssr_jax default) vs '
                                '"onehot" (peer)'},
           "cells": cells}
    row.update(_headline(cells[0]))
    return _goal(row)


def row_devices(r: Runner) -> dict[str, Any]:
    s = r.shapes
    if r.args.device != "cpu":
        return {"name": "devices_1_vs_8",
                "skipped": "fake host devices are a CPU feature"}
    gb = 8
    one = r.cell("devices_1_vs_8", "jax", num_devices=1, global_batch=gb)
    eight = r.cell("devices_1_vs_8", "jax", num_devices=8, global_batch=gb)
    c1 = _side_summary(one, _first(one))
    c8 = _side_summary(eight, _first(eight))
    row = {"name": "devices_1_vs_8",
           "settings": {**s.describe(), "global_batch": gb,
                        "what": "train.Setup.update, same global batch, 1 "
                                "vs 8 fake CPU devices (XLA_FLAGS="
                                "--xla_force_host_platform_device_count=8)"},
           "one_device": c1, "eight_devices": c8}
    if c1.get("median_s") and c8.get("median_s"):
        row["overhead"] = c8["median_s"] / c1["median_s"] - 1.0
    return _goal(row)


def row_input_pipeline(r: Runner, step_row: dict | None) -> dict[str, Any]:
    s = r.shapes
    res = r.cell("input_pipeline", "data", workers=r.args.workers)
    row = {"name": "input_pipeline",
           "settings": {"images": f"{s.dataset_images // 2} generated "
                                  "375x500 JPEGs (quality 90)",
                        "crop": s.crop, "batch": s.batch,
                        "workers": r.args.workers,
                        "slic": f"n_segments {s.n_segments}",
                        "what": "input_pipeline.train_iterator images/s "
                                "(decode, augment, SLIC) vs the train "
                                "step's images/s"}}
    if "error" in res or "skipped" in res or "cells" not in res:
        row["error" if "error" in res else "skipped"] = res.get(
            "error", res.get("skipped", "no result"))
        return row
    row["cells"] = res["cells"]
    row["peak_rss_mb"] = res.get("peak_rss_mb")
    step = None
    if step_row and step_row.get("ssr_jax", {}).get("images_per_s"):
        step = step_row["ssr_jax"]["images_per_s"]
    row["step_images_per_s"] = step
    if step:
        for c in row["cells"]:
            if "images_per_s" in c:
                c["ratio_to_step"] = c["images_per_s"] / step
    return _goal(row)


def row_eval(r: Runner) -> dict[str, Any]:
    row = {"name": "eval",
           "settings": {"what": "ssr_jax.evaluate.evaluate_segmentation "
                                "images/s (scales 1.0, 0.75 x flip, long "
                                "side 512), CRF off and on",
                        "images": "375x500 generated JPEGs"}}
    if importlib.util.find_spec("ssr_jax.evaluate") is None:
        row["skipped"] = "evaluate not available"
        return row
    cells = []
    for crf in (False, True):
        if crf and importlib.util.find_spec("pydensecrf") is None:
            cells.append({"crf": True,
                          "skipped": "pydensecrf not importable"})
            continue
        res = r.cell("eval", "jax", crf=crf, eval_images=r.args.eval_images)
        cells.append(_side_summary(res, _first(res)) | {"crf": crf})
    row["cells"] = cells
    return row


def row_stages(r: Runner) -> dict[str, Any]:
    jx = r.cell("stages", "jax")
    th = r.cell("stages", "torch")
    row = {"name": "stages", "settings": {
        **r.shapes.describe(),
        "what": "each stage jitted / run on its own, median time"}}
    js = (_first(jx) or {}).get("stages", {})
    ts = (_first(th) or {}).get("stages", {})
    if "error" in jx or "error" in th:
        row["error"] = jx.get("error") or th.get("error")
    row["stages"] = {name: {"ssr_jax_s": js.get(name, {}).get("median_s"),
                            "ssr_jax_compile_s": js.get(name, {}).get(
                                "compile_s"),
                            "ssr_jax_temp_mb": js.get(name, {}).get(
                                "temp_mb"),
                            "peer_s": ts.get(name, {}).get("median_s")}
                     for name in dict.fromkeys(list(js) + list(ts))}
    return row


# Two sides whose measured core use differs by more than this are not a
# fair comparison: the row is marked invalid and its ratio not reported.
CORES_TOLERANCE = 0.10


def _equal_cores(peer: dict, mine: dict) -> str | None:
    """None when both sides used the same cores, else why not."""
    a, b = mine.get("cores_used"), peer.get("cores_used")
    if mine.get("affinity") != peer.get("affinity"):
        return (f"different CPU sets: ssr_jax {mine.get('affinity')}, "
                f"peer {peer.get('affinity')}")
    if a is None or b is None:
        return None  # GPU rows and rows timed without _timed
    if abs(a - b) > CORES_TOLERANCE * max(a, b):
        return (f"unequal cores used: ssr_jax {a:.2f}, peer {b:.2f} CPU-s "
                "per wall-s")
    return None


def _ratio(peer: dict, mine: dict, cores: bool = True) -> float | None:
    """peer time / ssr_jax time, None when the sides are not comparable.

    `cores=False` checks only that both ran on the same CPU set: for two
    implementations inside ssr_jax (segment_ops) neither side can use more
    cores than the pinned set, and what `cores_used` then measures is the
    share of the set other processes left each, i.e. load, not the code.
    """
    if peer.get("median_s") and mine.get("median_s"):
        why = _equal_cores(peer, mine)
        if why is not None and (cores or why.startswith("different CPU")):
            return None
        return peer["median_s"] / mine["median_s"]
    return None


def _mark_cores(cell: dict) -> dict:
    """Records in the cell why its ratio is withheld, if it is."""
    why = None
    if cell["ssr_jax"].get("median_s") and cell["peer"].get("median_s"):
        why = _equal_cores(cell["peer"], cell["ssr_jax"])
    if why:
        cell["invalid"] = why
    return cell


def _headline(cell: dict) -> dict[str, Any]:
    return {k: cell[k] for k in ("ssr_jax", "peer", "ratio", "invalid")
            if k in cell}


def _goal(row: dict) -> dict:
    name = row["name"]
    if name not in GOALS:
        return row
    what, thr = GOALS[name]
    row["goal"] = what
    met = None
    if name == "devices_1_vs_8" and row.get("overhead") is not None:
        met = row["overhead"] <= thr
    elif name == "input_pipeline" and row.get("step_images_per_s"):
        met = all(c["ratio_to_step"] >= thr for c in row["cells"]
                  if "ratio_to_step" in c)
    elif row.get("ratio") is not None:
        met = row["ratio"] >= thr
        if name == "train_step":
            # Memory while training: the peak RSS over the timed steps
            # (after compiling), else the whole process's.
            a = (row["ssr_jax"].get("run_rss_mb")
                 or row["ssr_jax"].get("peak_rss_mb"))
            b = row["peer"].get("run_rss_mb") or row["peer"].get(
                "peak_rss_mb")
            dev_a = row["ssr_jax"].get("peak_device_mb")
            dev_b = row["peer"].get("peak_device_mb")
            if dev_a is not None and dev_b is not None:
                met = met and dev_a <= dev_b
            elif a and b:
                met = met and a <= b
    row["met"] = met
    return row


# --- output -------------------------------------------------------------------


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _fmt_mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} MiB"


def _side_text(side: dict) -> str:
    if not side:
        return "-"
    if "error" in side or "skipped" in side:
        return side.get("error") or side.get("skipped")
    parts = [_fmt_s(side.get("median_s"))]
    if side.get("cores_used") is not None:
        parts.append(f"{side['cores_used']:.2f} cores")
    if side.get("compile_s") is not None:
        parts.append(f"compile {side['compile_s']:.1f} s")
    if side.get("peak_device_mb") is not None:
        parts.append(f"dev {_fmt_mb(side['peak_device_mb'])}")
    if side.get("projected_30k_h") is not None:
        parts.append(f"30k steps {side['projected_30k_h']:.2f} h")
    if side.get("peak_rss_mb") is not None:
        rss = f"RSS {_fmt_mb(side['peak_rss_mb'])}"
        if side.get("run_rss_mb") is not None:
            rss += f" (timed calls {_fmt_mb(side['run_rss_mb'])})"
        parts.append(rss)
    return ", ".join(parts)


def table(rows: list[dict]) -> str:
    """Markdown table: one line per row (and per GPU cell)."""
    lines = ["| benchmark | setting | ssr_jax | peer | ratio | goal |",
             "|---|---|---|---|---|---|"]

    def goal(row):
        if "goal" not in row:
            return ""
        mark = {True: "met", False: "MISSED", None: "?"}[row.get("met")]
        return f"{row['goal']}: {mark}"

    for row in rows:
        name = row["name"]
        if "skipped" in row or ("error" in row and "cells" not in row):
            lines.append(f"| {name} | | {row.get('skipped') or row['error']}"
                         " | | | |")
            continue
        if name == "segment_ops":
            for c in row["cells"]:
                setting = (f"{row['settings']['values']} -> "
                           f"{row['settings']['segments']}"
                           if c["what"] == "segment_reduce"
                           else row["settings"]["sgc_refine"])
                lines.append(
                    f"| {name}: {c['what']} | {setting} | segment: "
                    f"{_side_text(c['ssr_jax'])} | onehot: "
                    f"{_side_text(c['peer'])} | "
                    f"{_fmt_x(c.get('ratio'), c.get('invalid'))} | "
                    f"{goal(row) if c is row['cells'][0] else ''} |")
        elif name == "devices_1_vs_8":
            ov = row.get("overhead")
            lines.append(
                f"| {name} | global batch {row['settings']['global_batch']}"
                f" | 8 devices: {_side_text(row['eight_devices'])} | "
                f"1 device: {_side_text(row['one_device'])} | "
                f"overhead {'-' if ov is None else f'{ov:+.1%}'} | "
                f"{goal(row)} |")
        elif name == "input_pipeline":
            for c in row["cells"]:
                if "skipped" in c:
                    lines.append(f"| {name} ({c['mode']}) | | skipped: "
                                 f"{c['skipped']} | | | |")
                    continue
                extra = ""
                if "build_s" in c:
                    extra = f" (built once in {c['build_s']:.1f} s)"
                if "first_epoch_images_per_s" in c:
                    extra = (f" (first epoch, writing the cache: "
                             f"{c['first_epoch_images_per_s']:.1f})")
                step = row.get("step_images_per_s")
                lines.append(
                    f"| {name} ({c['mode']}) | crop {row['settings']['crop']}"
                    f", {c['workers']} threads | {c['images_per_s']:.1f} "
                    f"images/s{extra} | train step: "
                    f"{'-' if not step else f'{step:.1f} images/s'} | "
                    f"{_fmt_x(c.get('ratio_to_step'))} | {goal(row)} |")
        elif name == "eval":
            for c in row["cells"]:
                txt = c.get("skipped") or c.get("error") or (
                    f"{c['images_per_s']:.2f} images/s ({c['images']} "
                    f"images, first call {c['first_call_s']:.1f} s)")
                lines.append(f"| eval (CRF {'on' if c['crf'] else 'off'}) |"
                             f" | {txt} | | | |")
        elif name == "stages":
            for stage, v in row["stages"].items():
                temp = v.get("ssr_jax_temp_mb")
                temp = "" if temp is None else f", XLA temp {temp:.0f} MiB"
                lines.append(
                    f"| stage: {stage} | | {_fmt_s(v['ssr_jax_s'])}{temp} | "
                    f"{_fmt_s(v['peer_s'])} | "
                    f"{_fmt_x(_ratio({'median_s': v['peer_s']}, {'median_s': v['ssr_jax_s']}))}"  # noqa: E501
                    " | |")
        else:
            for c in row["cells"]:
                setting = f"batch {c.get('batch', row['settings']['batch'])}"
                setting += f", crop {row['settings']['crop']}, {c['dtype']}"
                lines.append(
                    f"| {name} | {setting} | {_side_text(c['ssr_jax'])} | "
                    f"{_side_text(c['peer'])} | "
                    f"{_fmt_x(c.get('ratio'), c.get('invalid'))} | "
                    f"{goal(row) if c is row['cells'][0] else ''} |")
    return "\n".join(lines)


def _fmt_x(x: float | None, invalid: str | None = None) -> str:
    if invalid:
        return f"INVALID ({invalid})"
    return "-" if x is None else f"{x:.2f}x"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("jax", "jaxlib", "flax", "torch", "transformers", "numpy"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # a missing package is reported, not fatal
            out[mod] = "missing"
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="small shapes (named in each row); <= 5 min on 2 "
                        "cores")
    p.add_argument("--json", default="", help="write the rows here")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated subset of {', '.join(ALL_ROWS)}")
    p.add_argument("--repeats", type=int, default=0,
                   help="timed calls per cell (default 3 quick/CPU, 5 GPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per side: 1 = torch.set_num_threads(1) "
                        "and single-threaded XLA (the default: robust on a "
                        "shared machine); N > 1 = torch N threads and XLA's "
                        "default (every core)")
    p.add_argument("--cpus", default="",
                   help="CPU set both sides are pinned to (sched_setaffinity "
                        "in each worker, before jax/torch load), e.g. 1 or "
                        "0,1; default on CPU: the last --threads usable "
                        "cores; on GPU: not pinned")
    p.add_argument("--workers", type=int, default=4,
                   help="input-pipeline threads (data.num_workers)")
    p.add_argument("--dtypes", default="",
                   help="ssr_jax encoder dtypes (default float32; GPU "
                        "float32,bfloat16)")
    p.add_argument("--batches", default="",
                   help="train-step batch sizes (default: the mode's; GPU "
                        "4,8,16)")
    p.add_argument("--kmax", type=int, default=0,
                   help="class slots of the jitted path (data."
                        "max_classes_per_image; default 6, VOC's maximum)")
    p.add_argument("--buckets", default=None,
                   help="data.class_slot_buckets of the JAX side, e.g. "
                        "1,2,3,6 (the default); 'kmax' = always --kmax "
                        "slots (the padded path before issue 15)")
    p.add_argument("--eval-images", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="stop starting cells after this many seconds")
    p.add_argument("--cell-timeout-s", type=float, default=1800.0)
    p.add_argument("--workdir", default="",
                   help="scratch directory (default: a new temp dir)")
    p.add_argument("--paired", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="time pseudo_labels and train_step with both sides "
                        "warm in two processes taking turns (default on "
                        "CPU, where other processes may load the machine)")
    p.add_argument("--smoke", action="store_true",
                   help="only check that ssr_jax trains here: tiny "
                        "encoders, one jitted train step, in this process")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if args.smoke:
        return smoke(args.workdir or tempfile.mkdtemp(prefix="ssr_smoke_"))
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ALL_ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ALL_ROWS)}")
    if not args.repeats:
        args.repeats = 5 if args.device == "gpu" else 3
    gpu = args.device == "gpu"
    if args.paired is None:
        args.paired = not gpu
    args.dtypes = [d.strip() for d in (
        args.dtypes or ("float32,bfloat16" if gpu else "float32")).split(",")]
    bad = sorted(set(args.dtypes) - {"float32", "bfloat16"})
    if bad:
        p.error(f"--dtypes {bad}: use float32 and/or bfloat16")
    args.batches = [int(b) for b in (
        args.batches or (",".join(map(str, GPU_BATCHES)) if gpu else "")
    ).split(",") if b.strip()]
    usable = sorted(os.sched_getaffinity(0))
    if args.cpus:
        try:
            args.cpus = sorted({int(c) for c in args.cpus.split(",")
                                if c.strip()})
        except ValueError:
            p.error(f"--cpus {args.cpus!r}: a comma-separated list of CPU "
                    "numbers, e.g. 0,1")
        if not set(args.cpus) <= set(usable):
            p.error(f"--cpus {args.cpus}: this process may use {usable}")
    elif gpu:
        args.cpus = None
    else:
        if args.threads > len(usable):
            p.error(f"--threads {args.threads}: only {len(usable)} usable "
                    "cores here")
        args.cpus = usable[-args.threads:]
    if args.cpus and len(args.cpus) < args.threads:
        p.error(f"--threads {args.threads} on --cpus {args.cpus}: give at "
                "least as many CPUs as threads")
    shapes = QUICK if args.quick else FULL
    if args.kmax:
        shapes = dataclasses.replace(shapes, kmax=args.kmax)
    if args.buckets is not None:
        try:
            args.buckets = ([] if args.buckets.strip() == "kmax" else
                            [int(b) for b in args.buckets.split(",")
                             if b.strip()])
        except ValueError:
            p.error(f"--buckets {args.buckets!r}: comma-separated slot "
                    "counts, e.g. 1,2,3,6, or 'kmax'")
        if any(b < 1 for b in args.buckets):
            p.error(f"--buckets {args.buckets}: counts must be >= 1")
    workdir = args.workdir or tempfile.mkdtemp(prefix="ssr_bench_")
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    runner = Runner(args, shapes, workdir)
    xla = "1 thread" if args.threads == 1 else "default threads"
    print(f"ssr_jax benchmarks: mode {shapes.name}, device {args.device}, "
          f"torch threads {args.threads}, XLA {xla}, both sides pinned to "
          f"CPUs {args.cpus or 'all'}; scratch {workdir} "
          "(worker logs in workers.log)", flush=True)
    prep = (runner.prepare() if set(rows) - {"segment_ops"}
            else {"prepare_s": 0.0})
    if "error" in prep:
        print(f"preparing the random weights failed: {prep['error']}")
        return 1
    results: list[dict] = []
    step_row = None
    for name in rows:
        t0 = time.perf_counter()
        if name == "pseudo_labels":
            row = row_pseudo_labels(runner)
        elif name == "train_step":
            row = row_train_step(runner, args.batches)
            step_row = row
        elif name == "segment_ops":
            row = row_segment_ops(runner)
        elif name == "devices_1_vs_8":
            row = row_devices(runner)
        elif name == "input_pipeline":
            row = row_input_pipeline(runner, step_row)
        elif name == "eval":
            row = row_eval(runner)
        else:
            row = row_stages(runner)
        row["row_wall_s"] = time.perf_counter() - t0
        results.append(row)
        print(f"  {name}: {row['row_wall_s']:.0f} s", flush=True)
        if args.json:  # partial results survive a later crash or kill
            with open(args.json, "w") as f:
                json.dump({"meta": {"partial": True}, "rows": results}, f,
                          indent=1)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [
            "python", "benchmarks/run.py", *(argv if argv is not None
                                             else sys.argv[1:])]),
        "mode": shapes.name, "device": args.device,
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch_threads": args.threads,
        "xla_threads": 1 if args.threads == 1 else "default (every core)",
        "cpus": args.cpus, "cores_tolerance": CORES_TOLERANCE,
        "repeats": args.repeats, "shapes": dataclasses.asdict(shapes),
        "class_slot_buckets": ("config default" if args.buckets is None
                               else args.buckets or "kmax"),
        "versions": _versions(), "total_s": time.perf_counter() - started,
        "prepare_s": prep.get("prepare_s"),
    }
    gpu = next((c.get("peer", {}).get("gpu") for r in results
                for c in r.get("cells", []) if isinstance(c, dict)
                and isinstance(c.get("peer"), dict)), None)
    if gpu:
        meta["gpu"] = gpu
    print()
    print(f"{meta['date']}, {meta['cpu']} ({meta['usable_cores']} usable "
          f"cores), mode {shapes.name}, device {args.device}")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": results}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
