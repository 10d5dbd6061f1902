"""Dataset readers: files on disk to numpy examples (no JAX, no models).

- `voc.py`: the VOC directory layout (also COCO after `tools/coco_masks.py`
  and the synthetic world), split lists, image-level labels with their
  cache, start-up validation.
- `transforms.py`: WeCLIP augmentation (rescale, flip, crop with padding)
  and the matching transforms of superpixel id maps.
- `slic.py`: SLIC superpixels with a bounded number of ids, and the SLIC
  cache.
- `synthetic.py`: the procedurally generated world of the embedded default,
  written in the VOC layout.

`ssr_jax.input_pipeline` turns these into grain pipelines. Importing this
package is cheap: the submodules load on demand.
"""


class DataError(Exception):
    """A problem with the dataset on disk, with the path and what to do."""
