"""TFDS builder `coco_seg`: MS COCO 2014 semantic masks (81 classes).

Reads the layout `tools/coco_masks.py` writes (masks rendered from the
instance annotations, ids `train2014/COCO_train2014_...`, lists `train`
82,081 and `val` 40,137, `classes.json`). Build: `python -m
ssr_jax.data.build --config configs/coco.py --config.data.root=<coco2014>
--config.data.tfds_dir=<dir>`.
"""

from ssr_jax.data import specs
from ssr_jax.data.tfds_builder import LayoutBuilder


class CocoSeg(LayoutBuilder, skip_registration=True):
    name = specs.COCO.tfds_builder
    DESCRIPTION = (
        "MS COCO 2014 semantic segmentation as used in WSSS: masks rendered "
        "from the instance annotations by ssr_jax tools/coco_masks.py (80 "
        "categories + background), JPEG images as stored, image-level "
        "labels from the masks and SLIC superpixels computed at build time.")
    HOMEPAGE = "https://cocodataset.org/"
    CITATION = """@inproceedings{lin2014coco,
  author = {Lin, Tsung-Yi and others},
  title = {Microsoft {COCO}: Common Objects in Context},
  booktitle = {ECCV}, year = {2014}}"""
