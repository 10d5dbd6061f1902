"""TFDS builder `synthetic_world`: the embedded default's generated world.

The world is written in the VOC layout (`data/synthetic.py`), so this is
the VOC-layout builder with the world's splits (`train`, `val`) and its
`classes.json`. Build: `python -m ssr_jax.data.build --config
configs/synthetic.py --config.data.tfds_dir=<dir>` (generates the world
first when `data.root` is empty, as the embedded default does).
"""

from ssr_jax.data import specs
from ssr_jax.data.tfds_builder import LayoutBuilder


class SyntheticWorld(LayoutBuilder, skip_registration=True):
    name = specs.SYNTHETIC.tfds_builder
    DESCRIPTION = (
        "ssr_jax's procedurally generated world (docs/synthetic_world.md): "
        "JPEG scenes, class masks, image-level labels and SLIC superpixels "
        "computed at build time.")
