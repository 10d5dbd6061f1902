r"""Input-pipeline throughput: folders (per-crop SLIC, SLIC cache) vs TFDS.

    python benchmarks/input_pipeline.py --images 64 --workers 2 \
        --cpus 0,1 [--crop 320 --batch 8] [--json out.json]

writes `--images` generated 375x500 JPEGs with masks (VOC layout, as
`benchmarks/run.py`), builds them as a TFDS dataset (`python -m
ssr_jax.data.build`'s code, `--build-workers` processes, build time
recorded), and times `input_pipeline.train_iterator` over whole epochs for
each source with the same `data.num_workers` threads, in this one process
pinned to `--cpus` (`os.sched_setaffinity`; default: the cores it has), so
every source runs under equal CPU affinity:

- `per_crop`: folders, SLIC on every crop (`sgc.slic_cache=False`);
- `cache`: folders, SLIC cache: the first epoch computes it, later epochs
  read it (both rates reported);
- `tfds`: `data.source="tfds"`, superpixels stored at build time.

Each cell reports images/s and images/s per core (divided by the number of
cores in the affinity set). The `input_pipeline` row of `benchmarks/run.py`
runs the same cells (`rates`). On a shared machine the figures are
indicative; compare sources within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MODES = ("per_crop", "cache", "tfds")


def _config(root: str, workdir: str, crop: int, batch: int, workers: int,
            n_segments: int, max_segments: int):
    from ssr_jax import config_defaults

    c = config_defaults.dataset_config("voc", "weclip")
    c.data.root = root
    c.data.train_split = "train"
    c.data.val_split = "train"
    c.data.seed_split = "train"
    c.data.crop_size = crop
    c.data.num_workers = workers
    c.data.cache_dir = tempfile.mkdtemp(dir=workdir)
    c.data.tfds_dir = os.path.join(workdir, "tfds")
    c.train.batch_size = batch
    c.sgc.slic_segments = n_segments
    c.sgc.max_segments = max_segments
    return c


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _epochs(config, n_train: int, epochs: int) -> tuple[float, float]:
    """(first-epoch images/s, images/s over the next `epochs` epochs)."""
    from ssr_jax import input_pipeline

    b = config.train.batch_size
    per_epoch = max(1, n_train // b)
    it = input_pipeline.train_iterator(config, process_index=0,
                                       process_count=1)
    try:
        t0 = time.perf_counter()
        for _ in range(per_epoch):
            next(it)
        first = per_epoch * b / (time.perf_counter() - t0)
        n = epochs * per_epoch
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        steady = n * b / (time.perf_counter() - t0)
    finally:
        it.close()
    return first, steady


def rates(root: str, workdir: str, *, n_train: int, crop: int, batch: int,
          workers: int, n_segments: int, max_segments: int,
          build_workers: int = 1, epochs: int = 2,
          modes=MODES) -> list[dict[str, Any]]:
    """One cell per mode (module docstring); a mode that cannot run (TFDS
    not installed) gets `{"mode", "skipped"}`."""
    import importlib.util

    cores = _cores()
    cells = []
    for mode in modes:
        c = _config(root, workdir, crop, batch, workers, n_segments,
                    max_segments)
        cell: dict[str, Any] = {"mode": mode, "workers": workers,
                                "cores": cores, "images": n_train}
        if mode == "tfds":
            if importlib.util.find_spec("tensorflow_datasets") is None:
                cells.append({**cell, "skipped": "tensorflow-datasets not "
                              "installed (requirements-tfds.txt)"})
                continue
            from ssr_jax.data import build

            t0 = time.perf_counter()
            out = build.build(c, workers=build_workers, splits=["train"],
                              log=lambda m: None)
            cell["build_s"] = time.perf_counter() - t0
            cell["build_workers"] = build_workers
            cell["built"] = out["built"]
            c.data.source = "tfds"
        c.sgc.slic_cache = mode != "per_crop"
        first, steady = _epochs(c, n_train, epochs)
        if mode == "cache":  # the first epoch computes and writes the cache
            cell["first_epoch_images_per_s"] = first
        cell["images_per_s"] = steady
        cell["images_per_s_per_core"] = steady / cores
        cell["median_s"] = batch / steady
        cells.append(cell)
    return cells


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64,
                   help="training images generated (375x500 JPEGs)")
    p.add_argument("--crop", type=int, default=320)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2,
                   help="data.num_workers: pipeline threads, every source")
    p.add_argument("--build-workers", type=int, default=0,
                   help="processes of the TFDS build (0: one per pinned core)")
    p.add_argument("--cpus", default="",
                   help="pin this process to these cores, e.g. 0,1")
    p.add_argument("--epochs", type=int, default=2,
                   help="timed epochs per source (after one untimed)")
    p.add_argument("--n-segments", type=int, default=100)
    p.add_argument("--max-segments", type=int, default=256)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--workdir", default="")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(x) for x in args.cpus.split(",")})
    from benchmarks.run import write_voc_tree

    workdir = args.workdir or tempfile.mkdtemp(prefix="ssr_pipe_")
    root = os.path.join(workdir, "voc")
    t0 = time.perf_counter()
    if not os.path.isdir(root):
        write_voc_tree(root, 2 * args.images)  # half train, half val
    print(f"data: {args.images} training JPEGs under {root} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    cells = rates(root, workdir, n_train=args.images, crop=args.crop,
                  batch=args.batch, workers=args.workers,
                  n_segments=args.n_segments, max_segments=args.max_segments,
                  build_workers=args.build_workers or _cores(),
                  epochs=args.epochs, modes=args.modes.split(","))
    print(f"| source | images/s | images/s per core ({_cores()} cores, "
          f"{args.workers} threads) | notes |")
    print("|---|---|---|---|")
    for c in cells:
        if "skipped" in c:
            print(f"| {c['mode']} | - | - | skipped: {c['skipped']} |")
            continue
        note = ""
        if "first_epoch_images_per_s" in c:
            note = (f"first epoch (computing the cache) "
                    f"{c['first_epoch_images_per_s']:.1f} images/s")
        if "build_s" in c:
            note = (f"build {c['build_s']:.1f} s with {c['build_workers']} "
                    "processes (once)")
        print(f"| {c['mode']} | {c['images_per_s']:.1f} | "
              f"{c['images_per_s_per_core']:.1f} | {note} |")
    if args.json:
        blob = {"command": " ".join(sys.argv), "args": vars(args),
                "cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "cells": cells}
        with open(args.json, "w") as f:
            json.dump(blob, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
