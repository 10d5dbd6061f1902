"""The shared TFDS builder of the VOC-layout datasets (array_record, no TF).

`tfds_voc.py`, `tfds_coco.py` and `tfds_synthetic.py` subclass
`LayoutBuilder` with their name, splits and description; everything else
is here, because all three datasets use the one VOC layout that `voc.py`
reads (COCO after `tools/coco_masks.py`, the synthetic world as
generated). Run them through `python -m ssr_jax.data.build`.

What a build does, per split (`data.train_split`, `val_split`,
`seed_split` unless `--splits` says otherwise):

1. `splits.load_folder_split`: the folder path's start-up scan (labels from
   the masks or XML, problems per id, `data.strict`: stop, or skip and
   count). Its `Split` becomes the split's metadata (ids, sizes, labels,
   mask flags, summary).
2. A process pool runs `tfds_source.encode_example` per usable id, in list
   order: image bytes as stored, the mask re-encoded as a greyscale PNG
   (palette PNGs decode to colours in OpenCV, which TFDS uses when
   installed), SLIC of the whole image (`slic.cached_n_segments` segments,
   the `sgc.slic_cache` mode, `slic.SlicParams`) as a 16-bit PNG, from a
   content-addressed SLIC cache that makes an interrupted build resumable.
3. TFDS writes the records in that order (`disable_shuffling`) to
   array_record files, and `metadata.json` last; the dataset directory
   appears only when everything is written (TFDS's `incomplete.*` rename).

TensorFlow is never imported: every feature is given as encoded bytes
(TFDS would call tf.image to encode numpy images), the file format is
array_record, and reading uses `as_data_source`, never `as_dataset`.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import logging

from ssr_jax.data import DataError, slic, tfds_source, voc
from ssr_jax.data.splits import load_folder_split

Feats = tfds.features


class LayoutBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A VOC-layout dataset with stored superpixels (see module docstring).

    Args:
      ssr_config: the run config (`data.*`); `data.tfds_dir` is the TFDS
        data_dir.
      slic_params: the SLIC settings of the stored superpixels
        (`data_sources.slic_params(config)`).
      splits: list names to build; None = the config's train, val and seed
        splits that have a list file.
      workers: processes of the encode pool; <= 1 encodes in this process.
    """

    VERSION = tfds.core.Version(tfds_source.VERSION)
    RELEASE_NOTES = {tfds_source.VERSION: "ssr_jax layout builder, format "
                     f"{tfds_source.FORMAT_VERSION}"}
    DESCRIPTION = ""
    HOMEPAGE = ""
    CITATION = ""

    def __init__(self, *, ssr_config, slic_params: slic.SlicParams,
                 splits: list[str] | None = None, workers: int = 1,
                 **kwargs):
        self.ssr_config = ssr_config
        self.settings = slic_params.settings()
        self.workers = int(workers)
        self.classes = voc.folder_class_names(ssr_config)
        self.split_names = splits or self.default_splits(ssr_config)
        self.report: dict[str, dict] = {}
        self._pool = None
        cfg = tfds.core.BuilderConfig(
            name=tfds_source.slic_tag(self.settings),
            description=f"SLIC settings {self.settings}")
        super().__init__(data_dir=ssr_config.data.tfds_dir, config=cfg,
                         file_format="array_record", **kwargs)

    @staticmethod
    def default_splits(ssr_config) -> list[str]:
        d = ssr_config.data
        names = list(dict.fromkeys((d.train_split, d.val_split,
                                    d.seed_split)))
        have = set(voc.available_splits(d.root))
        return [s for s in names if s in have] or names

    def _info(self):
        c = len(self.classes)
        features = Feats.FeaturesDict({
            "image": Feats.Image(shape=(None, None, 3), encoding_format=None,
                                 doc="JPEGImages/ file bytes as stored"),
            "mask": Feats.Image(
                shape=(None, None, 1), encoding_format="png",
                doc="greyscale PNG of class indices, 255 = ignore (all 255 "
                    "when has_mask is False)"),
            "has_mask": Feats.Scalar(np.bool_, doc="the id has a mask"),
            "superpixels": Feats.Image(
                shape=(None, None, 1), dtype=np.uint16,
                encoding_format="png",
                doc="SLIC ids of the whole image (metadata.json: slic)"),
            "labels": Feats.Tensor(
                shape=(c - 1,), dtype=np.bool_,
                doc="multi-hot foreground classes; class c <-> label c + 1"),
            "id": Feats.Text(doc="image id (list file entry)"),
            "index": Feats.Scalar(np.int64, doc="line in the split list"),
        })
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION, features=features,
            homepage=self.HOMEPAGE or None, citation=self.CITATION or None,
            disable_shuffling=True, metadata=tfds.core.MetadataDict())

    # --- generation ---------------------------------------------------------

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded: data.root holds the files
        cfg = self.ssr_config
        self.info.metadata[tfds_source.METADATA_KEY] = {
            "format_version": tfds_source.FORMAT_VERSION,
            "slic": self.settings,
            "skimage_version": _skimage_version(),
            "num_classes": len(self.classes),
            "class_names": list(self.classes),
            "dataset": cfg.data.name,
            "root": os.path.abspath(cfg.data.root),
            "label_source": cfg.data.label_source,
            "strict": bool(cfg.data.strict),
            "splits": {},
        }
        out = {}
        for name in self.split_names:
            split = load_folder_split(cfg, name)
            logging.info("%s", split.summary)
            out[name] = self._generate_examples(name, split)
        return out

    def _jobs(self, split: voc.Split) -> list[tuple]:
        work = os.path.join(voc.cache_dir(self.ssr_config), "tfds_build")
        num_classes = len(self.classes)
        return [(int(i), split.names[i], split.image_paths[i],
                 split.mask_paths[i], num_classes, self.settings, work)
                for i in split.usable]

    def _generate_examples(self, name: str, split: voc.Split):
        jobs = self._jobs(split)
        stored: list[int] = []
        problems: list[str] = []
        reused = 0
        start = time.perf_counter()
        bar = tqdm.tqdm(total=len(jobs), desc=f"{name}: encode + SLIC",
                        unit=" images", disable=None)  # off without a TTY
        for rec in self._encoded(jobs):
            bar.update(1)
            if "problem" in rec:
                if self.ssr_config.data.strict:
                    raise DataError(
                        f"{rec['problem']}\n(split {name!r}; pass "
                        "--config.data.strict=False to skip such examples)")
                logging.warning("skipping: %s", rec["problem"])
                problems.append(rec["problem"])
                continue
            line = rec["line"]
            stored.append(line)
            reused += bool(rec["slic_reused"])
            yield line, {
                "image": rec["image"], "mask": rec["mask"],
                "has_mask": rec["has_mask"],
                "superpixels": rec["superpixels"],
                "labels": split.labels[line] > 0,
                "id": rec["name"], "index": line,
            }
        bar.close()
        self._record_split(name, split, stored, problems)
        self.report[name] = {
            "listed": len(split.names), "stored": len(stored),
            "skipped_at_scan": split.summary.num_skipped,
            "skipped_at_encode": len(problems),
            "slic_reused": reused, "seconds": time.perf_counter() - start,
        }

    def _encoded(self, jobs: list[tuple]):
        """`encode_example` over `jobs`, in order; a spawn pool (one per
        build: spawn, as forking a threaded parent is unsafe) when
        `workers` > 1."""
        if self.workers <= 1 or len(jobs) < 2:
            yield from map(tfds_source.encode_example, jobs)
            return
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.workers)
        chunk = max(1, min(16, len(jobs) // (4 * self.workers)))
        yield from self._pool.imap(tfds_source.encode_example, jobs,
                                   chunksize=chunk)

    def close_pool(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def _record_split(self, name: str, split: voc.Split, stored: list[int],
                      problems: list[str]) -> None:
        summary = split.summary.as_dict()
        summary["problems"] = list(summary["problems"]) + problems
        summary["num_skipped"] = len(summary["problems"])
        summary["num_usable"] = len(stored)
        n = len(split.names)
        self.info.metadata[tfds_source.METADATA_KEY]["splits"][name] = {
            "names": list(split.names),
            "sizes": split.sizes.tolist(),
            "labels": [(np.flatnonzero(split.labels[i]) + 1).tolist()
                       for i in range(n)],
            "has_mask": [p is not None for p in split.mask_paths],
            "stored": stored,
            "summary": summary,
        }


def _skimage_version() -> str:
    import skimage

    return skimage.__version__


def remove_incomplete(builder: LayoutBuilder) -> list[str]:
    """Deletes `incomplete.*` directories a killed build left behind."""
    parent = os.path.dirname(os.fspath(builder.data_path))
    gone = []
    if os.path.isdir(parent):
        for entry in os.listdir(parent):
            if entry.startswith("incomplete."):
                path = os.path.join(parent, entry)
                shutil.rmtree(path, ignore_errors=True)
                gone.append(path)
    return gone
