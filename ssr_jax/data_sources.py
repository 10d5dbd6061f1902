"""Where a run's examples come from: the config → the data layer's readers.

`data.source` chooses between the files under `data.root`, read by the
dataset spec's reader (`data.specs`; "voc_tree": `data.splits` over the
VOC layout of `data.voc`), and a TFDS dataset built once by `python -m
ssr_jax.data.build` (`data.tfds_source`). This module sits above both, so
neither imports the other for the dispatch, and it is the one place that
turns the run config into the data layer's plain arguments: the SLIC
settings (`slic_params`, from the method's `sgc.*`), which nothing in
`ssr_jax/data/` reads from the config.

Every caller that needs a split or the class names (input pipeline,
evaluators, embedded default, pretrain report, benchmarks) calls
`load_split` / `class_names` here.
"""

from __future__ import annotations

from absl import logging

from ssr_jax.data import slic, specs, splits, voc

# `DatasetSpec.reader` -> the function that loads a split from the files
# (`specs.READERS` lists the names a spec may use).
READERS = {"voc_tree": splits.load_folder_split}


def spec(config) -> specs.DatasetSpec:
    """The registered spec of `config.data.name` (`UnknownDatasetError`,
    listing the registered datasets, for an unknown name)."""
    return specs.get(config.data.name)


def source(config) -> str:
    """`data.source`: "folders" (the files under data.root) or "tfds"."""
    return str(config.data.get("source", "folders"))


def slic_params(config) -> slic.SlicParams:
    """The SLIC settings of the run (`sgc.slic_*`, `data.crop_size`)."""
    s = config.sgc
    return slic.SlicParams(
        segments=int(s.slic_segments), compactness=float(s.slic_compactness),
        max_segments=int(s.max_segments),
        crop_size=int(config.data.crop_size), cache=bool(s.slic_cache))


def _tfds():
    from ssr_jax.data import tfds_source  # noqa: PLC0415 - TFDS paths only

    return tfds_source


def load_split(config, split: str) -> voc.Split:
    """Validates `split` and returns its `voc.Split`.

    Folders: the spec's reader scans the list (`splits.load_folder_split`:
    labels, problems, `data.strict`, the label cache). `data.source="tfds"`:
    the same fields, read from the built dataset's metadata.
    """
    if source(config) == "tfds":
        return _tfds().load_split(config, split, slic_params(config))
    # An unknown data.name fails here, listing the registered ones.
    return READERS[spec(config).reader](config, split)


def class_names(config) -> tuple[str, ...]:
    """Class names (background first) for `config.data`; checks their count.

    Folders: `<root>/classes.json` when present, else the spec's names
    (`voc.folder_class_names`). TFDS: the names stored with the dataset.
    """
    if source(config) == "tfds":
        return _tfds().class_names(config, slic_params(config))
    return voc.folder_class_names(config)


def validate_split(config, split: str) -> voc.SplitSummary:
    """Start-up pass over a split: returns (and logs) its summary.

    Raises `DataError` as the reader does (for folder trees see
    `splits.load_folder_split`: missing root or list, and with
    `data.strict` any bad example, each message naming the path).
    """
    summary = load_split(config, split).summary
    logging.info("%s", summary)
    return summary


def dataset_info(config) -> dict:
    """Classes and split sizes (list lengths; nothing is decoded).

    Returns `{"name", "root", "num_classes", "class_names", "splits":
    {split: number of listed ids or None when the list is absent}}` for the
    train, val and seed splits.
    """
    d = config.data
    wanted = dict.fromkeys((d.train_split, d.val_split, d.seed_split))
    if source(config) == "tfds":
        tfds_source, params = _tfds(), slic_params(config)
        meta = tfds_source.metadata(config, params)
        names = tfds_source.class_names(config, params)
        sizes = {s: (len(meta["splits"][s]["names"])
                     if s in meta["splits"] else None) for s in wanted}
        root = tfds_source.dataset_dir(config, params)
    else:
        voc.check_root(d.root)
        names = voc.folder_class_names(config)
        sizes = {s: voc.split_size(d.root, s) for s in wanted}
        root = d.root
    return {"name": d.name, "root": root, "num_classes": len(names),
            "class_names": list(names), "splits": sizes}
