r"""Builds a dataset as TFDS (array_record, superpixels included), once.

    python -m ssr_jax.data.build --config configs/voc.py \
        --config.data.root=/data/VOCdevkit/VOC2012 \
        --config.data.tfds_dir=/data/tfds [--workers 16] [--splits a,b]

writes `<tfds_dir>/<builder>/<slic tag>/1.0.0/` (`tfds_source` describes
it): the builder is the dataset spec's (`data.specs`): `voc_aug` for
configs/voc.py, `coco_seg` for configs/coco.py (after
`tools/coco_masks.py`), `synthetic_world` for configs/synthetic.py (the
world is generated first when `data.root` is empty). The splits are the
config's train, val and seed splits. The SLIC settings are the config's
(`sgc.slic_segments`, `slic_compactness`, `max_segments`,
`data.crop_size`): pass the same overrides as for training.

A process pool (`--workers`, default: every core) reads, checks and
encodes the images and runs SLIC; TFDS shows a progress bar per split and
writes the files. A finished dataset is left as it is (delete its
directory to rebuild). An interrupted build leaves the superpixels it
computed in the SLIC work cache (`<data.cache_dir or
root/.ssr_jax_cache>/tfds_build/`, keyed by image content): rerun the same
command and only the records are written again. At the end a summary
gives, per split, ids listed / stored / skipped (and why), images per
class, and the superpixel maps computed and reused.

Then train with `--config.data.source=tfds --config.data.tfds_dir=<dir>`
(copy the directory to a bucket for multi-host: `gsutil -m cp -r`).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = _WORKERS = _SPLITS = None  # flag holders, see _define_flags


def _define_flags() -> None:
    """Defines this command's flags on absl's global FLAGS, only when it
    runs as a program: ssr_jax.main defines `--config` too, and a process
    that imports both (the test suite) must not see it defined twice."""
    global _CONFIG, _WORKERS, _SPLITS
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/voc.py.",
        lock_config=False)
    _WORKERS = flags.DEFINE_integer(
        "workers", 0, "Encode/SLIC processes; 0 = every core, 1 = no pool.")
    _SPLITS = flags.DEFINE_list(
        "splits", None, "Splits to build; default: the config's train, val "
        "and seed splits that have a list file.")


def _fail(msg: str) -> None:
    print(f"ssr_jax.data.build: error: {msg}", file=sys.stderr)
    sys.exit(1)


def _size(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


def _check(config) -> None:
    from ssr_jax import data_sources
    from ssr_jax.data import DataError, slic, specs

    d = config.data
    try:
        spec = specs.get(d.name)
    except DataError as e:
        _fail(str(e))
    if spec.tfds_builder is None:
        have = [n for n in specs.names() if specs.get(n).tfds_builder]
        _fail(f"data.name={d.name!r} has no builder; one of "
              f"{', '.join(have)}")
    if not d.tfds_dir:
        _fail("--config.data.tfds_dir is empty: the directory to write the "
              "dataset into")
    if "://" in d.tfds_dir:
        _fail(f"data.tfds_dir={d.tfds_dir!r}: build into a local directory "
              "and copy it to the bucket (gsutil -m cp -r DIR gs://...)")
    params = data_sources.slic_params(config)
    if params.max_segments > slic.MAX_CACHEABLE_SEGMENTS:
        _fail(f"sgc.max_segments={params.max_segments}: stored "
              f"superpixels are 16-bit, at most {slic.MAX_CACHEABLE_SEGMENTS}")


def summary_text(meta: dict, report: dict, directory: str,
                 seconds: float | None) -> str:
    """The build summary (also printed for an already built dataset)."""
    lines = [f"dataset {directory}",
             f"  {meta['num_classes']} classes, SLIC {meta['slic']} "
             f"(scikit-image {meta['skimage_version']}), from "
             f"{meta['root']}"]
    if seconds is not None:
        lines[0] += f": built in {seconds:.1f} s"
    lines[0] += f", {_size(directory) / 2**20:.1f} MiB"
    for name, s in meta["splits"].items():
        summ = s["summary"]
        r = report.get(name)
        line = (f"  split {name!r}: {len(s['names'])} listed, "
                f"{len(s['stored'])} stored, {summ['num_skipped']} skipped")
        if r:
            line += (f"; superpixels {r['stored'] - r['slic_reused']} "
                     f"computed, {r['slic_reused']} reused from the SLIC "
                     f"work cache; {r['seconds']:.1f} s")
        lines.append(line)
        hist = summ["class_histogram"]
        absent = [k for k, v in hist.items() if not v]
        lines.append("    images per class: " + ", ".join(
            f"{k} {v}" for k, v in hist.items() if v)
            + (f"; absent: {', '.join(absent)}" if absent else ""))
        for p in summ["problems"][:20]:
            lines.append(f"    skipped: {p}")
        if len(summ["problems"]) > 20:
            lines.append(f"    ... and {len(summ['problems']) - 20} more")
    return "\n".join(lines)


def builder_class(name: str):
    """The builder class of `data.name`: its spec's `tfds_class`, a
    "module:Class" path (imports TFDS)."""
    import importlib

    from ssr_jax.data import DataError, specs, tfds_source

    tfds_source.require_tfds()
    spec = specs.get(name)
    if spec.tfds_class is None:
        raise DataError(f"data.name={name!r} has no TFDS builder")
    module, _, cls = spec.tfds_class.partition(":")
    return getattr(importlib.import_module(module), cls)


def build(config, *, workers: int = 0, splits: list[str] | None = None,
          log=print) -> dict:
    """Builds (or finds built) the dataset of `config`; returns a report.

    Returns `{"directory", "built" (False: it existed), "metadata",
    "report" (per split counts of this run), "seconds", "removed"
    (incomplete directories of killed builds that were deleted)}`. Raises
    `DataError` for bad data (with `data.strict`) and a missing root.
    """
    from ssr_jax import data_sources
    from ssr_jax.data import DataError, specs, tfds_builder, tfds_source, voc

    d = config.data
    if specs.get(d.name).synthetic and not d.root:
        from ssr_jax import pretrain

        d.root = pretrain.ensure_world(config)
    voc.check_root(d.root)
    cls = builder_class(d.name)
    workers = workers or os.cpu_count() or 1
    builder = cls(ssr_config=config,
                  slic_params=data_sources.slic_params(config),
                  splits=splits, workers=workers)
    directory = os.fspath(builder.data_path)
    if os.path.isfile(os.path.join(directory, "dataset_info.json")):
        meta = tfds_source._read_metadata_file(directory)  # noqa: SLF001
        have = list((meta or {}).get("splits", {}))
        missing = [s for s in builder.split_names if s not in have]
        if missing:
            raise DataError(
                f"{directory} is built without split(s) "
                f"{', '.join(missing)} (it has {', '.join(have)}); a built "
                "dataset is never modified: delete the directory and build "
                f"again with --splits={','.join(have + missing)}")
        return {"directory": directory, "built": False, "metadata": meta,
                "report": {}, "seconds": 0.0, "removed": []}
    removed = tfds_builder.remove_incomplete(builder)
    for path in removed:
        log(f"removed {path} (left by an interrupted build)")
    tfds = tfds_source.require_tfds()
    start = time.perf_counter()
    try:
        builder.download_and_prepare(download_config=tfds.download
                                     .DownloadConfig(try_download_gcs=False))
    finally:
        builder.close_pool()
    seconds = time.perf_counter() - start
    meta = tfds_source._read_metadata_file(directory)  # noqa: SLF001
    return {"directory": directory, "built": True, "metadata": meta,
            "report": builder.report, "seconds": seconds, "removed": removed}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None:
        _fail("--config is required, e.g. --config configs/voc.py")
    from ssr_jax.data import DataError

    config = _CONFIG.value
    _check(config)
    try:
        out = build(config, workers=_WORKERS.value, splits=_SPLITS.value)
    except DataError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted. Rerun the same command: the superpixels computed "
              "so far are reused.")
    if not out["built"]:
        print("already built (delete the directory to rebuild):")
    print(summary_text(out["metadata"], out["report"], out["directory"],
                       out["seconds"] if out["built"] else None))
    print("train with: --config.data.source=tfds "
          f"--config.data.tfds_dir={config.data.tfds_dir}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
