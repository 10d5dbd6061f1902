"""Dataset readers: files on disk to numpy examples (no JAX, no models).

- `specs.py`: one `DatasetSpec` per dataset (names, palette, prompts,
  class limits, presets, splits, TFDS builder, reader) and the registry
  (`register`, `get`); `vocabularies.py`: the built-in names and prompts.
- `voc.py`: the VOC directory layout (also COCO after `tools/coco_masks.py`
  and the synthetic world): split lists, paths, class names, decoding, the
  `Split` type.
- `splits.py`: a split's scan, image-level labels with their cache, the
  start-up summary (`load_folder_split`).
- `tfds_source.py`, `tfds_builder.py`, `tfds_*.py`, `build.py`: the TFDS
  datasets (reading, building; `python -m ssr_jax.data.build`).
- `transforms.py`: WeCLIP augmentation (rescale, flip, crop with padding)
  and the matching transforms of superpixel id maps.
- `slic.py`: SLIC superpixels with a bounded number of ids, and the SLIC
  cache.
- `synthetic/`: the procedurally generated world of the embedded default,
  written in the VOC layout (its dataset spec is `specs.SYNTHETIC`).

`ssr_jax.data_sources` chooses folders or TFDS (`data.source`) and turns
the config into these modules' arguments; `ssr_jax.input_pipeline` turns
them into grain pipelines. Importing this package is cheap: the
submodules load on demand.
"""


class DataError(Exception):
    """A problem with the dataset on disk, with the path and what to do."""
